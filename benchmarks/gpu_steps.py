"""GPU cost of one training or sampling step on an SD1.5-shaped UNet: eager diffusers vs diffalign.

The network is a diffusers `UNet2DConditionModel` built from Stable Diffusion 1.5's UNet config
(written below, random weights, nothing downloaded): 860M parameters, 64x64x4 latents, 77x768 text
states, bfloat16 (float32 on the CPU, `--dtype` to choose). Four steps are timed, each with the maths
our trainers use (`diffalign.align.losses`, `diffalign.align.pg_losses`, `diffalign.diffusion.steps`)
on SD 1.5's scaled-linear schedule:

- `dpo`: one Diffusion-DPO step (Wallace et al. 2023, eq. 14) on B pairs: winner and loser share noise
  and timestep; the reference forward on the 2B noisy latents without gradients, the policy forward
  and backward on the same 2B rows, then AdamW. Samples per step: B pairs.
- `sample`: one DDPO/GRPO sampling step with classifier-free guidance: the policy forward on 2B rows
  (unconditional and conditional) without gradients, the guided DDIM step with eta = 1 (Song et al.
  2021, eq. 12) and its log-prob. Samples per step: B images. Its reported value is the mean square
  of x_prev (a function of the network's output; the log-prob of a step drawn with its own noise is not).
- `pg`: the policy-gradient training step on stored (x_t, t, x_prev, log-prob) of B images: the guided
  forward with gradients (2B rows), the recomputed log-prob of x_prev, PPO's clipped loss (DDPO,
  Black et al. 2023, eq. 6), backward, AdamW. The stored batch is one sampling step of the first
  variant at the initial weights, so the ratio starts at 1.
- `draft`: the DRaFT-1 step (Clark et al. 2024): the guided forward with gradients at the last
  sampling level, the DDIM step to the clean end, a differentiable reward, backward, AdamW. The VAE
  decoder and the reward network are left out: the reward is minus the mean squared distance of the
  predicted clean latents to a fixed random latent, so the step costs the UNet's forward and backward
  only (a real DRaFT step adds the VAE decoder's and the reward model's forward and backward).

Each step is measured for two variants in the same process, on the same initial weights and inputs:

- `eager`: what existing scripts run (diffusers' DPO script, ddpo-pytorch, TRL <= 0.23): the plain
  diffusers UNet in bf16, no compile, default SDPA, fused AdamW. With `--finetune lora`, LoRA adapters
  through peft with the reference obtained by disabling them, as diffusers' DPO script does.
- `diffalign`: the same maths with the speed levers below. Both variants fine-tune the same way
  (`--finetune full` or `lora`): like is compared with like.

Levers of the diffalign variant (defaults in brackets; the CUDA defaults were measured once on an H200,
docs/scaling.md):
  --compile MODE           torch.compile mode: none, default, reduce-overhead (CUDA graphs),
                           max-autotune, max-autotune-no-cudagraphs [default on CUDA, none on CPU]
  --compile-scope SCOPE    blocks: compile each ResnetBlock2D and Transformer2DModel (regional
                           compilation: identical blocks share one compiled graph; SD 1.5's blocks
                           come in many shapes, so on an H200 the DPO step still compiled for 152 s
                           cold); model: the whole UNet [blocks]
  --dynamic-shapes         symbolic sizes after a recompile (fewer graphs: shorter compile, maybe
                           slower kernels); off: one static graph per block shape [off]
  --channels-last          channels-last weights and inputs [on on CUDA, off on CPU]
  --tf32                   TF32 matrix products and convolutions (the float32 LoRA weights) [on CUDA]
  --sdpa BACKEND           scaled-dot-product attention kernel: default (torch picks), flash,
                           efficient, cudnn, math [default]
  --optimizer KIND         AdamW implementation: fused, foreach, for-loop [fused]
  --merge-lora             sample through the LoRA adapters folded into the weights, the base weights
                           restored after every step (diffalign.models.lora_merge, what online DPO,
                           SPIN and DiffusionNFT do; the merge's cost is timed with the step; LoRA
                           only) [off]
  --fuse-qkv               one matrix product for q, k, v (diffusers' fuse_qkv_projections; full
                           fine-tuning only) [off]
  --inductor-tuning        inductor's conv_1x1_as_mm and coordinate-descent tuning (longer compile)
                           [off]
The reference forward is always batched over the 2B rows without gradients, in both variants.

Timing: CUDA events around each step, the median of --iters steps after --warmup steps; the first call
(which compiles) is reported as `first_call_s` and `compile_s` (first call minus a steady step), never
in ms per step; a graph an earlier step compiled is reused, so a later step's `compile_s` can be ~0
(`compile_s_total` in results.json sums them). Peak memory is `torch.cuda.max_memory_allocated` over
the timed steps (weights, optimiser state and activations of that variant only: the other variant is
freed first). FLOPs are counted once per step by `torch.utils.flop_counter.FlopCounterMode` on the
uncompiled modules (matrix products, convolutions and attention, forward and backward); achieved
TFLOP/s = FLOPs / time. Before each step the trainable weights are reset and a fresh optimiser is
made, so every step starts from the same weights in both variants.

    python benchmarks/gpu_steps.py --out bench_gpu/          # everything, on CUDA (compiling: minutes)
    python benchmarks/gpu_steps.py --steps dpo --pairs 8 --compile max-autotune-no-cudagraphs
    python benchmarks/gpu_steps.py --finetune lora --lora-rank 8
    python benchmarks/gpu_steps.py --device cpu --tiny --threads 1      # a tiny UNet, ~30 s

Prints a markdown table (ratio = diffalign ms / eager ms, speed-up = its inverse; loss diff = the
largest difference between the two variants' losses over the same steps, which should stay at
rounding level since the maths is the same, though Diffusion-DPO's beta magnifies rounding) and
writes results.json into --out. Target on a GPU: speed-up >= 1.5 on the DPO and sampling steps with
no more peak memory than eager (`target_met` in results.json).

Caution, measured on the CPU (torch 2.13, tiny UNet, float32): `--compile-scope model` changed the
DPO updates although its forwards matched eager to 2e-6 (LoRA: loss 0.680 instead of 0.674 after one
step; full fine-tuning: 8.5e-4 instead of 2e-8; weights 5e-5 to 6e-5 apart after three steps);
`--compile-scope blocks` matched (LoRA: losses within 1.5e-4, weights 9e-7 apart). Not explained yet:
read the loss diff column before trusting a lever.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch._inductor.config
from torch import Tensor, nn

from diffalign.align.losses import diffusion_dpo_loss, per_sample_mse
from diffalign.align.pg_losses import ppo_clip_loss
from diffalign.align.runtime import compile_blocks
from diffalign.diffusion.schedules import DDPMSchedule, training_target
from diffalign.diffusion.steps import ddim_step
from diffalign.models.diffusers_adapters.lora import DEFAULT_TARGETS, add_lora
from diffalign.models.lora_merge import adapters_merged

#: Stable Diffusion 1.5's UNet config (stable-diffusion-v1-5/unet/config.json), written out.
SD15_UNET: dict = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    flip_sin_to_cos=True,
    freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    downsample_padding=1,
    mid_block_scale_factor=1,
    act_fn="silu",
    norm_num_groups=32,
    norm_eps=1e-5,
    cross_attention_dim=768,
    attention_head_dim=8,
)
#: A tiny UNet of the same block types, for CPU runs and tests.
TINY_UNET: dict = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(32, 64),
    layers_per_block=1,
    norm_num_groups=8,
    cross_attention_dim=32,
    attention_head_dim=4,
)
#: SD 1.5's noise schedule (scheduler/scheduler_config.json).
SD15_SCHEDULE = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
)
STEPS = ("dpo", "sample", "pg", "draft")
COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
SDPA_BACKENDS = ("default", "flash", "efficient", "cudnn", "math")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class Levers:
    """How one variant runs the UNet and the optimiser (see the module doc for each lever).

    Attributes:
        compile: torch.compile mode, or "none" for eager.
        compile_scope: "blocks" (regional: each ResnetBlock2D and Transformer2DModel) or "model".
        dynamic_shapes: let torch.compile make sizes symbolic after a recompile (its automatic dynamic
            shapes: fewer graphs, so a shorter compile, maybe slower kernels); off: one static graph per
            shape.
        channels_last: channels-last weights and inputs.
        tf32: TF32 for float32 matrix products and convolutions (CUDA only).
        sdpa: attention kernel for `torch.nn.functional.scaled_dot_product_attention`.
        optimizer: AdamW implementation: "fused", "foreach" or "for-loop".
        merge_lora: the sampling step runs through LoRA adapters merged into the weights, restored after
            (LoRA only).
        fuse_qkv: fuse the q, k, v projections (full fine-tuning only).
        inductor_tuning: inductor's conv_1x1_as_mm and coordinate-descent tuning.
    """

    compile: str = "none"
    compile_scope: str = "blocks"
    dynamic_shapes: bool = False
    channels_last: bool = False
    tf32: bool = False
    sdpa: str = "default"
    optimizer: str = "fused"
    merge_lora: bool = False
    fuse_qkv: bool = False
    inductor_tuning: bool = False


#: The eager baseline: plain diffusers in the chosen dtype with fused AdamW (research note's setting).
EAGER = Levers()


@dataclass
class Shape:
    """Tensor sizes of a run: latents [4, size, size], text states [tokens, width]."""

    latent_size: int
    tokens: int
    width: int


@dataclass
class Record:
    """One (variant, step, batch) measurement; `asdict` of it is a row of results.json.

    Attributes:
        variant: "eager" or "diffalign".
        finetune: "full" or "lora".
        step: one of STEPS.
        batch: pairs (dpo) or images (sample, pg, draft) per step.
        rows: UNet batch rows per forward (2 x batch: winners and losers, or guidance's two halves).
        ms: median milliseconds per step over the timed steps.
        ms_min, ms_max: fastest and slowest timed step.
        samples_per_s: batch / (ms / 1000).
        peak_gib: peak allocated memory over the timed steps (CUDA; None on CPU).
        flops: FLOPs of one step (forward and backward), from FlopCounterMode.
        tflops: achieved TFLOP/s = flops / step time.
        first_call_s: wall time of the first call (includes compiling).
        compile_s: first_call_s minus one steady step.
        losses: the loss of the first call and of every timed step (the same maths in both variants).
    """

    variant: str
    finetune: str
    step: str
    batch: int
    rows: int
    ms: float
    ms_min: float
    ms_max: float
    samples_per_s: float
    peak_gib: float | None
    flops: int
    tflops: float
    first_call_s: float
    compile_s: float
    losses: list[float] = field(default_factory=list)


# --- set-up -------------------------------------------------------------------------------------------


def build_unet(config: dict, seed: int) -> nn.Module:
    """A float32 UNet2DConditionModel with random weights (seeded), on the CPU."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**config)


@contextlib.contextmanager
def process_switches(levers: Levers, device: torch.device) -> Iterator[None]:
    """Set the process-wide switches of `levers` (TF32, SDPA kernel, inductor) and restore them after."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    inductor = torch._inductor.config
    saved_inductor = (inductor.conv_1x1_as_mm, inductor.coordinate_descent_tuning)
    try:
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = levers.tf32
            torch.backends.cudnn.allow_tf32 = levers.tf32
        if levers.inductor_tuning:  # diffusers' "diffusion fast" settings
            inductor.conv_1x1_as_mm = True
            inductor.coordinate_descent_tuning = True
        backend = {
            "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION,
            "math": SDPBackend.MATH,
        }.get(levers.sdpa)
        with sdpa_kernel(backend) if backend is not None else contextlib.nullcontext():
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
        inductor.conv_1x1_as_mm, inductor.coordinate_descent_tuning = saved_inductor


def compile_unet(unet: nn.Module, levers: Levers) -> None:
    """Apply `levers.compile` to `unet` in place: block by block with the library's `compile_blocks`
    (what `runtime.compile` does in the trainers), or, with `--compile-scope model`, the whole UNet
    (`nn.Module.compile`; see the caution in the module doc)."""
    if levers.compile == "none":
        return
    dynamic = None if levers.dynamic_shapes else False
    if levers.compile_scope == "model":
        unet.compile(mode=None if levers.compile == "default" else levers.compile, dynamic=dynamic)
        return
    compile_blocks(unet, levers.compile, dynamic=dynamic)


class Denoiser:
    """A UNet (maybe compiled in place) plus how to feed it: dtype, memory format, float32 outputs."""

    def __init__(self, unet: nn.Module, dtype: torch.dtype, channels_last: bool) -> None:
        self.unet = unet
        self.dtype = dtype
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __call__(self, x_t: Tensor, t: Tensor, text: Tensor) -> Tensor:
        x = x_t.to(self.dtype).contiguous(memory_format=self.memory_format)
        out = self.unet(x, t, encoder_hidden_states=text.to(self.dtype), return_dict=False)[0]
        return out.float()

    def guided(self, x_t: Tensor, t: Tensor, text: Tensor, uncond: Tensor, scale: float) -> Tensor:
        """Classifier-free guidance (Ho & Salimans 2022): eps_u + w (eps_c - eps_u), one forward on 2B."""
        out = self(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([uncond, text]))
        eps_u, eps_c = out.chunk(2)
        return eps_u + scale * (eps_c - eps_u)


@dataclass
class Variant:
    """The models and optimiser settings of one variant."""

    name: str
    levers: Levers
    policy: Denoiser
    reference: Denoiser | None  # None with LoRA: the policy with its adapters disabled
    trainable: list[nn.Parameter]
    initial: list[Tensor]  # CPU copies of the trainable weights at the start

    @contextlib.contextmanager
    def reference_mode(self) -> Iterator[Denoiser]:
        """The reference denoiser: the frozen copy, or the policy with LoRA disabled."""
        if self.reference is not None:
            yield self.reference
            return
        self.policy.unet.disable_adapters()
        try:
            yield self.policy
        finally:
            self.policy.unet.enable_adapters()

    def reset(self, lr: float) -> torch.optim.Optimizer:
        """Trainable weights back to their initial values, and a fresh AdamW."""
        with torch.no_grad():
            for param, value in zip(self.trainable, self.initial, strict=True):
                param.copy_(value)
        kind = self.levers.optimizer
        flags = {"fused": dict(fused=True), "foreach": dict(foreach=True), "for-loop": dict(foreach=False)}
        return torch.optim.AdamW(self.trainable, lr=lr, **flags[kind])


def make_variant(
    name: str,
    base: nn.Module,
    levers: Levers,
    finetune: str,
    lora: tuple[int, tuple[str, ...]],
    dtype: torch.dtype,
    device: torch.device,
    seed: int,
) -> Variant:
    """Copy `base` to the device in `dtype` and set it up as `levers` and `finetune` say."""
    unet = copy.deepcopy(base).to(device, dtype)
    reference = None
    if finetune == "full":
        frozen = copy.deepcopy(unet).requires_grad_(False).eval()
        if levers.fuse_qkv:
            frozen.fuse_qkv_projections()
            unet.fuse_qkv_projections()
        if levers.channels_last:
            frozen.to(memory_format=torch.channels_last)
        compile_unet(frozen, levers)
        reference = Denoiser(frozen, dtype, levers.channels_last)
    else:
        rank, targets = lora
        torch.manual_seed(seed + 1)  # the same adapter initialisation in every variant
        add_lora(unet, rank=rank, alpha=None, target_modules=targets)
    unet.train()
    if levers.channels_last:
        unet.to(memory_format=torch.channels_last)
    trainable = [p for p in unet.parameters() if p.requires_grad]
    initial = [p.detach().to("cpu", copy=True) for p in trainable]
    compile_unet(unet, levers)
    policy = Denoiser(unet, dtype, levers.channels_last)
    return Variant(name, levers, policy, reference, trainable, initial)


# --- the steps ------------------------------------------------------------------------------------------


@dataclass
class Inputs:
    """Fixed inputs of one batch size, made on the CPU from a seed (identical for every variant)."""

    x0: Tensor  # [2B, 4, S, S] clean latents: winners then losers
    noise: Tensor  # [2B, ...] shared by a pair's winner and loser
    t_train: Tensor  # [2B] training timesteps, shared by a pair
    text: Tensor  # [B, L, D] prompt states
    uncond: Tensor  # [B, L, D] the empty prompt's states (one row repeated)
    x_t: Tensor  # [B, ...] a noisy latent at the sampling level
    step_noise: Tensor  # [B, ...] the sampling step's noise
    advantages: Tensor  # [B] standardised advantages
    target: Tensor  # [B, ...] the DRaFT reward's target latent

    @staticmethod
    def make(batch: int, shape: Shape, seed: int) -> Inputs:
        g = torch.Generator().manual_seed(seed)
        latent = (4, shape.latent_size, shape.latent_size)
        noise = torch.randn(batch, *latent, generator=g)
        t_train = torch.randint(0, 1000, (batch,), generator=g).float()
        advantages = torch.randn(batch, generator=g)
        if batch > 1:  # standardised as DDPO does (one image has no spread to standardise by)
            advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
        return Inputs(
            x0=torch.randn(2 * batch, *latent, generator=g),
            noise=noise.repeat(2, 1, 1, 1),
            t_train=t_train.repeat(2),
            text=torch.randn(batch, shape.tokens, shape.width, generator=g),
            uncond=torch.randn(1, shape.tokens, shape.width, generator=g).expand(batch, -1, -1).clone(),
            x_t=torch.randn(batch, *latent, generator=g),
            step_noise=torch.randn(batch, *latent, generator=g),
            advantages=advantages,
            target=torch.randn(batch, *latent, generator=g),
        )

    def to(self, device: torch.device) -> Inputs:
        return Inputs(**{k: v.to(device) for k, v in vars(self).items()})


@dataclass
class StepSettings:
    """The maths' constants (SD 1.5 values)."""

    beta: float = 5000.0  # Diffusion-DPO's beta in the 0.5 * beta convention (diffalign.align.losses)
    guidance: float = 7.5  # classifier-free guidance scale
    clip_range: float = 1e-4  # DDPO's PPO clip range
    lr: float = 1e-5
    num_steps: int = 20  # DDIM levels (trailing); sampling and pg use the middle level, draft the last


def step_functions(
    variant: Variant, inputs: Inputs, stored: dict, settings: StepSettings, schedule: DDPMSchedule
) -> dict[str, Callable[[torch.optim.Optimizer], Tensor]]:
    """The four steps of `variant` on `inputs`; each takes the optimiser and returns its loss (0-d)."""
    policy = variant.policy
    B = inputs.text.shape[0]
    levels = schedule.timesteps(settings.num_steps).to(inputs.x_t.device)
    mid = settings.num_steps // 2
    t_mid = levels[mid].expand(B)
    t_mid_prev = levels[mid + 1].expand(B)
    t_last = levels[-2].expand(B)
    t_clean = levels[-1].expand(B)  # -1: the clean end

    def update(loss: Tensor, optimizer: torch.optim.Optimizer) -> Tensor:
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def dpo(optimizer: torch.optim.Optimizer) -> Tensor:
        # Diffusion-DPO (Wallace et al. 2023, eq. 14): shared noise and timestep per pair.
        x_t = schedule.add_noise(inputs.x0, inputs.noise, inputs.t_train)
        target = training_target(inputs.x0, inputs.noise, inputs.t_train, "epsilon", schedule)
        text = inputs.text.repeat(2, 1, 1)
        with torch.no_grad(), variant.reference_mode() as reference:
            ref = per_sample_mse(reference(x_t, inputs.t_train, text), target)
        err = per_sample_mse(policy(x_t, inputs.t_train, text), target)
        out = diffusion_dpo_loss(err[:B], err[B:], ref[:B], ref[B:], beta=settings.beta)
        return update(out.loss, optimizer)

    def sample(optimizer: torch.optim.Optimizer) -> Tensor:
        merged = adapters_merged(policy.unet) if variant.levers.merge_lora else contextlib.nullcontext()
        with torch.no_grad(), merged:
            eps = policy.guided(inputs.x_t, t_mid, inputs.text, inputs.uncond, settings.guidance)
            out = ddim_step(
                eps, inputs.x_t, t_mid, t_mid_prev, schedule=schedule, prediction_type="epsilon", eta=1.0,
                noise=inputs.step_noise,
            )  # fmt: skip
        stored.setdefault("prev", out.prev.detach())
        stored.setdefault("log_prob", out.log_prob.detach())
        # Sampling has no loss. Its log-prob is no check either: with the step's own noise it depends
        # on the noise alone (x_prev - mean = sigma * noise). Report the mean square of x_prev, which
        # depends on the network's output, so the loss diff column compares the variants' samples.
        return out.prev.float().square().mean()

    def pg(optimizer: torch.optim.Optimizer) -> Tensor:
        # DDPO (Black et al. 2023): recompute log p(x_prev | x_t) of the stored step, PPO clip.
        eps = policy.guided(inputs.x_t, t_mid, inputs.text, inputs.uncond, settings.guidance)
        out = ddim_step(
            eps, inputs.x_t, t_mid, t_mid_prev, schedule=schedule, prediction_type="epsilon", eta=1.0,
            prev_sample=stored["prev"],
        )  # fmt: skip
        ppo = ppo_clip_loss(out.log_prob, stored["log_prob"], inputs.advantages, settings.clip_range)
        return update(ppo.loss, optimizer)

    def draft(optimizer: torch.optim.Optimizer) -> Tensor:
        # DRaFT-1 (Clark et al. 2024): gradient through the last step only; reward on the latents.
        eps = policy.guided(inputs.x_t, t_last, inputs.text, inputs.uncond, settings.guidance)
        out = ddim_step(eps, inputs.x_t, t_last, t_clean, schedule=schedule, prediction_type="epsilon")
        reward = -(out.prev.float() - inputs.target).pow(2).mean(dim=(1, 2, 3))
        return update(-reward.mean(), optimizer)

    return {"dpo": dpo, "sample": sample, "pg": pg, "draft": draft}


# --- measuring ------------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def count_flops(run: Callable[[], Tensor]) -> int:
    """FLOPs of one call of `run`, counted on the uncompiled modules (compiled code is not dispatched
    through the operators FlopCounterMode sees).

    torch's counter knows the CUDA attention kernels (flash, efficient, cuDNN: two matrix products
    forward, five backward, the recomputed scores included) but not the CPU flash kernel; it is
    given the same formulas here. The math kernel is counted as its matrix products (four backward:
    it saves the scores), so `--sdpa math` counts one product less per attention backward.
    """
    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

    def cpu_flash(query, key, value, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query, key, value)

    def cpu_flash_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
        return sdpa_backward_flop_count(grad_out, query, key, value)

    aten = torch.ops.aten
    counter = FlopCounterMode(
        display=False,
        custom_mapping={
            aten._scaled_dot_product_flash_attention_for_cpu: cpu_flash,
            aten._scaled_dot_product_flash_attention_for_cpu_backward: cpu_flash_backward,
        },
    )
    with torch.compiler.set_stance("force_eager"), counter:
        run()
    return int(counter.get_total_flops())


def time_step(
    run: Callable[[], Tensor], device: torch.device, warmup: int, iters: int, cudagraphs: bool
) -> tuple[float, list[float], float | None, list[Tensor]]:
    """(first call seconds, per-step ms of the timed steps, peak GiB, losses) of `run`."""

    def call() -> Tensor:
        if cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        return run()

    losses = []
    start = time.perf_counter()
    losses.append(call())
    synchronize(device)
    first = time.perf_counter() - start
    for _ in range(max(warmup - 1, 0)):
        call()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        events = [
            (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)
        ]
        for begin, end in events:
            begin.record()
            losses.append(call())
            end.record()
        synchronize(device)
        times = [begin.elapsed_time(end) for begin, end in events]
        peak = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            losses.append(call())
            times.append((time.perf_counter() - start) * 1000)
        peak = None
    return first, times, peak, losses


def measure_variant(
    variant: Variant,
    finetune: str,
    steps: list[str],
    batches: dict[str, list[int]],
    shape: Shape,
    args: argparse.Namespace,
    stored: dict[int, dict],
    device: torch.device,
    on_record: Callable[[Record], None] | None = None,
) -> list[Record]:
    """Every requested (step, batch) of one variant; `on_record` is called with each as it is measured."""
    settings = StepSettings()
    schedule = DDPMSchedule(**SD15_SCHEDULE)
    cudagraphs = device.type == "cuda" and variant.levers.compile in ("reduce-overhead", "max-autotune")
    records = []
    for step in steps:
        for batch in batches[step]:
            inputs = Inputs.make(batch, shape, args.seed + batch).to(device)
            store = stored.setdefault(batch, {})
            functions = step_functions(variant, inputs, store, settings, schedule)
            if step in ("pg", "draft") and "prev" not in store:
                variant.reset(settings.lr)
                with torch.compiler.set_stance("force_eager"):
                    functions["sample"](None)  # the stored step at the initial weights
            optimizer = variant.reset(settings.lr)
            flops = count_flops(lambda: functions[step](optimizer))  # noqa: B023
            optimizer = variant.reset(settings.lr)
            first, times, peak, losses = time_step(
                lambda: functions[step](optimizer),  # noqa: B023
                device,
                args.warmup,
                args.iters,
                cudagraphs,
            )
            ms = statistics.median(times)
            records.append(
                Record(
                    variant=variant.name,
                    finetune=finetune,
                    step=step,
                    batch=batch,
                    rows=2 * batch,
                    ms=ms,
                    ms_min=min(times),
                    ms_max=max(times),
                    samples_per_s=batch / (ms / 1000),
                    peak_gib=peak,
                    flops=flops,
                    tflops=flops / (ms / 1000) / 1e12,
                    first_call_s=first,
                    compile_s=max(first - ms / 1000, 0.0),
                    losses=[float(v) for v in losses],
                )
            )
            print(
                f"  {variant.name:9s} {finetune:4s} {step:6s} B={batch:<3d} {ms:9.2f} ms  "
                f"first call {first:6.1f} s  {records[-1].tflops:9.3g} TFLOP/s",
                flush=True,
            )
            if on_record is not None:
                on_record(records[-1])
    return records


# --- report -----------------------------------------------------------------------------------------------


def compare(records: list[Record]) -> list[dict]:
    """Pair each diffalign record with its eager one: ratio, speed-up, memory and the target."""
    eager = {(r.finetune, r.step, r.batch): r for r in records if r.variant == "eager"}
    rows = []
    for r in records:
        if r.variant != "diffalign":
            continue
        base = eager.get((r.finetune, r.step, r.batch))
        row = {"finetune": r.finetune, "step": r.step, "batch": r.batch, "diffalign": asdict(r)}
        if base is not None:
            speedup = base.ms / r.ms
            memory = r.peak_gib is not None and base.peak_gib is not None
            row.update(
                eager=asdict(base),
                # the same maths from the same weights: a lever that changes the updates shows up here
                loss_max_abs_diff=max(abs(a - b) for a, b in zip(r.losses, base.losses, strict=True)),
                ratio=r.ms / base.ms,
                speedup=speedup,
                memory_ratio=r.peak_gib / base.peak_gib if memory else None,
                # the target (>= 1.5x, no more memory) is judged on CUDA only, where memory is measured
                target_met=(speedup >= 1.5 and r.peak_gib <= base.peak_gib)
                if memory and r.step in ("dpo", "sample")
                else None,
            )
        rows.append(row)
    return rows


def markdown(records: list[Record], comparisons: list[dict], header: str) -> str:
    def gib(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}"

    lines = [
        header,
        "",
        "| step | tuning | B | eager ms | diffalign ms | ratio | speed-up | eager GiB | diffalign GiB "
        "| eager TFLOP/s | diffalign TFLOP/s | diffalign samples/s | compile s | loss diff |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in comparisons:
        d = row["diffalign"]
        e = row.get("eager")
        if e is None:
            lines.append(
                f"| {row['step']} | {row['finetune']} | {row['batch']} | - | {d['ms']:.1f} | - | - | - "
                f"| {gib(d['peak_gib'])} | - | {d['tflops']:.3g} | {d['samples_per_s']:.3g} "
                f"| {d['compile_s']:.1f} | - |"
            )
            continue
        lines.append(
            f"| {row['step']} | {row['finetune']} | {row['batch']} | {e['ms']:.1f} | {d['ms']:.1f} "
            f"| {row['ratio']:.2f} | {row['speedup']:.2f}x | {gib(e['peak_gib'])} | {gib(d['peak_gib'])} "
            f"| {e['tflops']:.3g} | {d['tflops']:.3g} | {d['samples_per_s']:.3g} | {d['compile_s']:.1f} "
            f"| {row['loss_max_abs_diff']:.2g} |"
        )
    if not comparisons:  # eager only
        for r in records:
            lines.append(
                f"| {r.step} | {r.finetune} | {r.batch} | {r.ms:.1f} | - | - | - | {gib(r.peak_gib)} | - "
                f"| {r.tflops:.3g} | - | - | - | - |"
            )
    return "\n".join(lines)


# --- command line -----------------------------------------------------------------------------------------


def int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from error
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def name_list(choices: tuple[str, ...]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        values = [v.strip() for v in text.split(",") if v.strip()]
        unknown = [v for v in values if v not in choices]
        if unknown or not values:
            raise argparse.ArgumentTypeError(f"{text!r}: choose from {', '.join(choices)}")
        return values

    return parse


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu [cuda]")
    p.add_argument("--tiny", action="store_true", help="a tiny UNet and tiny shapes (CPU tests)")
    p.add_argument(
        "--dtype",
        choices=tuple(DTYPES),
        default=None,
        help="weights' dtype [bfloat16 on CUDA, float32 on CPU]",
    )
    p.add_argument("--steps", type=name_list(STEPS), default=list(STEPS), help="dpo,sample,pg,draft [all]")
    p.add_argument("--pairs", type=int_list, default=None, help="DPO pairs per step [8,16; tiny: 2]")
    p.add_argument(
        "--batch", type=int_list, default=None, help="images per sample/pg/draft step [8,16; tiny: 2]"
    )
    p.add_argument("--variants", type=name_list(("eager", "diffalign")), default=["eager", "diffalign"])
    p.add_argument(
        "--finetune", type=name_list(("full", "lora")), default=["full"], help="full, lora or both [full]"
    )
    p.add_argument("--lora-rank", type=int, default=8, help="LoRA rank with --finetune lora [8]")
    p.add_argument("--lora-targets", default=",".join(DEFAULT_TARGETS), help="modules LoRA adapts")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps, the first included [3]")
    p.add_argument("--iters", type=int, default=10, help="timed steps; the median is reported [10]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch [torch's default]")
    p.add_argument("--out", type=Path, default=None, help="folder for results.json")
    g = p.add_argument_group("levers of the diffalign variant")
    g.add_argument("--compile", choices=COMPILE_MODES, default=None, help="[default on CUDA, none on CPU]")
    g.add_argument("--compile-scope", choices=("blocks", "model"), default="blocks", help="[blocks]")
    g.add_argument("--dynamic-shapes", action=argparse.BooleanOptionalAction, default=False, help="[off]")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None, help="[on CUDA]")
    g.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=None, help="[on CUDA]")
    g.add_argument("--sdpa", choices=SDPA_BACKENDS, default="default")
    g.add_argument("--optimizer", choices=("fused", "foreach", "for-loop"), default="fused")
    g.add_argument("--merge-lora", action=argparse.BooleanOptionalAction, default=False)
    g.add_argument("--fuse-qkv", action=argparse.BooleanOptionalAction, default=False)
    g.add_argument("--inductor-tuning", action=argparse.BooleanOptionalAction, default=False)
    return p


def diffalign_levers(args: argparse.Namespace, device: torch.device) -> Levers:
    """The diffalign variant's levers: the flags, with the device's defaults where a flag is unset."""
    cuda = device.type == "cuda"
    levers = Levers(
        compile=args.compile if args.compile is not None else ("default" if cuda else "none"),
        compile_scope=args.compile_scope,
        dynamic_shapes=args.dynamic_shapes,
        channels_last=args.channels_last if args.channels_last is not None else cuda,
        tf32=args.tf32 if args.tf32 is not None else cuda,
        sdpa=args.sdpa,
        optimizer=args.optimizer,
        merge_lora=args.merge_lora,
        fuse_qkv=args.fuse_qkv,
        inductor_tuning=args.inductor_tuning,
    )
    if levers.tf32 and not cuda:
        raise SystemExit("--tf32: TF32 is a mode of NVIDIA GPUs; there is none on --device cpu")
    if levers.merge_lora and args.finetune != ["lora"]:
        raise SystemExit("--merge-lora folds LoRA adapters into the weights: use it with --finetune lora")
    if levers.fuse_qkv and "lora" in args.finetune:
        raise SystemExit("--fuse-qkv replaces to_q/to_k/to_v, which LoRA adapts: use it with --finetune full")
    return levers


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; returns what results.json holds."""
    args = parser().parse_args(argv)
    device = torch.device(args.device)
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: CUDA is not available here (use --device cpu --tiny)")
    if args.warmup < 1 or args.iters < 1:
        raise SystemExit("--warmup and --iters must be >= 1")
    default = [2] if args.tiny else [8, 16]
    batches = {"dpo": args.pairs or default, **{s: args.batch or default for s in ("sample", "pg", "draft")}}
    shape = Shape(8, 8, 32) if args.tiny else Shape(64, 77, 768)
    levers = {"eager": EAGER, "diffalign": diffalign_levers(args, device)}
    targets = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip())
    # bf16 is what GPUs train in; CPUs without bf16 matrix units run its convolutions ~10x slower.
    args.dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    dtype = DTYPES[args.dtype]

    base = build_unet(TINY_UNET if args.tiny else SD15_UNET, args.seed)
    params = sum(p.numel() for p in base.parameters())
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    kind = "tiny" if args.tiny else "SD1.5-shaped"
    print(f"UNet {params / 1e6:.1f}M parameters ({kind}), {args.dtype}, {gpu}")
    records: list[Record] = []
    stored: dict[str, dict[int, dict]] = {}

    def results(complete: bool) -> dict:
        """What results.json holds; `complete` is False while steps are still to be measured."""
        import diffusers

        return {
            "complete": complete,
            "device": gpu,
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "unet_parameters": params,
            "config": {
                **{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                "levers": {k: asdict(v) for k, v in levers.items()},
                "batches": batches,
                "shape": asdict(shape),
                "settings": asdict(StepSettings()),
            },
            "records": [asdict(r) for r in records],
            "comparisons": compare(records),
            "compile_s_total": sum(r.compile_s for r in records if r.variant == "diffalign"),
        }

    def write(complete: bool) -> None:
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "results.json").write_text(json.dumps(results(complete), indent=2))

    def record_and_write(record: Record) -> None:
        # results.json is rewritten after every step, so a run stopped by a time limit keeps its steps
        records.append(record)
        write(complete=False)

    for finetune in args.finetune:
        for name in args.variants:
            with process_switches(levers[name], device):
                variant = make_variant(
                    name, base, levers[name], finetune, (args.lora_rank, targets), dtype, device, args.seed
                )
                measure_variant(
                    variant,
                    finetune,
                    args.steps,
                    batches,
                    shape,
                    args,
                    stored.setdefault(finetune, {}),
                    device,
                    on_record=record_and_write,
                )
            del variant
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            torch._dynamo.reset()

    header = (
        f"{gpu}, torch {torch.__version__}, UNet {params / 1e6:.0f}M ({kind}), "
        f"{args.dtype}; diffalign levers: {asdict(levers['diffalign'])}"
    )
    print()
    print(markdown(records, compare(records), header))
    write(complete=True)
    if args.out is not None:
        print(f"\nwrote {args.out / 'results.json'}")
    return results(complete=True)


if __name__ == "__main__":
    main()
