"""The SDE window (`SamplerConfig.sde_window`): only the window's steps are stochastic, the others are
the sampler's deterministic twin, the noise stream keeps its layout, and recomputation reproduces the
window's log-probs."""

import pytest
import torch

from diffalign.diffusion import SamplerConfig, ddim_step, guided_predict, recompute_step, sample
from diffalign.diffusion.steps import flow_euler_step
from tests.diffusion.toy_models import ConvModel

PROMPTS = [f"prompt {i}" for i in range(4)]
SEEDS = [11, 12, 13, 14]
STOCHASTIC = {
    "ddim": ("epsilon", {"sampler": "ddim", "eta": 1.0}),
    "ddpm": ("v_prediction", {"sampler": "ddpm"}),
    "flow_sde": ("flow", {"sampler": "flow_sde", "noise_level": 0.7}),
}


def test_window_validation():
    assert SamplerConfig(num_steps=6, sde_window=[1, 3]).sde_window == (1, 3)
    for bad in [(3, 3), (-1, 2), (2, 7), (4, 1)]:
        with pytest.raises(ValueError, match="sde_window"):
            SamplerConfig(num_steps=6, sde_window=bad)
    with pytest.raises(ValueError, match="two step indices"):
        SamplerConfig(num_steps=6, sde_window=(1, 2, 3))
    with pytest.raises(ValueError, match="needs a stochastic sampler"):
        SamplerConfig(num_steps=6, eta=0.0, sde_window=(0, 2))
    with pytest.raises(ValueError, match="needs a stochastic sampler"):
        SamplerConfig(sampler="flow_euler", num_steps=6, sde_window=(0, 2))


def test_step_config_twins():
    ddim = SamplerConfig(num_steps=6, eta=0.5, guidance_scale=2.0, sde_window=(2, 4))
    assert ddim.step_config(2) is ddim and ddim.step_config(3) is ddim
    twin = ddim.step_config(1)
    assert (twin.sampler, twin.eta, twin.sde_window, twin.guidance_scale) == ("ddim", 0.0, None, 2.0)
    assert SamplerConfig(sampler="ddpm", num_steps=6, sde_window=(0, 1)).step_config(5).sampler == "ddim"
    flow = SamplerConfig(sampler="flow_sde", num_steps=6, sde_window=(0, 2))
    assert flow.step_config(4).sampler == "flow_euler" and flow.step_config(1) is flow
    whole = SamplerConfig(num_steps=6)
    assert all(whole.step_config(i) is whole for i in range(6))


@pytest.mark.parametrize("name", sorted(STOCHASTIC))
def test_only_window_steps_are_stochastic_and_they_recompute(name):
    prediction_type, kwargs = STOCHASTIC[name]
    model = ConvModel(prediction_type, batch_invariant=True)
    config = SamplerConfig(num_steps=6, guidance_scale=2.0, sde_window=(1, 3), **kwargs)
    traj = sample(model, PROMPTS, config=config, seeds=SEEDS)
    assert traj.stochastic.tolist() == [False, True, True, False, False, False]
    assert torch.all(traj.log_probs[:, [0, 3, 4, 5]] == 0)
    for step in (1, 2):
        new = recompute_step(model, traj, step).log_prob
        torch.testing.assert_close(new, traj.log_probs[:, step], rtol=0, atol=1e-5)
    # the whole chain as the window is the plain sampler, draw for draw
    plain = sample(
        model, PROMPTS, config=SamplerConfig(num_steps=6, guidance_scale=2.0, **kwargs), seeds=SEEDS
    )
    whole = sample(
        model,
        PROMPTS,
        config=SamplerConfig(num_steps=6, guidance_scale=2.0, sde_window=(0, 6), **kwargs),
        seeds=SEEDS,
    )
    assert torch.equal(plain.latents, whole.latents)


@pytest.mark.parametrize("name", ["ddim", "flow_sde"])
def test_steps_outside_the_window_are_the_deterministic_step_and_noise_keeps_its_layout(name):
    prediction_type, kwargs = STOCHASTIC[name]
    model = ConvModel(prediction_type, batch_invariant=True)
    config = SamplerConfig(num_steps=5, guidance_scale=1.0, sde_window=(2, 3), **kwargs)
    traj = sample(model, PROMPTS, config=config, seeds=SEEDS)
    cond = model.encode_prompts(PROMPTS)
    for step in (0, 1, 3, 4):  # an independent deterministic step from the stored x_t
        x_t, t, t_prev = traj.latents[:, step], traj.timesteps[step], traj.timesteps[step + 1]
        with torch.no_grad():
            out = guided_predict(model, x_t, t, cond)
        if name == "ddim":
            expected = ddim_step(
                out, x_t, t, t_prev, schedule=model.schedule, prediction_type=prediction_type, eta=0.0
            ).prev
        else:
            expected = flow_euler_step(out, x_t, t, t_prev).prev
        torch.testing.assert_close(traj.latents[:, step + 1], expected, rtol=0, atol=1e-6)
    # the window's step uses the seed's normal of that step (initial draw, then one per step):
    # a manual run of the same generators reproduces it
    generators = [torch.Generator().manual_seed(s) for s in SEEDS]
    draws = [
        torch.stack([torch.randn(model.latent_shape, generator=g) for g in generators]) for _ in range(6)
    ]
    torch.testing.assert_close(traj.latents[:, 0], draws[0], rtol=0, atol=0)
    x_t, t, t_prev = traj.latents[:, 2], traj.timesteps[2], traj.timesteps[3]
    with torch.no_grad():
        out = guided_predict(model, x_t, t, cond)
    if name == "ddim":
        step = ddim_step(
            out,
            x_t,
            t,
            t_prev,
            schedule=model.schedule,
            prediction_type=prediction_type,
            eta=1.0,
            noise=draws[3],
        )
    else:
        from diffalign.diffusion.steps import flow_sde_step

        step = flow_sde_step(
            out, x_t, t, t_prev, noise_level=0.7, sigma_max=float(traj.timesteps[1]), noise=draws[3]
        )
    torch.testing.assert_close(traj.latents[:, 3], step.prev, rtol=0, atol=1e-6)
