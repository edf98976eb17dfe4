import json

import pytest
import torch

from diffalign.align.config_io import load_config
from diffalign.align.guard import FiniteGuard, NonFiniteError
from diffalign.align.run_dir import RunDir, RunDirError, differing_keys
from diffalign.align.runtime import RuntimeConfig, epoch_indices, global_batch_slice, make_accelerator
from diffalign.align.tracking import Tracker, read_metrics, resolve_log_with, truncate_metrics

RECORD = {
    "trainer": "dpo",
    "config": {"beta": 1.0, "runtime": {"device": "cpu", "seed": 0}},
    "data": {"n": 3},
}


def _save(run: RunDir, step: int, keep: int = 2):
    return run.save_checkpoint(
        step,
        process_state={"window": {"sums": torch.ones(2)}},
        weights={"w": torch.full((2,), float(step))},
        optimizer={"state": {}, "param_groups": []},
        data_cursor=step * 8,
        record=RECORD,
        keep=keep,
    )


def test_checkpoints_are_atomic_keep_the_last_k_and_round_trip(tmp_path):
    run = RunDir(tmp_path / "run")
    for step in (1, 2, 3):
        _save(run, step)
    names = sorted(p.name for p in run.checkpoints.iterdir())
    assert names == ["step-0000002", "step-0000003"]  # no temporary folder left behind
    assert run.latest_checkpoint().name == "step-0000003"
    ckpt = run.load_checkpoint(run.latest_checkpoint(), RECORD)
    assert ckpt.step == 3 and ckpt.data_cursor == 24 and torch.equal(ckpt.weights["w"], torch.full((2,), 3.0))
    assert ckpt.rng is not None and torch.equal(ckpt.process_state["window"]["sums"], torch.ones(2))
    # a half-written checkpoint (no state.json) is ignored
    (run.checkpoints / ".tmp-step-0000004").mkdir()
    (run.checkpoints / "step-0000005").mkdir()
    assert run.latest_checkpoint().name == "step-0000003"


def test_loading_refuses_a_checkpoint_with_another_config(tmp_path):
    run = RunDir(tmp_path / "run")
    path = _save(run, 1)
    other = json.loads(json.dumps(RECORD))
    other["config"]["beta"] = 2.0
    other["data"]["n"] = 4
    with pytest.raises(RunDirError, match=r"\['config.beta', 'data.n'\]"):
        run.load_checkpoint(path, other)
    moved = json.loads(json.dumps(RECORD))
    moved["config"]["runtime"]["device"] = "cuda"  # where a run resumes may change
    assert differing_keys(RECORD, moved) == []


def test_run_folder_start_rules(tmp_path):
    run = RunDir(tmp_path / "run")
    with pytest.raises(RunDirError, match="holds no run"):
        run.start(RECORD, resume=True)
    run.start(RECORD, resume=False)
    assert json.loads(run.config_path.read_text()) == RECORD
    with pytest.raises(RunDirError, match="already holds a run"):
        run.start(RECORD, resume=False)
    run.start(RECORD, resume=True)


def test_extending_changes_only_the_length_and_keeps_the_old_model(tmp_path):
    run = RunDir(tmp_path / "run")
    with pytest.raises(RunDirError, match=r"--extend: .* holds no run"):
        run.start(RECORD, resume=False, extend=True)
    run.start(RECORD, resume=False)
    with pytest.raises(RunDirError, match=r"has none of \['config.epochs', 'config.steps'\]"):
        run.start(RECORD, resume=False, extend=True)  # a record without a length: nothing to extend
    sized = json.loads(json.dumps(RECORD))
    sized["config"]["steps"] = 2
    run.write_record(sized)
    _save(run, 2)
    run.model_dir.mkdir()
    (run.model_dir / "weights").write_text("the 2-step model")
    longer = json.loads(json.dumps(sized))
    longer["config"]["steps"] = 5
    with pytest.raises(RunDirError, match=r"config.steps.*only the length may change, with --extend"):
        run.start(longer, resume=True)
    with pytest.raises(RunDirError, match=r"checkpoint .* different config"):
        run.load_checkpoint(run.latest_checkpoint(), longer)
    run.start(longer, resume=True, extend=True)
    assert json.loads(run.config_path.read_text())["config"]["steps"] == 5
    assert not run.model_dir.exists()
    assert (run.path / "model-step-0000002" / "weights").read_text() == "the 2-step model"
    assert run.load_checkpoint(run.latest_checkpoint(), longer, extend=True).step == 2
    shorter = json.loads(json.dumps(sized))
    shorter["config"]["steps"] = 1
    with pytest.raises(RunDirError, match=r"steps=1 ends before the latest checkpoint step-0000002"):
        run.start(shorter, resume=True, extend=True)


