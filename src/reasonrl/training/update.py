"""The loss passes of one step: π_old / π_ref log-probs, then `num_iterations` optimiser steps (SPEC §3).

The log-probs come from `model.forward.completion_logits`: the model's own `forward` through its data-parallel
wrapper by default, or the CPU shared-prefix pass (`train.forward`)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from reasonrl import algorithms
from reasonrl.model.forward import completion_logits
from reasonrl.model.logprobs import selected_logprobs
from reasonrl.training.batch import MicroBatch, select_rows
from reasonrl.training.distributed import Processes


def token_logprobs(
    model: Any,
    mb: MicroBatch,
    temperature: float,
    with_entropy: bool = False,
    chunk: int = 0,
    forward: str = "generic",
) -> tuple[Tensor, Tensor | None]:
    """log π(target token) at every target column, from logits scaled by the sampling temperature.

    `forward`: `generic` (the model's forward, every prompt + completion as one sequence) or `shared_prefix` (each
    distinct prompt runs once; the same log-probs up to float rounding). `chunk` > 0 uses the memory-efficient
    kernel (`model/logprobs.py`, `train.logprob_chunk`)."""
    logits = completion_logits(model, mb.prompt_ids, mb.prompt_mask, mb.which, mb.targets, mb.lengths, forward=forward)
    return selected_logprobs(logits, mb.targets, temperature, chunk, with_entropy)


class PolicyUpdate:
    """The policy's optimiser steps and the passes they need; `model` is the bare policy (generation, checkpoints),
    `train_model` what the loss runs through (the data-parallel wrapper with several processes, else `model`)."""

    def __init__(
        self,
        cfg: Any,
        procs: Processes,
        model: Any,
        train_model: Any,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        ref_model: Any,
        device: torch.device,
        forward: str,
        pad_id: int,
    ) -> None:
        self.cfg, self.procs, self.model, self.train_model = cfg, procs, model, train_model
        self.optimizer, self.scheduler, self.ref_model, self.device = optimizer, scheduler, ref_model, device
        self.pad_id = pad_id
        r = cfg.rollout  # SPEC §7: `auto` corrects the mismatch where the behaviour log-probs come from another engine
        self.is_correction = ("tis" if r.engine == "vllm" else "none") if r.is_correction == "auto" else r.is_correction
        self.forward = forward  # `train.forward` resolved for this model (`model.forward.resolve_forward`)

    @torch.no_grad()
    def reference_logprobs(self, mbs: list[MicroBatch]) -> tuple[list[Tensor | None], list[Tensor | None]]:
        """π_old log-probs (only needed when the batch is reused for several passes) and π_ref (only when β > 0).

        With one pass, π_old equals the current policy, so its detached log-probs serve and no pass is spent.
        π_ref is the model before RL: a frozen copy (moved to the GPU only for this pass with `train.ref_offload`),
        or under LoRA the policy with its adapters switched off.
        """
        temp, chunk, procs = self.cfg.rollout.temperature, self.cfg.train.logprob_chunk, self.procs
        # sharded: every process runs as many passes as the one with the most micro-batches (dummy ones after its own)
        pad = int(procs.max(len(mbs))) - len(mbs) if procs.sharded else 0
        with procs.autocast():
            old = [
                token_logprobs(self.model, mb, temp, chunk=chunk, forward=self.forward)[0]
                if self.cfg.algorithm.num_iterations > 1
                else None
                for mb in mbs
            ]
            if self.cfg.algorithm.num_iterations > 1:
                procs.dummy_passes(self.model, self._dummy_ids(), pad, grad=False)
        ref: list[Tensor | None] = [None] * len(mbs)
        if self.cfg.algorithm.beta > 0 and (mbs or procs.sharded):
            with self._reference_model() as model, procs.autocast():
                ref = [token_logprobs(model, mb, temp, chunk=chunk, forward=self.forward)[0] for mb in mbs]
                procs.dummy_passes(model, self._dummy_ids(), pad, grad=False)
        return old, ref

    def _dummy_ids(self) -> Tensor:
        return torch.full((1, 1), self.pad_id, device=self.device)

    @contextmanager
    def _reference_model(self) -> Iterator[Any]:
        if self.ref_model is None:  # LoRA: the base model is the policy without its adapters
            with self.model.disable_adapter():
                yield self.model
            return
        offload = self.cfg.train.ref_offload
        if offload:
            self.ref_model.to(self.device)
        try:
            yield self.ref_model
        finally:
            if offload:
                self.ref_model.to("cpu")

    def step(
        self, mbs: list[MicroBatch], old_logp: list[Tensor | None], ref_logp: list[Tensor | None]
    ) -> dict[str, float]:
        """`num_iterations` optimiser steps over the batch, each accumulating gradients over its micro-batches.

        Loss normalisers are counts over the global batch (all processes), and each process's loss is scaled by
        the process count, so the data-parallel gradient equals the one-process gradient (`distributed.py`)."""
        a, t, r, procs = self.cfg.algorithm, self.cfg.train, self.cfg.rollout, self.procs
        temp = r.temperature
        num_tokens = procs.sum(float(sum(mb.mask.sum() for mb in mbs)))
        num_seqs = procs.sum(float(sum((mb.mask.sum(-1) > 0).sum() for mb in mbs)))
        max_len = a.max_len_norm or self.cfg.rollout.max_new_tokens
        keys = ["loss", "entropy", "clip_low", "clip_high", "ratio"] + (["kl"] if a.beta > 0 else [])
        sums = dict.fromkeys(keys, 0.0)
        # train-inference mismatch |log π_old − log π_behaviour| on the first pass, over sequences that ran forward
        diff_sum, diff_tokens, diff_max, is_weight = 0.0, 0.0, 0.0, 0.0
        self.model.train()
        # A sequence whose loss is identically zero (advantage 0 and no KL term) adds nothing to the gradient: it
        # gets a forward pass without autograd, for the metrics only, or none at all when the rollout's record gives
        # them (one pass over the batch: π_θ = π_old = the behaviour policy, ratio 1, no clip; entropy as the engine
        # recorded it). Fully masked sequences get none either. Planned first: sharded processes need the count.
        plans = []
        for whole, whole_ref in zip(mbs, ref_logp, strict=True):
            live = whole.mask.sum(-1) > 0
            learn = live & (whole.advantages != 0) if whole_ref is None else live
            recorded = ~learn & live & ~whole.guide
            if not (a.num_iterations == 1 and whole.behaviour_entropy is not None and bool(recorded.any())):
                recorded = torch.zeros_like(live)
            passes = [(rows, grad) for rows, grad in ((learn, True), (live & ~learn & ~recorded, False)) if rows.any()]
            plans.append((recorded, passes))
        n_passes = sum(len(passes) for _, passes in plans)
        # sharded: every pass has a backward (a zero one for the metric-only passes), as many as the busiest process's
        # and at least one (all-zero gradients then, and AdamW steps on them, as DDP's synchronising pass makes it)
        pad = max(int(procs.max(n_passes)), 1) - n_passes if procs.sharded else 0
        for iteration in range(a.num_iterations):
            self.optimizer.zero_grad(set_to_none=True)
            backward = False
            for whole, whole_old, whole_ref, (recorded, passes) in zip(mbs, old_logp, ref_logp, plans, strict=True):
                if recorded.any():
                    m = whole.mask[recorded]
                    sums["entropy"] += float((whole.behaviour_entropy[recorded] * m).sum())
                    sums["ratio"] += float(m.sum())  # loss and clip indicators are zero for these rows
                for rows, learns in passes:
                    grad = learns or procs.sharded
                    mb, old, ref = select_rows(whole, rows, whole_old, whole_ref)
                    with torch.set_grad_enabled(grad), procs.no_sync(self.train_model), procs.autocast():
                        logp, entropy = token_logprobs(
                            self.train_model, mb, temp, with_entropy=True, chunk=t.logprob_chunk, forward=self.forward
                        )
                        old = logp.detach() if old is None else old
                        if mb.guide.any():  # stripped LANPO contexts: π_old is the behaviour log-prob under the context
                            old = algorithms.guide_old_logprobs(old, mb.behaviour_logp, mb.guide)
                        per_token, info = algorithms.clipped_surrogate(
                            logp, old, mb.advantages, mb.mask, eps_low=a.eps_low, eps_high=a.eps_high,
                            ratio_level=a.ratio_level,
                        )  # fmt: skip
                        # SPEC §7: weigh the policy loss by π_old / π_behaviour (stripped LANPO rows excepted: their
                        # Guide ratio already divides by the behaviour log-prob under the context)
                        own = mb.mask * ~mb.guide[:, None]
                        if iteration == 0:
                            diff = (old - mb.behaviour_logp).abs() * own
                            diff_sum, diff_tokens = diff_sum + float(diff.sum()), diff_tokens + float(own.sum())
                            diff_max = max(diff_max, float(diff.max()) if diff.numel() else 0.0)
                        if self.is_correction != "none":
                            w = algorithms.behaviour_weights(old, mb.behaviour_logp, self.is_correction, r.is_cap)
                            w = torch.where(mb.guide[:, None], torch.ones_like(w), w)
                            per_token = per_token * w
                            if iteration == 0:
                                is_weight += float((w * own).sum())
                        if ref is not None:
                            kl = algorithms.kl_k3(logp, ref)
                            per_token = per_token + a.beta * kl
                            info["kl"] = kl.detach()
                        loss = algorithms.aggregate_loss(
                            per_token, mb.mask, a.loss_agg, num_seqs=num_seqs, num_tokens=num_tokens, max_len=max_len
                        )
                        if grad:  # × processes: the wrapper averages gradients, the loss is a sum over them
                            scale = (procs.world if procs.world > 1 else 1.0) if learns else 0.0
                            procs.backward(loss * scale if scale != 1.0 else loss)
                            backward = True
                    # token-weighted sums → exact token means over the whole batch
                    m = mb.mask
                    for key, val in {"loss": loss.detach() * num_tokens, "entropy": entropy, **info}.items():
                        total = val if val.dim() == 0 else (val * m).sum()
                        sums[key] += float(total)
            if procs.world > 1:
                procs.dummy_passes(self.train_model, self._dummy_ids(), pad, grad=True)
                procs.sync_gradients(self.train_model, self._dummy_ids())
            elif not backward:  # all-zero gradient: AdamW still steps (momentum, weight decay) as after a zero backward
                for p in self.model.parameters():
                    if p.requires_grad:
                        p.grad = torch.zeros_like(p)
            grad_norm = procs.clip_grad_norm(
                [p for p in self.model.parameters() if p.requires_grad],
                t.max_grad_norm if t.max_grad_norm > 0 else math.inf,
            )
            self.optimizer.step()
            self.scheduler.step()
        sums = procs.sum_dict(sums)
        denom = max(num_tokens, 1.0) * a.num_iterations
        out = {
            f"{k}" if k in ("loss", "entropy", "kl") else f"clip/{k.removeprefix('clip_')}": v / denom
            for k, v in sums.items()
            if k != "ratio"
        }
        out["ratio/mean"] = sums["ratio"] / denom
        out["clip/region"] = out["clip/low"] + out["clip/high"]
        out["grad_norm"] = float(grad_norm)
        mismatch = procs.sum_dict({"diff": diff_sum, "tokens": diff_tokens, "is_weight": is_weight})  # one collective
        if mismatch["tokens"]:  # the same on every process: so is the collective below
            out["rollout/logprob_diff/mean"] = mismatch["diff"] / mismatch["tokens"]
            out["rollout/logprob_diff/max"] = procs.max(diff_max)
            if self.is_correction != "none":
                out["rollout/is_weight/mean"] = mismatch["is_weight"] / mismatch["tokens"]
        self.model.eval()
        return out
