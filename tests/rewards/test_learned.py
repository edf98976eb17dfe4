"""The learned reward model: vocabulary, word order, gradients to pixels, groups, save/load."""

import json

import pytest
import torch

from diffalign.rewards.learned import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    LearnedReward,
    PromptVocab,
    RewardModelConfig,
    build_reward_model,
)
from diffalign.rewards.protocol import Reward

torch.set_num_threads(1)
PROMPTS = ["a red circle left of a blue square", "a square left of a circle", "two triangles"]


def _model(**kw):
    return build_reward_model(PROMPTS, RewardModelConfig(**kw), seed=0)


def test_vocabulary_maps_unknown_words_to_unk_and_keeps_order():
    vocab = PromptVocab.build(PROMPTS)
    ids, mask = vocab.encode(["a purple hexagon", ""], max_words=6)
    assert ids.shape == (2, 7)
    assert ids[0, 2].item() == vocab.index["<unk>"] and ids[0, 3].item() == vocab.index["<unk>"]
    assert mask[1].tolist() == [True] + [False] * 6  # the <cls> token is always there
    a, _ = vocab.encode(["a circle left of a square"], 6)
    b, _ = vocab.encode(["a square left of a circle"], 6)
    assert not torch.equal(a, b)


def test_reward_protocol_word_order_and_unknown_prompts():
    model = _model()
    assert isinstance(model, Reward) and model.differentiable
    images = torch.rand(2, 3, 32, 32)
    r1 = model(images, ["a circle left of a square"] * 2)
    r2 = model(images, ["a square left of a circle"] * 2)
    assert r1.shape == (2,) and not torch.allclose(r1, r2)
    assert torch.isfinite(model(images, ["never seen words", ""])).all()
    # other sizes are resized to the config's image_size
    assert model(torch.rand(2, 3, 64, 64), PROMPTS[:2]).shape == (2,)
    with pytest.raises(ValueError, match="2 images but 3 prompts"):
        model(images, PROMPTS)


def test_gradient_reaches_the_pixels():
    model = _model()
    images = torch.rand(3, 3, 32, 32, requires_grad=True)
    model(images, PROMPTS).sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


def test_groups_select_a_reward_and_unknown_groups_fall_back_to_pooled():
    model = _model(groups=["bold", "calm"])
    with torch.no_grad():
        model.net.group_embed.weight[1, -1] = 1.0  # 'bold' adds 1 to every reward
    images = torch.rand(3, 3, 32, 32)
    pooled = model(images, PROMPTS)
    assert torch.allclose(model(images, PROMPTS, group="bold"), pooled + 1.0)
    assert torch.allclose(model(images, PROMPTS, group="unknown"), pooled)
    mixed = model(images, PROMPTS, group=["bold", None, "calm"])
    assert torch.allclose(mixed, pooled + torch.tensor([1.0, 0.0, 0.0]))


def test_save_load_round_trip_is_identical(tmp_path):
    model = _model(groups=["bold", "calm"])
    with torch.no_grad():
        model.net.group_embed.weight.normal_()
    model.save(tmp_path / "rm")
    loaded = LearnedReward.load(tmp_path / "rm")
    assert loaded.config == model.config and loaded.vocab.words == model.vocab.words
    images = torch.rand(3, 3, 32, 32)
    for group in (None, "calm"):
        assert torch.equal(model(images, PROMPTS, group=group), loaded(images, PROMPTS, group=group))
    assert json.loads((tmp_path / "rm" / CONFIG_FILE).read_text())["model"]["groups"] == ["bold", "calm"]


def test_load_errors_name_the_folder_and_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LearnedReward.load(tmp_path / "nowhere")
    _model().save(tmp_path / "rm")
    (tmp_path / "rm" / WEIGHTS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=r"rm'.*has no model\.safetensors"):
        LearnedReward.load(tmp_path / "rm")
    _model().save(tmp_path / "damaged")
    (tmp_path / "damaged" / WEIGHTS_FILE).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json")
    with pytest.raises(ValueError, match=r"damaged'.*model\.safetensors is not readable"):
        LearnedReward.load(tmp_path / "damaged")
    for text in ("[]", "null"):
        (tmp_path / "damaged" / CONFIG_FILE).write_text(text)
        with pytest.raises(ValueError, match=r"damaged'.*bad config\.json.*expected a JSON object"):
            LearnedReward.load(tmp_path / "damaged")


def test_config_checks():
    with pytest.raises(ValueError, match="text_dim"):
        RewardModelConfig(text_dim=30, text_heads=4)
    with pytest.raises(ValueError, match="too small"):
        RewardModelConfig(image_size=4)
    with pytest.raises(ValueError, match="unknown RewardModelConfig"):
        RewardModelConfig.from_dict({"bogus": 1})
