"""`diffalign align ...` commands: fine-tune a model on preferences (Diffusion-DPO, Diffusion-KTO, online DPO,
SPIN-Diffusion)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

from diffalign.cli.common import console, fail

app = typer.Typer(
    no_args_is_help=True,
    help="Align a model with preferences: fine-tuning methods writing a resumable run folder.",
)

StoreOpt = Annotated[str, typer.Option(help="The preference store (SQLite file or database URL).")]
OutOpt = Annotated[
    Path, typer.Option(help="The run folder (config.json, metrics.jsonl, checkpoints/, model/).")
]
ModelOpt = Annotated[
    str | None, typer.Option(help="base, base-flow, or a model / run folder (default: the config's model).")
]
ConfigOpt = Annotated[Path | None, typer.Option("--config", help="A YAML file of config fields.")]
OverridesArg = Annotated[
    list[str] | None, typer.Argument(help="Config overrides key=value (e.g. beta=2000 runtime.seed=1).")
]
ResumeOpt = Annotated[bool, typer.Option(help="Continue the run in --out from its latest checkpoint.")]
ExtendOpt = Annotated[
    bool,
    typer.Option(
        help="Resume the run in --out with a larger epochs= / steps= than it was started with (a finished "
        "run continues from its last checkpoint; its model/ is kept as model-step-N/)."
    ),
]
DeviceOpt = Annotated[str | None, typer.Option(help="cpu, cuda or auto (default: the config's).")]
SourceOpt = Annotated[str | None, typer.Option(help="Only the store's comparisons from this source.")]
StreamOpt = Annotated[
    bool,
    typer.Option(
        help="Read each batch's images from the store when it is drawn instead of loading every image "
        "first (for preference sets larger than memory)."
    ),
]


def load_command_config(
    cls, config_file: Path | None, overrides: list[str] | None, options: dict, method: str | None = None
):
    """The config `cls` from the YAML file, the key=value overrides, then the command's options
    ({dotted key: value}, taken as given, not parsed as YAML; None values are left out) and the
    command's `method` (a file or override naming another method is refused): a bad key or value exits
    with its message."""
    from diffalign.align.config_io import ConfigError, load_config

    fixed = {"method": method} if method is not None else None
    try:
        return load_config(cls, config_file, overrides or [], options, fixed)
    except ConfigError as err:
        fail(str(err))


def _run(
    method: str,
    store: str | None,
    out: Path,
    model: str | None,
    config_file: Path | None,
    overrides: list[str] | None,
    resume: bool,
    device: str | None,
    source: str | None,
    stream: bool = False,
    extend: bool = False,
    ratings: Path | None = None,
) -> None:
    from diffalign.align.dpo import DPOConfig, PreferenceDataError, train_dpo
    from diffalign.align.guard import NonFiniteError
    from diffalign.align.run_dir import RunDirError
    from diffalign.models.registry import UnsupportedModelError, model_image_size
    from diffalign.prefs.store import StoreError

    config = load_command_config(
        DPOConfig, config_file, overrides, {"model": model, "runtime.device": device}, method
    )
    try:
        size = model_image_size(config.model, config.pipeline)
    except (FileNotFoundError, UnsupportedModelError, ValueError) as err:
        fail(str(err))
    data_spec: dict = {}
    if store is not None:
        pairs, data_spec = _read_store(method, store, size, config, out, source, stream)
    if ratings is not None:
        rated = _read_ratings(ratings, size, config, out)
        if store is not None:  # KTO on both: the store's pairs taken apart, then the rated images
            from diffalign.prefs.ratings import ImageRatings

            rated = ImageRatings.concat([ImageRatings.from_pairs(pairs), rated])
            console.print(f"kto: {len(rated)} images in all, {rated.counts[0]} liked")
        pairs, data_spec = rated, {**data_spec, "ratings": str(ratings)}
    try:
        with measured(out, config.runtime.device), discard_unstarted_run(out):
            train_dpo(
                config, pairs, out, resume=resume, data_spec=data_spec, show_progress=True, extend=extend
            )
    except (PreferenceDataError, RunDirError, NonFiniteError, StoreError, ValueError) as err:
        fail(f"{err}")
    from diffalign.align.tracking import read_metrics

    metrics_path = out / "metrics.jsonl"
    if metrics_path.is_file():
        lines = read_metrics(metrics_path)
        if lines:
            last = lines[-1]
            acc = last.get("implicit_acc")
            shown = f", implicit accuracy {acc:.3f}" if acc is not None else ""
            console.print(f"step {last['step']}: loss {last['loss']:.4f}{shown}")
    report_run_end(out)


def _read_ratings(path: Path, size: int, config, out: Path):
    """Unpaired like/dislike feedback for KTO (`diffalign.prefs.ratings`), with its balance printed."""
    from diffalign.prefs.ratings import RatingsError, read_ratings

    try:
        ratings = read_ratings(path, size)
    except RatingsError as err:
        fail(f"--ratings: {err}")
    liked, disliked = ratings.counts
    weighted = config.kto_lambda_desirable * liked
    balance = weighted / (config.kto_lambda_undesirable * disliked) if disliked else float("inf")
    console.print(
        f"kto: {liked} liked and {disliked} disliked images from {path}; lambda_D n_D / lambda_U n_U = "
        f"{balance:.2f} (KTO's authors advise 1 to 4/3: set kto_lambda_desirable / kto_lambda_undesirable "
        f"to bring it there); run folder {out}"
    )
    return ratings


def _read_store(method: str, store: str, size: int, config, out: Path, source: str | None, stream: bool):
    """The store's pairs (in memory, or read as batches need them) and the data spec of the run."""
    from diffalign.prefs.store import PreferenceStore, StoreError

    if "://" not in store and not Path(store).is_file():
        fail(f"--store {store}: no such preference store (create one with `diffalign prefs import|simulate`)")
    try:
        opened = PreferenceStore.open(store, create=False)
        if stream:
            pairs = opened.pair_references(size=size, include_ties=True, source=source)
        else:
            pairs = opened.pairs(size=size, include_ties=True, source=source)
    except StoreError as err:
        fail(f"--store {store}: {err}")
    read = "read as batches need them" if stream else "in memory"
    ties = int(pairs.is_tie.sum())
    what = "trained at 1/2 (soft_labels)" if config.soft_labels else "left out"
    console.print(
        f"{method}: {len(pairs) - ties} pairs with a winner from {store} ({read}; {ties} ties {what}); "
        f"run folder {out}"
    )
    return pairs, {"store": str(store), "source": source, "stream": stream}


