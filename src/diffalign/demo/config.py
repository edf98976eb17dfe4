"""The demo's budgets: `DemoConfig`, with the full and `--quick` presets.

Every training method gets a budget of the same order of compute (denoiser rows, forward plus
backward); the report shows what each one actually used, measured, so the comparison does not rest on
the presets being equal.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from diffalign.guidance import DEFAULT_GUIDANCE_SCALE


@dataclass
class DemoConfig:
    """What `diffalign demo` runs.

    Attributes:
        model: the base model ("base", "base-flow" or a model folder).
        seed: seeds the preference simulation, the trainers, steering and the evaluation.
        num_steps: sampling steps everywhere (data, training rollouts, evaluation).
        guidance_scale: classifier-free guidance everywhere.
        pairs: preference pairs simulated from the base model and labelled by the simulated panel.
        rm_epochs: reward-model training epochs (early stopping on 10% held-out pairs).
        rm_pretrain_steps: world-caption pretraining steps of the reward model before the pairs
            (`diffalign.rewards.bt_training.pretrain_matching`).
        grpo_epochs: GRPO epochs (each samples `grpo_prompts * grpo_group` images and takes one step per
            training batch).
        grpo_prompts: prompts per GRPO epoch.
        grpo_group: samples per prompt (the GRPO group).
        grpo_lr: GRPO learning rate.
        draft_steps: DRaFT-1 optimiser steps.
        draft_batch: images per DRaFT step.
        draft_lr: DRaFT learning rate.
        dpo_steps: Diffusion-DPO optimiser steps.
        dpo_batch: preference pairs per DPO step.
        dpo_lr: Diffusion-DPO learning rate.
        fk_particles: FK-steering particles (its NFE budget is this many plain samples).
        fk_lambda: FK-steering potential scale lambda.
        eval_prompts_per_task: ShapesEval prompts per GenEval task in the evaluation (six tasks).
        eval_samples_per_prompt: samples per evaluation prompt (2 or more for per-prompt diversity).
        batch_size: images per sampling call.
        threads: torch CPU threads (0: leave torch's default).
        device: cpu, cuda or auto.
    """

    model: str = "base"
    seed: int = 0
    num_steps: int = 10
    guidance_scale: float = DEFAULT_GUIDANCE_SCALE
    pairs: int = 200
    rm_epochs: int = 15
    rm_pretrain_steps: int = 300
    grpo_epochs: int = 3
    grpo_prompts: int = 8
    grpo_group: int = 4
    grpo_lr: float = 1e-5
    draft_steps: int = 20
    draft_batch: int = 8
    draft_lr: float = 1e-5
    dpo_steps: int = 50
    dpo_batch: int = 16
    dpo_lr: float = 1e-5
    fk_particles: int = 4
    fk_lambda: float = 10.0
    eval_prompts_per_task: int = 5
    eval_samples_per_prompt: int = 2
    batch_size: int = 64
    threads: int = 0
    device: str = "auto"

    @classmethod
    def quick(cls, **overrides: object) -> DemoConfig:
        """The `--quick` preset: every stage at a fifth of the compute or less (a smoke test; CI runs it)."""
        return replace(
            cls(
                pairs=48,
                rm_epochs=10,
                rm_pretrain_steps=50,
                grpo_epochs=1,
                grpo_prompts=4,
                grpo_group=4,
                draft_steps=5,
                dpo_steps=12,
                eval_prompts_per_task=2,
            ),
            **overrides,
        )

    def check(self) -> None:
        """Raise ValueError naming the first field that cannot run."""
        positive = (
            "num_steps", "pairs", "rm_epochs", "grpo_epochs", "grpo_prompts", "draft_steps",
            "draft_batch", "dpo_steps", "dpo_batch", "fk_particles", "eval_prompts_per_task",
            "eval_samples_per_prompt", "batch_size",
        )  # fmt: skip
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"demo config: {name} must be >= 1, got {getattr(self, name)}")
        if self.grpo_group < 2:
            raise ValueError(f"demo config: grpo_group must be >= 2 (a group), got {self.grpo_group}")
        for name in ("rm_pretrain_steps", "threads"):
            if getattr(self, name) < 0:
                raise ValueError(f"demo config: {name} must be >= 0, got {getattr(self, name)}")
        for name in ("grpo_lr", "draft_lr", "dpo_lr"):
            if not getattr(self, name) > 0:  # a negative rate climbs the loss; 0 trains nothing
                raise ValueError(f"demo config: {name} must be > 0, got {getattr(self, name)}")
        if self.device != "auto":
            import torch

            try:
                torch.device(self.device)
            except (RuntimeError, ValueError):
                raise ValueError(
                    f"demo config: device must be cpu, cuda[:N] or auto, got {self.device!r}"
                ) from None
