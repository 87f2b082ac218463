"""The embedded demo's speed, this checkout against another source tree, measured in one run.

Runs the README's demo (`reasonrl train`, the defaults plus any overrides given) as a child process for each tree,
alternating, `--repeats` times each; each child's `PYTHONPATH` chooses the tree. Both share one warm-start cache (the
first child builds it if needed, untimed: `--warmup` runs the first pair before timing). Reported per tree: the median
wall time of the whole command, and the median of the summed `time/step` (the RL steps alone); then this checkout's
ratios to the other tree.

    mkdir /tmp/base && git archive <commit> | tar -x -C /tmp/base
    python perf/demo_speed.py --baseline-src /tmp/base --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(src: Path, out: Path, overrides: list[str]) -> tuple[float, float, str]:
    """(wall seconds, sum of time/step, the summary line) of one demo run with the source tree `src`."""
    env = {**os.environ, "PYTHONPATH": str(src)}
    cmd = [sys.executable, "-m", "reasonrl", "train", f"train.output_dir={out}", "train.run_name=demo", *overrides]
    start = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - start
    if res.returncode:
        raise SystemExit(f"{src}: {' '.join(cmd)} failed:\n{res.stderr[-3000:]}")
    records = [json.loads(line) for line in (out / "demo" / "metrics.jsonl").read_text().splitlines()]
    steps = sum(r.get("time/step", 0.0) for r in records)
    summary = next((line for line in res.stdout.splitlines() if line.startswith("eval accuracy")), "")
    return wall, steps, summary.strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline-src", required=True, help="root of the other source tree (holds src/reasonrl)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("overrides", nargs="*", help="dotted config overrides for every run (default: the demo)")
    a = ap.parse_args()
    trees = {"baseline": Path(a.baseline_src).resolve() / "src", "this": Path(__file__).resolve().parents[1] / "src"}
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in trees}
    with tempfile.TemporaryDirectory(prefix="demo-speed-") as tmp:
        for i in range(a.repeats + int(a.warmup)):
            for name, src in trees.items():
                wall, steps, summary = run(src, Path(tmp, f"{name}{i}"), a.overrides)
                label = "warm-up" if a.warmup and i == 0 else f"run {i + (0 if a.warmup else 1)}"
                print(f"{label:8} {name:8} wall {wall:6.1f} s, RL steps {steps:6.1f} s  {summary}", flush=True)
                if not (a.warmup and i == 0):
                    times[name].append((wall, steps))
    med = {k: (statistics.median(w for w, _ in v), statistics.median(s for _, s in v)) for k, v in times.items()}
    for name, (wall, steps) in med.items():
        print(f"median {name:8} wall {wall:6.1f} s, RL steps {steps:6.1f} s")
    print(
        f"this / baseline: wall {med['this'][0] / med['baseline'][0]:.3f}, "
        f"RL steps {med['this'][1] / med['baseline'][1]:.3f}"
    )


if __name__ == "__main__":
    main()
