"""Pretraining a tiny Shapes-world model from generated scenes.

One explicit loop: draw a batch of (prompt, image) from the world's generator, noise it, regress
the network's output on the target of its parameterisation (noise for epsilon, eps - x0 for flow),
step AdamW, update the EMA weights. The batch of step k depends only on (seed, k), so a run resumed
from a checkpoint reproduces the uninterrupted run. Checkpoints hold the raw and EMA weights, the
optimiser, the step and the config; the model folder written at the end (and at every snapshot)
holds the EMA weights, which sample much better than the raw ones for small models.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from diffalign.devices import resolve_device
from diffalign.diffusion.schedules import training_target
from diffalign.models.tiny import TinyDiffusionModel
from diffalign.world.dataset import DatasetConfig, ShapesGenerator

CHECKPOINTS = "checkpoints"


@dataclass
class PretrainConfig:
    """Everything a pretraining run depends on.

    Attributes:
        parameterization: "epsilon" (DDPM noise prediction) or "flow" (rectified-flow velocity).
        architecture: a name from `diffalign.models.tiny.ARCHITECTURES`.
        steps: optimiser steps in total.
        batch_size: images per step.
        lr: peak AdamW learning rate.
        lr_schedule: after the linear warm-up, "cosine" decay to `lr_min_ratio * lr`, or "constant"
            (with EMA weights, a constant rate needs no known end, so a run can stop on a time limit).
        warmup_steps: linear warm-up length.
        lr_min_ratio: final learning rate as a fraction of `lr` (cosine schedule).
        weight_decay: AdamW weight decay.
        grad_clip: gradient-norm clip (0 disables).
        ema_decay: decay of the exponential moving average of the weights.
        prompt_dropout: probability of training a sample on the empty prompt, which classifier-free
            guidance needs (Ho & Salimans 2022).
        flow_timesteps: "logit_normal" (SD3) or "uniform" sampling of t for flow models.
        seed: seeds initialisation and the data of every step.
        data_pool: if > 0, render this many examples once at the start (on the device, as uint8) and
            draw every batch from them; on a GPU this takes scene generation off the training loop.
            0 renders fresh scenes for every batch.
        device: "cpu", "cuda", ... ("auto" picks cuda when available).
        bf16: autocast the forward pass to bfloat16 on CUDA (otherwise float32 with TF32 matmuls).
        canvas_size: image side.
        category_weights: GenEval-task mix of the training prompts (see `DatasetConfig`).
        log_every: steps between metric lines.
        checkpoint_every: steps between resumable checkpoints (0: only at the end).
        keep_checkpoints: how many checkpoints to keep.
        snapshot_steps: steps at which the EMA model is also written to `snapshots/step-N`.
    """

    parameterization: str = "epsilon"
    architecture: str = "unet-s"
    steps: int = 20000
    batch_size: int = 128
    lr: float = 5e-4
    lr_schedule: str = "cosine"
    warmup_steps: int = 500
    lr_min_ratio: float = 0.05
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    prompt_dropout: float = 0.1
    flow_timesteps: str = "logit_normal"
    seed: int = 0
    data_pool: int = 0
    device: str = "auto"
    bf16: bool = True
    canvas_size: int = 32
    category_weights: dict[str, float] = field(
        default_factory=lambda: {
            "single_object": 1.0,
            "two_object": 1.0,
            "counting": 1.0,
            "colors": 1.0,
            "position": 1.0,
            "color_attr": 1.0,
        }
    )
    log_every: int = 50
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    snapshot_steps: list[int] = field(default_factory=list)

    def check(self) -> None:
        """Raise ValueError naming the first field a run cannot use (before any folder is written)."""
        from diffalign.diffusion.schedules import FLOW_TIME_DISTRIBUTIONS
        from diffalign.models.tiny import ARCHITECTURES

        choices = {
            "parameterization": ("epsilon", "flow"),
            "architecture": tuple(ARCHITECTURES),
            "lr_schedule": ("cosine", "constant"),
            "flow_timesteps": tuple(FLOW_TIME_DISTRIBUTIONS),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        for name in ("steps", "batch_size", "log_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "data_pool", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        for name in ("weight_decay", "grad_clip"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"{name} must be a number >= 0, got {getattr(self, name)}")
        for name in ("lr_min_ratio", "prompt_dropout"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.canvas_size < 4 or self.canvas_size % 4:
            raise ValueError(
                f"canvas_size must be a multiple of 4 (the UNet halves it twice), got {self.canvas_size}"
            )
        outside = [s for s in self.snapshot_steps if not 1 <= s <= self.steps]
        if outside:
            raise ValueError(
                f"snapshot_steps must be in 1..steps ({self.steps}); these never come: {outside}"
            )


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or inf loss; the last good checkpoint is kept."""


