"""Reward backpropagation: fine-tune a diffusion model by the gradient of a differentiable reward.

Every optimiser step samples a batch of prompts under the current weights and backpropagates
d reward / d image into the network through some of the sampling steps (`backprop_losses`):
- AlignProp: the last K steps, K drawn uniformly from `truncation_range` every step (random truncation),
  with activation checkpointing of the denoiser calls that carry gradients;
- DRaFT-K: the last K steps (fixed K); DRaFT-LV: the last step, applied to n re-noised copies of each
  final sample;
- ReFL: one random late step's x0 prediction, plus the pre-training loss on `pretrain_data`
  (`pretrain_data.py`: generated Shapes-world images, or a preference store's preferred images), the
  regulariser of the paper that its released code leaves out.
Any of them can add `kl_weight` times a drift penalty to the base model (`chain_kl_penalty`: DPOK's
per-step KL, or the squared step-mean distance for a deterministic sampler), which none of the papers has.
The reward must be differentiable (`require_differentiable`: a learned reward model, not a detector).

`train_backprop` is one explicit loop, in the order of `dpo.train_dpo`: Accelerate, seeding, the model
and its frozen base, resume (weights before `prepare`, optimiser and RNG after), then per step: the
step's draw (prompts, seeds, K or ReFL's step, DRaFT-LV's noise, ReFL's data, the penalty's steps: a
function of (seed, step) only, so a resumed run reproduces the uninterrupted one), micro-batches under
`accumulate`, the NaN/inf guard, metrics averaged between log lines, atomic checkpoints, the final
`model/` folder.

Logged: loss, the training reward of the scored images, ReFL's pre-training loss, the drift penalty
(`kl_penalty`, unweighted, when `kl_weight` > 0), the gradient norm,
reward queries and denoiser calls with gradients (cumulative, all processes), and at every log line
the metrics of the final samples of the step's last micro-batch (`online_metrics.sample_metrics`:
reward mean/std, gold reward, diversity) and, with `log_kl`, the drift from the base model on one of
those chains (`backprop_losses.drift_to_base`: a KL estimate for a stochastic sampler, the squared
step-mean distance for DDIM with eta 0). Those metric evaluations are not counted as reward queries.

What this module leaves out: DRaFT's gradient-clipping of the reward, ReFL's alternation of ReFL and
pre-training batches (the two losses are summed in every micro-batch). Every method trains full
weights or LoRA adapters, on the tiny models and on diffusers pipelines (docs/diffusers.md).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor

from diffalign.align.backprop_config import BackpropConfig
from diffalign.align.backprop_losses import (
    BackpropOutput,
    SamplingPolicy,
    chain_kl_penalty,
    draft_lv_loss,
    drift_to_base,
    refl_loss,
    truncated_chain_loss,
)
from diffalign.align.checkpointing import (
    begin_run,
    loop_bookkeeping,
    resume_weights,
    save_final_model,
    save_training_checkpoint,
)
from diffalign.align.config_io import to_dict
from diffalign.align.online_metrics import log_image_grid, sample_metrics, save_image_grid
from diffalign.align.policy_setup import is_pipeline, policy_for
from diffalign.align.pretrain_data import WORLD, StoreData, WorldData, pretrain_source
from diffalign.align.prompts import PromptSource, load_prompt_source
from diffalign.align.run_dir import RunDir, RunDirError, set_rng_state
from diffalign.align.runtime import (
    global_batch_slice,
    make_accelerator,
    prepare_training,
    seed_everything,
    step_generator,
)
from diffalign.align.sharding import check_sharding, runs_callbacks, whole_value
from diffalign.align.tracking import resolve_log_with
from diffalign.rewards.placement import place_reward
from diffalign.rewards.protocol import Reward, require_differentiable
from diffalign.rewards.registry import load_reward

#: Per-micro-batch metrics summed between log lines (then averaged), in this order.
TRAIN_METRICS = ("loss", "train_reward", "pretrain_loss", "kl_penalty")
GRAD_NORM, COUNT_MICRO, COUNT_OPT = 4, 5, 6
WINDOW_SIZE = 7
#: Sub-streams of `step_generator(seed, step, stream=...)`.
PROMPT_STREAM, NOISE_STREAM, DATA_STREAM, KL_STREAM = 1, 2, 3, 4


@dataclass
class StepDraw:
    """The random choices of one optimiser step for its whole global batch (G prompts).

    Attributes:
        prompts: the G prompts.
        seeds: one sampling seed per prompt.
        grad_steps: K, the final steps with gradients (AlignProp, DRaFT-K).
        refl_step: ReFL's gradient step index.
        lv_noise: DRaFT-LV's re-noising draws [G, n, C, H, W], or None.
        data: ReFL's pre-training batch (images [D, 3, H, W], prompts, noise, t) with D = G_pretrain, or None.
        kl_steps: the chain steps of the drift penalty (distinct, sorted; empty when `kl_weight` is 0).
    """

    prompts: list[str]
    seeds: list[int]
    grad_steps: int
    refl_step: int
    lv_noise: Tensor | None
    data: tuple[Tensor, list[str], Tensor, Tensor] | None
    kl_steps: list[int]


def draw_step(
    config: BackpropConfig,
    model,
    source: PromptSource,
    data_source: WorldData | StoreData | None,
    step: int,
    global_size: int,
    data_size: int,
) -> StepDraw:
    """Step `step`'s draw: a function of (seed, step) only, drawn on the CPU."""
    seed = config.runtime.seed
    gen = step_generator(seed, step, stream=PROMPT_STREAM)
    prompts = source.sample(global_size, gen)
    seeds = torch.randint(0, 2**31 - 1, (global_size,), generator=gen).tolist()
    k = config.draft_k
    if config.method == "alignprop":
        lo, hi = config.truncation()
        k = int(torch.randint(lo, hi + 1, (1,), generator=gen))
    first, last = config.refl_steps()
    refl_step = int(torch.randint(first, last + 1, (1,), generator=gen))
    lv_noise = None
    if config.method == "draft-lv":
        noise_gen = step_generator(seed, step, stream=NOISE_STREAM)
        lv_noise = torch.randn((global_size, config.lv_samples, *model.latent_shape), generator=noise_gen)
    data = None
    if data_source is not None:
        data_gen = step_generator(seed, step, stream=DATA_STREAM)
        images, data_prompts = data_source.draw(data_size, data_gen)
        noise = torch.randn((data_size, *model.latent_shape), generator=data_gen)
        t = model.schedule.sample_training_timesteps(data_size, generator=data_gen)
        data = (images, data_prompts, noise, t)
    kl_steps: list[int] = []
    if config.kl_weight > 0:
        kl_gen = step_generator(seed, step, stream=KL_STREAM)
        kl_steps = sorted(torch.randperm(config.num_steps, generator=kl_gen)[: config.kl_steps].tolist())
    return StepDraw(prompts, seeds, k, refl_step, lv_noise, data, kl_steps)


