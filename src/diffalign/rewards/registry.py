"""Resolve a `--reward` argument to a Reward.

Accepted forms, tried in this order:
- a gold reward of the Shapes world: `gold-faithfulness`, `gold-faithfulness:partial`, `gold-quality`,
  `gold-utility` (the rater panel's pooled utility), `gold-utility:GROUP` (one rater group's), or the
  same under the `shapes:` prefix: `shapes:faithfulness`, `shapes:faithfulness-partial`,
  `shapes:quality`, `shapes:utility`, `shapes:rater-GROUP`;
- any of them with `@PANEL_FILE` (`shapes:rater-GROUP@panel.yaml`, `shapes:utility@panel.yaml`): the
  utilities of a rater panel described in a file (`diffalign.panels`) instead of the default panel's;
- `shapes:faithfulness-soft`: a differentiable relaxation of the faithfulness grader
  (`rewards.soft_faithfulness`), for the methods that need gradients; not a gold reward;
- an external reward model by name, from local weights: `clip`, `pickscore`, `aesthetic`,
  `imagereward`, `hpsv2` (case, '-' and '_' ignored; also `clipscore`, `hps`, `laion-aesthetic`), optionally
  with a local folder, file or cached hub id: `clip=PATH`;
- a reward-model folder written by `diffalign reward train` (a model or an ensemble);
- `penalised:ENSEMBLE_DIR` or `penalised:K:ENSEMBLE_DIR`: an ensemble folder's uncertainty-penalised
  reward, mean - K std over its members (K = 1 by default; Coste et al. 2024), a conservative reward
  to train against;
- any callable: `path/to/file.py:function` or `package.module:function`.
The `shapes:`, `gold-` and `penalised:` prefixes are reserved, so a module named `shapes` or
`penalised` cannot be given as a callable.

Every spec that names nothing usable raises `RewardSpecError` (a `ValueError`), with a "did you mean"
suggestion for a near miss; missing files raise `FileNotFoundError` (external weights: `RewardWeightsError`)
and unimportable modules `ImportError`, each naming the path or module.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
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
        "shapes:rater-GROUP, the last three also @PANEL.yaml), the differentiable shapes:faithfulness-soft, "
        "an external model (clip, "
        "pickscore, aesthetic, imagereward, hpsv2, "
        "optionally NAME=PATH), a reward-model folder, an ensemble folder's uncertainty-penalised reward "
        "(penalised:[K:]DIR), or a callable (file.py:function, module:function)"
    )


def _gold(spec: str) -> Reward:
    """A gold reward; `NAME@PANEL_FILE` takes the utilities and quality of the panel file's raters
    (`diffalign.panels`) instead of the default panel's."""
    from diffalign.rewards.gold import gold_rewards

    named, at, panel_file = spec.partition("@")
    name = _SHAPES_ALIASES.get(named, named)
    if name.startswith("shapes:rater-"):
        name = "gold-utility:" + name.removeprefix("shapes:rater-")
    panel = None
    if at:
        from diffalign.align.config_io import ConfigError
        from diffalign.panels import load_panel

        if not panel_file.strip():
            raise RewardSpecError(f"--reward {spec!r}: no panel file after '@' (give NAME@PANEL.yaml)")
        try:
            panel = load_panel(panel_file.strip())
        except ConfigError as err:
            raise RewardSpecError(f"--reward {spec!r}: {err}") from err
    rewards = gold_rewards(panel)
    if name not in rewards:
        known = ", ".join([*sorted(rewards), "shapes:faithfulness-soft"])
        where = f"the panel of {panel_file.strip()}" if at else "the Shapes world"
        raise RewardSpecError(
            f"--reward {spec!r}: no such gold reward{_did_you_mean(named)}; {where} has {known}"
        )
    return rewards[name]