@contextmanager
def measured(out: Path, device: str):
    """Measure the training call inside (NFEs, wall time, peak memory; `diffalign.evaluate.costs`) and
    add it to `out/costs.json` once the run folder exists, also when the run stops early.

    Under `accelerate launch` / torchrun every process runs this command and writes its own
    measurement: the main one (`RANK` 0) `costs.json`, recording the number of processes
    (`WORLD_SIZE`), each other one `costs-rank-RANK.json`; `evaluate.costs.read_run_costs` adds the
    processes' counts up."""
    import os

    from diffalign.devices import resolve_device
    from diffalign.evaluate.costs import CostMeter, add_run_costs, denoiser_types

    meter = CostMeter(denoiser_types(), resolve_device(device))
    try:
        with meter:
            yield
    finally:
        if (out / "config.json").is_file():
            processes = int(os.environ.get("WORLD_SIZE", "1"))
            rank = int(os.environ.get("RANK", "0"))
            add_run_costs(out, meter.cost, rewards_counted=False, processes=processes, rank=rank)


@contextmanager
def discard_unstarted_run(out: Path):
    """Remove the run folder `out` when the training call inside fails with a bad-input error
    (ValueError, FileNotFoundError: a config that cannot run, found only once the run had begun) or a
    NaN/inf before its first checkpoint (NonFiniteError), and the folder is one this call created that
    holds no checkpoint, metrics line or model yet: such a folder could neither be resumed nor reused (a
    fresh run refuses a folder holding a run). Only the main process (`RANK` 0) removes it; a folder
    that existed before is always kept."""
    import os
    import shutil

    from diffalign.align.guard import NonFiniteError
    from diffalign.align.run_dir import RunDir

    existed = out.exists()
    try:
        yield
    except (ValueError, FileNotFoundError, NonFiniteError):
        run = RunDir(out)
        metrics = run.metrics_path.is_file() and run.metrics_path.stat().st_size > 0
        written = run.latest_checkpoint() is not None or metrics or run.model_dir.exists()
        if not existed and out.is_dir() and not written and os.environ.get("RANK", "0") == "0":
            shutil.rmtree(out, ignore_errors=True)
            console.print(f"removed the run folder {out} that this command had begun (nothing trained yet)")
        raise


def reward_trainer_config(cls, method: str, overrides, model, reward, prompts, config_file, device):
    """The config of a reward trainer (RL, reward backprop) from its command's options."""
    options = {"model": model, "reward": reward, "prompts": prompts, "runtime.device": device}
    return load_command_config(cls, config_file, overrides, options, method)


