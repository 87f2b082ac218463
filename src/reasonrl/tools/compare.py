"""`reasonrl compare`: several configurations × seeds under one shared budget, as resumable subprocess runs.

    reasonrl compare [LABEL=OVERRIDES ...] [--seeds S ...] [--steps N | --seconds S | --tokens T]
                     [--out DIR] [--jobs J] [--config BASE.yaml] [-- KEY=VALUE ...]

LABEL=OVERRIDES names one configuration: LABEL (letters, digits, `_`, `-`, `+`; no `.`) and, after the first `=`, its
dotted config overrides separated by commas or spaces (quote the whole item for spaces). Brackets and quotes group,
so a list or a spaced string stays one override:

    grpo=algorithm.advantage=grpo
    lanpo+lampo=algorithm.lanpo.enabled=true,algorithm.advantage=lampo
    "dense=rewards.functions=[math_answer, format] rewards.weights=[1, 0.5]"
    baseline=                                  # the base config as it is

With none given: grpo=algorithm.advantage=grpo, lampo=algorithm.advantage=lampo, lanpo=algorithm.lanpo.enabled=true.
Overrides after `--` apply to every run, before each label's own. Every run gets the same budget: `--steps N`
(train.steps), `--seconds S` (train.max_seconds: seconds of RL steps, evaluation excluded) or `--tokens T`
(train.max_tokens: generated completion tokens); with neither, the config's train.steps. Under a seconds or tokens
budget train.steps defaults to 1000000 so that the budget is the limit (linear / cosine lr schedules are laid out
over train.steps). train.eval_every defaults to 10, so that every run has an accuracy curve. Seeds, run names and
the output directory belong to compare, and labels may not change the budget: those keys are refused in the
overrides.

Run `<label>-seed<s>` trains in `DIR/runs/<label>-seed<s>/` as `python -m reasonrl train ...`, its output in
`DIR/runs/<label>-seed<s>.log`; `--jobs J` runs J at a time, each with max(1, cores // J) threads. `DIR/compare.json`
(written atomically) records the labels, overrides, seeds, budget and every run's status (pending, running, done,
failed), exit code, attempts and final numbers. Running the same command again skips finished runs, resumes runs
that have a checkpoint and restarts the others; a different set of labels, overrides, base config or budget for an
existing DIR is refused (more seeds may be added). Exit status 1 when a run failed; the other runs still run.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from reasonrl.errors import UserError

DEFAULT_VARIANTS: dict[str, list[str]] = {
    "grpo": ["algorithm.advantage=grpo"],
    "lampo": ["algorithm.advantage=lampo"],
    "lanpo": ["algorithm.lanpo.enabled=true"],
}
MANIFEST = "compare.json"
LOCK = ".compare.lock"
UNBOUNDED_STEPS = 1_000_000  # train.steps under a seconds / tokens budget, unless the user sets it
DEFAULT_EVAL_EVERY = 10
BUDGET_KEYS = {"steps": "train.steps", "seconds": "train.max_seconds", "tokens": "train.max_tokens"}
OWNED_KEYS = {"train.seed": "--seeds", "train.run_name": "the run names", "train.output_dir": "--out"}
_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9_+-]*")


# --------------------------------------------------------------------------------------------------------------
# The plan: what to run, checked before anything starts


def split_overrides(text: str) -> list[str]:
    """Split on commas and whitespace outside brackets and quotes: 'a=1, b=[x, y]' → ['a=1', 'b=[x, y]']."""
    out, cur, depth, quote = [], "", 0, ""
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth = max(0, depth - 1)
        elif depth == 0 and (ch == "," or ch.isspace()):
            if cur:
                out.append(cur)
            cur = ""
            continue
        cur += ch
    if cur:
        out.append(cur)
    return out


def parse_variant(item: str) -> tuple[str, list[str]]:
    """'LABEL=OVERRIDES' → (label, overrides), with an error that says what was wrong."""
    label, sep, rest = item.partition("=")
    if not sep:
        raise UserError(f"'{item}' is not LABEL=OVERRIDES (e.g. lampo=algorithm.advantage=lampo)")
    if "." in label:
        raise UserError(f"'{item}' looks like a config override for every run: put those after `--`")
    if not _LABEL.fullmatch(label):
        raise UserError(f"label '{label}' in '{item}': use letters, digits, '_', '-' and '+' only")
    return label, split_overrides(rest)


def _key(override: str) -> str:
    return override.partition("=")[0].strip()


def _yaml_sets(data: dict[str, Any], key: str) -> bool:
    node: Any = data
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


@dataclass
class Plan:
    """Labels × seeds under one budget, in DIR; `overrides(label, seed)` is one run's full override list."""

    out: Path
    config: str | None
    labels: dict[str, list[str]]
    common: list[str]
    seeds: list[int]
    budget: dict[str, float | None]  # steps / seconds / tokens as given on the command line (None: not given)
    defaults: list[str] = field(default_factory=list)  # compare's defaults, before the user's overrides
    steps: int = 0  # resolved train.steps (the progress bar's total under a steps budget)

    @property
    def runs(self) -> list[tuple[str, int]]:
        return [(label, seed) for label in self.labels for seed in self.seeds]

    def run_name(self, label: str, seed: int) -> str:
        return f"{label}-seed{seed}"

    def overrides(self, label: str, seed: int, *, location: bool = True) -> list[str]:
        """Compare's defaults, common, label, budget, seed; `location` adds run_name / output_dir (not on resume,
        so that a DIR reached by another spelling of its path still resumes)."""
        budget = [f"{BUDGET_KEYS[k]}={v!r}" for k, v in self.budget.items() if v is not None]
        own = [f"train.seed={seed}"]
        if location:
            own += [f"train.run_name={self.run_name(label, seed)}", f"train.output_dir={self.out / 'runs'}"]
        return [*self.defaults, *self.common, *self.labels[label], *budget, *own]

    def identity(self) -> dict[str, Any]:
        """What must not change between invocations on one DIR (seeds may grow): the config file's settings (not its
        comments or layout), labels, common overrides, budget."""
        return {"config": self.config, "config_sha256": self.config_digest(), "labels": self.labels,
                "common": self.common, "budget": self.budget}  # fmt: skip

    def config_digest(self, *, raw: bool = False) -> str | None:
        """sha256 of the config file's parsed settings (`raw`: of its bytes, as manifests before this one held)."""
        if not self.config:
            return None
        data = Path(self.config).read_bytes()
        if not raw:
            import yaml

            data = json.dumps(yaml.safe_load(data), sort_keys=True, default=str).encode()
        return hashlib.sha256(data).hexdigest()


