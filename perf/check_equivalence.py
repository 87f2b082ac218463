"""Acceptance check (4): a fixed-seed training run's metrics, optimised code against unoptimised code.

Runs the same fixed-seed run (the embedded default unless overridden: warm-started tiny model, 16 prompts x 8
completions, math_answer + format rewards) for `--steps` steps with:

- the unoptimised code: a source tree given by `--baseline-src` (for example the commit before the performance work,
  `mkdir /tmp/base && git archive <commit> | tar -x -C /tmp/base`, then `--baseline-src /tmp/base`), with its only
  engine, `transformers.generate`;
- this checkout with `rollout.engine=hf` (transformers.generate, optimised log-prob and update passes);
- this checkout with `rollout.engine=fast` (the default).

Both runs of this checkout warm-start with `warmstart.micro_tokens=0`, the unoptimised code's one-pass SFT.

Each run is a child process (`PYTHONPATH` chooses the source tree) that writes its per-step metrics and final
weights. Every metric of every step is compared with the baseline's:

- from the samples (rewards, accuracy, lengths, truncation, token counts, zero-std groups): equal;
- advantage statistics: equal to float32 rounding (|a - b| <= 1e-6 |b|): the baseline averaged them in float32,
  this code in float64;
- from the update (loss, entropy, grad_norm, clip fractions, ratio, kl, lr): |a - b| <= 1e-6 + 1e-4 |b|;
- timings (`time/*`, `tokens_per_s`) are not compared.

The final weights are compared too (max |difference|). Greedy decoding is checked token for token elsewhere
(tests/test_rollout_fast.py); with the same seed the fast engine draws the same samples as `generate` (it consumes
the RNG identically), which is why sampled runs can be compared step by step here.

    python perf/check_equivalence.py --baseline-src /tmp/base --steps 10
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

SAMPLE_METRICS = (
    "reward/",
    "accuracy",
    "completion/",
    "tokens/generated",
    "zero_std_groups",
    "groups",
    "advantage/",
    "dynamic_sampling/",
)
FLOAT32_ROUNDED = ("advantage/",)  # sample metrics averaged in float32 by the baseline, in float64 here
RTOL, ATOL = 1e-4, 1e-6
# The RL step is what is compared: this checkout warm-starts the tiny model in one pass, as the unoptimised code did
# (bit for bit), not in its faster length-sorted micro-batches (the same weights up to float rounding).
SAME_WARMSTART = ["warmstart.micro_tokens=0"]

CHILD = r"""
import json, sys, tempfile, torch
from pathlib import Path
from reasonrl.config import load_config
try:  # the redesigned layout: Trainer.step() takes a step
    from reasonrl.training.trainer import Trainer
    take_step = Trainer.step
except ImportError:  # earlier trees: Trainer.train_step(), then the caller counts the step
    from reasonrl.trainer import Trainer
    take_step = Trainer.train_step

def main():
    out, steps, threads, overrides = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(None, [*overrides, f"train.output_dir={tmp}", "train.tensorboard=false"])
        trainer = Trainer(cfg, Path(tmp) / "run")
        metrics = []
        try:
            for _ in range(steps):
                metrics.append(take_step(trainer))
                if hasattr(trainer, "global_step"):
                    trainer.global_step += 1
                else:
                    trainer.step += 1
        finally:
            trainer.close()
        Path(out, "metrics.json").write_text(json.dumps(metrics))
        torch.save({k: v.detach().clone() for k, v in trainer.model.named_parameters()}, Path(out, "weights.pt"))

if __name__ == "__main__":
    main()
