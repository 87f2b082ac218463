"""The chunked log-prob kernel against a naive per-token loop: values, entropies and gradients."""

from __future__ import annotations

import math

import pytest
import torch

from reasonrl.model.logprobs import selected_logprobs


def naive(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(target) and entropy, one token at a time, with plain Python sums over the vocabulary."""
    N, T, V = logits.shape
    logp = torch.zeros(N, T, dtype=torch.float64)
    ent = torch.zeros(N, T, dtype=torch.float64)
    for i in range(N):
        for t in range(T):
            xs = [float(v) / temperature for v in logits[i, t]]
            m = max(xs)
            z = m + math.log(sum(math.exp(x - m) for x in xs))
            logp[i, t] = xs[int(targets[i, t])] - z
            ent[i, t] = -sum(math.exp(x - z) * (x - z) for x in xs)
    return logp, ent


@pytest.mark.parametrize("chunk", [0, 1, 5, 7, 1000])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_values_and_entropy_match_a_naive_loop(chunk, temperature):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 4, 11, generator=g) * 3
    targets = torch.randint(0, 11, (3, 4), generator=g)
    logp, ent = selected_logprobs(logits, targets, temperature, chunk, with_entropy=True)
    ref_logp, ref_ent = naive(logits, targets, temperature)
    assert logp.dtype == torch.float32
    assert torch.allclose(logp.double(), ref_logp, atol=1e-5)
    assert torch.allclose(ent.double(), ref_ent, atol=1e-5)


@pytest.mark.parametrize("chunk", [1, 4, 64])
def test_gradient_matches_the_plain_log_softmax(chunk):
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(2, 5, 13, generator=g) * 2).requires_grad_()
    targets = torch.randint(0, 13, (2, 5), generator=g)
    weights = torch.randn(2, 5, generator=g)
    (selected_logprobs(logits, targets, 0.8, chunk)[0] * weights).sum().backward()
    got = logits.grad.clone()
    # d/dx_v of w * log softmax(x / T)[y] = w (1[v = y] − softmax(x / T)_v) / T, written out per token
    expected = torch.zeros_like(logits)
    for i in range(2):
        for t in range(5):
            p = torch.softmax(logits[i, t].detach().double() / 0.8, -1)
            onehot = torch.zeros(13, dtype=torch.float64)
            onehot[targets[i, t]] = 1
            expected[i, t] = (weights[i, t] * (onehot - p) / 0.8).float()
    assert torch.allclose(got, expected, atol=1e-6)


def test_bf16_logits_stay_bf16_and_give_float32_logprobs():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 3, 17, generator=g).bfloat16().requires_grad_()
    targets = torch.randint(0, 17, (2, 3), generator=g)
    logp, _ = selected_logprobs(logits, targets, 1.0, chunk=2)
    plain, _ = selected_logprobs(logits.float(), targets, 1.0, chunk=0)
    assert logp.dtype == torch.float32
    assert torch.allclose(logp, plain, atol=1e-6)
    logp.sum().backward()
    assert logits.grad.dtype == torch.bfloat16
