"""Evaluation: greedy accuracy and, with sampling, mean@k, unbiased pass@k and majority-vote maj@k.

With a reflection template it also reports LANPO's feedback-augmented accuracy (SPEC §5): a second greedy attempt
whose prompt shows the model its own first attempt, reward-agnostic as in training.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from reasonrl.data.problems import Problem, conversations, reward_columns
from reasonrl.data.prompts import PromptFormat, prompt_ids
from reasonrl.data.reasoning_gym import COLUMN as RG_COLUMN
from reasonrl.errors import UserError
from reasonrl.lanpo.feedback import reflect_prompt
from reasonrl.rewards.math import extract_answer
from reasonrl.rewards.stage import Rewards
from reasonrl.rollout.base import RolloutEngine, SamplingParams, make_engine

__all__ = ["evaluate", "majority_vote", "normalize_answer", "pass_at_k"]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 − C(n−c, k)/C(n, k) (Chen et al., 2021)."""
    if k > n:
        raise ValueError(f"pass@k needs k <= n (k={k}, n={n})")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


_WRAPPER = re.compile(r"^\\(?:text|textbf|textrm|mathrm|mathbf|mbox)\s*\{")
_DELIMITERS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))
_THOUSANDS = re.compile(r"^-?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")


def _balanced(text: str) -> bool:
    depth = 0
    for ch in text:
        depth += (ch == "{") - (ch == "}")
        if depth < 0:
            return False
    return depth == 0


def normalize_answer(answer: str | None) -> str | None:
    """A canonical spelling of an extracted final answer for voting; None when there is nothing to vote for.

    Removes what changes the spelling but not the answer: surrounding ``$``/``\\(..\\)``/``\\[..\\]``, a
    ``\\text{..}``-style wrapper around the whole answer, ``\\left``/``\\right``, LaTeX thin spaces, degree marks,
    ``\\dfrac``/``\\tfrac`` (as ``\\frac``), spaces next to symbols, a final ``.``, thousands separators
    (``1,000``) and parentheses around a single letter (``(C)``). Deeper equivalence (``0.5`` vs ``\\frac12``) is
    the verifier's job (see :func:`majority_vote`'s ``equivalent``).
    """
    if answer is None:
        return None
    s = answer.strip()
    changed = True
    while changed and s:
        changed = False
        for left, right in _DELIMITERS:
            if len(s) > len(left) + len(right) - 1 and s.startswith(left) and s.endswith(right):
                s, changed = s[len(left) : len(s) - len(right)].strip(), True
                break
        m = _WRAPPER.match(s)
        if m and s.endswith("}") and _balanced(s[m.end() : -1]):
            s, changed = s[m.end() : -1].strip(), True
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = re.sub(r"\\(?:left|right)(?![A-Za-z])", "", s)
    s = re.sub(r"\\[,;:! ]", " ", s)
    s = re.sub(r"\^\s*\{?\s*\\circ\s*\}?", "", s)
    s = re.sub(r"\s+", " ", s).strip()
    s = re.sub(r"\s*([^\w\s])\s*", r"\1", s)  # spaces next to symbols; never between two letters ("\\pi r")
    s = s.rstrip(".")
    if _THOUSANDS.match(s):
        s = s.replace(",", "")
    if re.fullmatch(r"\([A-Za-z]\)", s):
        s = s[1]
    return s or None


def majority_vote(answers: Sequence[str | None], equivalent: Callable[[str, str], bool] | None = None) -> int | None:
    """Index of the sample whose final answer wins a majority vote; None when no sample has an answer.

    ``answers`` are extracted final answers (``extract_answer``), in sampling order. Each is normalised
    (:func:`normalize_answer`); None and empty answers do not vote. Equal normalised answers form one group; with
    ``equivalent(answer, representative)`` (e.g. the math verifier), an answer that equals no group's spelling joins
    the earliest group whose representative (its first answer) it is equivalent to, else it starts a new group.
    The largest group wins; ties go to the group whose first answer was sampled earliest. The returned index is
    that first answer's, so the vote is correct exactly when that sample is.
    """
    groups: list[list[int]] = []
    reps: list[str] = []
    group_of: dict[str, int] = {}
    for i, raw in enumerate(answers):
        key = normalize_answer(raw)
        if key is None:
            continue
        g = group_of.get(key)
        if g is None and equivalent is not None:
            g = next((j for j, rep in enumerate(reps) if equivalent(key, rep)), None)
        if g is None:
            g = len(groups)
            groups.append([])
            reps.append(key)
        group_of[key] = g
        groups[g].append(i)
    if not groups:
        return None
    best = max(range(len(groups)), key=lambda g: (len(groups[g]), -groups[g][0]))
    return groups[best][0]


