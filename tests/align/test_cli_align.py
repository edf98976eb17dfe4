"""`diffalign align dpo|kto` end to end (typer's CliRunner on the align sub-app, in-process)."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from diffalign.align.tracking import read_metrics
from diffalign.cli.align import app
from diffalign.models.registry import load_model
from diffalign.prefs.records import NewComparison
from diffalign.prefs.simulate import encode_png
from diffalign.prefs.store import PreferenceStore
from tests.align.helpers import make_pairs

runner = CliRunner()
FAST = ["steps=2", "batch_size=4", "log_every=1", "checkpoint_every=0", "log_with=none"]


def _store(path: Path, n: int = 8, ties: int = 0) -> Path:
    pairs = make_pairs(n, ties=ties)
    items = []
    for i in range(n):
        tie = bool(pairs.prob_a[i] == 0.5)
        items.append(
            NewComparison(
                prompt=pairs.prompts[i],
                images=[encode_png(pairs.images_a[i]), encode_png(pairs.images_b[i])],
                choice="tie" if tie else "image",
                chosen=None if tie else (0 if pairs.prob_a[i] == 1.0 else 1),
                source="test",
                rater="r",
            )
        )
    PreferenceStore.open(path).add(items)
    return path


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def test_dpo_happy_path_writes_a_usable_run_folder(tmp_path, eps_model_dir):
    store = _store(tmp_path / "prefs.db", ties=2)
    out = tmp_path / "runs" / "dpo"
    result = invoke("dpo", "--store", store, "--out", out, "--model", eps_model_dir, "--device", "cpu", *FAST)
    assert result.exit_code == 0, result.output
    assert "run folder" in result.output and str(out) in result.output
    assert "6 pairs with a winner" in result.output and "2 ties left out" in result.output
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2]
    assert load_model(str(out)).prediction_type == "epsilon"
    # a finished run resumes to the end at once; a different override is refused with the key named
    again = invoke(
        "dpo", "--store", store, "--out", out, "--model", eps_model_dir, "--resume", *FAST, "beta=7"
    )
    assert again.exit_code == 2 and "config.beta" in again.output


def test_kto_runs_from_a_config_file(tmp_path, flow_model_dir):
    store = _store(tmp_path / "prefs.db")
    cfg = tmp_path / "kto.yaml"
    cfg.write_text("beta: 100\nruntime:\n  device: cpu\n")
    out = tmp_path / "kto"
    result = invoke("kto", "--store", store, "--out", out, "--model", flow_model_dir, "--config", cfg, *FAST)
    assert result.exit_code == 0, result.output
    assert load_model(str(out)).prediction_type == "flow"


def test_errors_name_the_problem(tmp_path, eps_model_dir):
    store = _store(tmp_path / "prefs.db")
    out = tmp_path / "run"
    bad = invoke("dpo", "--store", store, "--out", out, "--model", eps_model_dir, "betta=3")
    assert bad.exit_code == 2 and "betta" in bad.output
    bad_value = invoke("dpo", "--store", store, "--out", out, "--model", eps_model_dir, "steps=many")
    assert bad_value.exit_code == 2 and "steps" in bad_value.output
    missing = invoke("dpo", "--store", tmp_path / "nope.db", "--out", out, "--model", eps_model_dir)
    assert missing.exit_code == 2 and "no such preference store" in missing.output
    ties = _store(tmp_path / "ties.db", n=3, ties=3)
    tie_only = invoke("dpo", "--store", ties, "--out", out, "--model", eps_model_dir, *FAST)
    assert tie_only.exit_code == 2 and "only ties" in tie_only.output
    no_model = invoke("dpo", "--store", store, "--out", out, "--model", tmp_path / "nomodel")
    assert no_model.exit_code == 2 and "nomodel" in no_model.output


def test_a_method_other_than_the_commands_is_refused(tmp_path, eps_model_dir):
    store = _store(tmp_path / "prefs.db")
    out = tmp_path / "run"
    base = ("dpo", "--store", store, "--out", out, "--model", eps_model_dir, "--device", "cpu", *FAST)
    override = invoke(*base, "method=kto")
    assert override.exit_code == 2 and "method='kto' conflicts with the command" in override.output
    assert "override 'method=kto'" in override.output and not out.exists()
    cfg = tmp_path / "kto.yaml"
    cfg.write_text("beta: 100\nmethod: kto\n")
    from_file = invoke(*base, "--config", cfg)
    assert from_file.exit_code == 2 and f"config file {cfg}, line 2" in from_file.output
    cfg.write_text("beta: 100\nmethod: dpo\n")  # naming the command's own method is fine
    assert invoke(*base, "--config", cfg).exit_code == 0
    grpo = invoke("grpo", "--out", tmp_path / "grpo", "--model", eps_model_dir, "method=ddpo")
    assert grpo.exit_code == 2 and "method='ddpo' conflicts with the command, which runs method='grpo'" in (
        grpo.output
    )


def test_soft_labels_train_the_ties(tmp_path, eps_model_dir):
    store = _store(tmp_path / "prefs.db", ties=2)
    out = tmp_path / "run"
    args = ("dpo", "--store", store, "--out", out, "--model", eps_model_dir, "--device", "cpu", *FAST)
    result = invoke(*args, "soft_labels=true")
    assert result.exit_code == 0, result.output
    assert "2 ties trained at 1/2 (soft_labels)" in result.output
    assert all(r["decisive_share"] < 1 for r in read_metrics(out / "metrics.jsonl"))


def test_kto_from_a_ratings_file(tmp_path, eps_model_dir):
    pairs = make_pairs(4)
    lines = []
    for i in range(4):
        for side, images in (("a", pairs.images_a), ("b", pairs.images_b)):
            name = f"{i}{side}.png"
            (tmp_path / name).write_bytes(encode_png(images[i]))
            liked = (pairs.prob_a[i] == 1.0) == (side == "a")
            lines.append(
                f'{{"prompt": "{pairs.prompts[i]}", "image": "{name}", "liked": {str(bool(liked)).lower()}}}'
            )
    ratings = tmp_path / "ratings.jsonl"
    ratings.write_text("\n".join(lines[:7]) + "\n", encoding="utf-8")  # one image left unrated
    out = tmp_path / "kto"
    args = ("kto", "--out", out, "--model", eps_model_dir, "--device", "cpu", *FAST)
    result = invoke(*args, "--ratings", ratings)
    assert result.exit_code == 0, result.output
    assert "3 liked and 4 disliked images" in result.output and "= 0.75" in result.output
    assert load_model(str(out)).prediction_type == "epsilon"
    store = _store(tmp_path / "prefs.db")  # 8 pairs: 8 liked and 8 disliked images
    both = invoke(*args[:2], tmp_path / "both", *args[3:], "--ratings", ratings, "--store", store)
    assert both.exit_code == 0, both.output
    assert "kto: 23 images in all, 11 liked" in both.output
    record = json.loads((tmp_path / "both" / "config.json").read_text())
    assert record["data"]["store"] == str(store) and record["data"]["ratings"] == str(ratings)
    assert (record["data"]["liked"], record["data"]["disliked"]) == (11, 12)
    neither = invoke(*args)
    assert neither.exit_code == 2 and "give a source of feedback" in neither.output
    streamed = invoke(*args, "--ratings", ratings, "--stream")
    assert streamed.exit_code == 2 and "--stream" in streamed.output
    ratings.write_text(
        lines[0] + '\n{"prompt": "a circle", "image": "0a.png", "liked": "sure"}\n', encoding="utf-8"
    )
    bad = invoke("kto", "--out", tmp_path / "bad", "--model", eps_model_dir, "--ratings", ratings)
    assert bad.exit_code == 2 and "line 2: 'liked' must be true or false" in bad.output
    assert not (tmp_path / "bad").exists()
