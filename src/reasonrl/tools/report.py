"""`reasonrl report`: one self-contained HTML page that compares runs.

Papers are judged at equal steps, but reviewers ask at equal wall-clock and token budgets too (SPEC §5), so every
accuracy curve is drawn against all three, and the table gives the seconds and tokens each configuration needed to
reach a target accuracy. Runs that share a label are seeds of one configuration: curves show their mean and min–max
band, the table mean ± sample std. The page embeds its figures as PNG data URIs (no JS, no network) so it can be
mailed or archived as one file; the PNGs are also written beside it.

Only the standard library is imported at module level; matplotlib loads when figures are drawn.
"""

from __future__ import annotations

import base64
import bisect
import functools
import html
import io
import itertools
import json
import math
import re
import shlex
import statistics
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from reasonrl.errors import UserError
from reasonrl.lanpo.pool import MODES

Warn = Callable[[str], None]
Record = dict[str, Any]

# time/* keys that are not pipeline stages: the step total and cumulative clocks
NOT_STAGES = {"time/step", "time/elapsed", "time/total"}
# pipeline order for the stacked bars; stages not listed follow alphabetically
STAGE_ORDER = (
    "prompts", "generation", "abstraction", "reward", "advantages", "batching", "logprobs", "update", "sync", "pool",
    "logging",
)  # fmt: skip
# config keys in which seeds of one configuration may differ
SEED_KEYS = {"train.seed", "train.run_name", "train.output_dir"}
# one colour per stage whatever else a run logged, so the same stage looks the same in every report
STAGE_COLORS = {
    "prompts": "#b279a2", "generation": "#4c78a8", "abstraction": "#ff9da6", "reward": "#72b7b2",
    "advantages": "#54a24b", "batching": "#eeca3b", "logprobs": "#f58518", "update": "#e45756", "pool": "#9d755d",
    "logging": "#bab0ac",
}  # fmt: skip
STAGE_TOLERANCE = 0.05
MPL_STYLE = {
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.labelsize": 10,
    "legend.fontsize": 9,
    "xtick.labelsize": 9,
    "ytick.labelsize": 9,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
}


def _stderr_warn(msg: str) -> None:
    print(f"reasonrl: warning: {msg}", file=sys.stderr)


# --------------------------------------------------------------------------------------------------------------
# Loading runs


@dataclass
class Run:
    """One run directory's records, split into step and eval records, with its cumulative budget per step."""

    path: Path
    label: str
    seed: Any
    config: dict[str, Any]  # flattened dotted keys
    steps: list[Record]
    evals: list[Record]
    budget: dict[str, Any] = field(default_factory=dict)  # compare.json's shared budget, when there is one
    elapsed: list[float] = field(init=False)  # cumulative seconds at the end of steps[i]
    tokens: list[float] = field(init=False)  # cumulative generated tokens at the end of steps[i]
    clock_source: str = field(init=False)  # which key the seconds come from (shown in the report)
    token_source: str = field(init=False)
    _step_numbers: list[int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.elapsed, self.clock_source = _cumulative(self.steps, "time/elapsed", "time/step")
        # runs from before `tokens/sampled` existed logged only the kept completions' tokens
        per_step = "tokens/sampled" if all("tokens/sampled" in r for r in self.steps) else "tokens/generated"
        self.tokens, self.token_source = _cumulative(self.steps, "tokens/total", per_step)
        self._step_numbers = [r["step"] for r in self.steps]

    @property
    def is_lanpo(self) -> bool:
        return any("lanpo/scratch/count" in r for r in self.steps)

    @property
    def last_step(self) -> int:
        return max([r["step"] for r in self.steps] + [r["step"] for r in self.evals])

    def budget_at(self, step: int) -> tuple[float, float]:
        """Seconds and generated tokens spent by the end of `step` (0 before the first step)."""
        i = bisect.bisect_right(self._step_numbers, step)
        return (self.elapsed[i - 1], self.tokens[i - 1]) if i else (0.0, 0.0)


def _cumulative(steps: list[Record], logged: str, per_step: str) -> tuple[list[float], str]:
    """The logged cumulative key when every step has it (the trainer's own clock), else a running sum."""
    if steps and all(logged in r for r in steps):
        return [float(r[logged]) for r in steps], logged
    return list(itertools.accumulate(float(r.get(per_step, 0.0)) for r in steps)), f"sum of {per_step}"


@dataclass
class Group:
    """The seeds of one configuration."""

    label: str
    runs: list[Run]


def read_records(path: Path, warn: Warn = _stderr_warn) -> list[Record]:
    """metrics.jsonl records; a malformed line (a run killed mid-write) is skipped with a warning, not fatal."""
    out: list[Record] = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            warn(f"{path} line {n}: not valid JSON, skipped")
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int):
            out.append(rec)
    return out


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v and f"{prefix}{k}" != "data.columns":
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _is_run_dir(path: Path) -> bool:
    return (path / "config.yaml").is_file() or (path / "metrics.jsonl").is_file()


