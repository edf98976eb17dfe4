"""`diffalign collect ...` commands: the preference collection server and its queue, raters and tokens."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from diffalign.cli.common import console, fail
from diffalign.cli.common import load_model_arg as _load
from diffalign.cli.prefs import StoreImagesOpt, StoreOpt
from diffalign.guidance import DEFAULT_GUIDANCE_SCALE

app = typer.Typer(
    no_args_is_help=True,
    help="Collect human preferences in a browser: queue pairs, add raters, serve the labelling app.",
)


def _open(store: str, store_images: Path | None):
    from diffalign.collect.storage import open_store
    from diffalign.prefs.store import StoreError

    try:
        return open_store(store, store_images)
    except StoreError as err:
        fail(str(err))


def _token_line(kind: str, token: str) -> None:
    # The token goes to stdout alone (scripts capture it); the note goes to stderr.
    console.print(f"{escape(kind)} token (shown once; only its hash is stored):")
    typer.echo(token)


@app.command("serve")
def serve_cmd(
    store: StoreOpt = "prefs.db",
    store_images: StoreImagesOpt = None,
    host: Annotated[str, typer.Option(help="Interface (0.0.0.0: every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    max_body: Annotated[int, typer.Option(help="Largest request body in bytes (413 beyond).")] = 16384,
    rate: Annotated[float, typer.Option(help="Requests per second per token (429 beyond).")] = 20.0,
    burst: Annotated[int, typer.Option(help="Requests a token may make at once.")] = 40,
) -> None:
    """Serve the labelling pages and API. Raters open /annotate?token=..., the admin /admin?token=...

    Without an admin token in the store, one is made and printed first.
    """
    import uvicorn

    from diffalign.collect.app import ServerConfig, create_app
    from diffalign.collect.storage import write_transaction
    from diffalign.collect.tokens import has_admin_token, set_admin_token

    if max_body < 256:
        fail(f"--max-body must be at least 256 bytes, got {max_body}")
    try:
        config = ServerConfig(max_body_bytes=max_body, rate_per_s=rate, burst=burst)
        opened = _open(store, store_images)
        app_ = create_app(opened, config)
    except ValueError as err:
        fail(str(err))
    with write_transaction(opened) as (conn, _):
        token = None if has_admin_token(conn) else set_admin_token(conn)
    if token is not None:
        _token_line("new admin", token)
    console.print(f"serving {escape(opened.describe())} on http://{host}:{port}/annotate?token=<rater token>")
    uvicorn.run(app_, host=host, port=port, log_level="warning")


@app.command("add-rater")
def add_rater_cmd(
    name: Annotated[str, typer.Argument(help="The rater's name (unique in the store).")],
    store: StoreOpt = "prefs.db",
    store_images: StoreImagesOpt = None,
    group: Annotated[str | None, typer.Option(help="The rater's group (pluralistic RMs).")] = None,
    rotate: Annotated[bool, typer.Option("--rotate", help="Replace the token of an existing rater.")] = False,
) -> None:
    """Create a rater and print their token (give them /annotate?token=TOKEN)."""
    from diffalign.collect.storage import write_transaction
    from diffalign.collect.tokens import TokenError, add_rater

    opened = _open(store, store_images)
    try:
        with write_transaction(opened) as (conn, _):
            token = add_rater(conn, name, group, rotate=rotate)
    except TokenError as err:
        fail(str(err))
    _token_line(f"rater {name!r}", token)


@app.command("revoke-rater")
def revoke_rater_cmd(
    name: Annotated[str, typer.Argument(help="The rater whose token stops working (their votes stay).")],
    store: StoreOpt = "prefs.db",
    store_images: StoreImagesOpt = None,
) -> None:
    """Revoke a rater's token."""
    from diffalign.collect.storage import write_transaction
    from diffalign.collect.tokens import TokenError, revoke_rater

    opened = _open(store, store_images)
    try:
        with write_transaction(opened) as (conn, _):
            revoke_rater(conn, name)
    except TokenError as err:
        fail(str(err))
    console.print(f"revoked the token of {escape(name)}")


@app.command("admin-token")
def admin_token_cmd(store: StoreOpt = "prefs.db", store_images: StoreImagesOpt = None) -> None:
    """Make a new admin token (the previous one stops working) and print it."""
    from diffalign.collect.storage import write_transaction
    from diffalign.collect.tokens import set_admin_token

    opened = _open(store, store_images)
    with write_transaction(opened) as (conn, _):
        token = set_admin_token(conn)
    _token_line("admin", token)


@app.command("status")
def status_cmd(store: StoreOpt = "prefs.db", store_images: StoreImagesOpt = None) -> None:
    """Pairs, votes and per-rater progress and agreement (what the admin page shows)."""
    from diffalign.collect.report import overview

    data = overview(_open(store, store_images))
    pct = lambda x: "-" if x is None else f"{100 * x:.1f}%"  # noqa: E731
    console.print(
        f"{data['votes']} of {data['votes_needed']} votes; {data['tasks_complete']} of {data['tasks']} pairs "
        f"complete; agreement {pct(data['agreement'])}"
    )
    table = Table(title="raters")
    for col in ("rater", "group", "answered", "skipped", "open", "agreement", "token"):
        table.add_column(col, justify="left" if col in ("rater", "group", "token") else "right")
    for r in data["raters"]:
        table.add_row(
            escape(r["name"]),
            escape(r["group"] or ""),
            str(r["answered"]),
            str(r["skipped"]),
            str(r["open"]),
            pct(r["agreement"]),
            "active" if r["active"] else "revoked",
        )
    Console().print(table)


