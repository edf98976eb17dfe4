"""The `diffalign` command line: parses arguments into configs and calls the library (no logic here)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from diffalign.cli.common import console, resolve_device
from diffalign.cli.common import fail as _fail
from diffalign.cli.common import load_model_arg as _load
from diffalign.guidance import DEFAULT_GUIDANCE_SCALE

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Align diffusion models with human preferences, measured on the built-in Shapes world.",
)
shapeseval_app = typer.Typer(no_args_is_help=True, help="The ShapesEval set and GenEval-style scoring.")
world_app = typer.Typer(
    no_args_is_help=True, help="The Shapes world: render prompts, generate training sets."
)
app.add_typer(shapeseval_app, name="shapeseval")
app.add_typer(world_app, name="world")


def _score_table(results: dict, title: str) -> Table:
    table = Table(title=title)
    from diffalign.evaluate.failure_modes import format_modes

    modes = results.get("failure_modes", {})
    for col in ("task", "accuracy", "95% CI", "images"):
        table.add_column(col, justify="right" if col != "task" else "left")
    table.add_column("failure modes (share of images)")
    for tag, cat in results["categories"].items():
        lo, hi = cat["ci95"]
        table.add_row(
            tag,
            f"{cat['accuracy']:.3f}",
            f"[{lo:.3f}, {hi:.3f}]",
            str(cat["images"]),
            format_modes(modes.get(tag, {}).get("modes", {})),
        )
    lo, hi = results["overall"]["ci95"]
    table.add_row(
        "[bold]overall[/]",
        f"[bold]{results['overall']['score']:.3f}[/]",
        f"[{lo:.3f}, {hi:.3f}]",
        str(results["n_images"]),
        "",
    )
    return table


# --- shapeseval ---------------------------------------------------------------------------------


@shapeseval_app.command("prompts")
def shapeseval_prompts(out: Annotated[Path, typer.Option(help="Where to write the metadata JSONL.")]) -> None:
    """Write the ShapesEval set (GenEval's metadata schema, one JSON object a line)."""
    from diffalign.world.shapeseval import load_shapeseval, to_jsonl

    lines = load_shapeseval()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(to_jsonl(lines), encoding="utf-8")
    console.print(f"wrote {len(lines)} prompts to {out}")


@shapeseval_app.command("score")
def shapeseval_score(
    folder: Annotated[
        Path, typer.Argument(help="GenEval layout: DIR/00000/metadata.jsonl, DIR/00000/samples/0000.png")
    ],
    out: Annotated[Path, typer.Option(help="Results JSON (per image, per task, overall).")] = Path(
        "results.json"
    ),
    size: Annotated[int, typer.Option(help="Resize images to size x size first (0 keeps their size).")] = 32,
    bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples for the 95% intervals.")] = 1000,
) -> None:
    """Score a folder of generated images against their metadata, as GenEval does."""
    from diffalign.evaluate.geneval_layout import LayoutError, score_folder

    try:
        results = score_folder(folder, size=size or None, n_boot=bootstrap)
    except (LayoutError, ValueError) as err:
        _fail(str(err))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1), encoding="utf-8")
    Console().print(_score_table(results, f"ShapesEval score of {folder}"))
    console.print(f"per-image results in {out}")


# --- world --------------------------------------------------------------------------------------


def _check_drawable(n: int, size: int) -> None:
    if n < 1:
        _fail(f"-n must be at least 1, got {n}")
    if size < 1:
        _fail(f"--size must be at least 1, got {size}")


