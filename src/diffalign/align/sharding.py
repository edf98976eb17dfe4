"""Fully sharded data parallel training (`runtime.sharding="fsdp"`): torch's FSDP2 (`fully_shard`).

With data parallelism (DDP) every process holds the whole network, its gradients and the optimiser's
two AdamW moments: four copies of the weights per GPU. `fully_shard` splits each parameter along its
first dimension across the processes, so each holds 1/N of the weights, gradients and optimiser state;
a block's full weights exist only while it runs (all-gathered before its forward and backward, freed
after; gradients are reduce-scattered). It is the memory lever for full fine-tuning of models whose
optimiser state does not fit one device (Zhao et al. 2023, "PyTorch FSDP").

Why FSDP2 and not Accelerate's FSDP plugin: `fully_shard` changes the network in place, so the model's
own methods (sampling, the reference forward, the prediction helpers) run on the sharded network as
they are, with no wrapper to route through; and it runs on the CPU with gloo, so the 2-process tests
check it on every test run. Accelerate's FSDP launch type is refused (`runtime.refuse_sharded_training`)
with a pointer to this option, which any data-parallel launch config (`ddp_8gpu.yaml`) turns on.

What is sharded: every outermost block of the denoiser whose class is in `runtime.REPEATED_BLOCKS`
(diffusers' ResnetBlock2D / Transformer2DModel / JointTransformerBlock, the tiny UNet's blocks), then
the denoiser itself (the rest of its weights: embeddings, input and output layers). The frozen
reference copy is sharded the same way (it only runs forward). Checkpoints and the final model are
written whole: every process takes part in gathering the full weights and optimiser state
(`full_weights`, `full_optimizer_state`), the main process writes them, and a resumed run loads them
before sharding (weights) or into the sharded optimiser (`load_full_optimizer_state`).

Supported, with full fine-tuning, in every trainer: the DPO family (`align dpo`, `kto`, and
`online-dpo` and `spin`, whose rounds sample their pairs with the whole starting model, each process
its share, before it is sharded for the round's training), the policy-gradient trainers (`ddpo`,
`dpok`, `grpo`), DiffusionNFT and reward backpropagation (`alignprop`, `draft`, `draft-lv`, `refl`),
which sample with the sharded network: every process samples its equal share, and anything that runs
the model (a drift estimate, a benchmark's callback) runs on every process, so the all-gathers stay in
step. With `runtime.compile` the blocks are compiled first, then sharded (`runtime.prepare_training`).
Refused with an error that says so: LoRA (whose point is that the frozen weights need no gradients or
optimiser state) and one process.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn


def is_sharded(runtime) -> bool:
    """Whether `runtime` (a `RuntimeConfig`) asks for FSDP."""
    return runtime.sharding == "fsdp"


def runs_callbacks(accelerator, runtime) -> bool:
    """Whether this process calls a trainer's per-step callback (a benchmark's evaluation): the main
    process, or every process when the model is sharded (it then runs only with all of them)."""
    return accelerator.is_main_process or is_sharded(runtime)


def network_is_sharded(network: nn.Module) -> bool:
    """Whether `network`'s weights are sharded (DTensors, as `fully_shard` leaves them)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in network.parameters())


def check_sharding(runtime, *, num_processes: int, lora: bool) -> None:
    """The combinations FSDP refuses, with the reason."""
    if not is_sharded(runtime):
        return
    if num_processes < 2:
        raise ValueError(
            "runtime.sharding=fsdp shards the model across processes, but this run has one; start it "
            "with `accelerate launch --num_processes N` (N >= 2) or use runtime.sharding=none"
        )
    if lora:
        raise ValueError(
            "runtime.sharding=fsdp with LoRA (lora_rank > 0) is not supported: with LoRA the frozen "
            "weights carry no gradients or optimiser state, so data parallelism (runtime.sharding=none) "
            "already holds little per process"
        )


