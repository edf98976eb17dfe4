"""SVDD-style per-step selection (Li et al. 2024, "Derivative-free guidance in continuous and discrete
diffusion models with soft value-based decoding"; the SVDD-MC variant with the reward of the x0
prediction as the value).

At every step the pretrained transition x_t -> x_{t-1} proposes M children (the sampler's own draw
and M - 1 more from the same Gaussian); each child's value is v = r(decode(x0_hat(child))), with x0_hat
the model's prediction at the child's level (at the last step, the child itself), and the step keeps
the argmax (alpha = 0) or a child drawn in proportion to exp(v / alpha).

Cost per prompt: S plain NFEs plus M value NFEs at each of the first S - 1 steps (x2 with
classifier-free guidance), and M reward calls per step. The kept child's value evaluation is the
same model call the next step makes; it is not reused, so each step pays for it twice. The reward
is a black box. Needs a stochastic sampler.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from diffalign.diffusion.protocol import DiffusionModel
from diffalign.diffusion.sampling import SamplerConfig, StepInfo, guided_predict, sample
from diffalign.diffusion.schedules import predict_x0_and_eps
from diffalign.rewards.protocol import Reward
from diffalign.steer.budget import plain_nfe
from diffalign.steer.common import PromptRandomness, Session, SteerResult, require_stochastic, score


@dataclass
class SVDDConfig:
    """SVDD per-step selection.

    Attributes:
        num_candidates: M children per step (2 or more).
        alpha: 0 keeps the best child; > 0 samples a child with probability proportional to
            exp(value / alpha).
        seed: prompt i's chain uses seed `seed + i`; the extra children and the selection draw from
            a generator seeded with `seed`.
    """

    num_candidates: int = 4
    alpha: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_candidates < 2:
            raise ValueError(f"num_candidates must be >= 2, got {self.num_candidates}")
        if self.alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {self.alpha}")

    @staticmethod
    def cost(sampler: SamplerConfig, num_candidates: int) -> int:
        """NFEs per prompt: S plain steps plus M value evaluations at each of the first S - 1 steps."""
        per_step = plain_nfe(sampler) // sampler.num_steps
        return plain_nfe(sampler) + (sampler.num_steps - 1) * num_candidates * per_step

    @classmethod
    def from_budget(cls, budget_nfe: int, sampler: SamplerConfig, **overrides) -> SVDDConfig:
        """The largest M whose cost fits in `budget_nfe` NFEs per prompt."""
        if sampler.num_steps < 2:
            raise ValueError(
                "budget_nfe cannot size SVDD with 1 sampling step: its only step scores the children "
                "themselves, at no model cost; set num_candidates instead, or sample with more steps"
            )
        per_step = plain_nfe(sampler) // sampler.num_steps
        value_cost = (sampler.num_steps - 1) * per_step
        m = max(budget_nfe - plain_nfe(sampler), 0) // value_cost
        if m < 2:
            raise ValueError(
                f"budget_nfe {budget_nfe} is too small for SVDD: it needs at least "
                f"{cls.cost(sampler, 2)} NFEs per prompt (a plain chain plus 2 candidates per step)"
            )
        return cls(num_candidates=m, **overrides)


def svdd(
    model: DiffusionModel,
    prompts: Sequence[str],
    reward: Reward,
    sampler: SamplerConfig,
    config: SVDDConfig,
    prompt_seeds: Sequence[int] | None = None,
) -> SteerResult:
    """Sample with SVDD per-step selection among `config.num_candidates` children (module doc);
    `prompt_seeds` gives each prompt its own seed (`PromptRandomness`)."""
    require_stochastic(sampler, "SVDD")
    run = Session(model, reward, prompts)
    num, m = len(run.prompts), config.num_candidates
    with torch.no_grad():
        cond = run.model.encode_prompts(run.prompts).repeat_interleave(m)
        uncond = run.model.encode_prompts([""] * num).repeat_interleave(m) if sampler.guided else None
    rng = PromptRandomness(config.seed, num, prompt_seeds)
    flat_prompts = [p for p in run.prompts for _ in range(m)]
    selections = []

    def callback(info: StepInfo) -> Tensor | None:
        out = info.output
        std = out.std.expand(num) if out.std.ndim == 0 else out.std
        if not bool((std > 0).any()):
            return None  # a deterministic step: every child would be the same
        shape = out.prev.shape[1:]
        extra = rng.normal((num, m - 1, *shape)).to(out.mean)
        draws = out.mean[:, None] + std.view(num, 1, 1, 1, 1).to(out.mean) * extra
        children = torch.cat([out.prev[:, None].to(out.mean), draws], dim=1).to(out.prev.dtype)
        flat = children.reshape(num * m, *shape)
        if info.step_index == info.num_steps - 1:
            x0 = flat
        else:
            t_prev = info.t_prev.to(flat.device).expand(num * m)
            output = guided_predict(run.model, flat, t_prev, cond, uncond, sampler.guidance_scale)
            x0, _ = predict_x0_and_eps(output, flat, t_prev, run.model.prediction_type, run.model.schedule)
        values = score(run.reward, run.model, x0.to(flat.dtype), flat_prompts).view(num, m)
        if config.alpha == 0:
            pick = values.argmax(dim=1)
        else:
            probs = torch.softmax(values.double().cpu() / config.alpha, dim=1)
            pick = rng.multinomial(probs.float(), 1).view(-1).to(values.device)
        selections.append(pick.tolist())
        return children[torch.arange(num, device=children.device), pick.to(children.device)]

    with torch.no_grad():
        traj = sample(
            run.model,
            run.prompts,
            config=sampler,
            seeds=rng.candidate_seeds(1),
            callback=callback,
            decode=False,
        )
    finals = traj.final_latents
    rewards = score(run.reward, run.model, finals, run.prompts)
    images = run.model.decode(finals).clamp(0, 1)
    return run.result("svdd", finals, images, rewards, num_candidates=m, selections=selections)
