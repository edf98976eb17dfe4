"""Per-step figures for `diffalign plan` from the GPU step benchmark's results (`benchmarks/gpu_steps.py`).

`diffalign plan dpo --gpu-table RESULTS.json` projects a Diffusion-DPO run from the benchmark's DPO
step measured on a GPU (docs/scaling.md holds an H200's), without a GPU at hand: the step of the
config's batch (`batch_size` pairs), fine-tuning kind (LoRA when `lora_rank` > 0, else full) and
variant (`diffalign`: the library's levers; `eager`: plain diffusers), times the config's gradient
accumulation. The run's fixed part is `--fixed-seconds` plus that step's compiling (its first call
less a steady step). What the table leaves out is said in the projection's assumptions: it times the
denoiser's step alone (no VAE encoding of the pair images, no text encoder, no data loading) on the
UNet the benchmark built (an SD1.5-shaped one by default), which may not be the run's model.

Only Diffusion-DPO is projected this way: the other trainers' steps (sampling chains, rewards, decoding)
are not single rows of the table; measure them (`--measure`) or give their figures by hand.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from diffalign.planning.measure import StepCost

VARIANTS = ("diffalign", "eager")


def _read(path: Path) -> dict:
    try:
        results = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"--gpu-table {path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"--gpu-table {path}: not a JSON file ({err})") from None
    records = results.get("records") if isinstance(results, dict) else None
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise ValueError(
            f"--gpu-table {path}: not a benchmarks/gpu_steps.py results file (no 'records' list)"
        )
    return results


def dpo_step_cost(
    path: str | Path,
    pairs_per_step: int,
    finetune: str,
    variant: str = "diffalign",
    accumulation: int = 1,
    fixed_seconds: float = 0.0,
) -> StepCost:
    """The cost of one Diffusion-DPO optimiser step from a GPU step table (see the module doc).

    Args:
        path: a `benchmarks/gpu_steps.py` results.json.
        pairs_per_step: pairs per micro-batch (the DPO config's `batch_size`); the table must hold a
            DPO step of exactly this many pairs (no interpolation between batch sizes).
        finetune: "full" or "lora".
        variant: "diffalign" or "eager".
        accumulation: micro-batches per optimiser step (gradient accumulation).
        fixed_seconds: the run's fixed seconds besides compiling (start-up, saving).

    Raises:
        ValueError: an unreadable table, or no DPO step of this batch, tuning and variant in it (the
            message lists the ones it holds); FileNotFoundError: no such file.
    """
    if variant not in VARIANTS:
        raise ValueError(f"--gpu-variant must be one of {VARIANTS}, got {variant!r}")
    if pairs_per_step < 1 or accumulation < 1 or not (math.isfinite(fixed_seconds) and fixed_seconds >= 0):
        raise ValueError(
            f"plan: pairs per step and accumulation must be >= 1 and fixed seconds >= 0, got "
            f"{pairs_per_step}, {accumulation}, {fixed_seconds}"
        )
    path = Path(path)
    results = _read(path)
    held = [r for r in results["records"] if r.get("step") == "dpo"]
    match = [
        r
        for r in held
        if (r.get("variant"), r.get("finetune"), r.get("batch")) == (variant, finetune, pairs_per_step)
    ]
    if not match:
        available = sorted({f"{r.get('variant')} {r.get('finetune')} {r.get('batch')} pairs" for r in held})
        raise ValueError(
            f"--gpu-table {path}: no DPO step of {variant} {finetune} fine-tuning at {pairs_per_step} pairs "
            f"(the config's batch_size); it holds: {', '.join(available) or 'no DPO step'}"
        )
    record = match[0]
    try:
        seconds = float(record["ms"]) / 1000 * accumulation
        rows = int(record["rows"])
        compiling = float(record.get("compile_s") or 0.0)
        peak = record.get("peak_gib")
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"--gpu-table {path}: its DPO record lacks a readable field ({err})") from None
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"--gpu-table {path}: its DPO step's time is not positive ({record['ms']!r} ms)")
    device = str(results.get("device", "an unnamed device"))
    parameters = results.get("unet_parameters")
    network = (
        f"a UNet of {parameters / 1e6:.0f}M parameters" if isinstance(parameters, int | float) else "its UNet"
    )
    return StepCost(
        method="dpo",
        unit="step",
        seconds_per_step=seconds,
        fixed_seconds=fixed_seconds + compiling,
        # policy and reference on winners and losers; the policy's rows backpropagated
        forward_nfe_per_step=2 * rows * accumulation,
        backward_nfe_per_step=rows * accumulation,
        reward_queries_per_step=None,
        peak_memory_mb=None if peak is None else float(peak) * 1024,
        memory_kind="cuda" if peak is not None else "unavailable",
        device=device,
        steps_measured=None,
        source=(
            f"from the GPU step table {path.name} ({device}, {variant}, {finetune} fine-tuning, "
            f"{pairs_per_step} pairs x {accumulation} micro-batch(es), {network}: the denoiser's step alone, "
            f"no VAE encoding, text encoder or data loading; {compiling:.0f} s of compiling counted as fixed)"
        ),
    )
