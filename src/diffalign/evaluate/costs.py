"""What a stage of the alignment loop costs, measured while it runs: `CostMeter`.

A trainer loads its own copy of the model, so the meter does not wrap a model object: it installs a
global forward hook (`torch.nn.modules.module.register_module_forward_hook`) that counts every call of a
denoiser network, identified by its class (`network_types`, e.g. `type(model.denoiser)`).

- **forward NFEs**: rows (latents) evaluated by the denoiser, one per latent, so a classifier-free-guided
  step costs 2 per sample, as `Trajectory.nfe` and `diffalign.steer.budget` count it. Policy and frozen
  reference copies are both counted (both are computed). The recomputation that activation
  checkpointing does during the backward pass is not counted (it shows in the wall time only).
- **backward NFEs**: rows whose denoiser output received a gradient (counted by a hook on the output
  tensor when its gradient is computed).
- **reward queries**: images scored by a reward wrapped with `CostMeter.count_reward`.
- **peak memory**: on CUDA, `torch.cuda.max_memory_allocated` over the stage; on CPU (Linux), the largest
  increase of the process's resident set size over its value at the start of the stage, sampled every
  `sample_every_s` seconds from /proc/self/statm (allocations shorter than that can be missed). Before
  the stage starts, garbage is collected and glibc's `malloc_trim` hands freed heap back to the system,
  so the stage's increase is not hidden by memory an earlier stage freed but the allocator kept. Where
  neither is available, `peak_memory_mb` is None and `memory_kind` says "unavailable".
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

from diffalign.rewards.protocol import Reward

STATM = Path("/proc/self/statm")


@dataclass
class StageCost:
    """The measured cost of one stage.

    Attributes:
        wall_s: wall-clock seconds.
        forward_nfe: denoiser rows evaluated (see the module doc).
        backward_nfe: denoiser rows that were backpropagated.
        reward_queries: images scored by the counted rewards.
        reward_grads: images whose reward score was backpropagated.
        peak_memory_mb: peak memory of the stage in MiB (None where it cannot be measured).
        memory_kind: "cuda" (allocated by torch), "cpu-rss" (resident set increase) or "unavailable".
    """

    wall_s: float = 0.0
    forward_nfe: int = 0
    backward_nfe: int = 0
    reward_queries: int = 0
    reward_grads: int = 0
    peak_memory_mb: float | None = None
    memory_kind: str = "unavailable"

    def to_dict(self) -> dict:
        return asdict(self)


def _release_freed_memory() -> None:
    """Collect garbage and return freed heap pages to the system (glibc; a no-op elsewhere)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _rss_bytes() -> int:
    """The resident set size of this process (Linux /proc)."""
    fields = STATM.read_text().split()
    return int(fields[1]) * os.sysconf("SC_PAGE_SIZE")


class _RssSampler:
    """A daemon thread recording the largest resident set size seen."""

    def __init__(self, every_s: float) -> None:
        self.every_s = every_s
        self.start_rss = _rss_bytes()
        self.peak = self.start_rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.peak = max(self.peak, _rss_bytes())

    def stop(self) -> float:
        """Stop sampling; returns the peak increase in MiB."""
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())
        return (self.peak - self.start_rss) / 2**20


class CountedReward:
    """A `Reward` that forwards to `reward` and adds the images it scores to a `StageCost`."""

    def __init__(self, reward: Reward, cost: StageCost) -> None:
        self.reward = reward
        self.cost = cost
        self.name = reward.name
        self.differentiable = bool(getattr(reward, "differentiable", False))

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        out = self.reward(images, list(prompts))
        rows = int(images.shape[0])
        self.cost.reward_queries += rows
        if isinstance(out, Tensor) and out.requires_grad:

            def on_backward(grad: Tensor) -> None:
                self.cost.reward_grads += rows

            out.register_hook(on_backward)
        return out


def _network_output(output: object) -> object:
    """The prediction tensor of a denoiser call: the tensor itself (the tiny UNet), the first element of
    a tuple (diffusers with `return_dict=False`), or the `.sample` of a diffusers output object."""
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    sample = getattr(output, "sample", None)
    return sample if isinstance(sample, Tensor) else output


class CostMeter:
    """Measure a stage: `with CostMeter((TinyUNet,), device) as meter: ...; meter.cost`.

    Args:
        network_types: the denoiser network classes whose calls are NFEs.
        device: where the stage runs ("cuda..." measures CUDA memory, anything else the process RSS).
        sample_every_s: the RSS sampling period on CPU.
    """

    def __init__(
        self,
        network_types: Sequence[type],
        device: torch.device | str = "cpu",
        sample_every_s: float = 0.02,
    ) -> None:
        if not network_types:
            raise ValueError("CostMeter needs at least one denoiser network class to count")
        self.network_types = tuple(network_types)
        self.device = torch.device(device)
        self.sample_every_s = sample_every_s
        self.cost = StageCost()
        self._handle = None
        self._sampler: _RssSampler | None = None
        self._started = 0.0
        self._cuda_start = 0

    def count_reward(self, reward: Reward) -> CountedReward:
        """`reward`, counting the images it scores into this meter."""
        return CountedReward(reward, self.cost)

    def _on_forward(self, module: torch.nn.Module, args: tuple, output: object) -> None:
        if not isinstance(module, self.network_types) or not args or not isinstance(args[0], Tensor):
            return
        rows = int(args[0].shape[0])
        self.cost.forward_nfe += rows
        output = _network_output(output)
        if isinstance(output, Tensor) and output.requires_grad:

            def on_backward(grad: Tensor) -> None:
                self.cost.backward_nfe += rows

            output.register_hook(on_backward)

    def __enter__(self) -> CostMeter:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._cuda_start = torch.cuda.memory_allocated(self.device)
        elif STATM.is_file():
            _release_freed_memory()
            self._sampler = _RssSampler(self.sample_every_s)
        self._handle = torch.nn.modules.module.register_module_forward_hook(self._on_forward)
        self._started = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.cost.wall_s = time.perf_counter() - self._started
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device) - self._cuda_start
            self.cost.peak_memory_mb, self.cost.memory_kind = peak / 2**20, "cuda"
        elif self._sampler is not None:
            self.cost.peak_memory_mb, self.cost.memory_kind = self._sampler.stop(), "cpu-rss"
            self._sampler = None


