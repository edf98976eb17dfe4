"""Gao et al.'s over-optimisation fits, the analysis, and `diffalign overopt` on a small run folder."""

from __future__ import annotations

import json
import math
from dataclasses import asdict

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from diffalign.evaluate.overopt import (
    OveroptPoint,
    analyse,
    bon_kl,
    fit_gao,
    gao_bon,
    gao_rl,
    measurement_record,
    paired_changes,
    plot_overopt,
    reused_base_point,
    write_report,
)


@pytest.mark.parametrize(("form", "func"), [("rl", gao_rl), ("bon", gao_bon)])
def test_fit_recovers_known_parameters(form, func):
    rng = np.random.default_rng(0)
    a, b = 0.8, 0.3
    d = np.linspace(0.05, 4.0, 40)
    r = func(d, a, b) + rng.normal(0, 0.005, d.size)
    fit = fit_gao(d, r, form)
    assert fit.a == pytest.approx(a, abs=0.02)
    assert fit.b == pytest.approx(b, abs=0.02)
    assert fit.a_stderr < 0.02 and fit.b_stderr < 0.02
    # the peak from calculus, checked against a dense grid of the true curve
    grid = np.linspace(0.01, 6, 20000)
    assert fit.peak_d == pytest.approx(grid[np.argmax(func(grid, a, b))], rel=0.05)
    assert fit.peak_reward == pytest.approx(func(grid, a, b).max(), rel=0.05)


def test_fit_without_peak_reports_none():
    d = np.linspace(0.1, 2, 10)
    fit = fit_gao(d, 0.5 * d + 0.1 * d**2, "bon")  # b < 0: keeps rising
    assert fit.b < 0 and fit.peak_d is None


def test_bon_kl_matches_its_formula():
    assert bon_kl(1) == 0.0
    assert bon_kl(16) == pytest.approx(math.log(16) - 15 / 16)
    with pytest.raises(ValueError, match="n >= 1"):
        bon_kl(0)


def synthetic_points(with_penalised: bool = True) -> list[OveroptPoint]:
    """Gold follows d (1 - 0.5 log d) around 0.2 (peak at d = e); proxy keeps rising; the penalised
    reward peaks earlier than the proxy."""
    points = []
    for step, d in enumerate([0.0, 0.5, 1.0, 1.5, 2.0, 2.7, 3.5, 4.5, 6.0]):
        gold = 0.2 + float(gao_rl(np.array([d]), 1.0, 0.5)[0])
        penalised = 0.1 + float(gao_bon(np.array([d]), 1.0, 0.25)[0]) if with_penalised else None
        points.append(OveroptPoint(step * 10, d * d, 0.01, 0.3 + 0.8 * d, gold, penalised))
    return points


def test_analyse_finds_the_gold_peak_and_stop_step(tmp_path):
    report = analyse(synthetic_points(), "rl")
    assert report["fits"]["gold"]["a"] == pytest.approx(1.0, abs=1e-3)
    assert report["fits"]["gold"]["b"] == pytest.approx(0.5, abs=1e-3)
    assert report["fitted_peak"]["d"] == pytest.approx(math.e, rel=1e-3)
    assert report["fitted_peak"]["first_step_past_peak"] == 60  # d = 3.5, the first checkpoint past e
    assert report["stop_step"] == 50  # d = 2.7 has the highest observed gold
    assert report["penalised_stop"]["step"] == 40  # bon peak at d = 2: stops earlier than the proxy
    assert report["proxy_stop"]["step"] == 80
    assert report["penalised_stop"]["gold"] > report["proxy_stop"]["gold"]
    png = plot_overopt(report, tmp_path / "plot.png")
    assert png.stat().st_size > 5000


