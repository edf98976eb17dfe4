import math

import pytest
import torch
from diffusers import DDIMScheduler
from torch.distributions import Normal

from diffalign.diffusion import (
    DDPMSchedule,
    ddim_step,
    ddpm_step,
    flow_euler_step,
    flow_sde_step,
    gaussian_log_prob,
)

SHAPE = (4, 3, 5, 5)


def _inputs(seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(SHAPE, generator=gen, dtype=dtype) for _ in range(3))


def _reference_log_prob(prev, mean, std):
    std = std.view(-1, *([1] * (prev.ndim - 1))).expand_as(prev)
    return Normal(mean.double(), std.double()).log_prob(prev.double()).flatten(1).mean(1)


def _ddpm_times():
    # per-sample, skipping pairs, including the first (999) and a last step to -1 is tested apart
    return torch.tensor([999.0, 700.0, 240.0, 20.0]), torch.tensor([949.0, 650.0, 100.0, 0.0])


STOCHASTIC_STEPS = {
    "ddim_eta_0.5": lambda o, x, t, tp, **kw: ddim_step(
        o, x, t, tp, schedule=DDPMSchedule(), prediction_type="epsilon", eta=0.5, **kw
    ),
    "ddim_eta_1_v": lambda o, x, t, tp, **kw: ddim_step(
        o, x, t, tp, schedule=DDPMSchedule(), prediction_type="v_prediction", eta=1.0, **kw
    ),
    "ddpm": lambda o, x, t, tp, **kw: ddpm_step(
        o, x, t, tp, schedule=DDPMSchedule(), prediction_type="epsilon", **kw
    ),
    "flow_sde": lambda o, x, t, tp, **kw: flow_sde_step(o, x, t, tp, noise_level=0.7, sigma_max=0.95, **kw),
}


def _times(name):
    if name == "flow_sde":
        return torch.tensor([1.0, 0.8, 0.3, 0.05]), torch.tensor([0.95, 0.7, 0.25, 0.0])
    return _ddpm_times()


@pytest.mark.parametrize("name", sorted(STOCHASTIC_STEPS))
def test_log_prob_is_the_normal_density_per_dimension(name):
    step = STOCHASTIC_STEPS[name]
    out, x, noise = _inputs()
    t, t_prev = _times(name)
    result = step(out, x, t, t_prev, noise=noise)
    assert result.log_prob.dtype == torch.float32 and result.log_prob.shape == (4,)
    assert result.std.shape == (4,) and bool((result.std > 0).all())
    torch.testing.assert_close(
        result.log_prob.double(),
        _reference_log_prob(result.prev, result.mean, result.std),
        rtol=1e-6,
        atol=1e-6,
    )
    # prev is the mean plus std times the given noise
    torch.testing.assert_close(result.prev, result.mean + result.std.view(-1, 1, 1, 1) * noise)
    # evaluating a stored prev gives back the same prev and log-prob
    again = step(out, x, t, t_prev, prev_sample=result.prev)
    assert again.prev is result.prev
    assert torch.equal(again.log_prob, result.log_prob)
    # an arbitrary prev is scored under the same Gaussian
    other = torch.randn(SHAPE)
    scored = step(out, x, t, t_prev, prev_sample=other)
    torch.testing.assert_close(
        scored.log_prob.double(), _reference_log_prob(other, result.mean, result.std), rtol=1e-6, atol=1e-6
    )
    with pytest.raises(ValueError, match="stochastic"):
        step(out, x, t, t_prev)


def test_gaussian_log_prob_shapes():
    x, mean = torch.randn(3, 2, 4), torch.randn(3, 2, 4)
    std = torch.tensor([0.5, 1.0, 2.0])
    expected = _reference_log_prob(x, mean, std).float()
    torch.testing.assert_close(gaussian_log_prob(x, mean, std), expected)
    torch.testing.assert_close(gaussian_log_prob(x, mean, std.view(3, 1, 1)), expected)
    scalar = Normal(mean, 0.3).log_prob(x).flatten(1).mean(1)
    torch.testing.assert_close(gaussian_log_prob(x, mean, 0.3), scalar)


