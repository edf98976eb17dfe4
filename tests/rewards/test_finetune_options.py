"""Fine-tuning options of the reward-model training: encoder freezing and a moving average of weights."""

import pytest
import torch
from torch import nn

from diffalign.rewards.bt_training import (
    MatchingBatches,
    RewardTrainConfig,
    WeightEMA,
    evaluate_pairs,
    matching_loss,
    train_reward_model,
)
from diffalign.rewards.learned import RewardModelConfig, build_reward_model
from tests.rewards.test_bt_training import colour_pairs

torch.set_num_threads(1)

TINY = RewardModelConfig(channels=(4, 8), text_dim=16, text_layers=0, hidden=16)


def _config(**kw) -> RewardTrainConfig:
    base = dict(epochs=1, batch_size=8, warmup_steps=1, held_out_fraction=0.0, patience=0, model=TINY)
    return RewardTrainConfig(**{**base, **kw})


def _params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.net.named_parameters()}


def _is_encoder(name: str) -> bool:
    return name.startswith(("text.", "stages."))


def test_encoder_parameters_are_the_prompt_encoder_and_the_conv_stages():
    model = build_reward_model(["a red circle"], TINY)
    ids = {id(p) for p in model.net.encoder_parameters()}
    names = {n for n, p in model.net.named_parameters() if id(p) in ids}
    assert names == {n for n, _ in model.net.named_parameters() if _is_encoder(n)}
    assert names and {"out.weight", "image_proj.weight", "fuse.weight"}.isdisjoint(names)


def test_frozen_encoders_do_not_change_and_train_after_the_frozen_epochs():
    pairs = colour_pairs(32, seed=3)
    start = build_reward_model(pairs.prompts, TINY, seed=0)
    before = _params(start)

    frozen = _params(train_reward_model(pairs, _config(freeze_encoder_epochs=1), initial=start).model)
    for name, value in frozen.items():
        if _is_encoder(name):
            assert torch.equal(value, before[name]), f"{name} changed while frozen"
    assert not torch.equal(frozen["out.weight"], before["out.weight"])
    assert not torch.equal(frozen["image_proj.weight"], before["image_proj.weight"])

    # frozen for the first epoch only: the second epoch trains the encoders too
    thawed = train_reward_model(pairs, _config(epochs=2, freeze_encoder_epochs=1), initial=start).model
    after = _params(thawed)
    assert not torch.equal(after["stages.0.conv.weight"], before["stages.0.conv.weight"])
    assert not torch.equal(after["text.embed.weight"], before["text.embed.weight"])
    assert all(p.requires_grad for p in thawed.parameters())


def test_weight_ema_is_the_hand_computed_average():
    layer = nn.Linear(2, 1)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 2.0]]))
        layer.bias.fill_(0.0)
    ema = WeightEMA(layer, 0.75)
    for w in ([[3.0, 2.0]], [[5.0, -2.0]]):
        with torch.no_grad():
            layer.weight.copy_(torch.tensor(w))
        ema.update()
    # 0.75 * (0.75 * w0 + 0.25 * w1) + 0.25 * w2
    expect = (
        0.5625 * torch.tensor([1.0, 2.0])
        + 0.1875 * torch.tensor([3.0, 2.0])
        + 0.25 * torch.tensor([5.0, -2.0])
    )
    assert torch.allclose(ema.state_dict()["weight"][0], expect)
    assert torch.equal(layer.weight, torch.tensor([[5.0, -2.0]]))  # the live weights are untouched
    with pytest.raises(ValueError, match="decay"):
        WeightEMA(layer, 1.0)


def test_training_with_ema_returns_the_average_of_start_and_trained_weights():
    pairs = colour_pairs(16, seed=4)
    start = build_reward_model(pairs.prompts, TINY, seed=0)
    before = _params(start)
    # one optimiser step: the average is 0.5 * start + 0.5 * the weights after the step
    plain = _params(train_reward_model(pairs, _config(batch_size=16, max_steps=1), initial=start).model)
    averaged = _params(
        train_reward_model(pairs, _config(batch_size=16, max_steps=1, ema_decay=0.5), initial=start).model
    )
    assert not torch.equal(plain["out.weight"], before["out.weight"])
    for name in before:
        assert torch.allclose(averaged[name], 0.5 * before[name] + 0.5 * plain[name], atol=1e-6), name


