"""Two CPU processes (gloo) train the same run: their parameters must be identical after every step
(ddpo-pytorch's LoRA gradients were never synchronised across GPUs), and equal to one process with
twice the gradient accumulation on the same global batch (runtime.py's data rule)."""

import os
import socket

import torch
import torch.multiprocessing as mp

from diffalign.align.dpo import train_dpo
from tests.align.helpers import config, make_pairs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join_as_process(rank: int, world: int, port: int) -> None:
    """Make this spawned worker process `rank` of `world` for Accelerate (gloo on 127.0.0.1:`port`),
    with one torch thread."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
    )
    torch.set_num_threads(1)


def _worker(rank: int, world: int, port: int, model_dir: str, run_dir: str, lora_rank: int) -> None:
    join_as_process(rank, world, port)
    model = train_dpo(config(model_dir, steps=3, lora_rank=lora_rank), make_pairs(24), run_dir)
    from accelerate import PartialState

    assert PartialState().num_processes == world
    params = {n: p.detach().clone() for n, p in model.unet.named_parameters() if p.requires_grad}
    torch.save(params, os.path.join(run_dir, f"params-{rank}.pt"))
    torch.distributed.destroy_process_group()


def test_two_processes_stay_in_sync(tmp_path, eps_model_dir):
    run = tmp_path / "ddp"
    run.mkdir()
    mp.spawn(_worker, args=(2, _free_port(), str(eps_model_dir), str(run), 4), nprocs=2, join=True)
    rank0 = torch.load(run / "params-0.pt")
    rank1 = torch.load(run / "params-1.pt")
    assert rank0.keys() == rank1.keys() and all("lora" in k for k in rank0)
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    assert (run / "model").is_dir() and (run / "checkpoints" / "step-0000003" / "process-1.pt").is_file()

    # one process with gradient accumulation 2 sees the same global batches: the same update
    cfg = config(eps_model_dir, steps=3, lora_rank=4)
    cfg.runtime.gradient_accumulation_steps = 2
    single = train_dpo(cfg, make_pairs(24), tmp_path / "single")
    for name, p in single.unet.named_parameters():
        if p.requires_grad:
            assert torch.allclose(p.detach(), rank0[name], rtol=1e-4, atol=1e-6), name
