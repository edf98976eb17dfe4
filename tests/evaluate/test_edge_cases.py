"""Edge cases of the metric functions and of metadata files: exact answers on degenerate inputs, and
clear errors (naming the file, line or argument) on inputs that would otherwise give wrong numbers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from diffalign.evaluate.diversity import mean_pairwise_distance, pixel_features
from diffalign.evaluate.fid import fid_kid
from diffalign.evaluate.overopt import OveroptPoint, analyse
from diffalign.evaluate.stats import bootstrap_mean_ci, stratified_bootstrap_ci
from diffalign.evaluate.suite import per_prompt_means
from diffalign.evaluate.winrate import reward_scores
from diffalign.world.grammar import GrammarError, all_metadata, read_metadata_jsonl
from diffalign.world.shapeseval import load_shapeseval

# --- metadata files -----------------------------------------------------------------------------------


def _write(path, text: str | bytes):
    (path.write_bytes if isinstance(text, bytes) else path.write_text)(text)
    return path


def test_every_world_prompt_reads_back_with_bom_and_crlf(tmp_path):
    lines = all_metadata()  # every tag, shape, colour, relation and count of the world
    text = "\r\n".join(json.dumps({**m, "extra": [1]}) for m in lines) + "\r\n"
    read = load_shapeseval(_write(tmp_path / "m.jsonl", "\ufeff" + text))
    assert [m["prompt"] for m in read] == [m["prompt"] for m in lines]


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"tag": "single_object", "include": [{"class": "circle", "count": 1}]}', "'prompt' must be"),
        ('{"tag": "single_object", "include": [{"class": "circle", "count": 1}], "prompt": " "}', "'prompt'"),
        (
            '{"tag": "counting", "include": [{"class": "circle", "count": 5}], "prompt": "four circles"}',
            "count must be at most 4",
        ),
        (
            '{"tag": "counting", "include": [{"class": "circle", "count": 2}], '
            '"exclude": [{"class": "circle", "count": 6}], "prompt": "two circles"}',
            "exclude\\[0\\].count must be at most 5",
        ),
        ('[{"tag": "single_object"}]', "JSON array"),
        ("[", "not an array"),
    ],
)
def test_bad_metadata_lines_are_refused_with_the_line(tmp_path, line, message):
    good = json.dumps(all_metadata("counting")[-1])  # four ..., excluding five: the range's edge
    path = _write(tmp_path / "m.jsonl", f"{good}\n\n{line}\n")
    with pytest.raises(GrammarError, match=message) as err:
        load_shapeseval(path)
    assert f"{path} line 3" in str(err.value)


def test_a_file_that_is_not_utf8_is_refused_with_the_line(tmp_path):
    good = json.dumps(all_metadata("single_object")[0]).encode()
    path = _write(tmp_path / "m.jsonl", good + b"\n" + good[:-1] + b', "note": "caf\xe9"}\n')
    with pytest.raises(GrammarError, match="line 2: not UTF-8"):
        load_shapeseval(path)


def test_position_index_must_not_be_a_boolean():
    line = json.dumps(all_metadata("position")[0])
    assert read_metadata_jsonl([line])
    with pytest.raises(GrammarError, match="position"):
        read_metadata_jsonl([line.replace('"left of", 0]', '"left of", false]')])


# --- metric functions -----------------------------------------------------------------------------------


def test_bootstrap_of_constant_data_is_the_point_itself():
    assert bootstrap_mean_ci([0.3] * 10) == (0.3, 0.3)  # resampled means read 0.29999999999999993
    assert bootstrap_mean_ci([0.7]) == (0.7, 0.7)
    assert stratified_bootstrap_ci({"a": [0.1, 0.1], "b": [0.3] * 3}) == (0.2, 0.2)


@pytest.mark.parametrize("values", [[0.1, float("nan")], [0.1, float("inf")]])
def test_bootstrap_refuses_values_that_are_not_finite(values):
    with pytest.raises(ValueError, match="1 of 2 values are NaN or infinite"):
        bootstrap_mean_ci(values)
    with pytest.raises(ValueError, match="group 'a'"):
        stratified_bootstrap_ci({"a": values})


@pytest.mark.parametrize(
    "kwargs, message",
    [({"n_boot": 0}, "n_boot"), ({"level": 1.5}, "level"), ({"values": [[0.1, 0.2]]}, "flat")],
)
def test_bootstrap_names_a_bad_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        bootstrap_mean_ci(**{"values": [0.1, 0.2], **kwargs})


def test_a_nan_reward_is_not_counted_as_a_loss():
    with pytest.raises(ValueError, match="model's rewards are NaN"):
        reward_scores(torch.tensor([float("nan"), 1.0]), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="baseline's rewards are NaN"):
        reward_scores(torch.tensor([0.0, 1.0]), torch.tensor([float("nan"), 1.0]))


def test_per_prompt_means_refuse_a_length_mismatch():
    np.testing.assert_allclose(per_prompt_means(torch.tensor([1.0, 3.0, 5.0]), ["a", "a", "b"]), [2.0, 5.0])
    with pytest.raises(ValueError, match="3 values for 2 prompts"):
        per_prompt_means(torch.ones(3), ["a", "b"])


def test_pixel_distance_is_the_same_for_uint8_and_float_images():
    images = torch.rand(4, 3, 8, 8)
    as_uint8 = (images * 255).round().to(torch.uint8)
    expected = mean_pairwise_distance(pixel_features(as_uint8.float() / 255))
    assert mean_pairwise_distance(pixel_features(as_uint8)) == pytest.approx(expected)
    white = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    assert mean_pairwise_distance(pixel_features(torch.cat([white * 0, white]))) == pytest.approx(1.0)


class _MeanColour(torch.nn.Module):
    """A stand-in feature net (3 features: the mean colour), so the checks need no weights."""

    num_features = 3

    def __init__(self) -> None:
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255 if images.dtype == torch.uint8 else images.float()
        return x.mean(dim=(2, 3))


@pytest.mark.parametrize(
    "fake, message",
    [
        (torch.full((4, 3, 8, 8), float("nan")), "NaN"),
        (torch.randint(0, 255, (4, 3, 8, 8)), "uint8 images or float"),
        (torch.rand(4, 3, 16, 16), "one size"),
    ],
)
def test_fid_refuses_images_it_cannot_compare(fake, message):
    with pytest.raises(ValueError, match=message):
        fid_kid(torch.rand(4, 3, 8, 8), fake, feature_net=_MeanColour())


def test_a_run_whose_kl_estimates_are_not_positive_is_reported_without_a_fit():
    points = [
        OveroptPoint(0, 0.0, 0.1, 0.1, 0.2),
        OveroptPoint(10, -0.01, 0.1, 0.3, 0.25),  # a Monte Carlo KL estimate below 0: d = 0
        OveroptPoint(20, 0.4, 0.1, 0.4, 0.3),
    ]
    report = analyse(points)
    assert report["fits"] == {} and report["fitted_peak"] is None
    assert "1 of 2" in report["fit_note"]
    assert report["stop_step"] == 20