def _penalised(spec: str, device: torch.device | str) -> Reward:
    """`penalised:[K:]DIR`: mean - K std over the members of the ensemble folder DIR."""
    from diffalign.rewards.ensemble import (
        ENSEMBLE_FILE,
        RewardEnsemble,
        UncertaintyPenalisedReward,
        load_reward_dir,
    )

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
    if not rest.strip():
        raise RewardSpecError(f"--reward {spec!r}: no folder given (give penalised:[K:]ENSEMBLE_DIR)")
    folder = Path(rest)
    if not folder.is_dir():
        raise RewardSpecError(
            f"--reward {spec!r}: {folder} is not a folder (give penalised:[K:]ENSEMBLE_DIR)"
        )
    if k < 0:
        raise RewardSpecError(f"--reward {spec!r}: the penalty K must be non-negative, got {k:g}")
    if not (folder / ENSEMBLE_FILE).is_file() and not (folder / "config.json").is_file():
        raise RewardSpecError(
            f"--reward {spec!r}: {folder} is not a reward ensemble folder (it has no {ENSEMBLE_FILE}); "
            "give one written by `diffalign reward train --ensemble K`"
        )
    model = _load_dir(spec, folder, device, load_reward_dir)
    if not isinstance(model, RewardEnsemble) or len(model) < 2:
        raise RewardSpecError(
            f"--reward {spec!r}: {folder} holds one reward model, whose spread is 0; the penalty needs an "
            "ensemble (diffalign reward train --ensemble K)"
        )
    return UncertaintyPenalisedReward(model, k)


def _known_specs() -> list[str]:
    """Every fixed spec (no paths), for suggestions."""
    from diffalign.rewards.gold import gold_rewards

    gold = list(gold_rewards())
    raters = [f"shapes:rater-{name.removeprefix('gold-utility:')}" for name in gold if ":" in name]
    return [*gold, *_SHAPES_ALIASES, *raters, "shapes:faithfulness-soft", *EXTERNAL_NAMES]


def _did_you_mean(spec: str) -> str:
    """' (did you mean X?)' for a spec close to a known one or with a misspelt prefix, else ''."""
    head, sep, rest = spec.partition(":")
    lowered = spec.lower()
    if sep and head.lower() in ("penalized", "penalize", "penalise", "penalty", "penalised"):
        return f" (did you mean 'penalised:{rest}'?)"
    known = _known_specs()
    if sep and head.lower() == "shapes" and head != "shapes":
        lowered = "shapes:" + rest
    match = difflib.get_close_matches(lowered, known, n=1, cutoff=0.75)
    return f" (did you mean {match[0]!r}?)" if match and match[0] != spec else ""


def _load_dir(spec: str, folder: Path, device: torch.device | str, loader: Callable[..., Reward]) -> Reward:
    """`loader(folder, device=...)`; a damaged folder's errors become `RewardSpecError` naming it.

    `FileNotFoundError` and `ValueError` (the loaders' own, which name the file) pass through; anything else a
    damaged file can raise (a corrupt safetensors header, a config.json that is not an object) is wrapped.
    """
    from safetensors import SafetensorError

    try:
        return loader(folder, device=device)
    except (SafetensorError, AttributeError, TypeError, KeyError, IndexError) as err:
        raise RewardSpecError(
            f"--reward {spec!r}: {folder} is not a readable reward-model folder "
            f"({type(err).__name__}: {err}); expected one written by `diffalign reward train`"
        ) from err


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
    from diffalign.rewards.external import external_name

    name, _, path = spec.partition("=")
    external = external_name(name)
    if external is not None:
        from diffalign.rewards.external import load_external_reward

        return load_external_reward(external, path.strip() or None, device=device, dtype=dtype)
    folder = Path(spec)
    if folder.is_dir():
        from diffalign.rewards.ensemble import load_reward_dir

        return _load_dir(spec, folder, device, load_reward_dir)
    if ":" in spec:
        return _callable(spec)
    if spec.endswith(".py") and Path(spec).expanduser().is_file():
        raise RewardSpecError(
            f"--reward {spec!r}: a Python file needs the function's name after a colon: {spec}:FUNCTION"
        )
    hint = _did_you_mean(spec)
    raise RewardSpecError(
        f"--reward {spec!r}: not a known reward, folder or callable{hint}; give {reward_forms()}"
    )


def _callable(spec: str) -> Reward:
    """A `file.py:fn` / `module:fn` reward; a spec that names nothing usable is a `RewardSpecError`."""
    from diffalign.rewards.callables import load_callable_reward

    try:
        return load_callable_reward(spec)
    except (AttributeError, TypeError) as err:  # no such attribute, not callable, wrong signature
        raise RewardSpecError(_naming(spec, err)) from err
    except (ImportError, ValueError) as err:  # e.g. a misspelt `penalised:` or `shapes:` prefix
        hint = _did_you_mean(spec)
        if hint:
            raise RewardSpecError(_naming(spec, err) + hint) from err
        raise


def _naming(spec: str, err: Exception) -> str:
    """The error's message, prefixed with the spec unless it names it already."""
    message = str(err)
    return message if repr(spec) in message else f"--reward {spec!r}: {message}"
