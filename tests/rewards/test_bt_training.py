"""Bradley–Terry training of the learned reward: the loss, learning a known truth, determinism, errors."""

import math

import pytest
import torch
import torch.nn.functional as F

from diffalign.prefs.pairs import PreferencePairs
from diffalign.rewards.bt_training import (
    NonFiniteLossError,
    PreferenceDataError,
    RewardTrainConfig,
    bt_loss,
    caption_matching_accuracy,
    evaluate_pairs,
    pretrain_matching,
    train_reward_model,
)
from diffalign.rewards.gold import ShapesFaithfulness
from diffalign.rewards.learned import RewardModelConfig, build_reward_model
from diffalign.world.dataset import DatasetConfig, ShapesGenerator
from diffalign.world.scene import LayoutConfig

torch.set_num_threads(1)


def _u8(images):
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)


def colour_pairs(n, seed=0):
    """'colors' prompts: the scene in the named colour is preferred to the same shape in another colour."""
    gen = ShapesGenerator(DatasetConfig(category_weights={"colors": 1.0}))
    g = torch.Generator().manual_seed(seed)
    ids = gen.sample_prompt_ids(n, g)
    lookup = {
        (m["include"][0]["class"], m["include"][0]["color"]): i
        for i, m in enumerate(gen.metadata)
        if m["tag"] == "colors"
    }
    other = []
    for i in ids.tolist():
        clause = gen.metadata[i]["include"][0]
        colours = [c for (s, c) in lookup if s == clause["class"] and c != clause["color"]]
        other.append(lookup[(clause["class"], colours[int(torch.randint(len(colours), (1,), generator=g))])])
    good = _u8(gen.render(gen.scenes_for(ids, g)))
    bad = _u8(gen.render(gen.scenes_for(torch.tensor(other), g)))
    flip = (torch.rand(n, generator=g) < 0.5)[:, None, None, None]
    prompts = [gen.metadata[i]["prompt"] for i in ids.tolist()]
    return PreferencePairs(
        prompts, torch.where(flip, bad, good), torch.where(flip, good, bad), (~flip[:, 0, 0, 0]).float()
    )


def size_pairs(n, seed=0):
    """Single objects drawn small and large; group 'big' prefers the large one, group 'small' the other."""
    small = ShapesGenerator(
        DatasetConfig(
            category_weights={"single_object": 1.0}, layout=LayoutConfig(size_range_few=(0.08, 0.09))
        )
    )
    big = ShapesGenerator(
        DatasetConfig(
            category_weights={"single_object": 1.0}, layout=LayoutConfig(size_range_few=(0.17, 0.19))
        )
    )
    g = torch.Generator().manual_seed(seed)
    ids = small.sample_prompt_ids(n, g)
    img_small = _u8(small.render(small.scenes_for(ids, g)))
    img_big = _u8(big.render(big.scenes_for(ids, g)))
    groups = ["big" if i % 2 == 0 else "small" for i in range(n)]
    prob_a = torch.tensor([1.0 if grp == "big" else 0.0 for grp in groups])
    prompts = [small.metadata[i]["prompt"] for i in ids.tolist()]
    return PreferencePairs(prompts, img_big, img_small, prob_a, groups=groups)


FAST = RewardTrainConfig(epochs=6, batch_size=32, warmup_steps=10, held_out_fraction=0.25, patience=0)


def test_loss_matches_hand_computation_with_a_tie():
    r_a = torch.tensor([2.0, -1.0, 0.3])
    r_b = torch.tensor([0.5, 1.0, 0.3])
    p = torch.tensor([1.0, 1.0, 0.5])
    # -log sigmoid(d) for winners; a tie at d = 0 costs log 2.
    d = [1.5, -2.0, 0.0]
    by_hand = [
        math.log1p(math.exp(-d[0])),
        math.log1p(math.exp(-d[1])),
        0.5 * math.log1p(math.exp(-d[2])) + 0.5 * math.log1p(math.exp(d[2])),
    ]
    assert bt_loss(r_a - r_b, p).item() == pytest.approx(sum(by_hand) / 3, rel=1e-6)
    assert bt_loss(r_a - r_b, p, reduction="none")[2].item() == pytest.approx(math.log(2), rel=1e-6)
    # swapping A and B with p -> 1 - p changes nothing
    assert bt_loss(r_b - r_a, 1 - p).item() == pytest.approx(bt_loss(r_a - r_b, p).item(), rel=1e-6)
    # the tie term is minimised where the rewards are equal
    margins = torch.linspace(-2, 2, 41, requires_grad=True)
    bt_loss(margins, torch.full((41,), 0.5), reduction="none").sum().backward()
    assert margins.grad[20].abs() < 1e-6
    assert bt_loss(torch.tensor([0.7]), torch.tensor([0.0])).item() == pytest.approx(
        -F.logsigmoid(torch.tensor(-0.7)).item()
    )