def run_reward_trainer(
    out: Path,
    device: str,
    train: Callable[[], None],
    summary: Callable[[dict], str],
    reward_errors: tuple[type[Exception], ...] = (),
) -> None:
    """Run a reward trainer's `train()` measured (`costs.json`), turn bad input into a clear exit, then
    print `summary(last metrics line)` and where the model is. `reward_errors` are reported as
    --reward's fault."""
    from diffalign.align.guard import NonFiniteError
    from diffalign.align.prompts import PromptSourceError
    from diffalign.align.run_dir import RunDirError
    from diffalign.align.tracking import read_metrics
    from diffalign.models.registry import UnsupportedModelError
    from diffalign.rewards.registry import RewardSpecError

    try:
        with measured(out, device), discard_unstarted_run(out):
            train()
    except reward_errors as err:
        fail(f"--reward: {err}")
    except (FileNotFoundError, UnsupportedModelError, RewardSpecError, PromptSourceError) as err:
        fail(str(err))
    except ImportError as err:  # a `module:function` reward whose module cannot be imported
        fail(f"--reward: {err}")
    except (RunDirError, NonFiniteError, ValueError) as err:
        fail(str(err))
    lines = read_metrics(out / "metrics.jsonl") if (out / "metrics.jsonl").is_file() else []
    if lines:
        console.print(summary(lines[-1]))
    report_run_end(out)


def report_run_end(out: Path) -> None:
    """Say where the finished model is, or how to resume a stopped run."""
    if (out / "model").is_dir():
        console.print(f"[bold green]run folder:[/] {out} (model: {out / 'model'}; use --model {out})")
    else:
        console.print(f"[bold]stopped:[/] resume with --resume --out {out}")


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


def register_reward_trainer(method: str, summary: str, run) -> None:
    """Register `diffalign align METHOD` for a trainer against a reward (RL, reward backprop), which
    all take the same options; `run(method, out, overrides, model, reward, prompts, config, resume,
    device, extend=extend)` does the work."""

    def command(
        out: OutOpt,
        overrides: OverridesArg = None,
        model: ModelOpt = None,
        reward: RewardOpt = None,
        prompts: PromptsOpt = None,
        config: ConfigOpt = None,
        resume: ResumeOpt = False,
        extend: ExtendOpt = False,
        device: DeviceOpt = None,
    ) -> None:
        run(method, out, overrides, model, reward, prompts, config, resume, device, extend=extend)

    command.__doc__ = summary
    app.command(method)(command)


@app.command("dpo")
def dpo_cmd(
    store: StoreOpt,
    out: OutOpt,
    overrides: OverridesArg = None,
    model: ModelOpt = None,
    config: ConfigOpt = None,
    resume: ResumeOpt = False,
    extend: ExtendOpt = False,
    device: DeviceOpt = None,
    source: SourceOpt = None,
    stream: StreamOpt = False,
) -> None:
    """Diffusion-DPO (Wallace et al. 2023) on the store's pairs (ties left out unless soft_labels=true)."""
    _run("dpo", store, out, model, config, overrides, resume, device, source, stream, extend)


@app.command("kto")
def kto_cmd(
    out: OutOpt,
    store: Annotated[
        str | None, typer.Option(help="A preference store (SQLite file or database URL): its pairs.")
    ] = None,
    ratings: Annotated[
        Path | None,
        typer.Option(
            help="Unpaired feedback, beside or instead of --store: a .jsonl or .csv file of rated images "
            "(prompt, image, liked)."
        ),
    ] = None,
    overrides: OverridesArg = None,
    model: ModelOpt = None,
    config: ConfigOpt = None,
    resume: ResumeOpt = False,
    extend: ExtendOpt = False,
    device: DeviceOpt = None,
    source: SourceOpt = None,
    stream: StreamOpt = False,
) -> None:
    """Diffusion-KTO (Li et al. 2024): single images liked or disliked: the store's winners as liked and
    losers as disliked, the images of --ratings (unpaired feedback) as rated, or both together."""
    if store is None and ratings is None:
        fail("give a source of feedback: --store PREFS (pairs), --ratings FILE (rated images), or both")
    if ratings is not None and stream:
        fail("--stream reads a store's images as batches need them; with --ratings every image is held")
    if store is None and source is not None:
        fail("--source selects a store's comparisons: it needs --store")
    _run("kto", store, out, model, config, overrides, resume, device, source, stream, extend, ratings)


LabellerOpt = Annotated[
    str | None,
    typer.Option(
        help="Who labels the pairs: 'panel' (simulated raters), 'panel:GROUP' (one group's raters), "
        "'panel@PANEL.yaml' (a panel file's raters) or a reward spec (default: the config's)."
    ),
]