@world_app.command("render")
def world_render(
    prompt: Annotated[str, typer.Option(help="A Shapes-world prompt, e.g. 'a circle left of a square'.")],
    out: Annotated[Path, typer.Option(help="PNG grid to write.")] = Path("scene.png"),
    n: Annotated[int, typer.Option("-n", help="Number of scenes.")] = 16,
    seed: int = 0,
    size: Annotated[int, typer.Option(help="Canvas size in pixels.")] = 32,
) -> None:
    """Render ground-truth scenes for a prompt (what a perfect model would draw)."""
    import torch

    from diffalign.evaluate.report import image_grid
    from diffalign.world.grammar import GrammarError, parse_prompt
    from diffalign.world.render import render_batch, to_uint8
    from diffalign.world.scene import sample_scenes, templates_from_metadata

    _check_drawable(n, size)
    if out.is_dir():
        _fail(f"--out {out}: a folder; give a file such as {out / 'scene.png'}")
    try:
        meta = parse_prompt(prompt)
    except GrammarError as err:
        _fail(str(err))
    out.parent.mkdir(parents=True, exist_ok=True)
    scenes = sample_scenes(
        templates_from_metadata([meta]),
        torch.zeros(n, dtype=torch.long),
        generator=torch.Generator().manual_seed(seed),
    )
    image_grid(to_uint8(render_batch(scenes, size))).save(out)
    console.print(f"wrote {n} scenes of {prompt!r} to {out}")


@world_app.command("generate")
def world_generate(
    out: Annotated[Path, typer.Option(help="Output folder (images.npy + examples.jsonl).")],
    n: Annotated[int, typer.Option("-n", help="Number of examples.")] = 100000,
    seed: int = 0,
    size: Annotated[int, typer.Option(help="Canvas size in pixels.")] = 32,
) -> None:
    """Generate a training set of (scene, prompt, image) examples."""
    import time

    from diffalign.world.dataset import DatasetConfig, write_dataset

    _check_drawable(n, size)
    start = time.time()
    try:
        write_dataset(out, n, seed=seed, config=DatasetConfig(canvas_size=size))
    except ValueError as err:
        _fail(str(err))
    elapsed = time.time() - start
    console.print(f"wrote {n} examples to {out} in {elapsed:.1f} s ({n / elapsed:.0f} examples/s)")


# --- models -------------------------------------------------------------------------------------


def _sampler_config(sampler: str | None, steps: int, guidance: float, eta: float, noise_level: float, model):
    from diffalign.diffusion.sampling import SamplerConfig

    name = sampler or ("flow_euler" if model.prediction_type == "flow" else "ddim")
    try:
        config = SamplerConfig(
            sampler=name, num_steps=steps, guidance_scale=guidance, eta=eta, noise_level=noise_level
        )
        config.check_prediction_type(model.prediction_type)
    except ValueError as err:
        _fail(str(err))
    return config


ModelOpt = Annotated[str, typer.Option(help="'base', 'base-flow', a model folder or a run folder.")]
PromptsOpt = Annotated[
    Path | None, typer.Option(help="A metadata JSONL in GenEval's schema instead of ShapesEval.")
]


def _metadata(path: Path | None):
    if path is None:
        return None
    from diffalign.world.grammar import GrammarError
    from diffalign.world.shapeseval import load_shapeseval

    try:
        lines = load_shapeseval(path)
    except (GrammarError, OSError) as err:
        _fail(str(err))
    if not lines:
        _fail(f"{path}: no prompts")
    return lines


SamplerOpt = Annotated[
    str | None, typer.Option(help="ddim | ddpm (epsilon models), flow_euler | flow_sde (flow models).")
]


@app.command("sample")
def sample_cmd(
    prompt: Annotated[str, typer.Option(help="The prompt.")],
    model: ModelOpt = "base",
    n: Annotated[int, typer.Option("-n", help="Number of images.")] = 16,
    sampler: SamplerOpt = None,
    steps: int = 20,
    guidance: float = DEFAULT_GUIDANCE_SCALE,
    eta: Annotated[float, typer.Option(help="DDIM eta (0 = deterministic).")] = 0.0,
    noise_level: Annotated[float, typer.Option(help="Flow SDE noise level a.")] = 0.7,
    seed: int = 0,
    out: Path = Path("grid.png"),
    device: str = "auto",
) -> None:
    """Draw images from a model into a PNG grid."""
    import torch

    from diffalign.diffusion.sampling import sample
    from diffalign.evaluate.report import image_grid
    from diffalign.models.tokenizer import UnknownWordError
    from diffalign.world.render import to_uint8

    if n < 1:
        _fail(f"-n must be at least 1, got {n}")
    m = _load(model, device)
    config = _sampler_config(sampler, steps, guidance, eta, noise_level, m)
    try:
        with torch.no_grad():
            traj = sample(m, [prompt] * n, config=config, seeds=[seed + i for i in range(n)])
    except (UnknownWordError, ValueError) as err:
        _fail(str(err))
    image_grid(to_uint8(traj.images)).save(out)
    console.print(f"wrote {n} samples of {prompt!r} to {out}")


