"""Run logging: per-stage timers, `metrics.jsonl`, TensorBoard."""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from reasonrl.errors import UserError
from reasonrl.lanpo.pool import MODES


class StageTimer:
    """Wall time per pipeline stage of one step (SPEC §6); synchronises CUDA so GPU work is charged correctly.

    Stages nest: time spent in an inner stage (e.g. LANPO's lesson writing inside prompt building) is charged to
    the inner stage only, so the stages add up to the step's wall time."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._open: list[list[Any]] = []  # [name, start of its current segment] of every open stage, innermost last

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        now = time.perf_counter()
        if self._open:  # pause the enclosing stage
            outer = self._open[-1]
            self.seconds[outer[0]] += now - outer[1]
        self._open.append([name, now])
        try:
            yield
        finally:
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.synchronize()
            now = time.perf_counter()
            _, start = self._open.pop()
            self.seconds[name] += now - start
            if self._open:  # resume the enclosing stage
                self._open[-1][1] = now

    def metrics(self) -> dict[str, float]:
        return {f"time/{k}": v for k, v in self.seconds.items()}


def step_metrics(
    procs: Any,
    batch: Any,
    *,
    trained: list[tuple[int, bool, float]],
    rewards: list[float],
    correct: list[bool],
    modes: list[tuple[str, int]] | None,
    feedback_stats: list[Any] | None,
    reward_metrics: list[list[dict[str, float]]],
    diagnostics: dict[str, float],
    sampled_tokens: float,
    pool_size: float | None,
    lr: float,
) -> dict[str, float]:
    """The one builder of a step's metrics (SPEC §6), from the global batch (lists gathered from every process).

    `trained`: (length, truncated, |advantage|) of every trained sequence; `rewards`, `correct`: per trained
    sequence; `modes`: (mode, context tokens) per trained sequence under LANPO; `reward_metrics`: per process, per
    sampling round; `sampled_tokens`: every token generated this step, kept or not (rollouts of dropped groups and
    LANPO's lessons too), so that a token budget charges each method for all the generation it did."""
    out: dict[str, float] = {"dynamic_sampling/rounds": batch.rounds, "groups": batch.kept_groups}
    out["tokens/sampled"] = sampled_tokens
    if feedback_stats is not None and modes is not None:
        out.update(_feedback_metrics(feedback_stats, modes, rewards, correct))
    out.update(diagnostics)
    if not trained:  # no group was kept: nothing was trained
        return {**out, **_merge_reward_metrics(reward_metrics)}
    if pool_size is not None:
        out["lanpo/pool_size"] = pool_size
    reward_all = torch.tensor(rewards, dtype=torch.float64)
    lengths = torch.tensor([n for n, _, _ in trained], dtype=torch.float)
    out.update(
        {
            "reward/mean": float(reward_all.mean()),
            "reward/std": float(reward_all.std()) if len(reward_all) > 1 else 0.0,
            "accuracy": sum(correct) / len(correct),
            "zero_std_groups": batch.zero_std_groups,
            "completion/len_mean": float(lengths.mean()),
            "completion/len_max": float(lengths.max()),
            "completion/truncated": sum(t for _, t, _ in trained) / len(trained),
            "advantage/abs_mean": sum(x for _, _, x in trained) / len(trained),
            "tokens/generated": sum(n for n, _, _ in trained),
            **_merge_reward_metrics(reward_metrics),
            **batch.update_metrics,
            "lr": lr,
        }
    )
    return out


def _feedback_metrics(
    stats: list[Any], modes: list[tuple[str, int]], rewards: list[float], correct: list[bool]
) -> dict[str, float]:
    """SPEC §5/§6 LANPO metrics: per-mode reward and accuracy, fallbacks, context size, retrieval, lessons.
    `modes`: (mode, context tokens) of every trained rollout, aligned with `rewards` and `correct`."""
    out: dict[str, float] = {}
    for mode in MODES:
        idx = [i for i, (m, _) in enumerate(modes) if m == mode]
        out[f"lanpo/{mode}/count"] = float(len(idx))
        if idx:
            out[f"lanpo/{mode}/reward"] = sum(rewards[i] for i in idx) / len(idx)
            out[f"lanpo/{mode}/accuracy"] = sum(correct[i] for i in idx) / len(idx)
    ctx = [n for m, n in modes if m != "scratch"]
    requests = sum(s.retrieval_requests for s in stats)
    sims = [x for s in stats for x in s.similarities]
    out.update(
        {
            "lanpo/fallback/reflect": float(sum(s.fallbacks["reflect"] for s in stats)),
            "lanpo/fallback/abstract": float(sum(s.fallbacks["abstract"] for s in stats)),
            "lanpo/context_tokens": sum(ctx) / len(ctx) if ctx else 0.0,
            "lanpo/retrieval_hit_rate": sum(s.retrieval_hits for s in stats) / requests if requests else 0.0,
            "lanpo/similarity_mean": sum(sims) / len(sims) if sims else 0.0,
            "lanpo/lessons_generated": float(sum(s.lessons_generated for s in stats)),
            "lanpo/lessons_cached": float(sum(s.lessons_cached for s in stats)),
            "tokens/feedback": float(sum(s.lesson_tokens for s in stats)),
        }
    )
    out.update(_best_similarity_metrics([x for s in stats for x in s.best_similarities]))
    return out


def _best_similarity_metrics(best: list[float]) -> dict[str, float]:
    """Distribution of each query's best similarity (nearest rank), to pick γ: `lanpo/retrieval_hit_rate` is the share
    at or above γ. Absent while the pool had nothing to compare with."""
    if not best:
        return {}
    ranked = sorted(best)

    def rank(q: float) -> float:
        return ranked[max(0, math.ceil(q * len(ranked)) - 1)]

    return {
        "lanpo/best_similarity_p50": rank(0.5),
        "lanpo/best_similarity_p90": rank(0.9),
        "lanpo/best_similarity_max": ranked[-1],
    }


_REWARD_COUNTS = (
    "reward/verify_timeouts", "reward/unparsable", "reward/verify_errors", "reward/skipped", "reward/function_timeouts"
)  # fmt: skip


def _merge_reward_metrics(per_process: list[list[dict[str, float]]]) -> dict[str, float]:
    """Reward-function metrics of every process's dynamic-sampling rounds: counts add up over rounds and processes;
    means and stds are those of the first round, averaged over processes (their shares differ by one group at most)."""
    firsts = [rounds[0] for rounds in per_process if rounds]
    if not firsts:
        return {}
    out = {k: sum(f.get(k, 0.0) for f in firsts) / len(firsts) for k in firsts[0] if k not in _REWARD_COUNTS}
    for k in _REWARD_COUNTS:
        counts = [r[k] for rounds in per_process for r in rounds if k in r]
        if counts:
            out[k] = sum(counts)
    return out


class MetricsLogger:
    """Appends one JSON object per record to metrics.jsonl and mirrors scalars to TensorBoard.

    On resume, records after the checkpoint's step are dropped first, so a resumed run's log equals an
    uninterrupted one.
    """

    def __init__(
        self, run_dir: Path, *, tensorboard: bool, resume_step: int | None = None, trackers: list[Any] = ()
    ) -> None:
        self.trackers = list(trackers)  # train.report_to (training/trackers.py)
        self.path = run_dir / "metrics.jsonl"
        self.file = _open_log(self.path, resume_step)
        self.completions = _open_log(run_dir / "completions.jsonl", resume_step)
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is a dependency, but a broken install should not stop training
                SummaryWriter = None
            if SummaryWriter is not None:
                purge = resume_step + 1 if resume_step is not None else None
                self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=purge)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        record = {"step": step, **metrics}
        _append(self.file, self.path, json.dumps(record) + "\n")
        for tracker in self.trackers:
            tracker.log(step, metrics)
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(k, v, step)

    def log_completions(self, step: int, rows: list[dict[str, Any]]) -> None:
        """One line per sampled completion (with the prompt it had: LANPO contexts show here)."""
        _append(
            self.completions,
            self.path.with_name("completions.jsonl"),
            "".join(json.dumps({"step": step, **r}) + "\n" for r in rows),
        )

    def close(self) -> None:
        self.file.close()
        self.completions.close()
        for tracker in self.trackers:
            tracker.close()
        if self.tb is not None:
            self.tb.close()


