"""The Accelerate configs in examples/accelerate: each parses with Accelerate's own loader, has every
field documented, and launches what docs/scaling.md says it launches."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import yaml
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from accelerate.utils.launch import prepare_multi_gpu_env

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "examples" / "accelerate"
EXPECTED = {
    "single_gpu_bf16.yaml": (DistributedType.NO, 1, 1),
    "ddp_8gpu.yaml": (DistributedType.MULTI_GPU, 8, 1),
    "ddp_2nodes_8gpu.yaml": (DistributedType.MULTI_GPU, 16, 2),
    "fsdp_8gpu.yaml": (DistributedType.FSDP, 8, 1),
    "cpu_2proc_gloo.yaml": (DistributedType.MULTI_GPU, 2, 1),  # the torchrun launcher, --device cpu
    "fsdp_cpu.yaml": (DistributedType.FSDP, 2, 1),
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
    launch_flags = {a.dest for a in launch_command_parser()._actions}
    for key in config.fsdp_config or {}:  # fsdp_config keys become `accelerate launch --fsdp_*` flags
        assert key in launch_flags, f"{name}: fsdp_config.{key} is not an accelerate launch option"
    if config.num_machines > 1:
        assert config.main_process_ip and config.main_process_port


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_field_has_a_comment(name):
    lines = (CONFIGS / name).read_text().splitlines()
    keys = 0
    for i, line in enumerate(lines):
        match = KEY.match(line)
        if not match:
            continue
        keys += 1
        value = line[match.end() :]
        above = lines[i - 1].strip() if i else ""
        if not ("#" in value or above.startswith("#") or value.strip() == ""):
            pytest.fail(f"{name}:{i + 1}: {match.group(2)} has no comment")
    assert keys == len(_all_keys(yaml.safe_load((CONFIGS / name).read_text())))


def _all_keys(tree: dict) -> list[str]:
    return [k for k, v in tree.items() for k in [k, *(_all_keys(v) if isinstance(v, dict) else [])]]


def test_the_fsdp_config_becomes_an_fsdp_plugin_that_wraps_unet_blocks():
    from diffusers import UNet2DConditionModel

    args = launch_command_parser().parse_args(["--config_file", str(CONFIGS / "fsdp_8gpu.yaml"), "train.py"])
    args, _, _ = _validate_launch_command(args)
    env = {k: v for k, v in prepare_multi_gpu_env(args).items() if k.startswith(("FSDP_", "ACCELERATE_"))}
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_SHARDING_STRATEGY"] == "FULL_SHARD"
    env["FSDP_SYNC_MODULE_STATES"] = "false"  # Accelerate needs a GPU to set up the broadcast
    with mock.patch.dict(os.environ, env):
        plugin = FullyShardedDataParallelPlugin()
    assert plugin.state_dict_type.name == "FULL_STATE_DICT" and plugin.use_orig_params
    unet = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=4,
        cross_attention_dim=8,
        attention_head_dim=2,
    )
    plugin.set_auto_wrap_policy(unet)  # raises if a class to wrap is not in the UNet
    assert plugin.auto_wrap_policy is not None


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


@pytest.mark.slow
@pytest.mark.parametrize("name", ["cpu_2proc_gloo.yaml", "fsdp_cpu.yaml"])
def test_the_cpu_configs_start_two_gloo_processes_and_neither_shards(name, tmp_path):
    """Both start two CPU processes that all-reduce over gloo; the FSDP one runs as DDP (docs/scaling.md:
    Accelerate enables FSDP only for GPU-like devices). If Accelerate ever shards on the CPU, this fails
    and the FSDP row of docs/scaling.md must be revisited."""
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    launcher = Path(sys.executable).with_name("accelerate")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [str(launcher), "launch", "--config_file", str(CONFIGS / name), str(script), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = sorted(p.read_text() for p in tmp_path.glob("rank-*.txt"))
    assert lines == [f"rank {r}/2 MULTI_CPU gloo fsdp=False sum=3" for r in range(2)]
