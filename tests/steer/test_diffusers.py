"""Steering runs on the diffusers adapters through the `DiffusionModel` interface alone."""

from __future__ import annotations

import pytest
import torch

from diffalign.diffusion.sampling import SamplerConfig
from diffalign.models.registry import load_model
from diffalign.steer import FKConfig, GuidanceConfig, SVDDConfig, run_method
from tests.models.tiny_pipelines import build_sd, build_sd3
from tests.steer.helpers import Brightness

PROMPTS = ["a red circle", "a blue square"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("steer_pipelines")
    return {"sd": build_sd(root / "sd"), "sd3": build_sd3(root / "sd3")}


@pytest.mark.parametrize("family", ["sd", "sd3"])
def test_fk_svdd_and_guidance_on_diffusers_adapters(folders, family):
    model = load_model(str(folders[family]))
    flow = model.prediction_type == "flow"
    sampler = SamplerConfig(sampler="flow_sde" if flow else "ddim", num_steps=3, eta=1.0, guidance_scale=2.0)
    for method, config in [
        ("fk", FKConfig(num_particles=2, resample_every=1, resample_start=0)),
        ("svdd", SVDDConfig(num_candidates=2)),
        ("guidance", GuidanceConfig(scale=0.1)),
    ]:
        result = run_method(method, model, PROMPTS, Brightness(), sampler, config)
        assert result.images.shape[0] == 2 and torch.isfinite(result.images).all()
        assert torch.allclose(result.rewards, Brightness()(result.images, PROMPTS), atol=1e-5)
    assert result.usage.grad_nfe == result.usage.nfe == 2 * 3 * 2  # guidance: 2 prompts, 3 steps, CFG
