"""Which samples enter the loss (SPEC §3): DAPO dynamic sampling and the truncation mask."""

from __future__ import annotations

from collections.abc import Sequence


def informative_groups(rewards: Sequence[float], group_size: int) -> list[bool]:
    """SPEC §3 DAPO dynamic sampling: per group of `group_size` consecutive rewards, False when they are all equal
    (compared exactly: a float std of equal non-dyadic rewards is a rounding residue, not information)."""
    groups = [rewards[i : i + group_size] for i in range(0, len(rewards), group_size)]
    return [max(g) != min(g) for g in groups]


def truncation_mask(truncated: Sequence[bool], mask_truncated: bool) -> list[bool]:
    """SPEC §3: per sequence, whether it enters the loss; with `mask_truncated`, completions that hit the length
    limit do not."""
    return [not (mask_truncated and t) for t in truncated]
