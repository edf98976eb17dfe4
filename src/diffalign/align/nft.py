"""DiffusionNFT: online reinforcement learning on the forward process (Zheng et al. 2025, arXiv:2509.16117).

Policy-gradient methods (`policy_gradient.py`) train on the log-probs of the sampler's stochastic steps,
a score-function estimate whose noise grows with the dimension of every step's noise. DiffusionNFT
trains on the final images only, with the denoising objective the model was pre-trained with: each
epoch
1. samples `prompts_per_epoch * samples_per_prompt` images with the old policy and any sampler (a
   deterministic one by default), and scores them with the reward (one query per image);
2. standardises the rewards within each prompt's group (GRPO's advantages), clips them to
   +-adv_clip and maps them to optimality probabilities r in [0, 1];
3. noises every image afresh at `timesteps_per_sample` of the sampler's levels and minimises
   `nft_loss.nft_loss`: the implicit positive policy is pulled towards good images, the implicit
   negative one towards bad ones (both relative to the old policy, so the update is bounded);
4. moves the old policy towards the trained weights (`old_decay`; 0 keeps it equal to them).

The old policy is a copy of the trainable weights (all of them, or the LoRA adapters), swapped into
the network for sampling and for the old predictions, which are computed for the whole epoch before
its first update. Everything random in an epoch (prompts, seeds, training levels and noise, their
order) is a function of (seed, epoch), each process samples a contiguous share of the epoch and the
shares are gathered (the data rule of `runtime.py`), and checkpoints hold the old weights, so
`--resume` continues an interrupted run exactly.

What this module leaves out: the paper's EMA *schedules* of the old policy (a constant `old_decay`
here) and its multi-reward weighting; the KL term (`kl_beta`) is the squared distance of the raw
predictions to the base model's, as in the reference code.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import Tensor

from diffalign.align.advantages import clip_advantages, flat_group_fraction, group_advantages
from diffalign.align.checkpointing import (
    begin_run,
    loop_bookkeeping,
    resume_weights,
    save_final_model,
    save_training_checkpoint,
)
from diffalign.align.config_io import to_dict
from diffalign.align.nft_config import NFTConfig
from diffalign.align.nft_loss import nft_loss, optimality_probability
from diffalign.align.online_metrics import log_image_grid, sample_metrics, save_image_grid
from diffalign.align.pg_rollout import NetworkPolicy, epoch_prompts
from diffalign.align.policy_setup import policy_for
from diffalign.align.prompts import load_prompt_source
from diffalign.align.run_dir import RunDir, RunDirError, set_rng_state
from diffalign.align.runtime import (
    global_batch_slice,
    make_accelerator,
    prepare_training,
    seed_everything,
    step_generator,
)
from diffalign.align.sharding import check_sharding, local_value, runs_callbacks, whole_value
from diffalign.align.tracking import resolve_log_with
from diffalign.diffusion.sampling import guided_predict, sample
from diffalign.models.lora_merge import merged_for_sampling
from diffalign.rewards.placement import place_reward
from diffalign.rewards.protocol import Reward
from diffalign.rewards.registry import load_reward

#: Per-micro-batch metrics summed between log lines (then averaged), in this order.
TRAIN_METRICS = ("loss", "old_deviation", "kl_to_base")
GRAD_NORM, COUNT_MICRO, COUNT_KL, COUNT_OPT = 3, 4, 5, 6
WINDOW_SIZE = 7
#: Sub-stream of `step_generator(seed, epoch, stream=...)` for the training points.
POINT_STREAM = 3


class OldPolicy:
    """The old (sampling) policy: a copy of the trainable weights, swapped into the network on demand."""

    def __init__(self, params: list[torch.nn.Parameter]) -> None:
        self.params = params
        self.weights = [p.detach().clone() for p in params]

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Within the block the network computes with the old weights (no gradients are taken)."""
        current = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, old in zip(self.params, self.weights):
                p.copy_(old)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, now in zip(self.params, current):
                    p.copy_(now)

    def update(self, decay: float) -> None:
        """old <- decay old + (1 - decay) theta."""
        with torch.no_grad():
            for old, p in zip(self.weights, self.params):
                old.lerp_(p.detach(), 1 - decay)

    def state(self) -> dict[str, Tensor]:
        """This process's old weights (its shards under FSDP: every process writes its own state)."""
        return {f"old.{i}": local_value(w).cpu() for i, w in enumerate(self.weights)}

    def load(self, state: dict[str, Tensor]) -> None:
        if len([k for k in state if k.startswith("old.")]) != len(self.weights):
            raise RunDirError("checkpoint: its old-policy weights do not match the model's trainable weights")
        for i, w in enumerate(self.weights):
            local_value(w).copy_(state[f"old.{i}"].to(w.device))


