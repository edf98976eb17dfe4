"""ReFL's pre-training data from a preference store (`pretrain_data=STORE`): the preferred images with
their prompts are what the pre-training loss sees, drawn reproducibly; tiny models and pipelines."""

from __future__ import annotations

import pytest
import torch

import diffalign.align.backprop_losses as losses_module
from diffalign.align.backprop_config import BackpropConfig
from diffalign.align.dpo import PreferenceDataError
from diffalign.align.pretrain_data import StoreData, WorldData, pretrain_source
from diffalign.align.reward_backprop import train_backprop
from diffalign.align.tracking import read_metrics
from tests.align.backprop_helpers import DiffRedness, bp_config
from tests.align.helpers import CANVAS, store_with_preferences


def _as_u8(images: torch.Tensor) -> list[bytes]:
    return [(x * 255).round().to(torch.uint8).numpy().tobytes() for x in images]


def test_store_source_draws_preferred_images_with_their_prompts(tmp_path):
    preferred = store_with_preferences(tmp_path / "p.db")
    data = pretrain_source(str(tmp_path / "p.db"), CANVAS)
    assert isinstance(data, StoreData) and len(data) == 4  # the 2 tied pairs give nothing
    images, prompts = data.draw(12, torch.Generator().manual_seed(0))
    assert images.shape == (12, 3, CANVAS, CANVAS) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1
    for key, prompt in zip(_as_u8(images), prompts):
        assert preferred[key] == prompt  # a preferred image, with its own prompt
    again, _ = data.draw(12, torch.Generator().manual_seed(0))
    assert torch.equal(images, again)
    assert isinstance(pretrain_source("world", CANVAS), WorldData)


def test_bad_pretrain_data_is_refused_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing\.db"):
        pretrain_source(str(tmp_path / "missing.db"), CANVAS)
    store_with_preferences(tmp_path / "ties.db", n=2, ties=2)
    with pytest.raises(PreferenceDataError, match=r"pretrain_data=.*ties\.db"):
        pretrain_source(str(tmp_path / "ties.db"), CANVAS)
    with pytest.raises(ValueError, match="pretrain_data"):
        BackpropConfig(pretrain_data=" ")


def test_refl_trains_on_the_stores_images_and_resumes(tmp_path, eps_model_dir, monkeypatch):
    preferred = store_with_preferences(tmp_path / "p.db")
    seen = []
    original = losses_module.pretrain_loss

    def recording(model, unet, images, prompts, noise, t):
        seen.append((images.detach().cpu(), list(prompts)))
        return original(model, unet, images, prompts, noise, t)

    monkeypatch.setattr(losses_module, "pretrain_loss", recording)
    cfg = bp_config(eps_model_dir, "refl", steps=2, pretrain_data=str(tmp_path / "p.db"), checkpoint_every=1)
    train_backprop(cfg, tmp_path / "run", reward=DiffRedness())
    assert len(seen) == 2 and all(len(p) == 4 for _, p in seen)
    for images, prompts in seen:
        for key, prompt in zip(_as_u8(images), prompts):
            assert preferred[key] == prompt
    lines = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert all(line["pretrain_loss"] > 0 for line in lines)
    train_backprop(cfg, tmp_path / "split", stop_after=1, reward=DiffRedness())
    train_backprop(cfg, tmp_path / "split", resume=True, reward=DiffRedness())
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds_per_step"} for r in rows]  # noqa: E731
    assert strip(read_metrics(tmp_path / "split" / "metrics.jsonl")) == strip(lines)
