"""`diffalign align alignprop|draft|draft-lv|refl`: reward-backpropagation fine-tuning with a
differentiable reward (registered onto the `align` command group)."""

from __future__ import annotations

from pathlib import Path

from diffalign.cli.align import load_command_config, measured, register_reward_trainer, report_run_end
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
) -> None:
    from diffalign.align.backprop_config import BackpropConfig
    from diffalign.align.guard import NonFiniteError
    from diffalign.align.prompts import PromptSourceError
    from diffalign.align.reward_backprop import train_backprop
    from diffalign.align.run_dir import RunDirError
    from diffalign.align.tracking import read_metrics
    from diffalign.models.registry import UnsupportedModelError
    from diffalign.rewards.protocol import NotDifferentiableError
    from diffalign.rewards.registry import RewardSpecError

    options = {
        "method": method,
        "model": model,
        "reward": reward,
        "prompts": prompts,
        "runtime.device": device,
    }
    config = load_command_config(BackpropConfig, config_file, overrides, options)
    if not config.reward:
        fail("--reward: reward backpropagation needs a differentiable reward (e.g. a reward-model folder)")
    console.print(
        f"{method}: {config.steps} steps x {config.batch_size} prompts, reward {config.reward}; "
        f"run folder {out}"
    )
    try:
        with measured(out, config.runtime.device):
            train_backprop(config, out, resume=resume, show_progress=True)
    except NotDifferentiableError as err:
        fail(f"--reward: {err}")
    except (FileNotFoundError, UnsupportedModelError, RewardSpecError, PromptSourceError) as err:
        fail(str(err))
    except (RunDirError, NonFiniteError, ValueError) as err:
        fail(str(err))
    lines = read_metrics(out / "metrics.jsonl") if (out / "metrics.jsonl").is_file() else []
    if lines:
        last = lines[-1]
        gold = f", gold {last['gold_mean']:.3f}" if "gold_mean" in last else ""
        console.print(
            f"step {last['step']}: reward {last['reward_mean']:.3f}{gold}, "
            f"{last['reward_queries']} reward queries"
        )
    report_run_end(out)


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
