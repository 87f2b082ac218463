"""SPEC §4 dense ROUGE-L reward: equal to rouge-score's ROUGE-L F1, and the reward's skip/weight behaviour."""

from __future__ import annotations

import random

import pytest

from reasonrl.rewards.rouge import _rouge_tokens_fast, rouge_l_f1, rouge_tokenize
from reasonrl.rewards.stage import Rewards, load_reward_function

rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
rouge_tokenize_ref = pytest.importorskip("rouge_score.tokenize")

VOCAB = [
    "the", "The", "THE", "cat", "Cat", "sat", "on", "mat", "mat.", "x", "x=2,", "2", "42", "3.14", "don't", "e.g.",
    "(a)", "[b]", "{c}", "$\\frac{1}{2}$", "\\boxed{7}", "--", "...", "!", "?", ";", "café", "naïve", "Ünïcode",
    "x_1", "a+b", "", "   ", "\n", "\t", "tab\tbed", "end.", "END", "hello,world", "α", "βeta", "1e-5", "#", "####",
]  # fmt: skip


def random_text(rng: random.Random) -> str:
    n = rng.choice([0, 1, 2, rng.randint(3, 20), rng.randint(3, 20), rng.randint(20, 120), rng.randint(20, 120)])
    return rng.choice([" ", "  ", "\n", ""]).join(rng.choice(VOCAB) for _ in range(n))


def test_tokenizer_matches_rouge_score() -> None:
    rng = random.Random(0)
    for _ in range(500):
        text = random_text(rng)
        expected = rouge_tokenize_ref.tokenize(text, None)
        assert rouge_tokenize(text) == expected, repr(text)
        assert [t.decode() for t in _rouge_tokens_fast(text)] == expected, repr(text)  # the path rouge_l_f1 uses
    # lower() can map non-ASCII to ASCII (Kelvin sign → k, İ → i + combining dot); both lowercase first
    for text in ["\u212aelvin", "\u0130stanbul", "stra\u00dfe", "\U0001f600smile\ud800x", "ＡＢＣ 12"]:
        expected = rouge_tokenize_ref.tokenize(text, None)
        assert rouge_tokenize(text) == expected
        assert [t.decode() for t in _rouge_tokens_fast(text)] == expected


def test_equals_rouge_score_on_random_pairs() -> None:
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    rng = random.Random(1)
    pairs = [(random_text(rng), random_text(rng)) for _ in range(200)]
    pairs += [("", ""), ("", "cat"), ("cat", ""), ("...", "cat"), ("cat", "dog"), ("The cat", "the CAT!")]
    nonzero = 0
    for cand, ref in pairs:
        expected = scorer.score(ref, cand)["rougeL"].fmeasure  # score(target, prediction)
        got = rouge_l_f1(cand, ref)
        assert isinstance(got, float)
        assert abs(got - expected) <= 1e-9, (cand, ref, got, expected)
        nonzero += expected > 0
    assert nonzero > 80  # the pairs actually exercise the LCS, not only the empty cases


def test_asymmetric_precision_recall() -> None:
    # candidate "a b c d" vs reference "a c": LCS 2, P = 2/4, R = 2/2, F1 = 2·0.5·1/1.5
    assert rouge_l_f1("a b c d", "a c") == pytest.approx(2 / 3)
    assert rouge_l_f1("a c", "a b c d") == pytest.approx(2 / 3)
    assert rouge_l_f1("same words here", "Same, words; here!") == 1.0
    assert rouge_l_f1("abc", "xyz") == 0.0


def test_tokenize_callable_is_used() -> None:
    calls: list[str] = []

    def char_ids(text: str) -> list[int]:  # like a model tokenizer's encode: ids, case-sensitive, no word splitting
        calls.append(text)
        return [ord(c) for c in text]

    # words: identical after lowercasing → 1.0; characters: 'A' ≠ 'a' → LCS 2 of 3
    assert rouge_l_f1("Abc", "abc") == 1.0
    assert rouge_l_f1("Abc", "abc", tokenize=char_ids) == pytest.approx(2 / 3)
    assert calls == ["Abc", "abc"]


def test_tokenize_returning_an_array() -> None:
    np = pytest.importorskip("numpy")
    enc = {"x": 1, "y": 2, "z": 3}
    got = rouge_l_f1("x y z", "x z", tokenize=lambda t: np.array([enc[w] for w in t.split()]))
    assert got == pytest.approx(0.8)  # LCS 2: P = 2/3, R = 1


def test_reward_skips_rows_without_reference() -> None:
    fn = load_reward_function("rouge_l")
    completions = ["the cat sat", "the cat sat", "the cat sat", "the cat sat", "anything"]
    reference = ["the cat sat on the mat", None, "", "   ", float("nan")]
    out = fn(["p"] * 5, completions, reference=reference, answer=["1"] * 5)
    assert out[0] == pytest.approx(rouge_l_f1("the cat sat", "the cat sat on the mat"))
    assert isinstance(out[0], float)
    assert out[1:] == [None, None, None, None]
    assert fn(["p"], ["text"], answer=["1"]) == [None]  # no reference column at all


def test_reward_weighted_in_the_stage() -> None:
    # R = r_other + λ_sem · ROUGE-L-F1 where there is a reference; the verifier-like reward alone elsewhere
    with Rewards(["format", "rouge_l"], [1.0, 0.1]) as rewards:
        completions = ["so \\boxed{2}", "so \\boxed{2}"]
        out = rewards(["p", "p"], completions, {"reference": ["so it is \\boxed{2}", None]})
    f1 = rouge_l_f1("so \\boxed{2}", "so it is \\boxed{2}")
    assert 0 < f1 < 1
    assert out.total == pytest.approx([1.0 + 0.1 * f1, 1.0])
    assert out.per_function["rouge_l"][1] is None
