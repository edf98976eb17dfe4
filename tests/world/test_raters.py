"""The simulated rater panel: features, Bradley-Terry choices, ties, seeds, agreement."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from diffalign.world.dataset import ShapesGenerator
from diffalign.world.geneval import score_image
from diffalign.world.grammar import parse_prompt
from diffalign.world.raters import (
    QUALITY_PARTS,
    TASTE_FEATURES,
    ImageFeatures,
    PanelConfig,
    RaterGroup,
    RaterPanel,
)
from diffalign.world.render import render_scene
from diffalign.world.scene import Scene, SceneObject


@pytest.fixture(autouse=True)
def _single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _image(*objects: SceneObject) -> torch.Tensor:
    """uint8 [1, 3, 32, 32] of a scene."""
    return torch.from_numpy(render_scene(Scene(tuple(objects)))).permute(2, 0, 1)[None].contiguous()


def _features(panel: RaterPanel, n: int, seed: int) -> ImageFeatures:
    """Synthetic features (no detector) for fast tests of the choice model."""
    g = torch.Generator().manual_seed(seed)
    k = len(TASTE_FEATURES)
    return ImageFeatures(
        prompts=["a circle"] * n,
        faithfulness=torch.rand(n, generator=g, dtype=torch.float64).round(decimals=1),
        clause_fraction=torch.zeros(n, dtype=torch.float64),
        correct=torch.zeros(n, dtype=torch.bool),
        quality=torch.rand(n, generator=g, dtype=torch.float64),
        quality_parts=torch.zeros(n, len(QUALITY_PARTS), dtype=torch.float64),
        taste=torch.rand(n, k, generator=g, dtype=torch.float64),
        n_objects=torch.ones(n, dtype=torch.long),
    )


@pytest.fixture(scope="module")
def panel() -> RaterPanel:
    return RaterPanel()


@pytest.fixture(scope="module")
def rendered() -> tuple[torch.Tensor, list[str]]:
    batch = ShapesGenerator().sample(48, torch.Generator().manual_seed(1))
    return batch.images, batch.prompts


# --- config and raters ----------------------------------------------------------------------------


def test_config_errors_name_the_argument():
    with pytest.raises(ValueError, match="temperature"):
        PanelConfig(temperature=0)
    with pytest.raises(ValueError, match="tie_margin"):
        PanelConfig(tie_margin=-1)
    with pytest.raises(ValueError, match="groups"):
        PanelConfig(groups=[])
    with pytest.raises(ValueError, match="unknown feature"):
        RaterGroup("x", {"sparkle": 1.0})
    with pytest.raises(ValueError, match="group"):
        RaterPanel().utility(_features(RaterPanel(), 2, 0), group="nobody")


def test_raters_follow_shares_and_jitter_is_seeded():
    groups = [RaterGroup("a", {"size": 1.0}, 0.75), RaterGroup("b", {"size": -1.0}, 0.25)]
    p1 = RaterPanel(PanelConfig(groups=groups, n_raters=8, seed=3))
    p2 = RaterPanel(PanelConfig(groups=groups, n_raters=8, seed=3))
    p3 = RaterPanel(PanelConfig(groups=groups, n_raters=8, seed=4))
    assert [r.group for r in p1.raters].count("a") == 6
    assert len({r.name for r in p1.raters}) == 8
    assert torch.equal(p1.weights, p2.weights)
    assert not torch.equal(p1.weights, p3.weights)
    # Jitter is multiplicative: signs of the group's taste are kept.
    size = 2 + TASTE_FEATURES.index("size")
    assert all((r.weights[size] > 0) == (r.group == "a") for r in p1.raters)


# --- Bradley-Terry and ties -----------------------------------------------------------------------


def test_bradley_terry_probability_matches_hand_computation(panel):
    fa, fb = _features(panel, 6, 0), _features(panel, 6, 1)
    rater = panel.raters[3]
    w = rater.weights
    for i in range(6):
        ua = float(fa.matrix()[i] @ w)
        ub = float(fb.matrix()[i] @ w)
        expected = 1 / (1 + math.exp(-(ua - ub) / panel.config.temperature))
        if abs(ua - ub) < panel.config.tie_margin:
            expected = 0.5
        got = float(panel.preference_prob(fa.select([i]), fb.select([i]), rater=rater.name)[0])
        assert got == pytest.approx(expected, abs=1e-12)
        assert float(panel.utility(fa.select([i]), rater=rater.name)[0]) == pytest.approx(ua)


def test_utility_group_and_pool_are_means_of_raters(panel):
    f = _features(panel, 5, 2)
    every = torch.stack([panel.utility(f, rater=r.name) for r in panel.raters], 1)
    assert torch.allclose(panel.utility(f), every.mean(1))
    for g in panel.groups:
        cols = [i for i, r in enumerate(panel.raters) if r.group == g]
        assert torch.allclose(panel.utility(f, group=g), every[:, cols].mean(1))


def test_ties_exactly_when_utility_gap_below_margin():
    panel = RaterPanel(PanelConfig(tie_margin=0.05))
    fa, fb = _features(panel, 200, 3), _features(panel, 200, 4)
    fb.faithfulness = fa.faithfulness.clone()  # small gaps, so both sides of the margin occur
    idx = torch.arange(200) % len(panel.raters)
    u = torch.rand(200, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    labels = panel.choose(fa, fb, idx, u)
    gap = (labels.utility_a - labels.utility_b).abs()
    assert torch.equal(labels.is_tie, gap < 0.05)
    assert 0 < int(labels.is_tie.sum()) < 200
    # Non-ties follow the uniform: A exactly when u < sigmoid(gap / T).
    p = torch.sigmoid((labels.utility_a - labels.utility_b) / panel.config.temperature)
    keep = ~labels.is_tie
    assert torch.equal(labels.prob_a[keep] == 1.0, (u < p)[keep])


def test_same_seed_same_labels(panel):
    fa, fb = _features(panel, 64, 5), _features(panel, 64, 6)
    one = panel.label(fa, fb, generator=torch.Generator().manual_seed(7))
    two = panel.label(fa, fb, generator=torch.Generator().manual_seed(7))
    three = panel.label(fa, fb, generator=torch.Generator().manual_seed(8))
    assert torch.equal(one.prob_a, two.prob_a) and one.raters == two.raters
    assert one.raters != three.raters
    assert set(one.prob_a.tolist()) <= {0.0, 0.5, 1.0}
    assert all(g == r.rsplit("-", 1)[0] for g, r in zip(one.groups, one.raters))


def test_labels_follow_bradley_terry_frequencies(panel):
    """A rater's choice frequency on one pair repeated many times matches sigmoid(du / T)."""
    fa, fb = _features(panel, 1, 9), _features(panel, 1, 10)
    fb.faithfulness = fa.faithfulness.clone()
    n = 20000
    rows = torch.zeros(n, dtype=torch.long)
    labels = panel.choose(fa.select(rows), fb.select(rows), torch.zeros(n, dtype=torch.long), torch.rand(n))
    p = float(panel.preference_prob(fa, fb, rater=panel.raters[0].name)[0])
    assert float(labels.prob_a.mean()) == pytest.approx(p, abs=0.015)


