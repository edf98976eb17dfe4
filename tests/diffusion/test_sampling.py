import pytest
import torch

from diffalign.diffusion import (
    SamplerConfig,
    StepInfo,
    Trajectory,
    ddim_step,
    guided_predict,
    recompute_step,
    sample,
)
from tests.diffusion.toy_models import ConvModel, GaussianModel

PROMPTS = [f"prompt {i}" for i in range(8)]
SEEDS = list(range(100, 108))

# (prediction_type, config kwargs) of the stochastic samplers trainers use
STOCHASTIC = {
    "ddim": ("epsilon", {"sampler": "ddim", "eta": 1.0}),
    "flow_sde": ("flow", {"sampler": "flow_sde", "noise_level": 0.7}),
}


def _ratio_error(model, trajectory, step, indices):
    new = recompute_step(model, trajectory, step, indices).log_prob
    old = trajectory.log_probs[:, step] if indices is None else trajectory.log_probs[indices, step]
    return (torch.exp(new - old) - 1).abs().max().item()


# --- configuration ---------------------------------------------------------------------------------


def test_config_validation():
    with pytest.raises(ValueError, match="sampler"):
        SamplerConfig(sampler="euler_a")
    with pytest.raises(ValueError, match="num_steps"):
        SamplerConfig(num_steps=0)
    with pytest.raises(ValueError, match="eta"):
        SamplerConfig(eta=-0.1)
    with pytest.raises(ValueError, match="noise_level"):
        SamplerConfig(noise_level=-1.0)
    with pytest.raises(ValueError, match="timestep_spacing"):
        SamplerConfig(timestep_spacing="linspace")
    # NaN passes every `< 0` check and made NaN images (a NaN eta even counted as deterministic)
    for name in ("eta", "noise_level", "guidance_scale"):
        for value in (float("nan"), float("inf")):
            with pytest.raises(ValueError, match=f"{name} must be a finite number"):
                SamplerConfig(**{name: value})
    assert SamplerConfig(guidance_scale=-1.0, eta=2.0).guidance_scale == -1.0  # finite edges stay allowed
    assert SamplerConfig.for_prediction_type("flow").sampler == "flow_sde"
    assert SamplerConfig.for_prediction_type("epsilon", num_steps=3).sampler == "ddim"


@pytest.mark.parametrize(
    ("prediction_type", "sampler"),
    [("flow", "ddim"), ("flow", "ddpm"), ("epsilon", "flow_sde"), ("v_prediction", "flow_euler")],
)
def test_sampler_must_match_the_model_family(prediction_type, sampler):
    model = GaussianModel(prediction_type)
    with pytest.raises(ValueError, match="sampler"):
        sample(model, ["up"], config=SamplerConfig(sampler=sampler, num_steps=2), seeds=[0])


# --- log-prob ratios -------------------------------------------------------------------------------


@pytest.mark.parametrize("guidance_scale", [1.0, 4.0])
@pytest.mark.parametrize("name", sorted(STOCHASTIC))
def test_recomputed_ratio_is_one_for_any_batch_split(name, guidance_scale):
    prediction_type, kwargs = STOCHASTIC[name]
    model = ConvModel(prediction_type, batch_invariant=True)
    config = SamplerConfig(num_steps=6, guidance_scale=guidance_scale, **kwargs)
    trajectory = sample(model, PROMPTS, config=config, seeds=SEEDS)
    assert trajectory.log_probs.shape == (8, 6) and trajectory.log_probs.dtype == torch.float32
    assert trajectory.nfe == (12 if guidance_scale != 1 else 6)
    steps = [i for i in range(6) if trajectory.stochastic[i]]
    assert len(steps) == (5 if name == "ddim" else 6)  # DDIM's last step to abar = 1 is deterministic
    for step in steps:
        for indices in (None, [5, 1, 7], [3], [0, 2, 4, 6]):
            assert _ratio_error(model, trajectory, step, indices) < 1e-5
        reference = recompute_step(model, trajectory, step, [5, 1, 7], use_reference=True).log_prob
        torch.testing.assert_close(reference, trajectory.log_probs[[5, 1, 7], step], rtol=0, atol=1e-5)
    # batch size 1 sampling
    single = sample(model, ["alone"], config=config, seeds=[7])
    for step in steps:
        assert _ratio_error(model, single, step, None) < 1e-5


