"""FSDP (`runtime.sharding=fsdp`, torch's FSDP2) on two CPU processes (gloo): each process holds half
of every weight, the run computes what one process computes with the same global batches, and an
interrupted sharded run resumes to the uninterrupted one's weights (docs/scaling.md)."""

import json
import os

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from diffalign.align.dpo import train_dpo
from diffalign.align.nft import train_nft
from diffalign.align.online_dpo import OnlineDPOConfig, train_online_dpo
from diffalign.align.policy_gradient import train_pg
from diffalign.align.reward_backprop import train_backprop
from diffalign.align.run_dir import OPTIMIZER_FILE, WEIGHTS_FILE
from diffalign.align.runtime import REPEATED_BLOCKS, RuntimeConfig
from diffalign.align.sharding import check_sharding
from diffalign.align.spin import SPINConfig, generate, real_from_world, train_spin
from diffalign.models.registry import load_model
from diffalign.prefs.simulate import simulate_preferences
from diffalign.prefs.store import PreferenceStore
from tests.align.backprop_helpers import DiffRedness, bp_config
from tests.align.helpers import config, make_pairs
from tests.align.pg_helpers import Redness, nft_config, pg_config
from tests.align.test_distributed import _free_port, join_as_process

#: GRPO with full fine-tuning: 2 epochs of 4 prompts x 2 samples, 4 (sample, step) pairs per micro-batch
GRPO = dict(method="grpo", epochs=2, train_batch_size=4, lr=1e-4)
LR = 1e-4  # full fine-tuning: the tests' LoRA rate 1e-3 sends the loss from 0.69 to 8 in two steps


def sharded_config(model_dir, **overrides):
    return config(model_dir, lr=LR, runtime=RuntimeConfig(device="cpu", sharding="fsdp"), **overrides)


def _worker(rank: int, world: int, port: int, model_dir: str, run_dir: str, stop_after, resume) -> None:
    join_as_process(rank, world, port)
    from torch.distributed.tensor import DTensor

    model = train_dpo(
        sharded_config(model_dir), make_pairs(24), run_dir, resume=resume, stop_after=stop_after
    )
    params = dict(model.unet.named_parameters())
    shards = {name: [p.to_local().numel(), p.numel()] for name, p in params.items() if isinstance(p, DTensor)}
    with open(os.path.join(run_dir, f"shards-{rank}.json"), "w") as f:
        json.dump({"shards": shards, "params": len(params)}, f)
    torch.distributed.destroy_process_group()


def _pipeline_worker(rank: int, world: int, port: int, folder: str, run_dir: str) -> None:
    join_as_process(rank, world, port)
    train_dpo(sharded_config(folder, steps=2, batch_size=2, checkpoint_every=2), make_pairs(8), run_dir)
    torch.distributed.destroy_process_group()


def online_run(trainer: str, model_dir, run_dir, runtime: RuntimeConfig):
    """`trainer` (grpo, nft, or a reward backpropagation method) with full fine-tuning on a tiny model:
    2 epochs or steps."""
    if trainer == "grpo":
        return train_pg(pg_config(model_dir, **GRPO, runtime=runtime), run_dir, reward=Redness())
    if trainer == "nft":
        cfg = nft_config(model_dir, epochs=2, train_batch_size=4, lr=LR, runtime=runtime)
        return train_nft(cfg, run_dir, reward=Redness())
    # reward backpropagation: alignprop, draft-lv (its extra noise-and-denoise loops), refl (its
    # pre-training loss on world images)
    cfg = bp_config(model_dir, trainer, steps=2, batch_size=2, num_steps=2, lr=LR, runtime=runtime)
    return train_backprop(cfg, run_dir, reward=DiffRedness())


def _online_worker(rank: int, world: int, port: int, trainer: str, model_dir: str, run_dir: str) -> None:
    join_as_process(rank, world, port)
    online_run(trainer, model_dir, run_dir, RuntimeConfig(device="cpu", sharding="fsdp"))
    torch.distributed.destroy_process_group()


def run_two(model_dir, run_dir, stop_after=None, resume=False) -> None:
    args = (2, _free_port(), str(model_dir), str(run_dir), stop_after, resume)
    mp.spawn(_worker, args=args, nprocs=2, join=True)


def weights(folder) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in load_model(str(folder)).unet.named_parameters()}