def training_points(
    num_samples: int, levels: list[float], per_sample: int, shape: tuple[int, ...], seed: int, epoch: int
) -> tuple[Tensor, Tensor, Tensor]:
    """The epoch's training points in training order: (sample index [N], level [N], noise [N, *shape]),
    N = num_samples * per_sample; each sample gets `per_sample` levels drawn uniformly from `levels`
    (with replacement) and fresh noise. A function of (seed, epoch) only."""
    gen = step_generator(seed, epoch, stream=POINT_STREAM)
    rows = torch.arange(num_samples).repeat_interleave(per_sample)
    t = torch.tensor(levels, dtype=torch.float32)[torch.randint(len(levels), (len(rows),), generator=gen)]
    noise = torch.randn((len(rows), *shape), generator=gen)
    order = torch.randperm(len(rows), generator=gen)
    return rows[order], t[order], noise[order]


def _sample_images(model, prompts: list[str], seeds: list[int], sampler, batch_size: int):
    """(final latents, decoded images) of `prompts`, sampled in chunks of `batch_size`, through LoRA
    adapters merged into the weights (`lora_merge`: the same function at the plain network's cost)."""
    latents, images = [], []
    with torch.no_grad(), merged_for_sampling(model):
        for start in range(0, len(prompts), batch_size):
            chunk = slice(start, start + batch_size)
            traj = sample(model, prompts[chunk], config=sampler, seeds=seeds[chunk])
            latents.append(traj.final_latents)
            images.append(traj.images)
    return torch.cat(latents), torch.cat(images)


