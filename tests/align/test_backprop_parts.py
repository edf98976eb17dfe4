"""The pieces of reward backpropagation against independent computations: where gradients flow
(AlignProp / DRaFT-K truncation), DRaFT-LV's re-noised last step, ReFL's one-step x0 prediction and
pre-training loss, the drift from the base model and its penalty, the online metrics, the config's
checks."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from diffalign.align.backprop_config import BackpropConfig
from diffalign.align.backprop_losses import (
    SamplingPolicy,
    chain_kl_penalty,
    draft_lv_loss,
    drift_to_base,
    pretrain_loss,
    refl_loss,
    truncated_chain_loss,
)
from diffalign.align.online_metrics import diversity, sample_metrics, save_image_grid
from diffalign.align.reward_backprop import train_backprop
from diffalign.diffusion.sampling import SamplerConfig, sample
from diffalign.models.registry import load_model
from diffalign.rewards.protocol import NotDifferentiableError
from tests.align.backprop_helpers import DiffRedness, bp_config
from tests.align.pg_helpers import Redness

PROMPTS = ["a red circle", "two blue squares"]
SEEDS = [3, 4]
DDIM = SamplerConfig(sampler="ddim", num_steps=4, eta=0.0)


def _policy(model_dir):
    model = load_model(str(model_dir))
    model.freeze_reference()
    model.unet.eval()
    return model, SamplingPolicy(model, model.unet)


def _grads(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.unet.parameters() if p.grad is not None])


def _x0_from_eps(model, x_t, t, eps):
    abar = model.schedule.alpha_bar(t).float()[:, None, None, None]
    return (x_t - (1 - abar).sqrt() * eps) / abar.sqrt()


def _eps(model, x_t, t, prompts):
    return model.predict(x_t, t, model.encode_prompts(prompts))


def test_draft_k1_gradient_is_the_last_steps_alone(eps_model_dir):
    model, policy = _policy(eps_model_dir)
    reward = DiffRedness()
    out = truncated_chain_loss(policy, reward, PROMPTS, SEEDS, DDIM, 1, 1.0, checkpoint=True)
    out.loss.backward()
    got = _grads(model)
    model.unet.zero_grad(set_to_none=True)

    # independently: the stored (detached) x_1, one DDIM step to the clean end is x0_hat, rewarded
    traj = out.trajectory
    x_t = traj.latents[:, -2]
    t = traj.timesteps[-2].expand(2)
    x0 = _x0_from_eps(model, x_t, t, _eps(model, x_t, t, PROMPTS))
    assert torch.allclose(model.decode(x0).clamp(0, 1), traj.images, atol=1e-5)
    (-reward(model.decode(x0).clamp(0, 1), PROMPTS).mean()).backward()
    assert torch.allclose(got, _grads(model), rtol=1e-4, atol=1e-6)


def test_more_gradient_steps_change_the_gradient_and_not_the_loss(eps_model_dir):
    model, policy = _policy(eps_model_dir)
    grads, losses = [], []
    for k in (1, 4):
        out = truncated_chain_loss(policy, DiffRedness(), PROMPTS, SEEDS, DDIM, k, 1.0, checkpoint=k == 4)
        out.loss.backward()
        grads.append(_grads(model))
        losses.append(float(out.loss.detach()))
        model.unet.zero_grad(set_to_none=True)
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)
    assert not torch.allclose(grads[0], grads[1], rtol=1e-3, atol=1e-6)
    with pytest.raises(ValueError, match=r"gradient steps must be in \[1, 4\]"):
        truncated_chain_loss(policy, DiffRedness(), PROMPTS, SEEDS, DDIM, 5, 1.0, checkpoint=False)


def test_draft_lv_rewards_the_last_step_of_renoised_copies(eps_model_dir):
    model, policy = _policy(eps_model_dir)
    noise = torch.randn((2, 3, *model.latent_shape), generator=torch.Generator().manual_seed(0))
    out = draft_lv_loss(policy, DiffRedness(), PROMPTS, SEEDS, DDIM, noise, 1.0, checkpoint=False)
    assert out.rewards.shape == (6,) and out.grad_calls == 3
    x0 = out.trajectory.final_latents
    t = out.trajectory.timesteps[-2]
    abar = model.schedule.alpha_bar(t).float()
    with torch.no_grad():
        expected = []
        for i in range(2):
            x_t = abar.sqrt() * x0[i : i + 1] + (1 - abar).sqrt() * noise[i]
            tt = t.expand(3)
            x0_hat = _x0_from_eps(model, x_t, tt, _eps(model, x_t, tt, [PROMPTS[i]] * 3))
            expected.append(DiffRedness()(model.decode(x0_hat).clamp(0, 1), [PROMPTS[i]] * 3))
    assert torch.allclose(out.rewards.detach(), torch.cat(expected), atol=1e-5)
    assert float(out.loss.detach()) == pytest.approx(-float(torch.cat(expected).mean()), abs=1e-5)


def test_refl_scores_the_x0_prediction_of_its_step_and_adds_the_pretraining_loss(eps_model_dir):
    model, policy = _policy(eps_model_dir)
    gen = torch.Generator().manual_seed(1)
    images = torch.rand((2, 3, *model.latent_shape[1:]), generator=gen)
    noise = torch.randn((2, *model.latent_shape), generator=gen)
    t_data = torch.tensor([100.0, 700.0])
    data = (images, ["a red circle", "a blue square"], noise, t_data)
    out = refl_loss(policy, DiffRedness(), PROMPTS, SEEDS, DDIM, 2, 1.0, None, data, 0.5)
    traj = out.trajectory
    with torch.no_grad():
        x_t = traj.latents[:, 2]
        t = traj.timesteps[2].expand(2)
        x0 = _x0_from_eps(model, x_t, t, _eps(model, x_t, t, PROMPTS))
        reward = DiffRedness()(model.decode(x0).clamp(0, 1), PROMPTS)
        x_data = model.schedule.alpha_bar(t_data).float()[:, None, None, None].sqrt() * model.encode(images)
        x_data = x_data + (1 - model.schedule.alpha_bar(t_data).float())[:, None, None, None].sqrt() * noise
        mse = ((_eps(model, x_data, t_data, data[1]) - noise) ** 2).mean()
    assert torch.allclose(out.rewards.detach(), reward, atol=1e-5)
    assert float(out.pretrain_loss) == pytest.approx(float(mse), rel=1e-4)
    assert float(out.loss.detach()) == pytest.approx(
        -float(reward.mean()) + 0.5 * float(mse), rel=1e-4, abs=1e-6
    )
    assert float(pretrain_loss(model, model.unet, *data).detach()) == pytest.approx(float(mse), rel=1e-4)
    hinge = refl_loss(policy, DiffRedness(), PROMPTS, SEEDS, DDIM, 2, 2.0, 0.0, None, 0.0)
    assert float(hinge.loss.detach()) == pytest.approx(float((2 * torch.relu(-reward)).mean()), abs=1e-5)


def _stochastic_and_deterministic_chains(model):
    """The same prompts and seeds sampled by DDIM with eta 1 and with eta 0 (no gradients)."""
    stochastic = SamplerConfig(sampler="ddim", num_steps=4, eta=1.0)
    with torch.no_grad():
        return (
            sample(model, PROMPTS, config=stochastic, seeds=SEEDS),
            sample(model, PROMPTS, config=DDIM, seeds=SEEDS),
        )


def test_drift_to_base_is_zero_at_the_start_and_grows_when_weights_move(eps_model_dir):
    model, _ = _policy(eps_model_dir)
    traj, det = _stochastic_and_deterministic_chains(model)
    assert drift_to_base(model, traj) == ("kl_to_base", 0.0)
    assert drift_to_base(model, det) == ("drift_to_base", 0.0)
    with torch.no_grad():
        for p in model.unet.parameters():
            p.add_(0.01 * torch.randn_like(p))
    assert drift_to_base(model, traj)[1] > 0 and drift_to_base(model, det)[1] > 0


def test_kl_penalty_is_the_chain_kl_estimated_at_drawn_steps_and_pulls_towards_the_base(eps_model_dir):
    model, policy = _policy(eps_model_dir)
    traj, det = _stochastic_and_deterministic_chains(model)
    # at the base the penalty and its gradient are zero (to float32 rounding of the frozen copy)
    at_base = chain_kl_penalty(policy, traj, [0, 2])
    at_base.backward()
    assert float(at_base.detach()) < 1e-10 and float(_grads(model).abs().max()) < 1e-6
    model.unet.zero_grad(set_to_none=True)
    with torch.no_grad():
        for p in model.unet.parameters():
            p.add_(0.01 * torch.randn_like(p, generator=torch.Generator().manual_seed(p.numel())))
    # every step: the logged drift (the chain KL per dimension for eta > 0, the step-mean distance for eta 0)
    for chain in (traj, det):
        full = chain_kl_penalty(policy, chain, range(4))
        assert float(full.detach()) == pytest.approx(drift_to_base(model, chain)[1], rel=1e-5)
    # two of four steps: S / m times their sum; each step's KL against torch.distributions (the last
    # step, to abar = 1, is deterministic even at eta = 1 and counts 0)
    assert not bool(traj.stochastic[3]) and float(chain_kl_penalty(policy, traj, [3]).detach()) == 0.0
    with torch.no_grad():
        expected = 0.0
        for i in (1, 2):
            x_t = traj.latents[:, i]
            t = traj.timesteps[i].expand(2)
            t_prev = traj.timesteps[i + 1].expand(2)
            steps = []
            for predict in (model.predict, model.reference_predict):
                eps = predict(x_t, t, traj.cond)
                abar = model.schedule.alpha_bar(t).float()
                abar_prev = model.schedule.alpha_bar(t_prev).float()
                x0 = (x_t - (1 - abar).sqrt()[:, None, None, None] * eps) / abar.sqrt()[:, None, None, None]
                var = (1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)  # DDIM eta = 1
                direction = (1 - abar_prev - var).clamp(min=0).sqrt()[:, None, None, None] * eps
                steps.append((abar_prev.sqrt()[:, None, None, None] * x0 + direction, var.sqrt()))
            (mu, std), (mu_ref, _) = steps
            sd = std[:, None, None, None].expand_as(mu)
            kl = torch.distributions.kl_divergence(
                torch.distributions.Normal(mu, sd), torch.distributions.Normal(mu_ref, sd)
            )
            expected += float(kl.flatten(1).mean(dim=1).mean())
    estimate = chain_kl_penalty(policy, traj, [1, 2])
    assert float(estimate.detach()) == pytest.approx(expected * 4 / 2, rel=1e-4)
    # a gradient step on the penalty brings the policy's steps back towards the base's
    estimate.backward()
    with torch.no_grad():
        for p in model.unet.parameters():
            if p.grad is not None:
                p.sub_(1e-3 * p.grad / _grads(model).norm())
    assert float(chain_kl_penalty(policy, traj, [1, 2]).detach()) < float(estimate.detach())
    with pytest.raises(ValueError, match="at least one step"):
        chain_kl_penalty(policy, traj, [])


def test_backprop_refuses_a_non_differentiable_reward(tmp_path, eps_model_dir):
    for method in ("alignprop", "draft", "draft-lv", "refl"):
        with pytest.raises(NotDifferentiableError, match=f"{method} backpropagates through the reward"):
            train_backprop(bp_config(eps_model_dir, method), tmp_path / method, reward=Redness())
    with pytest.raises(NotDifferentiableError, match="gold-faithfulness"):
        train_backprop(bp_config(eps_model_dir, reward="gold-faithfulness"), tmp_path / "gold")
    assert not any(tmp_path.iterdir())


def test_config_checks_and_derived_ranges():
    cfg = BackpropConfig(num_steps=40)
    assert cfg.truncation() == (1, 40)
    assert cfg.refl_steps() == (30, 39)  # ImageReward's t in [30, 39] of 40
    assert BackpropConfig(num_steps=10, truncation_range=(3, 50)).truncation() == (3, 10)
    assert BackpropConfig(num_steps=4).refl_steps() == (3, 3)
    assert BackpropConfig(num_steps=10, refl_step_range=(0.0, 0.05)).refl_steps() == (0, 0)
    for bad, match in [
        (dict(method="ddpo"), "method must be one of"),
        (dict(draft_k=11), r"draft_k \(11\) must be <= num_steps"),
        (dict(truncation_range=(0, 3)), "truncation_range"),
        (dict(refl_step_range=(0.9, 0.5)), "refl_step_range"),
        (dict(lv_samples=0), "lv_samples must be >= 1"),
        (dict(pretrain_weight=-1.0), "pretrain_weight must be >= 0"),
        (dict(kl_weight=-1.0), "kl_weight must be >= 0"),
        (dict(kl_steps=11), r"kl_steps \(11\) must be <= num_steps"),
        (dict(kl_steps=0), "kl_steps must be >= 1"),
    ]:
        with pytest.raises(ValueError, match=match):
            BackpropConfig(num_steps=10, **bad)
    with pytest.raises(ValueError, match="sampler: sampler 'ddim' is for epsilon"):
        BackpropConfig(sampler="ddim").sampler_config("flow")
    assert BackpropConfig().sampler_config("flow").sampler == "flow_euler"


def test_diversity_and_sample_metrics_match_a_direct_computation(tmp_path):
    gen = torch.Generator().manual_seed(0)
    images = torch.rand((5, 3, 4, 4), generator=gen)
    prompts = ["a", "a", "a", "b", "c"]
    pairs = [(0, 1), (0, 2), (1, 2)]
    rms = [float(((images[i] - images[j]) ** 2).mean().sqrt()) for i, j in pairs]
    assert diversity(images, prompts) == pytest.approx(np.mean(rms), rel=1e-6)
    assert math.isnan(diversity(images, ["a", "b", "c", "d", "e"]))
    assert diversity(images[:2].repeat(2, 1, 1, 1)[[0, 2]], ["x", "x"]) == pytest.approx(0.0, abs=1e-7)

    class Gold:
        name = "gold"
        differentiable = False

        def __call__(self, images, prompts):
            return torch.tensor([1.0 if p == "a" else 0.0 for p in prompts])

    rewards = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    out = sample_metrics(images, prompts, rewards, Gold())
    assert out["reward_mean"] == pytest.approx(3.0) and out["reward_std"] == pytest.approx(math.sqrt(2.0))
    assert out["gold_mean"] == pytest.approx(0.6)
    assert "gold_mean" not in sample_metrics(images, prompts, rewards, None)
    with pytest.raises(ValueError, match="4 rewards for 5 images"):
        sample_metrics(images, prompts, rewards[:4], None)

    save_image_grid(images, tmp_path / "g" / "grid.png", nrow=2)
    grid = np.asarray(Image.open(tmp_path / "g" / "grid.png"))
    assert grid.shape == (2 + 3 * (4 * 4 + 2), 2 + 2 * (4 * 4 + 2), 3)  # 3 rows x 2 columns, 4x enlarged
    first = grid[2 : 2 + 16 : 4, 2 : 2 + 16 : 4]
    assert np.array_equal(first, (images[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy())
