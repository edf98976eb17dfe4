"""The config of policy-gradient fine-tuning (DDPO, DPOK, GRPO / Flow-GRPO): one documented dataclass.

Defaults follow the papers where the Shapes world does not argue otherwise (see docs/rl.md):
clip range 1e-4 and advantage clip 5 (DDPO), per-prompt statistics (DDPO), KL weight 0.04 and noise
level 0.7 (Flow-GRPO), fewer sampling steps in training (10) than in evaluation (20).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from diffalign.align.policy_setup import adapter_options
from diffalign.align.runtime import RuntimeConfig
from diffalign.diffusion.sampling import SAMPLERS, SamplerConfig, check_sde_window
from diffalign.guidance import DEFAULT_GUIDANCE_SCALE
from diffalign.models.diffusers_adapters.common import AdapterConfig
from diffalign.rewards.placement import check_reward_device

PG_METHODS = ("ddpo", "dpok", "grpo")

#: How the SDE window moves from epoch to epoch (`PGConfig.sde_window_schedule`).
WINDOW_SCHEDULES = ("random", "progressive")

#: kl_beta when the config leaves it unset: DDPO has no KL term; DPOK's and Flow-GRPO's (GenEval) weights.
DEFAULT_KL_BETA: dict[str, float] = {"ddpo": 0.0, "dpok": 0.01, "grpo": 0.04}


@dataclass
class PGConfig:
    """Everything a policy-gradient run depends on.

    Attributes:
        method: "ddpo" (Black et al. 2023: PPO clip, per-prompt advantage statistics), "dpok" (Fan et
            al. 2023: DDPO's objective plus a KL to the base model; see docs/rl.md for what is left out)
            or "grpo" (group-standardised advantages; with a flow model and the "flow_sde" sampler this
            is Flow-GRPO, Liu et al. 2025).
        model: the model to fine-tune: "base", "base-flow", a model / run folder, or a diffusers
            pipeline (a local folder or a Hugging Face id in the local cache; docs/diffusers.md).
        pipeline: options of a diffusers pipeline model (`AdapterConfig`: dtype, gradient
            checkpointing, channels_last, TF32, chunked VAE decoding, resolution, LoRA target modules);
            refused for a tiny model. Its `lora_rank` stays 0: LoRA is `lora_rank` below.
        reward: the training reward spec (`diffalign.rewards.load_reward`).
        reward_device: where the training reward model runs: None (the trainer's device), "cpu",
            "cuda" or "cuda:N". Another device keeps a large reward model off the policy's GPU; images
            go there and rewards come back (differentiably). Every process puts its reward model there.
        gold: the reward logged as `gold_mean` next to the training reward ("gold-faithfulness",
            "gold-utility", any reward spec), or "none". Skipped when equal to `reward`.
        prompts: where training prompts come from: "world", "shapeseval" or a text file
            (`diffalign.align.prompts`).
        sampler: "ddim" or "ddpm" (epsilon / v models), "flow_sde" (flow models); None picks "ddim"
            or "flow_sde" by the model. The sampler must be stochastic (a policy needs log-probs).
        num_steps: sampling steps during training (Flow-GRPO trains with fewer than it evaluates with).
        eta: DDIM's stochasticity (1.0: DDPO's default).
        noise_level: the SDE's a in sigma_t = a sqrt(t / (1 - t)) (Flow-GRPO: 0.7).
        guidance_scale: classifier-free guidance while sampling; the log-prob trained on is that of the
            guided step the sampler took.
        sde_window_size: 0 makes every sampling step stochastic and trainable. W > 0 mixes ODE and
            SDE steps (MixGRPO, Li et al. 2025; Flow-GRPO-Fast): each epoch only W consecutive steps
            are stochastic, the others deterministic (DDIM eta 0 / the flow ODE), and only those W
            steps are trained on (`timestep_fraction` of them). The window lies within
            `sde_window_range` and moves by `sde_window_schedule`.
        sde_window_schedule: "random" (the window's start drawn per epoch, uniformly and seeded) or
            "progressive" (MixGRPO's sliding window: from the start of the range, moved
            `sde_window_shift` steps later every `sde_window_shift_every` epochs).
        sde_window_shift_every: epochs between two moves of a progressive window (MixGRPO: 25).
        sde_window_shift: steps a progressive window moves at a time.
        sde_window_roll_back: a progressive window that reaches the end of the range starts again at
            its beginning (otherwise it stays at the end).
        sde_window_range: (start, end) steps the window must lie in; None: every step that can be
            stochastic (the whole chain for "flow_sde"; all but the last for "ddim" and "ddpm", whose
            last step lands on the clean end with no noise). Early steps decide the layout, late ones
            the detail.
        group_shared_noise: the samples of a prompt's group start from the same initial noise x_T
            (DanceGRPO, Xue et al. 2025), so their rewards differ only by the stochastic steps' noise
            and the group's advantages compare exploration, not starting points. Each sample still
            draws its own step noise.
        epochs: outer epochs (sample, score, train).
        prompts_per_epoch: distinct prompt draws per epoch (global, over all processes).
        samples_per_prompt: samples of each drawn prompt (GRPO's group size, >= 2 for "grpo").
        sample_batch_size: samples per sampling call on each process.
        inner_epochs: passes over an epoch's samples (only the first pass is on-policy).
        train_batch_size: (sample, step) pairs per micro-batch on each process; an optimiser step takes
            train_batch_size * processes * runtime.gradient_accumulation_steps pairs, which must divide
            the epoch's pairs.
        timestep_fraction: fraction of each sample's stochastic steps trained on (drawn per sample).
        clip_range: PPO's epsilon on the per-dimension importance ratio (DDPO: 1e-4).
        adv_clip: advantages are clipped to [-adv_clip, adv_clip] (0 disables).
        stat_buffer: per-prompt reward buffer length (DDPO's per-prompt stat tracking; "ddpo", "dpok").
        stat_min_count: below this many rewards for a prompt, the batch statistics are used.
        kl_beta: weight of the per-dimension KL to the base model |mu - mu_ref|^2 / (2 sigma^2); None:
            `DEFAULT_KL_BETA[method]`.
        lr: AdamW learning rate (constant). 1e-4 with full fine-tuning of the shipped `base` lowered its
            ShapesEval accuracy (0.62 -> 0.47 in 8 GRPO epochs, docs/rl.md); 1e-5 is not yet measured.
        weight_decay: AdamW weight decay.
        grad_clip: gradient-norm clip (0 disables; the norm is still logged).
        lora_rank: 0 fine-tunes every weight; > 0 trains LoRA adapters of this rank (the base model is
            the adapters switched off).
        lora_alpha: LoRA scale numerator (0: equal to the rank).
        ratio_tolerance: the largest |log ratio| allowed on the first optimiser step of every epoch,
            where the policy still equals the sampler (fail loudly above). float32 recomputation in
            another batch stays under 1e-5; mixed precision needs a looser value.
        log_every: epochs between metrics lines.
        checkpoint_every: epochs between resumable checkpoints (0: only at the end or `stop_after`).
        keep_checkpoints: how many checkpoints to keep.
        grid_every: epochs between image grids saved under grids/ (0: none).
        log_with: Accelerate trackers: "auto" (TensorBoard when installed), "none", or names.
        runtime: device, mixed precision, gradient accumulation and seed (`RuntimeConfig`).
    """

    method: str = "ddpo"
    model: str = "base"
    pipeline: AdapterConfig = field(default_factory=AdapterConfig)
    reward: str = "shapes:faithfulness"
    reward_device: str | None = None
    gold: str = "gold-faithfulness"
    prompts: str = "world"
    sampler: str | None = None
    num_steps: int = 10
    eta: float = 1.0
    noise_level: float = 0.7
    guidance_scale: float = DEFAULT_GUIDANCE_SCALE
    sde_window_size: int = 0
    sde_window_range: tuple[int, int] | None = None
    sde_window_schedule: str = "random"
    sde_window_shift_every: int = 25
    sde_window_shift: int = 1
    sde_window_roll_back: bool = False
    group_shared_noise: bool = False
    epochs: int = 50
    prompts_per_epoch: int = 16
    samples_per_prompt: int = 4
    sample_batch_size: int = 32
    inner_epochs: int = 1
    train_batch_size: int = 32
    timestep_fraction: float = 1.0
    clip_range: float = 1e-4
    adv_clip: float = 5.0
    stat_buffer: int = 32
    stat_min_count: int = 16
    kl_beta: float | None = None
    lr: float = 1e-5
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    lora_rank: int = 0
    lora_alpha: float = 0.0
    ratio_tolerance: float = 1e-4
    log_every: int = 1
    checkpoint_every: int = 5
    keep_checkpoints: int = 2
    grid_every: int = 10
    log_with: str = "auto"
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def __post_init__(self) -> None:
        if self.method not in PG_METHODS:
            raise ValueError(f"method must be one of {PG_METHODS}, got {self.method!r}")
        if self.sampler is not None and self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS} or None, got {self.sampler!r}")
        if self.sampler == "flow_euler":
            raise ValueError("sampler 'flow_euler' is deterministic: policy gradients need 'flow_sde'")
        for name in (
            "num_steps",
            "epochs",
            "prompts_per_epoch",
            "samples_per_prompt",
            "sample_batch_size",
            "inner_epochs",
            "train_batch_size",
            "stat_buffer",
            "stat_min_count",
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
            "adv_clip",
            "weight_decay",
            "grad_clip",
            "eta",
            "noise_level",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.method == "grpo" and self.samples_per_prompt < 2:
            raise ValueError("grpo standardises rewards within groups: samples_per_prompt must be >= 2")
        if not 0.0 < self.timestep_fraction <= 1.0:
            raise ValueError(f"timestep_fraction must be in (0, 1], got {self.timestep_fraction}")
        if not self.clip_range > 0:
            raise ValueError(f"clip_range must be > 0, got {self.clip_range}")
        if self.kl_beta is not None and self.kl_beta < 0:
            raise ValueError(f"kl_beta must be >= 0, got {self.kl_beta}")
        if self.method == "dpok" and self.kl_beta == 0:
            raise ValueError("dpok is DDPO with a KL to the base model: kl_beta must be > 0 (or use ddpo)")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.sde_window_size <= self.num_steps:
            raise ValueError(
                f"sde_window_size must be in [0, num_steps = {self.num_steps}], got {self.sde_window_size}"
            )
        if self.sde_window_schedule not in WINDOW_SCHEDULES:
            raise ValueError(
                f"sde_window_schedule must be one of {WINDOW_SCHEDULES}, got {self.sde_window_schedule!r}"
            )
        if self.sde_window_shift_every < 1 or self.sde_window_shift < 1:
            raise ValueError(
                "sde_window_shift_every and sde_window_shift must be >= 1, got "
                f"{self.sde_window_shift_every} and {self.sde_window_shift}"
            )
        if self.sde_window_range is not None:
            if self.sde_window_size == 0:
                raise ValueError("sde_window_range needs sde_window_size > 0")
            self.sde_window_range = check_sde_window(
                self.sde_window_range, self.num_steps, "sde_window_range"
            )
            start, end = self.sde_window_range
            if end - start < self.sde_window_size:
                raise ValueError(
                    f"sde_window_range ({start}, {end}) is shorter than sde_window_size "
                    f"{self.sde_window_size}"
                )
        if not self.ratio_tolerance > 0:
            raise ValueError(f"ratio_tolerance must be > 0, got {self.ratio_tolerance}")
        if isinstance(self.runtime, dict):
            self.runtime = RuntimeConfig(**self.runtime)
        self.pipeline = adapter_options(self.pipeline)
        check_reward_device(self.reward_device)

    @property
    def samples_per_epoch(self) -> int:
        """Samples (and reward queries) per epoch, over all processes."""
        return self.prompts_per_epoch * self.samples_per_prompt

    def resolved_kl_beta(self) -> float:
        return self.kl_beta if self.kl_beta is not None else DEFAULT_KL_BETA[self.method]

    def sampler_config(self, prediction_type: str) -> SamplerConfig:
        """The training sampler for a model of `prediction_type`; refuses a deterministic one."""
        sampler = self.sampler or ("flow_sde" if prediction_type == "flow" else "ddim")
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
        if not config.stochastic:
            raise ValueError(
                f"sampler {sampler!r} with eta={self.eta}, noise_level={self.noise_level} is deterministic: "
                "a policy gradient needs step log-probs (use eta > 0 or noise_level > 0)"
            )
        last = self.num_steps if config.is_flow else self.num_steps - 1
        if self.sde_window_size > last or (self.sde_window_range or (0, 0))[1] > last:
            raise ValueError(
                f"sampler {sampler!r}: only steps 0 .. {last - 1} of {self.num_steps} can be stochastic (the "
                f"last step of DDIM/DDPM lands on the clean end with no noise); sde_window_size "
                f"{self.sde_window_size} and sde_window_range {self.sde_window_range} must fit in them"
            )
        return config
