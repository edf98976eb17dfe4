"""`diffalign demo` (the whole loop on the Shapes world, with the paradigm report) and `diffalign report`
(the same report from existing runs); registered onto the main app."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer

from diffalign.cli.common import console, fail
from diffalign.guidance import DEFAULT_GUIDANCE_SCALE


def demo_cmd(
    out: Annotated[Path, typer.Option(help="Folder for everything the demo makes, and report.html.")] = Path(
        "demo_out"
    ),
    quick: Annotated[
        bool, typer.Option(help="The quick preset: every stage at a fifth of the compute or less.")
    ] = False,
    overrides: Annotated[
        list[str] | None,
        typer.Option("--set", help="A DemoConfig field as key=value (e.g. --set pairs=400); repeatable."),
    ] = None,
    model: Annotated[str | None, typer.Option(help="The base model (default: base).")] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda or auto.")] = None,
) -> None:
    """The main job: preferences -> reward model -> GRPO, DRaFT, Diffusion-DPO and FK steering ->
    evaluation -> an HTML report comparing the paradigms on cost and gain (OUT/report.html)."""
    from dataclasses import asdict

    from diffalign.align.config_io import ConfigError, from_dict, parse_overrides
    from diffalign.demo.config import DemoConfig
    from diffalign.demo.pipeline import run_demo

    preset = DemoConfig.quick() if quick else DemoConfig()
    extra = {k: v for k, v in (("model", model), ("device", device)) if v is not None}
    try:
        config = from_dict(DemoConfig, {**asdict(preset), **parse_overrides(overrides or []), **extra})
        config.check()
    except (ConfigError, ValueError) as err:
        fail(f"--set: {err}")
    command = shlex.join(["diffalign", *sys.argv[1:]]) if sys.argv[1:2] == ["demo"] else ""
    try:
        report = run_demo(config, out, log=console.print, command=command)
    except (FileNotFoundError, ValueError) as err:
        fail(str(err))
    console.print(f"[bold green]report:[/] {report}")


def report_cmd(
    runs: Annotated[
        list[Path], typer.Argument(help="A demo folder (holding report.json), or align run folders.")
    ],
    out: Annotated[
        Path | None, typer.Option(help="Where to write report.html (default: the demo folder, or ./report).")
    ] = None,
    prompts_per_task: Annotated[
        int, typer.Option(help="ShapesEval prompts per task when evaluating runs.")
    ] = 6,
    samples_per_prompt: Annotated[int, typer.Option(help="Samples per prompt when evaluating runs.")] = 2,
    steps: Annotated[int, typer.Option(help="Sampling steps when evaluating runs.")] = 10,
    guidance: float = DEFAULT_GUIDANCE_SCALE,
    proxy: Annotated[
        str | None,
        typer.Option(help="The reward to report beside gold (default: the runs' own reward, when shared)."),
    ] = None,
    seed: int = 0,
    device: str = "auto",
) -> None:
    """Build the paradigm report from existing runs: re-render a demo folder, or evaluate align run folders
    against their base model (same prompts and seeds) and report their recorded costs."""
    from diffalign.demo.from_runs import ReportRunsError, report_from_runs

    try:
        report = report_from_runs(
            runs, out, prompts_per_task=prompts_per_task, samples_per_prompt=samples_per_prompt, steps=steps,
            guidance=guidance, proxy=proxy, seed=seed, device=device, log=console.print,
        )  # fmt: skip
    except (ReportRunsError, FileNotFoundError, ValueError) as err:
        fail(str(err))
    console.print(f"[bold green]report:[/] {report}")


def register(app: typer.Typer) -> None:
    app.command("demo")(demo_cmd)
    app.command("report")(report_cmd)
