"""Configs from YAML files and key=value overrides on inputs beyond the happy path (`align.config_io`,
`cli.align.load_command_config`): bad files, YAML 1.1 surprises, where an error points, and run
folders left behind by a config that fails once the run has begun."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from diffalign.align.backprop_config import BackpropConfig
from diffalign.align.config_io import ConfigError, load_config, parse_overrides
from diffalign.align.dpo import DPOConfig
from diffalign.align.nft_config import NFTConfig
from diffalign.align.online_dpo import OnlineDPOConfig
from diffalign.align.pg_config import PGConfig
from diffalign.align.runtime import RuntimeConfig
from diffalign.align.spin import SPINConfig
from diffalign.cli.align import app, load_command_config, run_reward_trainer


def _yaml(tmp_path: Path, content: str | bytes, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return path


def test_a_file_that_is_not_utf8_is_a_config_error_naming_file_and_line(tmp_path):
    path = _yaml(tmp_path, "steps: 3\nmodel: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"cfg\.yaml, line 2: not UTF-8"):
        load_config(DPOConfig, path)
    utf16 = _yaml(tmp_path, "steps: 3\n".encode("utf-16"), "utf16.yaml")  # with its byte-order mark
    assert load_config(DPOConfig, utf16).steps == 3


def test_odd_keys_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown DPOConfig field\(s\) \['1'\]"):
        load_config(DPOConfig, _yaml(tmp_path, "1: 2\n"))
    with pytest.raises(ConfigError, match=r"duplicate key 'steps' \(first on line 1\)"):
        load_config(DPOConfig, _yaml(tmp_path, "steps: 1\nlr: 1e-5\nsteps: 2\n"))
    with pytest.raises(ConfigError, match="duplicate key 'seed'"):
        load_config(DPOConfig, _yaml(tmp_path, "runtime:\n  seed: 1\n  seed: 2\n"))
    with pytest.raises(ConfigError, match="empty name"):
        load_config(DPOConfig, None, ["runtime..seed=1"])


def test_errors_point_at_the_line_or_the_override_and_suggest_the_key(tmp_path):
    path = _yaml(tmp_path, "lr: 1e-5\nruntime:\n  device: cpu\n  sed: 1\n")
    with pytest.raises(ConfigError, match=r"cfg\.yaml, line 4: .*'runtime\.sed'.*did you mean 'seed'"):
        load_config(DPOConfig, path)
    with pytest.raises(ConfigError, match=r"cfg\.yaml, line 2: DPOConfig: steps must be >= 1"):
        load_config(DPOConfig, _yaml(tmp_path, "lr: 1e-5\nsteps: 0\n"))
    # the bad value came from the override, not from the file that also sets the key
    with pytest.raises(ConfigError, match=r"^override 'steps=abc': steps: expected an integer"):
        load_config(DPOConfig, _yaml(tmp_path, "steps: 5\n"), ["steps=abc"])
    with pytest.raises(ConfigError, match="did you mean 'beta'"):
        load_config(DPOConfig, None, ["betta=3"])


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf", "nan", "'inf'"])
def test_numbers_must_be_finite(tmp_path, value):
    with pytest.raises(ConfigError, match="lr: expected a finite number"):
        load_config(DPOConfig, _yaml(tmp_path, f"lr: {value}\n"))
    with pytest.raises(ConfigError, match="grad_clip: expected a finite number"):
        load_config(PGConfig, None, [f"grad_clip={value}"])


def test_numbers_mean_what_they_look_like(tmp_path):
    # YAML 1.1 reads 010 as octal 8, 1:30 as the base-60 number 90, and 1e3 as text
    assert load_config(DPOConfig, None, ["runtime.seed=010"]).runtime.seed == 10
    with pytest.raises(ConfigError, match=r"runtime\.seed: expected an integer, got '1:30'"):
        load_config(DPOConfig, None, ["runtime.seed=1:30"])
    cfg = load_config(DPOConfig, _yaml(tmp_path, "steps: 1e3\nbatch_size: 8.0\nlr: 1e-4\n"))
    assert (cfg.steps, cfg.batch_size, cfg.lr) == (1000, 8, 1e-4)
    assert isinstance(cfg.steps, int) and isinstance(cfg.batch_size, int)
    with pytest.raises(ConfigError, match=r"steps: expected an integer, got 10\.5"):
        load_config(DPOConfig, None, ["steps=10.5"])
    assert load_config(DPOConfig, None, ["steps=0x10"]).steps == 16


def test_text_fields_take_an_override_as_written():
    cases = {"2024-05-01": "2024-05-01", "123": "123", "yes": "yes", "runs/a #1": "runs/a #1", "@x": "@x"}
    for raw, expected in cases.items():
        assert load_config(DPOConfig, None, [f"model={raw}"]).model == expected
    assert load_config(DPOConfig, None, ["model='quoted'"]).model == "quoted"
    assert load_config(BackpropConfig, None, ["reward_device=null"]).reward_device is None
    assert load_config(OnlineDPOConfig, None, ["prompts=~", "dpo.model=007"]).dpo.model == "007"
    # without a config class the values stay YAML (`steer --set`, `demo --set`)
    assert parse_overrides(["a=010", "b=1e-3"]) == {"a": 10, "b": 1e-3}


def test_command_options_are_taken_as_given():
    config = load_command_config(DPOConfig, None, ["steps=2"], {"model": "2024-05-01", "method": "kto"})
    assert (config.model, config.method, config.steps) == ("2024-05-01", "kto", 2)
    config = load_command_config(PGConfig, None, [], {"prompts": "my prompts: v2.txt", "reward": None})
    assert config.prompts == "my prompts: v2.txt" and config.reward == "shapes:faithfulness"


def test_list_fields_take_commas_and_check_their_length(tmp_path):
    for raw in ("0.5,1.0", "(0.5, 1.0)", "[0.5,1.0]"):
        assert load_config(DPOConfig, None, [f"timestep_range={raw}"]).timestep_range == (0.5, 1.0)
    with pytest.raises(ConfigError, match=r"truncation_range: expected 2 values, got 3"):
        load_config(BackpropConfig, None, ["truncation_range=1,2,3"])
    with pytest.raises(ConfigError, match=r"cfg\.yaml, line 1: timestep_range\[1\]: expected a number"):
        load_config(DPOConfig, _yaml(tmp_path, "timestep_range: [0.1, high]\n"))


def test_an_empty_section_keeps_its_defaults(tmp_path):
    path = _yaml(tmp_path, "steps: 4\nruntime:\n  # seed: 3\npipeline:\n")
    cfg = load_config(DPOConfig, path)
    assert cfg.steps == 4 and cfg.runtime.seed == 0 and cfg.pipeline.dtype == "float32"


def test_the_cli_reports_a_bad_file_with_exit_code_2(tmp_path):
    path = _yaml(tmp_path, b"epochs: 1\nmodel: caf\xe9\n")
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["grpo", "--out", str(out), "--config", str(path)])
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "line 2: not UTF-8" in result.output and not out.exists()


def _failing_train(out: Path):
    def train() -> None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text("{}")
        raise ValueError("an epoch's pairs do not divide the optimiser step")

    return train


def test_a_run_folder_begun_by_a_config_that_cannot_run_is_removed(tmp_path):
    out = tmp_path / "runs" / "grpo"
    with pytest.raises(typer.Exit) as exit_info:
        run_reward_trainer(out, "cpu", _failing_train(out), lambda last: "")
    assert exit_info.value.exit_code == 2
    assert not out.exists()  # a rerun with a fixed config may use the same folder
    # a folder that existed before, or that holds training already, is kept
    existing = tmp_path / "existing"
    existing.mkdir()
    with pytest.raises(typer.Exit):
        run_reward_trainer(existing, "cpu", _failing_train(existing), lambda last: "")
    assert (existing / "config.json").is_file()
    trained = tmp_path / "trained"

    def train() -> None:
        trained.mkdir()
        (trained / "config.json").write_text("{}")
        (trained / "metrics.jsonl").write_text('{"step": 1}\n')
        raise ValueError("late")

    with pytest.raises(typer.Exit):
        run_reward_trainer(trained, "cpu", train, lambda last: "")
    assert (trained / "metrics.jsonl").is_file()


@pytest.mark.parametrize(
    "cls", [DPOConfig, PGConfig, NFTConfig, BackpropConfig, RuntimeConfig, OnlineDPOConfig, SPINConfig]
)
def test_every_config_field_is_documented(cls):
    documented = set(re.findall(r"^ {8}([a-z_][a-z0-9_]*):", cls.__doc__ or "", re.MULTILINE))
    fields = {f.name for f in dataclasses.fields(cls)}
    assert not fields - documented, f"{cls.__name__} fields missing from its Attributes: section"
    assert not documented - fields, f"{cls.__name__} documents fields it does not have"


@pytest.mark.parametrize(
    "cls, field, value",
    [
        ("DPOConfig", "lr", 0.0),
        ("DPOConfig", "weight_decay", -0.1),
        ("DPOConfig", "grad_clip", -1.0),
        ("DPOConfig", "kto_lambda_desirable", -1.0),
        ("DPOConfig", "lora_alpha", -3.0),
        ("PGConfig", "eta", -0.5),
        ("PGConfig", "noise_level", -0.1),
        ("PGConfig", "lora_alpha", -1.0),
        ("NFTConfig", "eta", -1.0),
        ("NFTConfig", "lora_alpha", -1.0),
        ("BackpropConfig", "noise_level", -0.7),
        ("BackpropConfig", "lora_alpha", -8.0),
    ],
)
def test_values_no_run_can_use_are_refused_by_the_config(cls, field, value):
    config_class = {c.__name__: c for c in (DPOConfig, PGConfig, NFTConfig, BackpropConfig)}[cls]
    config_class()  # the defaults are fine
    with pytest.raises(ValueError, match=rf"^{field} must be"):
        config_class(**{field: value})


def test_a_run_folder_stopped_by_a_nan_before_anything_was_saved_is_removed(tmp_path):
    from diffalign.align.guard import NonFiniteError

    out = tmp_path / "runs" / "nan"

    def train() -> None:
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")
        raise NonFiniteError("loss", 1, None)

    with pytest.raises(typer.Exit) as exit_info:
        run_reward_trainer(out, "cpu", train, lambda last: "")
    assert exit_info.value.exit_code == 2
    assert not out.exists()  # nothing to resume: the rerun with a smaller rate may use the folder
