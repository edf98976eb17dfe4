"""Test models implementing `DiffusionModel`: an exact Gaussian denoiser and a tiny conv net."""

from __future__ import annotations

import copy
import zlib
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from diffalign.diffusion import Conditioning, DDPMSchedule, FlowSchedule


def default_schedule(prediction_type: str) -> DDPMSchedule | FlowSchedule:
    return FlowSchedule() if prediction_type == "flow" else DDPMSchedule()


class GaussianModel:
    """The exact denoiser for data x0 ~ N(mu, s^2 I), where the prompt picks mu.

    For x_t = a x0 + b eps (DDPM: a = sqrt(abar), b = sqrt(1 - abar); flow: a = 1 - t, b = t),
    x_t ~ N(a mu, a^2 s^2 + b^2), and the posterior means are linear in x_t:
    E[x0 | x_t] = mu + a s^2 / var (x_t - a mu), E[eps | x_t] = b / var (x_t - a mu).
    """

    def __init__(
        self,
        prediction_type: str = "epsilon",
        mus: dict[str, float] | None = None,
        s: float = 0.5,
        latent_shape: tuple[int, int, int] = (1, 2, 2),
        schedule: DDPMSchedule | FlowSchedule | None = None,
    ) -> None:
        self.prediction_type = prediction_type
        self.mus = {"": 0.0, "up": 1.5, "down": -1.0} if mus is None else mus
        self.s = s
        self.latent_shape = latent_shape
        self._schedule = default_schedule(prediction_type) if schedule is None else schedule

    @property
    def schedule(self) -> DDPMSchedule | FlowSchedule:
        return self._schedule

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        return Conditioning({"mu": torch.tensor([self.mus[p] for p in prompts], dtype=torch.float64)})

    def predict(self, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        x = x_t.double()
        mu = cond.tensors["mu"].view(-1, 1, 1, 1)
        t = t.double().view(-1, 1, 1, 1)
        if self.prediction_type == "flow":
            a, b = 1 - t, t
        else:
            abar = self._schedule.alpha_bar(t.flatten()).view(-1, 1, 1, 1)
            a, b = abar.sqrt(), (1 - abar).sqrt()
        var = a**2 * self.s**2 + b**2
        x0 = mu + a * self.s**2 / var * (x - a * mu)
        eps = b / var * (x - a * mu)
        if self.prediction_type == "epsilon":
            out = eps
        elif self.prediction_type == "v_prediction":
            out = a * eps - b * x0
        else:
            out = eps - x0
        return out.to(x_t.dtype)

    def reference_predict(self, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        return self.predict(x_t, t, cond)

    def encode(self, images: Tensor) -> Tensor:
        return images[:, : self.latent_shape[0]] * 2 - 1

    def decode(self, latents: Tensor) -> Tensor:
        channels = latents.shape[1]
        return ((latents + 1) / 2).repeat(1, 3 // channels + 1, 1, 1)[:, :3]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return []

    def save(self, directory: str) -> None:
        raise NotImplementedError


def prompt_vector(prompt: str, dim: int) -> Tensor:
    """A fixed random vector per prompt ("" included), independent of the batch."""
    generator = torch.Generator().manual_seed(zlib.crc32(prompt.encode()))
    return torch.randn(dim, generator=generator)


class TinyNet(nn.Module):
    """conv -> (+ prompt and time features) -> SiLU -> conv -> SiLU -> conv."""

    def __init__(self, channels: int, hidden: int, cond_dim: int) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(channels, hidden, 3, padding=1)
        self.cond = nn.Linear(cond_dim + 2, hidden)
        self.conv_mid = nn.Conv2d(hidden, hidden, 3, padding=1)
        self.conv_out = nn.Conv2d(hidden, channels, 3, padding=1)

    def forward(self, x: Tensor, time: Tensor, emb: Tensor) -> Tensor:
        features = torch.cat([emb, torch.sin(3 * time)[:, None], torch.cos(3 * time)[:, None]], dim=1)
        h = self.conv_in(x) + self.cond(features)[:, :, None, None]
        h = nn.functional.silu(h)
        h = nn.functional.silu(self.conv_mid(h))
        return self.conv_out(h)


class ConvModel:
    """A tiny random conv net behind the protocol; the "" prompt has its own conditioning vector.

    The output is x_t + 0.1 net(x_t, t, prompt): close to what a denoiser predicts at high noise for
    all three prediction types, so latents stay of order one along a chain.

    With `batch_invariant` the net runs one sample at a time, so a sample's output is bitwise the
    same in any batch (batched CPU convolutions pick kernels by batch size and differ by ~1e-6).
    Ratio tests use it to check the library's bookkeeping rather than the kernels' determinism.
    """

    def __init__(
        self,
        prediction_type: str = "epsilon",
        latent_shape: tuple[int, int, int] = (3, 8, 8),
        hidden: int = 16,
        cond_dim: int = 8,
        seed: int = 0,
        batch_invariant: bool = False,
    ) -> None:
        torch.manual_seed(seed)
        self.batch_invariant = batch_invariant
        self.prediction_type = prediction_type
        self.latent_shape = latent_shape
        self.cond_dim = cond_dim
        self.net = TinyNet(latent_shape[0], hidden, cond_dim)
        self.reference = copy.deepcopy(self.net).requires_grad_(False)
        self._schedule = default_schedule(prediction_type)

    @property
    def schedule(self) -> DDPMSchedule | FlowSchedule:
        return self._schedule

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        return Conditioning({"emb": torch.stack([prompt_vector(p, self.cond_dim) for p in prompts])})

    def _time(self, t: Tensor) -> Tensor:
        return t.float() if self.prediction_type == "flow" else t.float() / 1000

    def _run(self, net: nn.Module, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        t = t.expand(x_t.shape[0]) if t.ndim == 0 else t
        time, emb = self._time(t), cond.tensors["emb"]
        if self.batch_invariant:
            out = torch.cat([net(x_t[i : i + 1], time[i : i + 1], emb[i : i + 1]) for i in range(len(x_t))])
        else:
            out = net(x_t, time, emb)
        return x_t + 0.1 * out

    def predict(self, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        return self._run(self.net, x_t, t, cond)

    def reference_predict(self, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        with torch.no_grad():
            return self._run(self.reference, x_t, t, cond)

    def encode(self, images: Tensor) -> Tensor:
        return images * 2 - 1

    def decode(self, latents: Tensor) -> Tensor:
        return (latents + 1) / 2

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.net.parameters())

    def save(self, directory: str) -> None:
        raise NotImplementedError
