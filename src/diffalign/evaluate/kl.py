"""KL divergence of a fine-tuned model to its base model, estimated from sampling trajectories.

A stochastic sampler makes the chain x_T -> ... -> x_0 a Markov chain of Gaussian steps, and both models
share the initial noise p(x_T), so by the chain rule of KL

    KL(p_theta || p_base) over whole chains = E_{x ~ p_theta}[ sum_t log p_theta(x_{t-1} | x_t)
                                                             - log p_base(x_{t-1} | x_t) ],

an upper bound on the KL between the final images' distributions (data processing inequality), and the
quantity Gao et al. (2022) and DPOK/DDPO-style regularisers measure. `kl_to_base` samples trajectories
from the model (`sampling.sample`), recomputes each stochastic step's log-prob of the same x_{t-1} under
the base model (`sampling.recompute_step`), and averages the per-chain log-ratio; the standard error is
the sample standard deviation / sqrt(n). Trajectories store log-probs per dimension (see
`diffalign.diffusion.steps`), so each step's log-ratio is multiplied by D = C*H*W to get nats.

A deterministic sampler (DDIM with eta = 0, flow Euler) has no step densities: the estimate needs
a stochastic one (DDPM, DDIM eta > 0, or flow SDE) and `kl_to_base` refuses the others.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from diffalign.diffusion.protocol import DiffusionModel
from diffalign.diffusion.sampling import SamplerConfig, Trajectory, recompute_step, sample


@dataclass
class KLEstimate:
    """A Monte Carlo KL estimate in nats.

    Attributes:
        kl: mean over chains of the summed log-ratio.
        stderr: standard error of that mean (NaN for one chain).
        n: chains.
        per_chain: the n log-ratios.
    """

    kl: float
    stderr: float
    n: int
    per_chain: list[float]

    @property
    def sqrt_kl(self) -> float:
        """d = sqrt(max(KL, 0)), the x-axis of Gao et al.'s over-optimisation curves."""
        return math.sqrt(max(self.kl, 0.0))

    def to_dict(self) -> dict:
        return {"kl": self.kl, "stderr": self.stderr, "n": self.n, "sqrt_kl": self.sqrt_kl}


def kl_from_log_probs(log_p_model: Tensor, log_p_base: Tensor, dims: int = 1) -> KLEstimate:
    """KL estimate from per-step log-probs [n, S] of n chains drawn from the model.

    Args:
        log_p_model: log p_theta(x_{t-1} | x_t) per chain and step.
        log_p_base: log p_base of the same transitions.
        dims: the factor turning each entry into nats (D when the log-probs are per dimension).
    """
    if log_p_model.shape != log_p_base.shape or log_p_model.ndim != 2:
        raise ValueError(
            f"kl_from_log_probs: log-prob shapes {tuple(log_p_model.shape)} and {tuple(log_p_base.shape)} "
            "must be equal [n, S]"
        )
    per_chain = ((log_p_model.double() - log_p_base.double()).sum(dim=1) * dims).cpu().numpy()
    n = per_chain.size
    if n == 0:
        raise ValueError("kl_from_log_probs: no chains")
    stderr = float(per_chain.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    return KLEstimate(float(per_chain.mean()), stderr, int(n), per_chain.tolist())


@torch.no_grad()
def trajectory_log_ratios(model: DiffusionModel, base: DiffusionModel, trajectory: Trajectory) -> Tensor:
    """[n, S] per-dimension log p_model - log p_base of each stored step (0 at deterministic steps)."""
    if trajectory.log_probs is None:
        raise ValueError("the trajectory has no step log-probs: KL needs a stochastic sampler")
    columns = []
    for i in range(trajectory.num_steps):
        if not bool(trajectory.stochastic[i]):
            columns.append(torch.zeros(len(trajectory)))
            continue
        own = recompute_step(model, trajectory, i).log_prob
        ref = recompute_step(base, trajectory, i).log_prob
        columns.append((own.double() - ref.double()).cpu())
    return torch.stack(columns, dim=1)


@torch.no_grad()
def kl_to_base(
    model: DiffusionModel,
    base: DiffusionModel,
    prompts: Sequence[str],
    config: SamplerConfig,
    seeds: Sequence[int] | None = None,
    batch_size: int = 64,
) -> KLEstimate:
    """Estimate KL(p_model || p_base) over sampling chains, one chain per prompt (see module doc).

    Args:
        model: the fine-tuned model (chains are drawn from it).
        base: the base model, same latent shape and family.
        prompts: one chain per entry (repeat prompts for more chains).
        config: a stochastic sampler.
        seeds: per-chain seeds (default 0..n-1).
        batch_size: chains per sampling batch.
    """
    if not config.stochastic:
        raise ValueError(f"kl_to_base needs a stochastic sampler, got {config.sampler!r} (eta={config.eta})")
    if tuple(model.latent_shape) != tuple(base.latent_shape):
        raise ValueError(f"model latent shape {model.latent_shape} differs from base {base.latent_shape}")
    prompts = list(prompts)
    seeds = list(range(len(prompts))) if seeds is None else list(seeds)
    if len(seeds) != len(prompts):
        raise ValueError(f"kl_to_base: {len(seeds)} seeds for {len(prompts)} prompts")
    dims = int(np.prod(model.latent_shape))
    own_parts, ratios = [], []
    for i in range(0, len(prompts), batch_size):
        traj = sample(
            model, prompts[i : i + batch_size], config=config, seeds=seeds[i : i + batch_size], decode=False
        )
        ratios.append(trajectory_log_ratios(model, base, traj))
        own_parts.append(torch.zeros_like(ratios[-1]))
    ratio = torch.cat(ratios)
    return kl_from_log_probs(ratio, torch.cat(own_parts), dims=dims)
