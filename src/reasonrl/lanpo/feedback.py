"""LANPO prompt building (SPEC §5): language feedback from the experience pool, put into some prompts of each group.

Runs before rollout. For every problem of the step, its G rollouts are split into modes by `lanpo.mix`:
- `scratch`: the plain prompt.
- `reflect`: the plain prompt plus one of the model's own attempts at the *same* problem from an *earlier* step,
  with an instruction to check it and solve again. The text comes from `ExperiencePool.earlier_attempts`, which
  returns response texts only, and `reflect_prompt` formats nothing but the problem and that text: no reward,
  correctness flag or gold answer can reach a reflection prompt (SPEC §5, reward-agnostic reflection).
- `abstract`: lessons that the policy itself condenses from trajectories of *other* problems whose similarity is at
  least γ. Lessons, not raw solutions, go into the prompt; they are cached per (problem, neighbour set).
A mode without material (no earlier attempt, no neighbour over γ) falls back to `scratch` and is counted.
"""

from __future__ import annotations

import hashlib
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from reasonrl.data.problems import Problem
from reasonrl.errors import UserError
from reasonrl.lanpo.pool import MODES, ExperiencePool


@dataclass(frozen=True)
class Templates:
    """Text templates of the three feedback prompts; each may use only the fields named here."""

    reflect: str  # {problem} {attempt}
    abstract: str  # {problem} {lessons}
    lesson: str  # {trajectories}: the prompt the policy condenses into lessons
    trajectory: str  # {problem} {response} {reward}: one trajectory inside the lesson prompt


FIELDS = {
    "reflect": {"problem", "attempt"},
    "abstract": {"problem", "lessons"},
    "lesson": {"trajectories"},
    "trajectory": {"problem", "response", "reward"},
}

GENERIC = Templates(
    reflect=(
        "{problem}\n\nHere is an earlier attempt at this problem. It may contain mistakes.\n<attempt>\n{attempt}\n"
        "</attempt>\nCheck it carefully, then solve the problem again from the start."
    ),
    abstract="Lessons from similar problems:\n{lessons}\n\n{problem}",
    lesson=(
        "Below are attempts at some problems, each with its reward (1 = correct).\n\n{trajectories}"
        "Write two or three short, general lessons for solving problems like these. Do not restate any answer."
    ),
    trajectory="Problem: {problem}\nAttempt: {response}\nReward: {reward:g}\n\n",
)

# The built-in task's own compact notation (its character-level model learns these formats in the warm-start).
ARITHMETIC = Templates(
    reflect="{problem}Earlier attempt:\n{attempt}\nCheck it and solve again.\n",
    abstract="Lesson: {lessons}\n{problem}",
    lesson="{trajectories}Lesson:",
    trajectory="{problem}{response}\nreward {reward:g}\n",
)


def check_template(name: str, template: str) -> None:
    """A template may only use its own fields: e.g. a `{reward}` in a reflection template is refused."""
    try:
        used = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as e:
        raise UserError(f"algorithm.lanpo.{name}_template: {e}") from None
    bad = used - FIELDS[name]  # exact names only: no attribute or index access either
    if bad:
        allowed = ", ".join("{" + f + "}" for f in sorted(FIELDS[name]))
        raise UserError(f"algorithm.lanpo.{name}_template uses {', '.join(sorted(bad))}; it may only use {allowed}")


def templates_for(lanpo: Any, builtin_task: bool) -> Templates:
    """The configured templates; a template left at None is the task's default."""
    base = ARITHMETIC if builtin_task else GENERIC
    chosen = {n: getattr(lanpo, f"{n}_template") or getattr(base, n) for n in FIELDS}
    for n, t in chosen.items():
        check_template(n, t)
    return Templates(**chosen)


def mode_counts(mix: dict[str, float], group_size: int) -> dict[str, int]:
    """Rollouts per mode for one group: shares of `mix` rounded by largest remainder (ties: scratch first)."""
    total = sum(mix.get(m, 0.0) for m in MODES)
    exact = {m: mix.get(m, 0.0) / total * group_size for m in MODES}
    counts = {m: int(exact[m]) for m in MODES}
    for m in sorted(MODES, key=lambda m: (-(exact[m] - counts[m]), MODES.index(m)))[
        : group_size - sum(counts.values())
    ]:
        counts[m] += 1
    return counts


def reflect_prompt(problem: str, attempt: str, template: str) -> str:
    """SPEC §5 reward-agnostic reflection: the problem and the model's own earlier text, nothing else."""
    return template.format(problem=problem, attempt=attempt)


def abstract_prompt(problem: str, lessons: str, template: str) -> str:
    return template.format(problem=problem, lessons=lessons)


def lesson_prompt(trajectories: Sequence[tuple[str, str, float]], templates: Templates) -> str:
    """The lesson-writing prompt from (problem, response, reward) of *other* problems (rewards may show here)."""
    body = "".join(templates.trajectory.format(problem=p, response=r, reward=w) for p, r, w in trajectories)
    return templates.lesson.format(trajectories=body)


def advantage_groups(group_ids: Tensor, modes: Sequence[str], scope: str) -> Tensor:
    """SPEC §5 `lanpo.advantage_scope`: the groups advantages are computed over. `group` keeps each problem's G
    rollouts together (all modes); `mode` splits them by the context mode they were sampled under."""
    if scope == "group":
        return group_ids
    if scope != "mode":
        raise ValueError(f"lanpo advantage_scope must be group or mode, got {scope!r}")
    return group_ids * len(MODES) + torch.tensor([MODES.index(m) for m in modes], dtype=group_ids.dtype)


