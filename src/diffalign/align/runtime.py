"""Where a trainer runs: the Accelerator, seeding, and how data is split across processes.

Every trainer builds its `accelerate.Accelerator` with `make_accelerator(RuntimeConfig, ...)`, so the
same config fields mean the same thing everywhere. Several processes are started by `accelerate launch`
(or any launcher that sets RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT); inside, the code is the same
as on one process.

The data rule (`global_batch_slice`): the batch of optimiser step k is a *global* batch of
`batch_size * num_processes * gradient_accumulation_steps` examples, a function of (seed, k) only.
Micro-batch m of process r is the slice starting at `(m * num_processes + r) * batch_size`. So every
example of the global batch is seen exactly once per step, whatever the process count, and a run on
2 processes computes the same update as a run on 1 process with twice the accumulation steps (up to
floating-point summation order).
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import numpy as np
import torch

DEVICES = ("auto", "cpu", "cuda")
MIXED_PRECISION = ("no", "fp16", "bf16")
OPTIMIZERS = ("adamw", "adamw_fused", "adamw_8bit")
COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
SHARDING = ("none", "fsdp")


@dataclass
class RuntimeConfig:
    """How and where a trainer runs (Accelerate).

    Attributes:
        device: "cpu", "cuda" or "auto" (CUDA when available). Under `accelerate launch` with GPUs,
            each process gets its own GPU.
        mixed_precision: "no" (float32), "fp16" or "bf16" autocast of the forward passes (losses and
            log-probabilities stay float32).
        gradient_accumulation_steps: micro-batches per optimiser step on each process; the effective
            batch is batch_size * processes * gradient_accumulation_steps.
        seed: seeds initialisation, every step's data, noise and timesteps.
        optimizer: "adamw" (torch's AdamW, multi-tensor), "adamw_fused" (torch's fused AdamW kernel:
            one launch for all parameters, on CUDA and CPU), or "adamw_8bit" (bitsandbytes' 8-bit
            AdamW, Dettmers et al. 2022: optimiser state in 8 bits, about 75% less optimiser memory;
            needs `pip install bitsandbytes` and a CUDA device).
        compile: "none", or a `torch.compile` mode for the denoiser ("default", "reduce-overhead" with
            CUDA graphs, "max-autotune", "max-autotune-no-cudagraphs"). The denoiser's repeated blocks
            are compiled one by one, in place (`compile_blocks`), so weight names, checkpoints and
            saved models are unchanged; the first steps pay the compilation.
        sharding: "none" (data parallel: each process holds the whole model) or "fsdp" (torch's
            FSDP2: weights, gradients and optimiser state split across the processes; full
            fine-tuning in `align dpo` / `align kto` only, at least 2 processes; `align.sharding`).
    """

    device: str = "auto"
    mixed_precision: str = "no"
    gradient_accumulation_steps: int = 1
    seed: int = 0
    optimizer: str = "adamw"
    compile: str = "none"
    sharding: str = "none"

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ValueError(f"runtime.device must be one of {DEVICES}, got {self.device!r}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(
                f"runtime.mixed_precision must be one of {MIXED_PRECISION}, got {self.mixed_precision!r}"
            )
        if self.gradient_accumulation_steps < 1:
            raise ValueError(
                f"runtime.gradient_accumulation_steps must be >= 1, got {self.gradient_accumulation_steps}"
            )
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"runtime.optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.compile not in COMPILE_MODES:
            raise ValueError(f"runtime.compile must be one of {COMPILE_MODES}, got {self.compile!r}")
        if self.sharding not in SHARDING:
            raise ValueError(f"runtime.sharding must be one of {SHARDING}, got {self.sharding!r}")


def make_accelerator(runtime: RuntimeConfig, log_with: list[str] | None = None, project_dir=None):
    """An `accelerate.Accelerator` for `runtime` (device, mixed precision, accumulation, trackers)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    if AcceleratorState._shared_state and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        # One process running trainers one after another (tests, benchmarks): Accelerate keeps its state
        # in a process-wide singleton that refuses a second, different mixed-precision setting.
        AcceleratorState._reset_state()
        GradientState._reset_state()
    if runtime.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("runtime.device is 'cuda' but no CUDA device is available (use cpu or auto)")
    if runtime.mixed_precision == "fp16" and runtime.device == "cpu":
        raise ValueError("runtime.mixed_precision 'fp16' needs a GPU; use 'no' or 'bf16' on the CPU")
    accelerator = Accelerator(
        cpu=runtime.device == "cpu",
        mixed_precision=runtime.mixed_precision,
        gradient_accumulation_steps=runtime.gradient_accumulation_steps,
        log_with=log_with,
        project_dir=str(project_dir) if project_dir is not None else None,
    )
    refuse_sharded_training(accelerator.distributed_type)
    return accelerator


