import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler

from diffalign.diffusion import (
    DDPMSchedule,
    FlowSchedule,
    broadcast_time,
    predict_x0_and_eps,
    training_target,
)


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_alphas_cumprod_match_diffusers(beta_schedule):
    kwargs = {"beta_start": 0.00085, "beta_end": 0.012} if beta_schedule == "scaled_linear" else {}
    ours = DDPMSchedule(beta_schedule=beta_schedule, **kwargs)
    theirs = DDPMScheduler(beta_schedule=beta_schedule, **kwargs)
    assert ours.alphas_cumprod.dtype == torch.float64
    torch.testing.assert_close(ours.alphas_cumprod.float(), theirs.alphas_cumprod, rtol=1e-5, atol=1e-7)


def test_alpha_bar_clean_end_and_range():
    schedule = DDPMSchedule()
    t = torch.tensor([-1.0, 0.0, 999.0])
    abar = schedule.alpha_bar(t)
    assert abar[0] == 1.0
    assert abar[1] == schedule.alphas_cumprod[0] and abar[2] == schedule.alphas_cumprod[999]
    with pytest.raises(ValueError, match="timesteps must lie"):
        schedule.alpha_bar(torch.tensor([1000.0]))
    with pytest.raises(ValueError, match="beta_schedule"):
        DDPMSchedule(beta_schedule="cosine")


@pytest.mark.parametrize("num_steps", [1, 10, 20, 30, 50])
@pytest.mark.parametrize(("spacing", "offset"), [("trailing", 0), ("leading", 0), ("leading", 1)])
def test_timesteps_match_diffusers(num_steps, spacing, offset):
    levels = DDPMSchedule(steps_offset=offset).timesteps(num_steps, spacing)
    reference = DDIMScheduler(timestep_spacing=spacing, steps_offset=offset)
    reference.set_timesteps(num_steps)
    assert levels.dtype == torch.float32 and levels.shape == (num_steps + 1,)
    assert levels[-1] == -1
    assert torch.equal(levels[:-1].long(), reference.timesteps)
    assert bool((levels[1:] < levels[:-1]).all())


def test_flow_timesteps_shift_match_diffusers():
    levels = FlowSchedule(shift=3.0).timesteps(10)
    assert levels[0] == 1.0 and levels[-1] == 0.0 and levels.shape == (11,)
    reference = FlowMatchEulerDiscreteScheduler(shift=3.0)
    reference.set_timesteps(sigmas=np.linspace(1.0, 0.1, 10))
    torch.testing.assert_close(levels, reference.sigmas.float())
    torch.testing.assert_close(FlowSchedule().timesteps(4), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))


def test_add_noise_matches_diffusers():
    schedule = DDPMSchedule()
    x0, noise = torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5)
    t = torch.tensor([0.0, 10.0, 500.0, 999.0])
    expected = DDPMScheduler().add_noise(x0, noise, t.long())
    torch.testing.assert_close(schedule.add_noise(x0, noise, t), expected, rtol=1e-5, atol=1e-5)
    expected_v = DDPMScheduler().get_velocity(x0, noise, t.long())
    torch.testing.assert_close(schedule.velocity(x0, noise, t), expected_v, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "flow"])
def test_training_target_inverts_to_x0_and_eps(prediction_type):
    schedule = FlowSchedule(shift=2.0) if prediction_type == "flow" else DDPMSchedule()
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, 2, 4, 4, generator=gen, dtype=torch.float64)
    noise = torch.randn(6, 2, 4, 4, generator=gen, dtype=torch.float64)
    if prediction_type == "flow":
        t = schedule.sample_training_timesteps(6, generator=gen)
    else:
        t = schedule.sample_training_timesteps(6, generator=gen).clamp(max=900)
    x_t = schedule.add_noise(x0, noise, t)
    target = training_target(x0, noise, t, prediction_type, schedule)
    x0_hat, eps_hat = predict_x0_and_eps(target, x_t, t, prediction_type, schedule)
    torch.testing.assert_close(x0_hat, x0)
    torch.testing.assert_close(eps_hat, noise)
    # a scalar t broadcasts like a per-sample one
    scalar = torch.tensor(float(t[0]))
    x_t1 = schedule.add_noise(x0, noise, scalar)
    torch.testing.assert_close(x_t1[0], x_t[0])


def test_float32_arithmetic_for_half_inputs():
    schedule = DDPMSchedule()
    x = torch.randn(2, 1, 2, 2).to(torch.bfloat16)
    x0, eps = predict_x0_and_eps(x, x, torch.tensor([10.0, 20.0]), "epsilon", schedule)
    assert x0.dtype == torch.float32 and eps.dtype == torch.float32
    assert schedule.add_noise(x, x, torch.tensor([3.0, 4.0])).dtype == torch.bfloat16


def test_family_mismatch_errors():
    x = torch.zeros(1, 1, 2, 2)
    with pytest.raises(TypeError, match="DDPMSchedule"):
        predict_x0_and_eps(x, x, torch.tensor([0.5]), "epsilon", FlowSchedule())
    with pytest.raises(ValueError, match="prediction_type"):
        training_target(x, x, torch.tensor([0.5]), "sample", DDPMSchedule())
    with pytest.raises(ValueError, match="one entry per sample"):
        broadcast_time(torch.ones(3), x)


def test_training_timestep_samplers():
    gen = torch.Generator().manual_seed(1)
    t = DDPMSchedule().sample_training_timesteps(10_000, generator=gen)
    assert t.dtype == torch.float32 and torch.equal(t, t.round())
    assert t.min() >= 0 and t.max() <= 999 and abs(t.mean().item() - 499.5) < 15
    flow = FlowSchedule()
    ln = flow.sample_training_timesteps(10_000, generator=gen)
    assert ln.min() > 0 and ln.max() < 1 and abs(ln.median().item() - 0.5) < 0.02
    uni = flow.sample_training_timesteps(10_000, generator=gen, distribution="uniform")
    assert abs(uni.mean().item() - 0.5) < 0.02 and abs(uni.std().item() - (1 / 12) ** 0.5) < 0.01
    shifted = FlowSchedule(shift=3.0).sample_training_timesteps(10_000, generator=gen)
    assert shifted.median() > 0.7  # shift 3 maps the median 0.5 to 0.75
    with pytest.raises(ValueError, match="distribution"):
        flow.sample_training_timesteps(2, distribution="beta")