@pytest.mark.parametrize("name", sorted(STOCHASTIC))
def test_ratio_is_one_with_batched_kernels_on_the_sampling_batch(name):
    prediction_type, kwargs = STOCHASTIC[name]
    model = ConvModel(prediction_type)
    trajectory = sample(
        model, PROMPTS, config=SamplerConfig(num_steps=5, guidance_scale=3.0, **kwargs), seeds=SEEDS
    )
    with torch.enable_grad():
        for step in range(5):
            if trajectory.stochastic[step]:
                assert _ratio_error(model, trajectory, step, None) < 1e-5


def test_recompute_gives_gradients_and_changes_with_weights():
    model = ConvModel("flow", batch_invariant=True)
    trajectory = sample(
        model, PROMPTS[:4], config=SamplerConfig(sampler="flow_sde", num_steps=4), seeds=SEEDS[:4]
    )
    out = recompute_step(model, trajectory, 2, [1, 3])
    out.log_prob.sum().backward()
    assert all(p.grad is not None for p in model.trainable_parameters())
    with torch.no_grad():
        model.net.conv_out.bias.add_(0.5)
    assert _ratio_error(model, trajectory, 2, None) > 1e-3


# --- seeds and batches -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(STOCHASTIC))
def test_same_seeds_same_images_and_batch_independence(name):
    prediction_type, kwargs = STOCHASTIC[name]
    model = ConvModel(prediction_type)
    config = SamplerConfig(num_steps=5, guidance_scale=2.0, **kwargs)
    first = sample(model, PROMPTS, config=config, seeds=SEEDS)
    second = sample(model, PROMPTS, config=config, seeds=SEEDS)
    assert torch.equal(first.images, second.images)
    assert first.images.shape == (8, 3, 8, 8) and first.images.min() >= 0 and first.images.max() <= 1
    alone = sample(model, [PROMPTS[5]], config=config, seeds=[SEEDS[5]])
    torch.testing.assert_close(alone.latents[0], first.latents[5], rtol=0, atol=1e-5)
    torch.testing.assert_close(alone.log_probs[0], first.log_probs[5], rtol=0, atol=1e-6)
    other = sample(model, PROMPTS, config=config, seeds=[s + 1 for s in SEEDS])
    assert not torch.allclose(other.images, first.images)


def test_seed_bookkeeping_generators_and_latent_override():
    model = ConvModel("epsilon")
    config = SamplerConfig(num_steps=4, eta=1.0)
    drawn = sample(model, PROMPTS[:3], config=config)
    assert len(drawn.seeds) == 3
    again = sample(model, PROMPTS[:3], config=config, seeds=drawn.seeds)
    assert torch.equal(again.latents, drawn.latents)
    with_generators = sample(
        model, PROMPTS[:3], config=config, seeds=[torch.Generator().manual_seed(s) for s in drawn.seeds]
    )
    assert with_generators.seeds is None and torch.equal(with_generators.latents, drawn.latents)
    # overriding x_T keeps the per-step noise: passing the default x_T reproduces the trajectory
    override = sample(
        model, PROMPTS[:3], config=config, seeds=drawn.seeds, latents=drawn.latents[:, 0].clone()
    )
    assert torch.equal(override.latents, drawn.latents)
    with pytest.raises(ValueError, match="seeds"):
        sample(model, PROMPTS[:3], config=config, seeds=[1, 2])
    with pytest.raises(ValueError, match="latents"):
        sample(model, PROMPTS[:3], config=config, latents=torch.zeros(3, 3, 4, 4))