def discover(dirs: Sequence[str | Path], warn: Warn = _stderr_warn) -> list[tuple[Path, dict[str, Any]]]:
    """(run directory, manifest hints) for every run under `dirs`; a directory that is neither kind is an error."""
    found: list[tuple[Path, dict[str, Any]]] = []
    for d in dirs:
        p = Path(d)
        if not p.is_dir():
            raise UserError(f"{d} is not a directory")
        if _is_run_dir(p):
            found.append((p, {}))
        elif (p / "runs").is_dir() or (p / "compare.json").is_file():
            hints = _manifest(p, warn)  # keyed by resolved path
            subdirs = sorted(q for q in (p / "runs").iterdir() if q.is_dir()) if (p / "runs").is_dir() else []
            known = {q.resolve() for q in subdirs}
            runs = subdirs + [q for q in hints if q not in known]
            if hints:  # the manifest's order first: it is the order the comparison was declared in
                order = {q: i for i, q in enumerate(hints)}
                runs.sort(key=lambda q: order.get(q.resolve(), len(order)))
            if not runs:
                raise UserError(f"{d} is a comparison directory without runs (runs/ is empty)")
            found.extend((q, hints.get(q.resolve(), {})) for q in runs)
        else:
            hint = " (it holds run directories: pass them, or its parent)" if any(
                _is_run_dir(q) for q in p.iterdir() if q.is_dir()
            ) else ""  # fmt: skip
            raise UserError(f"{d} is not a run directory (no config.yaml or metrics.jsonl) nor a comparison "
                            f"directory (no runs/){hint}")  # fmt: skip
    return found


def _manifest(comp: Path, warn: Warn) -> dict[Path, dict[str, Any]]:
    """Label, seed, status and budget of each run from `compare.json` (written by `reasonrl compare`), keyed by the
    resolved run directory; an unreadable manifest means grouping by config instead."""
    path = comp / "compare.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except ValueError as e:
        warn(f"{path}: not valid JSON ({e}); grouping runs by their configs")
        return {}
    runs = data.get("runs") if isinstance(data, dict) else None
    if isinstance(runs, dict):  # {run name: {label, seed, dir, status, ...}}
        entries = [{"name": k, **v} for k, v in runs.items() if isinstance(v, dict)]
    elif isinstance(runs, list):
        entries = [e for e in runs if isinstance(e, dict)]
    else:
        warn(f"{path}: no runs listed; grouping runs by their configs")
        return {}
    budget = {k: v for k, v in (data.get("budget") or {}).items() if v is not None}
    out: dict[Path, dict[str, Any]] = {}
    for e in entries:
        ref = next((e[k] for k in ("dir", "run_dir", "path", "name") if isinstance(e.get(k), str)), None)
        if ref is None:
            continue
        target = next((c for c in (comp / ref, comp / "runs" / Path(ref).name) if c.is_dir()), None)
        if target is None:
            warn(f"{path}: run {ref} has no directory yet (status {e.get('status', 'unknown')})")
            continue
        hint = {k: e[k] for k in ("label", "seed", "status") if e.get(k) is not None}
        out[target.resolve()] = {**hint, "budget": budget} if budget else hint
    return out


def load_run(path: Path, hint: dict[str, Any], warn: Warn = _stderr_warn) -> Run | None:
    """The run at `path`, or None (with a warning) when it has no step metrics yet."""
    metrics = path / "metrics.jsonl"
    if not metrics.is_file():
        warn(f"skipping {path}: no metrics.jsonl")
        return None
    records = read_records(metrics, warn)
    steps = _by_step(r for r in records if "time/step" in r or "reward/mean" in r)
    evals = _by_step(r for r in records if "eval/accuracy" in r)
    if not steps:
        warn(f"skipping {path}: metrics.jsonl has no step records")
        return None
    config: dict[str, Any] = {}
    if (path / "config.yaml").is_file():
        import yaml

        try:
            raw = yaml.safe_load((path / "config.yaml").read_text())
        except yaml.YAMLError as e:
            warn(f"{path}/config.yaml unreadable ({e}); its config is left out")
            raw = None
        # keys a run's config lacks (it predates them) take their defaults, which is what that run did
        config = {**_defaults(), **_flatten(raw)} if isinstance(raw, dict) else {}
    if hint.get("status") not in (None, "done"):
        warn(f"{path} is '{hint['status']}' in compare.json: its curves may stop early")
    elif _unfinished(config, steps):
        warn(f"{path}: {steps[-1]['step']} of {config['train.steps']} steps logged (still running, or stopped early)")
    seed = hint.get("seed", config.get("train.seed"))
    label = str(hint.get("label") or _label(config, path))
    return Run(path, label, seed, config, steps, evals, budget=hint.get("budget", {}))


def _unfinished(config: dict[str, Any], steps: list[Record]) -> bool:
    """Fewer steps than train.steps, and no seconds or tokens budget that could have ended the run sooner."""
    budgeted = config.get("train.max_seconds") is not None or config.get("train.max_tokens") is not None
    planned = config.get("train.steps")
    return isinstance(planned, int) and steps[-1]["step"] < planned and not budgeted


def _by_step(records: Iterable[Record]) -> list[Record]:
    """Sorted by step; a step logged twice keeps its last record (what a resume would have kept)."""
    return sorted({r["step"]: r for r in records}.values(), key=lambda r: r["step"])