def with_kl_penalty(
    config: BackpropConfig, policy: SamplingPolicy, out: BackpropOutput, draw: StepDraw
) -> BackpropOutput:
    """`out` with `kl_weight` times the drift penalty on its own chains added to the loss (and its value
    kept as `kl_penalty`); `out` itself when `kl_weight` is 0."""
    if config.kl_weight == 0:
        return out
    penalty = chain_kl_penalty(policy, out.trajectory, draw.kl_steps)
    return replace(out, loss=out.loss + config.kl_weight * penalty, kl_penalty=penalty.detach())


def _micro(
    config: BackpropConfig,
    policy: SamplingPolicy,
    reward: Reward,
    sampler,
    draw: StepDraw,
    rows: slice,
    data_rows: slice,
    device: torch.device,
) -> BackpropOutput:
    """The objective of one micro-batch: `draw`'s prompts at `rows` (and ReFL's data at `data_rows`)."""
    prompts, seeds = draw.prompts[rows], draw.seeds[rows]
    if config.method in ("alignprop", "draft"):
        return truncated_chain_loss(
            policy,
            reward,
            prompts,
            seeds,
            sampler,
            draw.grad_steps,
            config.reward_scale,
            config.checkpoint_grad_steps,
        )
    if config.method == "draft-lv":
        return draft_lv_loss(
            policy,
            reward,
            prompts,
            seeds,
            sampler,
            draw.lv_noise[rows],
            config.reward_scale,
            config.checkpoint_grad_steps,
        )
    data = None
    if draw.data is not None:
        images, data_prompts, noise, t = draw.data
        data = (
            images[data_rows].to(device),
            data_prompts[data_rows],
            noise[data_rows].to(device),
            t[data_rows].to(device),
        )
    return refl_loss(
        policy,
        reward,
        prompts,
        seeds,
        sampler,
        draw.refl_step,
        config.reward_scale,
        config.refl_margin,
        data,
        config.pretrain_weight,
    )


