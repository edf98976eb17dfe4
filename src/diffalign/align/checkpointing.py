"""The run-folder steps every trainer takes with Accelerate, in one place.

Each trainer (`dpo.py`, `policy_gradient.py`, `reward_backprop.py`) keeps its own explicit loop; these
are the moments where every process must act in the same order:
- `begin_run`: every process checks the folder against the run record, then the main one writes it;
- `resume_weights`: the latest checkpoint's trainable weights, loaded into the network before
  `accelerator.prepare` (the optimiser state and RNG are the trainer's to restore after it);
- `save_training_checkpoint`: the main process opens the checkpoint, every process writes its own
  state, the main process writes weights and optimiser and renames the folder into place;
- `save_final_model`: once the run is complete, the main process writes its `model/` folder.

Under FSDP (`runtime.sharding=fsdp`, `diffalign.align.sharding`) each process holds a shard of the
weights and optimiser state; these functions gather them whole on every process first (a collective),
so a checkpoint and the model folder are the same files as a data-parallel run's, except that the
optimiser state is keyed by parameter name.
"""

from __future__ import annotations

from torch import Tensor, nn

from diffalign.align.run_dir import Checkpoint, RunDir, RunDirError
from diffalign.align.sharding import full_optimizer_state, full_weights, network_is_sharded, whole_parameters


def trainable_state(network: nn.Module) -> dict[str, Tensor]:
    """The weights the optimiser updates (all of them, or the LoRA adapters), by name."""
    return {name: p.detach() for name, p in network.named_parameters() if p.requires_grad}


def begin_run(run: RunDir, record: dict, resume: bool, accelerator, extend: bool = False) -> None:
    """Check the run folder on every process (`RunDir.start`; `extend`: a resume that may lengthen the
    run), then, on the main one, move an extended run's old final model aside and write config.json."""
    saved = run.start(record, resume, write=False, extend=extend)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if extend:
            run.retire_final_model(saved)
        run.write_record(record)


def resume_weights(
    run: RunDir, record: dict, accelerator, network: nn.Module, extend: bool = False
) -> Checkpoint:
    """Load the latest checkpoint (this process's state included) and its trainable weights into
    `network` (`extend`: a checkpoint of a shorter run is accepted); errors name the folder when there
    is none or its weights do not fit."""
    latest = run.latest_checkpoint()
    if latest is None:
        raise RunDirError(f"--resume: no checkpoint under {run.checkpoints}")
    checkpoint = run.load_checkpoint(latest, record, accelerator.process_index, extend=extend)
    if set(checkpoint.weights) != set(trainable_state(network)):
        raise RunDirError(f"checkpoint {latest}: its weights do not match the model's trainable weights")
    network.load_state_dict(checkpoint.weights, strict=False)
    return checkpoint


def save_training_checkpoint(
    run: RunDir,
    accelerator,
    step: int,
    *,
    network: nn.Module,
    optimizer,
    data_cursor: int,
    record: dict,
    keep: int,
    process_state: dict,
    extra: dict | None = None,
) -> None:
    """Write checkpoint `step` from every process (see the module doc); returns when all are done."""
    if network_is_sharded(network):  # every process gathers; the main one writes
        weights, optimizer_state = full_weights(network), full_optimizer_state(network, optimizer)
    else:
        weights, optimizer_state = trainable_state(network), None
    if accelerator.is_main_process:
        run.begin_checkpoint(step)
    accelerator.wait_for_everyone()
    run.write_process_state(run.checkpoint_tmp(step), accelerator.process_index, process_state)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        run.finish_checkpoint(
            step,
            weights=weights,
            optimizer=optimizer_state if optimizer_state is not None else optimizer.state_dict(),
            data_cursor=data_cursor,
            record=record,
            extra=extra,
            keep=keep,
        )
    accelerator.wait_for_everyone()


def loop_bookkeeping(
    accelerator,
    run: RunDir,
    method: str,
    record: dict,
    total: int,
    start: int,
    stop_after: int | None,
    show_progress: bool,
):
    """What every trainer's loop keeps beside its maths: the step to stop at (`total`, or `stop_after`
    as an interruption would), the NaN/inf guard, and the metrics tracker; returns (end, guard, tracker)."""
    from diffalign.align.guard import FiniteGuard
    from diffalign.align.tracking import Tracker

    end = total if stop_after is None else min(total, stop_after)
    tracker = Tracker(
        accelerator,
        run.metrics_path,
        project=f"diffalign-{method}",
        record=record,
        total_steps=total,
        start_step=start,
        show_progress=show_progress,
    )
    return end, FiniteGuard(accelerator.device), tracker


def save_final_model(run: RunDir, accelerator, guard, model, done: int, total: int) -> None:
    """When the run has reached its last step (`done == total`, not an interruption), check the NaN/inf
    guard and write `run.model_dir` from the main process: the folder `load_model(run_dir)` and
    `diffalign sample --model` read. Every process returns together."""
    if done != total:
        return
    guard.check(run.latest_checkpoint())
    if network_is_sharded(model.denoiser):
        with whole_parameters(model.denoiser):  # every process gathers; the main one writes
            if accelerator.is_main_process:
                model.save(run.model_dir)
    elif accelerator.is_main_process:
        model.save(run.model_dir)
    accelerator.wait_for_everyone()
