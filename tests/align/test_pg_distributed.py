"""Two CPU processes (gloo) run DDPO with LoRA: the adapters must be identical on both ranks after
training (ddpo-pytorch's LoRA gradients were never synchronised), and equal to one process with twice
the gradient accumulation (each process samples half of every epoch; the halves are gathered)."""

import os

import pytest
import torch
import torch.multiprocessing as mp

from diffalign.align.policy_gradient import train_pg
from tests.align.pg_helpers import Redness, pg_config, trainable
from tests.align.test_distributed import _free_port, join_as_process


def _worker(rank: int, world: int, port: int, model_dir: str, run_dir: str) -> None:
    join_as_process(rank, world, port)
    model = train_pg(
        pg_config(model_dir, epochs=2, lora_rank=4, train_batch_size=4), run_dir, reward=Redness()
    )
    from accelerate import PartialState

    assert PartialState().num_processes == world
    torch.save(trainable(model), os.path.join(run_dir, f"params-{rank}.pt"))
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_processes_stay_in_sync(tmp_path, eps_model_dir):
    run = tmp_path / "ddp"
    run.mkdir()
    mp.spawn(_worker, args=(2, _free_port(), str(eps_model_dir), str(run)), nprocs=2, join=True)
    rank0 = torch.load(run / "params-0.pt")
    rank1 = torch.load(run / "params-1.pt")
    assert rank0.keys() == rank1.keys() and all("lora" in k for k in rank0)
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    assert (run / "model").is_dir() and (run / "checkpoints" / "step-0000002" / "process-1.pt").is_file()

    cfg = pg_config(eps_model_dir, epochs=2, lora_rank=4, train_batch_size=4)
    cfg.runtime.gradient_accumulation_steps = 2
    single = trainable(train_pg(cfg, tmp_path / "single", reward=Redness()))
    for name, value in single.items():
        assert torch.allclose(value, rank0[name], rtol=1e-4, atol=1e-6), name
