"""`diffalign align ddpo|dpok|grpo`: policy-gradient fine-tuning against a reward (registered onto the
`align` command group)."""

from __future__ import annotations

from pathlib import Path

from diffalign.cli.align import load_command_config, measured, register_reward_trainer, report_run_end
from diffalign.cli.common import console, fail


def _run_pg(
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
    from diffalign.align.guard import NonFiniteError
    from diffalign.align.pg_config import PGConfig
    from diffalign.align.policy_gradient import RatioCheckError, train_pg
    from diffalign.align.prompts import PromptSourceError
    from diffalign.align.run_dir import RunDirError
    from diffalign.align.tracking import read_metrics
    from diffalign.models.registry import UnsupportedModelError
    from diffalign.rewards.registry import RewardSpecError

    options = {
        "method": method,
        "model": model,
        "reward": reward,
        "prompts": prompts,
        "runtime.device": device,
    }
    config = load_command_config(PGConfig, config_file, overrides, options)
    console.print(
        f"{method}: {config.epochs} epochs x {config.samples_per_epoch} samples, reward {config.reward}; "
        f"run folder {out}"
    )
    try:
        with measured(out, config.runtime.device):
            train_pg(config, out, resume=resume, show_progress=True)
    except (FileNotFoundError, UnsupportedModelError, RewardSpecError, PromptSourceError) as err:
        fail(str(err))
    except (RunDirError, NonFiniteError, RatioCheckError, ValueError) as err:
        fail(str(err))
    lines = read_metrics(out / "metrics.jsonl") if (out / "metrics.jsonl").is_file() else []
    if lines:
        last = lines[-1]
        gold = f", gold {last['gold_mean']:.3f}" if "gold_mean" in last else ""
        console.print(
            f"epoch {last['step']}: reward {last['reward_mean']:.3f}{gold}, "
            f"KL to base {last['kl_to_base']:.2e}"
        )
    report_run_end(out)


register_reward_trainer(
    "ddpo",
    "DDPO (Black et al. 2023): PPO clipping over sampled trajectories, per-prompt reward statistics.",
    _run_pg,
)
register_reward_trainer(
    "dpok",
    "DPOK (Fan et al. 2023): DDPO's objective plus a KL to the base model (kl_beta, default 0.01).",
    _run_pg,
)
register_reward_trainer(
    "grpo",
    "GRPO with group-standardised advantages; on a flow model, Flow-GRPO's SDE sampler and KL.",
    _run_pg,
)
