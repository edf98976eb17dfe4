"""Toy models and rewards for the steering tests."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from diffalign.diffusion import SamplerConfig
from tests.diffusion.toy_models import GaussianModel

PROMPTS = ["a", "b", "a"]


class CountedGaussian(GaussianModel):
    """The exact Gaussian denoiser, counting the latents it is evaluated on (independently of the
    steering package's own accounting)."""

    def __init__(self, prediction_type: str = "epsilon") -> None:
        super().__init__(prediction_type, mus={"": 0.0, "a": 0.0, "b": -0.3}, latent_shape=(1, 2, 2))
        self.rows = 0

    def predict(self, x_t: Tensor, t: Tensor, cond) -> Tensor:
        self.rows += int(x_t.shape[0])
        return super().predict(x_t, t, cond)


class Brightness:
    """A differentiable reward: the mean pixel value, higher on the left half (so it has a direction)."""

    name = "brightness"
    differentiable = True

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        self.calls += int(images.shape[0])
        return images.mean(dim=(1, 2, 3)) + images[..., 0].mean(dim=(1, 2))


class _RaiseOnBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        raise AssertionError("a black-box method backpropagated through the reward")


class BlackBox(Brightness):
    """Brightness as a black box whose backward raises."""

    name = "black-box"
    differentiable = False

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        return _RaiseOnBackward.apply(super().__call__(images, prompts))


def stochastic(prediction_type: str, steps: int = 6, guidance: float = 2.0) -> SamplerConfig:
    sampler = "flow_sde" if prediction_type == "flow" else "ddim"
    return SamplerConfig(sampler=sampler, num_steps=steps, eta=1.0, guidance_scale=guidance)


def deterministic(prediction_type: str, steps: int = 6, guidance: float = 2.0) -> SamplerConfig:
    sampler = "flow_euler" if prediction_type == "flow" else "ddim"
    return SamplerConfig(sampler=sampler, num_steps=steps, eta=0.0, guidance_scale=guidance)