def _label(config: dict[str, Any], path: Path) -> str:
    """`train.run_name` without its `-seed<N>` suffix, else the algorithm: seeds of one setup share a label."""
    name = config.get("train.run_name")
    if isinstance(name, str) and name:
        return re.sub(r"[-_]seed[-_]?\d+$", "", name)
    if "algorithm.advantage" in config:
        return str(config["algorithm.advantage"]) + ("+lanpo" if config.get("algorithm.lanpo.enabled") else "")
    return re.sub(r"[-_]seed[-_]?\d+$", "", path.name)


def group_runs(runs: list[Run], warn: Warn = _stderr_warn) -> list[Group]:
    """Runs grouped by label, in order of appearance. Runs sharing a label whose configs differ beyond the seed are
    not seeds of one configuration: they are split, each label extended by the keys that tell them apart."""
    by_label: dict[str, list[Run]] = {}
    for r in runs:
        by_label.setdefault(r.label, []).append(r)
    groups: list[Group] = []
    for label, members in by_label.items():
        parts: dict[str, list[Run]] = {}
        for r in members:
            key = json.dumps({k: v for k, v in r.config.items() if k not in SEED_KEYS}, sort_keys=True, default=str)
            parts.setdefault(key, []).append(r)
        if len(parts) == 1:
            groups.append(Group(label, _by_seed(members)))
            continue
        firsts = [p[0].config for p in parts.values()]
        keys = [k for k in _differing(firsts) if k not in SEED_KEYS]
        warn(f"runs labelled '{label}' differ in {', '.join(keys[:5])}: reported as separate configurations")
        for p in parts.values():
            suffix = ", ".join(f"{k.rsplit('.', 1)[-1]}={_fmt_value(p[0].config.get(k))}" for k in keys[:3])
            groups.append(Group(f"{label} ({suffix})", _by_seed(p)))
    return groups


def _by_seed(runs: list[Run]) -> list[Run]:
    return sorted(runs, key=lambda r: (str(type(r.seed)), r.seed if r.seed is not None else 0, str(r.path)))


@functools.cache
def _defaults() -> dict[str, Any]:
    """The default config, flattened once (callers copy it)."""
    from reasonrl.config import Config

    return _flatten(Config().to_dict())


def _differing(configs: list[dict[str, Any]]) -> list[str]:
    keys = sorted({k for c in configs for k in c})
    return [k for k in keys if len({json.dumps(c.get(k), sort_keys=True, default=str) for c in configs}) > 1]


# --------------------------------------------------------------------------------------------------------------
# Numbers


@dataclass
class Stat:
    """Mean, sample std and count of one quantity over seeds (values of seeds where it exists)."""

    values: list[float]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def std(self) -> float:
        return statistics.stdev(self.values) if len(self.values) > 1 else 0.0


def final_eval(run: Run, key: str = "eval/accuracy") -> float | None:
    """`key` of the eval record at the latest step that has it."""
    recs = [r for r in run.evals if key in r]
    return float(recs[-1][key]) if recs else None


def best_eval(run: Run) -> float | None:
    return max((float(r["eval/accuracy"]) for r in run.evals), default=None)


def time_to_target(run: Run, target: float) -> tuple[int, float, float] | None:
    """(step, seconds, tokens) at the first eval record at or above `target`; None when never reached."""
    for r in run.evals:
        if r["eval/accuracy"] >= target:
            return (r["step"], *run.budget_at(r["step"]))
    return None


def stage_check(run: Run, tol: float = STAGE_TOLERANCE) -> tuple[int, int, float]:
    """(steps whose stage times sum to time/step within `tol`, steps with time/step, largest relative gap)."""
    ok, n, worst = 0, 0, 0.0
    for r in run.steps:
        total = r.get("time/step")
        if not total:
            continue
        gap = abs(sum(v for k, v in _stages(r).items()) - total) / total
        n += 1
        ok += gap <= tol
        worst = max(worst, gap)
    return ok, n, worst


def _stages(record: Record) -> dict[str, float]:
    return {
        k.removeprefix("time/"): float(v) for k, v in record.items()
        if k.startswith("time/") and k not in NOT_STAGES and isinstance(v, (int, float))
    }  # fmt: skip


def mean_stage_seconds(group: Group) -> dict[str, float]:
    """Mean seconds per step of each stage over every step of every seed, in pipeline order."""
    totals: dict[str, float] = {}
    n = 0
    for run in group.runs:
        for r in run.steps:
            n += 1
            for k, v in _stages(r).items():
                totals[k] = totals.get(k, 0.0) + v
    rank = {s: i for i, s in enumerate(STAGE_ORDER)}
    ordered = sorted(totals, key=lambda s: (rank.get(s, len(rank)), s))
    return {s: totals[s] / n for s in ordered} if n else {}