@app.command("eval")
def eval_cmd(
    model: ModelOpt = "base",
    out: Annotated[Path, typer.Option(help="Folder for the GenEval-layout samples and results.json.")] = Path(
        "eval_out"
    ),
    samples_per_prompt: Annotated[
        int, typer.Option(help="Samples per ShapesEval prompt (GenEval uses 4).")
    ] = 4,
    sampler: SamplerOpt = None,
    steps: int = 20,
    guidance: float = DEFAULT_GUIDANCE_SCALE,
    eta: float = 0.0,
    noise_level: float = 0.7,
    batch_size: int = 100,
    seed: int = 0,
    prompts: PromptsOpt = None,
    device: str = "auto",
    steer: Annotated[
        str | None, typer.Option(help="Steer the sampler: bon, search, guidance, fk, svdd or dno.")
    ] = None,
    steer_reward: Annotated[str | None, typer.Option(help="The reward --steer steers by.")] = None,
    budget_nfe: Annotated[int | None, typer.Option(help="--steer's denoiser calls per image.")] = None,
    steer_set: Annotated[list[str] | None, typer.Option(help="A --steer option key=value.")] = None,
    suite: Annotated[
        bool, typer.Option(help="Also diversity and FID/KID against rendered scenes (the metric suite).")
    ] = False,
    reward: Annotated[
        list[str] | None, typer.Option(help="A reward whose mean (with a CI) to report; repeatable.")
    ] = None,
    baseline: Annotated[
        str | None, typer.Option(help="A model to report the win rate against (same prompts and seeds).")
    ] = None,
    judge: Annotated[
        str, typer.Option(help="The win-rate judge: panel (gold raters), panel:GROUP, or a reward spec.")
    ] = "panel",
    kl_base: Annotated[
        str | None, typer.Option(help="Report the KL to this model from trajectories (needs --eta > 0).")
    ] = None,
    panel: Annotated[
        Path | None,
        typer.Option(
            help="The raters of --judge panel[:GROUP]: a panel file (diffalign.panels), not the default."
        ),
    ] = None,
) -> None:
    """Sample ShapesEval with a model, in GenEval's layout, and score it; with --suite, --reward,
    --baseline or --kl-base, also the metric suite (diversity, FID/KID, rewards, win rate, KL)."""
    from rich.progress import Progress

    from diffalign.evaluate.shapeseval_run import evaluate_on_shapeseval

    m = _load(model, device)
    config = _sampler_config(sampler, steps, guidance, eta, noise_level, m)
    metadata = _metadata(prompts)
    # the suite's rewards and models are loaded before sampling, so a bad one fails at once
    measures = _suite_measures(device, reward, baseline, judge, kl_base, panel)
    _check_prompts_encode(m, metadata, prompts)
    from diffalign.cli.steer import eval_sample_fn

    sample_fn = eval_sample_fn(steer, steer_reward, budget_nfe, steer_set, config, seed, device)
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("sampling", total=1)
        results = evaluate_on_shapeseval(
            m,
            out,
            config,
            samples_per_prompt,
            batch_size,
            seed,
            metadata=metadata,
            on_batch=lambda done, total: progress.update(task, completed=done, total=total),
            sample_fn=sample_fn,
        )
    steered = f", steered by {steer} on {steer_reward}" if steer else ""
    Console().print(
        _score_table(
            results, f"ShapesEval: {model} ({config.sampler}, {steps} steps, guidance {guidance}{steered})"
        )
    )
    if suite or reward or baseline or kl_base:
        results["suite"] = _run_suite(
            m, metadata, samples_per_prompt, config, seed, batch_size, suite, measures
        )
        (Path(out) / "results.json").write_text(json.dumps(results, indent=1))
        Console().print(_suite_table(results["suite"], model))
    console.print(f"samples and results.json in {out}")