def make_plan(
    variants: list[str],
    seeds: list[int],
    *,
    steps: int | None = None,
    seconds: float | None = None,
    tokens: int | None = None,
    out: str | Path = "runs/compare",
    config: str | None = None,
    common: list[str] | None = None,
) -> Plan:
    """Parse and validate everything up front: a typo fails before any run starts, naming its label."""
    import yaml

    from reasonrl.config import load_config

    labels: dict[str, list[str]] = {}
    for item in variants:
        label, ovr = parse_variant(item)
        if label in labels:
            raise UserError(f"label '{label}' is given twice")
        labels[label] = ovr
    labels = labels or {k: list(v) for k, v in DEFAULT_VARIANTS.items()}
    common = list(common or [])
    if not seeds or len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds needs distinct seeds, got {' '.join(map(str, seeds)) or 'none'}")
    budget: dict[str, float | None] = {"steps": steps, "seconds": seconds, "tokens": tokens}
    for name, value in budget.items():
        if value is not None and not value > 0:
            raise UserError(f"--{name} must be > 0, got {value:g}")
    flag = next((k for k, v in budget.items() if v is not None), None)
    for where, ovr in [("overrides after --", common), *((f"label '{lb}'", o) for lb, o in labels.items())]:
        for key in map(_key, ovr):
            if key in OWNED_KEYS:
                raise UserError(f"{where}: '{key}' is set by compare for each run (use {OWNED_KEYS[key]})")
            # a label may not move the budget; common overrides may (e.g. cap train.steps) unless a flag sets it
            if key in BUDGET_KEYS.values() and (where != "overrides after --" or key == BUDGET_KEYS.get(flag or "")):
                raise UserError(f"{where}: '{key}' would change the shared budget; use --steps, --seconds or --tokens")

    config_path = str(Path(config).resolve()) if config else None
    load_config(config_path)  # the file's own error (missing, invalid YAML, bad key) first
    data = (yaml.safe_load(Path(config_path).read_text()) or {}) if config_path else {}
    defaults = [] if _yaml_sets(data, "train.eval_every") else [f"train.eval_every={DEFAULT_EVAL_EVERY}"]
    if flag in ("seconds", "tokens") and not _yaml_sets(data, "train.steps"):
        defaults.append(f"train.steps={UNBOUNDED_STEPS}")
    plan = Plan(Path(out), config_path, labels, common, list(seeds), budget, defaults)
    try:
        load_config(config_path, [*defaults, *common])
    except UserError as e:
        raise UserError(f"overrides after --: {e}") from None
    from reasonrl.algorithms import get_advantage  # the registry imports torch: only once the configs parse

    for label in labels:
        try:
            cfg = load_config(config_path, plan.overrides(label, seeds[0]))
            get_advantage(cfg.algorithm.advantage)
        except (UserError, ValueError) as e:
            raise UserError(f"label '{label}': {e}") from None
        plan.steps = cfg.train.steps
    return plan


