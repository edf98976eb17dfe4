"""The config of reward-backpropagation fine-tuning (AlignProp, DRaFT-K, DRaFT-LV, ReFL).

Defaults follow the papers where the Shapes world does not argue otherwise (docs/reward_backprop.md):
a deterministic DDIM sampler (AlignProp, DRaFT and ReFL all backpropagate through DDIM with eta 0),
AlignProp's random truncation over the whole chain, DRaFT-K with K = 1, DRaFT-LV with n = 2 re-noised
samples, ReFL's gradient step drawn from the last quarter of the chain (its t in [30, 39] of 40).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from diffalign.align.policy_setup import adapter_options
from diffalign.align.runtime import RuntimeConfig
from diffalign.diffusion.sampling import SAMPLERS, SamplerConfig
from diffalign.guidance import DEFAULT_GUIDANCE_SCALE
from diffalign.models.diffusers_adapters.common import AdapterConfig
from diffalign.rewards.placement import check_reward_device

BACKPROP_METHODS = ("alignprop", "draft", "draft-lv", "refl")


@dataclass
class BackpropConfig:
    """Everything a reward-backpropagation run depends on.

    Attributes:
        method: "alignprop" (Prabhudesai et al. 2023: gradients through the last K steps, K drawn at
            random every optimiser step), "draft" (Clark et al. 2024, DRaFT-K: the last `draft_k`
            steps), "draft-lv" (DRaFT-LV: the final sample re-noised `lv_samples` times and denoised by
            the last step with gradients) or "refl" (Xu et al. 2023, ImageReward's ReFL: one random
            late step, its x0 prediction scored, plus the pre-training loss on data).
        model: the model to fine-tune: "base", "base-flow", a model / run folder, or a diffusers
            pipeline (a local folder or a Hugging Face id in the local cache; docs/diffusers.md).
        pipeline: options of a diffusers pipeline model (`AdapterConfig`: dtype, gradient
            checkpointing, channels_last, TF32, chunked VAE decoding, resolution, LoRA target modules);
            refused for a tiny model. Its `lora_rank` stays 0: LoRA is `lora_rank` below.
        reward: the training reward spec (`diffalign.rewards.load_reward`); it must be differentiable.
        reward_device: where the training reward model runs: None (the trainer's device), "cpu",
            "cuda" or "cuda:N". Another device keeps a large reward model off the policy's GPU; images
            go there and rewards come back (differentiably). Every process puts its reward model there.
        gold: the reward logged as `gold_mean` next to the training reward ("gold-faithfulness",
            "gold-utility", any reward spec), or "none". Skipped when equal to `reward`.
        prompts: training prompts: "world", "shapeseval" or a text file (`diffalign.align.prompts`).
        sampler: "ddim" / "ddpm" (epsilon and v models), "flow_euler" / "flow_sde" (flow models); None
            picks "ddim" or "flow_euler" by the model.
        num_steps: sampling steps during training.
        eta: DDIM's stochasticity (0: the deterministic sampler the papers backpropagate through).
        noise_level: the flow SDE's a (used by "flow_sde" only).
        guidance_scale: classifier-free guidance while sampling (gradients flow through both halves).
        steps: optimiser steps.
        batch_size: prompts per micro-batch on each process; an optimiser step samples batch_size *
            processes * runtime.gradient_accumulation_steps images.
        truncation_range: AlignProp's (lo, hi): every optimiser step backpropagates through the last
            K steps, K uniform in [lo, hi] (clipped to num_steps); None is (1, num_steps), the whole
            chain at most (AlignProp's truncated_backprop_rand).
        draft_k: DRaFT-K's K, the number of final steps with gradients (the paper's best is 1).
        lv_samples: DRaFT-LV's n, re-noised copies of each final sample (the paper uses 2).
        refl_step_range: ReFL's (lo, hi) fractions of the chain: the gradient step index is uniform in
            [floor(lo S), ceil(hi S) - 1] (0 is the noisiest step); (0.75, 1.0) matches ImageReward's
            t in [30, 39] of 40.
        refl_margin: None: ReFL's loss is -reward; a number m: ImageReward's code's ReLU(m - reward)
            (rewards above m give no gradient).
        pretrain_weight: ReFL's pre-training loss weight lambda: lambda times the denoising loss on
            `pretrain_batch_size` images of `pretrain_data` is added to every micro-batch (0: off).
        pretrain_data: ReFL's pre-training examples: "world" (rendered Shapes-world scenes, the tiny
            models' training data) or a preference store (path or SQLAlchemy URL) whose preferred
            images and prompts stand in for the pre-training set (required for a diffusers pipeline
            when pretrain_weight > 0). See `align/pretrain_data.py`.
        pretrain_batch_size: images of that loss per micro-batch.
        reward_scale: the reward is multiplied by this in the loss (loss = -reward_scale * reward).
        kl_weight: weight of a penalty on the drift from the base model, added to every method's loss
            (0: off, the papers' objectives). The penalty is the chain divergence that `log_kl` logs,
            summed over the S sampling steps at the states the policy visited: for a stochastic
            sampler (DDIM eta > 0, the flow SDE) the mean-per-dimension |mu_theta - mu_base|^2 /
            (2 sigma^2), the KL between the two models' sampling chains divided by C*H*W, DPOK's
            regulariser (Fan et al. 2023, sec. 4: the sum of per-step KLs that bounds the KL of the
            final samples; gradients through the policy's step means only, the visited states held
            fixed); for a deterministic sampler (DDIM eta 0, Euler), which has no KL, the squared
            step-mean distance |mu_theta - mu_base|^2 (so weights are not comparable across the
            two). Estimated on the micro-batch's own chains at `kl_steps` step indices drawn per
            optimiser step, scaled by S / kl_steps (unbiased for the sum).
        kl_steps: chain steps at which that penalty is evaluated per optimiser step (1..num_steps; each
            costs one policy forward and backward and one base forward per image).
        checkpoint_grad_steps: activation checkpointing of the denoiser calls that carry gradients
            (AlignProp's gradient checkpointing: memory of O(1) network activations per step).
        lr: AdamW learning rate (constant).
        weight_decay: AdamW weight decay.
        grad_clip: gradient-norm clip (0 disables; the norm is still logged).
        lora_rank: 0 fine-tunes every weight; > 0 trains LoRA adapters of this rank.
        lora_alpha: LoRA scale numerator (0: equal to the rank).
        log_kl: estimate the drift from the base model at every log line (see `reward_backprop`).
        log_every: steps between metrics lines (metrics are averaged over the steps in between).
        checkpoint_every: steps between resumable checkpoints (0: only at the end or `stop_after`).
        keep_checkpoints: how many checkpoints to keep.
        grid_every: steps between image grids saved under grids/ (0: none).
        log_with: Accelerate trackers: "auto" (TensorBoard when installed), "none", or names.
        runtime: device, mixed precision, gradient accumulation and seed (`RuntimeConfig`).
    """

    method: str = "alignprop"
    model: str = "base"
    pipeline: AdapterConfig = field(default_factory=AdapterConfig)
    reward: str = ""
    reward_device: str | None = None
    gold: str = "gold-faithfulness"
    prompts: str = "world"
    sampler: str | None = None
    num_steps: int = 10
    eta: float = 0.0
    noise_level: float = 0.7
    guidance_scale: float = DEFAULT_GUIDANCE_SCALE
    steps: int = 100
    batch_size: int = 8
    truncation_range: tuple[int, int] | None = None
    draft_k: int = 1
    lv_samples: int = 2
    refl_step_range: tuple[float, float] = (0.75, 1.0)
    refl_margin: float | None = None
    pretrain_weight: float = 1.0
    pretrain_batch_size: int = 8
    pretrain_data: str = "world"
    reward_scale: float = 1.0
    kl_weight: float = 0.0
    kl_steps: int = 1
    checkpoint_grad_steps: bool = True
    lr: float = 1e-4
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    lora_rank: int = 0
    lora_alpha: float = 0.0
    log_kl: bool = True
    log_every: int = 5
    checkpoint_every: int = 25
    keep_checkpoints: int = 2
    grid_every: int = 0
    log_with: str = "auto"
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def __post_init__(self) -> None:
        if self.method not in BACKPROP_METHODS:
            raise ValueError(f"method must be one of {BACKPROP_METHODS}, got {self.method!r}")
        if self.sampler is not None and self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS} or None, got {self.sampler!r}")
        for name in (
            "num_steps",
            "steps",
            "batch_size",
            "draft_k",
            "lv_samples",
            "pretrain_batch_size",
            "kl_steps",
            "log_every",
            "keep_checkpoints",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in (
            "checkpoint_every",
            "grid_every",
            "lora_rank",
            "weight_decay",
            "grad_clip",
            "pretrain_weight",
            "kl_weight",
            "lora_alpha",
            "eta",
            "noise_level",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.kl_steps > self.num_steps:
            raise ValueError(f"kl_steps ({self.kl_steps}) must be <= num_steps ({self.num_steps})")
        if self.draft_k > self.num_steps:
            raise ValueError(f"draft_k ({self.draft_k}) must be <= num_steps ({self.num_steps})")
        if self.truncation_range is not None:
            self.truncation_range = tuple(int(x) for x in self.truncation_range)
            lo, hi = self.truncation_range if len(self.truncation_range) == 2 else (0, -1)
            if not 1 <= lo <= hi:
                raise ValueError(
                    f"truncation_range must be (lo, hi) with 1 <= lo <= hi, got {self.truncation_range}"
                )
        self.refl_step_range = tuple(float(x) for x in self.refl_step_range)
        if (
            len(self.refl_step_range) != 2
            or not 0.0 <= self.refl_step_range[0] < self.refl_step_range[1] <= 1.0
        ):
            raise ValueError(
                f"refl_step_range must be (lo, hi) with 0 <= lo < hi <= 1, got {self.refl_step_range}"
            )
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not str(self.pretrain_data).strip():
            raise ValueError("pretrain_data must be 'world' or a preference store, got an empty string")
        if not self.reward_scale > 0:
            raise ValueError(f"reward_scale must be > 0, got {self.reward_scale}")
        if isinstance(self.runtime, dict):
            self.runtime = RuntimeConfig(**self.runtime)
        self.pipeline = adapter_options(self.pipeline)
        check_reward_device(self.reward_device)

    def sampler_config(self, prediction_type: str) -> SamplerConfig:
        """The training sampler for a model of `prediction_type`."""
        sampler = self.sampler or ("flow_euler" if prediction_type == "flow" else "ddim")
        config = SamplerConfig(
            sampler=sampler,
            num_steps=self.num_steps,
            eta=self.eta,
            noise_level=self.noise_level,
            guidance_scale=self.guidance_scale,
        )
        try:
            config.check_prediction_type(prediction_type)
        except ValueError as err:
            raise ValueError(f"sampler: {err}") from err
        return config

    def truncation(self) -> tuple[int, int]:
        """AlignProp's (lo, hi) number of final steps with gradients, clipped to num_steps."""
        lo, hi = self.truncation_range or (1, self.num_steps)
        return min(lo, self.num_steps), min(hi, self.num_steps)

    def refl_steps(self) -> tuple[int, int]:
        """ReFL's inclusive range of gradient-step indices."""
        lo, hi = self.refl_step_range
        first = min(int(lo * self.num_steps), self.num_steps - 1)
        last = max(first, min(self.num_steps - 1, -int(-hi * self.num_steps) - 1))
        return first, last
