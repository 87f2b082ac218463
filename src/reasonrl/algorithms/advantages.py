"""Advantage estimators (SPEC §3, §4) as pure tensor functions behind a small registry.

Adding an estimator is one decorated function plus an options dataclass that says which config keys feed it:

    @dataclass(frozen=True)
    class MineOptions:
        my_option: float = 1.0

        @classmethod
        def from_config(cls, algorithm) -> MineOptions:
            return cls(my_option=algorithm.mine.my_option)

    @register_advantage("mine", MineOptions)
    def mine(rewards: Tensor, group_ids: Tensor, *, my_option: float = 1.0) -> Tensor: ...

Shapes: `rewards`, `group_ids` and the result are per sequence `[N]`. This package imports nothing of reasonrl:
`from_config` reads the `algorithm` section by attribute, so any object with those fields serves.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass(frozen=True)
class Estimator:
    fn: Callable[..., Tensor]
    options: type  # a frozen dataclass with `from_config(algorithm)`; its fields are `fn`'s keyword options
    inputs: tuple[str, ...] = ()  # per-sequence tensors the estimator needs beyond rewards (e.g. `seq_scores`)
    inputs_optional: tuple[str, ...] = ()  # keyword arguments it accepts when given (e.g. `diagnostics`)


ADVANTAGES: dict[str, Estimator] = {}


def register_advantage(
    name: str, options: type, inputs: tuple[str, ...] = (), optional: tuple[str, ...] = ()
) -> Callable[[Callable], Callable]:
    def wrap(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        ADVANTAGES[name] = Estimator(fn, options, inputs, optional)
        return fn

    return wrap


def get_advantage(name: str) -> Estimator:
    """The registered estimator; an unknown name raises ValueError naming the closest one and the choices."""
    if name not in ADVANTAGES:
        close = difflib.get_close_matches(name, ADVANTAGES, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ValueError(f"unknown algorithm.advantage '{name}'{hint}; available: {', '.join(sorted(ADVANTAGES))}")
    return ADVANTAGES[name]


def advantage_options(name: str, algorithm: Any) -> Any:
    """The options of estimator `name`, read from the config's `algorithm` section."""
    return get_advantage(name).options.from_config(algorithm)


def compute_advantages(
    name: str,
    rewards: Tensor,
    group_ids: Tensor,
    options: Any = None,
    *,
    diagnostics: dict[str, float] | None = None,
    **kwargs: Any,
) -> Tensor:
    """Per-sequence advantages `[N]` (float, no gradient) from the estimator registered as `name`.

    `options`: its options dataclass (default: its defaults); `kwargs`: option fields to override (e.g. `tau=0.5`)
    and the per-sequence inputs it declares (e.g. `seq_scores`). Anything else is an error, not silently ignored."""
    est = get_advantage(name)
    rewards = torch.as_tensor(rewards, dtype=torch.float64).detach()
    group_ids = torch.as_tensor(group_ids)
    if rewards.shape != group_ids.shape or rewards.dim() != 1:
        raise ValueError(f"rewards {tuple(rewards.shape)} and group_ids {tuple(group_ids.shape)} must be equal 1-D")
    fields = {f.name for f in dataclasses.fields(est.options)}
    if unknown := sorted(set(kwargs) - fields - set(est.inputs)):
        raise ValueError(
            f"advantage '{name}' takes options {sorted(fields)} and inputs {list(est.inputs)}; got {unknown}"
        )
    if missing := [k for k in est.inputs if k not in kwargs]:
        raise ValueError(f"advantage '{name}' needs {', '.join(missing)}")
    options = options if options is not None else est.options()
    options = dataclasses.replace(options, **{k: v for k, v in kwargs.items() if k in fields})
    extra = {k: kwargs[k] for k in est.inputs}
    if diagnostics is not None and "diagnostics" in est.inputs_optional:
        extra["diagnostics"] = diagnostics
    return est.fn(rewards, group_ids, **dataclasses.asdict(options), **extra).float()


