"""Direct noise optimisation (Tang et al. 2025, "Inference-time alignment of diffusion models with
direct noise optimization"): optimise the initial noise x_T and every per-step noise z_i of a
stochastic sampler, x_{t-1} = mean(x_t) + std_t z_i, to maximise the reward of the final image.

Loss (per sample): -r(x0(z)) + gamma * R(z), optimised with Adam (AdamW without weight decay) and the
gradient clipped to norm `grad_clip` (DNO: AdamW, lr 0.01, clip 1). R is a probability regulariser
that keeps z looking like a standard normal draw: z (all noises of a sample, D numbers) is cut, after
a fixed random permutation, into M = D / d blocks of d numbers; for a true N(0, I) draw the block
mean m is ~ N(0, I / M) and the entries of the block covariance C are ~ N(I, (1 + delta_ij) / M), so
R = M / 2 |m|^2 + M / 4 |C - I|_F^2 is (up to a constant) their joint negative
log-density. DNO scores the same statistics with exact chi-square tail probabilities; this is the
Gaussian approximation of that score.

Two ways to get d loss / d z:
- "gradient": backpropagate through the whole chain (needs a differentiable reward); each iteration
  costs one chain forward and one backward (S forwards + S backwards, x2 with guidance).
- "zero_order": for black-box rewards, a random-direction finite-difference estimate
  g = 1/q sum_j (r(z + mu u_j) - r(z)) / mu u_j, u_j ~ N(0, I) (DNO's zero-order variant, without its
  hybrid of analytic and estimated parts); each iteration costs 1 + q chains, and the regulariser's
  gradient is analytic (it never touches the model or the reward).

The returned sample of each prompt is the best one (by the reward) among all chains evaluated,
perturbed chains included: DNO returns the last iterate, which is never better by the reward and is
worse when an update overshoots. Iteration 0 is the plain stochastic sample for the seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from diffalign.diffusion.protocol import DiffusionModel
from diffalign.diffusion.sampling import SamplerConfig, StepInfo, sample
from diffalign.rewards.protocol import Reward, require_differentiable
from diffalign.steer.budget import BACKWARD_COST, plain_nfe
from diffalign.steer.common import PromptRandomness, Session, SteerResult, require_stochastic

DNO_MODES = ("gradient", "zero_order")


@dataclass
class DNOConfig:
    """Direct noise optimisation.

    Attributes:
        mode: "gradient" (backpropagation through the chain) or "zero_order" (black-box rewards).
        iterations: chains evaluated at the current noises; iterations - 1 optimiser updates.
        lr: Adam learning rate (DNO uses 0.01 over ~100 iterations; the default suits a handful).
        grad_clip: clip the gradient of all noises of the batch to this norm (DNO: 1.0); with
            per-prompt seeds, each prompt's noises are clipped on their own.
        gamma: weight of the regulariser R.
        block: d, the numbers per block of the regulariser's statistics.
        perturbations: q, random directions per zero-order iteration.
        mu: the zero-order finite-difference step.
        seed: prompt i's chain starts from the noises that seed `seed + i` draws; the regulariser's
            permutation and the zero-order directions come from a generator seeded with `seed`. With
            per-prompt seeds (`PromptRandomness`), prompt i starts from `prompt_seeds[i]`'s noises and
            draws its directions from its own generator; the permutation still comes from `seed`.
    """

    mode: str = "gradient"
    iterations: int = 3
    lr: float = 0.1
    grad_clip: float = 1.0
    gamma: float = 1.0
    block: int = 4
    perturbations: int = 3
    mu: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in DNO_MODES:
            raise ValueError(f"mode must be one of {DNO_MODES}, got {self.mode!r}")
        if self.iterations < 1 or self.perturbations < 1 or self.block < 1:
            raise ValueError(
                f"iterations, perturbations and block must be >= 1, got {self.iterations}, "
                f"{self.perturbations}, {self.block}"
            )
        if self.lr <= 0 or self.grad_clip <= 0 or self.mu <= 0 or self.gamma < 0:
            raise ValueError("lr, grad_clip and mu must be > 0 and gamma >= 0")

    def cost(self, sampler: SamplerConfig) -> int:
        """NFEs per prompt: `iterations` chains plus, per update, a backward (gradient) or q chains."""
        chain = plain_nfe(sampler)
        update = chain * BACKWARD_COST if self.mode == "gradient" else chain * self.perturbations
        return self.iterations * chain + (self.iterations - 1) * update

    @classmethod
    def from_budget(cls, budget_nfe: int, sampler: SamplerConfig, **overrides) -> DNOConfig:
        """The most iterations whose cost fits in `budget_nfe` (at least one update)."""
        probe = cls(**overrides)
        chain = plain_nfe(sampler)
        update = chain * (BACKWARD_COST if probe.mode == "gradient" else probe.perturbations)
        steps = max(budget_nfe - chain, 0) // (chain + update)
        if steps < 1:
            raise ValueError(
                f"budget_nfe {budget_nfe} is too small for DNO ({probe.mode}): it needs at least "
                f"{2 * chain + update} NFEs per prompt (two chains and one update)"
            )
        return cls(**{**overrides, "iterations": 1 + steps})


def regularizer(noise: Tensor, permutation: Tensor, block: int) -> Tensor:
    """R(z) per sample for noises [N, D] (module doc): M/2 |m|^2 + M/4 |C - I|_F^2 over D // d blocks."""
    usable = (noise.shape[1] // block) * block
    if usable == 0:
        raise ValueError(f"block {block} is larger than the noise dimension {noise.shape[1]}")
    blocks = noise[:, permutation[:usable]].reshape(noise.shape[0], -1, block)
    count = blocks.shape[1]
    mean = blocks.mean(dim=1)
    centred = blocks
    cov = centred.transpose(1, 2) @ centred / count
    eye = torch.eye(block, dtype=noise.dtype, device=noise.device)
    return count / 2 * mean.pow(2).sum(dim=1) + count / 4 * (cov - eye).pow(2).sum(dim=(1, 2))


def _initial_noises(model: DiffusionModel, seeds: Sequence[int], num_steps: int) -> tuple[Tensor, Tensor]:
    """x_T [N, C, H, W] and the per-step draws [N, S, C, H, W] in the order `sample` makes them."""
    shape = tuple(int(d) for d in model.latent_shape)
    starts, steps = [], []
    for s in seeds:
        g = torch.Generator().manual_seed(int(s))
        starts.append(torch.randn(shape, generator=g))
        steps.append(torch.stack([torch.randn(shape, generator=g) for _ in range(num_steps)]))
    return torch.stack(starts).to(model.device), torch.stack(steps).to(model.device)


def clip_noise_gradients(z_T: Tensor, z_steps: Tensor, max_norm: float, per_prompt: bool) -> None:
    """Clip the noises' gradients to `max_norm`: jointly over the batch, or each prompt's on its own."""
    if not per_prompt:
        torch.nn.utils.clip_grad_norm_([z_T, z_steps], max_norm)
        return
    norms = torch.cat([z_T.grad.flatten(1), z_steps.grad.flatten(1)], dim=1).norm(dim=1)
    scale = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    z_T.grad.mul_(scale.view(-1, *[1] * (z_T.dim() - 1)))
    z_steps.grad.mul_(scale.view(-1, *[1] * (z_steps.dim() - 1)))


def dno(
    model: DiffusionModel,
    prompts: Sequence[str],
    reward: Reward,
    sampler: SamplerConfig,
    config: DNOConfig,
    prompt_seeds: Sequence[int] | None = None,
) -> SteerResult:
    """Optimise each prompt's noises for the reward (module doc); `prompt_seeds` gives each prompt its
    own seed (`PromptRandomness`)."""
    require_stochastic(sampler, "DNO")
    if config.mode == "gradient":
        require_differentiable(reward, "DNO (mode 'gradient'; use mode 'zero_order' for a black-box reward)")
    run = Session(model, reward, prompts)
    num = len(run.prompts)
    rng = PromptRandomness(config.seed, num, prompt_seeds)
    seeds = rng.candidate_seeds(1)
    start, steps = _initial_noises(run.model, seeds, sampler.num_steps)
    z_T = start.clone().requires_grad_(True)
    z_steps = steps.clone().requires_grad_(True)
    generator = torch.Generator().manual_seed(config.seed)
    dim = z_T[0].numel() + z_steps[0].numel()
    permutation = torch.randperm(dim, generator=generator).to(run.model.device)
    optimizer = torch.optim.AdamW([z_T, z_steps], lr=config.lr, weight_decay=0.0)
    best_rewards = torch.full((num,), -torch.inf)
    best_latents = torch.zeros_like(start)
    history = []

    def flat(a: Tensor, b: Tensor) -> Tensor:
        return torch.cat([a.flatten(1), b.flatten(1)], dim=1)

    def chain(x_T: Tensor, noises: Tensor, repeat: int) -> tuple[Tensor, Tensor]:
        """Run the sampler from these noises; returns (final latents, rewards) of len(prompts) * repeat."""

        def inject(info: StepInfo) -> Tensor:
            std = info.output.std
            std = std.expand(x_T.shape[0]) if std.ndim == 0 else std
            z = noises[:, info.step_index].to(info.output.mean)
            return info.output.mean + std.view(-1, 1, 1, 1).to(z) * z

        flat_prompts = [p for _ in range(repeat) for p in run.prompts]
        grad = torch.is_grad_enabled()
        traj = sample(
            run.model,
            flat_prompts,
            config=sampler,
            seeds=seeds * repeat,
            latents=x_T,
            grad_steps="all" if grad else None,
            callback=inject,
        )
        return traj.latents[:, -1], run.reward(traj.images, flat_prompts).float()

    def keep_best(latents: Tensor, rewards: Tensor) -> None:
        values = rewards.detach().cpu().view(-1, num)
        for j in range(values.shape[0]):
            better = values[j] > best_rewards
            best_rewards[better] = values[j][better]
            best_latents[better.to(best_latents.device)] = latents.detach()[j * num : (j + 1) * num][
                better.to(latents.device)
            ]

    for iteration in range(config.iterations):
        last = iteration == config.iterations - 1
        optimizer.zero_grad()
        if config.mode == "gradient" and not last:
            with torch.enable_grad():
                latents, rewards = chain(z_T, z_steps, 1)
                keep_best(latents, rewards)
                reg = regularizer(flat(z_T, z_steps), permutation, config.block)
                (-rewards.sum() + config.gamma * reg.sum()).backward()
        else:
            with torch.no_grad():
                latents, rewards = chain(z_T.detach(), z_steps.detach(), 1)
            keep_best(latents, rewards)
        history.append(float(rewards.detach().mean()))
        if last:
            break
        if config.mode == "zero_order":
            q = config.perturbations
            if rng.per_prompt:
                directions = rng.normal((q, *flat(z_T, z_steps).shape), prompt_dim=1).to(z_T)
            else:
                directions = torch.randn(q, *flat(z_T, z_steps).shape, generator=generator).to(z_T)
            base = flat(z_T, z_steps).detach()
            moved = (base[None] + config.mu * directions).reshape(q * num, -1)
            split = z_T[0].numel()
            with torch.no_grad():
                p_start = moved[:, :split].view(q * num, *z_T.shape[1:])
                p_steps = moved[:, split:].view(q * num, *z_steps.shape[1:])
                p_latents, p_rewards = chain(p_start, p_steps, q)
            keep_best(p_latents, p_rewards)
            diffs = (p_rewards.view(q, num) - rewards.view(1, num)) / config.mu
            estimate = (diffs[:, :, None].to(directions) * directions).mean(dim=0)
            with torch.enable_grad():
                reg = regularizer(flat(z_T, z_steps), permutation, config.block)
                (config.gamma * reg.sum()).backward()
            z_T.grad -= estimate[:, :split].view_as(z_T)
            z_steps.grad -= estimate[:, split:].view_as(z_steps)
        clip_noise_gradients(z_T, z_steps, config.grad_clip, per_prompt=rng.per_prompt)
        optimizer.step()

    images = run.model.decode(best_latents).clamp(0, 1)
    return run.result(
        "dno",
        best_latents,
        images,
        best_rewards,
        mode=config.mode,
        iterations=config.iterations,
        history=history,
    )
