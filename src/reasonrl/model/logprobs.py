"""Log-probabilities of chosen tokens from logits, plainly or in chunks that never hold float32 copies of all logits.

For a 150k-token vocabulary a plain `log_softmax(logits.float())` over 16 × 4096 completion tokens materialises
~40 GB of float32 (the copy and its saved output). The chunked kernel reads the logits in their own dtype, keeps
only one float32 chunk alive at a time, saves nothing but the per-token log-normaliser, and recomputes the softmax
chunk by chunk in the backward pass. Both give log π(target) to float rounding (tests/test_logprobs.py).
"""

from __future__ import annotations

import torch
from torch import Tensor


def selected_logprobs(
    logits: Tensor, targets: Tensor, temperature: float, chunk: int = 0, with_entropy: bool = False
) -> tuple[Tensor, Tensor | None]:
    """(log softmax(logits / temperature)[target] [N, T] float32, entropy [N, T] or None, without gradient).

    `chunk` = 0: the plain full-vocabulary float32 log-softmax; > 0: at most `chunk` tokens' logits in float32 at
    once (`train.logprob_chunk`)."""
    if chunk <= 0:
        logp_all = torch.log_softmax(logits.float() / temperature, dim=-1)
        logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        entropy = None
        if with_entropy:
            with torch.no_grad():
                entropy = -(logp_all.exp() * logp_all).sum(-1)
        return logp, entropy
    logp = _ChunkedLogProbs.apply(logits, targets, temperature, chunk)
    return logp, chunked_entropy(logits.detach(), temperature, chunk) if with_entropy else None


@torch.no_grad()
def chunked_entropy(logits: Tensor, temperature: float, chunk: int) -> Tensor:
    flat = logits.reshape(-1, logits.shape[-1])
    out = torch.empty(flat.shape[0], dtype=torch.float32, device=logits.device)
    for lo in range(0, flat.shape[0], chunk):
        x = flat[lo : lo + chunk].float() / temperature
        logp = torch.log_softmax(x, dim=-1)
        out[lo : lo + chunk] = -(logp.exp() * logp).sum(-1)
    return out.view(logits.shape[:-1])


class _ChunkedLogProbs(torch.autograd.Function):
    """log p(target) = x[target] − logsumexp(x), x = logits / temperature; d/dx = onehot(target) − softmax(x)."""

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, temperature: float, chunk: int) -> Tensor:  # type: ignore[override]
        flat, tgt = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
        lse = torch.empty(flat.shape[0], dtype=torch.float32, device=logits.device)
        out = torch.empty_like(lse)
        for lo in range(0, flat.shape[0], chunk):
            x = flat[lo : lo + chunk].float() / temperature
            lse[lo : lo + chunk] = torch.logsumexp(x, dim=-1)
            out[lo : lo + chunk] = x.gather(-1, tgt[lo : lo + chunk, None]).squeeze(-1) - lse[lo : lo + chunk]
        ctx.save_for_backward(logits, targets, lse)
        ctx.temperature, ctx.chunk = temperature, chunk
        return out.view(targets.shape)

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, None, None, None]:  # type: ignore[override]
        logits, targets, lse = ctx.saved_tensors
        flat, tgt, g = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), grad_out.reshape(-1).float()
        grad = torch.empty_like(flat)
        for lo in range(0, flat.shape[0], ctx.chunk):
            hi = lo + ctx.chunk
            p = torch.exp(flat[lo:hi].float() / ctx.temperature - lse[lo:hi, None])
            d = -p * g[lo:hi, None]
            d.scatter_add_(-1, tgt[lo:hi, None], g[lo:hi, None])
            grad[lo:hi] = (d / ctx.temperature).to(grad.dtype)
        return grad.view(logits.shape), None, None, None