def summarize(group: Group, target: float) -> dict[str, Any]:
    """The results-table row of one configuration: Stats over its seeds, and how many seeds reached the target."""

    def stat(values: Iterable[float | None]) -> Stat | None:
        vs = [float(v) for v in values if v is not None]
        return Stat(vs) if vs else None

    runs = group.runs
    reached = [t for t in (time_to_target(r, target) for r in runs) if t is not None]
    budgets = [r.budget_at(r.last_step) for r in runs]
    return {
        "label": group.label,
        "seeds": len(runs),
        "steps": stat(r.last_step for r in runs),
        "final": stat(final_eval(r) for r in runs),
        # an unfinished run's latest eval can predate its last step (even be step 0): say so next to the number
        "final_steps": sorted({r.evals[-1]["step"] for r in runs if r.evals and r.evals[-1]["step"] < r.last_step}),
        "best": stat(best_eval(r) for r in runs),
        "feedback_final": stat(final_eval(r, "eval/feedback_accuracy") for r in runs),
        "seconds": stat(b[0] for b in budgets),
        "tokens": stat(b[1] for b in budgets),
        "reached": len(reached),
        "target_steps": stat(t[0] for t in reached),
        "target_seconds": stat(t[1] for t in reached),
        "target_tokens": stat(t[2] for t in reached),
    }


def lanpo_summary(group: Group, warn: Warn = _stderr_warn) -> dict[str, float] | None:
    """`metrics.feedback_summary` of each seed, averaged over seeds (count-like totals too: they are per run)."""
    from reasonrl.training.metrics import feedback_summary

    per_run = []
    for run in group.runs:
        try:
            per_run.append(feedback_summary(run.steps))
        except (KeyError, ZeroDivisionError) as e:
            warn(f"{run.path}: LANPO metrics incomplete ({e}); feedback cost left out")
    if not per_run:
        return None
    keys = sorted({k for s in per_run for k in s})
    return {k: statistics.fmean(s[k] for s in per_run if k in s) for k in keys}


# --------------------------------------------------------------------------------------------------------------
# Figures


def _series(runs: list[Run], point: Callable[[Run], dict[int, tuple[float, float]]]) -> tuple[list[float], ...]:
    """Seeds aggregated at the steps all of them have: x (mean over seeds), y mean, y min, y max."""
    per_run = [p for p in (point(r) for r in runs) if p]
    if not per_run:
        return [], [], [], []
    common = sorted(set.intersection(*(set(p) for p in per_run)))
    xs = [statistics.fmean(p[s][0] for p in per_run) for s in common]
    ys = [[p[s][1] for p in per_run] for s in common]
    return xs, [statistics.fmean(v) for v in ys], [min(v) for v in ys], [max(v) for v in ys]


def _smoothing_window(groups: list[Group]) -> int:
    """Per-step training metrics are noisy: a trailing mean over ~1/30 of the run (1 for short runs)."""
    n = max(len(r.steps) for g in groups for r in g.runs)
    return 1 if n <= 30 else max(1, round(n / 30))


