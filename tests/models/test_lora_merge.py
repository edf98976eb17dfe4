"""Sampling through merged LoRA adapters (`models.lora_merge`): the same samples as the unmerged
adapters, and the base weights back bit for bit afterwards, on the tiny models and tiny pipelines."""

from __future__ import annotations

import pytest
import torch

from diffalign.align.online_dpo import sampler_for
from diffalign.diffusion import sample
from diffalign.models.lora_merge import adapters_merged, lora_layers, merged_for_sampling
from diffalign.models.registry import load_model
from diffalign.models.tiny import TinyDiffusionModel
from tests.models.tiny_pipelines import build_sd, build_sd3

torch.set_num_threads(1)

TINY = dict(
    block_channels=(8, 16, 16), layers_per_block=1, attention_resolutions=(2,), text_dim=16, attention_heads=2
)
PROMPTS = ["a red circle", "two blue square and a green triangle"]


def with_trained_adapters(model, seed: int = 0):
    """`model` with LoRA adapters whose B is not zero (a fresh adapter is the identity)."""
    model.enable_lora(rank=4, alpha=8)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.denoiser.state_dict().items()}


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge_pipelines")
    return {"sd": build_sd(root / "sd"), "sd3": build_sd3(root / "sd3")}


def models(pipelines):
    torch.manual_seed(0)
    yield "tiny-epsilon", TinyDiffusionModel.create("epsilon", TINY)
    yield "tiny-flow", TinyDiffusionModel.create("flow", TINY)
    for name, folder in pipelines.items():
        yield name, load_model(str(folder))


def test_merged_sampling_gives_the_unmerged_samples_and_restores_the_weights(pipelines):
    for name, model in models(pipelines):
        with_trained_adapters(model)
        sampler = sampler_for(model, steps=3, guidance=None)
        before = state(model)
        with torch.no_grad():
            plain = sample(model, PROMPTS, config=sampler, seeds=[1, 2])
            with merged_for_sampling(model) as merged:
                assert merged == len(lora_layers(model.denoiser)) > 0, name
                assert all(layer.merged for layer in lora_layers(model.denoiser)), name
                fused = sample(model, PROMPTS, config=sampler, seeds=[1, 2])
        torch.testing.assert_close(fused.images, plain.images, rtol=1e-4, atol=1e-5, msg=name)
        if plain.log_probs is not None:
            torch.testing.assert_close(fused.log_probs, plain.log_probs, rtol=1e-4, atol=1e-4, msg=name)
        after = state(model)
        assert after.keys() == before.keys()
        assert all(torch.equal(after[k], before[k]) for k in before), name  # bit for bit
        assert not any(layer.merged for layer in lora_layers(model.denoiser)), name
        assert all(p.requires_grad for p in model.trainable_parameters())


def test_the_base_weights_come_back_after_an_error_and_after_many_merges():
    torch.manual_seed(0)
    model = with_trained_adapters(TinyDiffusionModel.create("epsilon", TINY))
    model.unet.to(torch.bfloat16)  # where W + D - D is not W
    before = state(model)
    with pytest.raises(RuntimeError, match="inside"), adapters_merged(model.denoiser):
        raise RuntimeError("inside")
    for _ in range(5):
        with adapters_merged(model.denoiser):
            pass
    assert all(torch.equal(v, before[k]) for k, v in state(model).items())


def test_nothing_is_merged_without_active_adapters():
    torch.manual_seed(0)
    plain = TinyDiffusionModel.create("epsilon", TINY)
    with merged_for_sampling(plain) as merged:  # no LoRA at all
        assert merged == 0
    model = with_trained_adapters(TinyDiffusionModel.create("epsilon", TINY))
    before = state(model)
    with model.adapters_disabled(), adapters_merged(model.denoiser) as merged:
        assert merged == 0  # the reference: adapters off, nothing to fold in
    assert all(torch.equal(v, before[k]) for k, v in state(model).items())


def test_a_training_step_after_merged_sampling_equals_one_without():
    # the adapters' gradients and update are those of a model that never merged
    def step(merge_first: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = with_trained_adapters(TinyDiffusionModel.create("epsilon", TINY))
        if merge_first:
            with torch.no_grad(), merged_for_sampling(model):
                sample(model, PROMPTS, config=sampler_for(model, 2, None), seeds=[1, 2])
        params = model.trainable_parameters()
        optimizer = torch.optim.SGD(params, lr=0.1)
        x, t = torch.randn(2, *model.latent_shape), torch.tensor([300.0, 700.0])
        model.predict(x, t, model.encode_prompts(PROMPTS)).pow(2).mean().backward()
        optimizer.step()
        return [p.detach().clone() for p in params]

    for a, b in zip(step(True), step(False), strict=True):
        assert torch.equal(a, b)


def test_the_merge_runs_in_the_weights_precision_under_autocast():
    torch.manual_seed(0)
    model = with_trained_adapters(TinyDiffusionModel.create("epsilon", TINY))
    layer = lora_layers(model.denoiser)[0]
    base = layer.get_base_layer()
    adapter = layer.active_adapters[0]
    expected = base.weight.detach().clone() + layer.get_delta_weight(adapter).detach()  # float32
    with torch.autocast("cpu", dtype=torch.bfloat16), adapters_merged(model.denoiser):
        torch.testing.assert_close(base.weight.detach(), expected, rtol=0, atol=1e-6)
