"""Resolve a `--reward` argument to a Reward.

Accepted forms, tried in this order:
- a gold reward of the Shapes world: `gold-faithfulness`, `gold-faithfulness:partial`, `gold-quality`,
  `gold-utility` (the rater panel's pooled utility), `gold-utility:GROUP` (one rater group's), or the
  same under the `shapes:` prefix: `shapes:faithfulness`, `shapes:faithfulness-partial`,
  `shapes:quality`, `shapes:utility`, `shapes:rater-GROUP`;
- `shapes:faithfulness-soft`: a differentiable relaxation of the faithfulness grader
  (`rewards.soft_faithfulness`), for the methods that need gradients; not a gold reward;
- an external reward model by name, from local weights: `clip`, `pickscore`, `aesthetic`,
  `imagereward`, `hpsv2`, optionally with a local folder, file or cached hub id: `clip=PATH`;
- a reward-model folder written by `diffalign reward train` (a model or an ensemble);
- `penalised:ENSEMBLE_DIR` or `penalised:K:ENSEMBLE_DIR`: an ensemble folder's uncertainty-penalised
  reward, mean - K std over its members (K = 1 by default; Coste et al. 2024), a conservative reward
  to train against;
- any callable: `path/to/file.py:function` or `package.module:function`.
The `shapes:`, `gold-` and `penalised:` prefixes are reserved, so a module named `shapes` or
`penalised` cannot be given as a callable.
"""

from __future__ import annotations

from pathlib import Path

import torch

from diffalign.rewards.protocol import Reward

EXTERNAL_NAMES = ("clip", "pickscore", "aesthetic", "imagereward", "hpsv2")
_SHAPES_ALIASES = {
    "shapes:faithfulness": "gold-faithfulness",
    "shapes:faithfulness-partial": "gold-faithfulness:partial",
    "shapes:quality": "gold-quality",
    "shapes:utility": "gold-utility",
}


class RewardSpecError(ValueError):
    """A `--reward` argument that names no reward."""


def reward_forms() -> str:
    return (
        "a gold reward (shapes:faithfulness, shapes:faithfulness-partial, shapes:quality, shapes:utility, "
        "shapes:rater-GROUP), the differentiable shapes:faithfulness-soft, an external model (clip, "
        "pickscore, aesthetic, imagereward, hpsv2, "
        "optionally NAME=PATH), a reward-model folder, an ensemble folder's uncertainty-penalised reward "
        "(penalised:[K:]DIR), or a callable (file.py:function, module:function)"
    )


def _gold(spec: str) -> Reward:
    from diffalign.rewards.gold import gold_rewards

    name = _SHAPES_ALIASES.get(spec, spec)
    if name.startswith("shapes:rater-"):
        name = "gold-utility:" + name.removeprefix("shapes:rater-")
    rewards = gold_rewards()
    if name not in rewards:
        known = ", ".join([*sorted(rewards), "shapes:faithfulness-soft"])
        raise RewardSpecError(f"--reward {spec!r}: no such gold reward; the Shapes world has {known}")
    return rewards[name]


def _penalised(spec: str, device: torch.device | str) -> Reward:
    """`penalised:[K:]DIR`: mean - K std over the members of the ensemble folder DIR."""
    from diffalign.rewards.ensemble import RewardEnsemble, UncertaintyPenalisedReward, load_reward_dir

    rest = spec.removeprefix("penalised:")
    k = 1.0
    head, sep, tail = rest.partition(":")
    if sep:
        try:
            k = float(head)
        except ValueError:
            pass  # no K: the colon belongs to the path
        else:
            rest = tail
    folder = Path(rest)
    if not folder.is_dir():
        raise RewardSpecError(
            f"--reward {spec!r}: {folder} is not a folder (give penalised:[K:]ENSEMBLE_DIR)"
        )
    if k < 0:
        raise RewardSpecError(f"--reward {spec!r}: the penalty K must be non-negative, got {k:g}")
    model = load_reward_dir(folder, device=device)
    if not isinstance(model, RewardEnsemble) or len(model) < 2:
        raise RewardSpecError(
            f"--reward {spec!r}: {folder} holds one reward model, whose spread is 0; the penalty needs an "
            "ensemble (diffalign reward train --ensemble K)"
        )
    return UncertaintyPenalisedReward(model, k)


def load_reward(
    spec: str, device: torch.device | str = "cpu", dtype: torch.dtype | str | None = None
) -> Reward:
    """The reward named by `spec` (see the module doc); errors name the argument and the forms accepted."""
    if not spec or not spec.strip():
        raise RewardSpecError(f"--reward is empty; give {reward_forms()}")
    spec = spec.strip()
    if spec == "shapes:faithfulness-soft":
        from diffalign.rewards.soft_faithfulness import SoftFaithfulness

        return SoftFaithfulness()
    if spec.startswith(("shapes:", "gold-")):
        return _gold(spec)
    if spec.startswith("penalised:"):
        return _penalised(spec, device)
    name, _, path = spec.partition("=")
    if name.lower() in EXTERNAL_NAMES:
        from diffalign.rewards.external import load_external_reward

        return load_external_reward(name.lower(), path or None, device=device, dtype=dtype)
    folder = Path(spec)
    if folder.is_dir():
        from diffalign.rewards.ensemble import load_reward_dir

        return load_reward_dir(folder, device=device)
    if ":" in spec:
        from diffalign.rewards.callables import load_callable_reward

        return load_callable_reward(spec)
    raise RewardSpecError(f"--reward {spec!r}: not a known reward, folder or callable; give {reward_forms()}")