def test_metrics_truncated_to_the_checkpoint_on_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": s / 10}) + "\n" for s in (2, 4, 6)))
    truncate_metrics(path, 4)
    assert [r["step"] for r in read_metrics(path)] == [2, 4]


def test_metrics_lines_are_strict_json_with_undefined_values_as_null(tmp_path):
    class MainProcess:
        is_main_process = True
        log_with = None

    path = tmp_path / "metrics.jsonl"
    tracker = Tracker(MainProcess(), path, project="p", record={}, total_steps=2, start_step=0)
    tracker.log(
        {
            "step": 1,
            "loss": 0.5,
            "diversity": float("nan"),
            "extra": {"kl": float("inf"), "xs": [1.0, float("-inf")]},
        }
    )
    tracker.close()
    line = path.read_text(encoding="utf-8")
    assert "NaN" not in line and "Infinity" not in line

    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")

    record = json.loads(line, parse_constant=refuse)
    assert record == {"step": 1, "loss": 0.5, "diversity": None, "extra": {"kl": None, "xs": [1.0, None]}}
    assert read_metrics(path) == [record]


def test_log_with_values():
    assert resolve_log_with("none") is None
    assert resolve_log_with("auto") == ["tensorboard"]  # installed in the dev environment
    assert resolve_log_with("wandb,mlflow") == ["wandb", "mlflow"]
    with pytest.raises(ValueError, match="tensorbored"):
        resolve_log_with("tensorbored")


def test_guard_names_quantity_step_and_checkpoint(tmp_path):
    guard = FiniteGuard()
    guard.observe("loss", torch.tensor(1.0), 1)
    guard.check(None)
    guard.observe("reward", torch.tensor([1.0, float("inf")]), 2)
    guard.observe("loss", torch.tensor(float("nan")), 3)
    with pytest.raises(NonFiniteError, match=r"step 2: the reward became NaN or inf.*ckpt-dir") as err:
        guard.check(tmp_path / "ckpt-dir")
    assert err.value.quantity == "reward" and err.value.step == 2
    with pytest.raises(NonFiniteError, match="no checkpoint was written"):
        guard.check(None)


def test_data_sharding_covers_the_global_batch_once():
    rows = [list(range(12))[global_batch_slice(m, r, 2, 3)] for m in range(2) for r in range(2)]
    assert sorted(i for row in rows for i in row) == list(range(12))
    stream = epoch_indices(5, seed=1, start=0, count=15)
    for epoch in range(3):
        assert sorted(stream[5 * epoch : 5 * epoch + 5].tolist()) == list(range(5))
    assert torch.equal(epoch_indices(5, 1, 7, 4), stream[7:11])


def test_runtime_config_validation():
    cfg = load_config(RuntimeConfig, None, ["device=cpu", "gradient_accumulation_steps=3"])
    assert cfg.gradient_accumulation_steps == 3
    with pytest.raises(ValueError, match=r"runtime\.device"):
        RuntimeConfig(device="tpu")
    with pytest.raises(ValueError, match="fp16"):
        make_accelerator(RuntimeConfig(device="cpu", mixed_precision="fp16"))
