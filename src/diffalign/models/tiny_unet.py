"""A small text-conditioned pixel-space UNet for the Shapes world.

The network is a diffusers `ModelMixin`/`ConfigMixin`, so `save_pretrained`/`from_pretrained` write
and read config.json + safetensors like any diffusers model, and `PeftAdapterMixin` gives it LoRA
adapters (`add_adapter`, `disable_adapters`).

Architecture (DDPM's UNet, Ho et al. 2020, shrunk; text conditioning as in Stable Diffusion):
- a text encoder: token + position embeddings and a small pre-norm transformer over the prompt's
  tokens (word order matters: "a circle left of a square" is not "a square left of a circle");
  the <bos> output is the pooled prompt vector;
- a timestep embedding (sinusoidal, then an MLP) plus the pooled prompt, applied to every residual
  block as a FiLM scale and shift;
- residual blocks at each resolution, downsampling by strided convolutions and upsampling by
  nearest-neighbour + convolution, with skip connections;
- at the resolutions listed in `attention_resolutions`, a transformer block: self-attention over
  pixels, cross-attention to the prompt tokens, and a feed-forward layer.
The output convolution starts at zero, so training starts from a model that predicts zeros.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders.peft import PeftAdapterMixin
from diffusers.models.modeling_utils import ModelMixin
from torch import Tensor, nn


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of (float) timesteps [B] -> [B, dim] (Vaswani et al. 2017, sec. 3.5)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def _groups(channels: int) -> int:
    for g in (8, 4, 2, 1):
        if channels % g == 0:
            return g
    return 1


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with a FiLM (scale, shift) from the conditioning embedding."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(in_ch), in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.film = nn.Linear(emb_dim, 2 * out_ch)
        self.norm2 = nn.GroupNorm(_groups(out_ch), out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.film(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return h + self.skip(x)


class Attention(nn.Module):
    """Multi-head attention with separate query and key/value sources (self or cross)."""

    def __init__(self, dim: int, context_dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x: Tensor, context: Tensor, mask: Tensor | None = None) -> Tensor:
        b, n, d = x.shape
        q = self.to_q(x).view(b, n, self.heads, d // self.heads).transpose(1, 2)
        k = self.to_k(context).view(b, context.shape[1], self.heads, d // self.heads).transpose(1, 2)
        v = self.to_v(context).view(b, context.shape[1], self.heads, d // self.heads).transpose(1, 2)
        attn_mask = None if mask is None else mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.to_out(out.transpose(1, 2).reshape(b, n, d))


class SpatialTransformer(nn.Module):
    """Self-attention over pixels, cross-attention to the prompt, feed-forward (pre-norm, residual)."""

    def __init__(self, channels: int, text_dim: int, heads: int) -> None:
        super().__init__()
        self.norm_in = nn.GroupNorm(_groups(channels), channels)
        self.norm1 = nn.LayerNorm(channels)
        self.self_attn = Attention(channels, channels, heads)
        self.norm2 = nn.LayerNorm(channels)
        self.cross_attn = Attention(channels, text_dim, heads)
        self.norm3 = nn.LayerNorm(channels)
        self.ff = nn.Sequential(
            nn.Linear(channels, 4 * channels), nn.GELU(), nn.Linear(4 * channels, channels)
        )

    def forward(self, x: Tensor, text: Tensor, text_mask: Tensor) -> Tensor:
        b, c, h, w = x.shape
        tokens = self.norm_in(x).flatten(2).transpose(1, 2)  # [B, HW, C]
        n1 = self.norm1(tokens)
        tokens = tokens + self.self_attn(n1, n1)
        tokens = tokens + self.cross_attn(self.norm2(tokens), text, text_mask)
        tokens = tokens + self.ff(self.norm3(tokens))
        return x + tokens.transpose(1, 2).reshape(b, c, h, w)


class TextEncoder(nn.Module):
    """Token and position embeddings, then a pre-norm transformer encoder over the prompt."""

    def __init__(self, vocab_size: int, max_length: int, dim: int, layers: int, heads: int) -> None:
        super().__init__()
        self.token = nn.Embedding(vocab_size, dim)
        self.position = nn.Parameter(torch.randn(max_length, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(
            dim,
            heads,
            dim_feedforward=2 * dim,
            dropout=0.0,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        h = self.token(ids) + self.position[: ids.shape[1]]
        h = self.norm(self.encoder(h, src_key_padding_mask=~mask))
        return h, h[:, 0]


class TinyUNet(ModelMixin, ConfigMixin, PeftAdapterMixin):
    """Text-conditioned UNet predicting noise or velocity for 32x32 RGB Shapes images.

    Args:
        in_channels / out_channels: image channels.
        sample_size: image side (only recorded; any size divisible by 2^(levels-1) works).
        block_channels: channels at each resolution, from full resolution down.
        layers_per_block: residual blocks per resolution (down path; the up path has one more).
        attention_resolutions: level indices (0 = full resolution) with a spatial transformer.
        attention_heads: heads in the spatial and text transformers.
        vocab_size / max_length: the tokenizer's vocabulary size and sequence length.
        text_dim / text_layers: width and depth of the text encoder.
        dropout: dropout in the residual blocks.
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        sample_size: int = 32,
        block_channels: tuple[int, ...] = (32, 64, 128),
        layers_per_block: int = 1,
        attention_resolutions: tuple[int, ...] = (2,),
        attention_heads: int = 4,
        vocab_size: int = 32,
        max_length: int = 12,
        text_dim: int = 128,
        text_layers: int = 2,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        block_channels = tuple(block_channels)
        emb_dim = 4 * block_channels[0]
        self.time_mlp = nn.Sequential(
            nn.Linear(block_channels[0], emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )
        self.text = TextEncoder(vocab_size, max_length, text_dim, text_layers, attention_heads)
        self.text_to_emb = nn.Linear(text_dim, emb_dim)
        self.conv_in = nn.Conv2d(in_channels, block_channels[0], 3, padding=1)

        self.down = nn.ModuleList()
        skip_channels = [block_channels[0]]
        ch = block_channels[0]
        for level, out_ch in enumerate(block_channels):
            stage = nn.ModuleList()
            for _ in range(layers_per_block):
                stage.append(ResBlock(ch, out_ch, emb_dim, dropout))
                ch = out_ch
                if level in attention_resolutions:
                    stage.append(SpatialTransformer(ch, text_dim, attention_heads))
                skip_channels.append(ch)
            if level < len(block_channels) - 1:
                stage.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
                skip_channels.append(ch)
            self.down.append(stage)

        last = len(block_channels) - 1
        self.mid = nn.ModuleList(
            [
                ResBlock(ch, ch, emb_dim, dropout),
                SpatialTransformer(ch, text_dim, attention_heads),
                ResBlock(ch, ch, emb_dim, dropout),
            ]
        )

        self.up = nn.ModuleList()
        for level in reversed(range(len(block_channels))):
            out_ch = block_channels[level]
            stage = nn.ModuleList()
            for _ in range(layers_per_block + 1):
                stage.append(ResBlock(ch + skip_channels.pop(), out_ch, emb_dim, dropout))
                ch = out_ch
                if level in attention_resolutions:
                    stage.append(SpatialTransformer(ch, text_dim, attention_heads))
            if level > 0:
                stage.append(
                    nn.Sequential(
                        nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(ch, ch, 3, padding=1)
                    )
                )
            self.up.append(stage)
        assert not skip_channels and last >= 0

        self.norm_out = nn.GroupNorm(_groups(ch), ch)
        self.conv_out = nn.Conv2d(ch, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)
        self.gradient_checkpointing = False

    def _run(self, module: nn.Module, *args: Tensor) -> Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(module, *args, use_reentrant=False)
        return module(*args)

    def forward(self, sample: Tensor, timestep: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Predict from noisy images [B,C,H,W], timesteps [B] in [0, 1000], prompt ids and mask [B, L]."""
        if timestep.ndim == 0:
            timestep = timestep.expand(sample.shape[0])
        text, pooled = self.text(input_ids, attention_mask)
        emb = self.time_mlp(timestep_embedding(timestep, self.config.block_channels[0]).to(sample.dtype))
        emb = emb + self.text_to_emb(pooled)

        h = self.conv_in(sample)
        skips = [h]
        for stage in self.down:
            for layer in stage:
                if isinstance(layer, ResBlock):
                    h = self._run(layer, h, emb)
                elif isinstance(layer, SpatialTransformer):
                    h = self._run(layer, h, text, attention_mask)
                else:
                    h = layer(h)
                if not isinstance(layer, SpatialTransformer):
                    skips.append(h)
                else:
                    skips[-1] = h
        for layer in self.mid:
            h = (
                self._run(layer, h, emb)
                if isinstance(layer, ResBlock)
                else self._run(layer, h, text, attention_mask)
            )
        for stage in self.up:
            for layer in stage:
                if isinstance(layer, ResBlock):
                    h = self._run(layer, torch.cat([h, skips.pop()], dim=1), emb)
                elif isinstance(layer, SpatialTransformer):
                    h = self._run(layer, h, text, attention_mask)
                else:
                    h = layer(h)
        return self.conv_out(F.silu(self.norm_out(h)))
