"""Reward-model metrics: accuracy with a CI, ECE, Spearman, the scarcity curve."""

import json

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from diffalign.prefs.pairs import PreferencePairs
from diffalign.rewards.bt_training import RewardTrainConfig
from diffalign.rewards.rm_metrics import (
    data_scarcity_curve,
    evaluate_reward,
    expected_calibration_error,
    pairwise_accuracy,
    reward_margins,
    spearman,
)

torch.set_num_threads(1)


def test_pairwise_accuracy_skips_ties_and_counts_reward_ties_half():
    margin = torch.tensor([1.0, -1.0, 0.0, 2.0, 5.0])
    prob_a = torch.tensor([1.0, 1.0, 0.0, 0.0, 0.5])
    result = pairwise_accuracy(margin, prob_a)
    assert result["pairs"] == 4
    assert result["accuracy"] == pytest.approx((1 + 0 + 0.5 + 0) / 4)
    lo, hi = result["ci95"]
    assert 0 <= lo <= result["accuracy"] <= hi <= 1
    with pytest.raises(ValueError, match="non-tie"):
        pairwise_accuracy(torch.tensor([1.0]), torch.tensor([0.5]))
    with pytest.raises(ValueError, match="1 of 3 reward margins are not finite"):
        pairwise_accuracy(torch.tensor([1.0, float("nan"), 2.0]), torch.tensor([1.0, 1.0, 0.0]))
    with pytest.raises(ValueError, match="2 margins but 3 labels"):
        pairwise_accuracy(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 1.0, 0.0]))


def test_ece_of_calibrated_and_overconfident_predictors():
    g = torch.Generator().manual_seed(0)
    p = torch.rand(200_000, generator=g, dtype=torch.float64)
    labels = (torch.rand(200_000, generator=g, dtype=torch.float64) < p).double()
    assert expected_calibration_error(p, labels) < 0.01
    overconfident = torch.where(p > 0.5, 0.99, 0.01)
    assert expected_calibration_error(overconfident, labels) > 0.2
    # soft labels: predicting exactly the label probability is perfectly calibrated
    assert expected_calibration_error(p, p) < 1e-3
    # hand-computed on two bins: one pair predicted 0.9, won; symmetric copy 0.1, lost -> |0.9-1| each
    assert expected_calibration_error(torch.tensor([0.9]), torch.tensor([1.0])) == pytest.approx(0.1)


def test_spearman_agrees_with_scipy():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=50), rng.normal(size=50)
    y = x + 0.5 * y
    assert spearman(x, y) == pytest.approx(spearmanr(x, y).statistic)
    assert spearman(torch.arange(5.0), torch.arange(5.0) ** 3) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="at least two"):
        spearman([1.0], [2.0])


def _brightness_pairs(n, seed):
    """Pairs of flat grey images; the brighter one is preferred (the truth is mean brightness)."""
    g = torch.Generator().manual_seed(seed)
    la = torch.randint(0, 256, (n,), generator=g)
    lb = torch.randint(0, 256, (n,), generator=g)
    a = la.view(-1, 1, 1, 1).expand(n, 3, 32, 32).to(torch.uint8).clone()
    b = lb.view(-1, 1, 1, 1).expand(n, 3, 32, 32).to(torch.uint8).clone()
    prob = torch.where(la > lb, 1.0, torch.where(la < lb, 0.0, 0.5))
    return PreferencePairs(["a circle"] * n, a, b, prob)


def brightness(images, prompts):
    return images.mean(dim=(1, 2, 3))


def test_evaluate_reward_with_the_truth_as_reward():
    pairs = _brightness_pairs(100, seed=0)
    report = evaluate_reward(brightness, pairs, gold=brightness, ceiling={"oracle": 1.0})
    assert report["accuracy"] == 1.0 and report["spearman_gold"] == pytest.approx(1.0)
    assert report["ceiling"] == {"oracle": 1.0} and report["pairs"] == 100
    tied = PreferencePairs(pairs.prompts, pairs.images_a, pairs.images_b, pairs.prob_a.clone())
    tied.prob_a[:10] = 0.5
    report = evaluate_reward(brightness, tied)
    # ties count as pairs (ECE and the BT loss use them), not for the accuracy
    assert (report["pairs"], report["ties"], report["accuracy_pairs"]) == (100, 10, 90)
    ra, _ = reward_margins(brightness, pairs)
    assert torch.allclose(ra, pairs.images_a.float().mean(dim=(1, 2, 3)) / 255)


