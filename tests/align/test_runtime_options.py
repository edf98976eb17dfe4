"""The trainers' optimiser and compile options (`RuntimeConfig.optimizer`, `RuntimeConfig.compile`)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from diffalign.align.dpo import train_dpo
from diffalign.align.run_dir import WEIGHTS_FILE
from diffalign.align.runtime import REPEATED_BLOCKS, RuntimeConfig, compile_blocks, make_optimizer
from diffalign.align.tracking import read_metrics
from diffalign.models.registry import load_model
from tests.align.helpers import config


def _updates(kind: str) -> torch.Tensor:
    torch.manual_seed(0)
    layer = torch.nn.Linear(8, 4)
    optimizer = make_optimizer(list(layer.parameters()), 1e-2, 0.01, RuntimeConfig(optimizer=kind))
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        loss = layer(torch.randn(16, 8, generator=g)).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return layer.weight.detach().clone()


def test_fused_adamw_takes_the_same_steps_as_adamw():
    plain, fused = _updates("adamw"), _updates("adamw_fused")
    assert not torch.equal(plain, torch.nn.Linear(8, 4).weight)  # the weights moved
    assert torch.allclose(plain, fused, atol=1e-6)


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is not None, reason="bitsandbytes installed")
def test_8bit_adamw_without_bitsandbytes_says_what_to_install():
    with pytest.raises(ValueError, match="pip install bitsandbytes"):
        make_optimizer([torch.nn.Parameter(torch.zeros(2))], 1e-3, 0.0, RuntimeConfig(optimizer="adamw_8bit"))


def test_unknown_runtime_options_are_refused_by_name():
    with pytest.raises(ValueError, match=r"runtime\.optimizer"):
        RuntimeConfig(optimizer="sgd")
    with pytest.raises(ValueError, match=r"runtime\.compile"):
        RuntimeConfig(compile="fast")


def test_a_compiled_denoiser_trains_like_the_eager_one(tmp_path, eps_model_dir, pairs, monkeypatch):
    """runtime.compile compiles the denoiser's blocks in place: the same losses and weights as eager and
    the same checkpoint names. Dynamo traces every block; the test swaps Inductor for the eager backend,
    as compiling the blocks with Inductor takes minutes on the CPU (a run of this test with Inductor
    matched eager to 1.5e-4 relative in the loss, which Diffusion-DPO's beta magnifies)."""
    from safetensors.torch import load_file

    calls = []
    original = torch.nn.Module.compile

    def eager_backend(self, *args, **kwargs):
        calls.append((type(self).__name__, kwargs.get("mode")))
        return original(self, backend="eager")

    monkeypatch.setattr(torch.nn.Module, "compile", eager_backend)
    plain = train_dpo(config(eps_model_dir, steps=2), pairs, tmp_path / "plain")
    runtime = RuntimeConfig(device="cpu", compile="max-autotune")
    compiled = train_dpo(config(eps_model_dir, steps=2, runtime=runtime), pairs, tmp_path / "compiled")
    blocks = [m for m in compiled.denoiser.modules() if getattr(m, "_compiled_call_impl", None) is not None]
    assert len(blocks) == len(calls) > 1
    assert all(type(m).__name__ in REPEATED_BLOCKS for m in blocks)
    assert {mode for _, mode in calls} == {"max-autotune"}
    a = [m["loss"] for m in read_metrics(tmp_path / "plain" / "metrics.jsonl")]
    b = [m["loss"] for m in read_metrics(tmp_path / "compiled" / "metrics.jsonl")]
    assert b == pytest.approx(a, rel=1e-5)
    names = [
        set(load_file(str(sorted((run / "checkpoints").glob("step-*"))[-1] / WEIGHTS_FILE)))
        for run in (tmp_path / "plain", tmp_path / "compiled")
    ]
    assert names[0] == names[1]
    start = load_model(str(eps_model_dir)).denoiser.state_dict()
    moved = 0
    for (name, x), y in zip(plain.denoiser.named_parameters(), compiled.denoiser.parameters()):
        assert torch.allclose(x, y, atol=1e-6), name
        moved += not torch.equal(x, start[name])
    assert moved > 0


def test_compile_blocks_refuses_a_network_without_known_blocks():
    with pytest.raises(ValueError, match="none of the blocks"):
        compile_blocks(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_sharded_launches_are_refused_before_anything_is_written():
    from accelerate.utils import DistributedType

    from diffalign.align.runtime import refuse_sharded_training

    for kind in (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU):
        refuse_sharded_training(kind)
    with pytest.raises(ValueError, match=r"FSDP launch type.*ddp_8gpu\.yaml.*runtime\.sharding=fsdp"):
        refuse_sharded_training(DistributedType.FSDP)
    with pytest.raises(ValueError, match=r"do not support DEEPSPEED.*ddp_8gpu\.yaml"):
        refuse_sharded_training(DistributedType.DEEPSPEED)
