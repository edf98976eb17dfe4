"""`diffalign align draft|refl` end to end, the refusal of a black-box reward on the command line, and
two CPU processes (gloo) whose weights stay identical and equal one process with twice the
gradient accumulation on the same global batch."""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp
from typer.testing import CliRunner

from diffalign.align.reward_backprop import train_backprop
from diffalign.align.tracking import read_metrics
from diffalign.cli.align import app
from diffalign.models.registry import load_model
from tests.align.backprop_helpers import DiffRedness, bp_config
from tests.align.test_distributed import _free_port, join_as_process

runner = CliRunner()
REWARD_FILE = """
def redness(images, prompts):
    return images[:, 0].mean(dim=(1, 2)) - images[:, 1:].mean(dim=(1, 2, 3))

redness.differentiable = True
"""
FAST = ["steps=2", "batch_size=2", "pretrain_batch_size=2", "num_steps=3", "guidance_scale=1.0", "gold=none"]
FAST += ["log_every=1", "checkpoint_every=0", "log_with=none"]


def test_cli_trains_and_refuses_a_black_box_reward(tmp_path, eps_model_dir):
    (tmp_path / "r.py").write_text(REWARD_FILE)
    spec = f"{tmp_path / 'r.py'}:redness"
    for method in ("draft", "refl"):
        out = tmp_path / method
        args = [method, "--out", str(out), "--model", str(eps_model_dir), "--reward", spec, "--device", "cpu"]
        result = runner.invoke(app, [*args, *FAST])
        assert result.exit_code == 0, result.output
        assert "reward queries" in result.output and (out / "model").is_dir()
        assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2]
        assert load_model(str(out)).prediction_type == "epsilon"
    bad = [
        "alignprop",
        "--out",
        str(tmp_path / "bad"),
        "--model",
        str(eps_model_dir),
        "--reward",
        "gold-faithfulness",
    ]
    result = runner.invoke(app, [*bad, *FAST])
    assert result.exit_code != 0 and "not differentiable" in result.output
    assert not (tmp_path / "bad").exists()


def _worker(rank: int, world: int, port: int, model_dir: str, run_dir: str) -> None:
    join_as_process(rank, world, port)
    cfg = bp_config(
        model_dir, "alignprop", steps=2, batch_size=2, num_steps=2, lora_rank=4, checkpoint_every=1
    )
    model = train_backprop(cfg, run_dir, reward=DiffRedness())
    params = {n: p.detach().clone() for n, p in model.unet.named_parameters() if p.requires_grad}
    torch.save(params, os.path.join(run_dir, f"params-{rank}.pt"))
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_processes_stay_in_sync_and_match_accumulation(tmp_path, eps_model_dir):
    run = tmp_path / "ddp"
    run.mkdir()
    mp.spawn(_worker, args=(2, _free_port(), str(eps_model_dir), str(run)), nprocs=2, join=True)
    rank0 = torch.load(run / "params-0.pt")
    rank1 = torch.load(run / "params-1.pt")
    assert rank0.keys() == rank1.keys() and all("lora" in k for k in rank0)
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    assert (run / "model").is_dir() and (run / "checkpoints" / "step-0000002" / "process-1.pt").is_file()
    assert read_metrics(run / "metrics.jsonl")[-1]["reward_queries"] == 8  # 2 steps x 2 processes x 2

    cfg = bp_config(
        eps_model_dir, "alignprop", steps=2, batch_size=2, num_steps=2, lora_rank=4, checkpoint_every=1
    )
    cfg.runtime.gradient_accumulation_steps = 2
    single = train_backprop(cfg, tmp_path / "single", reward=DiffRedness())
    for name, p in single.unet.named_parameters():
        if p.requires_grad:
            assert torch.allclose(p.detach(), rank0[name], rtol=1e-4, atol=1e-6), name