def test_data_scarcity_curve_trains_nested_subsets():
    pairs = _brightness_pairs(160, seed=1)
    test = _brightness_pairs(60, seed=2)
    rows = data_scarcity_curve(
        pairs, sizes=[16, 64, 500], test=test, config=RewardTrainConfig(epochs=2, batch_size=16)
    )
    assert [r["size"] for r in rows] == [16, 64]  # 500 does not fit
    assert all(0 <= r["accuracy"] <= 1 and r["pairs"] == int((~test.is_tie).sum()) for r in rows)


# --- the `diffalign reward` command line ----------------------------------------------------------


def _store_with(tmp_path, choices):
    """A store of rendered world images; `choices` lists 'image' (first shown chosen) or 'tie'."""
    from diffalign.prefs.records import NewComparison
    from diffalign.prefs.simulate import encode_png
    from diffalign.prefs.store import PreferenceStore
    from diffalign.world.dataset import ShapesGenerator

    gen = ShapesGenerator()
    batch = gen.sample(2 * len(choices), torch.Generator().manual_seed(0))
    images = (batch.images * 255).round().to(torch.uint8)
    items = [
        NewComparison(
            prompt=batch.prompts[2 * i],
            images=[encode_png(images[2 * i]), encode_png(images[2 * i + 1])],
            choice=c,
            chosen=0 if c == "image" else None,
            rater=f"r{i % 2}",
            rater_group="bold" if i % 2 else "calm",
            source="simulated",
        )
        for i, c in enumerate(choices)
    ]
    path = tmp_path / "prefs.db"
    with PreferenceStore.open(path) as store:
        store.add(items)
    return path


def _cli(*args):
    from typer.testing import CliRunner

    from diffalign.cli import app

    return CliRunner().invoke(app, ["reward", *[str(a) for a in args]])


def test_cli_errors_name_the_problem(tmp_path):
    result = _cli("train", "--store", tmp_path / "none.db", "--out", tmp_path / "rm")
    assert result.exit_code == 2 and "no such preference store" in result.output
    from diffalign.prefs.store import PreferenceStore

    PreferenceStore.open(tmp_path / "empty.db").close()
    result = _cli("train", "--store", tmp_path / "empty.db", "--out", tmp_path / "rm")
    assert result.exit_code == 2 and "the store is empty" in result.output
    ties = _store_with(tmp_path, ["tie"] * 4)
    result = _cli("train", "--store", ties, "--out", tmp_path / "rm")
    assert result.exit_code == 2 and "are ties" in result.output
    result = _cli("eval", "--reward", tmp_path / "missing_rm", "--store", ties)
    assert result.exit_code == 2 and "does not exist" in result.output


