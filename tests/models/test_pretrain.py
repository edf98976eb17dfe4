import pytest
import torch

from diffalign.models.pretrain import (
    NonFiniteLossError,
    PretrainConfig,
    latest_checkpoint,
    learning_rate,
    pretrain,
)

TINY_ARCH = "unet-xs"


def _config(**kw):
    base = dict(
        parameterization="flow",
        architecture=TINY_ARCH,
        steps=6,
        batch_size=8,
        log_every=1,
        checkpoint_every=3,
        device="cpu",
        warmup_steps=2,
    )
    base.update(kw)
    return PretrainConfig(**base)


def _losses(path):
    import json

    return [json.loads(line)["loss"] for line in (path / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("parameterization", ["epsilon", "flow"])
def test_resume_matches_uninterrupted_run(tmp_path, parameterization):
    config = _config(parameterization=parameterization)
    whole = pretrain(config, tmp_path / "whole")
    pretrain(config, tmp_path / "parts", stop_after=3)
    assert latest_checkpoint(tmp_path / "parts").name == "step-0000003"
    resumed = pretrain(config, tmp_path / "parts", resume=True)
    assert _losses(tmp_path / "whole") == _losses(tmp_path / "parts")
    for a, b in zip(whole.unet.state_dict().values(), resumed.unet.state_dict().values()):
        assert torch.equal(a, b)
    assert (tmp_path / "whole" / "model" / "diffalign_model.json").is_file()


def test_training_changes_parameters_and_reduces_loss(tmp_path):
    config = _config(steps=30, lr=2e-3, warmup_steps=1, checkpoint_every=0, batch_size=16, ema_decay=0.5)
    model = pretrain(config, tmp_path / "run")
    losses = _losses(tmp_path / "run")
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    fresh = pretrain(_config(steps=1, checkpoint_every=0), tmp_path / "fresh")
    changed = [not torch.equal(a, b) for a, b in zip(model.unet.parameters(), fresh.unet.parameters())]
    assert all(changed)


def test_nan_stops_and_keeps_last_good_checkpoint(tmp_path):
    config = _config(
        steps=8,
        lr=1e30,
        lr_schedule="constant",
        warmup_steps=0,
        grad_clip=0.0,
        checkpoint_every=1,
        log_every=1,
    )
    with pytest.raises(NonFiniteLossError, match="last good checkpoint"):
        pretrain(config, tmp_path / "run")
    ckpt = latest_checkpoint(tmp_path / "run")
    assert ckpt is not None
    state = torch.load(ckpt / "state.pt", weights_only=False)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_resume_refuses_a_changed_config(tmp_path):
    pretrain(_config(), tmp_path / "run", stop_after=3)
    with pytest.raises(ValueError, match="config differs"):
        pretrain(_config(lr=1.0), tmp_path / "run", resume=True)
    with pytest.raises(FileNotFoundError):
        pretrain(_config(), tmp_path / "empty", resume=True)


def test_learning_rate_schedule():
    cfg = PretrainConfig(lr=1.0, warmup_steps=10, steps=110, lr_min_ratio=0.1)
    assert learning_rate(0, cfg) == pytest.approx(0.1)
    assert learning_rate(10, cfg) == pytest.approx(1.0)
    assert learning_rate(110, cfg) == pytest.approx(0.1)
    const = PretrainConfig(lr=1.0, warmup_steps=10, lr_schedule="constant")
    assert learning_rate(1000, const) == 1.0


@pytest.mark.parametrize(
    "field, value",
    [
        ("architecture", "unet-zz"),  # was a KeyError
        ("steps", 0),  # wrote an untrained model as if trained
        ("batch_size", 0),  # failed in torch.multinomial
        ("lr_schedule", "linear"),  # failed only when the warm-up ended
        ("log_every", 0),  # a ZeroDivisionError after the first step
        ("lr", float("nan")),
        ("ema_decay", 1.0),
        ("canvas_size", 30),  # the UNet cannot halve it twice
        ("snapshot_steps", [10]),  # beyond steps=6: silently never written
    ],
)
def test_a_config_that_cannot_run_is_refused_before_anything_is_written(tmp_path, field, value):
    with pytest.raises(ValueError, match=field):
        pretrain(_config(**{field: value}), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_the_command_names_a_bad_option_with_exit_code_2(tmp_path):
    from typer.testing import CliRunner

    from diffalign.cli import app

    for option in (["--architecture", "unet-zz"], ["--steps", "0"], ["--batch-size", "0"]):
        result = CliRunner().invoke(
            app, ["pretrain", "--out", str(tmp_path / "run"), "--device", "cpu", *option]
        )
        assert result.exit_code == 2, result.output
        assert option[0].removeprefix("--").replace("-", "_") in result.output
    assert not (tmp_path / "run").exists()