def group_stats(values: Tensor, group_ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sequence (group mean, group unbiased std, group size), broadcast back to `[N]`; size-1 groups get std 0."""
    _, inverse, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    n = counts.to(values.dtype)
    sums = torch.zeros_like(n).index_add_(0, inverse, values)
    mean = sums / n
    sq = torch.zeros_like(n).index_add_(0, inverse, (values - mean[inverse]) ** 2)
    std = torch.where(n > 1, (sq / (n - 1).clamp(min=1)).sqrt(), torch.zeros_like(n))
    return mean[inverse], std[inverse], n[inverse]


def _equal_groups(values: Tensor, group_ids: Tensor) -> Tensor:
    """Per sequence: True where every reward of its group is equal (compared exactly, max == min)."""
    _, inverse = torch.unique(group_ids, return_inverse=True)
    k = int(inverse.max()) + 1 if inverse.numel() else 0
    hi = torch.full((k,), float("-inf"), dtype=values.dtype).scatter_reduce(0, inverse, values, "amax")
    lo = torch.full((k,), float("inf"), dtype=values.dtype).scatter_reduce(0, inverse, values, "amin")
    return (hi == lo)[inverse]


# --------------------------------------------------------------------------------------------------------------
# GRPO family


@dataclass(frozen=True)
class GRPOOptions:
    scale_rewards: str = "group"
    eps: float = 1e-4

    @classmethod
    def from_config(cls, algorithm: Any) -> GRPOOptions:
        return cls(scale_rewards=algorithm.scale_rewards, eps=algorithm.adv_eps)


@register_advantage("grpo", GRPOOptions)
def grpo_advantage(rewards: Tensor, group_ids: Tensor, *, scale_rewards: str = "group", eps: float = 1e-4) -> Tensor:
    """SPEC §3 group advantage: A_i = (R_i − mean_group R) / (std + eps).

    scale_rewards: `group` divides by the group's std (GRPO), `batch` by the std of the whole batch,
    `none` does not divide (Dr.GRPO). Std is the unbiased estimator, as in TRL. A group whose rewards are all
    equal gets exactly 0 (not a rounding residue), so its rows cost no backward pass.
    """
    mean, std, _ = group_stats(rewards, group_ids)
    centred = torch.where(_equal_groups(rewards, group_ids), torch.zeros_like(rewards), rewards - mean)
    if scale_rewards == "group":
        return centred / (std + eps)
    if scale_rewards == "batch":
        batch_std = rewards.std() if rewards.numel() > 1 else rewards.new_zeros(())
        return centred / (batch_std + eps)
    if scale_rewards == "none":
        return centred
    raise ValueError(f"scale_rewards must be group, batch or none, got {scale_rewards!r}")


@dataclass(frozen=True)
class NoOptions:
    @classmethod
    def from_config(cls, algorithm: Any) -> NoOptions:
        return cls()


@register_advantage("rloo", NoOptions)
def rloo_advantage(rewards: Tensor, group_ids: Tensor) -> Tensor:
    """SPEC §3 RLOO: A_i = R_i − mean_{j≠i} R_j = G/(G−1)·(R_i − mean); 0 for a group of one or of equal rewards."""
    mean, _, n = group_stats(rewards, group_ids)
    live = (n > 1) & ~_equal_groups(rewards, group_ids)
    return torch.where(live, (rewards - mean) * n / (n - 1).clamp(min=1), torch.zeros_like(rewards))


# --------------------------------------------------------------------------------------------------------------
# LamPO

LAMPO_WEIGHTS = ("confidence", "preference", "lambdarank")
LAMPO_NORMALIZE = ("weights", "pairs", "none")
LAMPO_SCORES = ("mean", "sum")


@dataclass(frozen=True)
class LamPOOptions:
    tau: float = 1.0
    weight: str = "confidence"
    normalize: str = "weights"

    @classmethod
    def from_config(cls, algorithm: Any) -> LamPOOptions:
        lam = algorithm.lampo
        return cls(tau=lam.tau, weight=lam.weight, normalize=lam.normalize)


def sequence_scores(logprobs: Sequence[Sequence[float]], score: str = "mean") -> Tensor:
    """SPEC §4 sequence score s_i under the behaviour policy, detached: the mean (`score=mean`, comparable across
    lengths) or the sum (`sum`) of each response's token log-probs, in float64. An empty response scores 0."""
    if score not in LAMPO_SCORES:
        raise ValueError(f"lampo score must be one of {', '.join(LAMPO_SCORES)}, got {score!r}")
    sums = torch.tensor([sum(lp) for lp in logprobs], dtype=torch.float64)
    if score == "sum":
        return sums
    return sums / torch.tensor([max(len(lp), 1) for lp in logprobs], dtype=torch.float64)


def check_lampo_options(tau: float, weight: str, normalize: str) -> float:
    """τ as a float, or ValueError naming the bad option (the single place LamPO's options are checked)."""
    if weight not in LAMPO_WEIGHTS:
        raise ValueError(f"lampo weight must be one of {', '.join(LAMPO_WEIGHTS)}, got {weight!r}")
    if normalize not in LAMPO_NORMALIZE:
        raise ValueError(f"lampo normalize must be one of {', '.join(LAMPO_NORMALIZE)}, got {normalize!r}")
    try:
        tau_f = float(tau)
    except (TypeError, ValueError):
        tau_f = float("nan")
    if isinstance(tau, bool) or not tau_f > 0:
        raise ValueError(f"lampo tau must be a number > 0, got {tau!r}")
    return tau_f


def lampo_log_weights(r: Tensor, s: Tensor, tau: float, weight: str) -> Tensor:
    """SPEC §4 confidence-aware pair weights, as log w_ij `[n, G, G]` for rewards and scores `[n, G]` (diagonal
    included; callers mask it): `confidence` w_ij = σ((s_i − s_j)/τ); `preference` w_ij = σ(sign(R_i − R_j)(s_i −
    s_j)/τ), the policy's probability of the correct preference; `lambdarank` w_ij = σ(−sign(R_i − R_j)(s_i − s_j)/τ),
    emphasising mis-ranked pairs. Log-space, so that a tiny τ cannot underflow a whole row."""
    x = (s[:, :, None] - s[:, None, :]) / tau
    if weight == "preference":
        x = torch.sign(r[:, :, None] - r[:, None, :]) * x
    elif weight == "lambdarank":
        x = -torch.sign(r[:, :, None] - r[:, None, :]) * x
    return torch.nn.functional.logsigmoid(x)


def lampo_block(r: Tensor, s: Tensor, tau: float, weight: str, normalize: str) -> tuple[Tensor, Tensor, Tensor]:
    """SPEC §4 pairwise decomposed advantage on `n` groups of equal size G: rewards and scores `[n, G]` →
    (advantages `[n, G]`, pair weights w_ij `[n, G, G]` with 0 on the diagonal, pair mask `[G, G]`).

    A_i = Σ_{j≠i} w_ij (R_i − R_j) / Z_i with w_ij from `lampo_log_weights` and Z_i = Σ_{j≠i} w_ij (`weights`),
    G − 1 (`pairs`) or 1 (`none`).
    """
    n, g = r.shape
    pairs = ~torch.eye(g, dtype=torch.bool, device=r.device)
    if g == 1:  # no pairs: advantage 0, not 0/0
        return torch.zeros_like(r), r.new_zeros(n, 1, 1), pairs
    dr = r[:, :, None] - r[:, None, :]
    log_w = lampo_log_weights(r, s, tau, weight).masked_fill(~pairs, float("-inf"))
    w = torch.exp(log_w)
    if normalize == "weights":
        # w_ij / Σ_j w_ij is unchanged by a per-row factor: shifting by the row's max log-weight keeps a tiny τ from
        # underflowing every weight of a row to 0 (0/0)
        shifted = torch.exp(log_w - log_w.amax(-1, keepdim=True))
        adv = (shifted * dr).sum(-1) / shifted.sum(-1)
    else:
        adv = (w * dr).sum(-1) / (g - 1 if normalize == "pairs" else 1)
    return adv, w, pairs


@register_advantage("lampo", LamPOOptions, inputs=("seq_scores",), optional=("diagnostics",))
def lampo_advantage(
    rewards: Tensor,
    group_ids: Tensor,
    *,
    seq_scores: Tensor,
    tau: float = 1.0,
    weight: str = "confidence",
    normalize: str = "weights",
    diagnostics: dict[str, float] | None = None,
) -> Tensor:
    """SPEC §4 LamPO pairwise decomposed advantage: A_i = Σ_{j≠i, same group} w_ij (R_i − R_j) / Z_i (`lampo_block`).

    seq_scores: per-sequence score s_i under the behaviour policy (e.g. mean token log-prob), `[N]`; detached here.
    tau: temperature τ > 0 of the pair weights (τ → ∞ gives w = 1/2 and a mean-centred reward, up to a constant).
    Groups are bucketed by size and each bucket is one dense `[n, G, G]` computation: no Python loop over pairs or
    groups, and no padding (one big group among many singletons costs only its own G²). Computed in float64 and
    returned in the rewards' floating dtype, without gradient. `diagnostics`, if given, receives the mean pair
    weight and the fraction of pairs with a reward gap.
    """
    tau_f = check_lampo_options(tau, weight, normalize)
    out_dtype = rewards.dtype if rewards.is_floating_point() else torch.float64
    with torch.no_grad():
        r = rewards.detach().to(torch.float64)
        s = torch.as_tensor(seq_scores).detach().to(device=r.device, dtype=torch.float64)
        if s.shape != r.shape:
            raise ValueError(f"lampo seq_scores {tuple(s.shape)} must have the shape of rewards {tuple(r.shape)}")
        if not torch.isfinite(s).all():
            raise ValueError("lampo seq_scores must be finite (a -inf log-prob would make s_i − s_j undefined)")
        adv = torch.zeros_like(r)
        w_sum = gaps = n_pairs = 0.0
        _, inverse, counts = torch.unique(torch.as_tensor(group_ids, device=r.device), return_inverse=True,
                                          return_counts=True)  # fmt: skip
        order = torch.argsort(inverse, stable=True)  # members of a group become contiguous
        size_of = counts[inverse[order]]
        for g in torch.unique(counts).tolist():
            idx = order[size_of == g].view(-1, g)  # [groups of size g, g], original indices
            block, w, pairs = lampo_block(r[idx], s[idx], tau_f, weight, normalize)
            adv[idx] = block
            if g > 1 and diagnostics is not None:
                w_sum += float(w.sum())
                gaps += float(((r[idx][:, :, None] != r[idx][:, None, :]) & pairs).sum())
                n_pairs += idx.shape[0] * g * (g - 1)
        if diagnostics is not None:
            diagnostics["lampo/weight_mean"] = w_sum / n_pairs if n_pairs else float("nan")
            diagnostics["lampo/pairs_with_gap"] = gaps / n_pairs if n_pairs else 0.0
    return adv.to(out_dtype)
