"""The diffusers adapters on tiny random SD, SDXL and SD3 pipelines built by the tests (no download)."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DiffusionPipeline

from diffalign.diffusion.protocol import DiffusionModel
from diffalign.diffusion.sampling import SamplerConfig, recompute_step, sample
from diffalign.diffusion.schedules import DDPMSchedule, FlowSchedule
from diffalign.models.diffusers_adapters import (
    AdapterConfig,
    StableDiffusion3Adapter,
    StableDiffusionAdapter,
    StableDiffusionXLAdapter,
)
from diffalign.models.registry import load_model
from tests.models.tiny_pipelines import RESOLUTION, build_sd, build_sd3, build_sdxl

torch.set_num_threads(1)

PROMPTS = ["a red circle", "two blue square and a green triangle"]
FAMILIES = ("sd", "sd-v", "sdxl", "sd3")
ADAPTER_TYPES = {
    "sd": StableDiffusionAdapter,
    "sd-v": StableDiffusionAdapter,
    "sdxl": StableDiffusionXLAdapter,
    "sd3": StableDiffusion3Adapter,
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipelines")
    return {
        "sd": build_sd(root / "sd"),
        "sd-v": build_sd(root / "sd-v", prediction_type="v_prediction"),
        "sdxl": build_sdxl(root / "sdxl"),
        "sd3": build_sd3(root / "sd3"),
    }


def fresh_pipeline(folder):
    pipe = DiffusionPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def noisy_input(model, seed=0, batch=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *model.latent_shape, generator=g)
    t = torch.full((batch,), 0.6) if model.prediction_type == "flow" else torch.tensor([999.0, 420.0][:batch])
    return x, t


@pytest.mark.parametrize("family", FAMILIES)
def test_load_model_gives_the_family_adapter_with_the_schedulers_schedule(folders, family):
    model = load_model(str(folders[family]))
    assert isinstance(model, ADAPTER_TYPES[family]) and isinstance(model, DiffusionModel)
    assert model.latent_shape == (4, RESOLUTION // 2, RESOLUTION // 2)
    scheduler = fresh_pipeline(folders[family]).scheduler
    if family == "sd3":
        assert model.prediction_type == "flow"
        assert (
            isinstance(model.schedule, FlowSchedule) and model.schedule.shift == scheduler.config.shift == 3.0
        )
    else:
        assert model.prediction_type == ("v_prediction" if family == "sd-v" else "epsilon")
        assert isinstance(model.schedule, DDPMSchedule)
        torch.testing.assert_close(
            model.schedule.alphas_cumprod.float(), scheduler.alphas_cumprod.float(), rtol=1e-6, atol=1e-7
        )


def test_sd_predict_matches_the_pipelines_own_unet_and_text_encoder(folders):
    model = load_model(str(folders["sd"]))
    pipe = fresh_pipeline(folders["sd"])
    x, t = noisy_input(model)
    tokenizer = pipe.tokenizer
    tokens = tokenizer(PROMPTS, padding="max_length", max_length=tokenizer.model_max_length, truncation=True)
    tokens = torch.tensor(tokens.input_ids)
    with torch.no_grad():
        states = pipe.text_encoder(tokens)[0]
        expected = pipe.unet(x, t.long(), encoder_hidden_states=states).sample
        got = model.predict(x, t, model.encode_prompts(PROMPTS))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def _pipeline_images(family, pipe, latents, steps, guidance):
    kwargs = dict(
        num_inference_steps=steps, guidance_scale=guidance, latents=latents.clone(), output_type="pt"
    )
    if family == "sd3":
        # the unshifted levels; the scheduler applies its shift, giving FlowSchedule.timesteps exactly
        sigmas = torch.linspace(1.0, 0.0, steps + 1)[:-1].tolist()
        return pipe(PROMPTS, sigmas=sigmas, **kwargs).images
    # trailing spacing ending at abar = 1: the grid `DDPMSchedule.timesteps(steps, "trailing")` walks
    pipe.scheduler = DDIMScheduler.from_config(
        pipe.scheduler.config, set_alpha_to_one=True, timestep_spacing="trailing"
    )
    return pipe(PROMPTS, eta=0.0, **kwargs).images


@pytest.mark.parametrize("family", FAMILIES)
def test_sampling_the_adapter_reproduces_the_pipelines_own_images(folders, family):
    """Same initial noise, same grid, deterministic sampler, guidance 3: the pipeline's __call__ (its own
    prompt encoding, guidance, scheduler step and VAE decode) and `sample(adapter)` give the same images."""
    model = load_model(str(folders[family]))
    latents = torch.randn(len(PROMPTS), *model.latent_shape, generator=torch.Generator().manual_seed(3))
    sampler = "flow_euler" if family == "sd3" else "ddim"
    config = SamplerConfig(
        sampler=sampler, num_steps=4, eta=0.0, guidance_scale=3.0, timestep_spacing="trailing"
    )
    with torch.no_grad():
        ours = sample(model, PROMPTS, config=config, seeds=[0, 1], latents=latents).images
        theirs = _pipeline_images(family, fresh_pipeline(folders[family]), latents, 4, 3.0)
    assert ours.shape == theirs.shape == (2, 3, RESOLUTION, RESOLUTION)
    torch.testing.assert_close(ours, theirs.float(), rtol=1e-4, atol=1e-4)
    assert ours.std() > 0.01  # not a constant image


@pytest.mark.parametrize(
    "family, sampler",
    [
        ("sd", "ddim"),
        ("sd", "ddpm"),
        ("sd-v", "ddim"),
        ("sdxl", "ddim"),
        ("sdxl", "ddpm"),
        ("sd3", "flow_euler"),
        ("sd3", "flow_sde"),
    ],
)
def test_every_sampler_runs_and_its_log_probs_recompute(folders, family, sampler):
    model = load_model(str(folders[family]))
    config = SamplerConfig(sampler=sampler, num_steps=3, eta=1.0, guidance_scale=2.0)
    with torch.no_grad():
        traj = sample(model, PROMPTS, config=config, seeds=[5, 6])
    assert traj.images.shape == (2, 3, RESOLUTION, RESOLUTION)
    assert bool(torch.isfinite(traj.images).all()) and traj.nfe == 6
    if sampler == "flow_euler":
        assert traj.log_probs is None
        return
    assert traj.log_probs is not None and bool(torch.isfinite(traj.log_probs).all())
    for step in range(3):
        if bool(traj.stochastic[step]):
            with torch.no_grad():
                again = recompute_step(model, traj, step).log_prob
            torch.testing.assert_close(again, traj.log_probs[:, step], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ("sd", "sdxl", "sd3"))
def test_lora_step_moves_predict_but_not_the_reference(folders, family):
    model = load_model(str(folders[family]))
    x, t = noisy_input(model)
    cond = model.encode_prompts(PROMPTS)
    with torch.no_grad():
        base = model.predict(x, t, cond)
    base_weights = {k: v.clone() for k, v in model.denoiser.state_dict().items()}
    model.enable_lora(rank=4, alpha=8)
    params = model.trainable_parameters()
    assert params and all(p.dtype == torch.float32 for p in params)
    assert sum(p.numel() for p in params) < sum(p.numel() for p in model.denoiser.parameters()) / 2
    with torch.no_grad():
        torch.testing.assert_close(model.predict(x, t, cond), base)  # LoRA's B starts at zero
    optimizer = torch.optim.SGD(params, lr=1.0)
    for _ in range(2):  # two steps: after the first only B has moved (A's gradient needs B != 0)
        optimizer.zero_grad()
        model.predict(x, t, cond).pow(2).mean().backward()
        optimizer.step()
    with torch.no_grad():
        assert (model.predict(x, t, cond) - base).abs().max() > 1e-4
        torch.testing.assert_close(model.reference_predict(x, t, cond), base)
    for name, value in model.denoiser.state_dict().items():
        if name.replace(".base_layer", "") in base_weights and "lora_" not in name:
            torch.testing.assert_close(value, base_weights[name.replace(".base_layer", "")])


def test_full_fine_tuning_reference_is_a_frozen_copy(folders):
    model = load_model(str(folders["sd"]))
    model.freeze_reference()
    x, t = noisy_input(model)
    cond = model.encode_prompts(PROMPTS)
    with torch.no_grad():
        before = model.predict(x, t, cond)
    optimizer = torch.optim.SGD(model.trainable_parameters(), lr=0.5)
    model.predict(x, t, cond).pow(2).mean().backward()
    optimizer.step()
    with torch.no_grad():
        assert (model.predict(x, t, cond) - before).abs().max() > 1e-4
        torch.testing.assert_close(model.reference_predict(x, t, cond), before)


@pytest.mark.parametrize("family", ("sd", "sdxl", "sd3"))
def test_lora_round_trip_through_diffusers_load_lora_weights(folders, family, tmp_path):
    model = load_model(str(folders[family]))
    model.enable_lora(rank=4, alpha=2)
    x, t = noisy_input(model)
    cond = model.encode_prompts(PROMPTS)
    optimizer = torch.optim.SGD(model.trainable_parameters(), lr=1.0)
    for _ in range(2):
        optimizer.zero_grad()
        model.predict(x, t, cond).pow(2).mean().backward()
        optimizer.step()
    with torch.no_grad():
        ours = model.predict(x, t, cond)
        assert (ours - model.reference_predict(x, t, cond)).abs().max() > 1e-4
    model.save_lora(tmp_path / "lora")
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").is_file()

    pipe = fresh_pipeline(folders[family])
    pipe.load_lora_weights(str(tmp_path / "lora"))
    fresh = ADAPTER_TYPES[family](pipe, AdapterConfig())
    with torch.no_grad():
        torch.testing.assert_close(fresh.predict(x, t, cond), ours, rtol=1e-4, atol=1e-5)

    model.save(tmp_path / "merged")  # a full pipeline with the adapters folded in
    merged = load_model(str(tmp_path / "merged"))
    assert not merged.lora
    with torch.no_grad():
        torch.testing.assert_close(merged.predict(x, t, cond), ours, rtol=1e-4, atol=1e-5)

    model.merge_lora()  # in place: the same outputs from a plain denoiser, every weight trainable
    assert not model.lora and not any("lora" in name for name in model.denoiser.state_dict())
    assert len(model.trainable_parameters()) == len(list(model.denoiser.parameters()))
    with torch.no_grad():
        torch.testing.assert_close(model.predict(x, t, cond), ours, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(model.reference_predict(x, t, cond), ours, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="no LoRA adapters"):
        model.merge_lora()


@pytest.mark.parametrize("family", ("sd", "sd3"))
def test_vae_encode_decode_use_scale_and_shift(folders, family):
    model = load_model(str(folders[family]), diffusers_options=AdapterConfig(vae_decode_chunk=1))
    images = torch.rand(3, 3, RESOLUTION, RESOLUTION, generator=torch.Generator().manual_seed(0))
    vae = fresh_pipeline(folders[family]).vae
    scale, shift = vae.config.scaling_factor, vae.config.shift_factor or 0.0
    assert (shift != 0.0) == (family == "sd3")
    with torch.no_grad():
        z = model.encode(images)
        torch.testing.assert_close(z, (vae.encode(images * 2 - 1).latent_dist.mean - shift) * scale)
        decoded = model.decode(z)  # three chunks of one
        torch.testing.assert_close(
            decoded, (vae.decode(z / scale + shift).sample + 1) / 2, rtol=1e-5, atol=1e-5
        )
    assert z.shape == (3, *model.latent_shape)


def test_memory_options(folders):
    x, t = None, None
    plain = load_model(str(folders["sd"]))
    x, t = noisy_input(plain)
    cond = plain.encode_prompts(PROMPTS)

    def grads(model):
        model.denoiser.train()
        model.predict(x, t, cond).pow(2).mean().backward()
        return [p.grad.clone() for p in model.trainable_parameters()]

    options = AdapterConfig(gradient_checkpointing=True, channels_last=True, allow_tf32=True)
    lean = load_model(str(folders["sd"]), diffusers_options=options)
    assert lean.denoiser.is_gradient_checkpointing
    assert lean.denoiser.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    for a, b in zip(grads(plain), grads(lean), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)

    half = load_model(str(folders["sd"]), diffusers_options=AdapterConfig(dtype="bfloat16", lora_rank=2))
    assert half.denoiser.conv_in.weight.dtype == torch.bfloat16 and half.lora
    assert all(p.dtype == torch.float32 for p in half.trainable_parameters())
    with torch.no_grad():
        out = half.predict(x, t, cond)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, plain.predict(x, t, cond), rtol=0.1, atol=0.1)

    fp16 = load_model(str(folders["sd"]), diffusers_options=AdapterConfig(dtype="float16"))
    assert fp16.denoiser.dtype == fp16.pipeline.text_encoder.dtype == torch.float16
    assert fp16.vae.dtype == torch.float32  # force_upcast, as the pipeline does in float16

    large = load_model(str(folders["sd"]), diffusers_options=AdapterConfig(resolution=2 * RESOLUTION))
    assert large.latent_shape == (4, RESOLUTION, RESOLUTION) and large.image_shape == (3, 32, 32)
    with torch.no_grad():
        traj = sample(large, PROMPTS[:1], config=SamplerConfig(num_steps=2), seeds=[0])
    assert traj.images.shape == (1, 3, 2 * RESOLUTION, 2 * RESOLUTION)
    with pytest.raises(ValueError, match="not a multiple of the VAE factor 2"):
        load_model(str(folders["sd"]), diffusers_options=AdapterConfig(resolution=RESOLUTION + 1))


def test_set_reference_takes_another_models_current_weights(folders):
    model, other = load_model(str(folders["sd"])), load_model(str(folders["sd"]))
    x, t = noisy_input(model)
    cond = model.encode_prompts(PROMPTS)
    optimizer = torch.optim.SGD(other.trainable_parameters(), lr=0.5)
    other.predict(x, t, cond).pow(2).mean().backward()
    optimizer.step()
    model.set_reference(other)
    with torch.no_grad():
        torch.testing.assert_close(model.reference_predict(x, t, cond), other.predict(x, t, cond))
        assert (model.predict(x, t, cond) - other.predict(x, t, cond)).abs().max() > 1e-4
    model.enable_lora(rank=2)
    with pytest.raises(ValueError, match="with LoRA the reference"):
        model.set_reference(other)


def test_sdxl_empty_prompt_is_zeros_and_time_ids_follow_the_resolution(folders):
    model = load_model(str(folders["sdxl"]))
    cond = model.encode_prompts(["", "a red circle"]).tensors
    assert set(cond) == {"prompt_embeds", "pooled", "add_time_ids"}
    assert cond["prompt_embeds"][0].abs().sum() == 0 and cond["pooled"][0].abs().sum() == 0
    assert cond["prompt_embeds"][1].abs().sum() > 0
    assert cond["add_time_ids"].tolist() == [[RESOLUTION, RESOLUTION, 0, 0, RESOLUTION, RESOLUTION]] * 2