def _equivalence_table(
    answer_lists: Iterable[Sequence[str | None]], check: Callable[[list[tuple[str, str]]], list[bool]]
) -> dict[tuple[str, str], bool]:
    """Every ``equivalent(answer, representative)`` that :func:`majority_vote` will ask for these answer lists,
    checked in batches: one ``check`` call per grouping round (round r compares each problem's not yet grouped
    answers with its r-th representative), instead of one verifier call per pair."""
    table: dict[tuple[str, str], bool] = {}
    pending = []
    for answers in answer_lists:
        keys = [k for k in (normalize_answer(a) for a in answers) if k is not None]
        pending.append(list(dict.fromkeys(keys)))  # distinct, in first-sampled order
    while any(len(keys) > 1 for keys in pending):
        pairs = list(dict.fromkeys((k, keys[0]) for keys in pending if len(keys) > 1 for k in keys[1:]))
        todo = [p for p in pairs if p not in table]
        table.update(zip(todo, check(todo), strict=True))
        pending = [[k for k in keys[1:] if not table[(k, keys[0])]] for keys in pending]
    return table


def _verifier_check(verifier: Any) -> Callable[[list[tuple[str, str]]], list[bool]] | None:
    """``check(pairs)`` with the math_answer reward's MathVerifier (the second answer of a pair as the gold)."""
    fn = getattr(verifier, "functions", {}).get("math_answer")
    math_verifier = getattr(fn, "verifier", None)
    if math_verifier is None or not hasattr(math_verifier, "verify"):
        return None

    def check(pairs: list[tuple[str, str]]) -> list[bool]:
        if not pairs:
            return []
        results = math_verifier.verify([a for a, _ in pairs], [b for _, b in pairs])
        return [r.score >= 1.0 for r in results]

    return check


@torch.no_grad()
def evaluate(
    model: Any,
    tokenizer: Any,
    problems: list[Problem],
    verifier: Rewards,
    *,
    max_new_tokens: int,
    k: int = 1,
    samples: int | None = None,
    temperature: float = 1.0,
    batch_size: int = 256,
    prompt_format: PromptFormat | None = None,
    reflect_template: str | None = None,
    engine: str | RolloutEngine = "fast",
) -> dict[str, float]:
    """Accuracy of greedy decoding; with `reflect_template`, `feedback_accuracy` of a greedy second attempt at each
    problem that reflects on the first; and, when k > 1 or `samples` > 1, `samples` (default k) sampled completions
    per problem scored as:

    - ``mean@k``: mean accuracy of the samples (c/n per problem, averaged);
    - ``pass@k``: the unbiased estimator 1 − C(n−c, k)/C(n, k) per problem (n samples, c correct), averaged;
    - ``maj@k``: share of problems whose majority-voted answer over the first k samples is correct
      (:func:`majority_vote`: samples without a final answer do not vote, answers the math verifier finds
      equivalent vote together, ties go to the earliest-sampled answer; no answer at all counts as wrong).

    Every result has ``reward`` (the greedy completions' mean total reward), ``truncated`` and ``completion_len``.
    Accuracy and the rest need a judging function in `verifier` (`math_answer`, or `reasoning_gym`), whose `correct`
    flags decide it; without one, the result is the reward alone. The second prompt is
    the template filled with the problem and the first attempt's text only: its score never reaches the model.
    `engine` is the rollout engine: a name (`rollout.engine`: a fresh engine on `model` with `batch_size`), or an
    engine object that holds its own weights (vLLM), which is used as it is rather than started a second time.
    """
    n = k if samples is None else samples
    if k < 1 or n < k:
        raise ValueError(f"evaluate needs 1 <= k <= samples (k={k}, samples={n})")
    own = isinstance(engine, str)  # an engine made here is closed here (vLLM: its process memory, temp files)
    sampler = make_engine(engine, model, tokenizer, batch_size=batch_size) if own else engine
    try:
        return _evaluate(sampler, tokenizer, problems, verifier, max_new_tokens, k, n, temperature, prompt_format,
                         reflect_template)  # fmt: skip
    finally:
        if own:
            sampler.close()


