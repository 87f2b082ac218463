"""ROUGE-L F1: reasonrl's `rouge_l_f1` (rapidfuzz LCS) vs rouge-score's `RougeScorer(["rougeL"])` (Python DP).

Same tokenisation on both sides (rouge-score's default, no stemming). The script first checks that the two give the
same tokens and the same F1 on every benchmark pair and on a few edge cases (empty, punctuation only, non-ASCII), then
times both in one process, interleaved: each round is one pass of rouge-score over all pairs surrounded by passes of
reasonrl, and the speed-up is computed per round, so load from other processes hits both sides alike. It also splits
reasonrl's time into tokenisation and LCS. Target (SPEC §4 acceptance): equal results and a speed-up of at least 200x
on 500-word texts.

Needs `pip install rouge-score`. Usage: python perf/bench_rouge.py [--pairs 50] [--words 500] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time

from rapidfuzz.distance import LCSseq
from rouge_score import rouge_scorer, tokenizers

from reasonrl.rewards import rouge as rewards
from reasonrl.rewards.rouge import rouge_l_f1

TARGET = 200.0  # speed-up, SPEC §4 acceptance
VOCAB = [f"word{i}" for i in range(400)] + ["The", "a", "x=2,", "(b)", "\\frac{1}{2}", "3.14", "so.", "Then", "café"]
EDGE_CASES = [
    ("", "a b c"),
    ("a b c", ""),
    ("!!! ...", "a b"),
    ("the cat sat", "the cat sat"),
    ("Straße naïve ÉCOLE x²", "strasse naive ecole x2"),
    ("Ünïcödé—dash…ellipsis 1,000.5", "unicode dash ellipsis 1 000 5"),
    ("x = \\frac{a}{b}; \\boxed{42}", "frac a b boxed 42"),
]


def random_text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(VOCAB) for _ in range(words))


def one_pass(fn, pairs) -> float:
    """Seconds per pair of one pass over all pairs."""
    start = time.perf_counter()
    for cand, ref in pairs:
        fn(cand, ref)
    return (time.perf_counter() - start) / len(pairs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=50)
    parser.add_argument("--words", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (each: 1 rouge-score pass)")
    parser.add_argument("--inner", type=int, default=10, help="reasonrl passes before and after each rouge-score pass")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = random.Random(args.seed)
    pairs = [(random_text(rng, args.words), random_text(rng, args.words)) for _ in range(args.pairs)]
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)

    def reference(cand: str, ref: str) -> float:
        return scorer.score(ref, cand)["rougeL"].fmeasure  # rouge-score's argument order is (target, prediction)

    # 1. Equality: tokens and F1, on the benchmark pairs and the edge cases.
    ours_tok = rewards._rouge_tokens_fast  # the tokenizer rouge_l_f1 uses by default (private; bytes tokens)
    their_tok = tokenizers.DefaultTokenizer(use_stemmer=False).tokenize  # what RougeScorer uses
    worst = 0.0
    for cand, ref in pairs + EDGE_CASES:
        for text in (cand, ref):
            assert [t.decode() for t in ours_tok(text)] == their_tok(text), text
            assert rewards.rouge_tokenize(text) == their_tok(text), text
        worst = max(worst, abs(rouge_l_f1(cand, ref) - reference(cand, ref)))
    assert worst <= 1e-12, worst
    print(f"equality: {len(pairs)} pairs + {len(EDGE_CASES)} edge cases, same tokens, max |F1 diff| = {worst:.1e}")

    # 2. Speed, interleaved: per round, reasonrl passes / one rouge-score pass / reasonrl passes.
    for _ in range(3):
        one_pass(rouge_l_f1, pairs)  # warm-up (imports, caches)
    tokenised = [(ours_tok(c), ours_tok(r)) for c, r in pairs]
    ours_all, theirs_all, ratios, tok_all, lcs_all = [], [], [], [], []
    for _ in range(args.rounds):
        before = [one_pass(rouge_l_f1, pairs) for _ in range(args.inner)]
        theirs = one_pass(reference, pairs)
        after = [one_pass(rouge_l_f1, pairs) for _ in range(args.inner)]
        ours = statistics.median(before + after)
        ours_all += before + after
        theirs_all.append(theirs)
        ratios.append(theirs / ours)
        # where reasonrl's time goes: tokenisation of both texts vs rapidfuzz LCS on ready token lists
        tok_all += [one_pass(lambda c, r: (ours_tok(c), ours_tok(r)), pairs) for _ in range(args.inner)]
        lcs_all += [one_pass(LCSseq.similarity, tokenised) for _ in range(args.inner)]

    ours, theirs = statistics.median(ours_all), statistics.median(theirs_all)
    tok, lcs = statistics.median(tok_all), statistics.median(lcs_all)
    ratio = statistics.median(ratios)
    print(f"{os.cpu_count()} CPUs, 1-min load average {os.getloadavg()[0]:.2f} at end")
    print(f"{args.pairs} pairs of {args.words}-word texts; {args.rounds} interleaved rounds; times are per pair")
    print(f"rouge_l_f1 (reasonrl, rapidfuzz LCS): {ours * 1e6:10.1f} us  (median of {len(ours_all)} passes)")
    print(f"  of which tokenisation (both texts): {tok * 1e6:10.1f} us")
    print(f"  of which LCS (rapidfuzz LCSseq):    {lcs * 1e6:10.1f} us")
    print(f"rouge-score RougeScorer(['rougeL']):  {theirs * 1e6:10.1f} us  (median of {len(theirs_all)} passes)")
    print(f"speed-up per round: {', '.join(f'{r:.0f}x' for r in ratios)}")
    verdict = "MET" if min(ratios) >= TARGET else "NOT MET"
    print(f"rouge_l_f1 speed-up vs rouge-score: {ratio:.0f}x (median; min {min(ratios):.0f}x)")
    print(f"target: equal F1 and >= {TARGET:.0f}x in every round: {verdict}")


if __name__ == "__main__":
    main()