# --- agreement --------------------------------------------------------------------------------------


def test_agreement_matches_monte_carlo():
    panel = RaterPanel(PanelConfig(n_raters=6, tie_margin=0.02))
    fa, fb = _features(panel, 40, 11), _features(panel, 40, 12)
    report = panel.agreement(fa, fb)
    g = torch.Generator().manual_seed(0)
    n = 200_000
    pair = torch.randint(40, (n,), generator=g)
    r1 = torch.randint(6, (n,), generator=g)
    r2 = (r1 + torch.randint(1, 6, (n,), generator=g)) % 6  # a distinct second rater
    first = panel.choose(fa.select(pair), fb.select(pair), r1, torch.rand(n, generator=g))
    second = panel.choose(fa.select(pair), fb.select(pair), r2, torch.rand(n, generator=g))
    both = ~first.is_tie & ~second.is_tie
    mc = float((first.prob_a[both] == second.prob_a[both]).double().mean())
    assert report.two_rater == pytest.approx(mc, abs=0.006)
    assert float((first.is_tie).double().mean()) == pytest.approx(report.tie_rate, abs=0.006)
    # Oracle: predicting every non-tie label with the pooled majority side.
    p_rater = torch.stack([panel.preference_prob(fa, fb, rater=r.name) for r in panel.raters], 1)
    ua = torch.stack([panel.utility(fa, rater=r.name) for r in panel.raters], 1)
    ub = torch.stack([panel.utility(fb, rater=r.name) for r in panel.raters], 1)
    nontie = ((ua - ub).abs() >= panel.config.tie_margin).double()
    p_bar = (nontie * p_rater).sum(1) / nontie.sum(1).clamp(min=1)
    majority = (p_bar >= 0.5).float()[pair]
    oracle_mc = float((first.prob_a[~first.is_tie] == majority[~first.is_tie]).double().mean())
    assert report.oracle == pytest.approx(oracle_mc, abs=0.006)
    assert report.oracle >= report.two_rater - 1e-9


