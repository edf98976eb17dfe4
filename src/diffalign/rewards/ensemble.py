"""Ensembles of learned reward models: a mean reward, its spread, pair disagreement, and a penalty.

K members are trained with different seeds on bootstrap resamples of the training pairs (Lakshminarayanan
et al. 2017); they share one held-out set for early stopping. Per image the ensemble gives the mean and
the standard deviation over members (population std, K in the denominator); the mean is the reward.
`disagreement` scores a pair by how much the members' Bradley–Terry P(A > B) = sigmoid(r_A - r_B)
vary, which picks the pairs worth labelling next (active learning). `UncertaintyPenalisedReward` is
mean - k * std, a conservative reward that mitigates over-optimisation (Coste et al. 2024,
"Reward model ensembles help mitigate overoptimization").
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor

from diffalign.prefs.pairs import PreferencePairs
from diffalign.rewards.bt_training import (
    RewardTrainConfig,
    TrainResult,
    check_trainable,
    initial_model,
    train_reward_model,
)
from diffalign.rewards.learned import LearnedReward
from diffalign.rewards.protocol import check_images

ENSEMBLE_FILE = "ensemble.json"
ENSEMBLE_FORMAT = "diffalign-reward-ensemble/1"

Group = str | None | Sequence[str | None]


class RewardEnsemble:
    """K reward models scored together. Calling it returns the mean over members (a `Reward`)."""

    differentiable = True

    def __init__(self, members: Sequence[LearnedReward], name: str = "ensemble") -> None:
        if not members:
            raise ValueError("a reward ensemble needs at least one member")
        self.members = list(members)
        self.name = name

    def __len__(self) -> int:
        return len(self.members)

    def member_scores(self, images: Tensor, prompts: Sequence[str], group: Group = None) -> Tensor:
        """Every member's rewards, [K, B]."""
        check_images(images, prompts, self.name)
        return torch.stack([m(images, prompts, group=group) for m in self.members])

    def mean_std(self, images: Tensor, prompts: Sequence[str], group: Group = None) -> tuple[Tensor, Tensor]:
        """Mean and population standard deviation over members, each [B] (std is 0 for one member)."""
        scores = self.member_scores(images, prompts, group)
        return scores.mean(0), scores.std(0, correction=0)

    def __call__(self, images: Tensor, prompts: Sequence[str], group: Group = None) -> Tensor:
        return self.member_scores(images, prompts, group).mean(0)

    def disagreement(
        self,
        images_a: Tensor,
        images_b: Tensor,
        prompts: Sequence[str],
        group: Group = None,
        method: str = "variance",
    ) -> Tensor:
        """Per pair, how much the members disagree about which image wins, [N].

        method 'variance': the variance over members of P(A > B) = sigmoid(r_A - r_B) (0 to 0.25);
        'vote': the fraction of members that disagree with the majority's winner (0 to 0.5).
        """
        with torch.no_grad():
            prob = torch.sigmoid(
                self.member_scores(images_a, prompts, group) - self.member_scores(images_b, prompts, group)
            )
        if method == "variance":
            return prob.var(0, correction=0)
        if method == "vote":
            votes = (prob > 0.5).float().mean(0)
            return torch.minimum(votes, 1 - votes)
        raise ValueError(f"disagreement method must be 'variance' or 'vote', got {method!r}")

    def to(self, device: torch.device | str) -> RewardEnsemble:
        for m in self.members:
            m.to(device)
        return self

    def save(self, directory: str | Path) -> Path:
        """One folder: ensemble.json plus member_0/, member_1/, ... (each a `LearnedReward` folder)."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        names = []
        for i, member in enumerate(self.members):
            names.append(f"member_{i}")
            member.save(out / names[-1])
        (out / ENSEMBLE_FILE).write_text(
            json.dumps({"format": ENSEMBLE_FORMAT, "name": self.name, "members": names}, indent=1),
            encoding="utf-8",
        )
        return out

    @classmethod
    def load(cls, directory: str | Path, device: torch.device | str = "cpu") -> RewardEnsemble:
        folder = Path(directory)
        if not folder.is_dir():
            raise FileNotFoundError(f"reward ensemble folder {str(folder)!r} does not exist")
        if not (folder / ENSEMBLE_FILE).is_file():
            raise FileNotFoundError(f"reward ensemble folder {str(folder)!r} has no {ENSEMBLE_FILE}")
        try:
            meta = json.loads((folder / ENSEMBLE_FILE).read_text(encoding="utf-8"))
            names = meta["members"]
            if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
                raise ValueError(f"'members' must be a non-empty list of member folders, got {names!r}")
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"reward ensemble folder {str(folder)!r}: bad {ENSEMBLE_FILE}: {err}") from err
        members = [LearnedReward.load(folder / n, device) for n in names]
        return cls(members, name=str(meta.get("name", "ensemble")))


class UncertaintyPenalisedReward:
    """mean - k * std over an ensemble's members: rewards only what the members agree on."""

    differentiable = True

    def __init__(self, ensemble: RewardEnsemble, k: float = 1.0) -> None:
        if k < 0:
            raise ValueError(f"the uncertainty penalty k must be non-negative, got {k}")
        self.ensemble = ensemble
        self.k = float(k)
        self.name = f"{ensemble.name}-penalised(k={self.k:g})"

    def __call__(self, images: Tensor, prompts: Sequence[str], group: Group = None) -> Tensor:
        mean, std = self.ensemble.mean_std(images, prompts, group)
        return mean - self.k * std


