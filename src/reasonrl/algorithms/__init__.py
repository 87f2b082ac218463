"""The SPEC's equations as pure tensor functions: advantages (registry), losses, sample filters.

Imports nothing of reasonrl (checked by the import contracts in `pyproject.toml`)."""

from reasonrl.algorithms.advantages import (
    ADVANTAGES,
    Estimator,
    GRPOOptions,
    LamPOOptions,
    NoOptions,
    advantage_options,
    compute_advantages,
    get_advantage,
    group_stats,
    grpo_advantage,
    lampo_advantage,
    lampo_block,
    lampo_log_weights,
    register_advantage,
    rloo_advantage,
    sequence_scores,
)
from reasonrl.algorithms.filters import informative_groups, truncation_mask
from reasonrl.algorithms.losses import (
    aggregate_loss,
    behaviour_weights,
    clipped_surrogate,
    guide_old_logprobs,
    kl_k3,
)

__all__ = [
    "ADVANTAGES",
    "Estimator",
    "GRPOOptions",
    "LamPOOptions",
    "NoOptions",
    "advantage_options",
    "aggregate_loss",
    "behaviour_weights",
    "clipped_surrogate",
    "compute_advantages",
    "get_advantage",
    "group_stats",
    "grpo_advantage",
    "guide_old_logprobs",
    "informative_groups",
    "kl_k3",
    "lampo_advantage",
    "lampo_block",
    "lampo_log_weights",
    "register_advantage",
    "rloo_advantage",
    "sequence_scores",
    "truncation_mask",
]