def test_training_with_ema_and_early_stopping_keeps_averaged_weights():
    pairs = colour_pairs(48, seed=5)
    config = _config(epochs=2, held_out_fraction=0.25, ema_decay=0.9)
    result = train_reward_model(pairs, config)
    assert len(result.history) == 2 and result.history[0]["held_out_loss"] is not None
    # the returned weights are the averaged ones that were evaluated at the best epoch
    kept = result.history[result.best_epoch - 1]["held_out_loss"]
    assert evaluate_pairs(result.model, result.held_out)["loss"] == pytest.approx(kept, rel=1e-6)


def test_bad_fine_tuning_options_name_the_field():
    with pytest.raises(ValueError, match="freeze_encoder_epochs"):
        RewardTrainConfig(freeze_encoder_epochs=-1)
    with pytest.raises(ValueError, match="ema_decay"):
        RewardTrainConfig(ema_decay=1.0)
    with pytest.raises(ValueError, match="ema_decay"):
        RewardTrainConfig(ema_decay=-0.1)


def test_matching_weight_keeps_the_caption_matching_objective_in_fine_tuning():
    pairs = colour_pairs(64, seed=6)
    start = build_reward_model(pairs.prompts, TINY, seed=0)
    fresh = MatchingBatches(seed=123, image_size=TINY.image_size)
    probe = [fresh.next(64) for _ in range(2)]

    def probe_loss(model) -> float:
        with torch.no_grad():
            return sum(float(matching_loss(model, batch)) for batch in probe) / len(probe)

    # plain fine-tuning on colour preferences drifts away from caption matching; the mixed loss does not
    config = dict(epochs=12, lr=3e-3, batch_size=16, held_out_fraction=0.0)
    plain = train_reward_model(pairs, _config(**config), initial=start)
    mixed = train_reward_model(pairs, _config(**config, matching_weight=4.0), initial=start)
    assert probe_loss(plain.model) > probe_loss(start) + 0.05
    assert probe_loss(mixed.model) < probe_loss(plain.model) - 0.05
    with pytest.raises(ValueError, match="matching_weight"):
        RewardTrainConfig(matching_weight=-1.0)


def test_the_options_are_set_from_the_command_line(tmp_path):
    import json

    from tests.rewards.test_rm_metrics import _cli, _store_with

    store = _store_with(tmp_path, ["image"] * 10)
    out = tmp_path / "rm"
    sets = ["freeze_encoder_epochs=1", "ema_decay=0.5", "matching_weight=0.25"]
    sets += ["model.channels=[4,8]", "model.text_dim=16", "model.text_layers=0", "model.hidden=16"]
    args = ["train", "--store", store, "--out", out, "--epochs", "2", "--batch-size", "4", "--device", "cpu"]
    result = _cli(*args, *[a for s in sets for a in ("--set", s)])
    assert result.exit_code == 0, result.output
    config = json.loads((out / "train.json").read_text())["config"]
    assert config["freeze_encoder_epochs"] == 1 and config["ema_decay"] == 0.5
    assert config["matching_weight"] == 0.25
    bad = _cli(*args[:5], "--set", "ema_decay=1.5")
    assert bad.exit_code == 2 and "ema_decay" in bad.output


