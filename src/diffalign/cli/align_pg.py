"""`diffalign align ddpo|dpok|grpo`: policy-gradient fine-tuning against a reward (registered onto the
`align` command group)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from diffalign.cli.align import ConfigOpt, DeviceOpt, ModelOpt, OutOpt, OverridesArg, ResumeOpt, app
from diffalign.cli.common import console, fail

RewardOpt = Annotated[
    str | None,
    typer.Option(
        help="The training reward: shapes:faithfulness, shapes:rater-GROUP, a reward-model folder or "
        "file.py:function (default: the config's)."
    ),
]
PromptsOpt = Annotated[
    str | None,
    typer.Option(help="Training prompts: world, shapeseval or a text file (default: the config's)."),
]


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
    from diffalign.align.config_io import ConfigError, load_config
    from diffalign.align.guard import NonFiniteError
    from diffalign.align.pg_config import PGConfig
    from diffalign.align.policy_gradient import RatioCheckError, train_pg
    from diffalign.align.prompts import PromptSourceError
    from diffalign.align.run_dir import RunDirError
    from diffalign.align.tracking import read_metrics
    from diffalign.models.registry import UnsupportedModelError
    from diffalign.rewards.registry import RewardSpecError

    extra = [f"method={method}"]
    for key, value in (
        ("model", model),
        ("reward", reward),
        ("prompts", prompts),
        ("runtime.device", device),
    ):
        if value is not None:
            extra.append(f"{key}={value}")
    try:
        config = load_config(PGConfig, config_file, [*(overrides or []), *extra])
    except ConfigError as err:
        fail(str(err))
    console.print(
        f"{method}: {config.epochs} epochs x {config.samples_per_epoch} samples, reward {config.reward}; "
        f"run folder {out}"
    )
    try:
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
    if (out / "model").is_dir():
        console.print(f"[bold green]run folder:[/] {out} (model: {out / 'model'}; use --model {out})")
    else:
        console.print(f"[bold]stopped:[/] resume with --resume --out {out}")


def _command(method: str, summary: str) -> None:
    """Register `diffalign align METHOD` (the three methods share their options)."""

    def command(
        out: OutOpt,
        overrides: OverridesArg = None,
        model: ModelOpt = None,
        reward: RewardOpt = None,
        prompts: PromptsOpt = None,
        config: ConfigOpt = None,
        resume: ResumeOpt = False,
        device: DeviceOpt = None,
    ) -> None:
        _run_pg(method, out, overrides, model, reward, prompts, config, resume, device)

    command.__doc__ = summary
    app.command(method)(command)


_command(
    "ddpo", "DDPO (Black et al. 2023): PPO clipping over sampled trajectories, per-prompt reward statistics."
)
_command(
    "dpok", "DPOK (Fan et al. 2023): DDPO's objective plus a KL to the base model (kl_beta, default 0.01)."
)
_command("grpo", "GRPO with group-standardised advantages; on a flow model, Flow-GRPO's SDE sampler and KL.")
