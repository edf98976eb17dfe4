"""The per-micro-batch objectives of reward backpropagation: AlignProp, DRaFT-K, DRaFT-LV and ReFL.

Each function samples its micro-batch under the policy, runs the steps that carry gradients and
returns a `BackpropOutput`: the loss to minimise, the rewards it used, the final (detached) samples
and their trajectory (for the logged metrics), and how many denoiser calls carried gradients.

- AlignProp (Prabhudesai et al. 2023, sec. 4): loss = -r(x_0, c), x_0 sampled with gradients through
  the last K steps (random truncation: earlier steps are detached); `draft` is the same with a fixed K
  (DRaFT-K, Clark et al. 2024, sec. 4.1), K = S being full DRaFT.
- DRaFT-LV (Clark et al. 2024, alg. 2): the final sample x_0 is detached, re-noised n times to the last
  step's level, x_1^i = add_noise(x_0, eps_i, t_1), and each copy is denoised by the last step with
  gradients; loss = -mean_i r(x_0^i, c). The re-denoised x_0^i is the last step's mean (DDIM's last step
  is deterministic; a stochastic last step's noise is left out).
- ReFL (Xu et al. 2023, ImageReward, alg. 1): a late step j drawn at random; the model's one-step
  prediction x0_hat(x_j) (with gradients) is scored, loss = phi(r) with phi(r) = -r, or ImageReward's
  code's ReLU(margin - r); plus lambda times the pre-training (denoising) loss on data. Here x_j comes
  from a full no-gradient chain (the steps after j are sampled too, as the final sample is what the
  metrics report; the paper stops at j).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from diffalign.align.losses import per_sample_mse
from diffalign.align.pg_rollout import NetworkPolicy
from diffalign.diffusion.sampling import (
    SamplerConfig,
    Trajectory,
    guided_predict,
    recompute_step,
    sample,
    sampler_step,
)
from diffalign.diffusion.schedules import training_target
from diffalign.rewards.protocol import Reward


class SamplingPolicy(NetworkPolicy):
    """`NetworkPolicy` (the network as Accelerate prepared it, so gradients are synchronised) plus what
    `sample` needs from the model: prompt encoding, decoding, latent shape and device."""

    def __getattr__(self, name: str):
        return getattr(self.model, name)


@dataclass
class BackpropOutput:
    """One micro-batch's result.

    Attributes:
        loss: the scalar to minimise (reward term plus, for ReFL, the pre-training term).
        rewards: [N] the training reward of the images the loss scored (N = B, or B * n for DRaFT-LV).
        pretrain_loss: ReFL's denoising loss (0 for the other methods).
        trajectory: the micro-batch's sampling chain (final samples detached in `trajectory.latents`).
        grad_calls: denoiser evaluations per prompt that carried gradients (K; n for DRaFT-LV; 1 for ReFL).
        kl_penalty: the drift penalty's value (`chain_kl_penalty`, detached) when `kl_weight` > 0 added
            it to `loss` (unweighted), else None.
    """

    loss: Tensor
    rewards: Tensor
    pretrain_loss: Tensor
    trajectory: Trajectory
    grad_calls: int
    kl_penalty: Tensor | None = None


def reward_term(rewards: Tensor, scale: float, margin: float | None = None) -> Tensor:
    """mean(-scale r), or ImageReward's mean(scale ReLU(margin - r)) when `margin` is given."""
    if margin is None:
        return -(scale * rewards).mean()
    return (scale * torch.relu(margin - rewards)).mean()


def truncated_chain_loss(
    policy: SamplingPolicy,
    reward: Reward,
    prompts: Sequence[str],
    seeds: Sequence[int],
    sampler: SamplerConfig,
    k: int,
    scale: float,
    checkpoint: bool,
) -> BackpropOutput:
    """AlignProp / DRaFT-K: sample with gradients through the last `k` steps, loss = -scale r(x_0)."""
    steps = sampler.num_steps
    if not 1 <= k <= steps:
        raise ValueError(f"the number of gradient steps must be in [1, {steps}], got {k}")
    traj = sample(
        policy,
        prompts,
        config=sampler,
        seeds=list(seeds),
        grad_steps=range(steps - k, steps),
        checkpoint_grad_steps=checkpoint,
    )
    rewards = reward(traj.images, list(prompts))
    zero = torch.zeros((), device=rewards.device)
    return BackpropOutput(reward_term(rewards, scale), rewards, zero, traj, k)


def draft_lv_loss(
    policy: SamplingPolicy,
    reward: Reward,
    prompts: Sequence[str],
    seeds: Sequence[int],
    sampler: SamplerConfig,
    noise: Tensor,
    scale: float,
    checkpoint: bool,
) -> BackpropOutput:
    """DRaFT-LV: `noise` [B, n, C, H, W] re-noises each final sample n times to the last step's level;
    the last step, with gradients, denoises every copy; loss = -scale mean r over the B * n images."""
    with torch.no_grad():
        traj = sample(policy, prompts, config=sampler, seeds=list(seeds))
    batch, n = noise.shape[0], noise.shape[1]
    device = traj.latents.device
    x0 = traj.final_latents.repeat_interleave(n, dim=0)
    t = traj.timesteps[-2].to(device).expand(batch * n)
    t_prev = traj.timesteps[-1].to(device).expand(batch * n)
    x_t = policy.schedule.add_noise(x0, noise.reshape(batch * n, *noise.shape[2:]).to(device), t)
    cond = traj.cond.repeat_interleave(n)
    uncond = None if traj.uncond is None else traj.uncond.repeat_interleave(n)
    out = guided_predict(policy, x_t, t, cond, uncond, sampler.guidance_scale, checkpoint_model=checkpoint)
    sigma_max = float(traj.timesteps[1]) if sampler.sampler == "flow_sde" else None
    step = sampler_step(sampler, policy, out, x_t, t, t_prev, sigma_max=sigma_max, prev_sample=x_t)
    images = policy.decode(step.mean).clamp(0, 1)
    repeated = [p for p in prompts for _ in range(n)]
    rewards = reward(images, repeated)
    zero = torch.zeros((), device=rewards.device)
    return BackpropOutput(reward_term(rewards, scale), rewards, zero, traj, n)


