"""Cost of the SPEC §4 LamPO advantage next to a real training step of the embedded default config.

Acceptance target: LamPO advantages for 1,024 groups of 16 (16,384 sequences, 245,760 ordered pairs) take under 1 % of
one training step of the embedded default (`algorithm.advantage=lampo`, otherwise the built-in defaults: tiny model,
16 prompts x 8 completions per step). Note the two sizes differ: the advantage is timed on a batch 128 times larger
than the one the step itself processes; the step's own advantage stage (16 x 8, with LamPO's metrics) is reported too.

Everything is measured in one process, interleaved, so that load from other processes hits both sides alike: after
one untimed warm-up step, each round times one `Trainer.step()` and then a few calls of every weight x
normalize combination of the advantage on synthetic data (binary rewards plus noise, shuffled group ids). Reported:
medians, and per combination the ratio advantage time / median step time as a percentage.

The first run of the embedded default warm-starts the tiny model (about 1-2 minutes on CPU), then caches it in
~/.cache/reasonrl. `--device cuda` runs both the advantage and the trainer (`model.device=cuda`; the tiny model then
loads in bf16 by `model.dtype=auto`) on the GPU; CUDA is synchronised before each clock read.

Usage: python perf/bench_lampo.py [--groups 1024] [--group-size 16] [--runs 20] [--steps 5] [--device cpu]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from reasonrl.algorithms import compute_advantages
from reasonrl.config import load_config
from reasonrl.training.trainer import Trainer

TARGET = 0.01  # advantage time / step time
WEIGHTS = ("confidence", "preference", "lambdarank")
NORMALIZE = ("weights", "pairs", "none")


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_advantage(rewards, group_ids, seq_scores, weight: str, normalize: str, device: str) -> float:
    sync(device)
    start = time.perf_counter()
    compute_advantages("lampo", rewards, group_ids, seq_scores=seq_scores, weight=weight, normalize=normalize)
    sync(device)
    return time.perf_counter() - start


def time_step(trainer: Trainer, device: str) -> tuple[float, dict[str, float]]:
    sync(device)
    start = time.perf_counter()
    metrics = trainer.step()
    sync(device)
    return time.perf_counter() - start, metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--groups", type=int, default=1024)
    parser.add_argument("--group-size", type=int, default=16)
    parser.add_argument("--runs", type=int, default=20, help="timed advantage calls per combination (in all)")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps (after 1 untimed warm-up step)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N, for the advantage and the trainer")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    gen = torch.Generator().manual_seed(0)
    n = args.groups * args.group_size
    rewards = (torch.rand(n, generator=gen) < 0.4).float() + 0.1 * torch.rand(n, generator=gen)
    group_ids = torch.randperm(n, generator=gen) % args.groups  # shuffled, as a real batch may be
    seq_scores = -2 * torch.rand(n, generator=gen)
    rewards, group_ids, seq_scores = (t.to(args.device) for t in (rewards, group_ids, seq_scores))
    combos = [(w, z) for w in WEIGHTS for z in NORMALIZE]
    per_round = math.ceil(args.runs / args.steps)

    with tempfile.TemporaryDirectory() as tmpdir:
        overrides = [
            "train.tensorboard=false",
            f"train.output_dir={tmpdir}",
            "algorithm.advantage=lampo",
            f"model.device={args.device}",
        ]
        cfg = load_config(None, overrides)
        trainer = Trainer(cfg, Path(tmpdir) / "run")  # warm-starts the tiny model on first use (then cached)
        try:
            load_start = os.getloadavg()[0]
            trainer.step()  # untimed warm-up step
            for weight, normalize in combos:  # untimed warm-up of each combination
                time_advantage(rewards, group_ids, seq_scores, weight, normalize, args.device)
            step_times, stage_adv, adv_times = [], [], {c: [] for c in combos}
            for _ in range(args.steps):
                seconds, metrics = time_step(trainer, args.device)
                step_times.append(seconds)
                stage_adv.append(metrics.get("time/advantages", float("nan")))
                for combo in combos:
                    adv_times[combo] += [
                        time_advantage(rewards, group_ids, seq_scores, *combo, args.device) for _ in range(per_round)
                    ]
            load_end = os.getloadavg()[0]
        finally:
            trainer.close()

    r = cfg.rollout
    step = statistics.median(step_times)
    in_step = statistics.median(stage_adv)
    print(
        f"device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} torch threads, "
        f"{os.cpu_count()} CPUs, 1-min load average {load_start:.2f} at start, {load_end:.2f} at end"
    )
    print(
        f"training step (embedded default, algorithm.advantage=lampo: {r.prompts_per_step} prompts x {r.group_size} "
        f"completions, max_new_tokens {r.max_new_tokens}): median of {args.steps} = {step * 1e3:.1f} ms "
        f"(all: {', '.join(f'{t * 1e3:.0f}' for t in step_times)} ms)"
    )
    print(
        f"  its own advantage stage ({r.prompts_per_step} x {r.group_size}, incl. LamPO metrics): "
        f"{in_step * 1e3:.2f} ms = {100 * in_step / step:.3f} % of the step"
    )
    print(
        f"LamPO advantages, {args.groups} groups of {args.group_size} ({n} sequences), shuffled group ids; "
        f"median of {per_round * args.steps} runs, interleaved with the steps:"
    )
    worst = 0.0
    for weight, normalize in combos:
        adv = statistics.median(adv_times[(weight, normalize)])
        worst = max(worst, adv / step)
        share = 100 * adv / step
        print(f"  weight={weight:<10} normalize={normalize:<7} {adv * 1e3:8.2f} ms = {share:6.2f} % of a step")
    verdict = "MET" if worst < TARGET else "NOT MET"
    print(f"target: {args.groups}x{args.group_size} advantage < {100 * TARGET:.0f} % of a step, worst combination "
          f"{100 * worst:.2f} %: {verdict}")  # fmt: skip


if __name__ == "__main__":
    main()
