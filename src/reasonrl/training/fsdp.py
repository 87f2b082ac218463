"""`train.sharding=fsdp`: torch FSDP2 (`fully_shard`) of the policy and the reference model, under a multi-process
launch; accelerate (or torchrun) only starts the processes (its FSDP plugin does not run on CPU processes).

Each decoder layer is one FSDP unit and the root holds the rest (embeddings, final norm, head), so a process keeps
1/N of the float32 parameters, gradients and AdamW state. With a bf16/fp16 compute dtype the units all-gather and
compute in it and reduce gradients in float32 (`MixedPrecisionPolicy`): the master weights stay float32.

Three rules keep the processes in step, since every forward all-gathers and every backward reduce-scatters:
- every process runs the same number of forward (and backward) passes: the update pads with dummy passes;
- sampling runs in a window (`full_weights`) in which every unit is gathered once and stays gathered, so processes
  may decode different lengths; afterwards every unit is sharded again (gathering the root alone leaves the layers
  sharded, and resharding only the root would keep the layers' full weights in memory);
- state dicts are gathered collectively (every process calls `model_state` / `optimizer_state`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch


def fsdp_units(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules each sharded on their own: the decoder layers (transformers' `_no_split_modules` classes)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names and m is not model]


def shard(
    model: torch.nn.Module,
    compute_dtype: torch.dtype | None,
    *,
    reshard_after_forward: bool = True,
    cpu_offload: bool = False,
    activation_checkpointing: bool = False,
) -> torch.nn.Module:
    """`fully_shard` every decoder layer, then the root, in place, over all processes of the launch.

    `compute_dtype`: the dtype the units gather and compute in when it is not the parameters' (bf16 over float32
    master weights); gradients are reduced in float32. The rest are `train.fsdp.*`: every unit, the root included,
    frees its gathered weights after its forward or keeps them until its backward; the shards live in CPU memory
    (`CPUOffloadPolicy`); each decoder layer is wrapped in torch's activation-checkpoint wrapper before it is
    sharded, so that its recomputation runs inside the unit, on the weights its backward gathers."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    device = next(model.parameters()).device.type
    mesh = init_device_mesh(device, (torch.distributed.get_world_size(),))
    offload = CPUOffloadPolicy(pin_memory=device == "cuda") if cpu_offload else OffloadPolicy()
    kwargs: dict[str, Any] = {"mesh": mesh, "reshard_after_forward": reshard_after_forward, "offload_policy": offload}
    if compute_dtype is not None and compute_dtype != next(model.parameters()).dtype:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    units = fsdp_units(model)
    if activation_checkpointing:
        units = [_checkpointed(model, unit) for unit in units]
    for unit in units:
        fully_shard(unit, **kwargs)
    fully_shard(model, **kwargs)
    model._reasonrl_reshard_after_forward = reshard_after_forward  # what `full_weights` restores
    return model


def _checkpointed(model: torch.nn.Module, layer: torch.nn.Module) -> torch.nn.Module:
    """`layer` replaced in its parent by torch's non-reentrant checkpoint wrapper of it (attributes pass through the
    wrapper, and state-dict keys keep the layer's names)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    name = next(n for n, m in model.named_modules() if m is layer)
    parent_name, _, child = name.rpartition(".")
    wrapped = checkpoint_wrapper(layer)
    model.get_submodule(parent_name).register_module(child, wrapped)
    return wrapped


def is_sharded(model: Any) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _modules(model: torch.nn.Module) -> list[Any]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextmanager
def full_weights(model: torch.nn.Module) -> Iterator[None]:
    """Every unit's full weights for the duration (sampling, evaluation); sharded again after. Collective: every
    process enters and leaves together; inside, forwards run no collective."""
    modules = _modules(model)
    handles = [m.unshard(async_op=True) for m in modules]
    for h in handles:
        if h is not None:
            h.wait()
    for m in modules:
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        after = getattr(model, "_reasonrl_reshard_after_forward", True)  # train.fsdp.reshard_after_forward
        for m in modules:
            m.reshard()
            m.set_reshard_after_forward(after, recurse=False)


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full state dict on the CPU of process 0 (empty elsewhere). Collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # a tied parameter (the head sharing the embedding) comes back once per name, as separate copies: keep the first,
    # as `save_pretrained` does for the unsharded model
    seen: set[int] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            state.pop(name, None)
        seen.add(id(p))
    return state


def load_model_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Every process passes the full state dict (read from the same file); each keeps its shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))


def optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """AdamW's full state keyed by parameter name (independent of the process count), on process 0. Collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Every process passes the full optimiser state; each keeps its shard of it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