#: Options `add-tasks` and `add-images` share.
RatersPerPairOpt = Annotated[int, typer.Option(help="Different raters who label each pair.")]
ActiveOpt = Annotated[
    Path | None,
    typer.Option(help="A reward-model ensemble folder: queue the pairs it disagrees on most, first."),
]
MaxPairsOpt = Annotated[int | None, typer.Option(help="Queue at most this many pairs.")]
DisagreementOpt = Annotated[str, typer.Option(help="variance or vote (active mode).")]


def _active_ensemble(active: Path | None):
    """The `--active` ensemble (None without the option); a folder that is not one fails clearly."""
    from diffalign.rewards.ensemble import RewardEnsemble, load_reward_dir

    if active is None:
        return None
    if not active.is_dir():
        fail(f"--active {active}: not a folder (give an ensemble from `diffalign reward train`)")
    try:
        ensemble = load_reward_dir(active)
    except (FileNotFoundError, ValueError) as err:
        fail(f"--active {active}: {err}")
    if not isinstance(ensemble, RewardEnsemble) or len(ensemble) < 2:
        fail(f"--active {active}: active mode needs an ensemble of two or more reward models")
    return ensemble


def default_batch(model: str) -> str:
    """The batch name when `--batch` is not given: the model, or for a model path over the batch column's
    100 characters its end (the run's own name), marked with '...'."""
    return model if len(model) <= 100 else "..." + model[-97:]


@app.command("add-tasks")
def add_tasks_cmd(
    prompts: Annotated[Path, typer.Option(help="Prompts: a text file (one a line) or JSONL with 'prompt'.")],
    model: Annotated[str, typer.Option(help="'base', 'base-flow', a model folder or a run folder.")] = "base",
    store: StoreOpt = "prefs.db",
    store_images: StoreImagesOpt = None,
    per_prompt: Annotated[int, typer.Option(help="Images sampled per prompt (all pairs among them).")] = 4,
    raters_per_pair: RatersPerPairOpt = 1,
    active: ActiveOpt = None,
    max_pairs: MaxPairsOpt = None,
    disagreement: DisagreementOpt = "variance",
    batch: Annotated[
        str | None, typer.Option(help="Batch name, up to 100 characters (default: the model).")
    ] = None,
    steps: int = 20,
    guidance: float = DEFAULT_GUIDANCE_SCALE,
    seed: int = 0,
    batch_size: int = 64,
    device: str = "auto",
) -> None:
    """Sample a model on some prompts and queue pairs of its images for labelling."""
    from diffalign.cli import _sampler_config
    from diffalign.collect.queue import add_pairs
    from diffalign.collect.tasks import GenerateConfig, make_pair_tasks, read_prompts
    from diffalign.models.tokenizer import UnknownWordError
    from diffalign.prefs.store import ImportAborted

    if raters_per_pair < 1:
        fail(f"--raters-per-pair must be at least 1, got {raters_per_pair}")
    if batch is not None and not 1 <= len(batch) <= 100:
        fail(f"--batch must be 1 to 100 characters, got {len(batch)}")  # checked before sampling
    batch_name = batch if batch is not None else default_batch(model)
    try:
        config = GenerateConfig(
            per_prompt=per_prompt,
            seed=seed,
            batch_size=batch_size,
            max_pairs=max_pairs,
            disagreement=disagreement,
        )
        texts = read_prompts(prompts)
    except ValueError as err:
        fail(str(err))
    ensemble = _active_ensemble(active)
    m = _load(model, device)
    sampler = _sampler_config(None, steps, guidance, 0.0, 0.7, m)
    opened = _open(store, store_images)
    try:
        tasks = make_pair_tasks(m, model, texts, sampler, config, ensemble, log=console.print)
        added = add_pairs(opened, tasks, raters_per_pair, batch_name)
    except (UnknownWordError, ImportAborted, ValueError) as err:
        fail(str(err))
    already = len(tasks) - added
    console.print(f"queued {added} new pairs ({already} already queued), {raters_per_pair} raters each")


@app.command("add-images")
def add_images_cmd(
    source: Annotated[
        Path,
        typer.Argument(
            help="Images any program made: a GenEval-layout folder (DIR/00000/metadata.jsonl with a "
            "'prompt', DIR/00000/samples/*.png|jpg|webp) or a JSONL manifest of "
            '{"prompt": ..., "images": [paths relative to it]}.'
        ),
    ],
    store: StoreOpt = "prefs.db",
    store_images: StoreImagesOpt = None,
    raters_per_pair: RatersPerPairOpt = 1,
    active: ActiveOpt = None,
    max_pairs: MaxPairsOpt = None,
    disagreement: DisagreementOpt = "variance",
    batch: Annotated[
        str | None, typer.Option(help="Batch name, up to 100 characters (default: the source's path).")
    ] = None,
) -> None:
    """Queue pairs of existing images (every pair of each prompt's images) for labelling."""
    from diffalign.collect.image_sets import image_set_pair_tasks, read_image_sets
    from diffalign.collect.queue import add_pairs
    from diffalign.prefs.store import ImportAborted

    if raters_per_pair < 1:
        fail(f"--raters-per-pair must be at least 1, got {raters_per_pair}")
    if batch is not None and not 1 <= len(batch) <= 100:
        fail(f"--batch must be 1 to 100 characters, got {len(batch)}")
    ensemble = _active_ensemble(active)
    try:
        sets = read_image_sets(source)
        tasks = image_set_pair_tasks(sets, max_pairs, ensemble, disagreement, log=console.print)
    except ValueError as err:
        fail(str(err))
    opened = _open(store, store_images)
    try:
        added = add_pairs(
            opened, tasks, raters_per_pair, batch if batch is not None else default_batch(str(source))
        )
    except (ImportAborted, ValueError) as err:
        fail(str(err))
    already = len(tasks) - added
    console.print(f"queued {added} new pairs ({already} already queued), {raters_per_pair} raters each")