#: Accelerate's sharded launch types, which the trainers refuse (`refuse_sharded_training`).
SHARDED_TYPES = ("FSDP", "DEEPSPEED", "MEGATRON_LM")


def refuse_sharded_training(distributed_type) -> None:
    """Stop a launch whose Accelerate distributed type is FSDP, DeepSpeed or Megatron-LM before
    anything is written.

    Accelerate's FSDP plugin wraps the network that `prepare` returns, while the trainers sample and
    evaluate the reference through the model's own network; diffalign shards that network in place
    itself instead (`runtime.sharding=fsdp`, torch's FSDP2, `diffalign.align.sharding`), which a
    data-parallel launch config turns on. DeepSpeed and Megatron-LM are not supported."""
    name = str(getattr(distributed_type, "value", distributed_type)).upper()
    if name == "FSDP":
        raise ValueError(
            "Accelerate's FSDP launch type is not used by the trainers: launch with a data-parallel "
            "config (examples/accelerate/ddp_8gpu.yaml) and set runtime.sharding=fsdp, which shards the "
            "model in place with torch's FSDP2 (align dpo / align kto, full fine-tuning; docs/scaling.md)"
        )
    if name in SHARDED_TYPES:
        raise ValueError(
            f"the trainers do not support {name}: launch with data parallelism instead "
            "(examples/accelerate/ddp_8gpu.yaml), with runtime.sharding=fsdp for full fine-tuning in "
            "align dpo / align kto, or fit the model with LoRA, pipeline.gradient_checkpointing, "
            "runtime.mixed_precision=bf16 and runtime.optimizer=adamw_8bit (docs/scaling.md)"
        )


def make_optimizer(
    params: list[torch.nn.Parameter], lr: float, weight_decay: float, runtime: RuntimeConfig
) -> torch.optim.Optimizer:
    """The trainers' AdamW of `runtime.optimizer` over `params` (see `RuntimeConfig.optimizer`)."""
    if runtime.optimizer == "adamw_8bit":
        try:
            import bitsandbytes
        except ImportError as error:
            raise ValueError(
                "runtime.optimizer 'adamw_8bit' needs the bitsandbytes package (pip install bitsandbytes)"
            ) from error
        return bitsandbytes.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay)
    fused = runtime.optimizer == "adamw_fused"
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None)


#: The blocks `compile_blocks` compiles and `align.sharding` shards one by one: diffusers' UNet blocks
#: (SD 1.x/2.x/XL), SD3's joint transformer blocks, and the tiny UNet's blocks.
REPEATED_BLOCKS = (
    "ResnetBlock2D",
    "Transformer2DModel",
    "JointTransformerBlock",
    "ResBlock",
    "SpatialTransformer",
)


def outermost_blocks(network: torch.nn.Module) -> list[torch.nn.Module]:
    """The blocks of `network` whose class is in `REPEATED_BLOCKS` and that no other such block holds."""
    found: list[str] = []
    blocks: list[torch.nn.Module] = []
    for name, module in network.named_modules():
        inside = any(name.startswith(prefix + ".") for prefix in found)
        if type(module).__name__ in REPEATED_BLOCKS and not inside:
            found.append(name)
            blocks.append(module)
    return blocks


