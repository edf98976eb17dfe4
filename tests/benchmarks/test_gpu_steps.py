"""benchmarks/gpu_steps.py on the CPU with its tiny configuration: the results it writes, the FLOPs it
counts, that its steps train, and that the diffalign levers do not change the maths."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_steps.py"


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_steps", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_steps"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


gpu_steps = load_script()
TINY = ["--device", "cpu", "--tiny", "--dtype", "float32", "--warmup", "1", "--iters", "2", "--threads", "1"]
# Levers that change the kernels but not the maths (compile is left out: inductor takes minutes on a
# CPU; the attention kernel stays the default, as the math kernel's backward is counted differently).
LEVERS = ["--channels-last", "--optimizer", "foreach"]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_steps_full")
    return gpu_steps.main([*TINY, *LEVERS, "--fuse-qkv", "--out", str(out)]), out


@pytest.fixture(scope="module")
def lora_run():
    return gpu_steps.main([*TINY, *LEVERS, "--finetune", "lora", "--lora-rank", "4", "--steps", "dpo,sample"])


def by_key(results):
    return {(r["variant"], r["step"]): r for r in results["records"]}


def test_results_structure(full_run):
    results, out = full_run
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(results))
    assert results["complete"] is True
    records = by_key(results)
    assert set(records) == {(v, s) for v in ("eager", "diffalign") for s in gpu_steps.STEPS}
    for record in records.values():
        assert record["batch"] == 2 and record["rows"] == 4
        assert record["ms_min"] <= record["ms"] <= record["ms_max"]
        assert record["samples_per_s"] == pytest.approx(2 / (record["ms"] / 1000))
        assert record["tflops"] == pytest.approx(record["flops"] / (record["ms"] / 1000) / 1e12)
        assert record["peak_gib"] is None  # memory is measured on CUDA only
        assert len(record["losses"]) == 1 + 2  # the first call and the timed steps
    assert results["config"]["levers"]["eager"]["channels_last"] is False
    assert results["config"]["levers"]["diffalign"]["fuse_qkv"] is True
    for row in results["comparisons"]:
        assert row["ratio"] == pytest.approx(row["diffalign"]["ms"] / row["eager"]["ms"])
        assert row["speedup"] == pytest.approx(1 / row["ratio"])
        pairs = zip(row["diffalign"]["losses"], row["eager"]["losses"], strict=True)
        assert row["loss_max_abs_diff"] == max(abs(a - b) for a, b in pairs)
        assert row["target_met"] is None  # no memory figure on CPU, so no verdict


def test_flops_are_positive_equal_between_variants_and_count_the_backward(full_run, lora_run):
    for results in (full_run[0], lora_run):
        records = by_key(results)
        for step in {s for _, s in records}:
            assert records["eager", step]["flops"] > 0
            assert records["eager", step]["flops"] == records["diffalign", step]["flops"], step
    full = {s: r["flops"] for (v, s), r in by_key(full_run[0]).items() if v == "eager"}
    # A forward on 2B rows is one unit; a full backward is about two (input and weight gradients), less
    # the first convolution's input gradient, plus the attention kernel's recomputed scores:
    # DPO = ref fwd + fwd + bwd ~ 4, pg and draft ~ 3.
    assert 3.9 < full["dpo"] / full["sample"] < 4.1
    assert 2.9 < full["pg"] / full["sample"] < 3.1
    assert full["draft"] == full["pg"]  # the same guided forward and backward
    lora = {s: r["flops"] for (v, s), r in by_key(lora_run).items() if v == "eager"}
    # LoRA's backward computes no gradients for the frozen weights: well under a full backward.
    assert lora["dpo"] < 0.8 * full["dpo"]


def test_eager_and_diffalign_compute_the_same_losses(full_run, lora_run):
    for results in (full_run[0], lora_run):
        records = by_key(results)
        for step in {s for _, s in records}:
            torch.testing.assert_close(
                torch.tensor(records["diffalign", step]["losses"]),
                torch.tensor(records["eager", step]["losses"]),
                rtol=1e-3,
                atol=1e-5,
                msg=lambda m, step=step: f"{step}: {m}",
            )
    dpo = by_key(lora_run)["eager", "dpo"]["losses"]
    assert dpo[0] == pytest.approx(math.log(2), rel=1e-5)  # the policy starts as the reference
    assert dpo[-1] < dpo[0]  # and moves towards the winners


def test_a_run_stopped_part_way_keeps_the_steps_it_measured(tmp_path, monkeypatch):
    # a time limit that stops the run on its third step: results.json holds the two before it
    real, calls = gpu_steps.time_step, []

    def stopping(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(gpu_steps, "time_step", stopping)
    with pytest.raises(KeyboardInterrupt):
        gpu_steps.main([*TINY, "--steps", "dpo,sample", "--out", str(tmp_path)])
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["complete"] is False
    assert [(r["variant"], r["step"]) for r in results["records"]] == [("eager", "dpo"), ("eager", "sample")]


def test_the_sampling_steps_reported_value_depends_on_the_network(tmp_path):
    # the loss diff column compares the variants' samples only if the value moves with the output
    args = gpu_steps.parser().parse_args(TINY)
    levers = gpu_steps.diffalign_levers(args, torch.device("cpu"))
    base = gpu_steps.build_unet(gpu_steps.TINY_UNET, seed=0)
    variant = gpu_steps.make_variant(
        "eager", base, levers, "full", (4, ("to_q",)), torch.float32, torch.device("cpu"), seed=0
    )
    inputs = gpu_steps.Inputs.make(2, gpu_steps.Shape(8, 8, 32), seed=0)
    schedule = gpu_steps.DDPMSchedule(**gpu_steps.SD15_SCHEDULE)
    settings = gpu_steps.StepSettings()
    before = gpu_steps.step_functions(variant, inputs, {}, settings, schedule)["sample"](None)
    with torch.no_grad():
        variant.policy.unet.conv_out.bias.add_(0.5)
    after = gpu_steps.step_functions(variant, inputs, {}, settings, schedule)["sample"](None)
    assert abs(float(after) - float(before)) > 1e-3


def test_merged_lora_sampling_gives_eager_lora_samples():
    results = gpu_steps.main(
        [*TINY, "--finetune", "lora", "--lora-rank", "4", "--steps", "sample", "--merge-lora"]
    )
    records = by_key(results)
    assert results["config"]["levers"]["diffalign"]["merge_lora"] is True
    torch.testing.assert_close(
        torch.tensor(records["diffalign", "sample"]["losses"]),
        torch.tensor(records["eager", "sample"]["losses"]),
        rtol=1e-5,
        atol=1e-6,
    )


@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_the_dpo_step_changes_the_trainable_weights_and_reset_restores_them(finetune):
    args = gpu_steps.parser().parse_args([*TINY, *LEVERS])
    levers = gpu_steps.diffalign_levers(args, torch.device("cpu"))
    base = gpu_steps.build_unet(gpu_steps.TINY_UNET, seed=0)
    variant = gpu_steps.make_variant(
        "diffalign", base, levers, finetune, (4, ("to_q", "to_v")), torch.float32, torch.device("cpu"), seed=0
    )
    frozen = [p.detach().clone() for p in variant.policy.unet.parameters() if not p.requires_grad]
    assert (len(frozen) > 0) == (finetune == "lora")
    inputs = gpu_steps.Inputs.make(2, gpu_steps.Shape(8, 8, 32), seed=0)
    schedule = gpu_steps.DDPMSchedule(**gpu_steps.SD15_SCHEDULE)
    steps = gpu_steps.step_functions(variant, inputs, {}, gpu_steps.StepSettings(lr=1e-3), schedule)
    optimizer = variant.reset(1e-3)
    steps["dpo"](optimizer)
    moved = [not torch.equal(p.detach(), v) for p, v in zip(variant.trainable, variant.initial, strict=True)]
    assert sum(moved) > 0.5 * len(moved)
    after = [p.detach() for p in variant.policy.unet.parameters() if not p.requires_grad]
    assert all(torch.equal(a, b) for a, b in zip(frozen, after, strict=True))  # LoRA's base is frozen
    variant.reset(1e-3)
    assert all(torch.equal(p.detach(), v) for p, v in zip(variant.trainable, variant.initial, strict=True))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--tf32"], "TF32"),
        (["--merge-lora"], "--merge-lora"),
        (["--fuse-qkv", "--finetune", "lora"], "--fuse-qkv"),
        (["--steps", "dpo,bogus"], None),
        (["--pairs", "0"], None),
    ],
)
def test_bad_options_are_refused_by_name(argv, message, capsys):
    with pytest.raises(SystemExit) as error:
        gpu_steps.main([*TINY, *argv])
    text = str(error.value.code) if message else capsys.readouterr().err
    assert (message or argv[0]) in text


def load_table_script():
    path = SCRIPT.with_name("gpu_steps_table.py")
    spec = importlib.util.spec_from_file_location("gpu_steps_table", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_steps_table"] = module
    spec.loader.exec_module(module)
    return module


def test_the_table_script_pairs_each_step_with_its_eager_baseline(full_run, tmp_path, capsys):
    table = load_table_script()
    results, out = full_run
    rows = table.rows_of(out / "results.json")
    assert [(r["step"], r["batch"]) for r in rows] == [(s, 2) for s in gpu_steps.STEPS]
    by_step = {(c["step"], c["batch"]): c for c in results["comparisons"]}
    for row in rows:
        assert row["speedup"] == pytest.approx(by_step[row["step"], row["batch"]]["speedup"])
        # the tiny run changed channels-last, the optimiser and q/k/v from the CPU defaults
        assert "fuse_qkv=True" in row["levers"] and "optimizer=foreach" in row["levers"]
    # a run stopped before its diffalign variant: eager rows alone, marked as stopped
    eager_only = [r for r in results["records"] if r["variant"] == "eager"]
    stopped = dict(results, complete=False, records=eager_only)
    (tmp_path / "stopped.json").write_text(json.dumps(stopped))
    text = table.main([str(out / "results.json"), str(tmp_path / "stopped.json")])
    lines = [line for line in text.splitlines() if line.startswith("| stopped (stopped part way) |")]
    assert len(lines) == len(gpu_steps.STEPS) and all("| - | - |" in line for line in lines)
    no_fields = '{"records": [{"variant": "eager"}], "config": {"levers": {"diffalign": {}}}}'
    for bad in ('{"records": 3}', no_fields):
        (tmp_path / "bad.json").write_text(bad)
        with pytest.raises(SystemExit, match=r"bad\.json"):
            table.main([str(tmp_path / "bad.json")])


def test_the_suite_runs_the_named_runs_and_keeps_their_results(tmp_path):
    suite = SCRIPT.with_name("gpu_steps_suite.sh")
    env = dict(os.environ, PYTHON=sys.executable, RUNS="train", OMP_NUM_THREADS="1")
    argv = [str(suite), str(tmp_path), "120", "--device", "cpu", "--tiny", "--threads", "1", "--iters", "1"]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.txt", "table.md", "train"]  # the run named
    results = json.loads((tmp_path / "train" / "results.json").read_text())
    assert results["complete"] is True
    assert {(r["variant"], r["step"]) for r in results["records"]} == {
        (v, s) for v in ("eager", "diffalign") for s in ("pg", "draft")
    }
    assert "=== train exit 0" in (tmp_path / "log.txt").read_text()
    table = (tmp_path / "table.md").read_text().splitlines()
    assert [line.split(" | ")[1] for line in table[2:]] == ["pg", "draft"]  # one row a step
    argv = [str(suite), str(tmp_path / "other"), "10"]
    unknown = subprocess.run(argv, env=dict(env, RUNS="train bogus"), capture_output=True, text=True)
    assert unknown.returncode == 2 and "RUNS names bogus" in unknown.stderr
    assert not (tmp_path / "other").exists()  # refused before anything ran
