"""Run by tests/test_distributed.py, once as a single process and once under `accelerate launch` with 2 processes:
one optimisation step on a fixed global batch, then process 0 saves the parameters and the step's metrics.

Every process builds the same untrained tiny model and samples the same global batch (same seed, same weights),
then trains on its own share of whole groups, as `Trainer.step` shards them."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from reasonrl import algorithms
from reasonrl.config import load_config
from reasonrl.rollout.base import SamplingParams
from reasonrl.training.batch import make_micro_batches
from reasonrl.training.trainer import Trainer


def main(out: str, run_dir: str, *overrides: str) -> None:
    torch.set_num_threads(1)
    cfg = load_config(None, list(overrides))
    trainer = Trainer(cfg, Path(run_dir))
    G = cfg.rollout.group_size
    try:
        problems = trainer.stream.take(cfg.rollout.prompts_per_step)
        prompts = [trainer._prompt_ids([p.prompt])[0] for p in problems]
        torch.manual_seed(1234)  # the same global batch in every process
        with trainer.sampling_window():  # train.sharding=fsdp: sampling from the policy needs the whole weights
            _check_gathered(trainer, gathered=True)
            comps = trainer.engine.generate(prompts, G, SamplingParams(cfg.rollout.max_new_tokens, 1.0))
        _check_gathered(trainer, gathered=False)
        trainer.engine.shares_policy_weights = False  # an engine with its own copy (vLLM): nothing to gather
        with trainer.sampling_window():
            _check_gathered(trainer, gathered=False)
        del trainer.engine.shares_policy_weights
        # rewards from completion lengths: every group informative, some sequences with advantage 0
        rewards = torch.tensor([float(len(c.token_ids) % 3) for c in comps], dtype=torch.float64)
        group_ids = torch.arange(len(problems)).repeat_interleave(G)
        advantages = algorithms.compute_advantages("grpo", rewards, group_ids, scale_rewards="none", eps=1e-4)
        advantages[0:G] = 0.0  # a whole group without gradient: micro-batch counts differ between processes
        mine = trainer.procs.shard(list(range(len(problems))))
        rows = [g * G + i for g in mine for i in range(G)]
        mbs = make_micro_batches(
            [comps[r] for r in rows], advantages[rows], [len(comps[r].token_ids) < 20 for r in rows],
            cfg.train.micro_batch_size, trainer.tokenizer.pad_token_id, trainer.device,
        )  # fmt: skip
        # the gradient the optimiser steps with (Adam's first step hardly depends on the gradient's scale)
        # (under train.fsdp.activation_checkpointing a layer's parameters are named inside its checkpoint wrapper)
        named = [(k.replace("_checkpoint_wrapped_module.", ""), p) for k, p in trainer.model.named_parameters()]
        grads, step = {}, trainer.optimizer.step

        def capture(*args, **kwargs):
            grads.update({k: _full(p.grad) for k, p in named})
            return step(*args, **kwargs)

        trainer.optimizer.step = capture
        old, ref = trainer.updater.reference_logprobs(mbs)
        metrics = trainer.updater.step(mbs, old, ref)
        with trainer.procs.full_weights(trainer.model):  # a second window, after an update: the same
            _check_gathered(trainer, gathered=True)
        _check_gathered(trainer, gathered=False)
        _check_fsdp_options(trainer)
        params = {k: _full(v) for k, v in named}  # every process: gathering a shard is collective
        _check_engine_weights(trainer, params)
        if trainer.procs.is_main:
            torch.save({"params": params, "grads": grads, "metrics": metrics, "world": trainer.procs.world}, out)
    finally:
        trainer.close()
    assert not torch.distributed.is_initialized()  # close() destroyed the process group


def _check_gathered(trainer: Trainer, gathered: bool) -> None:
    """Sharded runs: inside a window every parameter of every FSDP unit is a whole plain tensor; outside, every one
    is a shard again (a window that resharded only the root would leave the decoder layers whole)."""
    if not trainer.procs.sharded:
        return
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    units = [m for m in trainer.model.modules() if isinstance(m, FSDPModule)]
    assert len(units) == 1 + trainer.cfg.model.num_layers  # the root and every decoder layer
    for unit in units:
        for name, p in unit.named_parameters():
            assert isinstance(p, DTensor) != gathered, (type(unit).__name__, name, type(p).__name__)
            if not gathered:  # this process's rows only
                assert p.to_local().numel() < p.numel(), name


def _check_fsdp_options(trainer: Trainer) -> None:
    """Sharded runs: each `train.fsdp.*` value shows in the model. Offload: every unit of the policy and the reference
    holds FSDP2's CPU offload policy, or none. Reshard after forward: a forward without backward leaves the decoder
    layers' weights gathered (plain tensors) only when off; the reference model, which has no backward, is always
    sharded again after its passes. Activation checkpointing: every decoder layer is a checkpoint wrapper and its
    MLP runs twice in a forward + backward (the recomputation), else once."""
    if not trainer.procs.sharded:
        return
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
    from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule
    from torch.distributed.tensor import DTensor

    options, model, ref = trainer.cfg.train.fsdp, trainer.model, trainer.updater.ref_model
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    ref_units = [m for m in ref.modules() if isinstance(m, FSDPModule)]
    for unit in units + ref_units:
        policy = unit._get_fsdp_state()._fsdp_param_group.offload_policy
        assert isinstance(policy, CPUOffloadPolicy) == options.cpu_offload, type(policy).__name__
    for unit in ref_units:  # after the update's reference passes
        assert all(isinstance(p, DTensor) for p in unit.parameters()), type(unit).__name__
        assert not isinstance(unit, CheckpointWrapper)
    layers = [m for m in units if m is not model]
    assert all(isinstance(m, CheckpointWrapper) == options.activation_checkpointing for m in layers)
    ids = trainer.updater._dummy_ids()
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for layer in layers:
        assert all(isinstance(p, DTensor) == options.reshard_after_forward for p in layer.parameters())
    calls, mlp = [], layers[0].mlp
    forward = mlp.forward  # counted in the forward itself: module hooks do not fire in a recomputation

    def counted(*args, **kwargs):
        calls.append(1)
        return forward(*args, **kwargs)

    mlp.forward = counted
    model(input_ids=ids, use_cache=False).logits.float().sum().mul(0.0).backward()  # zero: the checked step is over
    assert len(calls) == (2 if options.activation_checkpointing else 1), len(calls)
    for unit in units:  # the backward frees every gathered weight, whatever the option
        assert all(isinstance(p, DTensor) for p in unit.parameters()), type(unit).__name__


def _check_engine_weights(trainer: Trainer, params: dict[str, torch.Tensor]) -> None:
    """Sharded runs: what `rollout.engine=vllm`'s weight sync hands vLLM after a step (`engine_weights`, consumed by
    every process): each entry of the unsharded model's state dict, in its order and under its name (no checkpoint
    wrapper in it), as a whole plain tensor in vLLM's dtype (bf16 here) equal to the updated weights cast to it."""
    if not trainer.procs.sharded:
        return
    from transformers import AutoModelForCausalLM

    from reasonrl.rollout.vllm import engine_weights

    whole = AutoModelForCausalLM.from_config(trainer.model.config).state_dict()
    pairs = list(engine_weights(trainer.model, torch.bfloat16))
    assert [name for name, _ in pairs] == list(whole), [name for name, _ in pairs]
    for name, tensor in pairs:
        expected = params[name if name in params else "model.embed_tokens.weight"]  # the tied head
        assert type(tensor) is torch.Tensor and tensor.shape == whole[name].shape, (name, type(tensor).__name__)
        assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, expected.to(torch.bfloat16)), name


def _full(t: torch.Tensor) -> torch.Tensor:
    """A plain copy of `t`, gathered when it is a shard (`train.sharding=fsdp`)."""
    t = t.detach()
    return t.full_tensor() if hasattr(t, "full_tensor") else t.clone()


if __name__ == "__main__":
    main(*sys.argv[1:])
