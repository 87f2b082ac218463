"""The trainer's optimised update against a plain reference on the same completions.

The update runs each prompt once (shared prompt pass), runs sequences with a zero advantage and no KL term without
autograd (their loss is identically zero), and takes their entropy from the rollout's record when the batch is used
once. The reference here runs every sequence as prompt + completion with autograd and the plain loss. Gradients and
every metric must agree to float rounding (gradients rtol 1e-4 / atol 1e-6, metrics 1e-5).
"""

from __future__ import annotations

import math

import pytest
import torch

from reasonrl import algorithms
from reasonrl.config import load_config
from reasonrl.model.forward import completion_logits
from reasonrl.rollout.base import SamplingParams
from reasonrl.training.batch import make_micro_batches
from reasonrl.training.trainer import Trainer


def _reference(trainer: Trainer, comps, advantages, loss_mask, ref_model, monkeypatch):
    """Plain GRPO-family update of one pass: gradient and metrics, every sequence through the generic path (each
    prompt + completion run as one sequence), every sequence with autograd."""
    a, temp = trainer.cfg.algorithm, trainer.cfg.rollout.temperature
    model = trainer.model
    mb = make_micro_batches(comps, advantages, loss_mask, 0, trainer.tokenizer.pad_token_id, "cpu")[0]
    model.train()
    model.zero_grad(set_to_none=True)

    def logprobs(m):
        logits = completion_logits(m, mb.prompt_ids, mb.prompt_mask, mb.which, mb.targets, forward="generic")
        logits = logits.float() / temp
        logp_all = torch.log_softmax(logits, -1)
        return logp_all.gather(-1, mb.targets.unsqueeze(-1)).squeeze(-1), logp_all

    logp, logp_all = logprobs(model)
    entropy = -(logp_all.exp() * logp_all).sum(-1).detach()
    per_token, info = algorithms.clipped_surrogate(logp, logp.detach(), mb.advantages, mb.mask)
    if ref_model is not None:
        with torch.no_grad():
            ref = logprobs(ref_model)[0]
        kl = algorithms.kl_k3(logp, ref)
        per_token = per_token + a.beta * kl
        info["kl"] = kl.detach()
    n_tok = float(mb.mask.sum())
    n_seq = float((mb.mask.sum(-1) > 0).sum())
    loss = algorithms.aggregate_loss(per_token, mb.mask, a.loss_agg, num_seqs=n_seq, num_tokens=n_tok, max_len=64)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    m = mb.mask
    metrics = {
        "loss": float(loss.detach()),
        "entropy": float((entropy * m).sum()) / n_tok,
        "ratio/mean": float((info["ratio"] * m).sum()) / n_tok,
        "clip/low": float((info["clip_low"] * m).sum()) / n_tok,
    }
    if "kl" in info:
        metrics["kl"] = float((info["kl"] * m).sum()) / n_tok
    model.zero_grad(set_to_none=True)
    monkeypatch.undo()
    return grads, metrics


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
@pytest.mark.parametrize("engine", ["fast", "hf"])
@pytest.mark.parametrize(
    "options",
    [
        [],
        ["algorithm.beta=0.05"],
        ["algorithm.num_iterations=2"],
        ["train.micro_batch_size=5", "algorithm.loss_agg=seq-mean-token-mean"],
    ],
)
def test_update_equals_the_plain_reference(tiny_overrides, tmp_path, engine, options, monkeypatch):
    cfg = load_config(None, [*tiny_overrides, f"rollout.engine={engine}", "algorithm.loss_agg=token-mean", *options])
    trainer = Trainer(cfg, tmp_path / "run")
    try:
        tok = trainer.tokenizer
        prompts = [trainer._prompt_ids([p.prompt])[0] for p in trainer.stream.take(4)]
        torch.manual_seed(0)
        comps = trainer.engine.generate(prompts, 4, SamplingParams(20, 1.0))
        # two groups with zero advantage (no gradient), one truncated sequence masked out of the loss
        advantages = torch.tensor([0.0] * 4 + [1.0, -0.5, 0.25, -0.75] + [0.0] * 4 + [0.5, -1.0, 0.0, 0.5])
        loss_mask = [True] * 16
        loss_mask[5] = False
        grads_ref, expected = _reference(trainer, comps, advantages, loss_mask, trainer.updater.ref_model, monkeypatch)
        captured = []
        params = list(trainer.model.parameters())
        trainer.optimizer.step = lambda: captured.append([p.grad.clone() for p in params])
        mbs = make_micro_batches(comps, advantages, loss_mask, cfg.train.micro_batch_size, tok.pad_token_id, "cpu")
        old, ref = trainer.updater.reference_logprobs(mbs)
        metrics = trainer.updater.step(mbs, old, ref)
    finally:
        trainer.close()
    for x, y in zip(captured[0], grads_ref, strict=True):
        assert torch.allclose(x, y, rtol=1e-4, atol=1e-6)
    if cfg.algorithm.loss_agg == "token-mean":
        assert metrics["loss"] == pytest.approx(expected["loss"], abs=1e-5)
    for key in ("entropy", "ratio/mean", "clip/low", *(["kl"] if "kl" in expected else [])):
        assert metrics[key] == pytest.approx(expected[key], abs=1e-5), key


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
def test_an_all_zero_advantage_batch_still_steps_the_optimiser(tiny_overrides, tmp_path):
    """No sequence needs a backward pass; AdamW must still see zero gradients (it moves on momentum)."""
    trainer = Trainer(load_config(None, tiny_overrides), tmp_path / "run")
    try:
        prompts = [trainer._prompt_ids([p.prompt])[0] for p in trainer.stream.take(2)]
        comps = trainer.engine.generate(prompts, 2, SamplingParams(8, 1.0))
        mbs = make_micro_batches(comps, torch.zeros(4), [True] * 4, 0, trainer.tokenizer.pad_token_id, "cpu")
        seen = []
        trainer.optimizer.step = lambda: seen.append([p.grad for p in trainer.model.parameters()])
        metrics = trainer.updater.step(mbs, [None], [None])
    finally:
        trainer.close()
    assert all(g is not None and not g.any() for g in seen[0])
    assert metrics["loss"] == 0 and metrics["ratio/mean"] == pytest.approx(1.0) and metrics["entropy"] > 0


