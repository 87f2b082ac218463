"""Processes: the trainer's view of the process group, on top of `accelerate`.

One process is the common case and costs nothing here: every collective below returns its input. Under
`accelerate launch` (or torchrun) each process rolls out its share of the step's prompts, whole groups only, and
the update runs data-parallel through accelerate's DDP wrapper of the model (`configs/accelerate/ddp.yaml`), or,
with `train.sharding=fsdp`, through FSDP2 (`fsdp.py`; accelerate's own FSDP and DeepSpeed launches are refused, see
docs/scale-out.md). The gradient of a step equals the one-process gradient
of the same global batch because

- every loss normaliser (token and sequence counts) is summed over processes before the loss is formed, and
- each process's loss is multiplied by the number of processes, which undoes the wrapper's gradient averaging.

Micro-batch counts may differ between processes (the zero-advantage skip, uneven dynamic sampling), so all real
backward passes run without gradient synchronisation and one zero-loss pass, the same on every process, reduces the
accumulated gradients (`sync_gradients`). Under FSDP every backward reduces, so the update pads the processes to
the same number of passes instead (`PolicyUpdate`).
"""

from __future__ import annotations

import os
import time
from contextlib import nullcontext
from typing import Any, TypeVar

import torch

from reasonrl.errors import UserError

T = TypeVar("T")


def world_size_from_env() -> int:
    """Processes of this launch, as torchrun / accelerate launch set them (1 when not launched)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank_from_env() -> int:
    """This process's rank in its launch (0 when not launched), known before the process group exists."""
    return int(os.environ.get("RANK", "0"))


def runs_on_cpu(device: str) -> bool:
    """Whether processes with `model.device=device` run on the CPU: accelerate then sets up a gloo process group
    (it does so only when told it runs on the CPU)."""
    return device == "cpu" or not torch.cuda.is_available()


def agree(obj: T, device: str) -> T:
    """Process 0's `obj` on every process of a launch (e.g. a run name drawn from the clock); identity for one."""
    if world_size_from_env() == 1:
        return obj
    from accelerate import PartialState

    PartialState(cpu=runs_on_cpu(device))  # sets up the process group that the trainer's Accelerator then uses
    return _broadcast(obj)


def _broadcast(obj: T) -> T:
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


_SHARDED = ("FSDP", "DEEPSPEED", "MEGATRON_LM")


def _refuse_sharded(kind: str) -> None:
    if kind in _SHARDED:
        raise UserError(
            f"an accelerate {kind} launch is not supported: launch with configs/accelerate/ddp.yaml (no --use_fsdp / "
            "--use_deepspeed) and set train.sharding=fsdp to shard the model (docs/scale-out.md)"
        )