def _print_round(line: dict) -> None:
    final = line.get("final", {})
    acc = final.get("implicit_acc")
    console.print(
        f"round {line['round']}: {line.get('train_pairs', line.get('examples'))} pairs, "
        + (f"implicit accuracy {acc:.3f}" if acc is not None else "trained")
    )


def _finish_rounds(train, out: Path, device: str) -> None:
    from diffalign.align.dpo import PreferenceDataError
    from diffalign.align.guard import NonFiniteError
    from diffalign.align.run_dir import RunDirError
    from diffalign.prefs.store import StoreError
    from diffalign.rewards.registry import RewardSpecError

    try:
        with measured(out, device), discard_unstarted_run(out):
            train()
    except (PreferenceDataError, RunDirError, NonFiniteError, StoreError, RewardSpecError, ValueError) as err:
        fail(f"{err}")
    except FileNotFoundError as err:
        fail(str(err))
    console.print(f"[bold green]run folder:[/] {out} (model: {out / 'model'}; use --model {out})")


@app.command("online-dpo")
def online_dpo_cmd(
    out: OutOpt,
    overrides: OverridesArg = None,
    model: ModelOpt = None,
    labeller: LabellerOpt = None,
    config: ConfigOpt = None,
    resume: ResumeOpt = False,
    device: DeviceOpt = None,
) -> None:
    """Online Diffusion-DPO: rounds of sampling pairs from the current model, labelling them, training.

    Overrides are OnlineDPOConfig fields (rounds=4 pairs_per_round=500 reference_every=1) and the
    per-round DPO config under dpo. (dpo.steps=100 dpo.beta=2000)."""
    from diffalign.align.online_dpo import OnlineDPOConfig, train_online_dpo

    cfg = load_command_config(
        OnlineDPOConfig,
        config,
        overrides,
        {"dpo.model": model, "dpo.runtime.device": device, "labeller": labeller},
    )
    console.print(
        f"online DPO: {cfg.rounds} rounds x {cfg.pairs_per_round} pairs labelled by {cfg.labeller}; "
        f"run folder {out}"
    )
    _finish_rounds(
        lambda: train_online_dpo(cfg, out, resume=resume, show_progress=True, on_round=_print_round),
        out,
        cfg.dpo.runtime.device,
    )


@app.command("spin")
def spin_cmd(
    out: OutOpt,
    overrides: OverridesArg = None,
    store: Annotated[
        str | None, typer.Option(help="Real images: the preferred images of this store's pairs.")
    ] = None,
    world: Annotated[
        int, typer.Option(help="Real images: this many scenes rendered by the Shapes world instead.")
    ] = 0,
    limit: Annotated[
        int, typer.Option(help="Use at most this many real examples from --store (0: all).")
    ] = 0,
    source: SourceOpt = None,
    model: ModelOpt = None,
    config: ConfigOpt = None,
    resume: ResumeOpt = False,
    device: DeviceOpt = None,
) -> None:
    """Self-play fine-tuning (SPIN-Diffusion): real images against the model's own, no reward model.

    Overrides are SPINConfig fields (rounds=3) and the per-round DPO config under dpo. (dpo.steps=100)."""
    from diffalign.align.spin import SPINConfig, real_from_pairs, real_from_world, train_spin
    from diffalign.models.registry import UnsupportedModelError, model_image_size
    from diffalign.prefs.store import PreferenceStore, StoreError

    if (store is None) == (world == 0):
        fail("give exactly one source of real images: --store PREFS or --world N")
    cfg = load_command_config(
        SPINConfig, config, overrides, {"dpo.model": model, "dpo.runtime.device": device}
    )
    try:
        size = model_image_size(cfg.dpo.model, cfg.dpo.pipeline)
    except (FileNotFoundError, UnsupportedModelError, ValueError) as err:
        fail(str(err))
    if store is not None:
        if "://" not in store and not Path(store).is_file():
            fail(f"--store {store}: no such preference store")
        try:
            # only the chosen real images are read (`real_from_pairs` on stored pairs)
            pairs = PreferenceStore.open(store, create=False).pair_references(
                size=size, include_ties=False, source=source
            )
        except StoreError as err:
            fail(f"--store {store}: {err}")
        make_real = lambda: real_from_pairs(pairs, limit, source=f"store:{store}")  # noqa: E731
    else:
        make_real = lambda: real_from_world(world, size, seed=cfg.dpo.runtime.seed)  # noqa: E731
    console.print(f"SPIN: {cfg.rounds} rounds; run folder {out}")
    _finish_rounds(
        lambda: train_spin(cfg, make_real(), out, resume=resume, show_progress=True, on_round=_print_round),
        out,
        cfg.dpo.runtime.device,
    )
