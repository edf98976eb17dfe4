"""One step of each alignment family on each adapter, through the adapter's own interface only.

The trainers' own loops run on pipelines in tests/align/test_trainers_on_pipelines.py; these tests
check the losses on the adapters directly, step by step: a Diffusion-DPO step (VAE latents, the schedule's
noising and target, policy vs reference), a PPO/GRPO step on recomputed sampler log-probs (with
guidance), and a DRaFT-1 step (reward gradient through the last sampling step and the VAE decoder).
"""

from __future__ import annotations

import math

import pytest
import torch

from diffalign.align.losses import diffusion_dpo_loss, per_sample_mse
from diffalign.align.pg_losses import gaussian_mean_kl, ppo_clip_loss
from diffalign.diffusion.sampling import SamplerConfig, recompute_step, sample
from diffalign.diffusion.schedules import training_target
from diffalign.models.registry import load_model
from tests.models.tiny_pipelines import RESOLUTION, build_sd, build_sd3, build_sdxl

torch.set_num_threads(1)

BUILDERS = {"sd": build_sd, "sdxl": build_sdxl, "sd3": build_sd3}
PROMPTS = ["a red circle", "a blue square"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("method_pipelines")
    return {name: build(root / name) for name, build in BUILDERS.items()}


def lora_model(folder):
    model = load_model(str(folder))
    model.enable_lora(rank=4)
    model.freeze_reference()
    model.denoiser.train()
    return model


def changed(before: list[torch.Tensor], model) -> bool:
    return any(
        (b - p.detach()).abs().max() > 0 for b, p in zip(before, model.trainable_parameters(), strict=True)
    )


@pytest.mark.parametrize("family", BUILDERS)
def test_a_diffusion_dpo_step(folders, family):
    model = lora_model(folders[family])
    g = torch.Generator().manual_seed(0)
    winners, losers = torch.rand(2, 2, *model.image_shape, generator=g)
    with torch.no_grad():
        x0 = model.encode(torch.cat([winners, losers]))
    assert x0.shape == (4, *model.latent_shape)
    noise = torch.randn(2, *model.latent_shape, generator=g).repeat(2, 1, 1, 1)  # shared by w and l
    t = model.schedule.sample_training_timesteps(2, generator=g).repeat(2)  # ... and timestep
    x_t = model.schedule.add_noise(x0, noise, t)
    target = training_target(x0, noise, t, model.prediction_type, model.schedule)
    cond = model.encode_prompts(PROMPTS * 2)
    err = per_sample_mse(model.forward_network(model.denoiser, x_t, t, cond), target)
    ref = per_sample_mse(model.reference_predict(x_t, t, cond), target)
    out = diffusion_dpo_loss(err[:2], err[2:], ref[:2], ref[2:], beta=5000.0)
    assert math.isclose(out.loss.item(), math.log(2), rel_tol=1e-4)  # policy == reference at the start
    before = [p.detach().clone() for p in model.trainable_parameters()]
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-3)
    out.loss.backward()
    optimizer.step()
    assert changed(before, model)


@pytest.mark.parametrize("family", BUILDERS)
def test_a_policy_gradient_step_with_guidance(folders, family):
    model = lora_model(folders[family])
    sampler = "flow_sde" if family == "sd3" else "ddim"
    config = SamplerConfig(sampler=sampler, num_steps=3, eta=1.0, guidance_scale=4.0)
    with torch.no_grad():
        traj = sample(model, PROMPTS, config=config, seeds=[0, 1])
    advantages = torch.tensor([1.0, -1.0])
    before = [p.detach().clone() for p in model.trainable_parameters()]
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-3)
    step = recompute_step(model, traj, 1)
    ppo = ppo_clip_loss(step.log_prob, traj.log_probs[:, 1], advantages, clip_range=1e-4)
    torch.testing.assert_close(ppo.ratio, torch.ones(2), rtol=1e-4, atol=1e-4)  # on-policy
    ref = recompute_step(model, traj, 1, use_reference=True)
    kl = gaussian_mean_kl(step.mean, ref.mean, step.std)
    assert kl.abs().max() < 1e-8  # LoRA starts as the reference
    (ppo.loss + kl.mean()).backward()
    optimizer.step()
    assert changed(before, model)
    with torch.no_grad():
        assert (recompute_step(model, traj, 1).log_prob - traj.log_probs[:, 1]).abs().max() > 0


@pytest.mark.parametrize("family", BUILDERS)
def test_a_draft_step_backpropagates_a_reward_through_the_vae(folders, family):
    model = lora_model(folders[family])
    sampler = "flow_euler" if family == "sd3" else "ddim"
    config = SamplerConfig(sampler=sampler, num_steps=3, eta=0.0, guidance_scale=2.0)
    traj = sample(model, PROMPTS, config=config, seeds=[0, 1], grad_steps=[-1], checkpoint_grad_steps=True)
    assert traj.images.requires_grad and traj.images.shape == (2, 3, RESOLUTION, RESOLUTION)
    reward = traj.images[:, 0].mean() - traj.images[:, 2].mean()  # "redness", differentiable
    before = [p.detach().clone() for p in model.trainable_parameters()]
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-3)
    (-reward).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.trainable_parameters())
    assert all(p.grad is None for p in model.vae.parameters())  # the VAE is frozen
    optimizer.step()
    assert changed(before, model)