def _check_prompts_encode(m, metadata, prompts_file) -> None:
    """Tokenise every distinct prompt before sampling: a word the model's tokenizer does not know (a
    GenEval "a photo of ..." for a Shapes-world model) is named with its line, not met mid-sampling."""
    from diffalign.models.tokenizer import first_unreadable
    from diffalign.world.shapeseval import load_shapeseval

    lines = metadata if metadata is not None else load_shapeseval()
    found = first_unreadable(m, [line["prompt"] for line in lines])
    if found is not None:
        index, prompt, err = found
        number = index + 1
        where = f"--prompts {prompts_file}, prompt {number}" if prompts_file else f"prompt {number}"
        _fail(f"{where} ({prompt!r}): {err}")


def _suite_measures(device, rewards, baseline, judge, kl_base, panel_file=None) -> dict:
    """The metric suite's rewards, win-rate judge, baseline and KL base, loaded (bad ones fail here)."""
    from diffalign.align.config_io import ConfigError
    from diffalign.panels import load_panel
    from diffalign.rewards.registry import RewardSpecError, load_reward

    device = resolve_device(device)  # rewards and models load on a real device, never "auto"
    judge_reward, group = None, None
    is_panel = judge == "panel" or judge.startswith("panel:")
    if panel_file is not None and not is_panel:
        _fail(f"--panel {panel_file}: it sets the raters of --judge panel[:GROUP], not of --judge {judge}")
    try:
        if is_panel:
            group = judge.partition(":")[2] or None
            judge_reward = load_panel(panel_file) if panel_file is not None else None
            raters = judge_reward.groups if judge_reward is not None else load_panel(None).groups
            if group is not None and group not in raters:
                where = f"the panel of {panel_file}" if panel_file is not None else "the default panel"
                _fail(f"--judge {judge}: {where} has no group {group!r}; its groups: {', '.join(raters)}")
        else:
            judge_reward = load_reward(judge, device=device)
        named = {spec: load_reward(spec, device=device) for spec in (rewards or [])}
    except ConfigError as err:
        _fail(f"--panel: {err}")
    except (RewardSpecError, ImportError, OSError, ValueError) as err:
        _fail(f"--reward/--judge: {err}")
    return {
        "rewards": named,
        "judge": judge_reward,
        "judge_group": group,
        "baseline": _load(baseline, device) if baseline else None,
        "base": _load(kl_base, device) if kl_base else None,
    }


def _run_suite(m, metadata, per_prompt, config, seed, batch_size, suite, measures: dict):
    """`evaluate_suite` on the eval's prompts (one sample per prompt and seed, as ShapesEval draws them)."""
    from diffalign.evaluate.suite import evaluate_suite
    from diffalign.world.shapeseval import load_shapeseval

    lines = metadata if metadata is not None else load_shapeseval()
    prompts = [line["prompt"] for line in lines for _ in range(per_prompt)]
    try:
        return evaluate_suite(
            m,
            prompts,
            config,
            seeds=[seed + i for i in range(len(prompts))],
            diversity=suite,
            fid=suite,
            batch_size=batch_size,
            seed=seed,
            **measures,
        )
    except ValueError as err:
        _fail(str(err))


