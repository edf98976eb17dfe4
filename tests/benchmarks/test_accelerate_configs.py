"""The Accelerate configs in examples/accelerate: each parses with Accelerate's own loader, has every
field documented, and launches what docs/scaling.md says it launches; the trainer configs in
examples/configs load into their dataclasses, and the FSDP one's settings run `align dpo` sharded on two
CPU processes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from accelerate.utils import DistributedType

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "examples" / "accelerate"
TRAINER_CONFIGS = ROOT / "examples" / "configs"
EXPECTED = {
    "single_gpu_bf16.yaml": (DistributedType.NO, 1, 1),
    "ddp_8gpu.yaml": (DistributedType.MULTI_GPU, 8, 1),
    "ddp_2nodes_8gpu.yaml": (DistributedType.MULTI_GPU, 16, 2),
    "cpu_2proc_gloo.yaml": (DistributedType.MULTI_GPU, 2, 1),  # the torchrun launcher, --device cpu
}
KEY = re.compile(r"^(\s*)([A-Za-z_][A-Za-z0-9_]*):")


def test_the_configs_are_the_documented_ones():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(EXPECTED)
    doc = (ROOT / "docs" / "scaling.md").read_text()
    assert all(name in doc for name in EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_config_parses_with_accelerates_loader(name):
    config = load_config_from_file(str(CONFIGS / name))  # unknown top-level keys are refused here
    assert isinstance(config, ClusterConfig)
    kind, processes, machines = EXPECTED[name]
    assert (config.distributed_type, config.num_processes, config.num_machines) == (kind, processes, machines)
    assert not config.fsdp_config  # FSDP is the trainers' runtime.sharding, not Accelerate's launch type
    if config.num_machines > 1:
        assert config.main_process_ip and config.main_process_port


@pytest.mark.parametrize(
    "path", [CONFIGS / name for name in sorted(EXPECTED)] + sorted(TRAINER_CONFIGS.glob("*.yaml")), ids=str
)
def test_every_field_has_a_comment(path):
    lines = path.read_text().splitlines()
    keys = 0
    for i, line in enumerate(lines):
        match = KEY.match(line)
        if not match:
            continue
        keys += 1
        value = line[match.end() :]
        above = lines[i - 1].strip() if i else ""
        if not ("#" in value or above.startswith("#") or value.strip() == ""):
            pytest.fail(f"{path.name}:{i + 1}: {match.group(2)} has no comment")
    assert keys == len(_all_keys(yaml.safe_load(path.read_text())))


def _all_keys(tree: dict) -> list[str]:
    return [k for k, v in tree.items() for k in [k, *(_all_keys(v) if isinstance(v, dict) else [])]]


def test_the_fsdp_trainer_config_loads_into_dpo_config():
    from diffalign.align.config_io import load_config
    from diffalign.align.dpo import DPOConfig

    config = load_config(DPOConfig, TRAINER_CONFIGS / "dpo_fsdp_sd15.yaml", [])
    assert config.runtime.sharding == "fsdp" and config.lora_rank == 0
    assert config.runtime.mixed_precision == "bf16" and config.pipeline.gradient_checkpointing
    assert "dpo_fsdp_sd15.yaml" in (ROOT / "docs" / "scaling.md").read_text()


PROBE = """
import sys
from pathlib import Path
import torch
from accelerate import Accelerator
accelerator = Accelerator(cpu=True)  # what the trainers do with --device cpu
total = accelerator.reduce(torch.tensor([float(accelerator.process_index + 1)]), reduction="sum")
fsdp = getattr(accelerator.state, "fsdp_plugin", None) is not None
rank = accelerator.process_index
Path(sys.argv[1], f"rank-{rank}.txt").write_text(
    f"rank {rank}/{accelerator.num_processes} {accelerator.distributed_type.value} "
    f"{torch.distributed.get_backend()} fsdp={fsdp} sum={total.item():g}"
)
# Leave the gloo group before exit, as `diffalign.cli.main` does: a live group's threads can abort the
# interpreter at shutdown ("terminate called without an active exception").
accelerator.end_training()
"""


def accelerate_launch(*args: str) -> subprocess.CompletedProcess:
    """`accelerate launch ARGS` with the CPU config of two gloo processes (one torch thread each)."""
    launcher = Path(sys.executable).with_name("accelerate")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [str(launcher), "launch", "--config_file", str(CONFIGS / "cpu_2proc_gloo.yaml"), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


@pytest.mark.slow
def test_the_cpu_config_starts_two_gloo_processes(tmp_path):
    """Two CPU processes that all-reduce over gloo, with no Accelerate FSDP plugin."""
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    result = accelerate_launch(str(script), str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    lines = sorted(p.read_text() for p in tmp_path.glob("rank-*.txt"))
    assert lines == [f"rank {r}/2 MULTI_CPU gloo fsdp=False sum=3" for r in range(2)]


@pytest.mark.slow
def test_align_dpo_runs_sharded_under_accelerate_launch(tmp_path):
    """The command line of docs/scaling.md's FSDP section on two CPU processes: `align dpo` with
    runtime.sharding=fsdp writes a whole model folder and checkpoint (tests/align/test_fsdp.py checks
    the maths)."""
    from tests.align.helpers import save_tiny_model, store_with_preferences

    model = save_tiny_model(tmp_path / "model", "epsilon")
    store = tmp_path / "prefs.db"
    store_with_preferences(store, n=8, ties=0)
    out = tmp_path / "run"
    diffalign = Path(sys.executable).with_name("diffalign")
    result = accelerate_launch(
        str(diffalign), "align", "dpo", "--model", str(model), "--store", str(store), "--out", str(out),
        "--device", "cpu", "runtime.sharding=fsdp", "steps=2", "batch_size=2", "checkpoint_every=2",
        "log_with=none",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "model" / "diffusion_pytorch_model.safetensors").is_file()
    assert (out / "checkpoints" / "step-0000002" / "process-1.pt").is_file()
    from diffalign.models.registry import load_model

    before, after = load_model(str(model)).unet, load_model(str(out / "model")).unet
    assert type(after).__name__ == "TinyUNet"
    changed = [not torch.equal(a, b) for a, b in zip(before.parameters(), after.parameters(), strict=True)]
    assert sum(changed) > len(changed) // 2


@pytest.mark.slow
def test_align_online_dpo_runs_sharded_under_accelerate_launch(tmp_path):
    """`align online-dpo` on two CPU processes with FSDP: one round's pairs are sampled half by each
    process into the run's store, once; the main process writes the round's line and the model."""
    from tests.align.helpers import save_tiny_model

    model = save_tiny_model(tmp_path / "model", "epsilon")
    out = tmp_path / "run"
    diffalign = Path(sys.executable).with_name("diffalign")
    result = accelerate_launch(
        str(diffalign), "align", "online-dpo", "--model", str(model), "--out", str(out), "--device", "cpu",
        "rounds=1", "pairs_per_round=4", "sample_steps=2", "dpo.runtime.sharding=fsdp", "dpo.steps=2",
        "dpo.batch_size=2", "dpo.checkpoint_every=0", "dpo.log_with=none",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    from diffalign.prefs.store import PreferenceStore

    keys = sorted(c.key for c in PreferenceStore.open(out / "prefs.db").comparisons())
    assert keys == [f"simulated:0:{i}" for i in range(4)]
    assert len((out / "rounds.jsonl").read_text().splitlines()) == 1
    assert (out / "model" / "diffusion_pytorch_model.safetensors").is_file()
    # each process writes its own costs (two writers raced on one costs.json); the reader adds them up
    from diffalign.evaluate.costs import read_run_costs

    main = json.loads((out / "costs.json").read_text())
    other = json.loads((out / "costs-rank-1.json").read_text())
    assert main["processes"] == other["processes"] == 2
    assert main["forward_nfe"] > 0 and other["forward_nfe"] > 0  # each sampled half the pairs
    total = read_run_costs(out)
    assert total["processes_counted"] == 2
    assert total["forward_nfe"] == main["forward_nfe"] + other["forward_nfe"]
    assert total["backward_nfe"] == main["backward_nfe"] + other["backward_nfe"]
