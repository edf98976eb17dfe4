"""Online DPO and SPIN: the round driver, the reference schedule, labelling, resume, and the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from diffalign.align.dpo import PreferenceDataError
from diffalign.align.online_dpo import OnlineDPOConfig, train_online_dpo
from diffalign.align.rounds import reference_round, round_dir
from diffalign.align.run_dir import RunDirError
from diffalign.align.spin import SPINConfig, real_from_pairs, real_from_world, train_spin
from diffalign.cli.align import app
from diffalign.models.registry import load_model
from diffalign.prefs.store import PreferenceStore
from tests.align.helpers import config, make_pairs

ROUND = dict(steps=2, batch_size=2, checkpoint_every=1)


def online(model_dir: Path, **overrides) -> OnlineDPOConfig:
    values = dict(dpo=config(model_dir, **ROUND), rounds=2, pairs_per_round=6, sample_steps=2, sample_batch=8)
    values.update(overrides)
    return OnlineDPOConfig(**values)


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.unet.state_dict().items()}


def rounds_lines(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "rounds.jsonl").read_text().splitlines()]


def test_reference_schedule():
    assert [reference_round(r, 1) for r in range(4)] == [0, 1, 2, 3]
    assert [reference_round(r, 2) for r in range(5)] == [0, 0, 2, 2, 4]
    assert [reference_round(r, 0) for r in range(3)] == [None, None, None]


def test_set_reference_uses_the_other_models_weights(eps_model_dir):
    model, other = load_model(str(eps_model_dir)), load_model(str(eps_model_dir))
    with torch.no_grad():
        for p in other.unet.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.set_reference(other)
    x, t = torch.randn(2, *model.latent_shape), torch.tensor([100.0, 700.0])
    cond = model.encode_prompts(["a red circle", "two blue squares"])
    with torch.no_grad():
        expected = other.predict(x, t, cond)
        own = model.predict(x, t, cond)
    assert torch.allclose(model.reference_predict(x, t, cond), expected)
    assert not torch.allclose(own, expected)
    model.enable_lora(2)
    with pytest.raises(ValueError, match="LoRA"):
        model.set_reference(other)


def test_online_dpo_rounds_label_train_and_chain(tmp_path, eps_model_dir):
    run = tmp_path / "online"
    model = train_online_dpo(online(eps_model_dir), run)
    lines = rounds_lines(run)
    assert [line["round"] for line in lines] == [0, 1]
    assert [line["labelled"] for line in lines] == [6, 6] and lines[1]["labels_so_far"] == 12
    # every pair is in the run's store, under the round's own keys
    comparisons = list(PreferenceStore.open(run / "prefs.db").comparisons())
    assert len(comparisons) == 12 and len({c.key for c in comparisons}) == 12
    # round 1 starts from round 0's model and (reference_every=1) uses it as its reference
    second = json.loads((round_dir(run, 1) / "config.json").read_text())
    assert second["config"]["model"] == str(round_dir(run, 0))
    assert second["config"]["reference"] is None
    assert second["config"]["runtime"]["seed"] == 1
    # the run's model is the last round's, and it moved away from the start
    final = load_model(str(run))
    last = load_model(str(round_dir(run, 1)))
    assert all(torch.equal(a, b) for a, b in zip(weights(final).values(), weights(last).values()))
    start = load_model(str(eps_model_dir))
    assert any(not torch.equal(a, b) for a, b in zip(weights(final).values(), weights(start).values()))
    assert all(torch.equal(a, b) for a, b in zip(weights(model).values(), weights(final).values()))


def test_online_dpo_keeps_the_base_reference_when_asked(tmp_path, eps_model_dir):
    run = tmp_path / "online"
    train_online_dpo(online(eps_model_dir, reference_every=0, accumulate=True), run)
    second = json.loads((round_dir(run, 1) / "config.json").read_text())
    assert second["config"]["reference"] == str(eps_model_dir)
    assert rounds_lines(run)[1]["train_pairs"] > rounds_lines(run)[0]["train_pairs"]


def test_online_dpo_resume_reproduces_an_interrupted_round(tmp_path, eps_model_dir):
    run = tmp_path / "online"
    cfg = online(eps_model_dir)
    train_online_dpo(cfg, run)
    expected = weights(load_model(str(run)))
    # an interruption in round 1 after its first step: its later checkpoint, model and log line gone
    last = round_dir(run, 1)
    checkpoints = sorted((last / "checkpoints").iterdir())
    shutil.rmtree(checkpoints[-1])
    shutil.rmtree(last / "model")
    shutil.rmtree(run / "model")
    lines = (run / "rounds.jsonl").read_text().splitlines()
    (run / "rounds.jsonl").write_text(lines[0] + "\n")
    train_online_dpo(cfg, run, resume=True)
    resumed = weights(load_model(str(run)))
    assert all(torch.equal(expected[k], resumed[k]) for k in expected)
    assert len(list(PreferenceStore.open(run / "prefs.db").comparisons())) == 12  # nothing labelled twice
    with pytest.raises(RunDirError, match="pairs_per_round"):
        train_online_dpo(online(eps_model_dir, pairs_per_round=7), run, resume=True)
    with pytest.raises(RunDirError, match="already holds a run"):
        train_online_dpo(cfg, run)


def _reward_file(tmp_path: Path) -> str:
    path = tmp_path / "brightness.py"
    path.write_text("def brightness(images, prompts):\n    return images.mean(dim=(1, 2, 3))\n")
    return f"{path}:brightness"


def test_online_dpo_with_a_reward_labeller(tmp_path, eps_model_dir):
    run = tmp_path / "online"
    train_online_dpo(online(eps_model_dir, rounds=1, labeller=_reward_file(tmp_path)), run)
    for comparison in PreferenceStore.open(run / "prefs.db").comparisons():
        rewards = comparison.meta["rewards"]
        assert comparison.chosen == (0 if rewards[0] > rewards[1] else 1)
        assert comparison.source == "online-reward"
    # a margin no pair clears leaves only ties: a clear error, not an empty run
    with pytest.raises(PreferenceDataError, match="tie"):
        train_online_dpo(
            online(eps_model_dir, rounds=1, labeller=_reward_file(tmp_path), tie_margin=10.0),
            tmp_path / "ties",
        )


def test_online_dpo_trains_its_labellers_ties_with_soft_labels(tmp_path, eps_model_dir):
    labeller = _reward_file(tmp_path)
    train_online_dpo(online(eps_model_dir, rounds=1, labeller=labeller), tmp_path / "probe")
    gaps = sorted(
        abs(c.meta["rewards"][0] - c.meta["rewards"][1])
        for c in PreferenceStore.open(tmp_path / "probe" / "prefs.db").comparisons()
    )
    margin = (gaps[2] + gaps[3]) / 2  # half the round's pairs become ties
    lines = {}
    for soft in (False, True):
        run = tmp_path / f"soft-{soft}"
        dpo = config(eps_model_dir, **ROUND, soft_labels=soft)
        train_online_dpo(online(eps_model_dir, rounds=1, labeller=labeller, tie_margin=margin, dpo=dpo), run)
        lines[soft] = rounds_lines(run)[0]
    assert lines[False]["ties"] == lines[True]["ties"] == 3
    assert lines[False]["train_pairs"] == 3 and lines[True]["train_pairs"] == 6
    assert 0 < lines[True]["final"]["decisive_share"] < 1 and "decisive_share" not in lines[False]["final"]


def test_reward_labelling_shares_make_the_whole_round_between_them(tmp_path, eps_model_dir):
    """A process's share of reward-labelled pairs (pair i on process i % N): two shares write the pairs
    one process writes, with the same rewards and choices (one pair a sampling call: the same pixels)."""
    from diffalign.align.online_dpo import label_with_reward, sampler_for

    model = load_model(str(eps_model_dir))
    redness = lambda images, prompts: images[:, 0].mean(dim=(1, 2)) - images[:, 2].mean(dim=(1, 2))  # noqa: E731
    options = dict(seed=2, reward_name="red", sampler_config=sampler_for(model, 2, None), batch_size=2)
    whole, shared = PreferenceStore.open(tmp_path / "whole.db"), PreferenceStore.open(tmp_path / "shared.db")
    assert label_with_reward(model, redness, whole, 5, **options)["sampled"] == 5
    counts = [
        label_with_reward(model, redness, shared, 5, share=(k, 2), **options)["sampled"] for k in (0, 1)
    ]
    assert counts == [3, 2]
    fields = lambda c: (c.prompt, c.image_hashes, c.chosen, c.meta["rewards"])  # noqa: E731
    assert {c.key: fields(c) for c in shared.comparisons()} == {c.key: fields(c) for c in whole.comparisons()}
    with pytest.raises(ValueError, match="share must be"):
        label_with_reward(model, redness, shared, 5, share=(3, 2), **options)


def test_online_dpo_config_errors(eps_model_dir):
    with pytest.raises(ValueError, match="rounds"):
        online(eps_model_dir, rounds=0)
    with pytest.raises(ValueError, match="method"):
        online(eps_model_dir, dpo=config(eps_model_dir, method="kto"))


def test_spin_trains_real_against_own_samples(tmp_path, eps_model_dir):
    real = real_from_world(6, 16)
    run = tmp_path / "spin"
    train_spin(SPINConfig(dpo=config(eps_model_dir, **ROUND), rounds=2, sample_steps=2), real, run)
    lines = rounds_lines(run)
    assert [line["round"] for line in lines] == [0, 1] and lines[0]["examples"] == 6
    record = json.loads((round_dir(run, 1) / "config.json").read_text())
    assert record["data"]["examples"] == 6 and record["config"]["model"] == str(round_dir(run, 0))
    start, final = weights(load_model(str(eps_model_dir))), weights(load_model(str(run)))
    assert any(not torch.equal(start[k], final[k]) for k in start)


def test_real_from_pairs_takes_winners_and_refuses_ties_only():
    pairs = make_pairs(6, ties=2)
    real = real_from_pairs(pairs)
    assert len(real.prompts) == 4
    for i in range(4):
        winner = pairs.images_a[i] if pairs.prob_a[i] == 1.0 else pairs.images_b[i]
        assert torch.equal(real.images[i], winner)
    with pytest.raises(PreferenceDataError, match="ties"):
        real_from_pairs(pairs.select([4, 5]))


def test_cli_online_dpo_and_spin(tmp_path, eps_model_dir):
    runner = CliRunner()
    fast = [
        "dpo.steps=1",
        "dpo.batch_size=2",
        "dpo.log_with=none",
        "dpo.checkpoint_every=0",
        "sample_steps=2",
    ]
    out = tmp_path / "online"
    result = runner.invoke(
        app,
        [
            "online-dpo",
            "--out",
            str(out),
            "--model",
            str(eps_model_dir),
            "--device",
            "cpu",
            "rounds=1",
            "pairs_per_round=4",
            *fast,
        ],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    assert "round 0" in result.output and (out / "model").is_dir()
    out = tmp_path / "spin"
    result = runner.invoke(
        app,
        ["spin", "--out", str(out), "--world", "4", "--model", str(eps_model_dir), "rounds=1", *fast],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    assert (out / "model").is_dir()
    both = runner.invoke(app, ["spin", "--out", str(tmp_path / "x"), "--world", "4", "--store", "p.db"])
    assert both.exit_code == 2 and "exactly one" in both.output
    bad = runner.invoke(app, ["online-dpo", "--out", str(tmp_path / "y"), "nonsense=1"])
    assert bad.exit_code == 2 and "nonsense" in bad.output


def test_each_round_loads_its_starting_model_once(tmp_path, eps_model_dir, monkeypatch):
    """The model that samples a round's pairs is the one that trains on them (no second load)."""
    import diffalign.align.policy_setup as policy_setup
    import diffalign.align.rounds as rounds

    loads: list[str] = []

    def counting(module):
        original = module.load_model

        def load(spec, *args, **kwargs):
            loads.append(str(spec))
            return original(spec, *args, **kwargs)

        monkeypatch.setattr(module, "load_model", load)

    counting(rounds)
    counting(policy_setup)
    train_online_dpo(online(eps_model_dir), tmp_path / "online")
    assert loads == [str(eps_model_dir), str(round_dir(tmp_path / "online", 0))]


