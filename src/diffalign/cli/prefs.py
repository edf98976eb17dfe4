"""`diffalign prefs ...` commands."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from diffalign.cli.common import console, fail
from diffalign.guidance import DEFAULT_GUIDANCE_SCALE

app = typer.Typer(
    no_args_is_help=True,
    help="Preference data: import, export, statistics, and a simulated rater panel.",
)

StoreOpt = Annotated[
    str, typer.Option("--store", help="The preference store: a SQLite file (prefs.db) or a SQLAlchemy URL.")
]
StoreImagesOpt = Annotated[
    Path | None,
    typer.Option(
        help="The store's image folder (default: <store>.images beside a SQLite file; a URL needs it)."
    ),
]
SourceOpt = Annotated[str | None, typer.Option(help="Only comparisons from this source.")]
_SHOW_REASONS = 5


def _open_store(location: str, images_dir: Path | None, create: bool):
    from diffalign.prefs.store import PreferenceStore, StoreError

    try:
        return PreferenceStore.open(location, images_dir, create=create)
    except StoreError as err:
        fail(str(err))


def _format_names(table: dict) -> str:
    return ", ".join(table)


# --- import -------------------------------------------------------------------------------------


@app.command("import")
def import_cmd(
    fmt: Annotated[str, typer.Argument(metavar="FORMAT", help="pickapic, hpdv2, imagerewarddb or jsonl.")],
    path: Annotated[str, typer.Argument(help="The data: a file, or a folder or glob of parquet shards.")],
    store: StoreOpt = "prefs.db",
    skip_bad: Annotated[
        bool, typer.Option("--skip-bad", help="Skip rows that cannot be read (default: import nothing).")
    ] = False,
    images: Annotated[
        Path | None, typer.Option(help="Folder the data's image paths are relative to (hpdv2, jsonl).")
    ] = None,
    source: Annotated[str | None, typer.Option(help="Source name for the comparisons.")] = None,
    limit: Annotated[int | None, typer.Option(help="Read at most this many rows.")] = None,
    batch_size: Annotated[int, typer.Option(help="Parquet rows read at a time.")] = 32,
    store_images: StoreImagesOpt = None,
) -> None:
    """Import a preference dataset into a store.

    One transaction: a bad row imports nothing (exit 2, naming file and row) unless --skip-bad.
    Importing the same data again adds nothing.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from diffalign.prefs.formats import FORMATS, count_rows, read_format
    from diffalign.prefs.records import BadRow, NewComparison

    if fmt not in FORMATS:
        fail(f"unknown format {fmt!r}; choose one of {_format_names(FORMATS)}")
    if limit is not None and limit < 1:
        fail(f"--limit must be at least 1, got {limit}")
    if batch_size < 1:
        fail(f"--batch-size must be at least 1, got {batch_size}")
    try:
        items = read_format(fmt, path, source=source, images_dir=images, batch_size=batch_size)
        # Read the first row before the store is opened: data that is not there creates no store.
        items = itertools.chain([next(items)], items)
    except StopIteration:
        items = iter(())
    except FileNotFoundError as err:
        fail(f"{err} (nothing was imported)")
    except ValueError as err:
        fail(str(err))
    except OSError as err:
        fail(f"cannot read {path}: {err} (nothing was imported)")
    total = count_rows(fmt, path)
    if limit is not None:
        items = itertools.islice(items, limit)
        total = limit if total is None else min(total, limit)
    prefs = _open_store(store, store_images, create=True)
    with (
        prefs,
        Progress(
            TextColumn("importing {task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        ) as progress,
    ):
        task = progress.add_task(escape(str(path)), total=total)

        def counted(stream) -> Iterator[NewComparison | BadRow]:
            for item in stream:
                yield item
                progress.advance(task)

        try:
            report = prefs.add(counted(items), skip_bad=skip_bad)
        except FileNotFoundError as err:
            fail(f"{err} (nothing was imported)")
        except ValueError as err:  # ImportAborted (a bad row), or a file that cannot be parsed
            fail(str(err))
        except OSError as err:
            fail(f"cannot read {path}: {err} (nothing was imported)")
    console.print(
        f"imported {report.added} comparisons into {prefs.describe()} ({report.duplicates} already there, "
        f"{report.new_images} new images)"
    )
    if report.skipped:
        console.print(f"[yellow]skipped {len(report.skipped)} bad rows[/]; the first:")
        for bad in report.skipped[:_SHOW_REASONS]:
            console.print(f"  {escape(bad.where)}: {escape(bad.reason)}")


# --- export -------------------------------------------------------------------------------------


@app.command("export")
def export_cmd(
    fmt: Annotated[str, typer.Argument(metavar="FORMAT", help="pickapic, jsonl, hf or parquet.")],
    out: Annotated[Path, typer.Argument(help="Output file (pickapic, parquet) or folder (jsonl, hf).")],
    store: StoreOpt = "prefs.db",
    source: SourceOpt = None,
    expand: Annotated[
        bool,
        typer.Option(
            help="pickapic/hf: write a K-image pick as K-1 pairs and leave skips and K-image ties out "
            "(default: refuse such comparisons)."
        ),
    ] = False,
    store_images: StoreImagesOpt = None,
) -> None:
    """Export a store's comparisons.

    Image bytes are written exactly as stored; the output appears only when complete.
    """
    from diffalign.prefs.formats import EXPORTS, ExportError, export_format
    from diffalign.prefs.store import StoreError

    if fmt not in EXPORTS:
        fail(f"unknown export format {fmt!r}; choose one of {_format_names(EXPORTS)}")
    prefs = _open_store(store, store_images, create=False)
    with prefs, console.status(f"exporting to {escape(str(out))}"):
        try:
            report = export_format(fmt, prefs, out, source=source, expand=expand)
        except (ExportError, StoreError, ValueError, OSError) as err:
            fail(f"{err} (nothing was written)")
    console.print(f"wrote {report.rows} rows from {report.comparisons} comparisons to {out}")
    if report.expanded:
        console.print(f"{report.expanded} comparisons of more than two images were written as pairs")
    for reason, n in sorted(report.left_out.items()):
        console.print(f"[yellow]left out {n} {reason}[/] (the {fmt} format cannot hold them)")


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n} B"


# --- stats --------------------------------------------------------------------------------------


@app.command("stats")
def stats_cmd(
    store: StoreOpt = "prefs.db",
    as_json: Annotated[bool, typer.Option("--json", help="Print the statistics as JSON.")] = False,
    store_images: StoreImagesOpt = None,
) -> None:
    """Comparisons by source and choice, ties and skips, raters, groups, images and prompts."""
    prefs = _open_store(store, store_images, create=False)
    with prefs:
        stats = prefs.stats()
    out = Console()
    if as_json:
        out.print_json(json.dumps(stats))
        return
    summary = Table(title="preference store", show_header=False)
    summary.add_column("what")
    summary.add_column("count", justify="right")
    summary.add_row("store", escape(stats["store"]))
    for name in ("comparisons", "prompts", "images", "raters"):
        summary.add_row(name, f"{stats[name]:,}")
    summary.add_row("image bytes", _size(stats["image_bytes"]))
    for choice, n in stats["choices"].items():
        summary.add_row(f"choice: {choice}", f"{n:,}")
    out.print(summary)

    if stats["by_source"]:
        by_source = Table(title="comparisons by source and choice")
        choices = list(stats["choices"])
        for col in ("source", *choices, "total"):
            by_source.add_column(col, justify="left" if col == "source" else "right")
        for name, counts in sorted(stats["by_source"].items()):
            row = [f"{counts.get(c, 0):,}" for c in choices]
            by_source.add_row(escape(name), *row, f"{sum(counts.values()):,}")
        out.print(by_source)
    if stats["raters_by_group"]:
        groups = Table(title="raters by group")
        groups.add_column("group")
        groups.add_column("raters", justify="right")
        for group, n in sorted(stats["raters_by_group"].items()):
            groups.add_row(escape(group), f"{n:,}")
        out.print(groups)


# --- simulate -----------------------------------------------------------------------------------


@app.command("simulate")
def simulate_cmd(
    store: StoreOpt,
    model: Annotated[str, typer.Option(help="'base', 'base-flow', a model folder or a run folder.")] = "base",
    pairs: Annotated[
        int, typer.Option(help="Comparisons to simulate (pairs already stored are kept).")
    ] = 2000,
    seed: Annotated[int, typer.Option(help="Fixes prompts, sampling seeds, raters and their choices.")] = 0,
    steps: Annotated[int, typer.Option(help="Sampling steps.")] = 20,
    guidance: Annotated[float, typer.Option(help="Classifier-free guidance scale.")] = DEFAULT_GUIDANCE_SCALE,
    batch_size: Annotated[int, typer.Option(help="Images per sampling call.")] = 64,
    prompts: Annotated[
        Path | None, typer.Option(help="A metadata JSONL (GenEval schema) whose prompts to draw from.")
    ] = None,
    store_images: StoreImagesOpt = None,
    device: Annotated[str, typer.Option(help="cpu, cuda, or auto.")] = "auto",
    panel: Annotated[
        Path | None,
        typer.Option(
            help="A panel file (YAML: groups, tastes, noise; diffalign.panels) instead of the default."
        ),
    ] = None,
) -> None:
    """Sample pairs from a model and label them with the simulated rater panel of the Shapes world."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    from diffalign.align.config_io import ConfigError
    from diffalign.cli.common import load_model_arg
    from diffalign.diffusion.sampling import SamplerConfig
    from diffalign.panels import load_panel
    from diffalign.prefs.simulate import simulate_preferences
    from diffalign.world.grammar import GrammarError
    from diffalign.world.shapeseval import load_shapeseval

    if pairs < 1:
        fail(f"--pairs must be at least 1, got {pairs}")
    try:
        raters = load_panel(panel)
    except ConfigError as err:
        fail(f"--panel: {err}")
    prompt_list = None
    if prompts is not None:
        try:
            prompt_list = [m["prompt"] for m in load_shapeseval(prompts)]
        except (GrammarError, OSError) as err:
            fail(str(err))
        if not prompt_list:
            fail(f"{prompts}: no prompts")
    diffusion_model = load_model_arg(model, device)
    try:
        config = SamplerConfig.for_prediction_type(
            diffusion_model.prediction_type, num_steps=steps, guidance_scale=guidance
        )
    except ValueError as err:
        fail(str(err))
    prefs = _open_store(store, store_images, create=True)
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
    ) as progress:
        task = progress.add_task("simulating pairs", total=pairs)

        def advance(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        try:
            report = simulate_preferences(
                diffusion_model,
                prefs,
                pairs,
                prompts=prompt_list,
                sampler_config=config,
                seed=seed,
                batch_size=batch_size,
                progress=advance,
                model_name=model,
                panel=raters,
            )
        except (ValueError, GrammarError) as err:
            fail(str(err))
    table = Table(title=f"simulated preferences -> {escape(store)}", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("pairs sampled and labelled", f"{report.sampled:,}")
    table.add_row("added to the store", f"{report.added:,}")
    table.add_row("already stored", f"{report.duplicates:,}")
    table.add_row("ties", f"{report.ties:,}")
    if report.sampled:
        table.add_row("images correct (GenEval verdict)", f"{report.correct_rate:.1%}")
    if report.agreement is not None:
        table.add_row("two-rater agreement", f"{report.agreement.two_rater:.1%}")
        table.add_row("oracle ceiling (rater unknown)", f"{report.agreement.oracle:.1%}")
        table.add_row("oracle ceiling (group known)", f"{report.agreement.oracle_by_group:.1%}")
    table.add_row("seconds", f"{report.seconds:.1f}")
    Console().print(table)