# --------------------------------------------------------------------------------------------------------------
# The manifest


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """A reader (or a kill) never sees half a manifest: write a sibling, fsync, rename over."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def open_manifest(plan: Plan) -> dict[str, Any]:
    """The DIR's manifest, created or checked against this invocation; new seeds add runs."""
    path = plan.out / MANIFEST
    ident = plan.identity()
    if path.exists():
        try:
            manifest = json.loads(path.read_text())
        except json.JSONDecodeError:
            raise UserError(f"{path} is not a readable compare manifest; use another --out") from None
        old = {k: manifest.get(k) for k in ident}
        if old["config_sha256"] == plan.config_digest(raw=True):  # an older manifest: the file's bytes, unchanged
            old["config_sha256"] = manifest["config_sha256"] = ident["config_sha256"]
        if old != ident:
            what = ", ".join(k.replace("_sha256", " file contents") for k in ident if old[k] != ident[k])
            raise UserError(
                f"{plan.out} holds a different comparison (its {what} differ); use the same arguments or another --out"
            )
        seeds = manifest["seeds"] + [s for s in plan.seeds if s not in manifest["seeds"]]
    else:
        manifest, seeds = {"version": 1, **ident, "created": _now()}, plan.seeds
    plan.seeds = seeds
    runs = manifest.setdefault("runs", {})
    for label, seed in plan.runs:
        name = plan.run_name(label, seed)
        runs.setdefault(name, {"label": label, "seed": seed, "dir": f"runs/{name}", "log": f"runs/{name}.log",
                               "status": "pending", "exit_code": None, "attempts": 0})  # fmt: skip
    manifest.update(seeds=seeds, runs={plan.run_name(lb, s): runs[plan.run_name(lb, s)] for lb, s in plan.runs})
    return manifest


def _now() -> str:
    return datetime.now().isoformat(timespec="seconds")


# --------------------------------------------------------------------------------------------------------------
# Running


@dataclass
class Live:
    """A running run: its process, log file, and what its metrics log said last."""

    proc: subprocess.Popen
    log: Any
    metrics_offset: int = 0
    partial: str = ""
    last: dict[str, Any] = field(default_factory=dict)


