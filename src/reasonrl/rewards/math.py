"""Math answers: extraction from `\\boxed{}`, verification with math-verify in worker processes, the format reward.

Math answers are checked with math-verify (sympy) in worker processes, because sympy can hang for minutes on some
inputs (``9^{9^{9^{9^{9}}}}`` makes it build a tower of huge integers while holding the GIL). math-verify's own
``signal.alarm`` timeouts only work in a main thread and cannot interrupt a long C call; killing a worker process
after a wall-clock timeout always works. This module keeps sympy out of the trainer process and never imports torch
(workers import this module, and their start-up time matters)."""

from __future__ import annotations

import concurrent.futures
import importlib
import logging
import math
import multiprocessing
import re
import signal
import weakref
from collections.abc import Callable, Hashable, Mapping, Sequence
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

from reasonrl.errors import UserError

_BOXED = re.compile(r"\\boxed\s*\{")


_MATH_CLOSERS = ("", "$", "$$", "\\]", "\\)")  # a boxed answer inside $...$ or \[...\] still ends the text


# ----------------------------------------------------------------------------------------------- answer extraction


_BRACES = re.compile(r"\\.|[{}]", re.S)  # an escaped character (\{ and \} are literal in LaTeX), or a brace


def _boxed_spans(text: str) -> list[tuple[int, int | None]]:
    """(start of \\boxed, index just past its closing brace or None if unbalanced) for every \\boxed{ in text.

    One pass pairs every brace (a stack), then each box looks its brace up: linear in the text, however many boxes
    are left open (a completion of unclosed boxes would cost a rescan to the end per box otherwise)."""
    boxes = [(m.start(), m.end() - 1) for m in _BOXED.finditer(text)]
    if not boxes:
        return []
    closing: dict[int, int] = {}  # index of each paired "{" -> index just past its "}"
    open_braces: list[int] = []
    for m in _BRACES.finditer(text):
        if m.group() == "{":
            open_braces.append(m.start())
        elif m.group() == "}" and open_braces:
            closing[open_braces.pop()] = m.end()
    return [(start, closing.get(brace)) for start, brace in boxes]


def extract_answer(text: str) -> str | None:
    """Final answer of a completion.

    The content of the last ``\\boxed{...}`` (balanced braces, nested ok, ``\\boxed {..}`` too); else the text after
    the last ``####`` on its line (GSM8K style); else None. If the last ``\\boxed`` is unbalanced (a truncated
    generation), earlier boxes are not used: the model had moved on from them.
    """
    spans = _boxed_spans(text)
    if spans:
        start, end = spans[-1]
        if end is not None:
            inner = text[start:end]
            return inner[inner.index("{") + 1 : -1].strip()
    pos = text.rfind("####")
    if pos >= 0:
        ans = text[pos + 4 :].split("\n", 1)[0].strip()
        return ans or None
    return None


# ----------------------------------------------------------------------------------------------- verification


@dataclass
class VerifyResult:
    """Score of one answer and how it was obtained: ``ok``, ``timeout``, ``unparsable`` or ``error``."""

    score: float
    status: str


def _parse_math(text: str) -> list[Any]:
    """math-verify parse of a bare answer; wrapping in $...$ makes latex (``\\frac12``) and numbers both parse."""
    from math_verify import parse

    candidates = [text] if ("$" in text or "\\boxed" in text) else ["$" + text + "$", text]
    for cand in candidates:
        # parsing_timeout=None: signal.alarm cannot interrupt sympy's C-level work anyway; the pool's timeout can.
        parsed = parse(cand, parsing_timeout=None)
        if parsed:
            return parsed
    return []


def _verify_one(answer: str, gold: str) -> tuple[float, str]:
    """Worker task: (score, status) of one extracted answer against one gold answer."""
    from math_verify import verify

    gold_parsed = _parse_math(gold)
    if not gold_parsed:
        return 0.0, "error"  # the data, not the model, is at fault; surfaces in reward/verify_errors
    pred = _parse_math(answer)
    if not pred:
        return 0.0, "unparsable"
    return (1.0 if verify(gold_parsed, pred, timeout_seconds=None) else 0.0), "ok"