def bootstrap_indices(n: int, seed: int) -> Tensor:
    """n indices drawn with replacement (a bootstrap resample), seeded."""
    return torch.randint(0, n, (n,), generator=torch.Generator().manual_seed(seed))


def train_ensemble(
    pairs: PreferencePairs,
    k: int,
    config: RewardTrainConfig | None = None,
    *,
    rater_conditioned: bool = False,
    held_out: PreferencePairs | None = None,
    bootstrap: bool = True,
    on_log: Callable[[int | None, dict], None] | None = None,
    shared_pretraining: bool = False,
    initial: LearnedReward | None = None,
) -> tuple[RewardEnsemble, list[TrainResult]]:
    """Train k members (seeds seed, seed+1, ...; each on a bootstrap resample of the training pairs).

    The held-out pairs (given, or `config.held_out_fraction` of `pairs`) are split off once and shared,
    so every member early-stops on the same data and none of it is trained on. With
    `shared_pretraining`, the world-caption pretraining (`config.pretrain_steps`) runs once and every
    member fine-tunes a copy of that model on its resample: k times cheaper, and the members then
    differ by their data and batch order only, not by their initialisation. `on_log(member, record)`
    receives each member's records (`train_reward_model`); the shared pretraining's records come
    with member None. `initial`, when given, is the shared starting model instead (each member
    fine-tunes a copy of it and nothing is pretrained here), e.g. one already pretrained for a
    single model.

    `bootstrap=False` fits every member on all the training pairs: the members then differ by their
    seed only (the order of the batches and, with `mirror_relations`, the mirroring). On the Shapes
    benchmark that gave stronger members than resamples with repeated pairs (docs/reward_models.md).
    """
    if k < 1:
        raise ValueError(f"an ensemble needs k >= 1 members, got {k}")
    config = config or RewardTrainConfig()
    check_trainable(pairs)
    train = pairs
    if held_out is None and config.held_out_fraction > 0 and len(pairs) >= 2:
        train, held_out = pairs.split(config.held_out_fraction, seed=config.seed)
    shared = initial
    if shared is None and shared_pretraining and config.pretrain_steps > 0:
        shared = initial_model(
            train,
            config,
            rater_conditioned=rater_conditioned,
            name="pretrained",
            on_log=None if on_log is None else (lambda record: on_log(None, record)),
        )
    results = []
    for i in range(k):
        member_train = train
        if bootstrap and k > 1:
            member_train = train.select(bootstrap_indices(len(train), config.seed + 1000 + i))
            if bool(member_train.is_tie.all()):
                member_train = train
        result = train_reward_model(
            member_train,
            replace(config, seed=config.seed + i),
            rater_conditioned=rater_conditioned,
            held_out=held_out,
            on_log=None if on_log is None else (lambda record, i=i: on_log(i, record)),
            name=f"member_{i}",
            initial=shared,
        )
        results.append(result)
    return RewardEnsemble([r.model for r in results]), results


def load_reward_dir(
    directory: str | Path, device: torch.device | str = "cpu"
) -> LearnedReward | RewardEnsemble:
    """A reward-model folder written by `LearnedReward.save` or `RewardEnsemble.save`."""
    folder = Path(directory)
    if (folder / ENSEMBLE_FILE).is_file():
        return RewardEnsemble.load(folder, device)
    return LearnedReward.load(folder, device)
