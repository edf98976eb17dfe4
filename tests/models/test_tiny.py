import pytest
import torch

from diffalign.diffusion import Conditioning, DiffusionModel, SamplerConfig, recompute_step, sample
from diffalign.models.registry import UnsupportedModelError, load_model, resolve_model_folder
from diffalign.models.tiny import TinyDiffusionModel
from diffalign.models.tokenizer import ShapesTokenizer, UnknownWordError
from diffalign.world.geneval import score_image
from diffalign.world.grammar import all_metadata, parse_prompt
from diffalign.world.render import to_uint8

TINY = dict(
    block_channels=(8, 16, 16), layers_per_block=1, attention_resolutions=(2,), text_dim=16, attention_heads=2
)


def test_tokenizer_covers_the_grammar_and_names_unknown_words():
    tok = ShapesTokenizer()
    for meta in all_metadata():
        tok.encode(meta["prompt"])
    ids, mask = tok(["a red circle", ""])
    assert ids.shape == (2, tok.max_length)
    assert mask[0].sum() == 4 and mask[1].sum() == 1  # <bos> always present
    with pytest.raises(UnknownWordError) as err:
        tok.encode("a red hexagon")
    assert "'hexagon'" in str(err.value) and "circle" in str(err.value) and "triangle" in str(err.value)


@pytest.mark.parametrize("prediction_type", ["epsilon", "flow"])
def test_save_load_round_trip(tmp_path, prediction_type):
    torch.manual_seed(0)
    model = TinyDiffusionModel.create(prediction_type, TINY)
    for p in model.unet.parameters():  # the output conv starts at zero; make the test meaningful
        p.data.add_(0.01 * torch.randn_like(p))
    model.save(tmp_path / "m")
    loaded = TinyDiffusionModel.load(tmp_path / "m")
    assert loaded.prediction_type == prediction_type and loaded.eps_skip == model.eps_skip
    x = torch.randn(3, 3, 32, 32)
    t = torch.tensor([10.0, 500.0, 990.0]) if prediction_type == "epsilon" else torch.tensor([0.1, 0.5, 0.9])
    cond = model.encode_prompts(["a circle", "two squares", ""])
    with torch.no_grad():
        assert torch.allclose(model.predict(x, t, cond), loaded.predict(x, t, cond), atol=1e-5)
    assert isinstance(loaded, DiffusionModel)


def test_eps_skip_is_the_documented_preconditioning():
    model = TinyDiffusionModel.create("epsilon", TINY)
    x = torch.randn(2, 3, 32, 32)
    t = torch.tensor([999.0, 999.0])
    # output conv is zero-initialised: eps = sqrt(1 - abar) x exactly
    with torch.no_grad():
        eps = model.predict(x, t, model.encode_prompts(["a circle", "a square"]))
    abar = model.schedule.alpha_bar(t).float().view(-1, 1, 1, 1)
    assert torch.allclose(eps, (1 - abar).sqrt() * x, atol=1e-6)


def test_reference_is_frozen_copy_for_full_finetuning():
    torch.manual_seed(0)
    model = TinyDiffusionModel.create("epsilon", TINY)
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([400.0, 600.0])
    cond = model.encode_prompts(["a circle", "a square"])
    before = model.reference_predict(x, t, cond)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
    assert torch.allclose(model.reference_predict(x, t, cond), before)
    assert not torch.allclose(model.predict(x, t, cond), before)
    assert not model.reference_predict(x, t, cond).requires_grad


def test_lora_reference_without_copy_and_merged_save(tmp_path):
    torch.manual_seed(0)
    model = TinyDiffusionModel.create("flow", TINY)
    for p in model.unet.parameters():
        p.data.add_(0.01 * torch.randn_like(p))
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([0.3, 0.7])
    cond = model.encode_prompts(["a circle", "a square"])
    with torch.no_grad():
        base = model.predict(x, t, cond)
    n_all = sum(p.numel() for p in model.unet.parameters())
    model.enable_lora(rank=4)
    trainable = model.trainable_parameters()
    assert 0 < sum(p.numel() for p in trainable) < n_all / 4
    assert all("lora" in n for n, p in model.unet.named_parameters() if p.requires_grad)
    with torch.no_grad():
        for p in trainable:
            p.add_(0.1 * torch.randn_like(p))
        tuned = model.predict(x, t, cond)
    assert not torch.allclose(tuned, base, atol=1e-4)
    assert torch.allclose(model.reference_predict(x, t, cond), base, atol=1e-5)
    assert model._reference is None  # no second copy was made
    model.save(tmp_path / "merged")
    merged = TinyDiffusionModel.load(tmp_path / "merged")
    with torch.no_grad():
        assert torch.allclose(merged.predict(x, t, cond), tuned, atol=1e-4)