def denoiser_types() -> tuple[type, ...]:
    """The denoiser network classes diffalign trains: the tiny UNet, and diffusers' UNet and SD3
    transformer when diffusers is installed."""
    from diffalign.models.tiny_unet import TinyUNet

    types: list[type] = [TinyUNet]
    try:
        from diffusers import SD3Transformer2DModel, UNet2DConditionModel
    except ImportError:
        return tuple(types)
    return (*types, UNet2DConditionModel, SD3Transformer2DModel)


COSTS_FILE = "costs.json"
#: Each further process's own measurement of a multi-process run (`add_run_costs(..., rank=r)`).
RANK_COSTS_FILE = "costs-rank-{rank}.json"
SUMMED = ("wall_s", "forward_nfe", "backward_nfe", "reward_queries", "reward_grads")
#: What every costs file holds (`StageCost`'s fields, as `add_run_costs` writes them).
COST_FIELDS: tuple[str, ...] = tuple(StageCost.__dataclass_fields__)
#: The counts a run's processes add up to (each process evaluates and scores its own share).
PROCESS_SUMMED = ("forward_nfe", "backward_nfe", "reward_queries", "reward_grads")


def _merge(total: dict, other: dict, summed: Sequence[str]) -> None:
    """Add `other`'s counts named in `summed` into `total` (a count either left null stays null) and
    keep the larger peak memory, in place."""
    for key in summed:
        a, b = total.get(key), other.get(key)
        total[key] = None if a is None or b is None else a + b
    peaks = [m for m in (total.get("peak_memory_mb"), other.get("peak_memory_mb")) if m is not None]
    total["peak_memory_mb"] = max(peaks) if peaks else None


def add_run_costs(
    run_dir: str | Path, cost: StageCost, rewards_counted: bool = True, processes: int = 1, rank: int = 0
) -> dict:
    """Add one session's cost to `run_dir/costs.json` (a resumed run adds up its sessions; memory is the
    largest peak of any session); returns what was written. With `rewards_counted=False` (the reward
    was not wrapped with `CostMeter.count_reward`) the reward counts are written as null, not 0.
    `processes` > 1: `cost` is one process's of a multi-process session, recorded as `processes`
    (the most of any session); process `rank` > 0 writes its own file, `costs-rank-RANK.json`, so no
    two processes write one file, and `read_run_costs` adds them up."""
    path = Path(run_dir) / (COSTS_FILE if rank == 0 else RANK_COSTS_FILE.format(rank=rank))
    total = cost.to_dict() | {"sessions": 1, "processes": processes}
    if not rewards_counted:
        total["reward_queries"] = total["reward_grads"] = None
    if path.is_file():
        had = json.loads(path.read_text(encoding="utf-8"))
        _merge(total, had, SUMMED)
        total["sessions"] = int(had.get("sessions", 1)) + 1
        total["processes"] = max(int(had.get("processes", 1)), processes)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(total, indent=1), encoding="utf-8")
    tmp.replace(path)
    return total


def read_run_costs(run_dir: str | Path) -> dict | None:
    """A run folder's costs: `costs.json` (the main process's measurement, its wall time the run's)
    with the counts of every other process's `costs-rank-*.json` added (forward and backward NFEs,
    reward queries and gradients; a count any process left null stays null) and the largest peak
    memory of any process (memory is per device); `processes_counted` says how many processes'
    measurements the counts hold. None when the run has no costs.json. Raises ValueError naming a file
    that is not readable JSON, lacks a measurement `add_run_costs` writes, or holds a count that is not
    a number (or null)."""
    run_dir = Path(run_dir)
    main = run_dir / COSTS_FILE
    if not main.is_file():
        return None

    def load(path: Path) -> dict:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{path}: not a readable costs file ({err})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: not a costs file (a JSON object)")
        missing = [key for key in COST_FIELDS if key not in data]
        if missing:
            raise ValueError(f"{path}: not a costs file, it lacks {', '.join(map(repr, missing))}")
        for key in (*SUMMED, "peak_memory_mb"):
            value = data[key]
            if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
                raise ValueError(f"{path}: {key!r} must be a number or null, got {value!r}")
        if not isinstance(data["memory_kind"], str):
            raise ValueError(f"{path}: 'memory_kind' must be a string, got {data['memory_kind']!r}")
        return data

    total = load(main)
    others = sorted(run_dir.glob(RANK_COSTS_FILE.format(rank="*")))
    for path in others:
        _merge(total, load(path), PROCESS_SUMMED)
    total["processes_counted"] = 1 + len(others)
    return total
