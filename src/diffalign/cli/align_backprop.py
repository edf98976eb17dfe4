"""`diffalign align alignprop|draft|draft-lv|refl`: reward-backpropagation fine-tuning with a
differentiable reward (registered onto the `align` command group)."""

from __future__ import annotations

from pathlib import Path

from diffalign.cli.align import register_reward_trainer, reward_trainer_config, run_reward_trainer
from diffalign.cli.common import console, fail


def _run_backprop(
    method: str,
    out: Path,
    overrides: list[str] | None,
    model: str | None,
    reward: str | None,
    prompts: str | None,
    config_file: Path | None,
    resume: bool,
    device: str | None,
    extend: bool = False,
) -> None:
    from diffalign.align.backprop_config import BackpropConfig
    from diffalign.align.reward_backprop import train_backprop
    from diffalign.rewards.protocol import NotDifferentiableError

    config = reward_trainer_config(
        BackpropConfig, method, overrides, model, reward, prompts, config_file, device
    )
    if not config.reward:
        fail("--reward: reward backpropagation needs a differentiable reward (e.g. a reward-model folder)")
    console.print(
        f"{method}: {config.steps} steps x {config.batch_size} prompts, reward {config.reward}; "
        f"run folder {out}"
    )

    def summary(last: dict) -> str:
        gold = f", gold {last['gold_mean']:.3f}" if "gold_mean" in last else ""
        queries = last["reward_queries"]
        return f"step {last['step']}: reward {last['reward_mean']:.3f}{gold}, {queries} reward queries"

    run_reward_trainer(
        out,
        config.runtime.device,
        lambda: train_backprop(config, out, resume=resume, show_progress=True, extend=extend),
        summary,
        reward_errors=(NotDifferentiableError,),
    )


register_reward_trainer(
    "alignprop",
    "AlignProp (Prabhudesai et al. 2023): reward gradients through the last K sampling steps, K random "
    "(truncation_range), with gradient checkpointing.",
    _run_backprop,
)
register_reward_trainer(
    "draft",
    "DRaFT-K (Clark et al. 2024): reward gradients through the last draft_k sampling steps.",
    _run_backprop,
)
register_reward_trainer(
    "draft-lv",
    "DRaFT-LV (Clark et al. 2024): the last step applied to lv_samples re-noised copies of each sample.",
    _run_backprop,
)
register_reward_trainer(
    "refl",
    "ReFL (Xu et al. 2023): a random late step's x0 prediction scored, plus the pre-training loss on "
    "Shapes-world images (pretrain_weight).",
    _run_backprop,
)