def _trailing_mean(values: list[float], w: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= w:
            acc -= values[i - w]
        out.append(acc / min(i + 1, w))
    return out


def _step_metric(key: str, w: int, x: str = "step") -> Callable[[Run], dict[int, tuple[float, float]]]:
    def point(run: Run) -> dict[int, tuple[float, float]]:
        recs = [r for r in run.steps if isinstance(r.get(key), (int, float))]
        ys = _trailing_mean([float(r[key]) for r in recs], w)
        return {r["step"]: (_x(run, r["step"], x), y) for r, y in zip(recs, ys, strict=True)}

    return point


def _eval_metric(key: str, x: str) -> Callable[[Run], dict[int, tuple[float, float]]]:
    def point(run: Run) -> dict[int, tuple[float, float]]:
        return {r["step"]: (_x(run, r["step"], x), float(r[key])) for r in run.evals if key in r}

    return point


def _x(run: Run, step: int, x: str) -> float:
    if x == "step":
        return float(step)
    seconds, tokens = run.budget_at(step)
    return seconds if x == "seconds" else tokens


def _style(i: int) -> dict[str, Any]:
    return {"color": f"C{i % 10}", "linestyle": ("-", "--", ":", "-.")[(i // 10) % 4]}


def _new_figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)  # Agg, explicitly: no GUI backend, no pyplot global state
    return fig


def _legend(fig: Any, axes: Any, ncols: int) -> None:
    handles, labels = [], []
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    if handles:
        cols = len(labels) if len(labels) <= 8 else ncols  # one row when it fits: no column-major reordering
        fig.legend(handles, labels, loc="outside lower center", ncols=cols, frameon=False)


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=130, metadata={"Software": None})
    return buf.getvalue()


def fig_progress(groups: list[Group], x: str, target: float, w: int) -> bytes:
    """Eval accuracy and train reward against `x` (step, seconds or tokens), every configuration on one figure."""
    from matplotlib.ticker import EngFormatter, PercentFormatter

    xlabel = {"step": "training step", "seconds": "wall-clock seconds", "tokens": "generated tokens"}[x]
    fig = _new_figure(11, 4.2)
    ax_acc, ax_rew = fig.subplots(1, 2)
    for i, g in enumerate(groups):
        for ax, point in ((ax_acc, _eval_metric("eval/accuracy", x)), (ax_rew, _step_metric("reward/mean", w, x))):
            xs, mean, lo, hi = _series(g.runs, point)
            if not xs:
                continue
            marker = "o" if ax is ax_acc else None
            ax.plot(xs, mean, label=g.label, marker=marker, markersize=3.5, linewidth=1.6, **_style(i))
            if len(g.runs) > 1:
                ax.fill_between(xs, lo, hi, color=_style(i)["color"], alpha=0.18, linewidth=0)
    ax_acc.axhline(target, color="0.4", linewidth=0.9, linestyle=(0, (4, 3)), label=f"target {target:.0%}")
    ax_acc.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax_acc.set(title="eval accuracy", xlabel=xlabel, ylabel="accuracy")
    smooth = f" (trailing mean over {w} steps)" if w > 1 else ""
    ax_rew.set(title=f"train reward{smooth}", xlabel=xlabel, ylabel="mean reward")
    for ax in (ax_acc, ax_rew):
        if x == "tokens":
            ax.xaxis.set_major_formatter(EngFormatter())
        ax.set_xlim(left=0)
    _legend(fig, (ax_acc, ax_rew), ncols=5)
    return _png(fig)


DYNAMICS = (
    ("completion/len_mean", "completion length", "tokens"),
    ("entropy", "entropy", "nats / token"),
    ("kl", "KL to reference", "k3 estimate"),
    ("clip/region", "clip fraction", "share of tokens"),
    ("zero_std_groups", "zero-std groups", "share of groups"),
)


def fig_dynamics(groups: list[Group], w: int) -> tuple[bytes, list[str]]:
    """Completion length, entropy, KL (when logged), clip and zero-std-group fractions against step."""
    present = [d for d in DYNAMICS if any(d[0] in r for g in groups for run in g.runs for r in run.steps)]
    present = present or [DYNAMICS[0]]  # an empty panel rather than no figure: the page keeps its layout
    cols = 3 if len(present) > 4 else max(1, len(present))
    rows = math.ceil(len(present) / cols)
    fig = _new_figure(11, 3.1 * rows + 0.5)
    axes = list(fig.subplots(rows, cols, squeeze=False).flat)
    for ax, (key, title, unit) in zip(axes, present, strict=False):
        for i, g in enumerate(groups):
            xs, mean, lo, hi = _series(g.runs, _step_metric(key, w))
            if xs:
                ax.plot(xs, mean, label=g.label, linewidth=1.4, **_style(i))
                if len(g.runs) > 1:
                    ax.fill_between(xs, lo, hi, color=_style(i)["color"], alpha=0.18, linewidth=0)
        ax.set(title=title, xlabel="training step", ylabel=unit)
    for ax in axes[len(present) :]:
        ax.set_visible(False)
    _legend(fig, axes[: len(present)], ncols=5)
    return _png(fig), [key for key, _, _ in present]


def fig_stages(groups: list[Group]) -> bytes:
    """Stacked bar per configuration: mean seconds per step in each pipeline stage."""
    from matplotlib import colormaps

    means = [mean_stage_seconds(g) for g in groups]
    rank = {s: i for i, s in enumerate(STAGE_ORDER)}
    stages = sorted({s for m in means for s in m}, key=lambda s: (rank.get(s, len(rank)), s))
    fig = _new_figure(11, 1.6 + 0.55 * len(groups))
    ax = fig.subplots()
    extra = colormaps["tab20b"]
    labels = [g.label for g in groups][::-1]
    left = [0.0] * len(groups)
    for j, stage in enumerate(stages):
        vals = [m.get(stage, 0.0) for m in means][::-1]
        color = STAGE_COLORS.get(stage, extra(j % 20))
        ax.barh(labels, vals, left=left, color=color, label=stage, height=0.6)
        left = [a + b for a, b in zip(left, vals, strict=True)]
    for y, total in enumerate(left):
        ax.text(total, y, f"  {total:#.3g} s", va="center", fontsize=9)
    ax.set_xlim(0, max(left, default=1.0) * 1.15 or 1.0)
    ax.set(title="time per step by stage (mean over steps and seeds)", xlabel="seconds per step")
    ax.grid(axis="y", visible=False)
    ax.set_axisbelow(True)
    fig.legend(loc="outside right upper", frameon=False, title="stage")
    return _png(fig)


def fig_lanpo(groups: list[Group], w: int) -> bytes:
    """Train accuracy per context mode, pooled over seeds and a trailing window, weighted by rollout counts."""
    from matplotlib.ticker import PercentFormatter

    cols = min(3, len(groups))
    rows = math.ceil(len(groups) / cols)
    fig = _new_figure(11, 3.3 * rows + 0.5)  # every figure 11 in wide: one scale on the page
    axes = list(fig.subplots(rows, cols, squeeze=False, sharey=True).flat)
    for ax, g in zip(axes, groups, strict=False):
        for j, mode in enumerate(MODES):
            xs, ys = _mode_accuracy(g, mode, w)
            if xs:  # a mode with few steps (little material) gets markers so that it stays visible
                marker = "o" if len(xs) <= 15 else None
                ax.plot(xs, ys, label=mode, color=f"C{j}", linewidth=1.5, marker=marker, markersize=3.5)
        xs, ys = _mode_accuracy(g, None, w)
        ax.plot(xs, ys, label="all rollouts", color="0.35", linewidth=1.0, linestyle=(0, (4, 3)), zorder=1.5)
        ax.set(title=g.label, xlabel="training step", ylabel="train accuracy")
        ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    for ax in axes[len(groups) :]:
        ax.set_visible(False)
    _legend(fig, axes[: len(groups)], ncols=4)
    return _png(fig)


def _mode_accuracy(group: Group, mode: str | None, w: int) -> tuple[list[int], list[float]]:
    """Count-weighted accuracy of one mode (None: every rollout) per step over all seeds, trailing over `w` steps."""
    correct: dict[int, float] = {}
    count: dict[int, float] = {}
    for run in group.runs:
        for r in run.steps:
            if mode is None:  # every rollout: the modes' counts add up to the step's rollouts
                n, acc = sum(float(r.get(f"lanpo/{m}/count", 0.0)) for m in MODES), r.get("accuracy")
            else:
                n, acc = float(r.get(f"lanpo/{mode}/count", 0.0)), r.get(f"lanpo/{mode}/accuracy")
            if n and acc is not None:
                correct[r["step"]] = correct.get(r["step"], 0.0) + n * float(acc)
                count[r["step"]] = count.get(r["step"], 0.0) + n
    steps = sorted(count)
    xs, ys = [], []
    for i, s in enumerate(steps):
        window = steps[max(0, i - w + 1) : i + 1]
        xs.append(s)
        ys.append(sum(correct[t] for t in window) / sum(count[t] for t in window))
    return xs, ys


# --------------------------------------------------------------------------------------------------------------
# HTML


CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", "DejaVu Sans", sans-serif; margin: 0; color: #1d1d1f;
       background: #fafafa; font-size: 15px; line-height: 1.45; }
main { max-width: 1180px; margin: 0 auto; padding: 24px 28px 48px; background: #fff; }
h1 { font-size: 26px; margin: 0 0 4px; } h2 { font-size: 20px; margin: 34px 0 8px; border-bottom: 1px solid #ddd;
padding-bottom: 4px; } h3 { font-size: 16px; margin: 20px 0 6px; }
.meta { color: #555; margin: 0 0 16px; }
figure { margin: 14px 0 22px; } figure img { width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #444; font-size: 13.5px; margin-top: 4px; }
table { border-collapse: collapse; margin: 8px 0 12px; font-size: 13.5px; }
th, td { border: 1px solid #ddd; padding: 4px 8px; text-align: right; vertical-align: top; }
td { white-space: nowrap; } th { background: #f2f2f4; } td.l, th.l { text-align: left; } td.na { color: #999; }
.wide { overflow-x: auto; }
code, pre { font-family: "DejaVu Sans Mono", ui-monospace, monospace; font-size: 13px; }
pre { background: #f5f5f7; padding: 8px 10px; white-space: pre-wrap; word-break: break-all; }
.ok { color: #17702f; font-weight: 600; } .bad { color: #b3261e; font-weight: 600; }
ul.notes li { color: #7a4b00; }
"""


def _e(text: Any) -> str:
    return html.escape(str(text))


def _fmt_value(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v, default=str)


def fmt_stat(s: Stat | None, kind: str) -> str:
    """`mean ± std` as the table shows it: accuracy in percent, seconds to 0.1, counts with thousands separators."""
    if s is None:
        return "—"
    spec = {"pct": "{:.1f}", "sec": "{:,.1f}", "int": "{:,.0f}"}[kind]
    scale = 100.0 if kind == "pct" else 1.0
    text = spec.format(s.mean * scale)
    spread = len(s.values) > 1 and not (kind == "int" and s.std == 0)  # "60" steps, not "60 ± 0"
    return text + (" ± " + spec.format(s.std * scale) if spread else "")


def _img(name: str, png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{_e(alt)}" data-file="{_e(name)}">'


def _table(headers: list[str], rows: list[list[str]], left: int = 1) -> str:
    """An HTML table; cells are already-escaped HTML; the first `left` columns are left aligned."""
    head = "".join(f'<th class="{"l" if i < left else ""}">{h}</th>' for i, h in enumerate(headers))
    body = "".join(
        "<tr>" + "".join(
            f'<td class="{"l" if i < left else ""}{" na" if c in ("—", "not reached") else ""}">{c}</td>'
            for i, c in enumerate(row)
        ) + "</tr>"
        for row in rows
    )  # fmt: skip
    return f'<div class="wide"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def _results_table(rows: list[dict[str, Any]], target: float) -> str:
    has_fb = any(r["feedback_final"] is not None for r in rows)
    headers = ["configuration", "seeds", "steps", "final eval acc. (%)", "best eval acc. (%)"]
    headers += ["feedback-aug. final acc. (%)"] if has_fb else []
    headers += ["seconds", "generated tokens", f"steps to {target:.0%}", f"seconds to {target:.0%}",
                f"tokens to {target:.0%}"]  # fmt: skip
    out = []
    for r in rows:
        stale = f" (at step {', '.join(map(str, r['final_steps']))})" if r["final_steps"] else ""
        cells = [_e(r["label"]), str(r["seeds"]), fmt_stat(r["steps"], "int"), fmt_stat(r["final"], "pct") + stale,
                 fmt_stat(r["best"], "pct")]  # fmt: skip
        cells += [fmt_stat(r["feedback_final"], "pct")] if has_fb else []
        cells += [fmt_stat(r["seconds"], "sec"), fmt_stat(r["tokens"], "int")]
        if not r["reached"]:
            cells += ["not reached"] * 3
        else:
            partial = f" ({r['reached']}/{r['seeds']} seeds)" if r["reached"] < r["seeds"] else ""
            cells += [fmt_stat(r["target_steps"], "int") + partial, fmt_stat(r["target_seconds"], "sec") + partial,
                      fmt_stat(r["target_tokens"], "int") + partial]  # fmt: skip
        out.append(cells)
    return _table(headers, out)


def _stage_checks(groups: list[Group]) -> str:
    items = []
    for g in groups:
        checks = [stage_check(r) for r in g.runs]
        ok, n = sum(c[0] for c in checks), sum(c[1] for c in checks)
        worst = max((c[2] for c in checks), default=0.0)
        passed = n > 0 and ok == n
        mark = '<span class="ok">✓ pass</span>' if passed else '<span class="bad">✗ FAIL</span>'
        items.append(
            f"<li>{mark} <b>{_e(g.label)}</b>: stage times sum to time/step within {STAGE_TOLERANCE:.0%} on "
            f"{ok}/{n} steps (largest gap {worst:.1%})</li>"
        )
    return "<ul class='checks'>" + "".join(items) + "</ul>"


def _lanpo_table(groups: list[Group], summaries: list[dict[str, float]]) -> str:
    headers = ["configuration"] + [f"{m} acc. (n)" for m in MODES] + [
        "fallbacks", "lesson tokens", "lesson / generated", "context tokens / feedback rollout",
        "extra context tokens", "feedback seconds", "share of step time",
    ]  # fmt: skip
    rows = []
    for g, s in zip(groups, summaries, strict=True):
        modes = [f"{s[f'{m}/accuracy']:.1%} ({s[f'{m}/count']:,.0f})" if s.get(f"{m}/count") else "—" for m in MODES]
        rows.append(
            [_e(g.label), *modes, f"{s['fallbacks']:,.0f}", f"{s['lesson_tokens']:,.0f}",
             f"{s['lesson_tokens'] / max(s['generated_tokens'], 1):.2%}", f"{s['context_tokens_per_rollout']:,.1f}",
             f"{s['context_tokens']:,.0f}", f"{s['feedback_seconds']:,.1f}",
             f"{s['feedback_seconds'] / s['step_seconds']:.1%}" if s["step_seconds"] else "—"]
        )  # fmt: skip
    return _table(headers, rows)


def _config_diff(groups: list[Group]) -> str:
    configs = [r.config for g in groups for r in g.runs]
    keys = _differing(configs)
    if not keys:
        return "<p>All runs have identical configs.</p>"
    rows = []
    for k in keys:
        cells = [f"<code>{_e(k)}</code>"]
        for g in groups:
            vals = list(dict.fromkeys(_fmt_value(r.config.get(k)) for r in g.runs if k in r.config))
            cells.append(_e(" / ".join(vals)) if vals else "—")
        rows.append(cells)
    note = (
        "<p>Keys whose values differ between any two runs (<code>a / b</code>: differs between the seeds of one "
        "configuration). Everything else is identical; each run's complete config is its <code>config.yaml</code>.</p>"
    )
    return note + _table(["key", *[_e(g.label) for g in groups]], rows, left=len(groups) + 1)


def _budget_text(runs: list[Run]) -> str:
    budgets = {json.dumps(r.budget, sort_keys=True) for r in runs if r.budget}
    if not budgets:
        return ""
    unit = {"steps": "steps", "seconds": "seconds of RL steps", "tokens": "generated tokens"}
    text = " or ".join(
        ", ".join(f"{v:,g} {unit.get(k, k)}" for k, v in json.loads(b).items()) for b in sorted(budgets)
    )  # fmt: skip
    return f"; shared budget per run (compare.json): {_e(text)}"


def _runs_table(groups: list[Group]) -> str:
    rows = []
    for g in groups:
        for r in g.runs:
            seconds, tokens = r.budget_at(r.last_step)
            rows.append([_e(g.label), _e(r.seed), f"<code>{_e(r.path.resolve())}</code>", str(r.last_step),
                         f"{seconds:,.1f}", f"{tokens:,.0f}"])  # fmt: skip
    return _table(["configuration", "seed", "run directory", "steps", "seconds", "generated tokens"], rows, left=3)


def draw_figures(groups: list[Group], target: float) -> list[tuple[str, bytes, str, str]]:
    """(file name, PNG, title, caption) of every figure, drawn with the Agg renderer."""
    import matplotlib

    runs = [r for g in groups for r in g.runs]
    w = _smoothing_window(groups)
    band = "Lines: mean over seeds; shaded: min–max over seeds. " if any(len(g.runs) > 1 for g in groups) else ""
    source = {
        "step": "",
        "seconds": f" Seconds: {', '.join(sorted({r.clock_source for r in runs}))}.",
        "tokens": f" Tokens: {', '.join(sorted({r.token_source for r in runs}))}.",
    }
    figures = []
    with matplotlib.rc_context(MPL_STYLE):
        for x, what in (("step", "training step"), ("seconds", "wall-clock seconds"), ("tokens", "generated tokens")):
            caption = f"{band}Eval accuracy from eval records, reward from step records.{source[x]}"
            if x != "step" and band:
                caption += " x: mean over seeds at each eval / step."
            title = f"Eval accuracy and train reward against {what}"
            figures.append((f"progress_vs_{x}.png", fig_progress(groups, x, target, w), title, caption))
        png, keys = fig_dynamics(groups, w)
        smooth = f"Trailing mean over {w} steps. " if w > 1 else ""
        figures.append(("dynamics.png", png, "Training dynamics", f"{band}{smooth}Keys: {', '.join(keys)}."))
        figures.append(("stages.png", fig_stages(groups), "Time per step by stage", "Mean seconds per step."))
        lanpo = [g for g in groups if any(r.is_lanpo for r in g.runs)]
        if lanpo:
            window = f" and a trailing {w}-step window" if w > 1 else ""
            caption = f"Correct / sampled rollouts of each mode, pooled over seeds{window}."
            figures.append(("lanpo_modes.png", fig_lanpo(lanpo, w), "LANPO train accuracy by context mode", caption))
    return figures


def build_report(
    dirs: Sequence[str | Path],
    out: str | Path | None = None,
    target: float = 0.6,
    warn: Warn = _stderr_warn,
) -> Path:
    """Write `report.html` and its PNG figures to `out` (default: first DIR/report/); returns the HTML's path."""
    if not dirs:
        raise UserError("give at least one run or comparison directory")
    if not 0.0 <= target <= 1.0:
        raise UserError(f"--target is an accuracy in [0, 1], got {target}")
    notes: list[str] = []

    def note(msg: str) -> None:
        notes.append(msg)
        warn(msg)

    runs = [r for p, hint in discover(dirs, note) if (r := load_run(p, hint, note)) is not None]
    if not runs:
        raise UserError("no run with metrics found in " + ", ".join(str(d) for d in dirs))
    groups = group_runs(runs, note)
    out_dir = Path(out) if out is not None else Path(dirs[0]) / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = draw_figures(groups, target)
    for name, png, _, _ in figures:
        (out_dir / name).write_bytes(png)
    fig_html = {
        name: f"<figure>{_img(name, png, title)}<figcaption><b>{_e(title)}.</b> {_e(caption)} "
        f"(<code>{_e(name)}</code>)</figcaption></figure>"
        for name, png, title, caption in figures
    }
    lanpo = [g for g in groups if any(r.is_lanpo for r in g.runs)]
    costs = [(g, s) for g in lanpo if (s := lanpo_summary(g, note)) is not None]
    clock = ", ".join(sorted({r.clock_source for r in runs}))
    tokens = ", ".join(sorted({r.token_source for r in runs}))
    command = shlex.join(["reasonrl", "report", *(str(Path(d).resolve()) for d in dirs),
                          "--out", str(out_dir.resolve()), "--target", f"{target:g}"])  # fmt: skip
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>reasonrl report: {_e(', '.join(g.label for g in groups))}</title><style>{CSS}</style></head>",
        "<body><main><h1>reasonrl report</h1>",
        f"<p class='meta'>{len(groups)} configuration(s), {len(runs)} run(s); target eval accuracy {target:.0%}"
        f"{_budget_text(runs)}; generated {datetime.now():%Y-%m-%d %H:%M}.</p>",
    ]
    if notes:
        parts += ["<ul class='notes'>", *(f"<li>warning: {_e(n)}</li>" for n in notes), "</ul>"]
    parts += [
        "<h2>Results</h2>",
        _results_table([summarize(g, target) for g in groups], target),
        "<p class='meta'>Mean ± sample standard deviation over seeds (no ± with one seed). Final: the eval record "
        "at the last step; best: the highest eval record of each run. <i>To target</i>: the first eval record at or "
        "above the target, with the seconds and generated tokens spent by then. Seconds count training steps "
        f"({_e(clock)}); tokens are rollout tokens ({_e(tokens)}).</p>",
        "<h2>Accuracy against steps, seconds and tokens</h2>",
        *(fig_html[f"progress_vs_{x}.png"] for x in ("step", "seconds", "tokens")),
        "<h2>Training dynamics</h2>",
        fig_html["dynamics.png"],
        "<h2>Where the time goes</h2>",
        fig_html["stages.png"],
        _stage_checks(groups),
    ]
    if lanpo:
        parts += ["<h2>LANPO: context modes and feedback cost</h2>", fig_html["lanpo_modes.png"]]
    if costs:
        parts += [
            _lanpo_table([g for g, _ in costs], [s for _, s in costs]),
            "<p class='meta'>Per run totals (<code>metrics.feedback_summary</code>), averaged over seeds. Lesson "
            "tokens: generated by the policy to condense other problems' trajectories; extra context tokens: prompt "
            "tokens added to feedback rollouts; feedback seconds: prompt building, abstraction and pool I/O.</p>",
        ]
    parts += [
        "<h2>Config differences</h2>",
        _config_diff(groups),
        "<h2>Runs</h2>",
        _runs_table(groups),
        "<h2>Reproduce this report</h2>",
        f"<pre>{_e(command)}</pre>",
        "</main></body></html>",
    ]
    path = out_dir / "report.html"
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
