"""`diffalign plan dpo --gpu-table`: a Diffusion-DPO run projected from the GPU step benchmark's table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from diffalign.cli import app
from diffalign.planning.gpu_table import dpo_step_cost

H200_TABLE = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "gpu_steps" / "h200-cudnn.json"


def record(variant: str, finetune: str, step: str, batch: int, ms: float, peak: float, compile_s: float):
    return {
        "variant": variant, "finetune": finetune, "step": step, "batch": batch, "rows": 2 * batch, "ms": ms,
        "peak_gib": peak, "compile_s": compile_s,
    }  # fmt: skip


@pytest.fixture
def table(tmp_path) -> Path:
    path = tmp_path / "results.json"
    results = {
        "device": "Some GPU",
        "unet_parameters": 859_520_964,
        "records": [
            record("eager", "full", "dpo", 8, 200.0, 20.0, 0.1),
            record("diffalign", "full", "dpo", 8, 160.0, 18.0, 120.0),
            record("diffalign", "full", "sample", 8, 30.0, 4.0, 10.0),
            record("eager", "lora", "dpo", 4, 150.0, 12.0, 0.1),
        ],
    }
    path.write_text(json.dumps(results))
    return path


def test_the_step_of_the_configs_batch_tuning_and_variant(table):
    cost = dpo_step_cost(table, pairs_per_step=8, finetune="full", accumulation=2, fixed_seconds=30.0)
    assert cost.seconds_per_step == pytest.approx(0.160 * 2)
    assert cost.fixed_seconds == pytest.approx(30.0 + 120.0)  # the compiling is a fixed cost
    assert (cost.forward_nfe_per_step, cost.backward_nfe_per_step) == (2 * 16 * 2, 16 * 2)
    assert cost.peak_memory_mb == pytest.approx(18.0 * 1024) and cost.memory_kind == "cuda"
    assert "Some GPU" in cost.source and "UNet of 860M parameters" in cost.source and "no VAE" in cost.source
    eager = dpo_step_cost(table, pairs_per_step=8, finetune="full", variant="eager")
    assert eager.seconds_per_step == pytest.approx(0.2)


def test_a_step_the_table_lacks_is_refused_with_what_it_holds(table, tmp_path):
    with pytest.raises(ValueError, match="at 16 pairs") as err:
        dpo_step_cost(table, pairs_per_step=16, finetune="full")
    assert "diffalign full 8 pairs" in str(err.value) and "eager lora 4 pairs" in str(err.value)
    with pytest.raises(ValueError, match="diffalign lora"):
        dpo_step_cost(table, pairs_per_step=4, finetune="lora")  # only the eager LoRA step is there
    with pytest.raises(ValueError, match="--gpu-variant"):
        dpo_step_cost(table, pairs_per_step=8, finetune="full", variant="compiled")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=r"bad\.json: not a JSON file"):
        dpo_step_cost(bad, 8, "full")
    bad.write_text('{"rows": []}')
    with pytest.raises(ValueError, match="no 'records' list"):
        dpo_step_cost(bad, 8, "full")
    with pytest.raises(FileNotFoundError, match=r"missing\.json"):
        dpo_step_cost(tmp_path / "missing.json", 8, "full")


def test_the_command_projects_from_the_table(table, tmp_path):
    out = tmp_path / "plan.json"
    argv = ["plan", "dpo", "steps=1000", "batch_size=8", "--gpu-table", str(table), "--fixed-seconds", "30",
            "--devices", "4", "--price-per-device-hour", "3", "--json", str(out)]  # fmt: skip
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["wall_seconds_one_device"] == pytest.approx(150.0 + 1000 * 0.16)
    assert data["wall_seconds"] == pytest.approx(150.0 + 1000 * 0.16 / (4 * 0.9))
    assert data["forward_nfe"] == pytest.approx(1000 * 32)
    assert data["peak_memory_mb"] == pytest.approx(18 * 1024)
    assert any("GPU step table" in line for line in data["assumptions"])
    assert "Some GPU" in result.output
    lora = CliRunner().invoke(app, ["plan", "dpo", "batch_size=4", "lora_rank=8", "--gpu-table", str(table),
                                    "--gpu-variant", "eager"])  # fmt: skip
    assert lora.exit_code == 0, lora.output
    both = CliRunner().invoke(app, ["plan", "dpo", "--gpu-table", str(table), "--seconds-per-step", "1"])
    assert both.exit_code != 0 and "exactly one of" in both.output
    other = CliRunner().invoke(app, ["plan", "grpo", "--gpu-table", str(table)])
    assert other.exit_code != 0 and "dpo only" in other.output
    missing = CliRunner().invoke(app, ["plan", "dpo", "batch_size=2", "--gpu-table", str(table)])
    assert missing.exit_code != 0 and "at 2 pairs" in missing.output


def test_the_stored_h200_table_projects_a_dpo_run():
    cost = dpo_step_cost(H200_TABLE, pairs_per_step=8, finetune="full")
    assert cost.device == "NVIDIA H200" and 0.1 < cost.seconds_per_step < 0.3
    assert cost.peak_memory_mb is not None and cost.fixed_seconds > 0
