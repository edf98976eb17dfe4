"""External reward models on tiny, randomly initialised CLIPs saved to disk, and fake reward packages.

No network: every test runs with the Hub in offline mode, an empty private Hub cache, and sockets that refuse
to connect.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from diffalign.rewards import Reward, require_differentiable  # noqa: E402
from diffalign.rewards.clip_rewards import (  # noqa: E402
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    AestheticHead,
    AestheticReward,
    CLIPScoreReward,
    PickScoreReward,
    clip_preprocess,
    load_aesthetic_head,
)
from diffalign.rewards.external import (  # noqa: E402
    MissingRewardPackageError,
    RewardWeightsError,
    hub_offline,
    load_external_reward,
    resolve_folder,
)
from diffalign.rewards.package_rewards import HPSv2Reward, ImageRewardReward  # noqa: E402
from diffalign.rewards.protocol import NotDifferentiableError  # noqa: E402

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)  # distinct from CLIP's, to see that the config is read
MAX_LEN = 16


@pytest.fixture(autouse=True)
def _offline_single_thread(monkeypatch, tmp_path_factory):
    """One thread; Hub offline; an empty private Hub cache; sockets that refuse to connect."""
    import huggingface_hub.constants as hub_constants

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cache = tmp_path_factory.mktemp("hub_cache")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))

    def refuse(*args, **kwargs):
        raise AssertionError(f"a test tried to open a network connection: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    yield
    torch.set_num_threads(threads)


def _tokenizer():
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = {c: i for i, c in enumerate(letters + [c + "</w>" for c in letters])}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return transformers.CLIPTokenizer(vocab=vocab, merges=[]), vocab


def _tiny_clip(seed: int, image_size: int = 32, projection_dim: int = 16):
    tokenizer, vocab = _tokenizer()
    torch.manual_seed(seed)
    text = dict(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=MAX_LEN,
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
    )
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=8,
    )
    config = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim)
    model = transformers.CLIPModel(config).eval()
    with torch.no_grad():
        model.logit_scale.fill_(2.0)  # exp = 7.39, not the default 2.6592 init, to see it used
    return model, tokenizer


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A tiny CLIP with tokenizer and a preprocessor config carrying non-default mean/std."""
    folder = tmp_path_factory.mktemp("tiny_clip")
    model, tokenizer = _tiny_clip(0)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({"image_mean": MEAN, "image_std": STD}))
    return folder


@pytest.fixture(scope="module")
def pick_dirs(tmp_path_factory):
    """PickScore's layout: weights without tokenizer in one folder, the processor in another."""
    model_dir = tmp_path_factory.mktemp("tiny_pick")
    proc_dir = tmp_path_factory.mktemp("tiny_pick_processor")
    model, tokenizer = _tiny_clip(1)
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(proc_dir)
    (proc_dir / "preprocessor_config.json").write_text(json.dumps({"image_mean": MEAN, "image_std": STD}))
    return model_dir, proc_dir