# --- reaching the data distribution ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("prediction_type", "sampler", "eta", "steps", "tolerance"),
    [
        ("epsilon", "ddim", 0.0, 100, 0.03),
        ("v_prediction", "ddim", 0.0, 100, 0.03),
        ("epsilon", "ddpm", 1.0, 250, 0.03),
        ("v_prediction", "ddim", 1.0, 250, 0.03),
        ("flow", "flow_euler", 0.0, 100, 0.02),
        ("flow", "flow_sde", 0.0, 100, 0.02),
    ],
)
def test_samplers_reach_the_gaussian_data_distribution(prediction_type, sampler, eta, steps, tolerance):
    # 2 x 64 samples of 256 independent dimensions: 16k draws per prompt (standard errors ~0.004).
    # Tolerances allow for the samplers' O(1/steps) discretisation bias, which at 100 steps is ~0.015
    # on the std for DDIM, ~0.008 for the flow ODE, and ~0.03 for DDPM's posterior (hence 250 steps).
    model = GaussianModel(prediction_type, s=0.5, latent_shape=(1, 16, 16))
    config = SamplerConfig(sampler=sampler, num_steps=steps, eta=eta)
    trajectory = sample(model, ["up"] * 64 + ["down"] * 64, config=config, seeds=range(128), decode=False)
    x = trajectory.final_latents
    for rows, mu in ((slice(0, 64), 1.5), (slice(64, 128), -1.0)):
        assert abs(x[rows].mean().item() - mu) < tolerance
        assert abs(x[rows].std().item() - 0.5) < tolerance


# --- gradients -------------------------------------------------------------------------------------


def _grads(model):
    return [p.grad.clone() for p in model.trainable_parameters()]


def test_grad_steps_last_only_matches_a_manual_last_step():
    model = ConvModel("epsilon")
    config = SamplerConfig(num_steps=4, eta=1.0, guidance_scale=2.0)
    x_T = torch.randn(2, 3, 8, 8, requires_grad=True)
    trajectory = sample(model, PROMPTS[:2], config=config, seeds=SEEDS[:2], latents=x_T, grad_steps={3})
    assert trajectory.images.requires_grad and not trajectory.latents.requires_grad
    trajectory.images.sum().backward()
    assert x_T.grad is None  # no path to the initial noise
    grads = _grads(model)
    assert all(g.abs().sum() > 0 for g in grads)
    for p in model.trainable_parameters():
        p.grad = None
    # the same gradient from the stored x_t of the last step (which is deterministic for DDIM)
    x_t = trajectory.latents[:, 3]
    t, t_prev = trajectory.timesteps[3].expand(2), trajectory.timesteps[4].expand(2)
    out = guided_predict(model, x_t, t, trajectory.cond, trajectory.uncond, 2.0)
    step = ddim_step(out, x_t, t, t_prev, schedule=model.schedule, prediction_type="epsilon", eta=1.0)
    model.decode(step.prev).clamp(0, 1).sum().backward()
    for got, expected in zip(grads, _grads(model), strict=True):
        torch.testing.assert_close(got, expected)


def test_grad_steps_none_first_and_all():
    model = ConvModel("flow")
    config = SamplerConfig(sampler="flow_sde", num_steps=3, guidance_scale=2.0)
    x_T = torch.randn(2, 3, 8, 8, requires_grad=True)
    none = sample(model, PROMPTS[:2], config=config, seeds=SEEDS[:2], latents=x_T)
    assert not none.images.requires_grad and not none.log_probs.requires_grad
    first = sample(model, PROMPTS[:2], config=config, seeds=SEEDS[:2], latents=x_T, grad_steps=[0])
    assert not first.images.requires_grad  # later steps run without autograd: the decode too
    full = sample(model, PROMPTS[:2], config=config, seeds=SEEDS[:2], latents=x_T, grad_steps="all")
    full.images.sum().backward()
    assert x_T.grad is not None and x_T.grad.abs().sum() > 0
    last = sample(model, PROMPTS[:2], config=config, seeds=SEEDS[:2], latents=x_T, grad_steps=[-1])
    assert last.images.requires_grad
    torch.testing.assert_close(last.images, none.images)
    with pytest.raises(ValueError, match="out of range"):
        sample(model, PROMPTS[:2], config=config, seeds=SEEDS[:2], grad_steps=[3])


