"""`diffalign plan METHOD`: project what an alignment run will cost, before running it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from diffalign.cli.align import ConfigOpt, DeviceOpt, ModelOpt, OverridesArg, PromptsOpt, RewardOpt
from diffalign.cli.common import console, fail


def _config(method: str, config_file, overrides, model, reward, prompts, device):
    from diffalign.align.backprop_config import BackpropConfig
    from diffalign.align.dpo import DPOConfig
    from diffalign.align.nft_config import NFTConfig
    from diffalign.align.pg_config import PGConfig
    from diffalign.cli.align import load_command_config
    from diffalign.planning.measure import LENGTH_FIELDS
    from diffalign.planning.trainers import BACKPROP_METHODS, NFT_METHODS, PAIR_METHODS, PG_METHODS

    if method == "online-dpo":
        from diffalign.align.online_dpo import OnlineDPOConfig

        options = {"dpo.model": model, "dpo.runtime.device": device, "labeller": reward}
        return load_command_config(OnlineDPOConfig, config_file, overrides, options)
    if method == "spin":
        from diffalign.align.spin import SPINConfig

        options = {"dpo.model": model, "dpo.runtime.device": device}
        return load_command_config(SPINConfig, config_file, overrides, options)
    options: dict = {"model": model, "runtime.device": device}
    if method in PAIR_METHODS:
        return load_command_config(DPOConfig, config_file, overrides, options, method)
    options |= {"reward": reward, "prompts": prompts}
    if method in PG_METHODS:
        return load_command_config(PGConfig, config_file, overrides, options, method)
    if method in NFT_METHODS:
        return load_command_config(NFTConfig, config_file, overrides, options, method)
    if method in BACKPROP_METHODS:
        return load_command_config(BackpropConfig, config_file, overrides, options, method)
    fail(f"plan: no trainer named {method!r}; choose one of {sorted(LENGTH_FIELDS)}")


def _pairs(store: str | None, config, ratings: Path | None = None):
    from diffalign.models.registry import model_image_size
    from diffalign.prefs.ratings import RatingsError, read_ratings
    from diffalign.prefs.store import PreferenceStore, StoreError

    if ratings is not None:
        if config.method != "kto" or store is not None:
            fail("--ratings: rated images train kto only, in place of --store")
        try:
            return read_ratings(ratings, model_image_size(config.model, config.pipeline))
        except RatingsError as err:
            fail(f"--ratings: {err}")
    if store is None:
        fail("plan: --measure of a DPO-family run needs --store (the pairs it trains on; kto: or --ratings)")
    if "://" not in store and not Path(store).is_file():
        fail(f"--store {store}: no such preference store")
    size = model_image_size(config.model, config.pipeline)
    try:
        return PreferenceStore.open(store, create=False).pairs(size=size, include_ties=True)
    except StoreError as err:
        fail(f"--store {store}: {err}")


def _two(text: str, option: str) -> tuple[int, int]:
    """short,long (1 <= short < long) from an option's text; a clear error naming the option otherwise."""
    parts = text.split(",")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        fail(f"{option}: expected two whole numbers short,long, got {text!r}")
    short, long = int(parts[0]), int(parts[1])
    if not 1 <= short < long:
        fail(f"{option}: the measuring runs need 1 <= short < long, got {text!r}")
    return short, long


def _check_json_out(path: Path | None) -> None:
    """Refuse a --json path that cannot be written before anything is measured."""
    if path is None:
        return
    if path.is_dir():
        fail(f"--json {path}: a folder; give a file name such as {path / 'plan.json'}")
    blocking = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        fail(f"--json {path}: {blocking} is a file, not a folder")


def _number(value: float | None, spec: str, unit: str = "") -> str:
    return "n/a" if value is None else f"{format(value, spec)}{unit}"