def shard_network(network: nn.Module, device: torch.device) -> None:
    """Shard `network` in place over every process of the default process group: its outermost
    repeated blocks one by one, then the network itself."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from diffalign.align.runtime import outermost_blocks

    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    # FSDP shards contiguous parameters only (convolution weights may be channels_last)
    network.to(memory_format=torch.contiguous_format)
    for module in outermost_blocks(network):
        fully_shard(module, mesh=mesh)
    # The root too frees its gathered weights after each forward (FSDP2 keeps them by default, for the
    # backward that usually follows): a no-gradient forward (sampling, a drift estimate) would otherwise
    # leave the whole weights registered in place of the shards the optimiser holds.
    fully_shard(network, mesh=mesh, reshard_after_forward=True)


def resharded(network: nn.Module) -> nn.Module:
    """`network` with every FSDP unit's shards registered (none left gathered by a forward)."""
    from torch.distributed.fsdp import FSDPModule

    for module in network.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
    return network


def shard_model(model, device: torch.device) -> None:
    """Shard `model.denoiser` and its frozen reference copy (`FrozenReference`) in place."""
    shard_network(model.denoiser, device)
    reference = model.reference_network()
    if reference is not None:
        shard_network(reference, device)


def whole_value(value: Tensor) -> Tensor:
    """A DTensor's whole value (sharded weights, or a gradient norm computed on them) as a plain tensor
    (a collective: every process must call it); a plain tensor as is."""
    from torch.distributed.tensor import DTensor

    return value.full_tensor() if isinstance(value, DTensor) else value


def local_value(value: Tensor) -> Tensor:
    """This process's shard of a DTensor (a view: writing it writes the shard); a plain tensor as is."""
    from torch.distributed.tensor import DTensor

    return value.to_local() if isinstance(value, DTensor) else value


def full_weights(network: nn.Module) -> dict[str, Tensor]:
    """{name: the whole weight, detached, on the CPU} of `network`'s trainable weights. Sharded weights
    are gathered: every process must call it."""
    params = resharded(network).named_parameters()
    return {name: whole_value(p.detach()).cpu() for name, p in params if p.requires_grad}


def full_optimizer_state(network: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimiser's state with whole tensors, keyed by parameter name (torch.distributed.checkpoint's
    full state dict); every process must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(resharded(network), _unwrapped(optimizer), options=options)


def load_full_optimizer_state(network: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a `full_optimizer_state` into the sharded optimiser (each process keeps its shard)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True)
    set_optimizer_state_dict(network, _unwrapped(optimizer), optim_state_dict=state, options=options)


def _unwrapped(optimizer):
    """The torch optimiser inside Accelerate's `AcceleratedOptimizer`."""
    return getattr(optimizer, "optimizer", optimizer)


@contextlib.contextmanager
def whole_parameters(network: nn.Module) -> Iterator[None]:
    """Inside, `network` looks unsharded to code that reads it: its sharded parameters are replaced by
    plain tensors holding their whole values and its modules have their own classes back (`fully_shard`
    gives each a subclass named FSDP<class>, which a diffusers pipeline folder would record), so a
    model's `save` writes the full model as usual; outside, the sharded network is back. Gathering is a
    collective: every process must enter. No forward may run inside."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    classes: list[tuple[nn.Module, type]] = []
    for module in resharded(network).modules():
        for name, param in list(module._parameters.items()):
            if isinstance(param, DTensor):
                whole = nn.Parameter(param.detach().full_tensor(), requires_grad=param.requires_grad)
                swapped.append((module, name, param))
                module._parameters[name] = whole
        if isinstance(module, FSDPModule):
            classes.append((module, type(module)))
            module.__class__ = next(c for c in type(module).__mro__ if not issubclass(c, FSDPModule))
    try:
        yield
    finally:
        for module, name, param in swapped:
            module._parameters[name] = param
        for module, cls in classes:
            module.__class__ = cls