def learning_rate(step: int, config: PretrainConfig) -> float:
    """Linear warm-up then cosine decay (Loshchilov & Hutter 2017) to lr_min_ratio * lr."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if config.lr_schedule == "constant":
        return config.lr
    if config.lr_schedule != "cosine":
        raise ValueError(f"lr_schedule must be cosine or constant, got {config.lr_schedule!r}")
    progress = min(1.0, (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps))
    floor = config.lr_min_ratio
    return config.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def _step_generator(seed: int, step: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + step)


def latest_checkpoint(out_dir: Path) -> Path | None:
    folder = out_dir / CHECKPOINTS
    if not folder.is_dir():
        return None
    steps = sorted(
        (int(p.name.split("-")[1]), p) for p in folder.glob("step-*") if (p / "state.pt").is_file()
    )
    return steps[-1][1] if steps else None


def _save_checkpoint(out_dir: Path, step: int, state: dict, keep: int) -> Path:
    folder = out_dir / CHECKPOINTS
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step-{step:07d}"
    tmp = folder / f".tmp-step-{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    torch.save(state, tmp / "state.pt")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)  # atomic: a crash never leaves a half-written checkpoint under its final name
    old = sorted(p for p in folder.glob("step-*") if p != final)
    for stale in old[: max(0, len(old) - (keep - 1))]:
        shutil.rmtree(stale, ignore_errors=True)
    return final


def pretrain(
    config: PretrainConfig,
    out_dir: str | Path,
    resume: bool = False,
    stop_after: int | None = None,
    on_log: Callable[[dict], None] | None = None,
    time_limit: float | None = None,
) -> TinyDiffusionModel:
    """Run (or resume) pretraining; returns the EMA model, also written to `out_dir/model`.

    Args:
        resume: continue from the latest checkpoint in `out_dir` (an error if there is none).
        stop_after: stop (with a checkpoint) after this many steps in total, as an interruption would.
        on_log: called with every metrics record (the CLI prints progress with it).
        time_limit: stop after this many seconds of training, with a checkpoint and the model folder
            (meant for the constant learning-rate schedule).
    """
    config.check()
    if time_limit is not None and not (math.isfinite(time_limit) and time_limit > 0):
        raise ValueError(f"time_limit must be a positive number of seconds, got {time_limit}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: a file, not a run folder")
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    model = TinyDiffusionModel.create(config.parameterization, config.architecture, config.canvas_size)
    model.to(device)
    ema = TinyDiffusionModel(
        copy.deepcopy(model.unet).requires_grad_(False),
        model.tokenizer,
        model.prediction_type,
        model.schedule,
        eps_skip=model.eps_skip,
    )
    optimizer = torch.optim.AdamW(
        model.unet.parameters(),
        lr=config.lr,
        weight_decay=config.weight_decay,
        betas=(0.9, 0.99),
        fused=device.type == "cuda",
    )
    start = 0
    if resume:
        ckpt = latest_checkpoint(out)
        if ckpt is None:
            raise FileNotFoundError(f"--resume: no checkpoint under {out / CHECKPOINTS}")
        state = torch.load(ckpt / "state.pt", map_location=device, weights_only=False)
        saved = state["config"]
        if saved != asdict(config):
            diff = {k: (saved.get(k), v) for k, v in asdict(config).items() if saved.get(k) != v}
            raise ValueError(f"--resume: the config differs from the checkpoint's in {diff}")
        model.unet.load_state_dict(state["model"])
        ema.unet.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        start = state["step"]
    (out / "config.json").write_text(json.dumps(asdict(config), indent=1))

    data = ShapesGenerator(
        DatasetConfig(canvas_size=config.canvas_size, category_weights=config.category_weights), device
    )
    pool_images = pool_ids = None
    if config.data_pool > 0:
        pool_gen = torch.Generator(device=device).manual_seed(config.seed * 7919 + 1)
        chunks = [
            data.sample_prompt_ids(min(16384, config.data_pool - i), pool_gen)
            for i in range(0, config.data_pool, 16384)
        ]
        pool_ids = torch.cat(chunks)
        pool_images = torch.cat(
            [(data.render(data.scenes_for(ids, pool_gen)) * 255).round().to(torch.uint8) for ids in chunks]
        )
    if device.type == "cuda" and not config.bf16:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    # Every prompt of the world, tokenised once; a batch indexes this table by prompt id.
    table_ids, table_mask = model.tokenizer([m["prompt"] for m in data.metadata], device=device)
    empty_ids, empty_mask = model.tokenizer([""], device=device)
    schedule = model.schedule
    metrics_path = out / "metrics.jsonl"
    end = config.steps if stop_after is None else min(config.steps, stop_after)
    autocast = device.type == "cuda" and config.bf16
    model.unet.train()
    started = t_last = time.time()
    n_since = 0
    finite = torch.ones((), dtype=torch.bool, device=device)

    def check_finite(step: int) -> None:
        if not bool(finite):
            raise NonFiniteLossError(
                f"step {step}: the loss became NaN or inf; stopped. The last good checkpoint is kept: "
                f"{latest_checkpoint(out)}"
            )

    done = start
    for step in range(start, end):
        gen = _step_generator(config.seed, step, device)
        if pool_images is not None:
            pick = torch.randint(pool_images.shape[0], (config.batch_size,), generator=gen, device=device)
            prompt_ids, images = pool_ids[pick], pool_images[pick].float() / 255
        else:
            prompt_ids = data.sample_prompt_ids(config.batch_size, gen)
            images = data.render(data.scenes_for(prompt_ids, gen))
        x0 = model.encode(images)
        noise = torch.randn(x0.shape, generator=gen, device=device)
        if config.parameterization == "flow":
            t = schedule.sample_training_timesteps(
                x0.shape[0], generator=gen, device=device, distribution=config.flow_timesteps
            )
        else:
            t = schedule.sample_training_timesteps(x0.shape[0], generator=gen, device=device)
        x_t = schedule.add_noise(x0, noise, t)
        target = training_target(x0, noise, t, model.prediction_type, schedule)
        drop = (torch.rand(x0.shape[0], generator=gen, device=device) < config.prompt_dropout)[:, None]
        ids = torch.where(drop, empty_ids, table_ids[prompt_ids])
        mask = torch.where(drop, empty_mask, table_mask[prompt_ids])

        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, config)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            pred = model.forward_network(model.unet, x_t, t, ids, mask)
        loss = F.mse_loss(pred.float(), target)
        finite &= torch.isfinite(loss)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.unet.parameters(), config.grad_clip or float("inf"))
        optimizer.step()
        with torch.no_grad():
            decay = min(config.ema_decay, (1 + step) / (10 + step))
            torch._foreach_lerp_(list(ema.unet.parameters()), list(model.unet.parameters()), 1 - decay)
        n_since += 1

        done = step + 1
        out_of_time = time_limit is not None and time.time() - started >= time_limit
        if done % config.log_every == 0 or done == end or out_of_time:
            check_finite(done)
            now = time.time()
            record = {
                "step": done,
                "loss": float(loss.detach()),
                "lr": optimizer.param_groups[0]["lr"],
                "grad_norm": float(grad_norm),
                "images_per_s": n_since * config.batch_size / max(now - t_last, 1e-9),
                "elapsed_s": now - started,
            }
            with open(metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            if on_log is not None:
                on_log(record)
            t_last, n_since = now, 0
        if done in config.snapshot_steps:
            ema.save(out / "snapshots" / f"step-{done:07d}")
        if (config.checkpoint_every and done % config.checkpoint_every == 0) or done == end or out_of_time:
            check_finite(done)
            state = {
                "model": model.unet.state_dict(),
                "ema": ema.unet.state_dict(),
                "optimizer": optimizer.state_dict(),
                "step": done,
                "config": asdict(config),
            }
            _save_checkpoint(out, done, state, config.keep_checkpoints)
        if out_of_time:
            ema.save(out / "model")
            return ema
    if done == config.steps:
        ema.save(out / "model")
    return ema