def plan_cmd(
    method: Annotated[
        str,
        typer.Argument(
            help="dpo, kto, online-dpo, spin, ddpo, dpok, grpo, nft, alignprop, draft, draft-lv or refl "
            "(online-dpo and spin: a round is the unit; online-dpo's --reward is its labeller)."
        ),
    ],
    overrides: OverridesArg = None,
    model: ModelOpt = None,
    reward: RewardOpt = None,
    prompts: PromptsOpt = None,
    config: ConfigOpt = None,
    store: Annotated[
        str | None, typer.Option(help="The preference store a DPO-family run trains on.")
    ] = None,
    ratings: Annotated[
        Path | None, typer.Option(help="kto: a file of rated images it trains on instead of --store.")
    ] = None,
    measure: Annotated[bool, typer.Option(help="Time a few real steps of the run on this machine.")] = False,
    measure_steps: Annotated[str, typer.Option(help="The two measuring run lengths, short,long.")] = "1,3",
    measure_items: Annotated[
        str, typer.Option(help="online-dpo, spin: the two runs making a round's pairs or images, short,long.")
    ] = "2,8",
    examples: Annotated[int, typer.Option(help="spin: the real examples each round trains on.")] = 0,
    seconds_per_step: Annotated[
        float | None, typer.Option(help="Per-step seconds given by hand instead of --measure.")
    ] = None,
    fixed_seconds: Annotated[
        float, typer.Option(help="With --seconds-per-step or --gpu-table: the run's fixed seconds.")
    ] = 0.0,
    gpu_table: Annotated[
        Path | None,
        typer.Option(
            help="dpo only: per-step figures from a benchmarks/gpu_steps.py results.json (its DPO step "
            "of the config's batch_size, LoRA or full as lora_rank says; the denoiser's step alone)."
        ),
    ] = None,
    gpu_variant: Annotated[
        str, typer.Option(help="With --gpu-table: the diffalign (levers) or eager (plain diffusers) step.")
    ] = "diffalign",
    devices: Annotated[int, typer.Option(help="Devices (GPUs) the run is spread over, data parallel.")] = 1,
    efficiency: Annotated[float, typer.Option(help="Data-parallel scaling efficiency in (0, 1].")] = 0.9,
    price_per_device_hour: Annotated[float, typer.Option(help="Price of one device-hour.")] = 0.0,
    pairs: Annotated[
        int,
        typer.Option(help="Preference pairs to be labelled (online-dpo: rounds x pairs_per_round when 0)."),
    ] = 0,
    labels_per_pair: Annotated[int, typer.Option(help="Raters per pair.")] = 1,
    price_per_label: Annotated[float, typer.Option(help="Price of one label.")] = 0.0,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Also write the projection as JSON.")
    ] = None,
    device: DeviceOpt = None,
) -> None:
    """Project a run's wall time, device-hours, NFEs, reward queries, memory and cost (compute and
    annotation), from a measurement of a few of its steps (--measure), the GPU step benchmark's table
    (--gpu-table, Diffusion-DPO) or per-step figures given by hand."""
    from diffalign.planning.measure import StepCost, measure_step_cost
    from diffalign.planning.projection import RunShape, project
    from diffalign.planning.trainers import PAIR_METHODS, run_length, trainer_runner

    cfg = _config(method, config, overrides, model, reward, prompts, device)
    _check_json_out(json_out)
    if measure:  # read before anything is loaded or run
        _two(measure_steps, "--measure-steps")
        if method in ("online-dpo", "spin"):
            _two(measure_items, "--measure-items")
    if sum((measure, seconds_per_step is not None, gpu_table is not None)) != 1:
        fail("plan: give exactly one of --measure, --seconds-per-step and --gpu-table")
    if gpu_table is not None and method != "dpo":
        fail(f"--gpu-table: the GPU step table projects dpo only ({method}'s steps are not rows of it)")
    try:
        if measure and method in ("online-dpo", "spin"):
            from diffalign.planning.rounds import measure_online_dpo, measure_spin

            short, long = _two(measure_steps, "--measure-steps")
            few, more = _two(measure_items, "--measure-items")
            console.print(
                f"measuring {method}: runs making {few} and {more} of a round's items, DPO runs of {short} "
                f"and {long} steps on this machine"
            )
            device_name = cfg.dpo.runtime.device
            if method == "spin":
                cost = measure_spin(cfg, examples, device_name, short, long, few, more)
            else:
                cost = measure_online_dpo(cfg, device_name, short, long, few, more)
        elif measure:
            short, long = _two(measure_steps, "--measure-steps")
            data = _pairs(store, cfg, ratings) if method in PAIR_METHODS else None
            console.print(f"measuring {method}: runs of {short} and {long} steps on this machine")
            cost = measure_step_cost(
                method,
                trainer_runner(method, cfg, data),
                cfg.runtime.device,
                short,
                long,
                reward_counted=method not in PAIR_METHODS,
            )
        elif gpu_table is not None:
            from diffalign.planning.gpu_table import dpo_step_cost

            cost = dpo_step_cost(
                gpu_table,
                pairs_per_step=cfg.batch_size,
                finetune="lora" if cfg.lora_rank > 0 else "full",
                variant=gpu_variant,
                accumulation=cfg.runtime.gradient_accumulation_steps,
                fixed_seconds=fixed_seconds,
            )
            console.print(f"per-step figures {cost.source}")
        else:
            cost = StepCost.given(method, seconds_per_step, fixed_seconds)
        if method == "online-dpo" and not pairs:
            pairs = cfg.rounds * cfg.pairs_per_round  # every round's pairs are labelled
        shape = RunShape(
            steps=run_length(method, cfg),
            devices=devices,
            efficiency=efficiency,
            price_per_device_hour=price_per_device_hour,
            preference_pairs=pairs,
            labels_per_pair=labels_per_pair,
            price_per_label=price_per_label,
        )
        result = project(cost, shape)
    except (ValueError, FileNotFoundError) as err:
        fail(str(err))
    table = Table(title=f"plan: {method}, {shape.steps} {cost.unit}s on {devices} device(s)")
    table.add_column("quantity")
    table.add_column("projected", justify="right")
    for name, value in (
        ("wall time, 1 device", _number(result.wall_seconds_one_device / 60, ".1f", " min")),
        (f"wall time, {devices} device(s)", _number(result.wall_seconds / 60, ".1f", " min")),
        ("device-hours", _number(result.device_hours, ".2f")),
        ("forward NFEs", _number(result.forward_nfe, ",.0f")),
        ("backward NFEs", _number(result.backward_nfe, ",.0f")),
        ("reward queries", _number(result.reward_queries, ",.0f")),
        ("peak memory per device", _number(result.peak_memory_mb, ",.0f", f" MB ({cost.memory_kind})")),
        ("compute cost", _number(result.compute_cost, ",.2f")),
        ("annotation cost", _number(result.annotation_cost, ",.2f")),
        ("total cost", _number(result.total_cost, ",.2f")),
    ):
        table.add_row(name, value)
    console.print(table)
    for line in result.assumptions:
        console.print(f"- {line}")
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        payload = {"method": method, "shape": shape.__dict__, "step_cost": cost.__dict__, **result.to_dict()}
        json_out.write_text(json.dumps(payload, indent=1), encoding="utf-8")
        console.print(f"wrote {json_out}")


def register(app: typer.Typer) -> None:
    app.command("plan")(plan_cmd)
