"""Iterated Diffusion-DPO: rounds of (make pairs with the current model, train on them), shared by
online DPO (`online_dpo.py`) and self-play (`spin.py`).

Round r starts from the model the previous round ended with (round 0 from `dpo.model`), builds its
pairs with that model, and runs one ordinary `train_dpo` run into ``RUN/round-RR/``. The reference
of round r is refreshed on a schedule (`reference_every`): it is the policy at the start of round
``k * floor(r / k)`` for k = reference_every, or the starting model throughout when k = 0.

Layout of the run folder:
- ``config.json``: the method's config (a resume refuses a different one, like a single run);
- ``rounds.jsonl``: one line per finished round (pairs used, labels, the round's final DPO metrics);
- ``round-00/``, ``round-01/``, ...: each an ordinary DPO run folder (checkpoints, metrics, model/);
- ``model/``: the last round's model, so `--model RUN` works as for any run.

Resume: finished rounds (their ``model/`` exists) are skipped, an interrupted round resumes from its
latest checkpoint; the pairs of a round are a function of (the round's starting model, seed, round),
and `train_dpo` checks their fingerprint against the interrupted run's.

Several processes (`accelerate launch`, data parallel or `runtime.sharding=fsdp`): every process loads
the round's starting model whole on its own device and makes its share of the round's pairs
(`process_share`: pair i belongs to process i % N, so a pair is the same whatever N is), the shares
are pooled (`gather_in_order`, or the run's store), and the round trains on all of them, sharded when
asked. The main process writes the run's own files (config.json, rounds.jsonl, model/).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor

from diffalign.align.checkpointing import begin_run
from diffalign.align.dpo import DPOConfig, train_dpo
from diffalign.align.run_dir import RunDir
from diffalign.align.runtime import make_accelerator
from diffalign.align.tracking import json_line
from diffalign.models.registry import load_model
from diffalign.prefs.pairs import PreferencePairs

#: make_pairs(round, starting model, accelerator) -> (the round's training pairs, facts about them for
#: rounds.jsonl), the same on every process; the accelerator tells the process its share
PairMaker = Callable[[int, object, object], tuple[PreferencePairs, dict]]


def process_share(accelerator) -> tuple[int, int]:
    """(this process's index, the number of processes): item i of a round is made by process i % N."""
    return accelerator.process_index, accelerator.num_processes


def gather_in_order(accelerator, count: int, mine: Tensor) -> Tensor:
    """All `count` items of a round on every process, in order, from each process's `mine` (its
    items i with i % N == its index, stacked in order): a collective, every process calls it."""
    from accelerate.utils import gather_object

    index, processes = process_share(accelerator)
    if processes == 1:
        return mine
    shares = gather_object([(index, mine.cpu())])
    out = torch.empty((count, *mine.shape[1:]), dtype=mine.dtype)
    for rank, share in shares:
        out[rank::processes] = share
    return out


def check_round_fields(config) -> DPOConfig:
    """Validate the fields online DPO and SPIN share (dpo, rounds, reference_every, sample_steps,
    sample_batch); returns `config.dpo` as a DPOConfig (YAML gives a mapping)."""
    dpo = DPOConfig(**config.dpo) if isinstance(config.dpo, dict) else config.dpo
    if dpo.method != "dpo":
        raise ValueError(f"rounds train with method 'dpo', got dpo.method={dpo.method!r}")
    for name in ("rounds", "sample_batch"):
        if getattr(config, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(config, name)}")
    for name in ("reference_every", "sample_steps"):
        if getattr(config, name) < 0:
            raise ValueError(f"{name} must be >= 0, got {getattr(config, name)}")
    return dpo


def round_dir(run: Path, index: int) -> Path:
    return run / f"round-{index:02d}"


def reference_round(index: int, reference_every: int) -> int | None:
    """The round whose starting model is round `index`'s reference (None: the starting model)."""
    if reference_every == 0:
        return None
    return reference_every * (index // reference_every)


def _starting_model(run: Path, index: int, first: str) -> str:
    return first if index == 0 else str(round_dir(run, index - 1))


def run_rounds(
    dpo: DPOConfig,
    rounds: int,
    reference_every: int,
    run_dir: str | Path,
    make_pairs: PairMaker,
    record: dict,
    *,
    resume: bool = False,
    show_progress: bool = False,
    on_round: Callable[[dict], None] | None = None,
):
    """Run `rounds` rounds of (make_pairs, train_dpo) into `run_dir`; returns the final model.

    Args:
        dpo: the DPO config of every round (its `model` is the starting model; `steps` are per round).
        rounds: how many rounds.
        reference_every: refresh the reference to the current policy every this many rounds (0: never).
        run_dir: the run folder (see the module doc).
        make_pairs: builds round r's pairs from the round's starting model.
        record: the method's config as JSON (written to config.json, checked on resume).
        resume: continue an interrupted run.
        show_progress: rich progress bars in each round's training.
        on_round: called with every rounds.jsonl line (on the main process).
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if reference_every < 0:
        raise ValueError(f"reference_every must be >= 0, got {reference_every}")
    if dpo.lora_rank > 0 and reference_every != 1:
        raise ValueError(
            "with LoRA each round's reference is its starting model (the adapters off), so "
            f"reference_every must be 1, got {reference_every}"
        )
    run = Path(run_dir)
    # Refuses Accelerate's own FSDP launch type before anything is written (runtime.sharding=fsdp shards).
    accelerator = make_accelerator(dpo.runtime)
    begin_run(RunDir(run), record, resume, accelerator)
    log_path = run / "rounds.jsonl"
    done_lines = _read_lines(log_path)
    model = None
    for index in range(rounds):
        folder = round_dir(run, index)
        if (folder / "model").is_dir() and index < len(done_lines):
            continue
        start = _starting_model(run, index, dpo.model)
        ref_round = reference_round(index, reference_every)
        reference = _starting_model(run, ref_round, dpo.model) if ref_round is not None else dpo.model
        config = replace(
            dpo,
            model=start,
            reference=None if reference == start or dpo.lora_rank > 0 else reference,
            runtime=replace(dpo.runtime, seed=dpo.runtime.seed + index),
        )
        # One load per round: the starting model samples the round's pairs, then trains on them.
        model = load_model(start, device=accelerator.device, diffusers_options=dpo.pipeline)
        pairs, facts = make_pairs(index, model, accelerator)
        lines: list[dict] = []
        model = train_dpo(
            config,
            pairs,
            folder,
            resume=(folder / "checkpoints").is_dir(),
            on_log=lines.append,
            data_spec={"round": index, **facts},
            show_progress=show_progress,
            model=model,
        )
        line = {"round": index, "model": start, "reference": reference, **facts}
        if lines:
            line["final"] = {k: v for k, v in lines[-1].items() if k != "step"}
        if accelerator.is_main_process:
            with log_path.open("a", encoding="utf-8") as fh:
                fh.write(json_line(line) + "\n")
            if on_round is not None:
                on_round(line)
        accelerator.wait_for_everyone()
    last = round_dir(run, rounds - 1) / "model"
    final = run / "model"
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        shutil.copytree(last, final)
    accelerator.wait_for_everyone()
    return (
        model
        if model is not None
        else load_model(str(final), device=accelerator.device, diffusers_options=dpo.pipeline)
    )


def _read_lines(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