def run_compare(plan: Plan, jobs: int = 1, console: Any = None) -> int:
    """Run every unfinished run of the plan, `jobs` at a time; print a summary table. 0 if none failed, else 1."""
    from rich.console import Console

    console = console or Console(highlight=False)
    if jobs < 1:
        raise UserError(f"--jobs must be >= 1, got {jobs}")
    plan.out.mkdir(parents=True, exist_ok=True)
    lock = _lock(plan.out)
    try:
        manifest = open_manifest(plan)
        (plan.out / "runs").mkdir(exist_ok=True)
        return _run_all(plan, manifest, jobs, lock, console)
    finally:
        os.close(lock)


def _lock(out: Path) -> int:
    """An exclusive lock on DIR, inherited by the runs: held while this command or any run it started is alive."""
    fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        return fd
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UserError(f"another `reasonrl compare` (or a run it started) is still running in {out}") from None
    return fd


def _run_all(plan: Plan, manifest: dict[str, Any], jobs: int, lock: int, console: Any) -> int:
    from rich.markup import escape
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from reasonrl.training.checkpoint import latest_checkpoint
    from reasonrl.training.run import finished_state

    runs, path = manifest["runs"], plan.out / MANIFEST
    todo: list[str] = []
    for name, r in runs.items():
        if finished_state(plan.out / r["dir"]) is not None:
            if r["status"] != "done" or "result" not in r:
                r.update(status="done", exit_code=0, result=_result(plan.out / r["dir"]))
        else:
            r["status"] = "failed" if r["status"] == "failed" else "pending"
            todo.append(name)
    write_json_atomic(path, manifest)
    done_before = len(runs) - len(todo)
    unit, total = _budget_unit(plan)
    console.print(
        f"compare: {_n(len(plan.labels), 'configuration')} × {_n(len(plan.seeds), 'seed')} = {len(runs)} runs, budget "
        f"{total:g} {unit} each, {jobs} at a time → {escape(str(plan.out))}"
        + (f" ({done_before} already done)" if done_before else ""),
        soft_wrap=True,
    )
    threads = max(1, _cores() // jobs)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    live: dict[str, Live] = {}
    columns = [
        TextColumn("{task.description}"),
        BarColumn(bar_width=24),
        TextColumn("{task.fields[amount]}"),
        TimeElapsedColumn(),
        TextColumn("{task.fields[status]}"),
    ]
    interrupted = False
    previous = {s: signal.signal(s, _raise_interrupt) for s in (signal.SIGTERM,)}
    try:
        with Progress(*columns, console=console, transient=True) as progress:
            tasks = {
                name: progress.add_task(name, total=total, start=False, amount="", status=runs[name]["status"])
                for name in todo
            }
            queue = list(todo)
            while queue or live:
                while queue and len(live) < jobs:
                    name = queue.pop(0)
                    live[name] = _start(plan, runs[name], name, env, lock, latest_checkpoint)
                    write_json_atomic(path, manifest)
                    r = runs[name]
                    console.print(f"  {r['mode']:<6} {name} (attempt {r['attempts']})")
                    progress.start_task(tasks[name])
                    progress.update(tasks[name], status="running")
                time.sleep(0.2)
                for name in list(live):
                    run = live[name]
                    _read_metrics(plan.out / runs[name]["dir"], run)
                    progress.update(tasks[name], completed=_spent(run.last, unit), **_fields(run.last, unit, total))
                    code = run.proc.poll()
                    if code is None:
                        continue
                    run.log.close()
                    del live[name]
                    _finish(plan, runs[name], code)
                    write_json_atomic(path, manifest)
                    progress.update(tasks[name], status=runs[name]["status"])
                    progress.stop_task(tasks[name])
                    _print_outcome(console, plan, name, runs[name])
    except KeyboardInterrupt:
        interrupted = True
        _stop(plan, live, runs)
        write_json_atomic(path, manifest)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    _print_table(console, plan, manifest)
    failed = [n for n, r in runs.items() if r["status"] == "failed"]
    if interrupted:
        console.print("compare: interrupted; run the same command again to continue (finished runs are kept)")
        return 130
    console.print(
        f"compare: {sum(r['status'] == 'done' for r in runs.values())}/{len(runs)} runs done"
        + (f", {len(failed)} failed ({', '.join(failed)}: see their .log files)" if failed else "")
        + escape(f"; manifest {path}; plots and tables: reasonrl report {plan.out}"),
        soft_wrap=True,
    )
    return 1 if failed else 0


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _start(plan: Plan, r: dict[str, Any], name: str, env: dict[str, str], lock: int, latest: Any) -> Live:
    """Resume from a checkpoint if there is one; otherwise start afresh (a partial run directory is removed)."""
    run_dir = plan.out / r["dir"]
    base = [sys.executable, "-m", "reasonrl", "train", *(["--config", plan.config] if plan.config else [])]
    label, seed = r["label"], r["seed"]
    if latest(run_dir) is not None:
        mode, cmd = "resume", [*base, "--resume", str(run_dir), *plan.overrides(label, seed, location=False)]
    else:
        shutil.rmtree(run_dir, ignore_errors=True)
        mode, cmd = "start", [*base, *plan.overrides(label, seed)]
    r["attempts"] += 1
    r.update(status="running", exit_code=None, started=_now(), mode=mode)
    log = open(plan.out / r["log"], "a")  # noqa: SIM115 - closed when the process ends
    log.write(f"=== reasonrl compare: attempt {r['attempts']} ({mode}) at {r['started']}\n$ {' '.join(cmd)}\n")
    log.flush()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                            pass_fds=(lock,))  # fmt: skip
    return Live(proc, log)