def test_a_loaded_model_on_another_device_is_refused(eps_model_dir):
    from diffalign.align.policy_setup import same_device

    model = load_model(str(eps_model_dir))
    assert same_device(model.device, "cpu")
    with pytest.raises(ValueError, match="is on cpu, the trainer on meta"):
        policy_setup_load(eps_model_dir, model)


def policy_setup_load(model_dir, loaded):
    from diffalign.align.policy_setup import load_policy
    from diffalign.models.diffusers_adapters.common import AdapterConfig

    return load_policy(
        str(model_dir), "meta", lora_rank=0, lora_alpha=0.0, pipeline=AdapterConfig(), loaded=loaded
    )


def test_real_from_stored_pairs_reads_only_the_chosen_images(tmp_path):
    from diffalign.prefs.records import NewComparison
    from diffalign.prefs.simulate import encode_png

    pairs = make_pairs(6, ties=1)
    store = PreferenceStore.open(tmp_path / "p.db")
    store.add(
        [
            NewComparison(
                prompt=pairs.prompts[i],
                images=[encode_png(pairs.images_a[i]), encode_png(pairs.images_b[i])],
                choice="tie" if float(pairs.prob_a[i]) == 0.5 else "image",
                chosen=None if float(pairs.prob_a[i]) == 0.5 else (0 if float(pairs.prob_a[i]) == 1 else 1),
                rater="r",
                source="t",
                key=f"t:{i}",
            )
            for i in range(6)
        ]
    )
    refs = store.pair_references(size=16)
    reads: list[str] = []

    class Counting:
        def load_image(self, sha256, size=None):
            reads.append(sha256)
            return store.load_image(sha256, size)

    refs.reader = Counting()
    stored = real_from_pairs(refs, limit=3)
    in_memory = real_from_pairs(store.pairs(size=16), limit=3)
    assert stored.prompts == in_memory.prompts and torch.equal(stored.images, in_memory.images)
    assert len(reads) == 3
