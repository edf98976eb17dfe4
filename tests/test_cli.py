"""End-to-end tests of the command line (typer's CliRunner, in-process)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from diffalign.cli import app
from diffalign.evaluate.geneval_layout import write_prompt_folder
from diffalign.world.render import render_batch, to_uint8
from diffalign.world.scene import sample_scenes, templates_from_metadata
from diffalign.world.shapeseval import load_shapeseval, to_jsonl

runner = CliRunner()


def _invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def _ground_truth_folder(root, lines, per_prompt=1, size=32, seed=0):
    template = templates_from_metadata(lines)
    ids = torch.arange(len(lines)).repeat_interleave(per_prompt)
    images = to_uint8(
        render_batch(sample_scenes(template, ids, generator=torch.Generator().manual_seed(seed)), size)
    )
    for i, meta in enumerate(lines):
        write_prompt_folder(root, i, meta, images[i * per_prompt : (i + 1) * per_prompt])
    return root


def test_shapeseval_prompts(tmp_path):
    result = _invoke("shapeseval", "prompts", "--out", tmp_path / "p.jsonl")
    assert result.exit_code == 0
    lines = (tmp_path / "p.jsonl").read_text().splitlines()
    assert len(lines) == len(load_shapeseval())
    assert json.loads(lines[0])["tag"] == "single_object"


def test_score_rendered_ground_truth_is_at_least_099(tmp_path):
    folder = _ground_truth_folder(tmp_path / "gt", load_shapeseval())
    result = _invoke("shapeseval", "score", folder, "--out", tmp_path / "results.json", "--bootstrap", 200)
    assert result.exit_code == 0, result.output
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["overall"]["score"] >= 0.99
    assert set(results["categories"]) == {m["tag"] for m in load_shapeseval()}
    lo, hi = results["overall"]["ci95"]
    assert lo <= results["overall"]["score"] <= hi
    record = results["images"][0]
    assert {"file", "tag", "prompt", "correct", "clauses", "objects"} <= set(record)
    assert record["clauses"][0]["held"] is True


def test_score_resizes_other_sizes_and_reports_wrong_images(tmp_path):
    lines = load_shapeseval()[:: len(load_shapeseval()) // 12][:12]
    folder = _ground_truth_folder(tmp_path / "big", lines, size=96)
    wrong = Image.new("RGB", (96, 96), "white")  # an empty image is wrong for every prompt
    wrong.save(folder / "00000" / "samples" / "0001.png")
    result = _invoke("shapeseval", "score", folder, "--out", tmp_path / "r.json", "--bootstrap", 100)
    assert result.exit_code == 0, result.output
    results = json.loads((tmp_path / "r.json").read_text())
    verdicts = {r["file"]: r["correct"] for r in results["images"]}
    assert verdicts["00000/samples/0001.png"] is False
    assert sum(verdicts.values()) == len(lines)
    # The blank image is the only failure: its task's objects are missing, and the table says so.
    tag = lines[0]["tag"]
    assert results["failure_modes"][tag]["failed"] == 1
    assert set(results["failure_modes"][tag]["modes"]) == {"missing"}
    assert "missing" in result.output


def test_score_reads_jpeg_and_webp_samples_of_other_generators(tmp_path):
    lines = load_shapeseval()[:: len(load_shapeseval()) // 12][:12]
    folder = _ground_truth_folder(tmp_path / "mixed", lines, size=96)
    pngs = sorted(folder.glob("*/samples/0000.png"))
    for k, png in enumerate(pngs):  # re-encode, alternating formats and extension case
        suffix = (".jpg", ".JPEG", ".webp")[k % 3]
        Image.open(png).save(png.with_suffix(suffix), quality=90)
        png.unlink()
    result = _invoke("shapeseval", "score", folder, "--out", tmp_path / "r.json", "--bootstrap", 100)
    assert result.exit_code == 0, result.output
    results = json.loads((tmp_path / "r.json").read_text())
    assert results["n_images"] == len(lines)
    assert {Path(r["file"]).suffix for r in results["images"]} == {".jpg", ".JPEG", ".webp"}
    assert results["overall"]["score"] >= 0.99


@pytest.mark.parametrize(
    "breakage, message",
    [
        ("empty", "no prompt folders"),
        ("no_images", "no images found"),
        ("bad_json", "metadata.jsonl: not valid JSON"),
        ("bad_schema", "metadata.jsonl"),
        ("bad_image", "0000.png"),
    ],
)
def test_score_errors_name_the_problem(tmp_path, breakage, message):
    lines = load_shapeseval()[:2]
    folder = tmp_path / "f"
    folder.mkdir()
    if breakage != "empty":
        _ground_truth_folder(folder, lines)
    if breakage == "no_images":
        for png in folder.glob("*/samples/*.png"):
            png.unlink()
    if breakage == "bad_json":
        (folder / "00001" / "metadata.jsonl").write_text("{oops\n")
    if breakage == "bad_schema":
        (folder / "00001" / "metadata.jsonl").write_text(
            '{"tag": "colors", "include": [{"class": "dog", "count": 1}]}\n'
        )
    if breakage == "bad_image":
        (folder / "00001" / "samples" / "0000.png").write_bytes(b"\x89PNG broken")
    result = runner.invoke(app, ["shapeseval", "score", str(folder), "--out", str(tmp_path / "r.json")])
    assert result.exit_code == 2
    assert message in result.output
    assert not (tmp_path / "r.json").exists()


def test_world_render_and_generate(tmp_path):
    assert (
        _invoke(
            "world",
            "render",
            "--prompt",
            "a circle left of a square",
            "--out",
            tmp_path / "s.png",
            "-n",
            4,
        ).exit_code
        == 0
    )
    assert Image.open(tmp_path / "s.png").size[0] > 32
    bad = runner.invoke(app, ["world", "render", "--prompt", "a dog", "--out", str(tmp_path / "x.png")])
    assert bad.exit_code == 2 and "not a Shapes-world prompt" in bad.output
    assert _invoke("world", "generate", "--out", tmp_path / "ds", "-n", 50).exit_code == 0
    assert np.load(tmp_path / "ds" / "images.npy").shape == (50, 32, 32, 3)


def test_sample_and_eval_on_the_base_models(tmp_path):
    assert (
        _invoke(
            "sample", "--prompt", "two squares", "-n", 2, "--steps", 2, "--out", tmp_path / "g.png"
        ).exit_code
        == 0
    )
    assert (tmp_path / "g.png").is_file()
    unknown = runner.invoke(
        app, ["sample", "--prompt", "a pink hexagon", "-n", 1, "--steps", 1, "--out", str(tmp_path / "h.png")]
    )
    assert unknown.exit_code == 2 and "'pink'" in unknown.output
    none = runner.invoke(app, ["sample", "--prompt", "a circle", "-n", "0", "--out", str(tmp_path / "z.png")])
    assert none.exit_code == 2 and "-n must be at least 1, got 0" in none.output
    wrong_sampler = runner.invoke(
        app, ["sample", "--model", "base-flow", "--prompt", "a circle", "--sampler", "ddim"]
    )
    assert wrong_sampler.exit_code == 2 and "flow" in wrong_sampler.output

    subset = tmp_path / "subset.jsonl"
    subset.write_text(to_jsonl(load_shapeseval()[::50]))
    out = tmp_path / "eval"
    result = _invoke(
        "eval",
        "--model",
        "base-flow",
        "--out",
        out,
        "--samples-per-prompt",
        2,
        "--steps",
        3,
        "--prompts",
        subset,
    )
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert results["n_images"] == 2 * len(load_shapeseval()[::50])
    assert (out / "00000" / "samples" / "0001.png").is_file()


def test_pretrain_command_and_missing_model(tmp_path):
    result = _invoke(
        "pretrain",
        "--out",
        tmp_path / "run",
        "--architecture",
        "unet-xs",
        "--steps",
        2,
        "--batch-size",
        4,
        "--device",
        "cpu",
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run" / "model" / "diffalign_model.json").is_file()
    missing = runner.invoke(app, ["sample", "--model", str(tmp_path / "nope"), "--prompt", "a circle"])
    assert missing.exit_code == 2 and "no such folder" in missing.output


def test_eval_metric_suite(tmp_path):
    subset = tmp_path / "subset.jsonl"
    subset.write_text(to_jsonl(load_shapeseval()[::60]))
    out = tmp_path / "eval"
    args = [
        "eval",
        "--model",
        "base",
        "--out",
        out,
        "--samples-per-prompt",
        2,
        "--steps",
        3,
        "--prompts",
        subset,
    ]
    result = _invoke(
        *args,
        "--suite",
        "--reward",
        "shapes:faithfulness",
        "--baseline",
        "base",
        "--kl-base",
        "base",
        "--eta",
        1,
    )
    assert result.exit_code == 0, result.output
    suite = json.loads((out / "results.json").read_text())["suite"]
    # the same model against itself: an even win rate and no KL; the reward mean is the ShapesEval share
    assert suite["win_rate"]["win_rate"] == 0.5
    assert abs(suite["kl"]["kl"]) < 1e-6
    assert 0.0 <= suite["rewards"]["shapes:faithfulness"]["mean"] <= 1.0
    assert {"diversity", "fid"} <= set(suite)
    bad_out = tmp_path / "bad"
    bad_args = [str(a) for a in args[:4]] + [str(bad_out)] + [str(a) for a in args[5:]]
    bad = runner.invoke(app, [*bad_args, "--reward", "nonsense:thing"])
    assert bad.exit_code == 2 and "nonsense" in bad.output
    assert not list(bad_out.glob("*/samples/*.png"))  # refused before anything was sampled


def test_main_leaves_the_process_group_a_command_started(monkeypatch):
    """`diffalign` under `accelerate launch` must not exit with gloo's group alive (its threads can abort
    the interpreter at shutdown after a successful run)."""
    import torch.distributed as dist

    from diffalign import cli
    from tests.align.test_distributed import _free_port

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    monkeypatch.setattr("sys.argv", ["diffalign", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 0
    assert not dist.is_initialized()


def test_eval_with_a_reward_model_folder_on_the_default_device(tmp_path):
    """`--reward RM_DIR` and `--judge RM_DIR` with `--device auto` (the default) load the reward model on
    the resolved device (a reward folder used to receive the string "auto" and fail in torch)."""
    from diffalign.rewards.learned import RewardModelConfig, build_reward_model

    subset = tmp_path / "subset.jsonl"
    lines = load_shapeseval()[::100]
    subset.write_text(to_jsonl(lines))
    build_reward_model([m["prompt"] for m in lines], RewardModelConfig(), seed=0).save(tmp_path / "rm")
    out = tmp_path / "eval"
    args = ["eval", "--out", out, "--samples-per-prompt", 1, "--steps", 2, "--prompts", subset]
    result = _invoke(*args, "--reward", tmp_path / "rm", "--baseline", "base", "--judge", tmp_path / "rm")
    assert result.exit_code == 0, result.output
    suite = json.loads((out / "results.json").read_text())["suite"]
    assert np.isfinite(suite["rewards"][str(tmp_path / "rm")]["mean"])
    assert suite["win_rate"]["win_rate"] == 0.5  # the model against itself, judged by the reward model


def test_world_commands_refuse_what_cannot_be_drawn(tmp_path):
    for args, message in (
        (["world", "render", "--prompt", "a circle", "-n", "0"], "-n must be at least 1, got 0"),
        (["world", "render", "--prompt", "a circle", "--size", "0"], "--size must be at least 1"),
        (["world", "render", "--prompt", "a circle", "--out", str(tmp_path)], "a folder"),
        (["world", "generate", "--out", str(tmp_path / "d"), "-n", "-2"], "-n must be at least 1, got -2"),
    ):
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and message in " ".join(result.output.split()), (args, result.output)
    nested = tmp_path / "new" / "folder" / "s.png"
    result = runner.invoke(app, ["world", "render", "--prompt", "a circle", "-n", "2", "--out", str(nested)])
    assert result.exit_code == 0 and nested.is_file()


def test_a_file_that_is_not_a_database_is_a_store_error(tmp_path):
    from diffalign.prefs.store import PreferenceStore, StoreError

    bogus = tmp_path / "notes.txt"
    bogus.write_text("not a database, just some text that is long enough to have a header page" * 20)
    with pytest.raises(StoreError, match="cannot open the preference store"):
        PreferenceStore.open(bogus)