def pretrain_loss(model, unet, images: Tensor, prompts: Sequence[str], noise: Tensor, t: Tensor) -> Tensor:
    """The model's own training loss on data: mean |f_theta(x_t, t, c) - target|^2 with x_t = add_noise(x0,
    noise, t) and the family's target (noise, v or velocity), the objective the base model was trained on."""
    device = noise.device
    with torch.no_grad():  # the VAE and the text encoders are frozen
        x0 = model.encode(images.to(device))
        cond = model.encode_prompts(list(prompts))
    x_t = model.schedule.add_noise(x0, noise, t)
    target = training_target(x0, noise, t, model.prediction_type, model.schedule)
    pred = model.call_network(unet, x_t, t, cond)
    return per_sample_mse(pred, target).mean()


def refl_loss(
    policy: SamplingPolicy,
    reward: Reward,
    prompts: Sequence[str],
    seeds: Sequence[int],
    sampler: SamplerConfig,
    step_index: int,
    scale: float,
    margin: float | None,
    pretrain: tuple[Tensor, list[str], Tensor, Tensor] | None,
    pretrain_weight: float,
) -> BackpropOutput:
    """ReFL: the no-gradient chain to step `step_index`, then that step's x0 prediction with gradients,
    scored; plus `pretrain_weight` times `pretrain_loss` on `pretrain` = (images, prompts, noise, t)."""
    with torch.no_grad():
        traj = sample(policy, prompts, config=sampler, seeds=list(seeds))
    out = recompute_step(policy, traj, step_index)
    images = policy.decode(out.x0_pred).clamp(0, 1)
    rewards = reward(images, list(prompts))
    loss = reward_term(rewards, scale, margin)
    data_loss = torch.zeros((), device=rewards.device)
    if pretrain is not None and pretrain_weight > 0:
        data_images, data_prompts, noise, t = pretrain
        data_loss = pretrain_loss(policy.model, policy.unet, data_images, data_prompts, noise, t)
        loss = loss + pretrain_weight * data_loss
    return BackpropOutput(loss, rewards, data_loss.detach(), traj, 1)


def step_divergence(own, ref, stochastic_chain: bool, stochastic_step: bool) -> Tensor:
    """One step's divergence from the base per sample [B], per dimension: KL(N(mu, s^2) || N(mu_base, s^2))
    = |mu - mu_base|^2 / (2 s^2) on a stochastic chain (0 at its deterministic steps), the squared
    step-mean distance |mu - mu_base|^2 on a deterministic one (which has no KL)."""
    from diffalign.align.pg_losses import gaussian_mean_kl

    if stochastic_chain:
        if not stochastic_step:
            return torch.zeros(own.mean.shape[0], device=own.mean.device)
        return gaussian_mean_kl(own.mean, ref.mean, own.std)
    return ((own.mean.float() - ref.mean.float()) ** 2).flatten(1).mean(dim=1)


def chain_kl_penalty(policy: SamplingPolicy, traj: Trajectory, step_indices: Sequence[int]) -> Tensor:
    """The drift penalty of `BackpropConfig.kl_weight`: an unbiased estimate of the sum over the chain's S
    steps of `step_divergence`, S / m times its sum at the m `step_indices`, averaged over the samples.

    Each step is recomputed at the stored (detached) state x_t under the policy, with gradients, and
    under the base without: DPOK's per-step KL regulariser (Fan et al. 2023, sec. 4), whose gradient
    moves the policy's step means towards the base's at the states the policy visits."""
    if not step_indices:
        raise ValueError("chain_kl_penalty needs at least one step index")
    stochastic = bool(traj.stochastic.any())
    total = None
    for i in step_indices:
        own = recompute_step(policy, traj, i)
        with torch.no_grad():
            ref = recompute_step(policy, traj, i, use_reference=True)
        term = step_divergence(own, ref, stochastic, bool(traj.stochastic[i]))
        total = term if total is None else total + term
    return total.mean() * (traj.num_steps / len(step_indices))


def drift_to_base(model, traj: Trajectory) -> tuple[str, float]:
    """How far the policy has moved from the base model on a trajectory it sampled, every step
    recomputed under both (no gradients).

    Stochastic sampler: ("kl_to_base", sum over steps of mean-per-dimension |mu - mu_ref|^2 / (2 sigma^2)),
    a one-sample Monte-Carlo estimate of KL(p_theta || p_base) of the chains divided by C*H*W (the chain
    rule of KL over the Gaussian steps). Deterministic sampler (no KL between point masses):
    ("drift_to_base", sum over steps of the mean-per-dimension |mu - mu_ref|^2)."""
    total = 0.0
    stochastic = bool(traj.stochastic.any())
    with torch.no_grad():
        for i in range(traj.num_steps):
            own = recompute_step(model, traj, i)
            ref = recompute_step(model, traj, i, use_reference=True)
            total += float(step_divergence(own, ref, stochastic, bool(traj.stochastic[i])).mean())
    return ("kl_to_base" if stochastic else "drift_to_base"), total
