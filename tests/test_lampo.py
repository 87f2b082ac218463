"""SPEC §4 LamPO advantage: the vectorised estimator against a plain double loop, and the properties SPEC §4 pins."""

from __future__ import annotations

import math
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from reasonrl.algorithms import LamPOOptions, advantage_options, compute_advantages, lampo_advantage
from reasonrl.config import load_config

WEIGHTS = ["confidence", "preference", "lambdarank"]
NORMALIZE = ["weights", "pairs", "none"]


def naive_lampo(rewards, ids, scores, tau, weight, normalize):
    """SPEC §4 written out: A_i = Σ_{j≠i, same group} w_ij (R_i − R_j) / Z_i, one pair at a time."""
    out = []
    for i in range(len(rewards)):
        others = [j for j in range(len(rewards)) if j != i and ids[j] == ids[i]]
        if not others:
            out.append(0.0)
            continue
        num = z = 0.0
        for j in others:
            diff = rewards[i] - rewards[j]
            sign = (diff > 0) - (diff < 0)
            x = (scores[i] - scores[j]) / tau
            if weight == "preference":
                x = sign * x
            elif weight == "lambdarank":
                x = -sign * x
            w = 1.0 / (1.0 + math.exp(-x))
            num += w * diff
            z += w
        if normalize == "pairs":
            z = len(others)
        elif normalize == "none":
            z = 1.0
        out.append(num / z)
    return out


def random_layout(rng: random.Random, max_size: int = 64) -> tuple[list[float], list[int], list[float]]:
    """Groups of unequal sizes 1..max_size, shuffled non-contiguous ids; ties, all-equal, negative, dense rewards."""
    rewards, ids, scores = [], [], []
    sizes = [1, max_size] + [rng.randint(1, max_size) for _ in range(rng.randint(0, 4))]
    for g, size in enumerate(sizes):
        kind = rng.random()
        for _ in range(size):
            if kind < 0.15:
                rewards.append(-0.5)  # all equal
            elif kind < 0.5:
                rewards.append(float(rng.randint(0, 1)))  # binary: many ties
            elif kind < 0.7:
                rewards.append(float(rng.choice([-1, 0, 0.1, 1.1])))  # a verifier reward plus 0.1·ROUGE
            else:
                rewards.append(rng.uniform(-3, 2))  # dense, negative too
            ids.append(g * 11 + 5)
            scores.append(rng.uniform(-4.0, 0.0) if rng.random() > 0.1 else -1.0)  # mean log-probs, some tied
    order = list(range(len(rewards)))
    rng.shuffle(order)
    return [rewards[i] for i in order], [ids[i] for i in order], [scores[i] for i in order]


@pytest.mark.parametrize("weight", WEIGHTS)
@pytest.mark.parametrize("normalize", NORMALIZE)
def test_matches_double_loop(weight: str, normalize: str) -> None:
    rng = random.Random(f"{weight}-{normalize}")
    for trial in range(6):
        rewards, ids, scores = random_layout(rng, max_size=64 if trial < 2 else 9)
        tau = rng.choice([0.1, 0.5, 1.0, 3.0])
        expected = torch.tensor(naive_lampo(rewards, ids, scores, tau, weight, normalize), dtype=torch.float64)
        r64, s64 = torch.tensor(rewards, dtype=torch.float64), torch.tensor(scores, dtype=torch.float64)
        g = torch.tensor(ids)
        # Strict check in float64 through the registered function itself.
        got = lampo_advantage(r64, g, seq_scores=s64, tau=tau, weight=weight, normalize=normalize)
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-9)
        # Through the public entry point, which computes in float64 and returns float32 (~6e-8 relative rounding).
        # float64 inputs: float32 inputs would be rounded before the sums cancel, which is not what is tested here.
        got32 = compute_advantages("lampo", r64, g, seq_scores=s64, tau=tau, weight=weight, normalize=normalize)
        assert got32.dtype == torch.float32
        torch.testing.assert_close(got32.double(), expected, rtol=1e-6, atol=1e-6)


def test_defaults_and_option_plumbing() -> None:
    rewards, ids, scores = random_layout(random.Random(1), max_size=8)
    expected = naive_lampo(rewards, ids, scores, 1.0, "confidence", "weights")
    got = compute_advantages("lampo", torch.tensor(rewards), torch.tensor(ids), seq_scores=torch.tensor(scores))
    torch.testing.assert_close(got.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-6, atol=1e-6)
    cfg = load_config(
        None, ["algorithm.lampo.tau=2", "algorithm.lampo.weight=preference", "algorithm.lampo.normalize=pairs"]
    )
    assert advantage_options("lampo", cfg.algorithm) == LamPOOptions(tau=2.0, weight="preference", normalize="pairs")