def _worker_init(preload: tuple[str, ...] = ()) -> None:
    """Pay math-verify's import and first-parse cost (and the imports of ``preload``, e.g. ``reasoning_gym``) before
    any task's clock starts; die at once on SIGTERM."""
    # pebble installs a Python-level SIGTERM handler, which cannot run while sympy is inside a long C call, so a
    # timed-out worker would linger ~3 s before SIGKILL. The default action kills it immediately.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        logging.getLogger("math_verify").setLevel(logging.ERROR)  # "timeout is disabled" warnings: we know
        _verify_one("1", "2")
        for module in preload:
            importlib.import_module(module)
    except Exception:  # a broken initializer makes pebble respawn forever; tasks report instead
        pass


def _stop_pool(pool: Any) -> None:
    """Kill the pool's workers without waiting for pending items (also used as a finalizer)."""
    try:
        pool.stop()
        pool.join(timeout=10)
    except Exception:  # best effort at shutdown
        pass


class MathVerifier:
    """Checks extracted answers against gold answers with math-verify in worker processes.

    Uses a ``pebble.ProcessPool`` with the 'spawn' context (safe after torch/CUDA are initialised) and a wall-clock
    timeout per item: a hung or crashed item scores 0.0 with status 'timeout'/'error', never stalls or kills the
    caller, and pebble replaces the killed worker. The pool starts lazily on first use (a few seconds: each spawned
    worker imports sympy); ``close()`` shuts it down; usable as a context manager.
    """

    def __init__(self, num_workers: int = 2, timeout_s: float = 5.0) -> None:
        if num_workers < 1:
            raise UserError(f"verifier num_workers must be >= 1, got {num_workers}")
        if not timeout_s > 0:
            raise UserError(f"verifier timeout_s must be > 0, got {timeout_s}")
        self.num_workers = num_workers
        self.timeout_s = float(timeout_s)
        self._pool: Any = None
        self._finalizer: weakref.finalize | None = None
        self._preload: tuple[str, ...] = ()

    def preload(self, module: str) -> None:
        """Import ``module`` in each worker as it starts, so that its import time is not charged to the first task's
        timeout (for workers started after this call; a running pool keeps its workers)."""
        if module not in self._preload:
            self._preload = (*self._preload, module)

    def _get_pool(self) -> Any:
        if self._pool is not None and self._pool.active:
            return self._pool
        if self._pool is not None:  # pebble gave up (e.g. its manager thread died): start over
            self.close()
        from pebble import ProcessPool

        self._pool = ProcessPool(
            max_workers=self.num_workers,
            initializer=_worker_init,
            initargs=(self._preload,),
            context=multiprocessing.get_context("spawn"),
        )
        self._finalizer = weakref.finalize(self, _stop_pool, self._pool)
        return self._pool

    def verify(self, answers: Sequence[str | None], golds: Sequence[str]) -> list[VerifyResult]:
        """One result per (answer, gold) pair; identical pairs are checked once per call."""
        if len(answers) != len(golds):
            raise ValueError(f"verify: {len(answers)} answers but {len(golds)} golds")
        results: list[VerifyResult | None] = [None] * len(answers)
        todo: dict[tuple[str, str], list[int]] = {}
        for i, (ans, gold) in enumerate(zip(answers, golds, strict=True)):
            if ans is None or not ans.strip():
                results[i] = VerifyResult(0.0, "unparsable")
            elif gold is None or not str(gold).strip():
                results[i] = VerifyResult(0.0, "error")
            elif ans.strip() == str(gold).strip():
                results[i] = VerifyResult(1.0, "ok")
            else:  # GRPO groups repeat answers a lot; one hanging answer should cost one timeout, not G
                todo.setdefault((ans.strip(), str(gold).strip()), []).append(i)
        if todo:
            checked = self.run(_verify_one, {key: key for key in todo})
            for key, idxs in todo.items():
                res = checked[key]
                for i in idxs:
                    results[i] = VerifyResult(res.score, res.status)
        return [r for r in results if r is not None]

    def run(
        self, fn: Callable[..., tuple[float, str]], jobs: Mapping[Hashable, tuple[Any, ...]]
    ) -> dict[Hashable, VerifyResult]:
        """``fn(*args)`` -> (score, status) for each ``key: args`` of ``jobs`` in the worker pool, with the per-item
        timeout: a hung item scores 0 ('timeout'), a crashed one 0 ('error'). ``fn`` must be a module-level function
        (the workers import it)."""
        checked = self._run(fn, jobs)
        broken = [k for k, r in checked.items() if r is None]
        if broken:  # pebble gives up on the whole pool when workers die before taking a task: retry once
            self.close()
            checked.update(self._run(fn, {k: jobs[k] for k in broken}))
        if any(r is None for r in checked.values()):
            self.close()
            raise UserError(
                "math verifier worker processes failed to start; if a script starts training at import time, "
                "guard it with `if __name__ == '__main__':` (workers are spawned and re-import the main module)"
            )
        return {k: r for k, r in checked.items() if r is not None}

    def _run(
        self, fn: Callable[..., tuple[float, str]], jobs: Mapping[Hashable, tuple[Any, ...]]
    ) -> dict[Hashable, VerifyResult | None]:
        """Run ``fn(*args)`` in the pool for every ``key: args``; None marks items lost to a broken pool."""
        pool = self._get_pool()
        # Submit everything first so items run in parallel across workers, then collect.
        futures = {key: pool.schedule(fn, args=args, timeout=self.timeout_s) for key, args in jobs.items()}
        # Backstop in case pebble itself misbehaves: every item gets its timeout plus respawn slack.
        deadline = math.ceil(len(jobs) / self.num_workers) * (self.timeout_s + 15.0) + 30.0
        done, _ = concurrent.futures.wait(list(futures.values()), timeout=deadline)
        out: dict[Hashable, VerifyResult | None] = {}
        for key, fut in futures.items():
            if fut not in done:
                fut.cancel()
                out[key] = VerifyResult(0.0, "timeout")
                continue
            try:
                score, status = fut.result(timeout=0)
                out[key] = VerifyResult(float(score), str(status))
            except (TimeoutError, concurrent.futures.TimeoutError):  # pebble killed the worker after timeout_s
                out[key] = VerifyResult(0.0, "timeout")
            except BrokenProcessPool:
                out[key] = None
            except Exception:  # worker crash (pebble.ProcessExpired) or an exception inside the task
                out[key] = VerifyResult(0.0, "error")
        return out

    def close(self) -> None:
        """Stop the workers (killing any running item). Safe to call twice; the next verify() starts a new pool."""
        if self._finalizer is not None:
            self._finalizer()  # runs _stop_pool once
        self._pool = None
        self._finalizer = None

    def __enter__(self) -> MathVerifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class MathAnswerReward:
    """1.0 when the completion's final answer verifies equal to the ``answer`` column, else 0.0.

    A problem generated by reasoning-gym (``data.source=reasoning_gym:NAME``: it carries a ``reasoning_gym`` column)
    is scored by its generator's own scorer instead (:mod:`reasonrl.rewards.reasoning_gym`), which is the authority on
    its answers (a puzzle may have several solutions, a fraction several spellings) and may give partial credit.
    So evaluation accuracy, which reads this function's scores, uses that scorer for such problems.

    Owns its MathVerifier so that whoever made it (the Rewards stage) stops the workers with ``close()``;
    ``last_results`` keeps the statuses of the latest call for metrics.
    """

    def __init__(self, *, timeout_s: float = 5.0, num_workers: int = 2, **_: Any) -> None:
        self.verifier = MathVerifier(num_workers=num_workers, timeout_s=timeout_s)
        self.last_results: list[VerifyResult] = []

    def __call__(
        self,
        prompts: list[str],
        completions: list[str],
        *,
        answer: list[str] | None = None,
        reasoning_gym: list[Any] | None = None,
        **_: Any,
    ) -> list[float]:
        if answer is None:
            raise UserError("reward function 'math_answer' needs an 'answer' column in the data")
        answers = [extract_answer(c) for c in completions]
        if reasoning_gym is None or not any(reasoning_gym):
            self.last_results = self.verifier.verify(answers, answer)
            return [r.score for r in self.last_results]
        from reasonrl.rewards.reasoning_gym import score_entries

        results = score_entries(self.verifier, answers, reasoning_gym)
        rest = [i for i, r in enumerate(results) if r is None]
        for i, r in zip(rest, self.verifier.verify([answers[i] for i in rest], [answer[i] for i in rest]), strict=True):
            results[i] = r
        self.last_results = [r for r in results if r is not None]
        return [r.score for r in self.last_results]

    def close(self) -> None:
        self.verifier.close()


def format_reward(prompts: list[str], completions: list[str], **_: Any) -> list[float]:
    """1.0 when the completion has exactly one ``\\boxed{...}`` and it ends the text (closing $ or \\] allowed)."""
    out: list[float] = []
    for c in completions:
        spans = _boxed_spans(c)
        end = spans[0][1] if len(spans) == 1 else None
        out.append(1.0 if end is not None and c[end:].strip() in _MATH_CLOSERS else 0.0)
    return out