"""


def run(name: str, src: Path, out: Path, steps: int, threads: int, overrides: list[str]) -> tuple[list[dict], dict]:
    import torch

    out.mkdir(parents=True)
    script = out / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": str(threads)}
    res = subprocess.run(
        [sys.executable, str(script), str(out), str(steps), str(threads), *overrides],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if res.returncode:
        raise SystemExit(f"{name} run failed:\n{res.stderr[-4000:]}")
    return json.loads((out / "metrics.json").read_text()), torch.load(out / "weights.pt")


def compare(name: str, runs: list[dict], base: list[dict]) -> tuple[bool, list[str]]:
    ok, lines = True, []
    worst: dict[str, float] = {}
    for step, (a, b) in enumerate(zip(runs, base, strict=True), start=1):
        for key, ref in b.items():
            if key.startswith("time/") or key == "tokens_per_s" or not isinstance(ref, (int, float)):
                continue
            if key not in a:
                ok = False
                lines.append(f"  step {step}: {key} missing")
                continue
            val = a[key]
            exact = key.startswith(SAMPLE_METRICS)
            diff = abs(val - ref) if not (math.isnan(val) and math.isnan(ref)) else 0.0
            if key.startswith(FLOAT32_ROUNDED):
                diff = diff if diff > 1e-6 * abs(ref) else 0.0
            bad = diff > 0 if exact else diff > ATOL + RTOL * abs(ref)
            rel = diff / max(abs(ref), 1e-3)  # relative, or absolute for values near zero (e.g. the loss)
            worst[key] = max(worst.get(key, 0.0), rel if not exact else diff)
            if bad:
                ok = False
                lines.append(
                    f"  step {step}: {key} = {val!r}, baseline {ref!r} ({'must be equal' if exact else 'rel'})"
                )
    floats = {k: v for k, v in worst.items() if not k.startswith(SAMPLE_METRICS)}
    top = sorted(floats.items(), key=lambda kv: -kv[1])[:6]
    summary = ", ".join(f"{k} {v:.1e}" for k, v in top)
    exact_keys = [k for k in worst if k.startswith(SAMPLE_METRICS)]
    lines.insert(
        0,
        f"{name}: {len(runs)} steps, {len(exact_keys)} sample metrics "
        f"{'all equal' if all(worst[k] == 0 for k in exact_keys) else 'DIFFER'}; largest differences of update "
        f"metrics (relative; absolute below 1e-3): {summary}",
    )
    return ok, lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline-src", required=True, help="root of the unoptimised source tree (holds src/reasonrl)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--one-pass-warmstart",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="warm-start this checkout in one pass (warmstart.micro_tokens=0), as code before that option did; "
        "--no-one-pass-warmstart when the baseline has the option too (e.g. the commit before a refactor)",
    )
    ap.add_argument("overrides", nargs="*", help="dotted config overrides for every run (default: embedded default)")
    a = ap.parse_args()
    here = Path(__file__).resolve().parents[1] / "src"
    base_src = Path(a.baseline_src).resolve() / "src"
    if not (base_src / "reasonrl").is_dir():
        raise SystemExit(f"{base_src / 'reasonrl'} not found")
    with tempfile.TemporaryDirectory(prefix="equivalence-") as tmp:
        base, base_w = run("baseline", base_src, Path(tmp, "base"), a.steps, a.threads, a.overrides)
        results = [
            (f"rollout.engine={engine}", *run(engine, here, Path(tmp, engine), a.steps, a.threads,
                                               [*a.overrides, *(SAME_WARMSTART if a.one_pass_warmstart else []),
                                                f"rollout.engine={engine}"]))
            for engine in ("hf", "fast")
        ]  # fmt: skip
    all_ok = True
    print(
        f"baseline {a.baseline_src}: reward/mean per step "
        + " ".join(f"{m['reward/mean']:.3f}" for m in base)
        + f"; median time/step {statistics.median(m['time/step'] for m in base) * 1000:.0f} ms"
    )
    for name, metrics, weights in results:
        ok, lines = compare(name, metrics, base)
        diff = max(float((weights[k].float() - base_w[k].float()).abs().max()) for k in base_w)
        lines.append(f"  final weights: max |difference| {diff:.2e} (of max |weight| "
                     f"{max(float(v.abs().max()) for v in base_w.values()):.2f})")  # fmt: skip
        lines.append(f"  median time/step {statistics.median(m['time/step'] for m in metrics) * 1000:.0f} ms")
        print("\n".join(lines))
        all_ok &= ok
    print(
        f"tolerance: sample metrics equal (advantages to float32 rounding); update metrics |a-b| <= {ATOL} + "
        f"{RTOL}|b|: {'MET' if all_ok else 'NOT MET'}"
    )


if __name__ == "__main__":
    main()