def train_backprop(
    config: BackpropConfig,
    run_dir: str | Path,
    resume: bool = False,
    stop_after: int | None = None,
    on_log: Callable[[dict], None] | None = None,
    on_step: Callable[[object, int], None] | None = None,
    *,
    reward: Reward | None = None,
    show_progress: bool = False,
    extend: bool = False,
):
    """Fine-tune `config.model` by backpropagating `config.reward` (AlignProp, DRaFT-K/LV, ReFL).

    Writes the run folder (`diffalign.align.run_dir`); its `model/` is the final model.

    Args:
        config: the run's config.
        run_dir: the run folder.
        resume: continue from the latest checkpoint in `run_dir`; refuses a different config.
        stop_after: stop (with a checkpoint) after this many steps in total, as an interruption would.
        on_log: called with every metrics record on the main process.
        on_step: called as on_step(model, steps_done) on the main process (on every process under
            `runtime.sharding=fsdp`, where the model runs only collectively) after every step (e.g. a
            benchmark's evaluation); the model is in eval mode and must be left unchanged.
        reward: a Reward object to use instead of loading `config.reward` (tests, notebooks).
        show_progress: a rich progress bar on the main process.
        extend: resume a run with a longer `steps` than it was started with (a completed run
            continues from its final checkpoint; `diffalign.align.run_dir`, "Extending a run").

    Raises:
        NotDifferentiableError: the reward is a black box.
        RunDirError: a fresh run into a used folder, a resume without a run or with another config.
        NonFiniteError: a reward, loss or gradient norm became NaN or inf (the last good checkpoint is kept).
    """
    run = RunDir(run_dir)
    if reward is None and not config.reward:
        raise ValueError("reward: give a differentiable reward spec (e.g. a learned reward model folder)")

    # 1. Accelerate, seeding, the model and its frozen base, the reward, the prompts.
    accelerator = make_accelerator(config.runtime, resolve_log_with(config.log_with), run.logs_dir)
    seed_everything(config.runtime.seed)
    reward = place_reward(config.reward, reward, accelerator.device, config.reward_device)
    require_differentiable(reward, config.method)
    model = policy_for(config, accelerator.device)
    check_sharding(config.runtime, num_processes=accelerator.num_processes, lora=model.lora)
    sampler = config.sampler_config(model.prediction_type)
    source = load_prompt_source(config.prompts)
    gold = None
    if config.gold not in ("none", config.reward):
        gold = load_reward(config.gold, device=accelerator.device)
    data_source = None
    if config.method == "refl" and config.pretrain_weight > 0:
        if is_pipeline(model) and config.pretrain_data == WORLD:
            raise ValueError(
                f"pretrain_weight={config.pretrain_weight} with pretrain_data='world': the Shapes world's "
                "renderings are the tiny models' training data, not a pipeline's; give pretrain_data=STORE "
                "(a preference store whose preferred images stand in for the pre-training set) or set "
                "pretrain_weight=0"
            )
        data_source = pretrain_source(config.pretrain_data, int(model.image_shape[-1]))
    num_processes = accelerator.num_processes
    accumulation = config.runtime.gradient_accumulation_steps
    global_size = config.batch_size * num_processes * accumulation
    data_size = config.pretrain_batch_size * num_processes * accumulation
    queries_per_step = global_size * (config.lv_samples if config.method == "draft-lv" else 1)
    record = {
        "trainer": config.method,
        "config": to_dict(config),
        "model": {"spec": config.model, "prediction_type": model.prediction_type},
        "resolved": {"sampler": sampler.__dict__, "prompts": len(source), "reward": reward.name},
    }
    begin_run(run, record, resume, accelerator, extend=extend)
    network = model.denoiser  # in eval mode: sampling and training see the same network

    # 2. Resume: trainable weights before `prepare`, optimiser state and RNG after it.
    start = 0
    counters = {"reward_queries": 0, "grad_calls": 0}
    checkpoint = None
    if resume or extend:
        checkpoint = resume_weights(run, record, accelerator, network, extend=extend)
        start = checkpoint.step
        if checkpoint.data_cursor != start * global_size:
            raise RunDirError(
                f"checkpoint {checkpoint.path} sampled {checkpoint.data_cursor} prompts in {start} steps; "
                f"this run's global batch is {global_size}: resume with the same number of processes"
            )
        counters = dict(checkpoint.extra["counters"])
    unet, optimizer, params = prepare_training(accelerator, model, config, checkpoint)
    policy = SamplingPolicy(model, unet)
    if checkpoint is not None and checkpoint.rng is not None:
        set_rng_state(checkpoint.rng)

    device = accelerator.device
    end, guard, tracker = loop_bookkeeping(
        accelerator, run, config.method, record, config.steps, start, stop_after, show_progress
    )
    rank = accelerator.process_index
    window = torch.zeros(WINDOW_SIZE, device=device)  # metric sums and counts since the last log line
    if checkpoint is not None and "window" in checkpoint.process_state:
        saved = checkpoint.process_state["window"]
        if saved.numel() == WINDOW_SIZE:  # a checkpoint of an older layout restarts the averages
            window = saved.to(device)
    done = start
    started = time.perf_counter()
    try:
        for step in range(start, end):
            # 3. The step's draw (a function of seed and step); this process takes its rows of each
            # micro-batch.
            draw = draw_step(config, model, source, data_source, step, global_size, data_size)
            grad_calls = 0
            for micro in range(accumulation):
                rows = global_batch_slice(micro, rank, num_processes, config.batch_size)
                data_rows = global_batch_slice(micro, rank, num_processes, config.pretrain_batch_size)
                # `accumulate` syncs gradients across processes, and lets the optimiser step, only on
                # the last micro-batch; `backward` divides the loss by the accumulation steps.
                with accelerator.accumulate(unet):
                    with accelerator.autocast():
                        out = _micro(config, policy, reward, sampler, draw, rows, data_rows, device)
                        out = with_kl_penalty(config, policy, out, draw)
                    guard.observe("reward", out.rewards, step + 1)
                    guard.observe("loss", out.loss, step + 1)
                    accelerator.backward(out.loss)
                    if accelerator.sync_gradients:
                        grad_norm = accelerator.clip_grad_norm_(params, config.grad_clip or math.inf)
                        grad_norm = whole_value(grad_norm)  # a DTensor under FSDP
                        guard.observe("gradient norm", grad_norm, step + 1)
                        window[GRAD_NORM] += grad_norm.detach().float()
                        window[COUNT_OPT] += 1
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                window[0] += out.loss.detach().float()
                window[1] += out.rewards.detach().float().mean()
                window[2] += out.pretrain_loss.float()
                if out.kl_penalty is not None:
                    window[3] += out.kl_penalty.float()
                window[COUNT_MICRO] += 1
                grad_calls += out.grad_calls * config.batch_size * num_processes
            counters["reward_queries"] += queries_per_step
            counters["grad_calls"] += grad_calls
            done = step + 1
            tracker.advance(done)

            # 4. Metrics: training sums averaged over micro-batches and processes; the last micro-batch's
            # final samples (gathered) for reward, gold, diversity and drift from the base.
            guard.check(run.latest_checkpoint())
            log_now = done % config.log_every == 0 or done == config.steps
            grid_now = bool(config.grid_every) and done % config.grid_every == 0
            if log_now or grid_now:
                finals = accelerator.gather(
                    model.decode(out.trajectory.final_latents).clamp(0, 1).contiguous()
                )
                last_rows = [
                    global_batch_slice(accumulation - 1, p, num_processes, config.batch_size)
                    for p in range(num_processes)
                ]
                prompts = [p for r in last_rows for p in draw.prompts[r]]
            if log_now:
                mean = accelerator.reduce(window.clone(), reduction="mean")
                line: dict = {"step": done, **counters}
                line.update({k: float(mean[i] / mean[COUNT_MICRO]) for i, k in enumerate(TRAIN_METRICS)})
                if config.kl_weight == 0:
                    del line["kl_penalty"]
                line["grad_norm"] = float(mean[GRAD_NORM] / mean[COUNT_OPT])
                if config.log_kl and runs_callbacks(accelerator, config.runtime):
                    # the policy and base forwards: every process runs a sharded model's together
                    name, value = drift_to_base(model, out.trajectory)
                    line[name] = value
                if accelerator.is_main_process:
                    with torch.no_grad():
                        final_rewards = reward(finals, prompts)
                    line.update(sample_metrics(finals, prompts, final_rewards, gold))
                line["seconds_per_step"] = (time.perf_counter() - started) / max(1, done - start)
                tracker.log(line)
                if on_log is not None and accelerator.is_main_process:
                    on_log(line)
                window.zero_()
            if grid_now and accelerator.is_main_process:
                save_image_grid(finals.float().cpu(), run.path / "grids" / f"step-{done:05d}.png", nrow=8)
                log_image_grid(accelerator, "samples", finals.float().cpu(), done, nrow=8)

            # 5. Checkpoint (never after a non-finite value): every process writes its own state.
            if (config.checkpoint_every and done % config.checkpoint_every == 0) or done == end:
                save_training_checkpoint(
                    run,
                    accelerator,
                    done,
                    network=network,
                    optimizer=optimizer,
                    data_cursor=done * global_size,
                    record=record,
                    keep=config.keep_checkpoints,
                    process_state={"window": window.cpu()},
                    extra={"counters": dict(counters)},
                )
            if on_step is not None and runs_callbacks(accelerator, config.runtime):
                on_step(model, done)
            accelerator.wait_for_everyone()
    finally:
        tracker.close()

    # 6. The final model folder (what `load_model(run_dir)` and `diffalign sample --model` read).
    save_final_model(run, accelerator, guard, model, done, config.steps)
    return model
