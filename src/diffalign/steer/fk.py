"""Feynman-Kac steering: sequential Monte Carlo over K particles per prompt (Singhal et al. 2025,
"A General Framework for Inference-time Scaling and Steering of Diffusion Models").

Target: p(x0 | c) exp(lam r(x0)). The K particles follow the base model's stochastic sampler (the
proposal). At the potential steps t_1 < ... < t_n (the resampling schedule; the last step is always
t_n) each particle is scored on its x0 prediction, r_k = r(decode(x0_hat(x_{t_k}))), and its weight is
multiplied by a potential G_k:

- "difference": G_k = exp(lam (r_k - r_{k-1})), r_0 = 0;
- "max":        G_k = exp(lam max_{j<=k} r_j);
- "sum":        G_k = exp(lam sum_{j<=k} r_j);
- "final":      G_k = 1 (no intermediate reward calls);

and at the last step, where r_n = r(x0) is the reward of the final sample itself, every potential uses
G_n = exp(lam r_n) / prod_{k<n} G_k along the particle's lineage, so that prod_k G_k = exp(lam r(x0))
exactly (the paper's condition for an unbiased target). The lineage product is resampled with the
particles. (The reference implementation's sum potential adds r_n to the running sum before dividing,
which counts the final reward twice; here the final step never depends on the potential.)

Resampling (multinomial, within a prompt's particles, keeping K) happens at every potential step but
the last, or, with `ess_threshold`, only for populations whose effective sample size is below
ess_threshold * K. After resampling the weights are reset to equal. The final sample of each prompt
is its highest-reward particle (as the reference does) or, with select="sample", a draw from the final
normalised weights.

Cost per prompt: K chains (K S NFEs, doubled by guidance) and K reward calls per potential step. The
reward is a black box. FK needs a stochastic sampler (DDIM eta > 0, DDPM, flow_sde): with a
deterministic one resampled copies would never separate.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from diffalign.diffusion.protocol import DiffusionModel
from diffalign.diffusion.sampling import SamplerConfig, StepInfo, sample
from diffalign.rewards.protocol import Reward
from diffalign.steer.budget import plain_nfe, units
from diffalign.steer.common import PromptRandomness, Session, SteerResult, best_per_prompt, require_stochastic
from diffalign.steer.particles import (
    effective_sample_size,
    flat_indices,
    multinomial_ancestors,
    normalized_weights,
)

POTENTIALS = ("difference", "max", "sum", "final")
SELECTIONS = ("best", "sample")


@dataclass
class FKConfig:
    """FK steering.

    Attributes:
        num_particles: K particles per prompt.
        potential: "difference", "max", "sum" or "final" (see the module doc).
        lam: inverse temperature lambda of the target p(x0) exp(lam r(x0)) (the reference uses 10).
        resample_every: steps between potential steps.
        resample_start: first potential step (0 is the noisiest step).
        resample_stop: no intermediate potential step at or after this step (None: up to the end);
            the last step is always a potential step.
        ess_threshold: None resamples at every intermediate potential step; a value in (0, 1]
            resamples a prompt's particles only when their ESS < ess_threshold * K (the reference: 0.5).
        select: "best" (highest final reward) or "sample" (draw from the final weights).
        seed: particle k of prompt i uses seed `seed + i * K + k`; resampling draws from a
            generator seeded with `seed`.
    """

    num_particles: int = 4
    potential: str = "max"
    lam: float = 10.0
    resample_every: int = 5
    resample_start: int = 5
    resample_stop: int | None = None
    ess_threshold: float | None = None
    select: str = "best"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_particles < 1:
            raise ValueError(f"num_particles must be >= 1, got {self.num_particles}")
        if self.potential not in POTENTIALS:
            raise ValueError(f"potential must be one of {POTENTIALS}, got {self.potential!r}")
        if self.resample_every < 1 or self.resample_start < 0:
            raise ValueError(
                f"resample_every must be >= 1 and resample_start >= 0, got {self.resample_every}, "
                f"{self.resample_start}"
            )
        if self.resample_stop is not None and self.resample_stop < 0:
            raise ValueError(f"resample_stop must be None or >= 0, got {self.resample_stop}")
        if self.ess_threshold is not None and not 0.0 < self.ess_threshold <= 1.0:
            raise ValueError(f"ess_threshold must be None or in (0, 1], got {self.ess_threshold}")
        if self.select not in SELECTIONS:
            raise ValueError(f"select must be one of {SELECTIONS}, got {self.select!r}")

    @classmethod
    def from_budget(cls, budget_nfe: int, sampler: SamplerConfig, **overrides) -> FKConfig:
        """As many particles as fit in `budget_nfe` NFEs per prompt (K plain chains)."""
        return cls(
            num_particles=units(budget_nfe, plain_nfe(sampler), "FK steering (one particle)"), **overrides
        )

    def potential_steps(self, num_steps: int) -> list[int]:
        """The steps at which particles are scored and weighted (always including the last)."""
        stop = num_steps - 1 if self.resample_stop is None else min(self.resample_stop, num_steps - 1)
        if self.potential == "final":
            return [num_steps - 1]
        steps = list(range(self.resample_start, stop, self.resample_every))
        return [*steps, num_steps - 1]


class FKState:
    """The particle system's bookkeeping, updated at every potential step (flat [B * K] tensors).

    Attributes:
        log_w: log-weights since the last resampling.
        log_prod: log of the product of the potentials along each particle's lineage.
        last: r_{k-1} (difference potential); running: max or sum of the rewards so far.
        history: one dict per potential step (step, rewards, log potentials, ESS, resampled).
    """

    def __init__(
        self, config: FKConfig, num_prompts: int, device: torch.device, rng: PromptRandomness | None = None
    ) -> None:
        self.config = config
        self.num_prompts = num_prompts
        count = num_prompts * config.num_particles
        zeros = torch.zeros(count, dtype=torch.float64, device=device)
        self.log_w, self.log_prod, self.last = zeros.clone(), zeros.clone(), zeros.clone()
        self.running = torch.full_like(zeros, -torch.inf) if config.potential == "max" else zeros.clone()
        self.rng = rng if rng is not None else PromptRandomness(config.seed, num_prompts)
        self.history: list[dict] = []
        self.final_rewards: Tensor | None = None

    def log_potential(self, rewards: Tensor, final: bool) -> Tensor:
        """log G_k for these rewards (module doc), updating the running statistics."""
        lam, r = self.config.lam, rewards.double()
        if final:
            return lam * r - self.log_prod
        potential = self.config.potential
        if potential == "difference":
            value = lam * (r - self.last)
            self.last = r
        elif potential == "max":
            self.running = torch.maximum(self.running, r)
            value = lam * self.running
        elif potential == "sum":
            self.running = self.running + r
            value = lam * self.running
        else:
            value = torch.zeros_like(r)
        return value

    def update(self, step: int, rewards: Tensor, final: bool) -> Tensor | None:
        """Weight by the potential and (not at the last step) resample; returns the flat ancestor rows
        when anything was resampled, else None."""
        log_g = self.log_potential(rewards, final)
        self.log_w = self.log_w + log_g
        self.log_prod = self.log_prod + log_g
        k = self.config.num_particles
        log_w = self.log_w.view(self.num_prompts, k)
        ess = effective_sample_size(log_w)
        record = {"step": step, "rewards": rewards.tolist(), "log_potential": log_g.tolist()}
        record["ess"] = ess.tolist()
        self.history.append(record)
        if final:
            self.final_rewards = rewards
            record["resampled"] = [False] * self.num_prompts
            return None
        threshold = self.config.ess_threshold
        resample = torch.ones_like(ess, dtype=torch.bool) if threshold is None else ess < threshold * k
        record["resampled"] = resample.tolist()
        if not bool(resample.any()):
            return None
        ancestors = multinomial_ancestors(log_w, self.rng)
        keep = torch.arange(k, device=ancestors.device).expand_as(ancestors)
        ancestors = torch.where(resample[:, None].to(ancestors.device), ancestors, keep)
        rows = flat_indices(ancestors).to(self.log_w.device)
        reset = resample.repeat_interleave(k).to(self.log_w.device)
        self.log_w = torch.where(reset, torch.zeros_like(self.log_w), self.log_w[rows])
        self.log_prod, self.last, self.running = self.log_prod[rows], self.last[rows], self.running[rows]
        return rows


def fk_steering(
    model: DiffusionModel,
    prompts: Sequence[str],
    reward: Reward,
    sampler: SamplerConfig,
    config: FKConfig,
    prompt_seeds: Sequence[int] | None = None,
) -> SteerResult:
    """Run FK steering with `config.num_particles` particles per prompt (module doc); `prompt_seeds`
    gives each prompt its own seed (`PromptRandomness`)."""
    require_stochastic(sampler, "FK steering")
    run = Session(model, reward, prompts)
    num, k = len(run.prompts), config.num_particles
    flat_prompts = [p for p in run.prompts for _ in range(k)]
    potential_steps = set(config.potential_steps(sampler.num_steps))
    rng = PromptRandomness(config.seed, num, prompt_seeds)
    state = FKState(config, num, run.model.device, rng)

    def callback(info: StepInfo) -> Tensor | None:
        if info.step_index not in potential_steps:
            return None
        final = info.step_index == info.num_steps - 1
        x = info.output.prev if final else info.output.x0_pred
        with torch.no_grad():
            rewards = run.reward(run.model.decode(x.detach()).clamp(0, 1), flat_prompts).double()
        rows = state.update(info.step_index, rewards.to(state.log_w.device), final)
        return None if rows is None else info.output.prev[rows.to(info.output.prev.device)]

    with torch.no_grad():
        traj = sample(
            run.model,
            flat_prompts,
            config=sampler,
            seeds=rng.candidate_seeds(k),
            callback=callback,
            decode=False,
        )
    finals = traj.final_latents
    rewards = state.final_rewards.float()
    if config.select == "best":
        chosen = best_per_prompt(rewards, num)
    else:
        weights = normalized_weights(state.log_w.view(num, k)).float().cpu()
        picks = rng.multinomial(weights, 1).view(-1)
        chosen = picks.to(rewards.device) + torch.arange(num, device=rewards.device) * k
    chosen_cpu = chosen.cpu()
    images = run.model.decode(finals[chosen]).clamp(0, 1)
    return run.result(
        "fk",
        finals[chosen],
        images,
        rewards[chosen_cpu.to(rewards.device)],
        num_particles=k,
        potential=config.potential,
        potential_steps=sorted(potential_steps),
        resamplings=sum(sum(h["resampled"]) for h in state.history),
        final_log_weights=state.log_w.tolist(),
        log_potential_product=state.log_prod.tolist(),
        final_rewards=rewards.tolist(),
        history=state.history,
    )