def test_training_learns_the_known_truth():
    pairs = colour_pairs(400, seed=0)
    result = train_reward_model(pairs, FAST)
    assert len(result.history) == 6 and result.history[0]["held_out_accuracy"] is not None
    acc = evaluate_pairs(result.model, result.held_out)["accuracy"]
    assert acc >= 0.75, f"held-out accuracy {acc:.3f} is not well above chance"
    # and on fresh pairs from the same world
    assert evaluate_pairs(result.model, colour_pairs(200, seed=1))["accuracy"] >= 0.75


def test_training_is_deterministic_for_a_seed():
    pairs = colour_pairs(64, seed=2)
    config = RewardTrainConfig(epochs=2, batch_size=16, held_out_fraction=0.25)
    first = train_reward_model(pairs, config)
    again = train_reward_model(pairs, config)
    assert [h["train_loss"] for h in again.history] == [h["train_loss"] for h in first.history]
    x = pairs.images_a[:4].float() / 255
    assert torch.equal(first.model(x, pairs.prompts[:4]), again.model(x, pairs.prompts[:4]))
    other = train_reward_model(
        pairs, RewardTrainConfig(epochs=2, batch_size=16, held_out_fraction=0.25, seed=1)
    )
    assert not torch.equal(first.model(x, pairs.prompts[:4]), other.model(x, pairs.prompts[:4]))


def test_rater_conditioning_learns_opposite_tastes():
    pairs = size_pairs(240, seed=0)
    test = size_pairs(120, seed=1)
    config = RewardTrainConfig(
        epochs=6,
        batch_size=32,
        warmup_steps=10,
        held_out_fraction=0.0,
        group_dropout=0.1,
        model=RewardModelConfig(text_layers=0),
    )
    pooled = train_reward_model(pairs, config)
    conditioned = train_reward_model(pairs, config, rater_conditioned=True)
    assert conditioned.model.groups == ["big", "small"]
    acc_pooled = evaluate_pairs(pooled.model, test)["accuracy"]
    acc_cond = evaluate_pairs(conditioned.model, test)["accuracy"]
    assert acc_cond >= 0.9, acc_cond
    assert acc_pooled <= 0.6, acc_pooled
    x = torch.cat([test.images_a[:8], test.images_b[:8]]).float() / 255
    prompts = test.prompts[:8] * 2
    big = conditioned.model(x, prompts, group="big")
    small = conditioned.model(x, prompts, group="small")
    assert bool((big[:8] > big[8:]).all()) and bool((small[:8] < small[8:]).all())


def test_empty_and_tie_only_data_are_clear_errors():
    empty = PreferencePairs(
        [],
        torch.zeros(0, 3, 32, 32, dtype=torch.uint8),
        torch.zeros(0, 3, 32, 32, dtype=torch.uint8),
        torch.zeros(0),
    )
    with pytest.raises(PreferenceDataError, match="no preference pairs"):
        train_reward_model(empty, FAST)
    ties = colour_pairs(8)
    ties.prob_a[:] = 0.5
    with pytest.raises(PreferenceDataError, match="all 8 preference pairs are ties"):
        train_reward_model(ties, FAST)
    pairs = colour_pairs(8)
    with pytest.raises(PreferenceDataError, match="no training pair names a rater group"):
        train_reward_model(pairs, FAST, rater_conditioned=True)


def test_non_finite_loss_stops_with_a_clear_error():
    pairs = colour_pairs(16)
    images_a = pairs.images_a.float() / 255
    images_a[3, 0, 5, 5] = float("nan")
    bad = PreferencePairs(pairs.prompts, images_a, pairs.images_b.float() / 255, pairs.prob_a)
    config = RewardTrainConfig(epochs=2, held_out_fraction=0.0, batch_size=16, shift_pixels=0)
    with pytest.raises(NonFiniteLossError, match="loss became nan at step 0"):
        train_reward_model(bad, config)


