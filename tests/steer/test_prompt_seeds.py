"""Per-prompt seeds: a prompt's steered sample depends on its own seed only, not on the batch it is
steered in (what `diffalign eval --steer` relies on), and the batch-seed mode is unchanged."""

import pytest
import torch

from diffalign.steer import make_config, run_method, steered_sample_fn
from diffalign.steer.common import PromptRandomness, candidate_seeds
from tests.steer.helpers import Brightness, CountedGaussian
from tests.steer.test_methods import CASES

PROMPTS = ["a", "b", "a", "b"]
SEEDS = [11, 3, 12, 40]


def _steer(case, prompts, seeds):
    config, make_sampler = CASES[case]
    model = CountedGaussian("epsilon")
    return run_method(
        case.split("-")[0], model, prompts, Brightness(), make_sampler("epsilon"), config, seeds
    )


@pytest.mark.parametrize("case", list(CASES))
def test_a_prompt_does_not_depend_on_its_batch(case):
    together = _steer(case, PROMPTS, SEEDS).images
    alone = torch.cat([_steer(case, [p], [s]).images for p, s in zip(PROMPTS, SEEDS, strict=True)])
    reordered = _steer(case, PROMPTS[::-1], SEEDS[::-1]).images.flip(0)
    assert torch.allclose(together, alone, atol=1e-5)
    assert torch.allclose(together, reordered, atol=1e-5)
    other = _steer(case, PROMPTS, [s + 100 for s in SEEDS]).images
    assert not torch.allclose(together, other, atol=1e-3)


def test_the_eval_hook_gives_the_same_images_whatever_the_batch_size():
    model, sampler = CountedGaussian("epsilon"), CASES["fk"][1]("epsilon")
    hook = steered_sample_fn("fk", Brightness(), budget_nfe=3 * 12, resample_every=2, resample_start=0)
    whole = hook(model, PROMPTS, SEEDS, sampler)
    halves = torch.cat(
        [hook(model, PROMPTS[:2], SEEDS[:2], sampler), hook(model, PROMPTS[2:], SEEDS[2:], sampler)]
    )
    assert torch.allclose(whole, halves, atol=1e-5)


def test_batch_seed_mode_is_the_historic_layout():
    rng = PromptRandomness(7, num_prompts=3)
    assert (
        rng.candidate_seeds(4)
        == candidate_seeds(7, 3, 4)
        == [7 + i * 4 + j for i in range(3) for j in range(4)]
    )
    shared = torch.randn(3, 2, 5, generator=torch.Generator().manual_seed(7))
    assert torch.equal(rng.normal((3, 2, 5)), shared)


def test_per_prompt_draws_come_from_each_prompts_own_generator():
    rng = PromptRandomness(0, num_prompts=2, prompt_seeds=[5, 9])
    assert rng.candidate_seeds(3) == [15, 16, 17, 27, 28, 29]
    draws = rng.normal((4, 2, 3), prompt_dim=1)
    solo = PromptRandomness(0, num_prompts=1, prompt_seeds=[9]).normal((4, 1, 3), prompt_dim=1)
    assert torch.equal(draws[:, 1:2], solo)
    weights = torch.tensor([[0.0, 1.0, 0.0], [0.2, 0.3, 0.5]])
    picks = rng.multinomial(weights, 6, replacement=True)
    assert picks.shape == (2, 6) and (picks[0] == 1).all()


@pytest.mark.parametrize(("seeds", "match"), [([1, 1], "own seed"), ([1], "2 prompts"), ([-1, 2], ">= 0")])
def test_bad_prompt_seeds_are_refused(seeds, match):
    with pytest.raises(ValueError, match=match):
        PromptRandomness(0, num_prompts=2, prompt_seeds=seeds)


def test_make_config_and_run_method_accept_prompt_seeds_for_every_method():
    sampler = CASES["bon"][1]("epsilon")
    config = make_config("bon", 2 * 12, sampler)
    result = run_method("bon", CountedGaussian(), ["a"], Brightness(), sampler, config, prompt_seeds=[3])
    assert result.images.shape[0] == 1


def test_the_eval_hook_refuses_a_seed_option():
    with pytest.raises(ValueError, match="own seed"):
        steered_sample_fn("bon", Brightness(), budget_nfe=24, seed=3)
