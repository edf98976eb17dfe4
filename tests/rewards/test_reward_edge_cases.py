"""Reward-model training and evaluation on data nobody planned for: rankings of more than two images,
runaway learning rates, folders reused, options given through --set, and arguments out of range."""

import json

import pytest
import torch

from diffalign.prefs.pairs import PreferencePairs
from diffalign.rewards.bt_training import NonFiniteLossError, RewardTrainConfig, train_reward_model
from diffalign.rewards.learned import RewardModelConfig, build_reward_model
from tests.rewards.test_bt_training import colour_pairs
from tests.rewards.test_rm_metrics import _cli, _store_with

torch.set_num_threads(1)

TINY = RewardModelConfig(channels=(4, 8), text_dim=8, text_heads=2, hidden=8)


def _ranked_pairs(comparisons: int, images: int) -> PreferencePairs:
    """`comparisons` rankings of `images` images each, expanded to images - 1 pairs per key."""
    n = comparisons * (images - 1)
    keys = [f"k{i // (images - 1)}" for i in range(n)]
    blank = torch.zeros(n, 3, 4, 4, dtype=torch.uint8)
    return PreferencePairs(["p"] * n, blank, blank.clone(), torch.ones(n), keys=keys)


def test_split_keeps_the_pairs_of_one_ranking_on_one_side():
    pairs = _ranked_pairs(10, 4)  # 30 pairs, 3 per comparison
    for seed in range(5):
        train, held = pairs.split(0.2, seed=seed)
        assert not set(train.keys) & set(held.keys)
        assert len(train) + len(held) == 30 and len(held) == 6  # two whole comparisons
    one = _ranked_pairs(1, 3)  # one comparison cannot be split: everything trains
    train, held = one.split(0.5)
    assert len(train) == 2 and len(held) == 0


def test_split_of_distinct_keys_is_the_seeded_permutation():
    n = 20
    pairs = PreferencePairs(
        [f"p{i}" for i in range(n)],
        torch.zeros(n, 3, 2, 2, dtype=torch.uint8),
        torch.zeros(n, 3, 2, 2, dtype=torch.uint8),
        torch.ones(n),
        keys=[f"k{i}" for i in range(n)],
    )
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(3)).tolist()
    train, held = pairs.split(0.25, seed=3)
    assert held.prompts == [f"p{i}" for i in perm[:5]] and train.prompts == [f"p{i}" for i in perm[5:]]


@pytest.mark.parametrize(
    ("held_out", "message"),
    [(0.0, "the trained model's scores are not finite"), (0.25, "held-out loss became nan")],
)
def test_a_model_that_scores_nan_after_its_last_step_is_not_returned(held_out, message):
    # lr 1e20: the one step's loss is finite, the weights it leaves score NaN
    config = RewardTrainConfig(
        lr=1e20, epochs=1, batch_size=16, warmup_steps=1, held_out_fraction=held_out, model=TINY
    )
    with pytest.raises(NonFiniteLossError, match=message):
        train_reward_model(colour_pairs(8), config)


def test_cli_train_into_an_ensemble_folder_replaces_it(tmp_path):
    from diffalign.rewards.ensemble import load_reward_dir
    from diffalign.rewards.learned import LearnedReward

    store = _store_with(tmp_path, ["image"] * 6)
    out = tmp_path / "rm"
    common = ["--store", store, "--out", out, "--epochs", "1", "--device", "cpu"]
    small = ["--set", "model.channels=[4,8]", "--set", "model.hidden=8"]
    assert _cli("train", *common, "--ensemble", "2", *small).exit_code == 0
    (out / "notes.txt").write_text("mine")
    result = _cli("train", *common, *small)
    assert result.exit_code == 0, result.output
    assert not (out / "ensemble.json").exists() and not (out / "member_0").exists()
    assert isinstance(load_reward_dir(out), LearnedReward)
    assert (out / "notes.txt").read_text() == "mine"  # files that are not the model's are kept
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left


def test_cli_train_refuses_a_file_as_out_before_training(tmp_path):
    store = _store_with(tmp_path, ["image"] * 4)
    (tmp_path / "taken").write_text("x")
    result = _cli("train", "--store", store, "--out", tmp_path / "taken")
    assert result.exit_code == 2 and "not a folder" in result.output and "epoch" not in result.output


def test_cli_set_reaches_the_options_the_command_also_has(tmp_path):
    store = _store_with(tmp_path, ["image"] * 4)
    out = tmp_path / "rm"
    args = ["--store", store, "--out", out, "--device", "cpu", "--set", "model.channels=[4,8]"]
    result = _cli("train", *args, "--set", "epochs=2", "--set", "seed=3", "--set", "held_out_fraction=0")
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "train.json").read_text())
    assert saved["config"]["epochs"] == 2 and len(saved["history"][0]) == 2
    assert saved["config"]["seed"] == 3 and json.loads((out / "split.json").read_text())["seed"] == 3
    assert saved["config"]["held_out_fraction"] == 0
    result = _cli("train", *args, "--set", "epochs=2", "--epochs", "1")  # the option given wins
    assert result.exit_code == 0, result.output
    assert json.loads((out / "train.json").read_text())["config"]["epochs"] == 1


