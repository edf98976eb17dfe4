"""`diffalign overopt RUN_DIR`: gold and proxy reward against sqrt(KL to base) over a run's checkpoints."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from diffalign.cli import app
from diffalign.cli.common import console, fail, resolve_device
from diffalign.guidance import DEFAULT_GUIDANCE_SCALE


@app.command("overopt")
def overopt_cmd(
    run_dir: Annotated[Path, typer.Argument(help="A trainer's run folder (config.json + checkpoints/).")],
    gold: Annotated[str, typer.Option(help="The gold reward (e.g. gold-panel, shapes:faithfulness).")],
    proxy: Annotated[str, typer.Option(help="The proxy reward the run optimised (a reward spec).")],
    ensemble: Annotated[
        Path | None,
        typer.Option(help="A reward-ensemble folder: adds its uncertainty-penalised reward (mean - k std)."),
    ] = None,
    k: Annotated[float, typer.Option(help="The ensemble's uncertainty penalty k.")] = 1.0,
    also: Annotated[
        list[str] | None,
        typer.Option(
            help="Another reward to record on the same samples (repeatable; e.g. shapes:faithfulness "
            "beside --gold gold-utility); reported, not fitted."
        ),
    ] = None,
    form: Annotated[str, typer.Option(help="Gao et al.'s form to fit: rl (d(a - b log d)) or bon.")] = "rl",
    num_prompts: Annotated[int, typer.Option(help="Samples per checkpoint (Shapes-world prompts).")] = 64,
    prompts_file: Annotated[
        Path | None,
        typer.Option(help="Prompts from a file (PartiPrompts/DrawBench/HPSv2/GenEval .jsonl/one per line)."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seeds the prompt draw and the samples.")] = 0,
    steps: Annotated[int, typer.Option(help="Sampling steps.")] = 20,
    eta: Annotated[float, typer.Option(help="DDIM eta (> 0: KL needs a stochastic sampler).")] = 1.0,
    noise_level: Annotated[float, typer.Option(help="Flow SDE noise level (flow models).")] = 0.7,
    guidance: Annotated[
        float | None,
        typer.Option(
            help="Classifier-free guidance weight of the judged samples (default: the run's own "
            f"guidance_scale, else {DEFAULT_GUIDANCE_SCALE:g} as in `diffalign eval`; 1 samples unguided)."
        ),
    ] = None,
    max_checkpoints: Annotated[int | None, typer.Option(help="Use at most this many checkpoints.")] = None,
    checkpoint_steps: Annotated[
        list[int] | None,
        typer.Option(
            "--checkpoint",
            help="Measure only the checkpoint of this optimiser step (repeatable; e.g. the best one "
            "judged again on other prompts).",
        ),
    ] = None,
    batch_size: int = 64,
    base_from: Annotated[
        Path | None,
        typer.Option(
            help="An earlier overopt.json of the same base model: reuse its base point instead of sampling "
            "the base again (refused unless its reference model, prompts, seeds, sampler and rewards, "
            "files included, are this call's)."
        ),
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Output folder (default RUN_DIR/overopt).")] = None,
    device: str = "auto",
) -> None:
    """Fit Gao et al. (2022)'s over-optimisation curves to a run and report where to stop."""
    from diffalign.align.run_checkpoints import run_base
    from diffalign.diffusion.sampling import SamplerConfig
    from diffalign.evaluate.overopt import (
        FORMS,
        analyse,
        checkpoint_points,
        measurement_record,
        reused_base_point,
        write_report,
    )
    from diffalign.evaluate.prompt_sets import PromptSetError, read_prompt_set, world_prompts
    from diffalign.models.registry import load_model
    from diffalign.rewards.registry import RewardSpecError, load_reward

    if form not in FORMS:
        fail(f"--form must be one of {FORMS}, got {form!r}")
    if num_prompts < 2:
        fail(f"--num-prompts must be >= 2, got {num_prompts}")
    dev = resolve_device(device)
    try:
        info = run_base(run_dir)
        # specs: each reward's name in the report -> what it was loaded from (the measurement record)
        specs = {"proxy": proxy, "gold": gold}
        rewards = {"proxy": load_reward(proxy, device=dev), "gold": load_reward(gold, device=dev)}
        if ensemble is not None:
            from diffalign.rewards.ensemble import RewardEnsemble, UncertaintyPenalisedReward

            rewards["penalised"] = UncertaintyPenalisedReward(RewardEnsemble.load(ensemble, dev), k)
            specs["penalised"] = f"penalised(k={k:g}):{ensemble}"
        for spec in also or []:
            if spec in rewards or spec in ("proxy", "gold", "penalised"):
                fail(f"--also {spec!r} is given twice or names a reward the analysis already has")
            rewards[spec] = load_reward(spec, device=dev)
            specs[spec] = spec
        prompts = read_prompt_set(prompts_file).prompts if prompts_file else world_prompts(num_prompts, seed)
        reference = load_model(info["reference"], device=dev)  # loaded once: measured as step 0
    except (FileNotFoundError, ValueError, RewardSpecError, PromptSetError) as err:
        fail(str(err))
    if guidance is None:
        guidance = DEFAULT_GUIDANCE_SCALE if info["guidance_scale"] is None else info["guidance_scale"]
    try:
        config = SamplerConfig.for_prediction_type(
            reference.prediction_type,
            num_steps=steps,
            eta=eta,
            noise_level=noise_level,
            guidance_scale=guidance,
        )
    except ValueError as err:
        fail(str(err))
    console.print(
        f"judging with {config.sampler}, {config.num_steps} steps, guidance {config.guidance_scale:g}"
        + (f", eta {config.eta:g}" if config.sampler == "ddim" else "")
    )
    seeds = [seed * 1_000_003 + i for i in range(len(prompts))]
    measurement = measurement_record(info["reference"], prompts, seeds, config, specs, str(dev))
    base_point = None
    if base_from is not None:
        try:
            earlier = json.loads(base_from.read_text(encoding="utf-8"))
            base_point = reused_base_point(earlier, measurement, str(base_from))
        except (OSError, json.JSONDecodeError, ValueError) as err:
            fail(f"--base-from: {err}")
        console.print(f"base point (step 0) taken from {base_from}")

    def show(point) -> None:
        console.print(
            f"step {point.step}: KL {point.kl:.3f} +- {point.kl_stderr:.3f}, proxy {point.proxy:.4f}, "
            f"gold {point.gold:.4f}"
            + ("" if point.penalised is None else f", penalised {point.penalised:.4f}")
            + "".join(f", {name} {value:.4f}" for name, value in point.extra.items())
        )

    try:
        points = checkpoint_points(
            run_dir,
            rewards,
            prompts,
            config,
            seeds,
            batch_size,
            dev,
            max_checkpoints,
            show,
            base_point,
            checkpoint_steps or None,
            base=reference,
        )
        report = analyse(points, form)
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        fail(str(err))
    report["run_dir"] = str(run_dir)
    report["measurement"] = measurement
    report["rewards"] = {
        "gold": gold,
        "proxy": proxy,
        "ensemble": None if ensemble is None else str(ensemble),
        "k": k,
        "also": list(also or []),
    }
    json_path, png_path = write_report(report, out or Path(run_dir) / "overopt")
    peak = report["fitted_peak"]
    change = report["gold_peak"]["vs_base"]
    console.print(
        f"gold peaks at step {report['stop_step']} (gold {report['gold_peak']['gold']:.4f}"
        + (
            ""
            if change is None
            else ", {:+.4f} [{:+.4f}, {:+.4f}] against the base on the same samples".format(
                change["mean"], *change["ci95"]
            )
        )
        + "); "
        + (
            report["fit_note"]
            if "fit_note" in report
            else "fitted d* = " + ("none (no peak in the fit)" if peak is None else f"{peak['d']:.3f}")
        )
    )
    console.print(f"wrote {json_path} and {png_path}")