def _evaluate(
    sampler: RolloutEngine,
    tokenizer: Any,
    problems: list[Problem],
    verifier: Rewards,
    max_new_tokens: int,
    k: int,
    n: int,
    temperature: float,
    prompt_format: PromptFormat | None,
    reflect_template: str | None,
) -> dict[str, float]:
    judges = getattr(verifier, "functions", {})
    if "math_answer" not in judges and "reasoning_gym" in judges and any(RG_COLUMN not in p.metadata for p in problems):
        raise UserError(
            "evaluation would judge answers with the reasoning_gym reward alone, which scores only reasoning-gym "
            "problems; add math_answer to rewards.functions (weight 0 keeps it out of the training reward)"
        )
    prompts = [prompt_ids(tokenizer, p.prompt, prompt_format, p.history) for p in problems]
    columns, chats = reward_columns(problems), conversations(problems)
    greedy = sampler.generate(prompts, 1, SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0))
    out = verifier(
        [p.prompt for p in problems], [c.text for c in greedy], columns, [c.token_ids for c in greedy], chats
    )
    timeouts = out.metrics.get("reward/verify_timeouts", 0.0)
    metrics = {
        "reward": sum(out.total) / len(problems),
        "truncated": sum(c.truncated for c in greedy) / len(problems),
        "completion_len": sum(len(c.token_ids) for c in greedy) / len(problems),
    }
    if out.correct is None:  # no reward function judges correctness (math_answer, reasoning_gym): reward only
        return metrics
    metrics["accuracy"] = sum(out.correct) / len(problems)
    if reflect_template is not None:
        texts = [reflect_prompt(p.prompt, c.text, reflect_template) for p, c in zip(problems, greedy, strict=True)]
        second = sampler.generate(
            [prompt_ids(tokenizer, t, prompt_format, p.history) for t, p in zip(texts, problems, strict=True)],
            1,
            SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0),
        )
        res = verifier(
            [p.prompt for p in problems], [c.text for c in second], columns, [c.token_ids for c in second], chats
        )
        metrics["feedback_accuracy"] = sum(res.correct) / len(problems)
        # what the second attempt changed: wrong answers it fixed, right ones it broke (shares of all problems)
        metrics["feedback_fixed"] = sum(b and not a for a, b in zip(out.correct, res.correct, strict=True)) / len(
            problems
        )
        metrics["feedback_broken"] = sum(a and not b for a, b in zip(out.correct, res.correct, strict=True)) / len(
            problems
        )
        metrics["feedback_truncated"] = sum(c.truncated for c in second) / len(problems)
        timeouts += res.metrics.get("reward/verify_timeouts", 0.0)
    if n > 1:
        sampled = sampler.generate(prompts, n, SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature))
        rep = {key: [v for v in vals for _ in range(n)] for key, vals in columns.items()}
        res = verifier(
            [p.prompt for p in problems for _ in range(n)],
            [c.text for c in sampled],
            rep,
            [c.token_ids for c in sampled],
            conversations(problems, n),
        )
        flags = res.correct
        correct = [sum(flags[i * n : (i + 1) * n]) for i in range(len(problems))]
        metrics[f"mean@{k}"] = sum(correct) / (n * len(problems))
        metrics[f"pass@{k}"] = sum(pass_at_k(n, c, k) for c in correct) / len(problems)
        voters = [[extract_answer(c.text) for c in sampled[i * n : i * n + k]] for i in range(len(problems))]
        check = _verifier_check(verifier)
        table = _equivalence_table(voters, check) if check is not None else None
        equivalent = (lambda a, b: table[(a, b)]) if table is not None else None
        voted = [majority_vote(answers, equivalent) for answers in voters]
        metrics[f"maj@{k}"] = sum(j is not None and flags[i * n + j] for i, j in enumerate(voted)) / len(problems)
        timeouts += res.metrics.get("reward/verify_timeouts", 0.0)
    # answers the verifier could not judge in rewards.timeout_s count as wrong: say how many there were
    metrics["verify_timeouts"] = timeouts
    if timeouts:
        warnings.warn(
            f"{timeouts:.0f} answers were cut off by the verifier's rewards.timeout_s and scored as wrong "
            "(verify_timeouts); raise rewards.timeout_s if they are slow to check, not wrong",
            stacklevel=3,
        )
    return metrics
