"""Tiny random diffusers pipelines, built and saved inside the tests (no download).

Each builder writes a pipeline folder with `save_pretrained` and returns its path: a tiny UNet or SD3
transformer, a tiny AutoencoderKL, tiny CLIP (and T5) text encoders, and tokenizers made from a small
vocabulary written here (a byte-level BPE for CLIP, a unigram model for T5), in the layout of the
real checkpoints, so that `load_model(path)` reads them exactly as it reads Stable Diffusion.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

#: Words the tiny tokenizers know whole (anything else splits into characters).
WORDS = ("a", "red", "blue", "green", "circle", "square", "triangle", "and", "left", "of", "two", "three")
#: Pixel resolution of the tiny pipelines (latents are RESOLUTION / 2 with the two-block VAE).
RESOLUTION = 16


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (what CLIP's byte-level BPE works on)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, [chr(c) for c in chars], strict=True))


def clip_tokenizer(max_length: int = 16) -> CLIPTokenizer:
    """A CLIP BPE tokenizer over single characters plus merges that spell `WORDS`."""
    symbols = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for s in symbols + [s + "</w>" for s in symbols]:
        vocab.setdefault(s, len(vocab))
    merges: list[tuple[str, str]] = []
    for word in WORDS:
        pieces = [*word[:-1], word[-1] + "</w>"]
        while len(pieces) > 1:
            merged = pieces[0] + pieces[1]
            rule = (pieces[0], pieces[1])
            if rule not in merges:
                merges.append(rule)
            vocab.setdefault(merged, len(vocab))
            pieces = [merged, *pieces[2:]]
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def t5_tokenizer(max_length: int = 32) -> T5Tokenizer:
    """A T5 unigram tokenizer over `WORDS` and single characters."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("▁" + w, -1.0) for w in WORDS] + [("▁", -2.0)]
    pieces += [(chr(c), -5.0) for c in range(ord("a"), ord("z") + 1)]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=max_length)


def _clip_config(projection: bool, vocab_size: int, hidden: int = 32) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=77,
        projection_dim=hidden if projection else 512,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
        hidden_act="gelu",
    )


def _vae(latent_channels: int = 4, sd3: bool = False) -> AutoencoderKL:
    kwargs = dict(shift_factor=0.0609, scaling_factor=1.5035, use_quant_conv=False, use_post_quant_conv=False)
    return AutoencoderKL(
        block_out_channels=(4, 8),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=latent_channels,
        norm_num_groups=2,
        sample_size=RESOLUTION,
        **(kwargs if sd3 else {}),
    )


def _unet(**family: object) -> UNet2DConditionModel:
    """A two-level UNet on RESOLUTION / 2 latents; `family` adds the SD or SDXL specifics."""
    return UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        sample_size=RESOLUTION // 2,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        **family,
    )


def _ddim(**options: object) -> DDIMScheduler:
    """The DDIM scheduler of the SD 1.x / XL configs (scaled-linear betas, steps_offset 1)."""
    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        clip_sample=False,
        set_alpha_to_one=False,
        **options,
    )


def build_sd(folder: Path, prediction_type: str = "epsilon") -> Path:
    """A tiny StableDiffusionPipeline (epsilon or v_prediction, DDIM scheduler) saved to `folder`."""
    torch.manual_seed(0)
    tokenizer = clip_tokenizer()
    unet = _unet(cross_attention_dim=32, attention_head_dim=4)
    scheduler = _ddim(prediction_type=prediction_type)
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=_vae(),
        text_encoder=CLIPTextModel(_clip_config(False, len(tokenizer))),
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)
    return folder


def build_sdxl(folder: Path) -> Path:
    """A tiny StableDiffusionXLPipeline (two CLIP encoders, pooled embeddings, added time ids)."""
    torch.manual_seed(0)
    tokenizer = clip_tokenizer()
    unet = _unet(
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * 8 + 32,  # six time ids of 8 + the pooled 32
        cross_attention_dim=64,  # 32 + 32: the two encoders' states side by side
    )
    scheduler = _ddim(timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(
        unet=unet,
        vae=_vae(),
        text_encoder=CLIPTextModel(_clip_config(False, len(tokenizer))),
        text_encoder_2=CLIPTextModelWithProjection(_clip_config(True, len(tokenizer))),
        tokenizer=tokenizer,
        tokenizer_2=clip_tokenizer(),
        scheduler=scheduler,
    )
    pipe.save_pretrained(folder)
    return folder


def build_sd3(folder: Path, shift: float = 3.0) -> Path:
    """A tiny StableDiffusion3Pipeline (MMDiT transformer, two CLIPs + T5, flow-matching scheduler)."""
    torch.manual_seed(0)
    tokenizer = clip_tokenizer()
    transformer = SD3Transformer2DModel(
        sample_size=RESOLUTION // 2,
        patch_size=1,
        in_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=32,
        pooled_projection_dim=64,
        out_channels=4,
    )
    t5 = t5_tokenizer()
    text_encoder_3 = T5EncoderModel(
        T5Config(
            vocab_size=len(t5),
            d_model=32,
            d_kv=8,
            d_ff=37,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        vae=_vae(latent_channels=4, sd3=True),
        text_encoder=CLIPTextModelWithProjection(_clip_config(True, len(tokenizer))),
        text_encoder_2=CLIPTextModelWithProjection(_clip_config(True, len(tokenizer))),
        text_encoder_3=text_encoder_3,
        tokenizer=tokenizer,
        tokenizer_2=clip_tokenizer(),
        tokenizer_3=t5,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=shift),
    )
    pipe.save_pretrained(folder)
    return folder
