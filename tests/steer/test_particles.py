"""Effective sample size and resampling, against direct computations."""

import math

import torch

from diffalign.steer.particles import (
    effective_sample_size,
    flat_indices,
    multinomial_ancestors,
    normalized_weights,
)


def test_ess_matches_kish_formula():
    weights = torch.tensor([[1.0, 1.0, 2.0, 0.5], [3.0, 1e-3, 1e-3, 1e-3]], dtype=torch.float64)
    expected = weights.sum(1) ** 2 / (weights**2).sum(1)  # (sum w)^2 / sum w^2, unnormalised
    got = effective_sample_size(weights.log())
    assert torch.allclose(got, expected)
    assert math.isclose(float(effective_sample_size(torch.zeros(1, 5))[0]), 5.0)
    one_hot = torch.tensor([[0.0, -1e4, -1e4]])
    assert math.isclose(float(effective_sample_size(one_hot)[0]), 1.0)


def test_normalisation_is_stable_for_huge_log_weights():
    w = normalized_weights(torch.tensor([[1000.0, 1000.0 + math.log(3.0)]], dtype=torch.float64))
    assert torch.allclose(w, torch.tensor([[0.25, 0.75]], dtype=torch.float64))


def test_resampling_keeps_the_count_and_stays_in_the_population():
    log_w = torch.randn(5, 7)
    ancestors = multinomial_ancestors(log_w, torch.Generator().manual_seed(0))
    assert ancestors.shape == (5, 7)
    rows = flat_indices(ancestors)
    assert rows.shape == (35,)
    assert torch.equal(rows // 7, torch.arange(5).repeat_interleave(7))  # each row stays in its prompt


def test_resampling_follows_the_weights():
    log_w = torch.tensor([[0.0, -1e9, -1e9, -1e9], [-1e9, -1e9, -1e9, 0.0]])
    ancestors = multinomial_ancestors(log_w, torch.Generator().manual_seed(0))
    assert torch.equal(ancestors, torch.tensor([[0, 0, 0, 0], [3, 3, 3, 3]]))
    # frequencies match the weights over many draws
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    draws = multinomial_ancestors(probs.log().expand(2000, 4), torch.Generator().manual_seed(1))
    freq = torch.bincount(draws.flatten(), minlength=4).double() / draws.numel()
    assert torch.allclose(freq, probs.double(), atol=0.01)