def test_lower_temperature_more_agreement():
    fa, fb = _features(RaterPanel(), 30, 13), _features(RaterPanel(), 30, 14)
    values = [RaterPanel(PanelConfig(temperature=t)).agreement(fa, fb).two_rater for t in (0.02, 0.1, 0.5)]
    assert values[0] > values[1] > values[2] > 0.5


# --- features read from images ----------------------------------------------------------------------


def test_correct_image_more_faithful_than_wrong(panel):
    prompt = "a red circle and a blue square"
    right = _image(
        SceneObject("circle", "red", 0.3, 0.5, 0.12), SceneObject("square", "blue", 0.7, 0.5, 0.12)
    )
    half = _image(
        SceneObject("circle", "red", 0.3, 0.5, 0.12), SceneObject("square", "green", 0.7, 0.5, 0.12)
    )
    wrong = _image(SceneObject("triangle", "green", 0.5, 0.5, 0.12))
    f = panel.features(torch.cat([right, half, wrong]), [prompt] * 3)
    assert f.correct.tolist() == [True, False, False]
    assert f.faithfulness.tolist() == pytest.approx([1.0, 0.25, 0.0])
    assert f.clause_fraction.tolist() == pytest.approx([1.0, 0.5, 0.0])


def test_faithfulness_agrees_with_score_image(panel, rendered):
    images, prompts = rendered
    # Half the images judged against another image's prompt: many are wrong.
    shuffled = prompts[1:] + prompts[:1]
    mixed = [p if i % 2 else q for i, (p, q) in enumerate(zip(prompts, shuffled))]
    f = panel.features(images, mixed)
    expected = [
        score_image(img.permute(1, 2, 0).double().numpy(), parse_prompt(p)).correct
        for img, p in zip(images, mixed)
    ]
    assert f.correct.tolist() == expected
    assert 0 < sum(expected) < len(expected)
    assert torch.all(f.faithfulness[f.correct] == 1.0) and torch.all(f.faithfulness[~f.correct] <= 0.5)


def test_quality_falls_with_stray_pixels_and_blur(panel, rendered):
    images, prompts = rendered
    x = images[:16].permute(0, 2, 3, 1).double().numpy()
    rng = np.random.default_rng(0)
    stray = x.copy()
    for img in stray:
        for r, c in rng.integers(0, 32, (12, 2)):
            img[r, c] = (0.15, 0.15, 0.15)
    blurred = ndimage.gaussian_filter(x, sigma=(0, 1.0, 1.0, 0))

    def q(arr):
        return panel.features(torch.from_numpy(arr).permute(0, 3, 1, 2), prompts[:16])

    clean, dirty, soft = q(x), q(stray), q(blurred)
    assert float(clean.quality.mean()) > 0.9
    assert torch.all(dirty.quality < clean.quality)
    assert torch.all(soft.quality < clean.quality)
    clean_col, sharp_col = QUALITY_PARTS.index("clean"), QUALITY_PARTS.index("sharp")
    assert (
        float(dirty.quality_parts[:, clean_col].mean())
        < float(clean.quality_parts[:, clean_col].mean()) - 0.15
    )
    assert (
        float(soft.quality_parts[:, sharp_col].mean()) < float(clean.quality_parts[:, sharp_col].mean()) - 0.3
    )


def test_shapeless_blob_lowers_quality(panel):
    circle = _image(SceneObject("circle", "blue", 0.5, 0.5, 0.14))
    blob = torch.zeros(1, 3, 32, 32, dtype=torch.uint8) + 255
    blob[:, :, 10:22, 6:26] = torch.tensor([40, 90, 230], dtype=torch.uint8)[None, :, None, None]
    blob[:, :, 14:18, 4:28] = torch.tensor([40, 90, 230], dtype=torch.uint8)[None, :, None, None]  # cross
    blob[:, :, 6:26, 14:18] = torch.tensor([40, 90, 230], dtype=torch.uint8)[None, :, None, None]
    f = panel.features(torch.cat([circle, blob]), ["a blue circle"] * 2)
    shape_col = QUALITY_PARTS.index("shape")
    assert f.quality_parts[1, shape_col] < f.quality_parts[0, shape_col]
    assert f.quality[1] < f.quality[0]


