"""Policy-gradient fine-tuning of diffusion models: DDPO, DPOK and GRPO / Flow-GRPO.

The denoising chain is a policy: each stochastic sampler step is a Gaussian x_prev ~ N(mu_theta, sigma^2)
whose log-density `diffalign.diffusion.steps` computes exactly (per dimension). Each epoch:
1. sample `prompts_per_epoch * samples_per_prompt` trajectories with their step log-probs (guided,
   if guidance is on: the log-prob is that of the guided step the sampler took);
2. score the final images with the reward;
3. advantages: DDPO/DPOK standardise each reward by its prompt's recent rewards (`PerPromptStatTracker`),
   GRPO within its group of samples of the same prompt; then clip to +-adv_clip;
4. for `inner_epochs` passes, recompute a `timestep_fraction` of every sample's steps under the current
   weights and minimise PPO's clipped surrogate (DDPO, Black et al. 2023, eq. 6)
       L = mean(max(-A rho, -A clip(rho, 1 - eps, 1 + eps))),  rho = exp(logp_theta - logp_old),
   plus, for DPOK and GRPO, kl_beta times the per-step KL to the base model
       KL = |mu_theta - mu_ref|^2 / (2 sigma_t^2)   (Flow-GRPO; DPOK's KL of two Gaussian steps).
With a flow model the sampler is Flow-GRPO's SDE (`flow_sde_step`, noise level a). Two options change
step 1: `sde_window_size` W makes only W consecutive steps stochastic each epoch (the others are the
sampler's deterministic twin) and trains on those only (MixGRPO; Flow-GRPO-Fast), and
`group_shared_noise` starts a group's samples from one initial noise (DanceGRPO).

Built-in check: on the first optimiser step of every epoch the weights are the sampler's, so the
recomputed log-probs must equal the stored ones (rho = 1); a larger |log rho| than `ratio_tolerance`
stops the run with `RatioCheckError` (sampling and training disagree: dropout, batch-dependent kernels,
mixed precision, another guidance). Logged per epoch: reward mean/std, gold reward, diversity
(`online_metrics`), KL to the base (the first micro-batch's when kl_beta is 0), PPO's approximate KL
and clip fraction, the gradient norm, the loss, the largest first-step |log rho|, reward queries.

What this module leaves out: DPOK's learned value-function baseline (per-prompt reward statistics take
its place) and its KL warm-up; MixGRPO's higher-order ODE solver outside the window. Flow-GRPO's
CFG-free training is `guidance_scale=1.0`. The loop runs on any
`DiffusionModel` (`policy_setup.py`): the tiny built-in models and diffusers pipelines (LoRA or full).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from diffalign.align.advantages import (
    PerPromptStatTracker,
    clip_advantages,
    flat_group_fraction,
    group_advantages,
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
from diffalign.align.pg_config import PGConfig
from diffalign.align.pg_losses import gaussian_mean_kl, ppo_clip_loss
from diffalign.align.pg_rollout import (
    NetworkPolicy,
    Rollout,
    epoch_prompts,
    epoch_sampler,
    group_initial_noise,
    pair_steps,
    sample_local,
    trained_steps_per_sample,
    training_pairs,
)
from diffalign.align.policy_setup import policy_for
from diffalign.align.prompts import load_prompt_source
from diffalign.align.run_dir import RunDir, RunDirError, set_rng_state
from diffalign.align.runtime import (
    global_batch_slice,
    make_accelerator,
    prepare_training,
    seed_everything,
)
from diffalign.align.sharding import check_sharding, runs_callbacks, whole_value
from diffalign.align.tracking import resolve_log_with
from diffalign.rewards.placement import place_reward
from diffalign.rewards.protocol import Reward
from diffalign.rewards.registry import load_reward

#: Per-micro-batch metrics summed between log lines (then averaged), in this order.
TRAIN_METRICS = ("loss", "policy_loss", "approx_kl", "clip_fraction", "kl_to_base")
#: Slots of the metrics window after the sums of TRAIN_METRICS.
GRAD_NORM, FIRST_RATIO, COUNT_MICRO, COUNT_KL, COUNT_OPT = range(5, 10)
WINDOW_SIZE = 10


class RatioCheckError(RuntimeError):
    """The policy's recomputed log-probs differ from the sampler's before any update (rho != 1)."""


def _check_ratio(log_ratio: Tensor, tolerance: float, epoch: int) -> float:
    worst = float(log_ratio.detach().abs().max())
    if not worst <= tolerance:
        raise RatioCheckError(
            f"epoch {epoch + 1}: before any update the importance ratio must be 1, but the largest "
            f"|log ratio| is {worst:.3g} (> ratio_tolerance {tolerance:g}): the log-probs recomputed for "
            "training differ from those recorded while sampling (dropout or other train-mode layers, "
            "mixed precision, a different guidance or sampler); fix the model or raise ratio_tolerance"
        )
    return worst


def _reward(reward: Reward, images: Tensor, prompts: list[str]) -> Tensor:
    with torch.no_grad():
        return reward(images, prompts).detach().float().to(images.device)


def _micro_loss(
    accelerator,
    policy: NetworkPolicy,
    rollout: Rollout,
    sampler,
    pairs: tuple[Tensor, Tensor],
    cond,
    uncond_row,
    advantages: Tensor,
    clip_range: float,
    kl_beta: float,
    need_kl: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """One micro-batch of (sample, step) pairs: (loss, metrics [5] as in TRAIN_METRICS, log ratio [N]).

    The steps are recomputed under the policy (with gradients) and scored on the stored x_prev; the
    loss is PPO's clipped surrogate plus kl_beta * KL(policy step || base step), the KL evaluated when
    `need_kl` (always when kl_beta > 0, else only for logging)."""
    rows, cols = pairs
    device = rollout.latents.device
    uncond = None if uncond_row is None else uncond_row[torch.zeros(len(rows), dtype=torch.long)]
    with accelerator.autocast():
        new = pair_steps(policy, rollout, sampler, rows, cols, cond, uncond)
    old = rollout.log_probs[rows.to(device), cols.to(device)]
    ppo = ppo_clip_loss(new.log_prob, old, advantages[rows.to(device)], clip_range)
    kl = torch.zeros((), device=device)
    if need_kl:
        with torch.no_grad(), accelerator.autocast():
            ref = pair_steps(policy, rollout, sampler, rows, cols, cond, uncond, use_reference=True)
        kl = gaussian_mean_kl(new.mean, ref.mean, new.std).mean()
    loss = ppo.loss + kl_beta * kl if kl_beta > 0 else ppo.loss
    values = torch.stack([loss.detach(), ppo.loss.detach(), ppo.approx_kl, ppo.clip_fraction, kl.detach()])
    return loss, values.float(), (new.log_prob - old).detach()


def _indivisible(pairs: int, pair_global: int, train_batch_size: int, num_processes: int) -> str:
    accumulation = pair_global // (train_batch_size * num_processes)
    return (
        f"an epoch trains {pairs} (sample, step) pairs, which an optimiser step of {pair_global} pairs "
        f"(train_batch_size {train_batch_size} x {num_processes} processes x {accumulation} accumulation) "
        "does not divide"
    )


def train_pg(
    config: PGConfig,
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
    """Fine-tune `config.model` on `config.reward` with DDPO, DPOK or GRPO; returns the trained model.

    Writes the run folder (`diffalign.align.run_dir`); its `model/` is the final model.

    Args:
        config: the run's config.
        run_dir: the run folder.
        resume: continue from the latest checkpoint in `run_dir`; refuses a different config.
        stop_after: stop (with a checkpoint) after this many epochs in total, as an interruption would.
        on_log: called with every metrics record on the main process.
        on_epoch: called as on_epoch(model, epochs_done) on the main process (on every process under
            `runtime.sharding=fsdp`, where the model runs only collectively) after every epoch (e.g. a
            benchmark's evaluation); the model is in eval mode and must be left unchanged.
        reward: a Reward object to use instead of loading `config.reward` (tests, notebooks); the run
            record keeps `config.reward` as its name.
        show_progress: a rich progress bar on the main process.
        extend: resume a run with a longer `epochs` than it was started with (a completed run
            continues from its final checkpoint; `diffalign.align.run_dir`, "Extending a run").

    Raises:
        RunDirError: a fresh run into a used folder, a resume without a run or with another config.
        RatioCheckError: the first-step importance ratio is not 1.
        NonFiniteError: a reward, loss or gradient norm became NaN or inf (the last good checkpoint is kept).
        ValueError: a config that cannot run (a deterministic sampler, batch sizes that do not divide,
            `runtime.sharding=fsdp` with one process or LoRA).
    """
    run = RunDir(run_dir)

    # 1. Accelerate, seeding, the model and its reference, the reward, the prompts.
    accelerator = make_accelerator(config.runtime, resolve_log_with(config.log_with), run.logs_dir)
    seed_everything(config.runtime.seed)
    model = policy_for(config, accelerator.device)
    check_sharding(config.runtime, num_processes=accelerator.num_processes, lora=model.lora)
    base_sampler = config.sampler_config(model.prediction_type)
    kl_beta = config.resolved_kl_beta()
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
    pair_global = config.train_batch_size * num_processes * accumulation
    epoch_pairs = per_epoch * trained_steps_per_sample(
        base_sampler, config.sde_window_size, config.timestep_fraction
    )
    if epoch_pairs % pair_global:  # refused before the run folder is begun or anything is sampled
        raise ValueError(_indivisible(epoch_pairs, pair_global, config.train_batch_size, num_processes))
    record = {
        "trainer": config.method,
        "config": to_dict(config),
        "model": {"spec": config.model, "prediction_type": model.prediction_type},
        "resolved": {"kl_beta": kl_beta, "sampler": base_sampler.__dict__, "prompts": len(source)},
    }
    begin_run(run, record, resume, accelerator, extend=extend)
    # Eval mode throughout (`load_policy`): the policy's log-probs must be those of the network that
    # sampled.
    network = model.denoiser
    tracker_state = PerPromptStatTracker(config.stat_buffer, config.stat_min_count)

    # 2. Resume: trainable weights before `prepare`, optimiser state and RNG after it.
    start = 0
    checkpoint = None
    if resume or extend:
        checkpoint = resume_weights(run, record, accelerator, network, extend=extend)
        start = checkpoint.step
        if checkpoint.data_cursor != start * per_epoch:
            raise RunDirError(
                f"checkpoint {checkpoint.path}: {checkpoint.data_cursor} samples in {start} epochs"
            )
        tracker_state.load_state_dict(checkpoint.extra["stat_tracker"])
    unet, optimizer, params = prepare_training(accelerator, model, config, checkpoint)
    policy = NetworkPolicy(model, unet)
    if checkpoint is not None and checkpoint.rng is not None:
        set_rng_state(checkpoint.rng)

    device = accelerator.device
    end, guard, tracker = loop_bookkeeping(
        accelerator, run, config.method, record, config.epochs, start, stop_after, show_progress
    )
    share = per_epoch // num_processes
    mine = slice(accelerator.process_index * share, (accelerator.process_index + 1) * share)
    seed = config.runtime.seed
    done = start
    window = torch.zeros(WINDOW_SIZE, device=device)  # metric sums and counts since the last log line
    if checkpoint is not None and "window" in checkpoint.process_state:
        window = checkpoint.process_state["window"].to(device)
    started = time.perf_counter()
    try:
        for epoch in range(start, end):
            # 3. Sample this process's share of the epoch, score it, gather the whole epoch.
            t0 = time.perf_counter()
            prompts, seeds = epoch_prompts(
                source, seed, epoch, config.prompts_per_epoch, config.samples_per_prompt
            )
            sampler = epoch_sampler(
                base_sampler,
                config.sde_window_size,
                config.sde_window_range,
                seed,
                epoch,
                schedule=config.sde_window_schedule,
                shift_every=config.sde_window_shift_every,
                shift=config.sde_window_shift,
                roll_back=config.sde_window_roll_back,
            )
            x_T = None
            if config.group_shared_noise:
                shape = tuple(int(d) for d in model.latent_shape)
                x_T = group_initial_noise(seeds, config.samples_per_prompt, shape)[mine]
            with accelerator.autocast():
                latents, log_probs, images, timesteps, stochastic = sample_local(
                    model, prompts[mine], seeds[mine], sampler, config.sample_batch_size, x_T
                )
            rewards = _reward(reward, images, prompts[mine])
            guard.observe("reward", rewards, epoch + 1)
            guard.check(run.latest_checkpoint())  # before a non-finite reward reaches the weights
            rollout = Rollout(
                prompts=prompts,
                latents=accelerator.gather(latents.contiguous()),
                log_probs=accelerator.gather(log_probs.contiguous()),
                timesteps=timesteps,
                stochastic=stochastic,
                images=accelerator.gather(images.contiguous()),
                rewards=accelerator.gather(rewards.contiguous()),
            )
            sample_seconds = time.perf_counter() - t0

            # 4. Advantages over the whole epoch (identical on every process).
            if config.method == "grpo":
                advantages = group_advantages(rollout.rewards, config.samples_per_prompt)
            else:
                advantages = tracker_state.update(rollout.prompts, rollout.rewards)
            advantages = clip_advantages(advantages, config.adv_clip).to(device)
            with torch.no_grad():
                cond = model.encode_prompts(rollout.prompts)
                uncond_row = model.encode_prompts([""]) if sampler.guided else None

            # 5. Train: inner epochs over (sample, step) pairs, PPO clip + KL to the base.
            first_ratio = 0.0
            for inner in range(config.inner_epochs):
                rows, cols = training_pairs(rollout, config.timestep_fraction, seed, epoch, inner)
                if len(rows) % pair_global:
                    raise ValueError(
                        _indivisible(len(rows), pair_global, config.train_batch_size, num_processes)
                    )
                for opt_step in range(len(rows) // pair_global):
                    for micro in range(accumulation):
                        part = global_batch_slice(
                            micro, accelerator.process_index, num_processes, config.train_batch_size
                        )
                        offset = opt_step * pair_global
                        r = rows[offset + part.start : offset + part.stop]
                        c = cols[offset + part.start : offset + part.stop]
                        need_kl = kl_beta > 0 or (inner == 0 and opt_step == 0 and micro == 0)
                        with accelerator.accumulate(unet):
                            loss, values, log_ratio = _micro_loss(
                                accelerator,
                                policy,
                                rollout,
                                sampler,
                                (r, c),
                                cond,
                                uncond_row,
                                advantages,
                                config.clip_range,
                                kl_beta,
                                need_kl,
                            )
                            if inner == 0 and opt_step == 0:
                                worst = _check_ratio(log_ratio, config.ratio_tolerance, epoch)
                                first_ratio = max(first_ratio, worst)
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
                        window[:4] += values[:4]
                        window[COUNT_MICRO] += 1
                        if need_kl:
                            window[4] += values[4]
                            window[COUNT_KL] += 1
            window[FIRST_RATIO] = torch.maximum(window[FIRST_RATIO], window.new_tensor(first_ratio))
            done = epoch + 1
            tracker.advance(done)

            # 6. Metrics of this epoch's samples and training (main process computes sample metrics).
            guard.check(run.latest_checkpoint())
            if done % config.log_every == 0 or done == config.epochs:
                mean = accelerator.reduce(window.clone(), reduction="mean")
                line: dict = {"step": done, "reward_queries": done * per_epoch}
                line.update({k: float(mean[i] / mean[COUNT_MICRO]) for i, k in enumerate(TRAIN_METRICS[:4])})
                line["kl_to_base"] = float(mean[4] / mean[COUNT_KL])
                line["grad_norm"] = float(mean[GRAD_NORM] / mean[COUNT_OPT])
                line["first_step_log_ratio"] = float(mean[FIRST_RATIO])
                if accelerator.is_main_process:
                    line.update(sample_metrics(rollout.images, rollout.prompts, rollout.rewards, gold))
                if config.method == "grpo":
                    line["flat_groups"] = flat_group_fraction(rollout.rewards, config.samples_per_prompt)
                if sampler.sde_window is not None:
                    line["sde_window_start"] = sampler.sde_window[0]
                line["sample_seconds"] = sample_seconds
                line["seconds_per_epoch"] = (time.perf_counter() - started) / max(1, done - start)
                tracker.log(line)
                if on_log is not None and accelerator.is_main_process:
                    on_log(line)
                window.zero_()
            if config.grid_every and done % config.grid_every == 0 and accelerator.is_main_process:
                count = min(len(rollout), 8 * config.samples_per_prompt)
                grid = run.path / "grids" / f"epoch-{done:05d}.png"
                save_image_grid(rollout.images[:count].float().cpu(), grid, nrow=config.samples_per_prompt)
                log_image_grid(
                    accelerator, "samples", rollout.images[:count], done, config.samples_per_prompt
                )

            # 7. Checkpoint (never after a non-finite value): every process writes its own state.
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
                    process_state={"window": window.cpu()},
                    extra={"stat_tracker": tracker_state.state_dict()},
                )
            if on_epoch is not None and runs_callbacks(accelerator, config.runtime):
                on_epoch(model, done)
            accelerator.wait_for_everyone()
    finally:
        tracker.close()

    # 8. The final model folder (what `load_model(run_dir)` and `diffalign sample --model` read).
    save_final_model(run, accelerator, guard, model, done, config.epochs)
    return model