@pytest.mark.parametrize("name", sorted(STOCHASTIC))
def test_checkpointed_gradients_equal_plain_ones(name):
    prediction_type, kwargs = STOCHASTIC[name]
    model = ConvModel(prediction_type)
    config = SamplerConfig(num_steps=4, guidance_scale=3.0, **kwargs)
    grads = []
    for use_checkpoint in (False, True):
        for p in model.trainable_parameters():
            p.grad = None
        trajectory = sample(
            model,
            PROMPTS[:3],
            config=config,
            seeds=SEEDS[:3],
            grad_steps={1, 2, 3},
            checkpoint_grad_steps=use_checkpoint,
        )
        trajectory.images.pow(2).mean().backward()
        grads.append(_grads(model))
    for plain, checkpointed in zip(*grads, strict=True):
        torch.testing.assert_close(plain, checkpointed, rtol=1e-5, atol=1e-7)


# --- callback, trajectory --------------------------------------------------------------------------


def test_callback_sees_every_step_and_can_replace_prev():
    model = ConvModel("epsilon", batch_invariant=True)
    config = SamplerConfig(num_steps=5, eta=1.0, guidance_scale=2.0)
    seen: list[StepInfo] = []

    def callback(info: StepInfo):
        seen.append(info)
        if info.step_index == 2:
            return info.output.prev * 0.9
        return None

    trajectory = sample(model, PROMPTS[:4], config=config, seeds=SEEDS[:4], callback=callback)
    assert [info.step_index for info in seen] == list(range(5))
    assert seen[2].t == trajectory.timesteps[2] and seen[2].t_prev == trajectory.timesteps[3]
    assert seen[2].model_output.shape == (4, 3, 8, 8) and seen[2].num_steps == 5
    torch.testing.assert_close(trajectory.latents[:, 3], seen[2].output.prev * 0.9)
    assert torch.equal(seen[3].x_t, trajectory.latents[:, 3])
    # the stored log-prob is that of the replacement, so recomputation still agrees
    assert _ratio_error(model, trajectory, 2, None) < 1e-5
    assert not torch.allclose(trajectory.log_probs[:, 2], seen[2].output.log_prob)


def test_trajectory_layout_select_and_x0():
    model = ConvModel("epsilon", batch_invariant=True)
    config = SamplerConfig(num_steps=4, eta=1.0, guidance_scale=2.0)
    trajectory = sample(model, PROMPTS, config=config, seeds=SEEDS, keep_x0=True)
    assert isinstance(trajectory, Trajectory) and len(trajectory) == 8 and trajectory.num_steps == 4
    assert trajectory.latents.shape == (8, 5, 3, 8, 8) and trajectory.x0_preds.shape == (8, 4, 3, 8, 8)
    assert torch.equal(trajectory.t, trajectory.timesteps[:-1]) and trajectory.timesteps[-1] == -1
    assert trajectory.stochastic.tolist() == [True, True, True, False]
    assert bool((trajectory.log_probs[:, -1] == 0).all())
    # DDIM's last step lands on its x0 prediction
    torch.testing.assert_close(trajectory.x0_preds[:, -1], trajectory.final_latents)
    torch.testing.assert_close(trajectory.images, model.decode(trajectory.final_latents).clamp(0, 1))
    sub = trajectory.select([5, 1, 7])
    assert sub.prompts == [PROMPTS[5], PROMPTS[1], PROMPTS[7]] and sub.seeds == [SEEDS[5], SEEDS[1], SEEDS[7]]
    assert torch.equal(sub.latents, trajectory.latents[[5, 1, 7]])
    assert torch.equal(sub.uncond.tensors["emb"], trajectory.uncond.tensors["emb"][[5, 1, 7]])
    assert len(trajectory.select(slice(2, 4))) == 2
    torch.testing.assert_close(
        recompute_step(model, sub, 1).log_prob, recompute_step(model, trajectory, 1, [5, 1, 7]).log_prob
    )


def test_deterministic_samplers_store_no_log_probs():
    for prediction_type, sampler in (("epsilon", "ddim"), ("flow", "flow_euler")):
        model = ConvModel(prediction_type)
        config = SamplerConfig(sampler=sampler, num_steps=3, eta=0.0)
        trajectory = sample(model, PROMPTS[:2], config=config, seeds=SEEDS[:2], decode=False)
        assert trajectory.log_probs is None and trajectory.images is None
        assert not bool(trajectory.stochastic.any())
        assert recompute_step(model, trajectory, 0).log_prob is None