def test_bad_config_names_the_field():
    with pytest.raises(ValueError, match="held_out_fraction"):
        RewardTrainConfig(held_out_fraction=1.0)
    with pytest.raises(ValueError, match="epochs"):
        RewardTrainConfig(epochs=0)


def test_world_caption_pretraining_runs_before_the_preferences():
    pairs = colour_pairs(16)
    base = RewardTrainConfig(epochs=1, batch_size=8, held_out_fraction=0.0, warmup_steps=1)
    plain = train_reward_model(pairs, base)
    pre = train_reward_model(pairs, RewardTrainConfig(**{**vars(base), "pretrain_steps": 2}))
    x = pairs.images_a[:2].float() / 255
    assert not torch.equal(plain.model(x, pairs.prompts[:2]), pre.model(x, pairs.prompts[:2]))


def _tiny_world_model():
    gen = ShapesGenerator()
    config = RewardModelConfig(channels=(8, 16), text_dim=16, hidden=16)
    return build_reward_model([m["prompt"] for m in gen.metadata], config, seed=3).train()


def test_pretraining_progress_is_logged_without_changing_the_weights_it_trains():
    config = RewardTrainConfig(batch_size=8, warmup_steps=1, lr=1e-3)
    logged, quiet, records = _tiny_world_model(), _tiny_world_model(), []
    pretrain_matching(logged, 4, config, torch.device("cpu"), on_log=records.append, log_every=2)
    pretrain_matching(quiet, 4, config, torch.device("cpu"))
    for name, value in quiet.net.state_dict().items():
        assert torch.equal(value, logged.net.state_dict()[name]), name
    assert [r["pretrain_step"] for r in records] == [2, 4]
    for record in records:
        assert math.isfinite(record["matching_loss"]) and 0 <= record["caption_matching_accuracy"] <= 1
    assert records[-1]["lr"] == pytest.approx(1e-3)  # constant after the warm-up
    assert logged.net.training  # the probe puts the model back in training mode


def test_cosine_pretraining_decays_the_learning_rate_like_the_preference_training():
    config = RewardTrainConfig(batch_size=8, warmup_steps=1, lr=1e-3, min_lr_ratio=0.05, pretrain_cosine=True)
    records = []
    pretrain_matching(_tiny_world_model(), 4, config, torch.device("cpu"), on_log=records.append, log_every=1)
    # step index 3 of 4, one warm-up step: progress (3 - 1) / (4 - 1) = 2/3, cos(2 pi / 3) = -1/2,
    # factor 0.05 + 0.95 * 0.5 * (1 - 0.5) = 0.2875
    assert [r["lr"] for r in records] == pytest.approx([1e-3, 1e-3, 1e-3 * 0.7625, 1e-3 * 0.2875])


class _Scorer:
    """Stands in for a LearnedReward in the probe: scores with a given function of (images, prompts)."""

    def __init__(self, score):
        self.net = torch.nn.Module()
        self.config = RewardModelConfig()
        self.device = torch.device("cpu")
        self.score = score

    def eval(self):
        self.net.eval()
        return self

    def train(self, mode=True):
        self.net.train(mode)
        return self

    def forward(self, images, prompts):
        return self.score(images, prompts)


def test_caption_matching_probe_is_chance_for_a_constant_and_high_for_the_grader():
    constant = _Scorer(lambda images, prompts: torch.zeros(len(prompts)))
    assert caption_matching_accuracy(constant, pairs=128) == 0.5  # every pair a tie, counted half
    grader = ShapesFaithfulness(partial=True)
    gold = _Scorer(lambda images, prompts: grader((images * 255).round().to(torch.uint8), prompts))
    assert caption_matching_accuracy(gold, pairs=128) > 0.9


def test_a_non_finite_pretraining_loss_stops_with_the_step(monkeypatch):
    import diffalign.rewards.bt_training as bt

    real, calls = bt.matching_loss, []

    def loss_then_nan(model, batch):  # the third step's loss is NaN
        calls.append(1)
        return real(model, batch) * (float("nan") if len(calls) == 3 else 1.0)

    monkeypatch.setattr(bt, "matching_loss", loss_then_nan)
    with pytest.raises(NonFiniteLossError, match=r"pretraining.*at step 2;"):
        pretrain_matching(_tiny_world_model(), 5, RewardTrainConfig(batch_size=4), torch.device("cpu"))