class Processes:
    """Rank, world size and the few collectives the trainer needs; wraps an `accelerate.Accelerator`."""

    def __init__(self, mixed_precision: str = "none", cpu: bool = False, sharding: str = "none") -> None:
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState
        from accelerate.utils import DistributedDataParallelKwargs

        # accelerate keeps its settings in a process-wide singleton; a second trainer in the same Python process (a
        # notebook, the tests) may want other ones. The process group itself (PartialState) is kept.
        AcceleratorState._reset_state(reset_partial_state=False)
        # Every parameter is used in every forward (tied embeddings included): no unused-parameter search.
        ddp = DistributedDataParallelKwargs(find_unused_parameters=False)
        for kind in _SHARDED:  # checked before accelerate builds its plugin (which fails without a GPU)
            if os.environ.get(f"ACCELERATE_USE_{kind}", "false").lower() in ("1", "true", "yes"):
                _refuse_sharded(kind)
        if cpu and mixed_precision == "fp16":  # accelerate would quietly run it in float32
            raise UserError("train.mixed_precision=fp16 needs a GPU; on the CPU use bf16 or none")
        # FSDP computes in the policy's compute dtype itself (`fsdp.shard`): accelerate's autocast stays off (one
        # process is not sharded and keeps it)
        sharded = sharding == "fsdp" and world_size_from_env() > 1
        precision = "no" if mixed_precision == "none" or sharded else mixed_precision
        try:
            self.accelerator = Accelerator(mixed_precision=precision, cpu=cpu, kwargs_handlers=[ddp])
        except ValueError as e:  # a precision this machine cannot run (e.g. bf16 on an old GPU)
            raise UserError(f"train.mixed_precision={mixed_precision}: {str(e).splitlines()[0]}") from None
        _refuse_sharded(self.accelerator.distributed_type.value)
        self.rank = self.accelerator.process_index
        self.world = self.accelerator.num_processes
        self.is_main = self.accelerator.is_main_process
        self.device = self.accelerator.device
        # one process has nothing to shard: it trains the whole model as without the option
        self.sharded = sharded and self.world > 1

    # ---- model -----------------------------------------------------------------------------------------------

    def prepare(self, model: Any, optimizer: torch.optim.Optimizer) -> tuple[Any, torch.optim.Optimizer]:
        """(the model the loss runs through, the optimiser); generation and checkpoints use the bare model.

        accelerate puts autocast into the model's own `forward`; it is taken out again so that mixed precision
        covers the loss passes only (`autocast`), and sampling keeps the weights' dtype (its KV-cached decode
        calls the layers directly, where a half-applied autocast would mix dtypes)."""
        if self.sharded:  # already sharded (`shard`): FSDP2 modules are their own wrapper
            return model, optimizer
        wrapped, optimizer = self.accelerator.prepare(model, optimizer)
        if "_original_forward" in vars(model):
            model.forward = model._original_forward
            del model._original_forward
        return wrapped, optimizer

    def shard_model(self, model: Any, compute_dtype: torch.dtype | None, options: Any, trained: bool = True) -> Any:
        """`model` sharded in place under `train.sharding=fsdp` (before its optimiser exists), else as it is.
        `options`: `train.fsdp`; a model that is not `trained` (the reference) runs no backward, so it frees its
        gathered weights after every forward, and needs no activation checkpoints."""
        if not self.sharded:
            return model
        from reasonrl.training.fsdp import shard

        return shard(
            model,
            compute_dtype,
            reshard_after_forward=options.reshard_after_forward or not trained,
            cpu_offload=options.cpu_offload,
            activation_checkpointing=options.activation_checkpointing and trained,
        )

    def full_weights(self, model: Any) -> Any:
        """A window with the whole weights on every process (sampling, evaluation); a no-op unless sharded."""
        if not self.sharded:
            return nullcontext()
        from reasonrl.training.fsdp import full_weights

        return full_weights(model)

    def autocast(self) -> Any:
        """`train.mixed_precision` for a loss pass (a no-op at "no")."""
        return self.accelerator.autocast()

    def no_sync(self, model: Any) -> Any:
        return self.accelerator.no_sync(model) if self.world > 1 and not self.sharded else nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    def sync_gradients(self, model: Any, dummy_ids: torch.Tensor) -> None:
        """Average the gradients accumulated under `no_sync` across processes: one zero-loss forward/backward through
        the wrapped model, which every process runs once per optimiser step whatever its own micro-batch count."""
        if self.world == 1 or self.sharded:  # FSDP reduces at every backward
            return
        self.dummy_passes(model, dummy_ids, 1, grad=True)

    def dummy_passes(self, model: Any, dummy_ids: torch.Tensor, count: int, grad: bool) -> None:
        """`count` passes whose loss is zero: a process with fewer micro-batches than the others joins their
        all-gathers (and, with `grad`, reduce-scatters) under FSDP."""
        for _ in range(count):
            with torch.set_grad_enabled(grad):
                logits = model(input_ids=dummy_ids, use_cache=False).logits
                if grad:
                    self.backward(logits.float().sum() * 0.0)

    def clip_grad_norm(self, parameters: Any, max_norm: float) -> torch.Tensor:
        if self.sharded:  # sharded gradients: torch's clip reduces the norm over processes
            norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
            return norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        return self.accelerator.clip_grad_norm_(parameters, max_norm)

    # ---- collectives (identity with one process) -----------------------------------------------------------

    def shard(self, items: list[T]) -> list[T]:
        """This process's contiguous share of a global list (sizes differ by at most one; whole items only)."""
        if self.world == 1:
            return items
        base, extra = divmod(len(items), self.world)
        lo = self.rank * base + min(self.rank, extra)
        return items[lo : lo + base + (self.rank < extra)]

    def gather(self, items: list[T]) -> list[T]:
        """Every process's list, concatenated in rank order, on every process."""
        if self.world == 1:
            return items
        from accelerate.utils import gather_object

        return gather_object(items)

    def sum(self, value: float) -> float:
        return self._reduce(value, torch.distributed.ReduceOp.SUM) if self.world > 1 else value

    def sum_dict(self, values: dict[str, float]) -> dict[str, float]:
        """Sums over processes of every value, in one collective (every process has the same keys)."""
        if self.world == 1:
            return values
        t = torch.tensor(list(values.values()), dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return dict(zip(values, t.tolist(), strict=True))

    def max(self, value: float) -> float:
        return self._reduce(value, torch.distributed.ReduceOp.MAX) if self.world > 1 else value

    def _reduce(self, value: float, op: Any) -> float:
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t, op=op)
        return float(t.item())

    def broadcast(self, obj: T) -> T:
        """Rank 0's object, on every process."""
        return obj if self.world == 1 else _broadcast(obj)

    def barrier(self) -> None:
        if self.world > 1:
            self.accelerator.wait_for_everyone()

    def close(self) -> None:
        """Destroy the process group (a no-op for one process); each process calls it once, last.

        gloo's worker threads free each finished collective's tensors themselves, which takes the GIL, and a thread
        that asks for it while the interpreter shuts down aborts the process (SIGABRT, "terminate called without an
        active exception"), failing a finished launch. The DDP wrapper keeps the group and its threads alive past
        `destroy_process_group`, so they are given the GIL here (measured: 3 of 40 launches of a 2-process script
        aborted at exit without the pause, 0 of 100 with it). accelerate's state is reset so that a later trainer
        sets up a fresh group."""
        if self.world == 1 or not torch.distributed.is_initialized():
            return
        from accelerate.state import AcceleratorState

        torch.distributed.destroy_process_group()
        AcceleratorState._reset_state(reset_partial_state=True)
        time.sleep(0.05)  # releases the GIL: a gloo thread waiting for it frees its tensors now