group_sizes = st.integers(min_value=1, max_value=24)
scores_st = st.floats(min_value=-20, max_value=5, allow_nan=False)
rewards_st = st.floats(min_value=-10, max_value=10, allow_nan=False)
taus = st.sampled_from([0.01, 0.3, 1.0, 7.0])


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(group_sizes, min_size=1, max_size=5),
    value=rewards_st,
    data=st.data(),
    tau=taus,
    weight=st.sampled_from(WEIGHTS),
    normalize=st.sampled_from(NORMALIZE),
)
def test_equal_rewards_give_zero(sizes, value, data, tau, weight, normalize) -> None:
    n = sum(sizes)
    ids = torch.repeat_interleave(torch.arange(len(sizes)) * 3, torch.tensor(sizes))
    scores = torch.tensor(data.draw(st.lists(scores_st, min_size=n, max_size=n)))
    adv = compute_advantages(
        "lampo", torch.full((n,), value), ids, seq_scores=scores, tau=tau, weight=weight, normalize=normalize
    )
    assert torch.equal(adv, torch.zeros(n))


@settings(max_examples=40, deadline=None)
@given(
    reward=rewards_st,
    score=scores_st,
    tau=taus,
    weight=st.sampled_from(WEIGHTS),
    normalize=st.sampled_from(NORMALIZE),
)
def test_group_of_one_is_zero(reward, score, tau, weight, normalize) -> None:
    # a singleton next to a real group: the singleton has no pairs and must get exactly 0, never NaN
    rewards = torch.tensor([reward, 0.0, 1.0])
    adv = compute_advantages(
        "lampo", rewards, torch.tensor([9, 2, 2]), seq_scores=torch.tensor([score, -1.0, -2.0]), tau=tau,
        weight=weight, normalize=normalize,
    )  # fmt: skip
    assert torch.isfinite(adv).all()
    assert adv[0].item() == 0.0


@settings(max_examples=60, deadline=None)
@given(
    groups=st.lists(
        st.lists(
            st.tuples(rewards_st, st.floats(min_value=-10, max_value=0, allow_nan=False)), min_size=2, max_size=16
        ),
        min_size=1,
        max_size=4,
    )
)
def test_large_tau_is_scaled_mean_centred_reward(groups) -> None:
    # τ → ∞: every w_ij → σ(0) = 1/2, so with `weights` normalisation
    #   A_i = Σ_{j≠i} ½(R_i − R_j) / ((G−1)·½) = (G·R_i − Σ_j R_j)/(G−1) = G/(G−1) · (R_i − mean R),
    # i.e. the mean-centred reward times the constant G/(G−1) (the RLOO advantage).
    rewards = [r for grp in groups for r, _ in grp]
    scores = [s for grp in groups for _, s in grp]
    ids = [g for g, grp in enumerate(groups) for _ in grp]
    r, gid = torch.tensor(rewards, dtype=torch.float64), torch.tensor(ids)
    got = lampo_advantage(r, gid, seq_scores=torch.tensor(scores, dtype=torch.float64), tau=1e8)
    expected = []
    for grp in groups:
        g, mean = len(grp), sum(x for x, _ in grp) / len(grp)
        expected += [g / (g - 1) * (x - mean) for x, _ in grp]
    # |s_i − s_j|/τ ≤ 1e-7, so each weight is ½(1 ± 5e-8): error ≤ ~1e-7 · max|R_i − R_j| ≤ 2e-6
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-5)
    torch.testing.assert_close(
        got.float(), compute_advantages("rloo", r, gid), rtol=1e-5, atol=1e-5
    )  # same constant as RLOO


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(group_sizes, min_size=1, max_size=4),
    data=st.data(),
    tau=taus,
    weight=st.sampled_from(["preference", "lambdarank"]),
    normalize=st.sampled_from(["pairs", "none"]),
)
def test_symmetric_weights_sum_to_zero_per_group(sizes, data, tau, weight, normalize) -> None:
    # preference/lambdarank weights are symmetric, w_ij = w_ji (sign and score difference flip together), and Z_i is
    # the same for the whole group, so the antisymmetric terms w_ij (R_i − R_j) cancel over the group.
    n = sum(sizes)
    rewards = torch.tensor(data.draw(st.lists(rewards_st, min_size=n, max_size=n)), dtype=torch.float64)
    scores = torch.tensor(data.draw(st.lists(scores_st, min_size=n, max_size=n)), dtype=torch.float64)
    ids = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(n))
    rewards, scores, ids = rewards[perm], scores[perm], ids[perm]
    adv = lampo_advantage(rewards, ids, seq_scores=scores, tau=tau, weight=weight, normalize=normalize)
    sums = torch.zeros(len(sizes), dtype=torch.float64).index_add_(0, ids, adv)
    scale = 1 + adv.abs().sum().item()
    assert sums.abs().max().item() <= 1e-12 * scale


def test_no_gradient() -> None:
    scores = torch.tensor([-1.0, -2.0, -0.5, -3.0], requires_grad=True)
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.0], requires_grad=True)
    ids = torch.tensor([0, 0, 1, 1])
    adv = compute_advantages("lampo", rewards, ids, seq_scores=scores)
    assert not adv.requires_grad and adv.grad_fn is None
    direct = lampo_advantage(rewards, ids, seq_scores=scores, weight="preference")
    assert not direct.requires_grad and direct.grad_fn is None
    assert direct.dtype == torch.float32


