"""Policy losses (SPEC §3, §5, §7) as pure per-token tensor functions; `[B, T]` tensors with a 0/1 `mask`."""

from __future__ import annotations

import torch
from torch import Tensor


def clipped_surrogate(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    ratio_level: str = "token",
) -> tuple[Tensor, dict[str, Tensor]]:
    """SPEC §3 clipped surrogate, returned as a per-token loss `−min(ρA, clip(ρ, 1−ε_low, 1+ε_high)A)`.

    `ratio_level="sequence"` (GSPO) uses one ratio per sequence: the geometric mean of its token ratios.
    Also returns token-level clip indicators for the metrics.
    """
    log_ratio = logp - old_logp
    if ratio_level == "sequence":
        seq = (log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1)
        log_ratio = seq.unsqueeze(-1).expand_as(logp)
    elif ratio_level != "token":
        raise ValueError(f"ratio_level must be token or sequence, got {ratio_level!r}")
    ratio = torch.exp(log_ratio)
    adv = advantages.unsqueeze(-1)
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    loss = -torch.min(ratio * adv, clipped * adv)
    with torch.no_grad():
        low = ((ratio < 1 - eps_low) & (adv < 0)).float()
        high = ((ratio > 1 + eps_high) & (adv > 0)).float()
    return loss, {"clip_low": low, "clip_high": high, "ratio": ratio.detach()}


def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """SPEC §3 per-token KL estimate k3: exp(r) − r − 1 with r = log π_ref − log π_θ (non-negative, unbiased)."""
    r = ref_logp - logp
    return torch.exp(r) - r - 1


def aggregate_loss(
    per_token: Tensor, mask: Tensor, mode: str, *, num_seqs: float, num_tokens: float, max_len: int
) -> Tensor:
    """SPEC §3 loss aggregation of one micro-batch, normalised by counts over the *whole* batch.

    Because every normaliser is global (all micro-batches and processes), summing the gradients of the
    micro-batches gives exactly the gradient of the full batch, however it is split.
    - `seq-mean-token-mean` (GRPO): mean over sequences of each sequence's token mean.
    - `token-mean` (DAPO): sum over all tokens / global token count.
    - `seq-mean-token-sum-norm` (Dr.GRPO): each sequence's token sum / max_len, mean over sequences.
    """
    masked = per_token * mask
    if mode == "token-mean":
        return masked.sum() / max(num_tokens, 1.0)
    if mode == "seq-mean-token-mean":
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1)).sum() / max(num_seqs, 1.0)
    if mode == "seq-mean-token-sum-norm":
        return (masked.sum(-1) / max_len).sum() / max(num_seqs, 1.0)
    raise ValueError(f"unknown loss aggregation {mode!r}")


def guide_old_logprobs(old_logp: Tensor, behaviour_logp: Tensor, guide: Tensor) -> Tensor:
    """SPEC §5 `context_in_loss=strip`: the Guide-style ratio π_θ(o_t|q,o_<t) / π_old(o_t|q,c,o_<t). Rows flagged in
    `guide` [B] were sampled under a LANPO context that the loss strips; their π_old is the behaviour log-prob
    recorded under that context, not the plain prompt's."""
    return torch.where(guide[:, None], behaviour_logp, old_logp)


IS_CORRECTIONS = ("none", "tis", "mask")


def behaviour_weights(old_logp: Tensor, behaviour_logp: Tensor, mode: str, cap: float) -> Tensor:
    """SPEC §7 train–inference mismatch: a detached per-token weight `[B, T]` on the policy loss, from the ratio
    ρ = π_old / π_behaviour of the trainer's log-prob to the rollout engine's. `tis`: min(ρ, C) (truncated importance
    sampling); `mask`: 1 where 1/C <= ρ <= C, else 0 (those tokens leave the policy loss; the normalisers of
    `aggregate_loss` stay those of the batch); `none`: 1."""
    if mode not in IS_CORRECTIONS:
        raise ValueError(f"is_correction must be one of {', '.join(IS_CORRECTIONS)}, got {mode!r}")
    if mode == "none":
        return torch.ones_like(old_logp)
    ratio = torch.exp(old_logp.detach() - behaviour_logp.detach())
    if mode == "tis":
        return ratio.clamp(max=cap)
    return ((ratio >= 1 / cap) & (ratio <= cap)).to(old_logp.dtype)