def test_changes_are_paired_sample_by_sample_with_the_base():
    base = OveroptPoint(0, 0.0, 0.0, 0.0, 2.5, values={"gold": [1, 2, 3, 4], "proxy": [0, 0, 0, 0]})
    # the same mean shift as a level comparison would see, but every sample moves by 0 or 1
    later = OveroptPoint(5, 0.1, 0.01, 1.0, 3.0, values={"gold": [2, 2, 4, 4], "proxy": [1, 1, 1, 1]})
    changes = paired_changes(later, base)
    assert changes["gold"]["mean"] == pytest.approx(0.5)
    assert changes["gold"]["stderr"] == pytest.approx(np.std([1, 0, 1, 0], ddof=1) / 2)
    low, high = changes["gold"]["ci95"]
    assert 0.0 <= low <= 0.5 <= high <= 1.0
    assert changes["proxy"] == {"mean": 1.0, "stderr": 0.0, "ci95": [1.0, 1.0]}
    # a reward the base lacks, or measured on other samples, is left out
    odd = OveroptPoint(5, 0.1, 0.01, 1.0, 3.0, values={"gold": [2, 2, 4], "extra": [1, 2, 3, 4]})
    assert paired_changes(odd, base) == {}
    points = [base, later, OveroptPoint(9, 0.4, 0.01, 2.0, 2.0, values={"gold": [1, 1, 3, 3]})]
    report = analyse(points, "rl")
    assert report["gold_peak"]["step"] == 5
    assert report["gold_peak"]["vs_base"]["mean"] == pytest.approx(0.5)
    assert report["points"][2]["vs_base"]["gold"]["mean"] == pytest.approx(-0.5)
    assert report["points"][0]["vs_base"]["gold"]["mean"] == 0.0


def test_analyse_needs_the_base_point():
    with pytest.raises(ValueError, match="step 0"):
        analyse(synthetic_points()[1:], "rl")


def test_one_checkpoint_is_reported_without_a_fit(tmp_path):
    base = OveroptPoint(0, 0.0, 0.0, 1.0, 2.0, values={"gold": [2.0, 2.0, 2.0, 2.0]})
    tuned = OveroptPoint(7, 0.25, 0.01, 1.5, 2.5, values={"gold": [2.5, 2.0, 3.0, 2.5]})
    report = analyse([base, tuned], "rl")
    assert report["fits"] == {} and report["fitted_peak"] is None and "two checkpoints" in report["fit_note"]
    assert report["gold_peak"]["step"] == 7
    assert report["gold_peak"]["vs_base"]["mean"] == pytest.approx(0.5)
    json_path, png_path = write_report(report, tmp_path)
    assert json.loads(json_path.read_text())["points"][1]["vs_base"]["gold"]["mean"] == pytest.approx(0.5)
    assert png_path.stat().st_size > 0


REWARDS = """
def brightness(images, prompts):
    return images.mean(dim=(1, 2, 3))


def redness(images, prompts):
    return images[:, 0].mean(dim=(1, 2)) - images[:, 1:].mean(dim=(1, 2, 3))
"""


def make_run(tmp_path):
    """A run folder of a 16x16 unet-xs model with two checkpoints whose weights drift from the base."""
    from tests.align.helpers import save_tiny_model

    model_dir = save_tiny_model(tmp_path / "model", "epsilon")
    run = tmp_path / "run"
    run.mkdir()
    config = {"model": str(model_dir), "lora_rank": 0, "guidance_scale": 2.0}
    (run / "config.json").write_text(json.dumps({"config": config}))
    from diffalign.models.tiny import TinyDiffusionModel

    base = TinyDiffusionModel.load(model_dir)
    gen = torch.Generator().manual_seed(1)
    for step, scale in [(2, 0.02), (4, 0.05)]:
        folder = run / "checkpoints" / f"step-{step:07d}"
        folder.mkdir(parents=True)
        weights = {
            name: (p.detach() + scale * torch.randn(p.shape, generator=gen)).contiguous()
            for name, p in base.unet.named_parameters()
        }
        save_file(weights, str(folder / "weights.safetensors"))
        (folder / "state.json").write_text(json.dumps({"step": step, "data_cursor": 0}))
    (tmp_path / "rewards.py").write_text(REWARDS)
    return run