def scratch_plans(problems: list[Problem], group_size: int) -> list[PromptPlan]:
    """Every rollout of every group under the plain prompt (no LANPO, or an empty pool)."""
    return [PromptPlan(p, "scratch", p.prompt) for p in problems for _ in range(group_size)]


@dataclass
class PromptPlan:
    """One rollout's prompt: its mode, the text the policy sees, and the context's size in tokens."""

    problem: Problem
    mode: str
    text: str
    context_tokens: int = 0


@dataclass
class FeedbackStats:
    fallbacks: dict[str, int] = field(default_factory=lambda: {"reflect": 0, "abstract": 0})
    retrieval_requests: int = 0
    retrieval_hits: int = 0
    similarities: list[float] = field(default_factory=list)
    best_similarities: list[float] = field(default_factory=list)  # per query with another problem to compare with
    lessons_generated: int = 0
    lessons_cached: int = 0
    lesson_tokens: int = 0


class FeedbackBuilder:
    """Builds the G prompts of every group of a step from the pool; owns the lesson cache policy."""

    def __init__(
        self,
        pool: ExperiencePool,
        lanpo: Any,
        templates: Templates,
        count_tokens: Callable[[str], int],
        truncate: Callable[[str, int], str],
        write_lessons: Callable[[list[str]], list[tuple[str, int]]],
    ) -> None:
        """`write_lessons(prompts) -> [(lesson text, generated tokens)]` is a batched greedy call of the policy."""
        self.pool, self.cfg, self.templates = pool, lanpo, templates
        self.count_tokens, self.truncate, self.write_lessons = count_tokens, truncate, write_lessons
        # Lessons written this step, not yet in the pool: the trainer stores them with the step's rollouts (one
        # process owns the pool), so within a step every process reads the pool as it was after the last step.
        self.new_lessons: dict[str, tuple[str, int]] = {}

    def take_new_lessons(self) -> list[tuple[str, str, int]]:
        """(cache key, lesson, step) of the lessons written since the last call, for the pool."""
        out = [(key, text, step) for key, (text, step) in self.new_lessons.items()]
        self.new_lessons = {}
        return out

    def build(self, problems: list[Problem], group_size: int, step: int) -> tuple[list[PromptPlan], FeedbackStats]:
        """Prompts of every rollout, problem-major (group i is [i*G, (i+1)*G)); `step` is the step being sampled."""
        counts = mode_counts(self.cfg.mix, group_size)
        stats = FeedbackStats()
        lessons = self._lessons(problems, stats, step) if counts["abstract"] else {}
        budget = self.cfg.max_context_tokens
        out: list[PromptPlan] = []
        for p in problems:
            attempts = (
                self.pool.earlier_attempts(p.id, before_step=step, limit=counts["reflect"]) if counts["reflect"] else []
            )
            for _ in range(counts["scratch"]):
                out.append(PromptPlan(p, "scratch", p.prompt))
            for k in range(counts["reflect"]):
                if not attempts:
                    stats.fallbacks["reflect"] += 1
                    out.append(PromptPlan(p, "scratch", p.prompt))
                    continue
                attempt = self.truncate(attempts[k % len(attempts)], budget)
                text = reflect_prompt(p.prompt, attempt, self.templates.reflect)
                out.append(PromptPlan(p, "reflect", text, self.count_tokens(attempt)))
            for _ in range(counts["abstract"]):
                lesson = lessons.get(p.id)
                if not lesson:
                    stats.fallbacks["abstract"] += 1
                    out.append(PromptPlan(p, "scratch", p.prompt))
                    continue
                lesson = self.truncate(lesson, budget)
                out.append(PromptPlan(p, "abstract", abstract_prompt(p.prompt, lesson, self.templates.abstract),
                                   self.count_tokens(lesson)))  # fmt: skip
        return out, stats

    def _lessons(self, problems: list[Problem], stats: FeedbackStats, step: int) -> dict[str, str]:
        """Lessons per problem id: from the cache when this neighbour set was seen, else one batched generation."""
        c = self.cfg
        found: dict[str, str] = {}
        todo: list[tuple[str, str, str]] = []  # (problem id, cache key, lesson prompt)
        retrievals = self.pool.search_many([(p.id, p.statement) for p in problems], gamma=c.gamma, top_k=c.top_k)
        for p, retrieved in zip(problems, retrievals, strict=True):
            stats.retrieval_requests += 1
            if retrieved.best is not None:
                stats.best_similarities.append(retrieved.best)
            near = retrieved.neighbours
            if not near:
                continue
            stats.retrieval_hits += 1
            stats.similarities += [s for _, s in near]
            ids = sorted(pid for pid, _ in near)
            key = p.id + "|" + hashlib.sha1("\x00".join(ids).encode()).hexdigest()[:16]
            cached = self.new_lessons[key][0] if key in self.new_lessons else self.pool.get_lesson(key)
            if cached is not None:
                stats.lessons_cached += 1
                found[p.id] = cached
            elif all(t[0] != p.id for t in todo):
                trajectories = [
                    (q, self.truncate(r, c.max_context_tokens), w)
                    for q, r, w in self.pool.trajectories(ids, per_problem=c.trajectories_per_problem)
                ]
                todo.append((p.id, key, lesson_prompt(trajectories, self.templates)))
        if todo:
            written = self.write_lessons([t[2] for t in todo])
            for (pid, key, _), (text, n_tokens) in zip(todo, written, strict=True):
                text = text.strip()
                stats.lessons_generated += 1
                stats.lesson_tokens += n_tokens
                self.new_lessons[key] = (text, step)
                found[pid] = text
        return found