def test_two_sharded_processes_hold_half_each_and_train_like_one(tmp_path, eps_model_dir):
    run = tmp_path / "fsdp"
    run_two(eps_model_dir, run)
    for rank in (0, 1):
        info = json.loads((run / f"shards-{rank}.json").read_text())
        assert len(info["shards"]) == info["params"]  # every weight is sharded
        local = sum(n for n, _ in info["shards"].values())
        whole = sum(n for _, n in info["shards"].values())
        assert local <= 0.55 * whole, (rank, local, whole)

    # the model folder is whole and equals one process with twice the accumulation on the same batches,
    # up to summation order: AdamW's step is about lr whatever the gradient's size, so an element whose
    # gradient is near zero may step the other way (1 of ~1e6 elements here); a missing gradient sync
    # would change most of them
    cfg = config(eps_model_dir, lr=LR)
    cfg.runtime.gradient_accumulation_steps = 2
    single = train_dpo(cfg, make_pairs(24), tmp_path / "single")
    base = weights(eps_model_dir)
    sharded = weights(run / "model")
    assert sharded.keys() == base.keys()
    elements = differing = moved = 0
    for name, p in single.unet.named_parameters():
        gap = (sharded[name] - p.detach()).abs()
        assert float(gap.max()) < 4 * 2 * LR, name  # at most a few steps the other way
        elements += gap.numel()
        differing += int((gap > 0.05 * LR).sum())
        moved += int(((sharded[name] - base[name]).abs() > 0.5 * LR).sum())
    assert differing <= 1e-4 * elements and moved > 0.8 * elements, (differing, moved, elements)
    losses = lambda run: [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert losses(run) == pytest.approx(losses(tmp_path / "single"), rel=1e-3)
    # the checkpoint holds whole weights and the optimiser state keyed by parameter name
    saved = load_file(str(run / "checkpoints" / "step-0000004" / WEIGHTS_FILE))
    assert saved.keys() == base.keys() and all(saved[k].shape == base[k].shape for k in base)
    optimizer = torch.load(run / "checkpoints" / "step-0000004" / OPTIMIZER_FILE, weights_only=True)
    assert set(optimizer["state"]) == set(base)


def test_an_interrupted_sharded_run_resumes_to_the_uninterrupted_weights(tmp_path, eps_model_dir):
    whole_run, split_run = tmp_path / "whole", tmp_path / "split"
    run_two(eps_model_dir, whole_run)
    run_two(eps_model_dir, split_run, stop_after=2)
    assert not (split_run / "model").exists()
    run_two(eps_model_dir, split_run, resume=True)
    uninterrupted, resumed = weights(whole_run / "model"), weights(split_run / "model")
    for name in uninterrupted:
        assert torch.allclose(resumed[name], uninterrupted[name], rtol=1e-5, atol=1e-7), name
    lines = lambda run: [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert [x["loss"] for x in lines(split_run)] == pytest.approx([x["loss"] for x in lines(whole_run)])


def _compiled_worker(rank: int, world: int, port: int, model_dir: str, run_dir: str) -> None:
    join_as_process(rank, world, port)
    original, compiled = torch.nn.Module.compile, []

    def eager_backend(self, *args, **kwargs):  # dynamo's graph capture without inductor's C++ build
        compiled.append(type(self).__name__)
        return original(self, backend="eager")

    torch.nn.Module.compile = eager_backend
    runtime = RuntimeConfig(device="cpu", sharding="fsdp", compile="default")
    model = train_dpo(config(model_dir, lr=LR, runtime=runtime), make_pairs(24), run_dir)
    called = [m for m in model.denoiser.modules() if getattr(m, "_compiled_call_impl", None) is not None]
    with open(os.path.join(run_dir, f"compiled-{rank}.json"), "w") as f:
        json.dump({"compiled": compiled, "sharded_and_compiled": len(called)}, f)
    torch.distributed.destroy_process_group()


def test_sharded_and_compiled_blocks_train_like_one_process(tmp_path, eps_model_dir):
    """`runtime.compile` with FSDP: the blocks are compiled (dynamo; the eager backend here), then
    sharded, and the run equals one uncompiled process with twice the accumulation."""
    run = tmp_path / "compiled"
    mp.spawn(_compiled_worker, args=(2, _free_port(), str(eps_model_dir), str(run)), nprocs=2, join=True)
    info = json.loads((run / "compiled-0.json").read_text())
    assert len(info["compiled"]) == info["sharded_and_compiled"] > 1
    assert set(info["compiled"]) <= set(REPEATED_BLOCKS)
    cfg = config(eps_model_dir, lr=LR)
    cfg.runtime.gradient_accumulation_steps = 2
    single = train_dpo(cfg, make_pairs(24), tmp_path / "single")
    losses = lambda run: [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert losses(run) == pytest.approx(losses(tmp_path / "single"), rel=1e-3)
    compiled = weights(run / "model")
    elements = differing = 0
    for name, p in single.unet.named_parameters():
        gap = (compiled[name] - p.detach()).abs()
        assert float(gap.max()) < 4 * 2 * LR, name
        elements += gap.numel()
        differing += int((gap > 0.05 * LR).sum())
    assert differing <= 1e-4 * elements, (differing, elements)


def test_sharding_refuses_one_process_and_lora():
    sharded = RuntimeConfig(device="cpu", sharding="fsdp")
    with pytest.raises(ValueError, match="one; start it"):
        check_sharding(sharded, num_processes=1, lora=False)
    with pytest.raises(ValueError, match="LoRA"):
        check_sharding(sharded, num_processes=2, lora=True)
    check_sharding(RuntimeConfig(device="cpu"), num_processes=1, lora=True)  # not sharded: nothing to refuse
    with pytest.raises(ValueError, match=r"runtime\.sharding must be one of"):
        RuntimeConfig(sharding="zero3")


def test_a_single_process_dpo_run_refuses_fsdp_before_writing(tmp_path, eps_model_dir):
    with pytest.raises(ValueError, match="one; start it"):
        train_dpo(sharded_config(eps_model_dir), make_pairs(8), tmp_path / "run")
    assert not (tmp_path / "run" / "config.json").exists()


def rounds_run(trainer: str, model_dir, run_dir, runtime: RuntimeConfig):
    """2 rounds of online DPO (6 panel-labelled pairs each) or SPIN (5 world scenes), 2 steps a round."""
    dpo = config(model_dir, steps=2, batch_size=2, checkpoint_every=1, lr=LR, runtime=runtime)
    if trainer == "online-dpo":
        cfg = OnlineDPOConfig(dpo=dpo, rounds=2, pairs_per_round=6, sample_steps=2, sample_batch=4)
        return train_online_dpo(cfg, run_dir)
    # 5 examples: one process generates 3 of them, the other 2
    return train_spin(
        SPINConfig(dpo=dpo, rounds=2, sample_steps=2, sample_batch=4), real_from_world(5, 16), run_dir
    )


def _rounds_worker(rank: int, world: int, port: int, trainer: str, sharding: str, model_dir, run_dir) -> None:
    import diffalign.align.online_dpo as online_dpo
    import diffalign.align.spin as spin

    join_as_process(rank, world, port)
    sampled: list[int] = []  # what this process sampled: pairs (online DPO) or images (SPIN), per round

    def counting_simulate(*args, **kwargs):
        report = simulate_preferences(*args, **kwargs)
        sampled.append(report.sampled)
        return report

    def counting_generate(model, prompts, *args):
        sampled.append(len(prompts))
        return generate(model, prompts, *args)

    online_dpo.simulate_preferences, spin.generate = counting_simulate, counting_generate
    model = rounds_run(trainer, model_dir, run_dir, RuntimeConfig(device="cpu", sharding=sharding))
    with open(os.path.join(run_dir, f"sampled-{rank}.json"), "w") as f:
        json.dump(sampled, f)
    if sharding == "none":  # data parallel: every process ends with the same whole weights
        params = {n: p.detach().clone() for n, p in model.unet.named_parameters()}
        torch.save(params, os.path.join(run_dir, f"params-{rank}.pt"))
    torch.distributed.destroy_process_group()


def stored_pairs(run) -> dict[str, tuple]:
    """{key: ((prompt, choice, chosen), image hashes)} of a run's preference store."""
    store = PreferenceStore.open(run / "prefs.db")
    return {c.key: ((c.prompt, c.choice, c.chosen), tuple(c.image_hashes)) for c in store.comparisons()}


@pytest.mark.parametrize(
    ("trainer", "sharding"), [("online-dpo", "none"), ("online-dpo", "fsdp"), ("spin", "fsdp")]
)
def test_round_trainers_share_sampling_over_processes_and_train_like_one(
    tmp_path, eps_model_dir, trainer, sharding
):
    """Online DPO and SPIN on two processes: each samples its share of a round's pairs, the round trains
    on all of them (data parallel or sharded), and the run equals one process with twice the
    accumulation: the same pairs (online DPO: the same keys and labels in the run's store, the images
    to a unit in a pixel) and the same weights up to AdamW sign flips."""
    run = tmp_path / "two"
    args = (2, _free_port(), trainer, sharding, str(eps_model_dir), str(run))
    mp.spawn(_rounds_worker, args=args, nprocs=2, join=True)
    single_run = tmp_path / "one"
    single = rounds_run(
        trainer, eps_model_dir, single_run, RuntimeConfig(device="cpu", gradient_accumulation_steps=2)
    )
    sampled = [json.loads((run / f"sampled-{rank}.json").read_text()) for rank in (0, 1)]
    assert sampled == ([[3, 3], [3, 3]] if trainer == "online-dpo" else [[3, 3], [2, 2]])  # shares, per round
    lines = lambda run: [json.loads(x) for x in (run / "rounds.jsonl").read_text().splitlines()]  # noqa: E731
    assert [x["round"] for x in lines(run)] == [0, 1]
    assert [x["final"]["loss"] for x in lines(run)] == pytest.approx(
        [x["final"]["loss"] for x in lines(single_run)], rel=1e-3
    )
    if trainer == "online-dpo":
        # the same pairs and labels; an image may differ by a unit in a pixel (batches of another size)
        two_pairs, one_pairs = stored_pairs(run), stored_pairs(single_run)
        assert two_pairs.keys() == one_pairs.keys() and len(two_pairs) == 12
        assert all(two_pairs[key][0] == one_pairs[key][0] for key in two_pairs)
        hashes = [(a, b) for key in two_pairs for a, b in zip(two_pairs[key][1], one_pairs[key][1])]
        assert sum(a != b for a, b in hashes) <= 2, hashes
    if sharding == "none":
        rank0, rank1 = torch.load(run / "params-0.pt"), torch.load(run / "params-1.pt")
        assert all(torch.equal(rank0[name], rank1[name]) for name in rank0)
    two, base = weights(run / "model"), weights(eps_model_dir)
    elements = differing = moved = 0
    for name, p in single.unet.named_parameters():
        gap = (two[name] - p.detach()).abs()
        assert float(gap.max()) < 4 * 4 * LR, name  # 4 steps: at most a few the other way
        elements += gap.numel()
        differing += int((gap > 0.05 * LR).sum())
        moved += int(((two[name] - base[name]).abs() > 0.5 * LR).sum())
    assert differing <= 1e-3 * elements and moved > 0.5 * elements, (differing, moved, elements)


@pytest.mark.parametrize("family", ["sd", "sd3"])
def test_a_sharded_diffusers_denoiser_trains_and_saves_a_loadable_pipeline(tmp_path, family):
    """UNet (ResnetBlock2D / Transformer2DModel units) and SD3 transformer (JointTransformerBlock units):
    the run writes a pipeline folder that names the denoiser's own class (not FSDP's subclass) and
    holds weights that moved from the base's, like one process with twice the accumulation."""
    from tests.models.tiny_pipelines import build_sd, build_sd3

    folder = (build_sd if family == "sd" else build_sd3)(tmp_path / family)
    run = tmp_path / "run"
    mp.spawn(_pipeline_worker, args=(2, _free_port(), str(folder), str(run)), nprocs=2, join=True)
    index = json.loads((run / "model" / "model_index.json").read_text())
    name = "unet" if family == "sd" else "transformer"
    assert index[name][1] == ("UNet2DConditionModel" if family == "sd" else "SD3Transformer2DModel")
    cfg = config(folder, steps=2, batch_size=2, checkpoint_every=2, lr=LR)
    cfg.runtime.gradient_accumulation_steps = 2
    single = train_dpo(cfg, make_pairs(8), tmp_path / "single").denoiser
    sharded = load_model(str(run / "model")).denoiser
    base = load_model(str(folder)).denoiser
    gaps, moved = [], []
    for p, q, b in zip(single.parameters(), sharded.parameters(), base.parameters(), strict=True):
        gaps.append(float((p.detach() - q.detach()).abs().max()))
        moved.append(not torch.equal(q, b))
    assert max(gaps) < 2 * 2 * LR and sum(moved) > 0.8 * len(moved)


@pytest.mark.parametrize("trainer", ["grpo", "nft", "alignprop", "draft-lv", "refl"])
def test_sharded_online_trainers_sample_and_train_like_one_process(tmp_path, eps_model_dir, trainer):
    """The trainers that sample during training do it with the sharded network (every process its
    share, all in step; AlignProp backpropagates through the sampling chain) and train it; the result
    equals one process with twice the accumulation."""
    run = tmp_path / "fsdp"
    args = (2, _free_port(), trainer, str(eps_model_dir), str(run))
    mp.spawn(_online_worker, args=args, nprocs=2, join=True)
    runtime = RuntimeConfig(device="cpu", gradient_accumulation_steps=2)
    single = online_run(trainer, eps_model_dir, tmp_path / "single", runtime).unet
    sharded, base = weights(run / "model"), weights(eps_model_dir)
    elements = differing = moved = 0
    for name, p in single.named_parameters():
        gap = (sharded[name] - p.detach()).abs()
        assert float(gap.max()) < 2 * 2 * LR, name
        elements += gap.numel()
        differing += int((gap > 0.05 * LR).sum())
        moved += int(((sharded[name] - base[name]).abs() > 0.5 * LR).sum())
    assert differing <= 1e-3 * elements and moved > 0.5 * elements, (differing, moved, elements)