def test_gradients_flow_into_the_text_encoder_through_predict():
    model = TinyDiffusionModel.create("epsilon", TINY)
    for p in model.unet.parameters():
        p.data.add_(0.01 * torch.randn_like(p))
    out = model.predict(
        torch.randn(2, 3, 32, 32),
        torch.tensor([100.0, 200.0]),
        model.encode_prompts(["a circle", "a square"]),
    )
    out.pow(2).mean().backward()
    assert model.unet.text.token.weight.grad is not None and model.unet.text.token.weight.grad.abs().sum() > 0


def test_registry_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        resolve_model_folder(str(tmp_path / "missing"))
    (tmp_path / "pipe").mkdir()
    (tmp_path / "pipe" / "model_index.json").write_text('{"_class_name": "FluxPipeline"}')
    assert resolve_model_folder(str(tmp_path / "pipe")) == tmp_path / "pipe"
    with pytest.raises(UnsupportedModelError, match="FluxPipeline pipelines have no adapter"):
        load_model(str(tmp_path / "pipe"))


@pytest.mark.parametrize("name, sampler", [("base", "ddim"), ("base-flow", "flow_euler")])
def test_shipped_base_models_draw_the_simple_prompts(name, sampler):
    model = load_model(name)
    meta = parse_prompt("a red circle")
    config = SamplerConfig(sampler=sampler, num_steps=20, eta=0.0, guidance_scale=3.0)
    with torch.no_grad():
        traj = sample(model, [meta["prompt"]] * 8, config=config, seeds=list(range(8)))
    correct = sum(score_image(image, meta).correct for image in to_uint8(traj.images))
    assert correct >= 6


@pytest.mark.parametrize(
    "name, sampler, guidance",
    [
        ("base", "ddim", 3.0),
        ("base", "ddpm", 1.0),
        ("base-flow", "flow_sde", 3.0),
        ("base-flow", "flow_sde", 1.0),
    ],
)
def test_stored_trajectory_ratio_is_one_on_the_shipped_models(name, sampler, guidance):
    model = load_model(name)
    config = SamplerConfig(sampler=sampler, num_steps=4, eta=1.0, guidance_scale=guidance)
    with torch.no_grad():
        traj = sample(
            model,
            ["a circle left of a square", "two squares", "a blue triangle"],
            config=config,
            seeds=[3, 4, 5],
        )
        for step in range(traj.num_steps):
            if not bool(traj.stochastic[step]):
                continue
            for split in ([0, 1, 2], [2], [1, 0]):
                new = recompute_step(model, traj, step, split).log_prob
                assert torch.allclose(new, traj.log_probs[split, step], atol=1e-3, rtol=0)
                assert torch.allclose(
                    (new - traj.log_probs[split, step]).exp(), torch.ones(len(split)), atol=1e-5
                )


def test_conditioning_helpers():
    model = TinyDiffusionModel.create("flow", TINY)
    cond = model.encode_prompts(["a circle", "a square", "two squares"])
    assert len(cond) == 3 and len(cond[1:]) == 2
    both = Conditioning.cat([cond, cond[0]])
    assert len(both) == 4 and torch.equal(both.tensors["input_ids"][3], cond.tensors["input_ids"][0])
    assert len(cond.repeat_interleave(2)) == 6


def test_shipped_model_sample_does_not_depend_on_its_batch():
    model = load_model("base-flow")
    config = SamplerConfig(sampler="flow_sde", num_steps=3, guidance_scale=3.0)
    prompts = ["a circle", "three squares", "a red triangle and a blue circle", "a square above a circle"]
    with torch.no_grad():
        batch = sample(model, prompts, config=config, seeds=[10, 11, 12, 13])
        again = sample(model, prompts, config=config, seeds=[10, 11, 12, 13])
        alone = sample(model, prompts[2:3], config=config, seeds=[12])
    assert torch.equal(batch.images, again.images)
    assert torch.allclose(alone.latents[0], batch.latents[2], atol=1e-4)