def _naive_behaviour_weight(old: float, behaviour: float, mode: str, cap: float) -> float:
    ratio = math.exp(old - behaviour)
    if mode == "tis":
        return min(ratio, cap)
    return 1.0 if 1 / cap <= ratio <= cap else 0.0


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
@pytest.mark.parametrize("mode", ["tis", "mask"])
def test_is_correction_loss_equals_a_hand_built_reference(tiny_overrides, tmp_path, mode):
    """SPEC §7: behaviour log-probs from another engine (simulated: the recorded ones shifted per token). With one
    pass π_old = π_θ, so each token's loss is −A·w with w = min(π_old/π_behaviour, C) (tis) or 1/0 inside/outside
    [1/C, C] (mask), computed here token by token in float64 from the generic forward's log-probs."""
    cap = 1.5
    cfg = load_config(None, [*tiny_overrides, f"rollout.is_correction={mode}", f"rollout.is_cap={cap}",
                             "algorithm.loss_agg=token-mean"])  # fmt: skip
    trainer = Trainer(cfg, tmp_path / "run")
    try:
        prompts = [trainer._prompt_ids([p.prompt])[0] for p in trainer.stream.take(2)]
        torch.manual_seed(0)
        comps = trainer.engine.generate(prompts, 3, SamplingParams(12, 1.0))
        gen = torch.Generator().manual_seed(1)
        for c in comps:  # a mismatch of up to ±0.8 nats per token: some ratios beyond the cap, some within
            c.logprobs = [lp + float(torch.empty(()).uniform_(-0.8, 0.8, generator=gen)) for lp in c.logprobs]
        advantages = torch.tensor([1.0, -0.5, 0.25, -0.75, 0.5, -1.0])
        mbs = make_micro_batches(comps, advantages, [True] * 6, 0, trainer.tokenizer.pad_token_id, "cpu")
        with torch.no_grad():
            logits = completion_logits(trainer.model, mbs[0].prompt_ids, mbs[0].prompt_mask, mbs[0].which,
                                       mbs[0].targets, forward="generic")  # fmt: skip
            logp = torch.log_softmax(logits.double(), -1).gather(-1, mbs[0].targets.unsqueeze(-1)).squeeze(-1)
        total, tokens, weights = 0.0, 0, []
        for i, c in enumerate(comps):
            for t, behaviour in enumerate(c.logprobs):
                w = _naive_behaviour_weight(float(logp[i, t]), behaviour, mode, cap)
                total += -float(advantages[i]) * w
                tokens += 1
                weights.append(w)
        trainer.optimizer.step = lambda: None
        metrics = trainer.updater.step(mbs, [None], [None])
    finally:
        trainer.close()
    if mode == "tis":  # some weights capped at C, the others the ratio itself
        assert 0 < sum(w == cap for w in weights) < len(weights)
    else:  # some tokens out of the band, the others kept
        assert 0 < sum(w == 0 for w in weights) < len(weights)
    assert metrics["loss"] == pytest.approx(total / tokens, abs=1e-5)
    assert metrics["rollout/is_weight/mean"] == pytest.approx(sum(weights) / len(weights), abs=1e-5)
    assert 0 < metrics["rollout/logprob_diff/mean"] <= metrics["rollout/logprob_diff/max"] <= 0.8 + 1e-4


def test_is_correction_auto_is_off_for_the_policy_engines(tiny_overrides, tmp_path):
    dense = ["rewards.functions=[tests.conftest:length_reward]", "rewards.weights=[1.0]"]  # rows that run forward
    trainer = Trainer(load_config(None, [*tiny_overrides, *dense]), tmp_path / "run")
    try:
        assert trainer.updater.is_correction == "none"
        metrics = trainer.step()
    finally:
        trainer.close()
    assert "rollout/is_weight/mean" not in metrics
    assert metrics["rollout/logprob_diff/max"] < 1e-4  # the fast engine's behaviour log-probs are the trainer's
