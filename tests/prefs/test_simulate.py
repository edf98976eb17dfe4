"""Simulated preferences written into the store: counts, idempotency, determinism, records."""

from __future__ import annotations

import pytest
import torch

from diffalign.diffusion.sampling import SamplerConfig
from diffalign.models.registry import load_model
from diffalign.prefs.simulate import pair_prompts, simulate_preferences
from diffalign.prefs.store import PreferenceStore
from diffalign.world.grammar import GrammarError, all_metadata, parse_prompt
from diffalign.world.palette import CATEGORIES
from diffalign.world.raters import RaterPanel


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    return load_model("base")


def test_simulation_writes_pairs_once(model, tmp_path):
    store = PreferenceStore.open(tmp_path / "prefs.db")
    config = SamplerConfig(num_steps=4)
    panel = RaterPanel()
    report = simulate_preferences(model, store, 8, panel=panel, sampler_config=config, seed=5, batch_size=8)
    assert (report.requested, report.sampled, report.added, report.duplicates) == (8, 8, 8, 0)
    assert store.count() == 8 and store.count(source="simulated") == 8
    assert report.agreement is not None and report.agreement.n_pairs == 8
    stored = list(store.comparisons())
    assert [c.key for c in stored] == [f"simulated:5:{i}" for i in range(8)]
    raters = {r.name: r.group for r in panel.raters}
    for c in stored:
        parse_prompt(c.prompt)
        assert len(c.image_hashes) == 2 and c.image_hashes[0] != c.image_hashes[1]
        assert c.choice in ("image", "tie") and (c.chosen in (0, 1)) == (c.choice == "image")
        assert raters[c.rater] == c.rater_group
        assert c.meta["sampler"]["num_steps"] == 4 and len(c.meta["utility"]) == 2
        p = c.meta["p_model"]
        if c.choice == "tie":
            assert p == 0.5
    assert report.ties == sum(c.choice == "tie" for c in stored)

    again = simulate_preferences(model, store, 8, panel=panel, sampler_config=config, seed=5, batch_size=8)
    assert (again.sampled, again.added, again.duplicates) == (0, 0, 8)
    assert store.count() == 8


def test_simulation_is_deterministic_and_extends(model, tmp_path):
    config = SamplerConfig(num_steps=2)
    one = PreferenceStore.open(tmp_path / "one.db")
    two = PreferenceStore.open(tmp_path / "two.db")
    three = PreferenceStore.open(tmp_path / "three.db")
    simulate_preferences(model, one, 3, sampler_config=config, seed=1, batch_size=2)
    simulate_preferences(model, two, 4, sampler_config=config, seed=1, batch_size=2)
    simulate_preferences(model, three, 4, sampler_config=config, seed=1, batch_size=8)
    a, b, c = list(one.comparisons()), list(two.comparisons()), list(three.comparisons())
    assert len(b) == 4
    for x, y in zip(a, b):  # the same pairs, images and choices: a longer run extends a shorter one
        assert (x.key, x.prompt, x.image_hashes, x.choice, x.chosen, x.rater) == (
            y.key,
            y.prompt,
            y.image_hashes,
            y.choice,
            y.chosen,
            y.rater,
        )
    # Another batch size: the same prompts, seeds and raters (pixels may differ in rounding only).
    assert [(x.key, x.prompt, x.rater, x.meta["seeds"]) for x in b] == [
        (y.key, y.prompt, y.rater, y.meta["seeds"]) for y in c
    ]
    extended = simulate_preferences(model, one, 4, sampler_config=config, seed=1, batch_size=2)
    assert (extended.sampled, extended.added, extended.duplicates) == (1, 1, 3)


def test_process_shares_make_the_single_process_pairs_between_them(model, tmp_path):
    """Shares (index, count) of a run over several processes: each process samples pairs i % count ==
    index, and together they write the pairs one process writes (same batch size: same pixels)."""
    config = SamplerConfig(num_steps=2)
    whole = PreferenceStore.open(tmp_path / "whole.db")
    shared = PreferenceStore.open(tmp_path / "shared.db")
    simulate_preferences(model, whole, 5, sampler_config=config, seed=3, batch_size=2)
    reports = [
        simulate_preferences(model, shared, 5, sampler_config=config, seed=3, batch_size=2, share=(k, 2))
        for k in (1, 0)
    ]
    assert [(r.requested, r.sampled) for r in reports] == [(2, 2), (3, 3)]
    assert [c.key for c in shared.comparisons()] == [f"simulated:3:{i}" for i in (1, 3, 0, 2, 4)]
    fields = lambda c: (c.prompt, c.image_hashes, c.choice, c.chosen, c.rater)  # noqa: E731
    assert {c.key: fields(c) for c in shared.comparisons()} == {c.key: fields(c) for c in whole.comparisons()}
    for bad in [(2, 2), (-1, 2), (0, 0)]:
        with pytest.raises(ValueError, match="share must be"):
            simulate_preferences(model, shared, 5, sampler_config=config, share=bad)


def test_pair_prompts_uniform_over_tasks_and_checked():
    prompts = pair_prompts(600, seed=0)
    tag = {m["prompt"]: m["tag"] for m in all_metadata()}
    counts = [sum(tag[p] == t for p in prompts) for t in CATEGORIES]
    assert min(counts) > 60 and max(counts) < 140
    assert pair_prompts(10, seed=3) == pair_prompts(10, seed=3)
    assert set(pair_prompts(20, ["a circle", "two squares"], seed=0)) == {"a circle", "two squares"}
    with pytest.raises(GrammarError, match="a dog"):
        pair_prompts(2, ["a dog"])
    with pytest.raises(ValueError, match="n_pairs"):
        pair_prompts(-1)