def compile_blocks(network: torch.nn.Module, mode: str = "default", dynamic: bool | None = False) -> int:
    """Compile every outermost block of `network` whose class is in `REPEATED_BLOCKS`, in place
    (`nn.Module.compile`): regional compilation, where identical blocks share one compiled graph (on
    an H200 an SD1.5-shaped UNet's DPO step still took 152 s to compile cold, about what compiling the
    whole UNet took: its blocks come in many shapes; docs/scaling.md). Returns the number of blocks
    compiled.

    Why not the whole network: on the CPU (torch 2.13) compiling a whole diffusers UNet in place gave
    the right outputs but zero gradients for 84 of its 208 parameter tensors, while compiling it block
    by block matched eager gradients to 4e-6 (benchmarks/gpu_steps.py, docs/scaling.md). Dynamo's
    recompile limits are raised (blocks of several widths, with and without gradients or LoRA, each
    compile a graph) and hitting them is an error rather than a silent fall-back to eager.
    Raises ValueError when `network` has none of these blocks."""
    dynamo = torch._dynamo.config
    dynamo.cache_size_limit = max(dynamo.cache_size_limit, 256)
    if hasattr(dynamo, "accumulated_cache_size_limit"):
        dynamo.accumulated_cache_size_limit = max(dynamo.accumulated_cache_size_limit, 2048)
    if hasattr(dynamo, "fail_on_recompile_limit_hit"):
        dynamo.fail_on_recompile_limit_hit = True
    options = {"mode": None if mode == "default" else mode, "dynamic": dynamic}
    blocks = outermost_blocks(network)
    if not blocks:
        raise ValueError(
            f"runtime.compile: {type(network).__name__} has none of the blocks compiled one by one "
            f"({', '.join(REPEATED_BLOCKS)})"
        )
    for module in blocks:
        module.compile(**options)
    return len(blocks)


def prepare_training(accelerator, model, config, checkpoint=None):
    """What every trainer does between loading (and resuming) the weights and its first step, with a
    trainer config's `runtime`, `lr` and `weight_decay`: compile the denoiser's blocks, shard the model
    in place under `runtime.sharding=fsdp` (`align.sharding`), build the optimiser over
    `model.trainable_parameters()`, `accelerator.prepare` (a sharded network gets no DDP wrapper: FSDP2
    reduces the gradients itself), and load a resumed `checkpoint`'s optimiser state. Returns (the
    network the trainer's forward calls, the optimiser, its parameters)."""
    from diffalign.align.sharding import is_sharded, load_full_optimizer_state, shard_model

    runtime = config.runtime
    network = model.denoiser
    sharded = is_sharded(runtime)
    # Blocks are compiled before sharding (FSDP2 renames each unit's class, which `compile_blocks`
    # selects by); FSDP's hooks stay outside the compiled graphs (torch disables dynamo on them).
    compile_network(network, runtime)
    if sharded:
        shard_model(model, device=accelerator.device)  # the policy and its frozen reference
    params = model.trainable_parameters()
    optimizer = make_optimizer(params, config.lr, config.weight_decay, runtime)
    if sharded:
        forward, optimizer = network, accelerator.prepare(optimizer)
    else:
        forward, optimizer = accelerator.prepare(network, optimizer)
    if checkpoint is not None:
        if sharded:
            load_full_optimizer_state(network, optimizer, checkpoint.optimizer)
        else:
            optimizer.load_state_dict(checkpoint.optimizer)
    return forward, optimizer, params


def compile_network(network: torch.nn.Module, runtime: RuntimeConfig) -> None:
    """Compile `network`'s blocks in place with `runtime.compile`'s mode (nothing for "none")."""
    if runtime.compile != "none":
        compile_blocks(network, runtime.compile)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and every CUDA device) with `seed`."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def step_generator(
    seed: int, step: int, device: torch.device | str = "cpu", stream: int = 0
) -> torch.Generator:
    """The generator of optimiser step `step` (and an optional sub-stream): a function of its arguments
    only, so a resumed run draws exactly what the uninterrupted run drew."""
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + step) * 31 + stream)


def global_batch_slice(micro: int, process_index: int, num_processes: int, batch_size: int) -> slice:
    """Rows of the step's global batch that micro-batch `micro` of process `process_index` takes."""
    start = (micro * num_processes + process_index) * batch_size
    return slice(start, start + batch_size)


def epoch_indices(n: int, seed: int, start: int, count: int) -> torch.Tensor:
    """Examples `start .. start + count - 1` of an endless stream over `n` examples that visits each
    once per epoch in a seeded random order (epoch e's order is a function of (seed, e))."""
    if n < 1:
        raise ValueError("epoch_indices: there are no examples to draw from")
    out = []
    position = start
    end = start + count
    while position < end:
        epoch, offset = divmod(position, n)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
        take = min(n - offset, end - position)
        out.append(order[offset : offset + take])
        position += take
    return torch.cat(out)