def test_cli_train_then_eval_on_the_held_out_split(tmp_path):
    store = _store_with(tmp_path, ["image"] * 12 + ["tie"] * 2)
    out = tmp_path / "rm"
    result = _cli(
        "train",
        "--store",
        store,
        "--out",
        out,
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--held-out",
        "0.3",
        "--rater-conditioned",
        "--device",
        "cpu",
    )
    assert result.exit_code == 0, result.output
    assert (out / "model.safetensors").is_file() and (out / "split.json").is_file()
    result = _cli("eval", "--reward", out, "--store", store, "--held-out-from", out, "--bootstrap", "100")
    assert result.exit_code == 0, result.output
    report = json.loads((out / "eval.json").read_text())
    assert report["pairs"] == len(json.loads((out / "split.json").read_text())["held_out_keys"])
    assert {"accuracy", "ci95", "ece", "spearman_gold", "ceiling"} <= set(report)
    assert "oracle ceiling" in result.output
    ens = tmp_path / "ens"
    result = _cli(
        "train", "--store", store, "--out", ens, "--ensemble", "2", "--epochs", "1", "--device", "cpu"
    )
    assert result.exit_code == 0, result.output
    assert (ens / "ensemble.json").is_file()
    assert json.loads((ens / "train.json").read_text())["bootstrap"] is True
    whole = tmp_path / "whole"
    args = ["train", "--store", store, "--out", whole, "--ensemble", "2", "--epochs", "1", "--no-bootstrap"]
    result = _cli(*args, "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert json.loads((whole / "train.json").read_text())["bootstrap"] is False


def test_cli_curve_and_world_pretraining(tmp_path):
    store = _store_with(tmp_path, ["image"] * 24)
    out = tmp_path / "curve.json"
    result = _cli(
        "curve", "--store", store, "--sizes", "6,12", "--epochs", "1", "--out", out, "--device", "cpu"
    )
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())
    assert [r["size"] for r in rows] == [6, 12] and all(0 <= r["accuracy"] <= 1 for r in rows)
    result = _cli("curve", "--store", store, "--sizes", "six")
    assert result.exit_code == 2 and "comma-separated integers" in result.output
    result = _cli(
        "train",
        "--store",
        store,
        "--out",
        tmp_path / "rm",
        "--epochs",
        "1",
        "--pretrain-steps",
        "2",
        "--device",
        "cpu",
    )
    assert result.exit_code == 0, result.output
    assert "pretrain step     2  matching loss" in result.output and "caption matching" in result.output
    wide = tmp_path / "wide"
    result = _cli(
        "train",
        "--store",
        store,
        "--out",
        wide,
        "--epochs",
        "1",
        "--pretrain-steps",
        "2",
        "--ensemble",
        "2",
        "--shared-pretraining",
        "--set",
        "model.channels=[8,16,32]",
        "--set",
        "model.convs_per_stage=2",
        "--device",
        "cpu",
    )
    assert result.exit_code == 0, result.output
    assert result.output.count("pretrain step") == 1  # pretrained once, for both members
    saved = json.loads((wide / "train.json").read_text())
    assert saved["ensemble"] == 2 and saved["shared_pretraining"] is True
    assert saved["model"]["channels"] == [8, 16, 32]
    from diffalign.rewards.ensemble import load_reward_dir

    members = load_reward_dir(wide).members
    assert members[0].config.channels == (8, 16, 32) and members[0].config.convs_per_stage == 2
    bad = _cli("train", "--store", store, "--out", tmp_path / "bad", "--set", "model.colour=1")
    assert bad.exit_code != 0 and "colour" in bad.output


def test_cli_pretraining_refuses_prompts_outside_the_world(tmp_path):
    from diffalign.prefs.records import NewComparison
    from diffalign.prefs.store import PreferenceStore
    from tests.prefs.helpers import image_bytes

    path = tmp_path / "real.db"
    with PreferenceStore.open(path) as prefs:
        prefs.add([NewComparison("a photo of a cat", [image_bytes(1), image_bytes(2)], "image", chosen=0)])
    result = _cli("train", "--store", path, "--out", tmp_path / "rm", "--pretrain-steps", "5")
    assert result.exit_code == 2 and "other prompts" in result.output


def test_cli_says_when_the_held_out_pairs_are_all_ties(tmp_path):
    # the seeded 25% split of 8 pairs keeps pairs 0 and 4 aside: make exactly those the ties
    store = _store_with(tmp_path, ["tie", "image", "image", "image", "tie", "image", "image", "image"])
    args = ["--store", store, "--out", tmp_path / "rm", "--epochs", "1", "--held-out", "0.25"]
    result = _cli("train", *args, "--device", "cpu")
    assert result.exit_code == 0, result.output
    held = json.loads((tmp_path / "rm" / "split.json").read_text())["held_out_keys"]
    from diffalign.prefs.store import PreferenceStore

    with PreferenceStore.open(store) as opened:
        assert {c.choice for c in opened.comparisons() if c.key in held} == {"tie"}
    assert "acc n/a (held-out pairs are all ties)" in result.output and "nan" not in result.output