def test_ddim_std_closed_form():
    schedule = DDPMSchedule()
    out, x, noise = _inputs()
    t, t_prev = _ddpm_times()
    eta = 0.8
    result = ddim_step(out, x, t, t_prev, schedule=schedule, prediction_type="epsilon", eta=eta, noise=noise)
    abar = schedule.alphas_cumprod
    for i in range(4):
        a_t, a_prev = abar[int(t[i])].item(), abar[int(t_prev[i])].item()
        sigma = eta * math.sqrt((1 - a_prev) / (1 - a_t)) * math.sqrt(1 - a_t / a_prev)
        assert result.std[i].item() == pytest.approx(sigma, rel=1e-6)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddpm_posterior_equals_ddim_eta_one(prediction_type):
    schedule = DDPMSchedule(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    out, x, noise = _inputs(1)
    for t, t_prev in [
        _ddpm_times(),
        (torch.tensor(999.0), torch.tensor(979.0)),
        (torch.tensor(5.0), torch.tensor(4.0)),
    ]:
        kw = {"schedule": schedule, "prediction_type": prediction_type, "noise": noise}
        ddpm = ddpm_step(out, x, t, t_prev, **kw)
        ddim = ddim_step(out, x, t, t_prev, eta=1.0, **kw)
        torch.testing.assert_close(ddpm.mean, ddim.mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ddpm.std, ddim.std, rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(ddpm.prev, ddim.prev, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ddpm.x0_pred, ddim.x0_pred)
        torch.testing.assert_close(ddpm.log_prob, ddim.log_prob, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_matches_diffusers(prediction_type, eta):
    reference = DDIMScheduler(
        prediction_type=prediction_type, timestep_spacing="trailing", set_alpha_to_one=True, clip_sample=False
    )
    reference.set_timesteps(20)
    schedule = DDPMSchedule()
    out, x, noise = _inputs(2)
    for t in [999, 549, 49]:
        expected = reference.step(out, t, x, eta=eta, variance_noise=noise).prev_sample
        t_prev = t - 50 if t > 49 else -1
        result = ddim_step(
            out,
            x,
            torch.tensor(float(t)),
            torch.tensor(float(t_prev)),
            schedule=schedule,
            prediction_type=prediction_type,
            eta=eta,
            noise=noise,
        )
        torch.testing.assert_close(result.prev, expected, rtol=1e-4, atol=1e-4)


def test_deterministic_steps():
    schedule = DDPMSchedule()
    out, x, _ = _inputs(3)
    t, t_prev = _ddpm_times()
    results = [
        ddim_step(out, x, t, t_prev, schedule=schedule, prediction_type="epsilon", eta=0.0),
        # the last step to the clean end (abar = 1) has zero variance for every sampler
        ddim_step(out, x, t, torch.full((4,), -1.0), schedule=schedule, prediction_type="epsilon", eta=1.0),
        ddpm_step(
            out, x, torch.tensor(30.0), torch.tensor(-1.0), schedule=schedule, prediction_type="epsilon"
        ),
        flow_euler_step(out, x, torch.tensor(0.5), torch.tensor(0.4)),
        flow_sde_step(out, x, torch.tensor(0.5), torch.tensor(0.4), noise_level=0.0),
    ]
    for result in results:
        assert result.log_prob is None
        assert result.std.shape == (4,) and bool((result.std == 0).all())
        assert torch.equal(result.prev, result.mean.to(x.dtype))
    torch.testing.assert_close(results[3].prev, x - 0.1 * out)
    torch.testing.assert_close(results[3].x0_pred, x - 0.5 * out)


def test_zero_std_samples_in_a_stochastic_batch_score_zero():
    out, x, noise = _inputs(4)
    t = torch.tensor([500.0, 30.0, 500.0, 30.0])
    t_prev = torch.tensor([400.0, -1.0, 400.0, -1.0])
    result = ddim_step(
        out, x, t, t_prev, schedule=DDPMSchedule(), prediction_type="epsilon", eta=1.0, noise=noise
    )
    assert result.log_prob[1] == 0 and result.log_prob[3] == 0
    assert result.log_prob[0] != 0
    torch.testing.assert_close(result.prev[1], result.mean[1])


def test_flow_sde_mean_and_std():
    out, x, noise = _inputs(5)
    a, t, t_prev = 0.7, 0.6, 0.5
    dt = t_prev - t
    result = flow_sde_step(out, x, torch.tensor(t), torch.tensor(t_prev), noise_level=a, noise=noise)
    sigma = a * math.sqrt(t / (1 - t))
    expected_mean = x + (out + sigma**2 / (2 * t) * (x + (1 - t) * out)) * dt
    torch.testing.assert_close(result.mean, expected_mean)
    assert result.std[0].item() == pytest.approx(sigma * math.sqrt(-dt), rel=1e-6)
    torch.testing.assert_close(result.x0_pred, x - t * out)
    # at t == 1 the denominator uses 1 - sigma_max
    top = flow_sde_step(
        out, x, torch.tensor(1.0), torch.tensor(0.9), noise_level=a, sigma_max=0.9, noise=noise
    )
    sigma_top = a * math.sqrt(1 / (1 - 0.9))
    assert top.std[0].item() == pytest.approx(sigma_top * math.sqrt(0.1), rel=1e-6)
    torch.testing.assert_close(top.mean, x + (out + sigma_top**2 / 2 * x) * -0.1)
    with pytest.raises(ValueError, match="sigma_max"):
        flow_sde_step(out, x, torch.tensor(1.0), torch.tensor(0.9), noise=noise)
    # per-sample t with one sample at t == 1
    mixed = flow_sde_step(
        out,
        x,
        torch.tensor([1.0, 0.6, 0.6, 0.6]),
        torch.tensor([0.9, 0.5, 0.5, 0.5]),
        noise_level=a,
        sigma_max=0.9,
        noise=noise,
    )
    torch.testing.assert_close(mixed.mean[0], top.mean[0])
    torch.testing.assert_close(mixed.mean[1:], result.mean[1:])


def test_steps_keep_gradients_and_float64():
    out, x, noise = _inputs(6, dtype=torch.float64)
    out.requires_grad_(True)
    result = ddim_step(
        out,
        x,
        torch.tensor(500.0),
        torch.tensor(450.0),
        schedule=DDPMSchedule(),
        prediction_type="epsilon",
        eta=1.0,
        noise=noise,
    )
    assert result.prev.dtype == torch.float64 and result.prev.requires_grad
    (result.prev.sum() + result.log_prob.sum()).backward()
    assert out.grad is not None and out.grad.abs().sum() > 0
    sde = flow_sde_step(out, x, torch.tensor(0.5), torch.tensor(0.4), prev_sample=x)
    assert sde.log_prob.requires_grad and sde.log_prob.dtype == torch.float32
