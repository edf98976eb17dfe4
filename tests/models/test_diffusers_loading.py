"""Finding pipelines (folders, the local Hugging Face cache, clear errors) and reading their schedules."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
from huggingface_hub import constants

from diffalign.diffusion.schedules import FlowSchedule
from diffalign.models.diffusers_adapters import StableDiffusionAdapter
from diffalign.models.diffusers_adapters.scheduling import UnsupportedScheduleError, schedule_from_scheduler
from diffalign.models.registry import UnsupportedModelError, load_model, resolve_model_folder
from tests.models.tiny_pipelines import build_sd

torch.set_num_threads(1)


def test_missing_folder_and_uncached_id_are_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        load_model(str(tmp_path / "nowhere" / "sd"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError, match=r"'someone/not-cached'.*local cache.*nothing is downloaded"):
        load_model("someone/not-cached")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no diffalign_model\.json or model_index\.json"):
        load_model(str(tmp_path / "empty"))


def test_a_repository_in_the_local_cache_loads_by_id_and_a_run_folder_by_its_model(tmp_path, monkeypatch):
    # the hub cache layout: models--owner--name/{refs/main, snapshots/<commit>/...}
    repo = tmp_path / "hub" / "models--tiny--sd"
    build_sd(repo / "snapshots" / "0123abcd")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model_folder("tiny/sd") == repo / "snapshots" / "0123abcd"
    assert isinstance(load_model("tiny/sd"), StableDiffusionAdapter)
    shutil.copytree(repo / "snapshots" / "0123abcd", tmp_path / "run" / "model")
    assert resolve_model_folder(str(tmp_path / "run")) == tmp_path / "run" / "model"


def test_a_pipeline_of_another_family_is_refused_by_name(tmp_path):
    (tmp_path / "flux").mkdir()
    (tmp_path / "flux" / "model_index.json").write_text('{"_class_name": "FluxPipeline"}')
    with pytest.raises(UnsupportedModelError, match="FluxPipeline pipelines have no adapter; supported: "):
        load_model(str(tmp_path / "flux"))


@pytest.mark.parametrize(
    "config, message",
    [
        ({"rescale_betas_zero_snr": True}, "rescale_betas_zero_snr"),
        ({"trained_betas": [0.1, 0.2]}, "trained_betas"),
        ({"beta_schedule": "sigmoid"}, "sigmoid"),
        ({"prediction_type": "sample"}, "prediction_type 'sample'"),
    ],
)
def test_ddpm_scheduler_options_we_cannot_represent_are_refused(config, message):
    with pytest.raises(UnsupportedScheduleError, match=message):
        schedule_from_scheduler("DDIMScheduler", config, image_seq_len=64)


def test_flow_dynamic_shifting_is_the_static_shift_exp_mu_at_the_resolution():
    config = dict(use_dynamic_shifting=True, base_image_seq_len=256, max_image_seq_len=4096)
    config.update(base_shift=0.5, max_shift=1.15)
    kind, schedule = schedule_from_scheduler("FlowMatchEulerDiscreteScheduler", config, image_seq_len=4096)
    assert kind == "flow" and math.isclose(schedule.shift, math.exp(1.15))
    _, schedule = schedule_from_scheduler("FlowMatchEulerDiscreteScheduler", config, image_seq_len=256)
    assert math.isclose(schedule.shift, math.exp(0.5))
    with pytest.raises(UnsupportedScheduleError, match="use_karras_sigmas"):
        schedule_from_scheduler("FlowMatchEulerDiscreteScheduler", {"use_karras_sigmas": True}, 64)
    # diffusers' own exponential time shift at mu equals FlowSchedule's shift exp(mu)
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    t = torch.linspace(0.05, 0.95, 7, dtype=torch.float64)
    theirs = torch.as_tensor(scheduler.time_shift(0.8, 1.0, t.numpy()))
    torch.testing.assert_close(FlowSchedule(shift=math.exp(0.8)).shift_time(t), theirs)