def test_tiny_tau_weighted_average_does_not_underflow() -> None:
    # With τ tiny the weights are 0/1 steps: row 0 (highest score) weighs both pairs 1, A_0 = ((1−0) + (1−2))/2 = 0;
    # row 1 weighs only j=2, A_1 = 0 − 2. Every weight of row 2 underflows in linear space (σ(−1e4), σ(−2e4)); the
    # weighted average must tend to its largest-weight pair instead of 0/0: A_2 → R_2 − R_1 = 2.
    rewards = torch.tensor([1.0, 0.0, 2.0], dtype=torch.float64)
    scores = torch.tensor([0.0, -1.0, -2.0], dtype=torch.float64)
    adv = lampo_advantage(rewards, torch.zeros(3, dtype=torch.long), seq_scores=scores, tau=1e-4)
    assert torch.isfinite(adv).all()
    torch.testing.assert_close(adv, torch.tensor([0.0, -2.0, 2.0], dtype=torch.float64))


def test_one_big_group_among_singletons_is_cheap() -> None:
    # padding every group to the largest would need 3001 × 500 × 500 entries here; pairs need only 500 × 499
    n_big, n_single = 500, 3000
    ids = torch.cat([torch.zeros(n_big, dtype=torch.long), torch.arange(1, n_single + 1)])
    rewards = torch.rand(n_big + n_single, generator=torch.Generator().manual_seed(0))
    adv = compute_advantages("lampo", rewards, ids, seq_scores=-rewards, tau=0.5)
    assert torch.isfinite(adv).all() and torch.equal(adv[n_big:], torch.zeros(n_single))
    assert adv[:n_big].abs().sum() > 0


def test_empty_batch() -> None:
    empty = torch.zeros(0)
    assert compute_advantages("lampo", empty, empty.long(), seq_scores=empty).shape == (0,)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"weight": "confident"}, r"weight .*confidence, preference, lambdarank"),
        ({"normalize": "mean"}, r"normalize .*weights, pairs, none"),
        ({"tau": 0.0}, "tau"),
        ({"tau": -1.0}, "tau"),
        ({"tau": float("nan")}, "tau"),
        ({"tau": "hot"}, "tau"),
        ({"seq_scores": torch.zeros(3)}, "seq_scores"),
        ({"seq_scores": torch.tensor([0.0, -math.inf])}, "seq_scores"),
    ],
)
def test_invalid_options(options, match) -> None:
    kwargs = {"seq_scores": torch.zeros(2), **options}
    with pytest.raises(ValueError, match=match):
        compute_advantages("lampo", torch.tensor([1.0, 0.0]), torch.tensor([0, 0]), **kwargs)


def test_seq_scores_required() -> None:
    with pytest.raises(ValueError, match="seq_scores"):
        compute_advantages("lampo", torch.tensor([1.0, 0.0]), torch.tensor([0, 0]))


def test_lampo_metrics_match_naive_pairs() -> None:
    rewards = [1.0, 0.0, 0.0, 0.5, 0.5, 2.0]
    ids = [0, 0, 0, 1, 1, 2]
    scores = [-1.0, -2.0, -0.5, -3.0, -1.0, -0.2]
    ws, gaps = [], []
    for i in range(len(rewards)):
        for j in range(len(rewards)):
            if i != j and ids[i] == ids[j]:
                ws.append(1 / (1 + math.exp(-(scores[i] - scores[j]) / 0.5)))
                gaps.append(rewards[i] != rewards[j])
    got: dict[str, float] = {}
    lampo_advantage(torch.tensor(rewards), torch.tensor(ids), seq_scores=torch.tensor(scores), tau=0.5, diagnostics=got)
    assert got["lampo/weight_mean"] == pytest.approx(sum(ws) / len(ws), abs=1e-12)
    assert got["lampo/pairs_with_gap"] == pytest.approx(sum(gaps) / len(gaps), abs=1e-12)


@pytest.mark.parametrize("weight", WEIGHTS)
@pytest.mark.parametrize("normalize", NORMALIZE)
def test_training_layout_equal_groups_shuffled(weight, normalize) -> None:
    # the trainer's case: many groups of one size G (here 16), in any order
    rng = random.Random(7)
    ids = [g for g in range(12) for _ in range(16)]
    rng.shuffle(ids)
    rewards = [float(rng.random() < 0.4) + 0.1 * rng.random() for _ in ids]
    scores = [-3 * rng.random() for _ in ids]
    got = lampo_advantage(
        torch.tensor(rewards, dtype=torch.float64),
        torch.tensor(ids),
        seq_scores=torch.tensor(scores, dtype=torch.float64),
        tau=0.7,
        weight=weight,
        normalize=normalize,
    )
    expected = naive_lampo(rewards, ids, scores, 0.7, weight, normalize)
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), rtol=1e-9, atol=1e-9)