@pytest.mark.slow
def test_overopt_cli_measures_checkpoints_and_writes_json_and_plot(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from diffalign.cli import app
    from diffalign.models import registry

    torch.set_num_threads(1)
    run = make_run(tmp_path)
    loads = []
    original_load = registry.load_model
    monkeypatch.setattr(
        registry, "load_model", lambda spec, *a, **k: loads.append(spec) or original_load(spec, *a, **k)
    )
    rewards = tmp_path / "rewards.py"
    args = ["overopt", str(run), "--gold", f"{rewards}:redness", "--proxy", f"{rewards}:brightness"]
    args += ["--num-prompts", "4", "--steps", "3", "--device", "cpu", "--out", str(tmp_path / "out")]
    args += ["--also", "gold-quality"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert loads == [str(tmp_path / "model")]  # the reference model is loaded once
    report = json.loads((tmp_path / "out" / "overopt.json").read_text())
    points = report["points"]
    assert [p["step"] for p in points] == [0, 2, 4]
    # every reward per sample, the extra one's mean beside the fitted two, changes paired with the base
    assert all(sorted(p["values"]) == ["gold", "gold-quality", "proxy"] for p in points)
    assert all(len(v) == 4 for p in points for v in p["values"].values())
    for p in points:
        assert p["extra"]["gold-quality"] == pytest.approx(np.mean(p["values"]["gold-quality"]))
        assert p["gold"] == pytest.approx(np.mean(p["values"]["gold"]))
        change = np.subtract(p["values"]["gold"], points[0]["values"]["gold"]).mean()
        assert p["vs_base"]["gold"]["mean"] == pytest.approx(change)
    assert "gold-quality" in result.output
    # judged with the run's own guidance unless told otherwise
    assert "guidance 2" in result.output
    assert report["measurement"]["sampler"]["guidance_scale"] == 2.0
    assert points[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    # larger weight drift -> larger KL to the base model
    assert 0 < points[1]["kl"] < points[2]["kl"]
    assert (tmp_path / "out" / "overopt.png").stat().st_size > 5000
    # a second call reuses the base point: the same report without sampling the base again
    earlier = str(tmp_path / "out" / "overopt.json")
    args[args.index("--out") + 1] = str(tmp_path / "again")
    again = CliRunner().invoke(app, [*args, "--base-from", earlier, "--checkpoint", "4"])
    assert again.exit_code == 0, again.output
    assert "taken from" in again.output
    second = json.loads((tmp_path / "again" / "overopt.json").read_text())["points"]
    assert [p["step"] for p in second] == [0, 4]  # only the checkpoint asked for
    assert [p["values"] for p in second] == [points[0]["values"], points[2]["values"]]
    missing = CliRunner().invoke(app, [*args, "--base-from", earlier, "--checkpoint", "3"])
    assert missing.exit_code == 2 and "no checkpoint at step(s) [3]" in missing.output
    # other settings are refused before anything is sampled, naming what differs
    refused = CliRunner().invoke(app, [*args, "--seed", "1", "--base-from", earlier])
    assert refused.exit_code == 2 and "prompts" in refused.output
    unguided = CliRunner().invoke(app, [*args, "--guidance", "1", "--base-from", earlier])
    assert unguided.exit_code == 2 and "sampler" in unguided.output


def test_a_base_point_is_reused_only_with_the_same_settings(tmp_path):
    from diffalign.diffusion.sampling import SamplerConfig

    reward_dir = tmp_path / "rm"
    reward_dir.mkdir()
    (reward_dir / "weights.bin").write_bytes(b"one")
    config = SamplerConfig(num_steps=5)
    rewards = {"proxy": f"penalised:{reward_dir}", "gold": "gold-utility"}
    record = measurement_record("base", ["a circle", "a square"], [0, 1], config, rewards)
    base = OveroptPoint(0, 0.0, 0.0, 0.5, 1.0, values={"proxy": [0.4, 0.6], "gold": [1.0, 1.0]})
    report = {"points": [asdict(base)], "measurement": record}
    assert reused_base_point(report, record) == base
    prompts, seeds = ["a circle", "a square"], [0, 1]
    cases = [
        (("base-flow", prompts, seeds, config, rewards), "reference"),
        (("base", prompts, seeds, config, rewards, "cuda"), "device"),
        (("base", prompts[::-1], seeds, config, rewards), "prompts"),
        (("base", prompts, [0, 2], config, rewards), "seeds"),
        (("base", prompts, seeds, SamplerConfig(num_steps=6), rewards), "sampler"),
        (("base", prompts, seeds, config, {"proxy": "gold-utility"}), "rewards"),
    ]
    for other, named in cases:
        with pytest.raises(ValueError, match=named):
            reused_base_point(report, measurement_record(*other))
    # the same spec over changed files is another reward
    (reward_dir / "weights.bin").write_bytes(b"two")
    changed = measurement_record("base", ["a circle", "a square"], [0, 1], config, rewards)
    with pytest.raises(ValueError, match="reward 'proxy'"):
        reused_base_point(report, changed)
    for older in ({"points": [asdict(base)]}, [asdict(base)]):
        with pytest.raises(ValueError, match="no measurement"):
            reused_base_point(older, record)


def test_overopt_cli_names_a_missing_run_folder(tmp_path):
    from typer.testing import CliRunner

    from diffalign.cli import app

    result = CliRunner().invoke(
        app, ["overopt", str(tmp_path / "nope"), "--gold", "gold-quality", "--proxy", "gold-quality"]
    )
    assert result.exit_code == 2
    assert "config.json" in result.output