def test_taste_features_read_size_warmth_centrality(panel):
    small = _image(SceneObject("circle", "blue", 0.5, 0.5, 0.09))
    large = _image(SceneObject("circle", "blue", 0.5, 0.5, 0.15))
    warm = _image(SceneObject("circle", "orange", 0.5, 0.5, 0.15))
    corner = _image(SceneObject("circle", "blue", 0.2, 0.2, 0.15))
    f = panel.features(torch.cat([small, large, warm, corner]), ["a circle"] * 4)
    size, warmth, centre = (TASTE_FEATURES.index(k) for k in ("size", "warmth", "centrality"))
    assert f.taste[1, size] > f.taste[0, size] + 0.4
    assert f.taste[2, warmth] == 1.0 and f.taste[1, warmth] == 0.0
    assert f.taste[1, centre] > f.taste[3, centre] + 0.5


def test_groups_disagree_on_pairs_that_differ_only_in_taste(panel):
    """A large warm object vs a small cool one, both correct and clean: 'bold' picks the first, 'calm' the
    second, and the panel's groups disagree on every such pair."""
    large, small = [], []
    for i, (shape, (cw, cc)) in enumerate(
        zip(("circle", "square", "triangle"), (("red", "blue"), ("orange", "green"), ("yellow", "purple")))
    ):
        x = 0.45 + 0.05 * i
        large.append(_image(SceneObject(shape, cw, x, 0.5, 0.155)))
        small.append(_image(SceneObject(shape, cc, x, 0.5, 0.095)))
    prompts = [f"a {s}" for s in ("circle", "square", "triangle")]
    fa, fb = panel.features(torch.cat(large), prompts), panel.features(torch.cat(small), prompts)
    assert torch.all(fa.faithfulness == 1) and torch.all(fb.faithfulness == 1)
    bold = panel.preference_prob(fa, fb, group="bold")
    calm = panel.preference_prob(fa, fb, group="calm")
    assert torch.all(bold > 0.8) and torch.all(calm < 0.2)
    report = panel.agreement(fa, fb)
    assert report.per_group_disagreement["bold vs calm"] == 1.0
    assert report.between_groups["bold vs calm"] < 0.3 < 0.7 < min(report.within_group.values())
    assert report.oracle_by_group > report.oracle


def _defect_pairs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Pairs like a base model's: two layouts of the same prompt, one in three with a defect in B
    (the image of another prompt of the same task, or stray ink)."""
    gen = ShapesGenerator()
    g = torch.Generator().manual_seed(seed)
    ids = gen.sample_prompt_ids(n, g)
    a = gen.render(gen.scenes_for(ids, g))
    b = gen.render(gen.scenes_for(ids, g))
    prompts = [gen.metadata[i]["prompt"] for i in ids.tolist()]
    tags = [gen.metadata[i]["tag"] for i in ids.tolist()]
    by_tag = {t: [j for j, m in enumerate(gen.metadata) if m["tag"] == t] for t in set(tags)}
    rng = np.random.default_rng(seed)
    b = b.clone()
    for k in range(n):
        if k % 3 == 0:
            other = torch.tensor([by_tag[tags[k]][rng.integers(len(by_tag[tags[k]]))]])
            b[k] = gen.render(gen.scenes_for(other, g))[0]
        elif k % 6 == 1:
            for r, c in rng.integers(0, 32, (6, 2)):
                b[k, :, r, c] = 0.2
    return a, b, prompts


def test_default_agreement_in_human_range(panel):
    a, b, prompts = _defect_pairs(96, 0)
    report = panel.agreement(a, b, prompts)
    assert 0.65 <= report.two_rater <= 0.80, report
    assert report.oracle >= report.two_rater
    assert report.tie_rate < 0.15


def test_calibrate_temperature_hits_target():
    p = RaterPanel()
    fa, fb = _features(p, 50, 15), _features(p, 50, 16)
    t = p.calibrate_temperature(fa, fb, target=0.75)
    assert p.config.temperature == t
    assert p.agreement(fa, fb).two_rater == pytest.approx(0.75, abs=1e-4)
    with pytest.raises(ValueError, match="target"):
        p.calibrate_temperature(fa, fb, target=0.999999)


def test_images_in_uint8_and_float_read_the_same(panel, rendered):
    images, prompts = rendered
    u8 = (images[:6] * 255).round().to(torch.uint8)
    f1 = panel.features(u8, prompts[:6])
    f2 = panel.features(u8.float() / 255, prompts[:6])
    assert torch.allclose(f1.matrix(), f2.matrix())
    with pytest.raises(ValueError, match="prompts"):
        panel.features(u8, prompts[:5])
