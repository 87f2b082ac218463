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
        with trainer.procs.full_weights(trainer.model):  # train.sharding=fsdp: sampling needs the whole weights
            _check_gathered(trainer, gathered=True)
            comps = trainer.engine.generate(prompts, G, SamplingParams(cfg.rollout.max_new_tokens, 1.0))
        _check_gathered(trainer, gathered=False)
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
        named = list(trainer.model.named_parameters())
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
        params = {k: _full(v) for k, v in named}  # every process: gathering a shard is collective
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


def _full(t: torch.Tensor) -> torch.Tensor:
    """A plain copy of `t`, gathered when it is a shard (`train.sharding=fsdp`)."""
    t = t.detach()
    return t.full_tensor() if hasattr(t, "full_tensor") else t.clone()


if __name__ == "__main__":
    main(*sys.argv[1:])
