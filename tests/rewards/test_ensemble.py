"""Reward ensembles: mean/std over members, pair disagreement, the uncertainty penalty, save/load."""

import copy

import pytest
import torch

from diffalign.prefs.pairs import PreferencePairs
from diffalign.rewards.bt_training import RewardTrainConfig
from diffalign.rewards.ensemble import (
    RewardEnsemble,
    UncertaintyPenalisedReward,
    load_reward_dir,
    train_ensemble,
)
from diffalign.rewards.learned import build_reward_model
from diffalign.rewards.protocol import Reward

torch.set_num_threads(1)
PROMPTS = ["a red circle", "a blue square", "two triangles", "a circle left of a square"]


def _random_pairs(n: int, seed: int) -> PreferencePairs:
    """n pairs of random images for one prompt, alternately preferring a and b."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
    b = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
    return PreferencePairs(["a red circle"] * n, a, b, (torch.arange(n) % 2).float())


def _members(seeds):
    return [build_reward_model(PROMPTS, seed=s) for s in seeds]


def test_identical_members_have_zero_std_and_different_ones_positive():
    images = torch.rand(4, 3, 32, 32)
    one = build_reward_model(PROMPTS, seed=0)
    same = RewardEnsemble([one, copy.deepcopy(one), copy.deepcopy(one)])
    mean, std = same.mean_std(images, PROMPTS)
    assert torch.equal(std, torch.zeros(4)) and torch.allclose(mean, one(images, PROMPTS))
    assert torch.equal(same.disagreement(images, images.flip(0), PROMPTS), torch.zeros(4))
    diff = RewardEnsemble(_members([0, 1, 2]))
    _, std = diff.mean_std(images, PROMPTS)
    assert bool((std > 0).all())
    assert bool((diff.disagreement(images, images.flip(0), PROMPTS) > 0).all())
    assert isinstance(diff, Reward)


def test_uncertainty_penalty_is_mean_minus_k_std():
    ens = RewardEnsemble(_members([0, 1, 2]))
    images = torch.rand(4, 3, 32, 32)
    scores = torch.stack([m(images, PROMPTS) for m in ens.members])
    expected = scores.mean(0) - 2.0 * scores.std(0, correction=0)
    penalised = UncertaintyPenalisedReward(ens, k=2.0)
    assert torch.allclose(penalised(images, PROMPTS), expected, atol=1e-6)
    assert torch.allclose(UncertaintyPenalisedReward(ens, k=0.0)(images, PROMPTS), ens(images, PROMPTS))
    x = images.clone().requires_grad_(True)
    penalised(x, PROMPTS).sum().backward()
    assert x.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="non-negative"):
        UncertaintyPenalisedReward(ens, k=-1)


def test_vote_disagreement_counts_minority_members():
    ens = RewardEnsemble(_members([0, 1, 2, 3]))
    images = torch.rand(4, 3, 32, 32)
    votes = ens.disagreement(images, images.flip(0), PROMPTS, method="vote")
    assert bool(((votes >= 0) & (votes <= 0.5)).all())
    with pytest.raises(ValueError, match="variance"):
        ens.disagreement(images, images, PROMPTS, method="bogus")


def test_train_save_load_ensemble(tmp_path):
    g = torch.Generator().manual_seed(0)
    n = 24
    a = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
    b = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
    pairs = PreferencePairs(["a red circle"] * n, a, b, (torch.arange(n) % 2).float())
    ens, results = train_ensemble(pairs, 2, RewardTrainConfig(epochs=1, batch_size=8, held_out_fraction=0.25))
    assert len(ens) == 2 and len(results) == 2
    assert results[0].held_out.keys == results[1].held_out.keys  # one shared held-out set
    ens.save(tmp_path / "ens")
    loaded = load_reward_dir(tmp_path / "ens")
    assert isinstance(loaded, RewardEnsemble)
    x = a[:4].float() / 255
    assert torch.equal(loaded(x, ["a red circle"] * 4), ens(x, ["a red circle"] * 4))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        RewardEnsemble.load(tmp_path / "missing")


def test_shared_pretraining_runs_once_and_every_member_starts_from_it(monkeypatch):
    import diffalign.rewards.bt_training as bt

    calls, starts = [], []
    real_pretrain = bt.pretrain_matching

    def counting_pretrain(model, steps, config, device, **kwargs):
        calls.append(steps)
        real_pretrain(model, steps, config, device, **kwargs)

    real_train = bt.train_reward_model

    def recording_train(pairs, config=None, **kwargs):
        initial = kwargs.get("initial")
        starts.append(
            None if initial is None else {k: v.clone() for k, v in initial.net.state_dict().items()}
        )
        return real_train(pairs, config, **kwargs)

    monkeypatch.setattr(bt, "pretrain_matching", counting_pretrain)
    monkeypatch.setattr("diffalign.rewards.ensemble.train_reward_model", recording_train)
    pairs = _random_pairs(24, seed=1)
    a = pairs.images_a
    config = RewardTrainConfig(epochs=1, batch_size=8, held_out_fraction=0.25, pretrain_steps=2)
    ens, _ = train_ensemble(pairs, 3, config, shared_pretraining=True)
    assert calls == [2]  # one pretraining for three members
    assert len(starts) == 3 and all(s is not None for s in starts)
    for other in starts[1:]:
        assert all(torch.equal(starts[0][k], other[k]) for k in starts[0])
    # Fine-tuning on different resamples makes the members differ.
    x = a[:4].float() / 255
    scores = torch.stack([m(x, ["a red circle"] * 4) for m in ens.members])
    assert not torch.equal(scores[0], scores[1])
    calls.clear()
    train_ensemble(pairs, 2, config)  # without sharing: each member pretrains
    assert calls == [2, 2]


def test_members_without_bootstrap_fit_every_pair_from_the_given_start():
    from dataclasses import replace

    from diffalign.rewards.bt_training import train_reward_model

    pairs = _random_pairs(24, seed=3)
    a = pairs.images_a
    config = RewardTrainConfig(epochs=2, batch_size=8, held_out_fraction=0.25, patience=0)
    start = build_reward_model(pairs.prompts, seed=9)
    ens, results = train_ensemble(pairs, 2, config, bootstrap=False, initial=start)
    fit, held = pairs.split(config.held_out_fraction, seed=config.seed)
    x = a[:6].float() / 255
    for i, member in enumerate(ens.members):
        # member i = one model fitted on all the (non-held-out) pairs with seed + i, from `start`
        alone = train_reward_model(fit, replace(config, seed=config.seed + i), held_out=held, initial=start)
        assert torch.equal(member(x, ["a red circle"] * 6), alone.model(x, ["a red circle"] * 6))
        assert sorted(results[i].held_out.keys) == sorted(held.keys)
    assert not torch.equal(ens.members[0](x, ["a red circle"] * 6), ens.members[1](x, ["a red circle"] * 6))
    # the start is copied, not trained in place
    fresh = build_reward_model(pairs.prompts, seed=9)
    assert torch.equal(start(x, ["a red circle"] * 6), fresh(x, ["a red circle"] * 6))


def test_penalised_spec_loads_an_ensemble_folder_as_mean_minus_k_std(tmp_path):
    from diffalign.rewards.registry import RewardSpecError, load_reward

    ens = RewardEnsemble(_members([0, 1, 2]))
    ens.save(tmp_path / "ens:with-colon")  # a colon in the path is not taken for K
    images = torch.rand(4, 3, 32, 32)
    scores = torch.stack([m(images, PROMPTS) for m in ens.members])
    mean, std = scores.mean(0), scores.std(0, correction=0)
    default = load_reward(f"penalised:{tmp_path / 'ens:with-colon'}")
    assert torch.allclose(default(images, PROMPTS), mean - std, atol=1e-6)
    half = load_reward(f"penalised:0.5:{tmp_path / 'ens:with-colon'}")
    assert torch.allclose(half(images, PROMPTS), mean - 0.5 * std, atol=1e-6)
    assert half.differentiable
    single = build_reward_model(PROMPTS, seed=0)
    single.save(tmp_path / "one")
    with pytest.raises(RewardSpecError, match="one reward model"):
        load_reward(f"penalised:{tmp_path / 'one'}")
    with pytest.raises(RewardSpecError, match="not a folder"):
        load_reward(f"penalised:2:{tmp_path / 'missing'}")
    with pytest.raises(RewardSpecError, match="non-negative"):
        load_reward(f"penalised:-1:{tmp_path / 'ens:with-colon'}")
