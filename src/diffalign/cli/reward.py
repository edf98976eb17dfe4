"""`diffalign reward ...` commands: train a reward model on a preference store, evaluate it."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from diffalign.cli.common import console, fail, resolve_device

app = typer.Typer(
    no_args_is_help=True,
    help="Reward models: train on a preference store, evaluate against the raters.",
)

SPLIT_FILE = "split.json"
TRAIN_FILE = "train.json"


def _open_store(store: str):
    from diffalign.prefs.store import PreferenceStore, StoreError

    if "://" not in store and not Path(store).exists():
        fail(f"--store {store}: no such preference store (create one with `diffalign prefs import|simulate`)")
    try:
        opened = PreferenceStore.open(store, create=False)
    except StoreError as err:
        fail(f"--store {store}: {err}")
    if opened.count() == 0:
        fail(f"--store {store}: the store is empty; add comparisons first")
    return opened


def _load_pairs(opened, size: int, source: str | None = None):
    from diffalign.prefs.store import StoreError

    try:
        return opened.pairs(size=size, source=source)
    except StoreError as err:
        fail(str(err))


def _check_size(size: int) -> None:
    if size < 1:
        fail(f"--size must be at least 1 (pixels), got {size}")


# What `train` writes into --out (and `eval` by default): replaced together, so that a model trained
# into the folder of an earlier one does not sit beside its stale files (an old ensemble.json would
# shadow a new single model).
_MODEL_ENTRY = re.compile(
    r"config\.json|vocab\.json|model\.safetensors|ensemble\.json|member_\d+|split\.json|train\.json|eval\.json"
)


def _check_out_folder(out: Path) -> None:
    if out.exists() and not out.is_dir():
        fail(f"--out {out}: exists and is not a folder")


def _write_folder(out: Path, write: Callable[[Path], None]) -> None:
    """Run `write(staging)` into a fresh folder beside `out`, then replace the model files of `out`
    with what it wrote: a failure while writing leaves `out` as it was, and no earlier model's file
    stays beside the new ones (files of other names in `out` are kept)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        write(staging)
        out.mkdir(exist_ok=True)
        for old in out.iterdir():
            if not _MODEL_ENTRY.fullmatch(old.name):
                continue
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old)
            else:
                old.unlink()
        for new in staging.iterdir():
            new.replace(out / new.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@app.command("train")
def train_cmd(
    store: Annotated[str, typer.Option(help="The preference store (SQLite file or database URL).")],
    out: Annotated[Path, typer.Option(help="Folder for the reward model (or ensemble).")],
    rater_conditioned: Annotated[
        bool, typer.Option(help="Learn one reward per rater group plus a pooled one.")
    ] = False,
    ensemble: Annotated[
        int, typer.Option(help="Train K members (bootstrap resamples unless --no-bootstrap; 1: one model).")
    ] = 1,
    # None: RewardTrainConfig's default, or the value a --set gives (an option given wins over --set)
    epochs: Annotated[int | None, typer.Option(help="Passes over the pairs (default 30).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Pairs per step (default 64).")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate (default 0.001).")] = None,
    held_out: Annotated[
        float | None, typer.Option(help="Fraction of pairs held out for early stopping (default 0.1).")
    ] = None,
    patience: Annotated[
        int | None, typer.Option(help="Early-stopping patience in epochs (0: off) (default 5).")
    ] = None,
    size: Annotated[int, typer.Option(help="Resize the store's images to size x size.")] = 32,
    pretrain_steps: Annotated[
        int | None,
        typer.Option(
            help="Shapes-world caption pretraining steps before the preference data (world prompts only) "
            "(default 0)."
        ),
    ] = None,
    shared_pretraining: Annotated[
        bool, typer.Option(help="With --ensemble and --pretrain-steps: pretrain once for all members.")
    ] = False,
    bootstrap: Annotated[
        bool,
        typer.Option(help="With --ensemble: fit each member on a bootstrap resample (else on every pair)."),
    ] = True,
    overrides: Annotated[
        list[str] | None,
        typer.Option(
            "--set", help="A RewardTrainConfig field as key=value, e.g. model.channels=[32,64,128]."
        ),
    ] = None,
    seed: Annotated[
        int | None, typer.Option(help="Seeds the split, initialisation and batches (default 0).")
    ] = None,
    device: str = "auto",
) -> None:
    """Train a Bradley–Terry reward model on the store's pairs (ties as 0.5/0.5, as PickScore)."""
    from diffalign.rewards.bt_training import (
        NonFiniteLossError,
        PreferenceDataError,
        RewardTrainConfig,
        describe_pretraining,
        train_reward_model,
    )
    from diffalign.rewards.ensemble import train_ensemble

    if ensemble < 1:
        fail(f"--ensemble must be at least 1, got {ensemble}")
    _check_size(size)
    _check_out_folder(out)
    from diffalign.cli.align import load_command_config

    options = {
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "held_out_fraction": held_out,
        "patience": patience,
        "seed": seed,
        "device": resolve_device(device),
        "pretrain_steps": pretrain_steps,
    }
    config = load_command_config(RewardTrainConfig, None, overrides, options)
    # options that would change nothing are refused rather than passed over in silence
    if not bootstrap and ensemble == 1:
        fail("--no-bootstrap chooses how an ensemble's members are fitted: it needs --ensemble K > 1")
    if shared_pretraining and (ensemble == 1 or not config.pretrain_steps):
        fail(
            "--shared-pretraining pretrains once for all of an ensemble's members: it needs --ensemble K > 1 "
            "and --pretrain-steps N > 0"
        )
    pairs = _load_pairs(_open_store(store), size)
    if config.pretrain_steps:  # --pretrain-steps, or --set pretrain_steps=N
        _require_world_prompts(pairs, "--pretrain-steps")
    if config.matching_weight > 0:
        _require_world_prompts(pairs, "--set matching_weight")
    console.print(f"{len(pairs)} pairs ({int(pairs.is_tie.sum())} ties) from {store}")

    def log(record: dict, member: int | None = None) -> None:
        who = "" if member is None else f"member {member}  "
        if "pretrain_step" in record:
            console.print(f"{who}{describe_pretraining(record)}")
            return
        held = record["held_out_accuracy"]
        if held is None:
            extra = ""
        else:
            # accuracy leaves ties out: a held-out split of ties only has none to report
            acc = "n/a (held-out pairs are all ties)" if math.isnan(held) else f"{held:.3f}"
            extra = f"  held-out loss {record['held_out_loss']:.4f}  acc {acc}"
        console.print(f"{who}epoch {record['epoch']:>3}  train loss {record['train_loss']:.4f}{extra}")

    try:
        if ensemble == 1:
            result = train_reward_model(pairs, config, rater_conditioned=rater_conditioned, on_log=log)
            model, results = result.model, [result]
        else:
            model, results = train_ensemble(
                pairs,
                ensemble,
                config,
                rater_conditioned=rater_conditioned,
                on_log=lambda i, r: log(r, i),
                shared_pretraining=shared_pretraining,
                bootstrap=bootstrap,
            )
    except (PreferenceDataError, NonFiniteLossError) as err:
        fail(str(err))
    held = results[0].held_out

    def write(folder: Path) -> None:
        model.save(folder)
        (folder / SPLIT_FILE).write_text(
            json.dumps(
                {"seed": config.seed, "held_out_keys": sorted(set(held.keys)) if held is not None else []}
            ),
            encoding="utf-8",
        )
        (folder / TRAIN_FILE).write_text(
            json.dumps(
                {
                    "store": store,
                    "pairs": len(pairs),
                    "rater_conditioned": rater_conditioned,
                    "ensemble": ensemble,
                    "config": {k: v for k, v in vars(config).items() if k != "model"},
                    "model": dataclasses.asdict(config.model),
                    "shared_pretraining": shared_pretraining,
                    "bootstrap": bootstrap,
                    "history": [r.history for r in results],
                    "best_epoch": [r.best_epoch for r in results],
                },
                indent=1,
            ),
            encoding="utf-8",
        )

    _write_folder(out, write)
    console.print(f"reward model written to {out}")


def _require_world_prompts(pairs, option: str) -> None:
    from diffalign.world.grammar import GrammarError, parse_prompt

    for prompt in sorted(set(pairs.prompts)):
        try:
            parse_prompt(prompt)
        except GrammarError as err:
            fail(f"{option} trains on Shapes-world renderings, but the store has other prompts: {err}")


def _held_out_keys(folder: Path) -> set[str]:
    path = folder / SPLIT_FILE
    if not path.is_file():
        fail(f"--held-out-from {folder}: no {SPLIT_FILE} (written by `diffalign reward train`)")
    try:
        keys = json.loads(path.read_text(encoding="utf-8"))["held_out_keys"]
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise TypeError("held_out_keys must be a list of comparison keys")
    except (ValueError, KeyError, TypeError) as err:
        fail(f"--held-out-from {folder}: bad {SPLIT_FILE}: {err}")
    if not keys:
        fail(f"--held-out-from {folder}: its training held no comparison out (--held-out 0, or one pair)")
    return set(keys)


def _vocabulary_note(model, pairs) -> str | None:
    """A note when the store's prompts use words the model's vocabulary lacks (they read as <unk>)."""
    members = getattr(model, "members", [model])
    vocab = getattr(members[0], "vocab", None)
    if vocab is None:
        return None
    words = [w for prompt in set(pairs.prompts) for w in vocab.split(prompt)]
    unknown = sum(w not in vocab.index for w in words)
    if not unknown:
        return None
    return (
        f"note: {unknown} of the {len(words)} words of the store's prompts are not in the model's "
        "vocabulary (it reads them as <unk>)"
    )


def _panel_and_gold(opened, pairs):
    """The default rater panel when every comparison was simulated (it can relabel them), and the
    world's pooled utility as the gold reference; (None, None) when the prompts are not the world's."""
    from diffalign.world.grammar import GrammarError
    from diffalign.world.raters import PanelConfig, RaterPanel

    settings: dict = {}
    for comparison in opened.comparisons(source="simulated"):
        settings = dict(comparison.meta.get("panel") or {})  # the simulation's temperature, tie margin
        break
    try:
        panel = RaterPanel(PanelConfig(**settings))
    except (TypeError, ValueError):
        panel = RaterPanel()
    try:
        for prompt in set(pairs.prompts):
            panel.metadata(prompt)
    except GrammarError:
        return None, None

    def gold(images, prompts):
        return panel.utility(images, prompts)

    simulated = opened.count(source="simulated") == opened.count()
    return (panel if simulated else None), gold


@app.command("eval")
def eval_cmd(
    reward: Annotated[Path, typer.Option(help="A reward-model (or ensemble) folder.")],
    store: Annotated[str, typer.Option(help="The preference store to evaluate on.")],
    held_out_from: Annotated[
        Path | None, typer.Option(help="Only the pairs this training folder held out (its split.json).")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Results JSON (default: <reward>/eval.json).")] = None,
    size: Annotated[int, typer.Option(help="Resize the store's images to size x size.")] = 32,
    bins: Annotated[int, typer.Option(help="Equal-width bins of the calibration error.")] = 10,
    bootstrap: Annotated[
        int, typer.Option(help="Bootstrap resamples of the accuracy's 95% interval.")
    ] = 1000,
    device: str = "auto",
) -> None:
    """Held-out accuracy (95% CI) beside the raters' agreement ceiling, ECE and Spearman with gold."""
    from diffalign.rewards.ensemble import load_reward_dir
    from diffalign.rewards.rm_metrics import evaluate_reward, panel_ceiling

    _check_size(size)
    if bins < 1:
        fail(f"--bins must be at least 1, got {bins}")
    if bootstrap < 1:
        fail(f"--bootstrap must be at least 1, got {bootstrap}")
    if out is not None and out.is_dir():
        fail(f"--out {out}: is a folder; give the results file's path")
    try:
        model = load_reward_dir(reward, resolve_device(device))
    except (FileNotFoundError, ValueError) as err:
        fail(f"--reward: {err}")
    opened = _open_store(store)
    pairs = _load_pairs(opened, size)
    if held_out_from is not None:
        keys = _held_out_keys(held_out_from)
        pairs = pairs.select([i for i, k in enumerate(pairs.keys) if k in keys])
        if len(pairs) == 0:
            fail(f"--held-out-from {held_out_from}: none of its held-out comparisons is in {store}")
        found = len(set(pairs.keys))
        if found < len(keys):
            console.print(
                f"note: only {found} of the {len(keys)} comparisons {held_out_from} held out are in {store}"
            )
    if bool(pairs.is_tie.all()):
        fail(f"--store {store}: all {len(pairs)} pairs are ties; accuracy needs pairs with a winner")
    panel, gold = _panel_and_gold(opened, pairs)
    ceiling = panel_ceiling(panel, pairs) if panel is not None else None
    note = _vocabulary_note(model, pairs)
    if note is not None:
        console.print(note)
    try:
        report = evaluate_reward(model, pairs, gold=gold, ceiling=ceiling, n_bins=bins, n_boot=bootstrap)
    except ValueError as err:  # e.g. a model whose scores are NaN
        fail(f"--reward {reward}: {err}")
    report["reward"], report["store"] = str(reward), store
    report["held_out_from"] = None if held_out_from is None else str(held_out_from)

    table = Table(title=f"reward model {reward} on {report['pairs']} pairs of {store}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    lo, hi = report["ci95"]
    table.add_row(
        f"pairwise accuracy ({report['accuracy_pairs']} non-tie pairs)",
        f"{report['accuracy']:.3f}  [{lo:.3f}, {hi:.3f}]",
    )
    if ceiling is not None:
        table.add_row("raters: two-rater agreement", f"{ceiling['two_rater']:.3f}")
        table.add_row("raters: oracle ceiling", f"{ceiling['oracle']:.3f}")
        table.add_row("raters: oracle told the group", f"{ceiling['oracle_by_group']:.3f}")
    else:
        table.add_row("raters' ceiling", "n/a (not all comparisons simulated)")
    table.add_row(f"ECE ({bins} bins)", f"{report['ece']:.3f}")
    table.add_row("BT loss", f"{report['bt_loss']:.4f}")
    if "spearman_gold" in report:
        table.add_row("Spearman with gold utility", f"{report['spearman_gold']:.3f}")
    Console().print(table)
    path = out or reward / "eval.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1), encoding="utf-8")
    console.print(f"results in {path}")


@app.command("curve")
def curve_cmd(
    store: Annotated[str, typer.Option(help="The preference store (SQLite file or database URL).")],
    sizes: Annotated[
        str, typer.Option(help="Training-set sizes, comma-separated.")
    ] = "125,250,500,1000,2000",
    test_fraction: Annotated[float, typer.Option(help="Fraction of pairs kept aside as the test set.")] = 0.2,
    rater_conditioned: Annotated[bool, typer.Option(help="Rater-conditioned models.")] = False,
    epochs: int = 30,
    pretrain_steps: Annotated[int, typer.Option(help="World caption pretraining steps per model.")] = 0,
    out: Annotated[Path | None, typer.Option(help="Results JSON.")] = None,
    size: Annotated[int, typer.Option(help="Resize the store's images to size x size.")] = 32,
    seed: int = 0,
    device: str = "auto",
) -> None:
    """The data-scarcity curve: held-out accuracy of models trained on nested subsets of the pairs."""
    from diffalign.rewards.bt_training import PreferenceDataError, RewardTrainConfig
    from diffalign.rewards.rm_metrics import data_scarcity_curve

    try:
        size_list = [int(x) for x in sizes.split(",") if x.strip()]
    except ValueError:
        fail(f"--sizes {sizes!r}: expected comma-separated integers")
    if not size_list or min(size_list) < 2:
        fail(f"--sizes {sizes!r}: expected sizes of at least 2 pairs")
    _check_size(size)
    if not 0.0 < test_fraction < 1.0:
        fail(f"--test-fraction must be in (0, 1), got {test_fraction}")
    try:
        config = RewardTrainConfig(
            epochs=epochs, seed=seed, device=resolve_device(device), pretrain_steps=pretrain_steps
        )
    except ValueError as err:
        fail(str(err))
    pairs = _load_pairs(_open_store(store), size)
    if pretrain_steps:
        _require_world_prompts(pairs, "--pretrain-steps")
    table = Table(title=f"held-out accuracy against training pairs ({store})")
    for column in ("pairs", "accuracy", "95% CI"):
        table.add_column(column, justify="right")

    def log(row: dict) -> None:
        console.print(f"{row['size']} pairs: accuracy {row['accuracy']:.3f}")

    pool = len(pairs) - len(pairs.split(test_fraction, seed=seed)[1])
    too_large = sorted({n for n in size_list if n > pool})
    if too_large and len(too_large) < len(set(size_list)):
        listed = ", ".join(map(str, too_large))
        console.print(f"note: sizes {listed} are left out: the store has {pool} pairs besides the test set")

    try:
        rows = data_scarcity_curve(
            pairs,
            size_list,
            config=config,
            test_fraction=test_fraction,
            rater_conditioned=rater_conditioned,
            on_log=log,
        )
    except (PreferenceDataError, ValueError) as err:
        fail(str(err))
    for row in rows:
        lo, hi = row["ci95"]
        table.add_row(str(row["size"]), f"{row['accuracy']:.3f}", f"[{lo:.3f}, {hi:.3f}]")
    Console().print(table)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(rows, indent=1), encoding="utf-8")
        console.print(f"results in {out}")