def train_nft(
    config: NFTConfig,
    run_dir: str | Path,
    resume: bool = False,
    stop_after: int | None = None,
    on_log: Callable[[dict], None] | None = None,
    on_epoch: Callable[[object, int], None] | None = None,
    *,
    reward: Reward | None = None,
    show_progress: bool = False,
    extend: bool = False,
):
    """Fine-tune `config.model` on `config.reward` with DiffusionNFT; returns the trained model.

    Writes the run folder (`diffalign.align.run_dir`); its `model/` is the final model. Arguments as
    `policy_gradient.train_pg`.

    Raises:
        RunDirError: a fresh run into a used folder, a resume without a run or with another config.
        NonFiniteError: a reward, loss or gradient norm became NaN or inf (the last good checkpoint is kept).
        ValueError: batch sizes that do not divide the epoch's training points.
    """
    run = RunDir(run_dir)

    # 1. Accelerate, seeding, the model and its reference, the reward, the prompts.
    accelerator = make_accelerator(config.runtime, resolve_log_with(config.log_with), run.logs_dir)
    seed_everything(config.runtime.seed)
    model = policy_for(config, accelerator.device)
    check_sharding(config.runtime, num_processes=accelerator.num_processes, lora=model.lora)
    sampler = config.sampler_config(model.prediction_type)
    levels = config.training_levels(sampler, model.schedule)
    source = load_prompt_source(config.prompts)
    reward = place_reward(config.reward, reward, accelerator.device, config.reward_device)
    gold = None
    if config.gold not in ("none", config.reward):
        gold = load_reward(config.gold, device=accelerator.device)
    num_processes = accelerator.num_processes
    accumulation = config.runtime.gradient_accumulation_steps
    per_epoch = config.samples_per_epoch
    if per_epoch % num_processes:
        raise ValueError(
            f"prompts_per_epoch * samples_per_prompt = {per_epoch} samples must split evenly over "
            f"{num_processes} processes"
        )
    points = per_epoch * config.timesteps_per_sample
    point_global = config.train_batch_size * num_processes * accumulation
    if points % point_global:
        raise ValueError(
            f"an epoch trains {points} points ({per_epoch} samples x timesteps_per_sample "
            f"{config.timesteps_per_sample}), which an optimiser step of {point_global} points "
            f"(train_batch_size {config.train_batch_size} x {num_processes} processes x {accumulation} "
            "accumulation) does not divide"
        )
    record = {
        "trainer": config.method,
        "config": to_dict(config),
        "model": {"spec": config.model, "prediction_type": model.prediction_type},
        "resolved": {"sampler": sampler.__dict__, "levels": levels, "prompts": len(source)},
    }
    begin_run(run, record, resume, accelerator, extend=extend)
    network = model.denoiser  # eval mode: sampling and training see the same network

    # 2. Resume: trainable weights before `prepare`, optimiser state, RNG and old weights after it.
    start = 0
    checkpoint = None
    if resume or extend:
        checkpoint = resume_weights(run, record, accelerator, network, extend=extend)
        start = checkpoint.step
        if checkpoint.data_cursor != start * per_epoch:
            raise RunDirError(
                f"checkpoint {checkpoint.path}: {checkpoint.data_cursor} samples in {start} epochs"
            )
    unet, optimizer, params = prepare_training(accelerator, model, config, checkpoint)
    policy = NetworkPolicy(model, unet)
    old = OldPolicy(params)
    window = torch.zeros(WINDOW_SIZE, device=accelerator.device)  # metric sums since the last log line
    if checkpoint is not None:
        if checkpoint.rng is not None:
            set_rng_state(checkpoint.rng)
        old.load(checkpoint.process_state)
        window = checkpoint.process_state["window"].to(accelerator.device)

    device = accelerator.device
    end, guard, tracker = loop_bookkeeping(
        accelerator, run, config.method, record, config.epochs, start, stop_after, show_progress
    )
    share = per_epoch // num_processes
    mine = slice(accelerator.process_index * share, (accelerator.process_index + 1) * share)
    seed = config.runtime.seed
    guidance = sampler.guidance_scale if config.guided_loss else 1.0
    shape = tuple(int(d) for d in model.latent_shape)
    done = start
    started = time.perf_counter()
    try:
        for epoch in range(start, end):
            # 3. Sample this process's share with the old policy, score it, gather the whole epoch.
            t0 = time.perf_counter()
            prompts, seeds = epoch_prompts(
                source, seed, epoch, config.prompts_per_epoch, config.samples_per_prompt
            )
            with old.active(), accelerator.autocast():
                latents, images = _sample_images(
                    model, prompts[mine], seeds[mine], sampler, config.sample_batch_size
                )
            with torch.no_grad():
                rewards = reward(images, prompts[mine]).detach().float().to(device)
            guard.observe("reward", rewards, epoch + 1)
            guard.check(run.latest_checkpoint())  # before a non-finite reward reaches the weights
            latents = accelerator.gather(latents.contiguous())
            images = accelerator.gather(images.contiguous())
            rewards = accelerator.gather(rewards.contiguous())
            sample_seconds = time.perf_counter() - t0

            # 4. Advantages within groups -> optimality probabilities (identical on every process).
            advantages = clip_advantages(
                group_advantages(rewards, config.samples_per_prompt), config.adv_clip
            )
            reward_prob = optimality_probability(advantages.to(device), config.adv_clip)

            # 5. This process's training points of every micro-batch, and the old policy's outputs on
            # them, computed before the epoch's first update.
            rows, levels_t, noise = training_points(
                per_epoch, levels, config.timesteps_per_sample, shape, seed, epoch
            )
            with torch.no_grad():
                cond_all = model.encode_prompts(prompts)
                uncond_row = model.encode_prompts([""]) if guidance != 1.0 else None
            batches = []
            for opt_step in range(points // point_global):
                for micro in range(accumulation):
                    part = global_batch_slice(
                        micro, accelerator.process_index, num_processes, config.train_batch_size
                    )
                    take = slice(opt_step * point_global + part.start, opt_step * point_global + part.stop)
                    r = rows[take].to(device)
                    t = levels_t[take].to(device)
                    x0 = latents[r]
                    x_t = model.schedule.add_noise(x0, noise[take].to(device).to(x0.dtype), t)
                    uncond = None if uncond_row is None else uncond_row[torch.zeros(len(r), dtype=torch.long)]
                    batches.append((r, t, x0, x_t, uncond))
            old_outputs = []
            with old.active(), torch.no_grad(), accelerator.autocast():
                for r, t, _, x_t, uncond in batches:
                    old_outputs.append(guided_predict(policy, x_t, t, cond_all[r], uncond, guidance).float())

            # 6. Train: one pass over the points.
            for k, (r, t, x0, x_t, uncond) in enumerate(batches):
                need_kl = config.kl_beta > 0 or k == 0
                with accelerator.accumulate(unet):
                    with accelerator.autocast():
                        new = guided_predict(policy, x_t, t, cond_all[r], uncond, guidance)
                        out = nft_loss(
                            new.float(),
                            old_outputs[k],
                            x_t,
                            t,
                            x0,
                            reward_prob[r],
                            beta=config.beta,
                            adv_clip=config.adv_clip,
                            prediction_type=model.prediction_type,
                            schedule=model.schedule,
                        )
                        loss = out.loss
                        kl = torch.zeros((), device=device)
                        if need_kl:
                            with torch.no_grad():  # the base model is never trained
                                ref = guided_predict(
                                    policy, x_t, t, cond_all[r], uncond, guidance, use_reference=True
                                ).float()
                            kl = ((new.float() - ref) ** 2).mean()
                            if config.kl_beta > 0:
                                loss = loss + config.kl_beta * kl
                    guard.observe("loss", loss, epoch + 1)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        grad_norm = accelerator.clip_grad_norm_(params, config.grad_clip or math.inf)
                        grad_norm = whole_value(grad_norm)  # a DTensor under FSDP
                        guard.observe("gradient norm", grad_norm, epoch + 1)
                        window[GRAD_NORM] += grad_norm.detach().float()
                        window[COUNT_OPT] += 1
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                window[0] += loss.detach().float()
                window[1] += out.old_deviation.float()
                window[COUNT_MICRO] += 1
                if need_kl:
                    window[2] += kl.detach().float()
                    window[COUNT_KL] += 1
            old.update(config.old_decay)
            done = epoch + 1
            tracker.advance(done)

            # 7. Metrics of this epoch's samples and training.
            guard.check(run.latest_checkpoint())
            if done % config.log_every == 0 or done == config.epochs:
                mean = accelerator.reduce(window.clone(), reduction="mean")
                line: dict = {"step": done, "reward_queries": done * per_epoch}
                line["loss"] = float(mean[0] / mean[COUNT_MICRO])
                line["old_deviation"] = float(mean[1] / mean[COUNT_MICRO])
                line["kl_to_base"] = float(mean[2] / mean[COUNT_KL])
                line["grad_norm"] = float(mean[GRAD_NORM] / mean[COUNT_OPT])
                if accelerator.is_main_process:
                    line.update(sample_metrics(images, prompts, rewards, gold))
                line["flat_groups"] = flat_group_fraction(rewards, config.samples_per_prompt)
                line["sample_seconds"] = sample_seconds
                line["seconds_per_epoch"] = (time.perf_counter() - started) / max(1, done - start)
                tracker.log(line)
                if on_log is not None and accelerator.is_main_process:
                    on_log(line)
                window.zero_()
            if config.grid_every and done % config.grid_every == 0 and accelerator.is_main_process:
                count = min(len(prompts), 8 * config.samples_per_prompt)
                grid = run.path / "grids" / f"epoch-{done:05d}.png"
                save_image_grid(images[:count].float().cpu(), grid, nrow=config.samples_per_prompt)
                log_image_grid(accelerator, "samples", images[:count], done, config.samples_per_prompt)

            # 8. Checkpoint (never after a non-finite value): every process writes its own state.
            if (config.checkpoint_every and done % config.checkpoint_every == 0) or done == end:
                save_training_checkpoint(
                    run,
                    accelerator,
                    done,
                    network=network,
                    optimizer=optimizer,
                    data_cursor=done * per_epoch,
                    record=record,
                    keep=config.keep_checkpoints,
                    process_state={"window": window.cpu(), **old.state()},
                )
            if on_epoch is not None and runs_callbacks(accelerator, config.runtime):
                on_epoch(model, done)
            accelerator.wait_for_everyone()
    finally:
        tracker.close()

    # 9. The final model folder (what `load_model(run_dir)` and `diffalign sample --model` read).
    save_final_model(run, accelerator, guard, model, done, config.epochs)
    return model