def _append(file: Any, path: Path, text: str) -> None:
    """Write and flush a log's new lines; a full disk (any OSError) is a one-line error: the last checkpoint is
    intact, and a resume drops the lines written after it (a torn last one included)."""
    try:
        file.write(text)
        file.flush()
    except OSError as e:
        raise UserError(
            f"cannot write {path} ({e.strerror or e}); free space, then resume with --resume {path.parent}"
        ) from None


def _open_log(path: Path, resume_step: int | None) -> Any:
    """Open a JSONL log for appending; on resume, first drop the records of steps after the checkpoint (rewritten
    atomically). A torn last line (the process was killed mid-write) is dropped with a warning; damage anywhere
    else is refused, naming the line."""
    if resume_step is not None and path.exists():
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln]
        keep = []
        for i, line in enumerate(lines):
            try:
                step = json.loads(line)["step"]
            except (ValueError, KeyError, TypeError):
                if i == len(lines) - 1:
                    warnings.warn(f"{path}: dropped a torn last line (the run was killed writing it)", stacklevel=2)
                    continue
                raise UserError(
                    f"{path}, line {i + 1}: not a reasonrl log record; repair or delete that line, then resume"
                ) from None
            if step <= resume_step:
                keep.append(line)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(ln + "\n" for ln in keep))
        os.replace(tmp, path)
    return path.open("a")


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln]


def feedback_summary(records: list[dict[str, Any]]) -> dict[str, float]:
    """A LANPO run's totals from its step records: per-mode accuracy (count-weighted over steps), fallbacks, and the
    extra compute feedback cost (lesson tokens, context tokens, time in prompt building, abstraction and pool I/O)."""
    steps = [r for r in records if "lanpo/scratch/count" in r]
    out: dict[str, float] = {}
    for mode in ("scratch", "reflect", "abstract"):
        n = sum(r[f"lanpo/{mode}/count"] for r in steps)
        out[f"{mode}/count"] = n
        if n:
            out[f"{mode}/accuracy"] = (
                sum(r.get(f"lanpo/{mode}/accuracy", 0.0) * r[f"lanpo/{mode}/count"] for r in steps) / n
            )
    feedback_rollouts = out["reflect/count"] + out["abstract/count"]
    out["fallbacks"] = sum(r["lanpo/fallback/reflect"] + r["lanpo/fallback/abstract"] for r in steps)
    out["lesson_tokens"] = sum(r["tokens/feedback"] for r in steps)
    out["context_tokens"] = sum(r["lanpo/context_tokens"] * (r["lanpo/reflect/count"] + r["lanpo/abstract/count"])
                                for r in steps)  # fmt: skip
    out["context_tokens_per_rollout"] = out["context_tokens"] / feedback_rollouts if feedback_rollouts else 0.0
    out["feedback_seconds"] = sum(r.get(f"time/{k}", 0.0) for r in steps for k in ("prompts", "abstraction", "pool"))
    out["step_seconds"] = sum(r.get("time/step", 0.0) for r in steps)
    out["generated_tokens"] = sum(r.get("tokens/generated", 0.0) for r in steps)
    return out
