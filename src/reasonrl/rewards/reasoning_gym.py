"""reasoning-gym's own scorers as a reward: ``rewards.functions=[reasoning_gym]``.

A problem of ``data.source=reasoning_gym:NAME`` carries its generator's name and options and its entry in the
``reasoning_gym`` column (:mod:`reasonrl.data.reasoning_gym`). The completion's final answer is extracted as for
``math_answer`` (the last ``\\boxed{...}``, else a ``#### ...`` line: :func:`~reasonrl.rewards.math.extract_answer`),
so one answer convention holds for every reward and for majority voting, and the generator's
``score_answer(answer, entry)`` scores it: a float in [0, 1] (some generators give partial credit, e.g. 0.01 for a
wrong number in ``gsm_symbolic``); no final answer scores 0.

Scorers run in the math verifier's worker processes with its per-item timeout, like math-verify: several parse the
answer with sympy (``countdown``, ``simple_integration``), which can hang on an answer such as ``9**9**9**9``, and a
few ``eval`` it. ``math_answer`` scores reasoning-gym problems the same way (see ``MathAnswerReward``), so the
default rewards need no change for such a source; list one of the two, not both, or the answer counts twice.
This module never imports ``reasoning_gym`` in the trainer; the workers do.
"""

from __future__ import annotations

import math
from typing import Any

from reasonrl.rewards.math import MathVerifier, VerifyResult, extract_answer

__all__ = ["ReasoningGymReward", "score_entries"]

_SCORERS: dict[tuple[str, str], Any] = {}  # per worker: (generator, repr(options)) -> a dataset to score with


def _score_one(dataset: str, options: dict[str, Any], answer: str, entry: dict[str, Any]) -> tuple[float, str]:
    """Worker task: (score, status) of one answer by generator ``dataset``'s scorer. Scorers read the entry and the
    generator's options (never its seed or size), so a one-problem dataset built once per worker serves them all."""
    key = (dataset, repr(options))
    scorer = _SCORERS.get(key)
    if scorer is None:  # an error here (reasoning-gym missing or changed) is an 'error', the data's fault
        import reasoning_gym

        scorer = _SCORERS[key] = reasoning_gym.create_dataset(dataset, seed=0, size=1, **options)
    try:
        score = float(scorer.score_answer(answer, entry))
    except Exception:  # the scorer could not read the answer (most catch this themselves and return 0)
        return 0.0, "unparsable"
    if not math.isfinite(score):
        return 0.0, "error"
    return min(max(score, 0.0), 1.0), "ok"


def score_entries(verifier: MathVerifier, answers: list[str | None], column: list[Any]) -> list[VerifyResult | None]:
    """One result per answer whose ``column`` entry is set (a reasoning-gym problem), None for the others; equal
    (answer, problem) pairs are scored once, in ``verifier``'s worker pool."""
    results: list[VerifyResult | None] = [None] * len(answers)
    jobs: dict[tuple[str, str, str, str], tuple[Any, ...]] = {}
    where: dict[tuple[str, str, str, str], list[int]] = {}
    for i, (answer, item) in enumerate(zip(answers, column, strict=True)):
        if not item:
            continue
        if answer is None or not answer.strip():
            results[i] = VerifyResult(0.0, "unparsable")
            continue
        options = item.get("config") or {}
        key = (item["dataset"], repr(options), answer.strip(), repr(item["entry"]))
        jobs[key] = (item["dataset"], options, answer.strip(), item["entry"])
        where.setdefault(key, []).append(i)
    if jobs:
        verifier.preload("reasoning_gym")
        checked = verifier.run(_score_one, jobs)
        for key, idxs in where.items():
            for i in idxs:
                results[i] = VerifyResult(checked[key].score, checked[key].status)
    return results


class ReasoningGymReward:
    """The generator's score of the completion's final answer for reasoning-gym problems; None (no opinion) for
    problems from elsewhere, e.g. a math eval set beside reasoning-gym training data.

    Owns a MathVerifier (its worker pool); ``close()`` stops it. ``last_results`` holds the latest statuses.
    """

    def __init__(self, *, timeout_s: float = 5.0, num_workers: int = 2, **_: Any) -> None:
        self.verifier = MathVerifier(num_workers=num_workers, timeout_s=timeout_s)
        self.last_results: list[VerifyResult] = []

    def __call__(
        self, prompts: list[str], completions: list[str], *, reasoning_gym: list[Any] | None = None, **_: Any
    ) -> list[float | None]:
        column = reasoning_gym if reasoning_gym is not None else [None] * len(completions)
        results = score_entries(self.verifier, [extract_answer(c) for c in completions], column)
        self.last_results = [r for r in results if r is not None]
        return [None if r is None else r.score for r in results]

    def close(self) -> None:
        self.verifier.close()