def _reference_features(folder, images, prompts, mean, std):
    """Independent computation: the saved model's features on hand-normalised 32x32 images."""
    model = transformers.CLIPModel.from_pretrained(folder, local_files_only=True).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    pixels = (images - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    tokens = tokenizer(prompts, padding=True, truncation=True, max_length=MAX_LEN, return_tensors="pt")
    with torch.no_grad():
        img = model.get_image_features(pixel_values=pixels)
        txt = model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
    img = img if isinstance(img, torch.Tensor) else img.pooler_output
    txt = txt if isinstance(txt, torch.Tensor) else txt.pooler_output
    return model, F.normalize(img, dim=-1), F.normalize(txt, dim=-1)


PROMPTS = ["a red circle", "two blue squares", "a green triangle"]


def _images(batch=3, size=32, seed=0):
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


# --- preprocessing ---------------------------------------------------------------------------------------


def test_preprocess_crops_the_centre_and_normalises():
    # 32 x 64: the shorter side already has the size, so no resampling; the crop keeps columns 16..47
    images = torch.full((1, 3, 32, 64), 0.1)
    images[..., 16:48] = 0.7
    out = clip_preprocess(images, 32, MEAN, STD)
    expected = (0.7 - torch.tensor(MEAN)) / torch.tensor(STD)
    assert out.shape == (1, 3, 32, 32)
    assert torch.allclose(out, expected.view(1, 3, 1, 1).expand_as(out), atol=1e-6)


def test_preprocess_resizes_shorter_side_keeping_constant_images_constant():
    images = torch.full((2, 3, 48, 80), 0.25, requires_grad=True)
    out = clip_preprocess(images, 32, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    expected = (0.25 - torch.tensor(OPENAI_CLIP_MEAN)) / torch.tensor(OPENAI_CLIP_STD)
    assert out.shape == (2, 3, 32, 32)
    assert torch.allclose(out, expected.view(1, 3, 1, 1).expand_as(out), atol=1e-5)
    out.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


# --- CLIP score --------------------------------------------------------------------------------------------


def test_clip_score_matches_hand_computation(clip_dir):
    reward = CLIPScoreReward.load(str(clip_dir))
    assert isinstance(reward, Reward) and reward.differentiable and reward.name == "clip"
    assert reward.embedder.mean == MEAN and reward.embedder.std == STD
    assert reward.embedder.normalisation_source.endswith("preprocessor_config.json")
    images = _images()
    _, img, txt = _reference_features(clip_dir, images, PROMPTS, MEAN, STD)
    cos = (img * txt).sum(-1)
    assert torch.allclose(reward(images, PROMPTS), cos, atol=1e-5)
    torchmetrics = CLIPScoreReward(reward.embedder, scale="torchmetrics")
    assert torch.allclose(torchmetrics(images, PROMPTS), 100 * cos.clamp(min=0), atol=1e-3)
    hessel = CLIPScoreReward(reward.embedder, scale="hessel")
    assert torch.allclose(hessel(images, PROMPTS), 2.5 * cos.clamp(min=0), atol=1e-5)
    with pytest.raises(ValueError, match="scale"):
        CLIPScoreReward(reward.embedder, scale="percent")  # type: ignore[arg-type]


def test_clip_defaults_to_openai_constants_without_preprocessor_config(tmp_path):
    model, tokenizer = _tiny_clip(0)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    reward = CLIPScoreReward.load(tmp_path)
    assert reward.embedder.mean == OPENAI_CLIP_MEAN and reward.embedder.std == OPENAI_CLIP_STD
    assert reward.embedder.normalisation_source == "openai-clip-defaults"
    images = _images()
    _, img, txt = _reference_features(tmp_path, images, PROMPTS, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    assert torch.allclose(reward(images, PROMPTS), (img * txt).sum(-1), atol=1e-5)


def test_clip_gradients_reach_pixels_not_weights(clip_dir):
    reward = CLIPScoreReward.load(clip_dir)
    require_differentiable(reward, "draft")
    images = _images(size=40).requires_grad_(True)  # 40 px: exercises the differentiable resize
    reward(images, PROMPTS).sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in reward.parameters())
    assert not reward.training
    reward.train()  # a trainer switching every module to training mode must not turn on dropout
    assert not reward.training and not reward.embedder.model.training


def test_clip_truncates_long_prompts_and_checks_inputs(clip_dir):
    reward = CLIPScoreReward.load(clip_dir)
    long = " ".join(["circle"] * 200)
    assert torch.isfinite(reward(_images(2), [long, "a"])).all()
    with pytest.raises(ValueError, match="2 images but 3 prompts"):
        reward(_images(2), PROMPTS)
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        reward(torch.rand(2, 32, 32), ["a", "b"])


def test_clip_dtype_and_device(clip_dir):
    full = CLIPScoreReward.load(clip_dir)
    half = CLIPScoreReward.load(clip_dir, device="cpu", dtype="bf16")
    assert half.embedder.dtype == torch.bfloat16 and half.embedder.device == torch.device("cpu")
    images = _images()
    out = half(images, PROMPTS)
    assert out.dtype == torch.float32 and out.device == images.device
    assert torch.allclose(out, full(images, PROMPTS), atol=0.05)
    with pytest.raises(ValueError, match="dtype"):
        CLIPScoreReward.load(clip_dir, dtype="int8")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_clip_on_cuda_moves_images_and_results(clip_dir):
    reward = CLIPScoreReward.load(clip_dir, device="cuda", dtype=torch.float16)
    images = _images().requires_grad_(True)
    out = reward(images, PROMPTS)
    assert out.device.type == "cpu" and torch.isfinite(out).all()
    out.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


# --- PickScore ---------------------------------------------------------------------------------------------


def test_pickscore_is_logit_scale_times_cosine(pick_dirs):
    model_dir, proc_dir = pick_dirs
    reward = PickScoreReward.load(model_dir, processor=proc_dir)
    assert reward.name == "pickscore" and reward.differentiable
    images = _images()
    model = transformers.CLIPModel.from_pretrained(model_dir, local_files_only=True).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(proc_dir, local_files_only=True)
    pixels = (images - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    tokens = tokenizer(PROMPTS, padding=True, truncation=True, max_length=MAX_LEN, return_tensors="pt")
    with torch.no_grad():
        img = model.get_image_features(pixel_values=pixels)
        txt = model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
    img = F.normalize(getattr(img, "pooler_output", img), dim=-1)
    txt = F.normalize(getattr(txt, "pooler_output", txt), dim=-1)
    expected = model.logit_scale.exp() * (img * txt).sum(-1)
    assert abs(model.logit_scale.exp().item() - 7.389) < 1e-2
    assert torch.allclose(reward(images, PROMPTS), expected, atol=1e-4)
    images.requires_grad_(True)
    reward(images, PROMPTS).sum().backward()
    assert images.grad.abs().sum() > 0
    assert all(p.grad is None for p in reward.parameters())


def test_pickscore_without_tokenizer_needs_the_processor(pick_dirs):
    model_dir, _ = pick_dirs
    # the default processor is a hub id, absent from the (empty) cache: a clear error, no download
    with pytest.raises(RewardWeightsError, match="laion/CLIP-ViT-H-14-laion2B-s32B-b79K") as info:
        PickScoreReward.load(model_dir)
    assert "huggingface-cli download" in str(info.value)


# --- aesthetic ---------------------------------------------------------------------------------------------


def _head_state(input_size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shapes = [(1024, input_size), (128, 1024), (64, 128), (16, 64), (1, 16)]
    state = {}
    for index, (out_f, in_f) in zip((0, 2, 4, 6, 7), shapes):
        state[f"layers.{index}.weight"] = torch.randn(out_f, in_f, generator=gen) / in_f**0.5
        state[f"layers.{index}.bias"] = torch.randn(out_f, generator=gen) * 0.1
    return state


def _head_by_hand(state, x):
    for index in (0, 2, 4, 6, 7):  # linear layers only: dropout is off in eval, no activations
        x = x @ state[f"layers.{index}.weight"].T + state[f"layers.{index}.bias"]
    return x[:, 0]


def test_aesthetic_head_layout_and_formats(tmp_path):
    state = _head_state(768)
    assert set(AestheticHead(768).state_dict()) == set(state)
    torch.save(state, tmp_path / "sac+logos+ava1-l14-linearMSE.pth")
    from safetensors.torch import save_file

    save_file(state, tmp_path / "head.safetensors")
    x = torch.randn(4, 768)
    for source in (tmp_path, tmp_path / "head.safetensors"):  # a folder holding the .pth, or a file
        head = load_aesthetic_head(source).eval()
        assert torch.allclose(head(x)[:, 0], _head_by_hand(state, x), atol=1e-4)
    bad = dict(state)
    del bad["layers.7.bias"]
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(RewardWeightsError, match=r"bad\.pth"):
        load_aesthetic_head(tmp_path / "bad.pth")


def test_aesthetic_reward_matches_hand_computation(clip_dir, tmp_path):
    state = _head_state(16, seed=3)
    torch.save(state, tmp_path / "head.pth")
    reward = AestheticReward.load(tmp_path / "head.pth", clip=clip_dir)
    assert reward.name == "aesthetic" and reward.differentiable
    images = _images()
    _, img, _ = _reference_features(clip_dir, images, PROMPTS, MEAN, STD)
    expected = _head_by_hand(state, img)
    assert torch.allclose(reward(images, PROMPTS), expected, atol=1e-4)
    assert torch.allclose(reward(images, ["", "", ""]), expected, atol=1e-4)  # prompt ignored
    images.requires_grad_(True)
    reward(images, PROMPTS).sum().backward()
    assert images.grad.abs().sum() > 0
    assert all(p.grad is None for p in reward.parameters())
    torch.save(_head_state(768), tmp_path / "l14.pth")
    with pytest.raises(ValueError, match="768-d"):
        AestheticReward.load(tmp_path / "l14.pth", clip=clip_dir)


# --- missing weights, no network ---------------------------------------------------------------------------


def test_missing_folder_names_the_path(tmp_path):
    missing = tmp_path / "nowhere" / "clip"
    with pytest.raises(RewardWeightsError, match="nowhere") as info:
        CLIPScoreReward.load(missing)
    assert isinstance(info.value, FileNotFoundError)
    assert "config.json" in str(info.value)


def test_folder_without_weights_lists_the_files(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(RewardWeightsError, match=r"model\.safetensors or pytorch_model\.bin") as info:
        CLIPScoreReward.load(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_uncached_hub_id_fails_without_network(monkeypatch):
    import huggingface_hub

    def no_download(*args, **kwargs):
        raise AssertionError("tried to download")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_download)
    with pytest.raises(RewardWeightsError) as info:
        load_external_reward("clip", "nobody/does-not-exist")
    message = str(info.value)
    assert "nobody/does-not-exist" in message and "huggingface-cli download nobody/does-not-exist" in message
    from huggingface_hub import constants

    assert constants.HF_HUB_CACHE in message
    with pytest.raises(RewardWeightsError, match="openai/clip-vit-large-patch14"):
        load_external_reward("clip")  # the default id is not in the empty cache either


def _fake_cache_entry(cache: Path, repo: str, commit: str) -> Path:
    """The Hub cache layout: models--org--name/{refs/main, snapshots/<commit>/}."""
    root = cache / ("models--" + repo.replace("/", "--"))
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    return root / "snapshots" / commit


def test_hub_id_resolves_from_the_local_cache(clip_dir):
    from huggingface_hub import constants

    snapshot = _fake_cache_entry(Path(constants.HF_HUB_CACHE), "tiny/clip", "0" * 40)
    shutil.copytree(clip_dir, snapshot)
    assert resolve_folder("tiny/clip", what="test", files=[("config.json",)]) == snapshot
    reward = load_external_reward("clip", "tiny/clip")
    assert torch.isfinite(reward(_images(1), ["a"])).all()


def test_factory_names_and_errors(clip_dir, tmp_path):
    assert isinstance(
        load_external_reward("CLIP-score", str(clip_dir), scale="torchmetrics"), CLIPScoreReward
    )
    with pytest.raises(ValueError, match="unknown external reward"):
        load_external_reward("vqascore")
    with pytest.raises(RewardWeightsError, match="improved-aesthetic-predictor"):
        load_external_reward("aesthetic")


def test_hub_offline_restores_the_flag(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with hub_offline():
        assert constants.HF_HUB_OFFLINE is True
    assert constants.HF_HUB_OFFLINE is False and "HF_HUB_OFFLINE" not in os.environ


# --- package rewards (fake modules) ------------------------------------------------------------------------


def _fake_imagereward(calls):
    class FakeModel:
        def __init__(self):
            self.evaluated = False

        def eval(self):
            self.evaluated = True
            return self

        def requires_grad_(self, flag):
            calls.append(("requires_grad_", flag))
            return self

        def score(self, prompt, images):
            from huggingface_hub import constants

            calls.append(("score", prompt, [im.size for im in images], constants.HF_HUB_OFFLINE))
            values = [len(prompt) + im.getpixel((0, 0))[0] / 255 for im in images]
            return values[0] if len(values) == 1 else values  # the package returns a float for one image

    module = types.ModuleType("ImageReward")

    def load(name, device="cpu", download_root=None):
        calls.append(("load", name, device, download_root))
        return FakeModel()

    module.load = load
    return module


def test_imagereward_adapter_with_fake_package(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setitem(sys.modules, "ImageReward", _fake_imagereward(calls))
    (tmp_path / "ImageReward.pt").write_bytes(b"")
    (tmp_path / "med_config.json").write_text("{}")
    reward = load_external_reward("imagereward", tmp_path, device="cpu")
    assert isinstance(reward, ImageRewardReward) and not reward.differentiable
    assert calls[0] == ("load", str(tmp_path / "ImageReward.pt"), "cpu", str(tmp_path))
    images = torch.zeros(3, 3, 8, 8)
    images[1, 0] = 1.0
    out = reward(images, ["ab", "ab", "abcd"])
    assert torch.allclose(out, torch.tensor([2.0, 3.0, 4.0]))
    scores = [c for c in calls if c[0] == "score"]
    assert scores == [("score", "ab", [(8, 8), (8, 8)], True), ("score", "abcd", [(8, 8)], True)]
    with pytest.raises(NotDifferentiableError):
        require_differentiable(reward, "draft")
    with pytest.raises(ValueError, match="dtype"):
        ImageRewardReward.load(tmp_path, dtype="bf16")


def test_imagereward_missing_files(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ImageReward", _fake_imagereward([]))
    (tmp_path / "ImageReward.pt").write_bytes(b"")
    with pytest.raises(RewardWeightsError, match=r"med_config\.json"):
        ImageRewardReward.load(tmp_path)
    with pytest.raises(RewardWeightsError, match=r"med_config\.json"):
        ImageRewardReward.load(tmp_path / "ImageReward.pt")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.cache/ImageReward, empty Hub cache
    with pytest.raises(RewardWeightsError, match="THUDM/ImageReward") as info:
        ImageRewardReward.load()
    assert "~/.cache/ImageReward" in str(info.value) and "ImageReward.pt" in str(info.value)


def test_hpsv2_adapter_with_fake_package(monkeypatch, tmp_path):
    calls = []
    hpsv2 = types.ModuleType("hpsv2")
    img_score = types.ModuleType("hpsv2.img_score")

    def score(images, prompt, hps_version="v2.0"):
        calls.append(("score", prompt, len(images), hps_version))
        return [0.25] * len(images)

    def score_with_checkpoint(images, prompt, cp=None, hps_version="v2.0"):
        calls.append(("img_score", prompt, len(images), cp, hps_version))
        return [0.5] * len(images)

    hpsv2.score = score
    img_score.score = score_with_checkpoint
    monkeypatch.setitem(sys.modules, "hpsv2", hpsv2)
    monkeypatch.setitem(sys.modules, "hpsv2.img_score", img_score)

    # default: the checkpoint must be in the (empty) Hub cache
    with pytest.raises(RewardWeightsError, match=r"xswu/HPSv2/HPS_v2\.1_compressed\.pt"):
        load_external_reward("hpsv2")
    with pytest.raises(RewardWeightsError, match=r"nope\.pt"):
        HPSv2Reward.load(tmp_path / "nope.pt")

    from huggingface_hub import constants

    folder = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(folder))
    snapshot = _fake_cache_entry(folder, "xswu/HPSv2", "1" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "HPS_v2.1_compressed.pt").write_bytes(b"")
    reward = load_external_reward("hpsv2")
    assert not reward.differentiable and reward.name == "hpsv2"
    out = reward(torch.rand(3, 3, 8, 8), ["x", "y", "x"])
    assert torch.allclose(out, torch.full((3,), 0.25))
    assert calls == [("score", "x", 2, "v2.1"), ("score", "y", 1, "v2.1")]

    checkpoint = tmp_path / "HPS_v2_compressed.pt"
    checkpoint.write_bytes(b"")
    local = HPSv2Reward.load(checkpoint, hps_version="v2.0")
    assert torch.allclose(local(torch.rand(1, 3, 8, 8), ["z"]), torch.tensor([0.5]))
    assert calls[-1] == ("img_score", "z", 1, str(checkpoint), "v2.0")


@pytest.mark.parametrize(
    ("name", "module", "pip"), [("imagereward", "ImageReward", "image-reward"), ("hpsv2", "hpsv2", "hpsv2")]
)
def test_missing_package_says_how_to_install(monkeypatch, tmp_path, name, module, pip):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    with pytest.raises(MissingRewardPackageError, match=f"pip install '{pip}'"):
        load_external_reward(name, tmp_path)


def test_missing_transformers_says_how_to_install(monkeypatch, clip_dir):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(MissingRewardPackageError, match="pip install 'transformers"):
        CLIPScoreReward.load(clip_dir)


# --- damaged or wrong-kind weights -------------------------------------------------------------------------


def test_a_folder_of_another_architecture_is_not_loaded_as_clip(tmp_path):
    """transformers loads a BERT folder into a CLIPModel with random weights and a warning; refuse it."""
    tokenizer, _ = _tokenizer()
    config = transformers.BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16
    )
    transformers.BertModel(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(RewardWeightsError, match=r"holds a 'bert' model.*not a CLIP model"):
        load_external_reward("clip", tmp_path)


def test_clip_weights_lacking_tensors_or_corrupt_are_refused(clip_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    partial = tmp_path / "partial"
    shutil.copytree(clip_dir, partial)
    state = load_file(partial / "model.safetensors")
    save_file(
        {k: v for k, v in state.items() if not k.startswith("visual_projection")},
        partial / "model.safetensors",
    )
    with pytest.raises(RewardWeightsError, match=r"lack 1 of CLIP's tensors.*visual_projection"):
        CLIPScoreReward.load(partial)
    corrupt = tmp_path / "corrupt"
    shutil.copytree(clip_dir, corrupt)
    (corrupt / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(RewardWeightsError, match=r"corrupt.*SafetensorError"):
        CLIPScoreReward.load(corrupt)


def test_an_aesthetic_head_that_is_no_checkpoint_names_the_file(tmp_path):
    for name in ("head.pth", "head.safetensors"):
        (tmp_path / name).write_bytes(b"this is not a checkpoint")
        with pytest.raises(RewardWeightsError, match=rf"{name} is not a readable \.pth/\.safetensors"):
            load_aesthetic_head(tmp_path / name)
