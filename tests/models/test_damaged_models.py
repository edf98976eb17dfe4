"""Damaged model folders, checkpoints and pipelines are clear errors naming them, not tracebacks."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

from diffalign.cli import app
from diffalign.models.registry import DamagedModelError, UnsupportedModelError, load_model
from diffalign.models.tokenizer import ShapesTokenizer, UnknownWordError
from tests.align.helpers import save_tiny_model
from tests.align.test_run_checkpoints import make_run
from tests.models.tiny_pipelines import build_sd, build_sd3, build_sdxl

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model", "epsilon")


def _damage(tiny, tmp_path, how: str):
    folder = tmp_path / how
    shutil.copytree(tiny, folder)
    weights = folder / "diffusion_pytorch_model.safetensors"
    if how == "no-config":
        (folder / "config.json").unlink()
    elif how == "no-weights":
        weights.unlink()
    elif how == "corrupt-weights":
        weights.write_bytes(weights.read_bytes()[:500])
    elif how == "bad-json":
        (folder / "diffalign_model.json").write_text("{not json")
    elif how == "unknown-schedule":
        info = json.loads((folder / "diffalign_model.json").read_text())
        info["schedule"]["type"] = "KarrasSchedule"
        (folder / "diffalign_model.json").write_text(json.dumps(info))
    elif how == "other-architecture":
        config = json.loads((folder / "config.json").read_text())
        config["block_channels"] = [32, 64, 128]
        (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(
    "how, message",
    [
        ("no-config", "has no config.json"),
        ("no-weights", "has no diffusion_pytorch_model.safetensors"),
        ("corrupt-weights", "diffusion_pytorch_model.safetensors"),
        ("bad-json", r"diffalign_model.json: not valid JSON"),
        ("unknown-schedule", "unknown schedule type 'KarrasSchedule'"),
        ("other-architecture", "expected shape"),
    ],
)
def test_a_damaged_tiny_model_folder_is_named(tiny, tmp_path, how, message):
    folder = _damage(tiny, tmp_path, how)
    # these were OSError, JSONDecodeError, ValueError or TypeError tracebacks on the command line
    with pytest.raises(DamagedModelError, match=message) as error:
        load_model(str(folder))
    assert f"--model {str(folder)!r}" in str(error.value)


def test_the_cli_answers_a_damaged_folder_with_exit_code_2(tiny, tmp_path):
    folder = _damage(tiny, tmp_path, "corrupt-weights")
    args = ["sample", "--model", str(folder), "--prompt", "a circle", "-n", "1", "--steps", "1"]
    result = CliRunner().invoke(app, [*args, "--device", "cpu", "--out", str(tmp_path / "grid.png")])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "diffusion_pytorch_model.safetensors" in result.output


def test_a_home_relative_spec_is_expanded(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    shutil.copytree(tiny, tmp_path / "my model é")
    # `--model=~/x` reaches the program unexpanded; it used to be "no such folder"
    model = load_model("~/my model é")
    assert tuple(model.latent_shape) == (3, 16, 16)


def test_damaged_checkpoints_and_a_run_without_its_model(tmp_path):
    run, checkpoint, _ = make_run(tmp_path)
    # a run folder with checkpoints but no model/ (interrupted): the error names the latest checkpoint
    with pytest.raises(FileNotFoundError, match=r"latest checkpoint is .*step-0000003"):
        load_model(str(run))
    weights = checkpoint / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:300])
    with pytest.raises(DamagedModelError, match="cannot load this checkpoint"):  # was a SafetensorError
        load_model(str(checkpoint))
    (run / "config.json").write_text("{oops")
    with pytest.raises(DamagedModelError, match="a checkpoint of the run"):  # was a JSONDecodeError
        load_model(str(checkpoint))


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    root = tmp_path_factory.mktemp("damaged_pipelines")
    return {"sd": build_sd(root / "sd"), "sd3": build_sd3(root / "sd3"), "sdxl": build_sdxl(root / "sdxl")}


def _copy(folder, tmp_path, name):
    return shutil.copytree(folder, tmp_path / name)


def _edit_json(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_damaged_pipeline_folders_are_named(pipelines, tmp_path):
    no_vae = _copy(pipelines["sd"], tmp_path, "no-vae")
    shutil.rmtree(no_vae / "vae")
    with pytest.raises(DamagedModelError, match=r"names components with no subfolder: vae \(AutoencoderKL\)"):
        load_model(str(no_vae))  # was diffusers' OSError naming no component
    # a safety checker listed in the index but deleted to save space is fine: it is never loaded
    no_checker = _copy(pipelines["sd"], tmp_path, "no-safety-checker")
    _edit_json(
        no_checker / "model_index.json", safety_checker=["stable_diffusion", "StableDiffusionSafetyChecker"]
    )
    assert load_model(str(no_checker)).prediction_type == "epsilon"
    unknown = _copy(pipelines["sd"], tmp_path, "unknown-class")
    _edit_json(unknown / "model_index.json", unet=["diffusers", "NoSuchUNet"])
    with pytest.raises(DamagedModelError, match="NoSuchUNet"):  # was a ValueError traceback
        load_model(str(unknown))
    corrupt = _copy(pipelines["sd"], tmp_path, "corrupt-unet")
    weights = next((corrupt / "unet").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:500])
    with pytest.raises(DamagedModelError, match="cannot load the StableDiffusionPipeline"):
        load_model(str(corrupt))
    # diffusers accepts an SDXL pipeline without its second text encoder (an optional component); the
    # adapter then failed with an AttributeError on None
    no_encoder = _copy(pipelines["sdxl"], tmp_path, "no-text-encoder-2")
    shutil.rmtree(no_encoder / "text_encoder_2")
    _edit_json(no_encoder / "model_index.json", text_encoder_2=[None, None])
    with pytest.raises(DamagedModelError, match="the pipeline has no text_encoder_2 "):
        load_model(str(no_encoder))
    index = _copy(pipelines["sd"], tmp_path, "bad-index")
    (index / "model_index.json").write_text("[1, 2")
    with pytest.raises(DamagedModelError, match="not a readable diffusers model index"):
        load_model(str(index))


def test_a_scheduler_of_another_family_is_refused(pipelines, tmp_path):
    folder = _copy(pipelines["sd3"], tmp_path, "sd3-with-ddim")
    _edit_json(folder / "scheduler" / "scheduler_config.json", _class_name="DDIMScheduler")
    _edit_json(folder / "model_index.json", scheduler=["diffusers", "DDIMScheduler"])
    # an SD3 transformer used to be sampled silently as an epsilon model
    with pytest.raises(
        UnsupportedModelError, match="DDIMScheduler \\(epsilon\\): its transformer predicts flow"
    ):
        load_model(str(folder))


def test_the_tokenizer_drops_no_word_silently():
    tokenizer = ShapesTokenizer()
    assert tokenizer.encode("A red-circle!") == tokenizer.encode("a red circle")
    assert tokenizer.encode("“a circle”") == tokenizer.encode("a circle")  # typographic quotes separate
    for prompt, word in [("a circle é", "é"), ("a circlé", "circlé"), ("a circle 🐱", "🐱")]:
        # non-ASCII letters and symbols used to vanish: "a circle é" was read as "a circle"
        with pytest.raises(UnknownWordError, match=f"unknown word '{word}'"):
            tokenizer.encode(prompt)