def _finish(plan: Plan, r: dict[str, Any], code: int) -> None:
    from reasonrl.training.run import finished_state

    r.update(exit_code=code, ended=_now())
    if code == 0 and finished_state(plan.out / r["dir"]) is not None:
        r.update(status="done", result=_result(plan.out / r["dir"]))
    else:
        r["status"] = "failed"


def _stop(plan: Plan, live: dict[str, Live], runs: dict[str, Any]) -> None:
    """Interrupt the runs (SIGINT: they exit, their checkpoints stay; escalated if ignored) and mark them pending for
    the next invocation, or done if one finished meanwhile."""
    for sig, grace in ((signal.SIGINT, 10.0), (signal.SIGTERM, 5.0), (signal.SIGKILL, 60.0)):
        alive = [run.proc for run in live.values() if run.proc.poll() is None]
        for proc in alive:
            proc.send_signal(sig)
        deadline = time.monotonic() + grace
        while any(proc.poll() is None for proc in alive) and time.monotonic() < deadline:
            time.sleep(0.05)
    for name, run in live.items():
        run.log.close()
        code = run.proc.wait()
        if code == 0:
            _finish(plan, runs[name], code)
        else:
            runs[name].update(status="pending", exit_code=code, ended=_now())


# --------------------------------------------------------------------------------------------------------------
# Reading the runs


def _read_metrics(run_dir: Path, run: Live) -> None:
    """Read what the run appended to metrics.jsonl since last time (a resume rewrites it: start over)."""
    path = run_dir / "metrics.jsonl"
    try:
        size = path.stat().st_size
        if size < run.metrics_offset:
            run.metrics_offset, run.partial = 0, ""
        with open(path) as f:
            f.seek(run.metrics_offset)
            chunk = f.read()
            run.metrics_offset = f.tell()
    except OSError:
        return
    lines = (run.partial + chunk).split("\n")
    run.partial = lines.pop()
    for ln in lines:
        try:
            rec = json.loads(ln)
        except json.JSONDecodeError:
            continue
        run.last.update({k: v for k, v in rec.items() if k in _TRACKED or k.startswith("eval/")})


