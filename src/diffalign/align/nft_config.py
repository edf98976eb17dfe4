"""The config of DiffusionNFT, online RL on the forward process (Zheng et al. 2025): one documented dataclass.

Defaults (docs/rl.md, "DiffusionNFT"): beta 1, advantages clipped at 5 and mapped to [0, 1], and
x0-space losses with the adaptive (self-normalised) weighting, as in the paper's reference code; a
deterministic sampler (the method needs no log-probs) with 10 steps in training; lr 3e-5 for full
fine-tuning of the tiny models (1e-4 gained faster and lost it again, docs/rl.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from diffalign.align.policy_setup import adapter_options
from diffalign.align.runtime import RuntimeConfig
from diffalign.diffusion.sampling import SAMPLERS, SamplerConfig
from diffalign.guidance import DEFAULT_GUIDANCE_SCALE
from diffalign.models.diffusers_adapters.common import AdapterConfig
from diffalign.rewards.placement import check_reward_device


@dataclass
class NFTConfig:
    """Everything a DiffusionNFT run depends on.

    Attributes:
        method: "nft" (the only one; kept so run records and the CLI name the trainer).
        model: the model to fine-tune: "base", "base-flow", a model / run folder, or a diffusers
            pipeline (a local folder or a Hugging Face id in the local cache; docs/diffusers.md).
        pipeline: options of a diffusers pipeline model (`AdapterConfig`); refused for a tiny model. Its
            `lora_rank` stays 0: LoRA is `lora_rank` below.
        reward: the training reward spec (`diffalign.rewards.load_reward`); any black box works.
        reward_device: where the training reward model runs: None (the trainer's device), "cpu",
            "cuda" or "cuda:N".
        gold: the reward logged as `gold_mean` next to the training reward, or "none". Skipped when
            equal to `reward`.
        prompts: where training prompts come from: "world", "shapeseval" or a text file.
        sampler: any sampler ("ddim", "ddpm" for epsilon / v models, "flow_euler", "flow_sde" for flow
            models); None picks the deterministic one ("ddim" with `eta` 0, or "flow_euler"). The method
            trains on the final images only, so the sampler needs no log-probs.
        num_steps: sampling steps during training.
        eta: DDIM's stochasticity when `sampler` is "ddim" (0: deterministic).
        noise_level: the SDE's a when `sampler` is "flow_sde".
        guidance_scale: classifier-free guidance while sampling. With `guided_loss` the loss is put on
            the guided prediction u + w (c - u), the one that sampled (both branches are trained).
        guided_loss: train the guided prediction (True) or the conditional one alone (False; the
            paper's CFG-free setting, meant for `guidance_scale` 1).
        epochs: outer epochs (sample, score, train).
        prompts_per_epoch: distinct prompt draws per epoch (global, over all processes).
        samples_per_prompt: samples of each drawn prompt; the group its advantages are standardised in
            (>= 2).
        sample_batch_size: samples per sampling call on each process.
        timesteps_per_sample: noise levels each sample is trained at per epoch, drawn from the
            sampler's levels (the paper's discrete training times); each gets fresh noise.
        time_fraction: the levels are drawn from the first (noisiest) `time_fraction` of the sampler's
            steps (1: all of them).
        train_batch_size: (sample, level) points per micro-batch on each process; an optimiser step
            takes train_batch_size * processes * runtime.gradient_accumulation_steps points, which must
            divide the epoch's points.
        beta: the mixing coefficient of the implicit policies v+ = beta v_theta + (1 - beta) v_old and
            v- = (1 + beta) v_old - beta v_theta (the paper's beta). The loss's curvature in v_theta is
            beta * adv_clip: a smaller beta is a looser trust region around the old policy.
        adv_clip: group advantages are clipped to [-adv_clip, adv_clip] and mapped to the optimality
            probability r = A / (2 adv_clip) + 1/2 in [0, 1]; the loss is scaled by adv_clip / beta.
        old_decay: the old (sampling) policy after every epoch: old <- old_decay old + (1 - old_decay)
            theta. 0 samples with the current weights (on-policy); the paper's EMA schedules keep
            it between 0 and ~0.9.
        kl_beta: weight of mean (v_theta - v_ref)^2, the squared distance of the raw predictions to the
            base model's at the training points (0 disables; the paper's optional KL term).
        lr: AdamW learning rate (constant).
        weight_decay: AdamW weight decay.
        grad_clip: gradient-norm clip (0 disables; the norm is still logged).
        lora_rank: 0 fine-tunes every weight; > 0 trains LoRA adapters of this rank.
        lora_alpha: LoRA scale numerator (0: equal to the rank).
        log_every: epochs between metrics lines.
        checkpoint_every: epochs between resumable checkpoints (0: only at the end or `stop_after`).
        keep_checkpoints: how many checkpoints to keep.
        grid_every: epochs between image grids saved under grids/ (0: none).
        log_with: Accelerate trackers: "auto" (TensorBoard when installed), "none", or names.
        runtime: device, mixed precision, gradient accumulation and seed (`RuntimeConfig`).
    """

    method: str = "nft"
    model: str = "base"
    pipeline: AdapterConfig = field(default_factory=AdapterConfig)
    reward: str = "shapes:faithfulness"
    reward_device: str | None = None
    gold: str = "gold-faithfulness"
    prompts: str = "world"
    sampler: str | None = None
    num_steps: int = 10
    eta: float = 0.0
    noise_level: float = 0.7
    guidance_scale: float = DEFAULT_GUIDANCE_SCALE
    guided_loss: bool = True
    epochs: int = 50
    prompts_per_epoch: int = 8
    samples_per_prompt: int = 8
    sample_batch_size: int = 64
    timesteps_per_sample: int = 2
    time_fraction: float = 1.0
    train_batch_size: int = 32
    beta: float = 1.0
    adv_clip: float = 5.0
    old_decay: float = 0.0
    kl_beta: float = 0.0
    lr: float = 3e-5
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    lora_rank: int = 0
    lora_alpha: float = 0.0
    log_every: int = 1
    checkpoint_every: int = 5
    keep_checkpoints: int = 2
    grid_every: int = 10
    log_with: str = "auto"
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def __post_init__(self) -> None:
        if self.method != "nft":
            raise ValueError(f"method must be 'nft', got {self.method!r}")
        if self.sampler is not None and self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS} or None, got {self.sampler!r}")
        for name in (
            "num_steps",
            "epochs",
            "prompts_per_epoch",
            "sample_batch_size",
            "timesteps_per_sample",
            "train_batch_size",
            "log_every",
            "keep_checkpoints",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in (
            "checkpoint_every",
            "grid_every",
            "lora_rank",
            "lora_alpha",
            "weight_decay",
            "grad_clip",
            "kl_beta",
            "eta",
            "noise_level",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.samples_per_prompt < 2:
            raise ValueError("nft standardises rewards within groups: samples_per_prompt must be >= 2")
        if not 0.0 < self.time_fraction <= 1.0:
            raise ValueError(f"time_fraction must be in (0, 1], got {self.time_fraction}")
        if not self.beta > 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if not self.adv_clip > 0:
            raise ValueError(f"adv_clip must be > 0 (it maps advantages to [0, 1]), got {self.adv_clip}")
        if not 0.0 <= self.old_decay < 1.0:
            raise ValueError(f"old_decay must be in [0, 1), got {self.old_decay}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if isinstance(self.runtime, dict):
            self.runtime = RuntimeConfig(**self.runtime)
        self.pipeline = adapter_options(self.pipeline)
        check_reward_device(self.reward_device)

    @property
    def samples_per_epoch(self) -> int:
        """Samples (and reward queries) per epoch, over all processes."""
        return self.prompts_per_epoch * self.samples_per_prompt

    def sampler_config(self, prediction_type: str) -> SamplerConfig:
        """The training sampler for a model of `prediction_type` (any sampler that suits it)."""
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

    def training_levels(self, sampler: SamplerConfig, schedule) -> list[float]:
        """The noise levels training draws from: the starts of the first `time_fraction` of the
        sampler's steps (never the clean end)."""
        starts = sampler.timesteps(schedule)[:-1].tolist()
        return starts[: max(1, round(self.time_fraction * len(starts)))]