def test_degrade_images_blurs_and_noises_within_range_and_zero_is_identity():
    from diffalign.rewards.bt_training import degrade_images

    images = torch.zeros(64, 3, 15, 15)
    images[:, :, 7, 7] = 1.0  # one bright pixel per image
    same = degrade_images(images, 0.0, torch.Generator().manual_seed(0))
    assert torch.equal(same, images)
    out = degrade_images(images, 1.0, torch.Generator().manual_seed(0))
    assert out.shape == images.shape and out.min() >= 0 and out.max() <= 1
    centre = out[:, 0, 7, 7]
    assert centre.min() < 0.5 < centre.max()  # some images strongly blurred, some nearly sharp
    stronger = degrade_images(images, 3.0, torch.Generator().manual_seed(0))
    assert (stronger - images).abs().mean() > (out - images).abs().mean()
    again = degrade_images(images, 1.0, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)


def test_pretrain_degrade_changes_the_pretraining_batches_and_is_refused_below_zero():
    clean = MatchingBatches(0, 16).next(4)
    degraded = MatchingBatches(0, 16, degrade=1.0).next(4)
    assert clean[2] == degraded[2]  # the same prompts
    assert not torch.equal(clean[0], degraded[0])
    with pytest.raises(ValueError, match="pretrain_degrade"):
        RewardTrainConfig(pretrain_degrade=-1.0)


def test_mirror_relations_trains_on_mirrored_pairs_with_the_words_exchanged(monkeypatch):
    pairs = colour_pairs(32, seed=7)
    # every prompt names both axes, so its mirrored words say which flips its pair got
    prompts = [f"{p} left of a square, above a circle" for p in pairs.prompts]
    pairs = type(pairs)(prompts, pairs.images_a, pairs.images_b, pairs.prob_a)
    start = build_reward_model(prompts, TINY, seed=0)
    original, seen = type(start).forward, []

    def recording(self, images, batch_prompts, group_ids=None):
        seen.append((images.detach().clone(), list(batch_prompts)))
        return original(self, images, batch_prompts, group_ids)

    monkeypatch.setattr(type(start), "forward", recording)
    options = dict(epochs=1, batch_size=32, shift_pixels=0, swap_ab=False)
    train_reward_model(pairs, _config(**options), initial=start)
    # the one training step's batch (training then scores the model once more, to check it is finite)
    plain_images, plain_prompts = seen[0]
    seen.clear()
    train_reward_model(pairs, _config(**options, mirror_relations=True), initial=start)
    images, mirrored = seen[0]
    assert sorted(plain_prompts) == sorted(prompts * 2)
    changed = [i for i in range(32) if mirrored[i] != plain_prompts[i]]
    assert changed and len(changed) < 32
    assert {("right" in p, "below" in p) for p in mirrored} == {
        (False, False),
        (False, True),
        (True, False),
        (True, True),
    }
    for i in range(32):
        h = "right" in mirrored[i]
        v = "below" in mirrored[i]
        # both images of the pair get the same flips, the ones its prompt says
        for row in (i, i + 32):
            expected = plain_images[row]
            expected = expected.flip(-1) if h else expected
            expected = expected.flip(-2) if v else expected
            assert torch.equal(images[row], expected), (i, mirrored[i])


def test_pretrain_counterfactual_pairs_hold_the_prompts_own_objects_and_fail_it():
    from diffalign.world.dataset import ShapesGenerator
    from diffalign.world.geneval import score_image

    plain = MatchingBatches(0, 32).next(16)
    off = MatchingBatches(0, 32, counterfactual=0.0).next(16)
    assert all(torch.equal(a, b) for a, b in zip(plain[:2] + plain[3:], off[:2] + off[3:]))  # same stream
    good, bad, prompts, prob = MatchingBatches(0, 32, counterfactual=1.0).next(16)
    assert prompts == plain[2] and torch.equal(good, plain[0])  # positives unchanged
    assert torch.equal(prob, torch.ones(16))
    meta = {m["prompt"]: m for m in ShapesGenerator().metadata}
    assert not any(score_image(bad[k], meta[p]).correct for k, p in enumerate(prompts))
    assert all(score_image(good[k], meta[p]).correct for k, p in enumerate(prompts))
    with pytest.raises(ValueError, match="pretrain_counterfactual"):
        RewardTrainConfig(pretrain_counterfactual=1.5)