_TRACKED = ("step", "reward/mean", "accuracy", "time/elapsed", "tokens/total")


def _budget_unit(plan: Plan) -> tuple[str, float]:
    if plan.budget["seconds"] is not None:
        return "s", float(plan.budget["seconds"])
    if plan.budget["tokens"] is not None:
        return "tokens", float(plan.budget["tokens"])
    return "steps", float(plan.steps)


def _spent(last: dict[str, Any], unit: str) -> float:
    return float(last.get({"s": "time/elapsed", "tokens": "tokens/total", "steps": "step"}[unit], 0))


def _fields(last: dict[str, Any], unit: str, total: float) -> dict[str, str]:
    amount = f"{_spent(last, unit):.1f}/{total:g} s" if unit == "s" else f"{_spent(last, unit):.0f}/{total:g} {unit}"
    status = "running"
    if "reward/mean" in last:
        status += f" · reward {last['reward/mean']:.3f} acc {last.get('accuracy', float('nan')):.3f}"
    if "eval/accuracy" in last:
        status += f" · eval {last['eval/accuracy']:.1%}"
    return {"amount": amount, "status": status}


def _result(run_dir: Path) -> dict[str, Any]:
    """A finished run's final numbers for the manifest and the table."""
    from reasonrl.training.metrics import read_metrics
    from reasonrl.training.run import finished_state

    state = finished_state(run_dir) or {}
    evals = [m["eval/accuracy"] for m in read_metrics(run_dir) if "eval/accuracy" in m]
    return {
        "eval_accuracy_before": evals[0] if len(evals) > 1 else None,
        "eval_accuracy": evals[-1] if evals else None,
        "steps": state.get("step"),
        "seconds": state.get("elapsed_seconds"),
        "tokens": state.get("tokens_total"),
        "stopped_by": state.get("stopped_by"),
    }


def _print_outcome(console: Any, plan: Plan, name: str, r: dict[str, Any]) -> None:
    from rich.markup import escape

    if r["status"] == "done":
        res = r["result"]
        acc = "n/a" if res["eval_accuracy"] is None else f"{res['eval_accuracy']:.1%}"
        secs = "" if res["seconds"] is None else f", {res['seconds']:.1f} s"
        console.print(f"  done   {name}: eval accuracy {acc} after {res['steps']} steps{secs}")
    else:
        tail = _last_line(plan.out / r["log"])
        log = escape(str(plan.out / r["log"]))
        console.print(f"  [red]failed[/red] {name} (exit {r['exit_code']}): {tail}  → {log}")


def _last_line(log: Path) -> str:
    from rich.markup import escape

    try:
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return escape(lines[-1].strip()[:160]) if lines else ""


def _print_table(console: Any, plan: Plan, manifest: dict[str, Any]) -> None:
    from rich import box
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=escape(f"comparison {plan.out}"), box=box.SIMPLE_HEAD, pad_edge=False)
    for col in ("label", "seed", "status", "eval accuracy", "steps", "seconds", "tokens"):  # stop reason: manifest
        table.add_column(col, justify="left" if col in ("label", "status") else "right", no_wrap=True)
    for r in manifest["runs"].values():
        res = r.get("result") or {}
        acc = res.get("eval_accuracy")
        before = res.get("eval_accuracy_before")
        acc_text = "" if acc is None else (f"{before:.1%} → " if before is not None else "") + f"{acc:.1%}"
        status = r["status"] if r["status"] != "failed" else f"[red]failed ({r['exit_code']})[/red]"
        table.add_row(
            escape(r["label"]),
            str(r["seed"]),
            status,
            acc_text,
            "" if res.get("steps") is None else str(res["steps"]),
            "" if res.get("seconds") is None else f"{res['seconds']:.1f}",
            "" if res.get("tokens") is None else str(res["tokens"]),
        )
    console.print(table)