def test_cli_held_out_split_of_a_ranking_store_keeps_comparisons_whole(tmp_path):
    from diffalign.prefs.records import NewComparison
    from diffalign.prefs.store import PreferenceStore
    from tests.prefs.helpers import image_bytes

    path = tmp_path / "ranked.db"
    with PreferenceStore.open(path) as prefs:
        prefs.add(
            [
                NewComparison(f"a photo of cat {i}", [image_bytes(3 * i + j) for j in range(3)], "image", 0)
                for i in range(10)
            ]
        )
    out = tmp_path / "rm"
    args = ["--store", path, "--out", out, "--epochs", "1", "--held-out", "0.2", "--device", "cpu"]
    assert _cli("train", *args, "--set", "model.channels=[4,8]").exit_code == 0
    held = json.loads((out / "split.json").read_text())["held_out_keys"]
    result = _cli("eval", "--reward", out, "--store", path, "--held-out-from", out, "--bootstrap", "10")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "eval.json").read_text())["pairs"] == 2 * len(held) == 4


def test_cli_arguments_out_of_range_are_errors_not_tracebacks(tmp_path):
    store = _store_with(tmp_path, ["image"] * 4)
    model = tmp_path / "rm"
    build_reward_model(["a b"], TINY).save(model)
    cases = [
        (("train", "--store", store, "--out", tmp_path / "x", "--size", "0"), "--size must be at least 1"),
        (("eval", "--reward", model, "--store", store, "--size", "-2"), "--size must be at least 1"),
        (("eval", "--reward", model, "--store", store, "--bins", "0"), "--bins must be at least 1"),
        (("eval", "--reward", model, "--store", store, "--bootstrap", "0"), "--bootstrap must be at least 1"),
        (("eval", "--reward", model, "--store", store, "--out", tmp_path), "is a folder"),
        (("curve", "--store", store, "--sizes", "2", "--test-fraction", "0"), "--test-fraction must be in"),
        # flags that would change nothing are refused, not passed over
        (("train", "--store", store, "--out", tmp_path / "x", "--no-bootstrap"), "needs --ensemble K > 1"),
        (
            ("train", "--store", store, "--out", tmp_path / "x", "--shared-pretraining"),
            "needs --ensemble K > 1",
        ),
        (
            ("train", "--store", store, "--out", tmp_path / "x", "--ensemble", "2", "--shared-pretraining"),
            "--pretrain-steps N > 0",
        ),
    ]
    for args, message in cases:
        result = _cli(*args)
        assert result.exit_code == 2 and message in result.output, (args, result.output)


def test_cli_eval_of_a_model_scoring_nan_and_of_an_empty_split(tmp_path):
    store = _store_with(tmp_path, ["image"] * 4)
    broken = build_reward_model(["a b"], TINY)
    torch.nn.init.constant_(broken.net.out.bias, float("nan"))
    broken.save(tmp_path / "nan")
    result = _cli("eval", "--reward", tmp_path / "nan", "--store", store, "--out", tmp_path / "e.json")
    assert result.exit_code == 2 and "not finite" in result.output
    build_reward_model(["a b"], TINY).save(tmp_path / "all")
    (tmp_path / "all" / "split.json").write_text(json.dumps({"seed": 0, "held_out_keys": []}))
    result = _cli("eval", "--reward", tmp_path / "all", "--store", store, "--held-out-from", tmp_path / "all")
    assert result.exit_code == 2 and "held no comparison out" in result.output
    result = _cli("eval", "--reward", tmp_path / "all", "--store", store, "--bootstrap", "10")
    assert result.exit_code == 0 and "not in the model's vocabulary" in result.output


def test_curve_refuses_a_test_set_of_ties_before_training(monkeypatch):
    import diffalign.rewards.rm_metrics as rm

    def no_training(*args, **kwargs):
        raise AssertionError("trained before checking the test set")

    monkeypatch.setattr(rm, "train_reward_model", no_training)
    pairs = colour_pairs(8)
    test = pairs.select(range(3))
    test.prob_a[:] = 0.5
    with pytest.raises(ValueError, match="no pair with a winner"):
        rm.data_scarcity_curve(pairs, [4], test=test)


def test_prompts_in_other_scripts_have_words(tmp_path):
    from diffalign.rewards.learned import LearnedReward

    model = build_reward_model(["一只猫", "一只狗", "un café noir"], TINY)
    ids, _ = model.vocab.encode(["一只猫", "一只狗", "un café noir"], 4)
    assert len({tuple(row.tolist()) for row in ids}) == 3  # no longer all <cls> alone
    assert "café" in model.vocab.words
    assert model.vocab.split("A red CIRCLE, left_of 2 squares") == [
        "a",
        "red",
        "circle",
        "left",
        "of",
        "2",
        "squares",
    ]
    model.save(tmp_path / "rm")
    assert LearnedReward.load(tmp_path / "rm").vocab.word_pattern == "unicode"
    # a folder saved before the rule was recorded keeps the ASCII rule it was trained with
    meta = json.loads((tmp_path / "rm" / "config.json").read_text())
    del meta["word_pattern"]
    (tmp_path / "rm" / "config.json").write_text(json.dumps(meta))
    old = LearnedReward.load(tmp_path / "rm")
    assert old.vocab.word_pattern == "ascii" and old.vocab.split("un café") == ["un", "caf"]


@pytest.mark.parametrize("members", [[], "member_0", [0]])
def test_an_ensemble_file_without_members_names_the_folder(tmp_path, members):
    from diffalign.rewards.ensemble import RewardEnsemble

    build_reward_model(["a b"], TINY).save(tmp_path / "member_0")
    (tmp_path / "ensemble.json").write_text(json.dumps({"members": members}))
    with pytest.raises(ValueError, match=r"bad ensemble\.json: 'members' must be a non-empty list"):
        RewardEnsemble.load(tmp_path)