def _suite_table(results: dict, model: str) -> Table:
    table = Table(title=f"metric suite: {model}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, summary in results.get("rewards", {}).items():
        lo, hi = summary["ci95"]
        table.add_row(f"reward {name}", f"{summary['mean']:.4f} [{lo:.4f}, {hi:.4f}]")
    for key, value in _flat_numbers(results, ("rewards",)):
        table.add_row(key, f"{value:.4f}")
    return table


def _flat_numbers(tree: dict, skip: tuple[str, ...] = (), prefix: str = ""):
    """(dotted key, number) for every number in a nested result dict, lists of two as intervals skipped."""
    for key, value in tree.items():
        if key in skip:
            continue
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _flat_numbers(value, (), f"{name}.")
        elif isinstance(value, int | float) and not isinstance(value, bool):
            yield name, float(value)


@app.command("pretrain")
def pretrain_cmd(
    out: Annotated[Path, typer.Option(help="Run folder (checkpoints, metrics.jsonl, model/).")],
    parameterization: Annotated[str, typer.Option(help="epsilon or flow.")] = "epsilon",
    architecture: Annotated[str, typer.Option(help="unet-xs, unet-s or unet-m.")] = "unet-s",
    steps: int = 20000,
    batch_size: int = 128,
    lr: float = 5e-4,
    lr_schedule: Annotated[str, typer.Option(help="cosine or constant.")] = "cosine",
    warmup_steps: int = 500,
    ema_decay: float = 0.999,
    seed: int = 0,
    device: str = "auto",
    checkpoint_every: int = 1000,
    snapshot: Annotated[
        list[int] | None, typer.Option(help="Also write the EMA model at these steps.")
    ] = None,
    time_limit: Annotated[
        float | None, typer.Option(help="Stop after this many seconds (with a checkpoint).")
    ] = None,
    data_pool: Annotated[
        int, typer.Option(help="Pre-render this many examples and draw batches from them (GPU).")
    ] = 0,
    bf16: Annotated[bool, typer.Option(help="bfloat16 autocast on CUDA.")] = True,
    resume: Annotated[bool, typer.Option(help="Continue from the latest checkpoint in --out.")] = False,
) -> None:
    """Train a tiny Shapes-world base model on generated scenes (resumable)."""
    from diffalign.models.pretrain import NonFiniteLossError, PretrainConfig, pretrain

    config = PretrainConfig(
        parameterization=parameterization,
        architecture=architecture,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        lr_schedule=lr_schedule,
        warmup_steps=warmup_steps,
        ema_decay=ema_decay,
        seed=seed,
        device=device,
        checkpoint_every=checkpoint_every,
        snapshot_steps=list(snapshot or []),
        data_pool=data_pool,
        bf16=bf16,
    )
    if parameterization not in ("epsilon", "flow"):
        _fail(f"--parameterization must be epsilon or flow, got {parameterization!r}")

    def log(record: dict) -> None:
        console.print(
            f"step {record['step']:>7}  loss {record['loss']:.4f}  lr {record['lr']:.2e}  "
            f"{record['images_per_s']:.0f} img/s  {record['elapsed_s']:.0f} s"
        )

    try:
        pretrain(config, out, resume=resume, on_log=log, time_limit=time_limit)
    except (NonFiniteLossError, FileNotFoundError, ValueError) as err:
        _fail(str(err))
    console.print(f"model written to {out / 'model'}")


def _register_subcommands() -> None:
    # align_backprop, align_pg and overopt register their commands when imported.
    from diffalign.cli import (
        align,
        align_backprop,
        align_pg,
        collect,
        demo,
        overopt,
        plan,
        prefs,
        reward,
        steer,
    )

    del align_backprop, align_pg, overopt
    demo.register(app)
    plan.register(app)
    app.add_typer(prefs.app, name="prefs")
    app.add_typer(reward.app, name="reward")
    app.add_typer(align.app, name="align")
    app.add_typer(steer.app, name="steer")
    app.add_typer(collect.app, name="collect")


_register_subcommands()


def _leave_process_group() -> None:
    """Destroy torch.distributed's default group if a command started one (`accelerate launch`): gloo's
    threads still alive at interpreter exit can abort the process ("terminate called without an active
    exception") after a run that otherwise succeeded."""
    distributed = sys.modules.get("torch.distributed")  # never import torch just to leave
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        distributed.destroy_process_group()


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        console.print("interrupted")
        sys.exit(130)
    finally:
        _leave_process_group()


if __name__ == "__main__":
    main()
