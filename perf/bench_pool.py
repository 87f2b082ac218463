"""LANPO experience pool at scale: insert throughput and query latencies of `reasonrl.lanpo.pool.ExperiencePool`.

Fills a pool in a temporary directory with `--entries` synthetic rollouts over `--problems` synthetic problems
(arithmetic "Q: a+b" style and templated word problems, 1 in 20 a near-duplicate of the one before), in batches of
`--batch` entries like a training step: `batch / group` problems per step, `group` rollouts each, problems drawn in
shuffled epochs like a data loader. Then, at that size, measures median latencies of the calls the trainer makes per
step, and the recall of `similar_problems` against a brute-force cosine over every live problem.

Usage: python perf/bench_pool.py [--entries 1000000] [--problems 200000] [--batch 128] [--group 4]
Retrieval p50 / p99 at three sizes (docs/performance.md):
    for n in 10000 100000 1000000; do python perf/bench_pool.py --entries $n --problems $((n / 5)); done
"""

from __future__ import annotations

import argparse
import math
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

from reasonrl.lanpo.pool import ExperiencePool, PoolEntry, idf, term_counts

NAMES = ["Tom", "Ann", "Luis", "Mei", "Omar", "Sara", "Ivan", "Zoe", "Kofi", "Lena"]
ITEMS = ["apples", "pencils", "marbles", "stamps", "coins", "books", "cookies", "cards"]
WORD_TEMPLATES = [
    "{name} has {a} {item} and buys {b} more. How many {item} does {name} have now?",
    "{name} had {a} {item} and gave {b} of them away. How many {item} are left?",
    "A box holds {a} {item}. How many {item} are in {b} boxes?",
    "{name} shares {a} {item} equally among {b} friends. How many {item} does each friend get?",
]
MODES = ("scratch", "scratch", "reflect", "abstract")
GAMMAS = (0.5, 0.9)  # the benchmark's brief, and LANPO's default
T = TypeVar("T")


def make_problem(i: int, rng: random.Random, earlier: list[str]) -> str:
    if earlier and i % 20 == 19:  # near-duplicates, as datasets have: the same text, or with a sentence more
        return earlier[-1] + rng.choice(["", " Show your work."])
    if i % 10 < 7:
        op = rng.choice("+-*")
        return f"Q: {rng.randint(0, 9999)}{op}{rng.randint(0, 9999)}"
    template = rng.choice(WORD_TEMPLATES)
    return template.format(name=rng.choice(NAMES), item=rng.choice(ITEMS), a=rng.randint(2, 999), b=rng.randint(2, 99))


def make_response(rng: random.Random, problem: str) -> str:
    answer = rng.randint(0, 10**6)
    filler = " ".join(rng.choice(["so", "then", "we", "add", "carry", "the", "digits", "check"]) for _ in range(30))
    return f"Let me solve: {problem} {filler}. The answer is {answer}."


def loader(n_problems: int, rng: random.Random) -> Iterator[int]:
    """Problem indices in shuffled epochs."""
    while True:
        order = list(range(n_problems))
        rng.shuffle(order)
        yield from order


def make_batch(ids: list[int], problems: list[str], step: int, group: int, rng: random.Random) -> list[PoolEntry]:
    batch = []
    for i in ids:
        for _ in range(group):
            response = make_response(rng, problems[i])
            reward = float(rng.random() < 0.4)
            batch.append(PoolEntry(f"p{i}", problems[i], response, reward, step, rng.choice(MODES), 40, 120))
    return batch


def times_ms(fn: Callable[[T], object], inputs: Sequence[T]) -> list[float]:
    """Wall time of fn(x) for each input, in milliseconds."""
    times = []
    for x in inputs:
        start = time.perf_counter()
        fn(x)
        times.append((time.perf_counter() - start) * 1e3)
    return times


def median_ms(fn: Callable[[T], object], inputs: Sequence[T]) -> float:
    """Median wall time of fn(x) over the inputs, in milliseconds."""
    return statistics.median(times_ms(fn, inputs))


def p50_p99_ms(fn: Callable[[T], object], inputs: Sequence[T]) -> str:
    """'p50 / p99' of fn(x) over the inputs (p99 by the nearest-rank method), in milliseconds."""
    t = sorted(times_ms(fn, inputs))
    return f"{statistics.median(t):.3f} / {t[min(len(t) - 1, math.ceil(0.99 * len(t)) - 1)]:.3f} ms"


def brute_force_recall(
    pool: ExperiencePool, texts: dict[str, str], queries: list[str], gammas: Sequence[float], top_k: int
) -> dict[float, float]:
    """Per gamma, the share of the exact top-k (cosine against every live problem) that similar_problems returns.

    A returned problem tied with the exact k-th one counts as a hit; gammas with no exact neighbour give nan.
    """
    docs = {pid: term_counts(text) for pid, text in texts.items()}
    df: dict[str, int] = {}
    for terms in docs.values():
        for t in terms:
            df[t] = df.get(t, 0) + 1
    n = len(docs)
    vectors = {}
    for pid, terms in docs.items():
        vec = {t: c * idf(n, df[t]) for t, c in terms.items()}
        norm = sum(w * w for w in vec.values()) ** 0.5
        vectors[pid] = {t: w / norm for t, w in vec.items()}
    wanted = dict.fromkeys(gammas, 0)
    found = dict.fromkeys(gammas, 0)
    for qid in queries:
        q = vectors[qid]
        all_sims = [
            (sum(w * vec[t] for t, w in q.items() if t in vec), pid) for pid, vec in vectors.items() if pid != qid
        ]
        for gamma in gammas:
            sims = [(sim, pid) for sim, pid in all_sims if sim > 0 and sim >= gamma]
            exact = sorted(sims, key=lambda item: (-item[0], item[1]))[:top_k]
            got = {pid for pid, _ in pool.similar_problems(texts[qid], exclude_id=qid, gamma=gamma, top_k=top_k)}
            wanted[gamma] += len(exact)
            found[gamma] += sum(1 for sim, pid in sims if pid in got and sim >= exact[-1][0] - 1e-12)
    return {gamma: found[gamma] / wanted[gamma] if wanted[gamma] else math.nan for gamma in gammas}


def file_mib(path: Path) -> float:
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*")) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--problems", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=128, help="entries per add() call (one training step)")
    parser.add_argument("--group", type=int, default=4, help="rollouts per problem in a batch")
    parser.add_argument("--max-per-problem", type=int, default=8)
    parser.add_argument("--max-size", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=1000, help="retrieval queries timed (p50 / p99)")
    parser.add_argument("--recall", type=int, default=50, help="queries checked against brute-force cosine (0: skip)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.batch % args.group:
        parser.error("--batch must be a multiple of --group")

    rng = random.Random(args.seed)
    problems: list[str] = []
    for i in range(args.problems):
        problems.append(make_problem(i, rng, problems))
    order = loader(args.problems, rng)
    per_step = args.batch // args.group
    steps = -(-args.entries // args.batch)  # at least --entries, so a full pool also evicts globally

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "pool.db"
        pool = ExperiencePool(path, max_per_problem=args.max_per_problem, max_size=args.max_size)
        add_seconds = 0.0
        wall = time.perf_counter()
        for step in range(1, steps + 1):
            batch = make_batch([next(order) for _ in range(per_step)], problems, step, args.group, rng)
            start = time.perf_counter()
            pool.add(batch)
            add_seconds += time.perf_counter() - start
            if step % 1000 == 0:
                print(f"  step {step}/{steps}: {pool.stats()['size']:.0f} live entries", file=sys.stderr, flush=True)
        wall = time.perf_counter() - wall
        stats = pool.stats()
        size_before = file_mib(path)

        # Per-step calls at this size; the pool stays full, so every add below also evicts.
        present = [row[0] for row in pool.problem_attempts(limit=args.problems)]
        rng.shuffle(present)
        probe = present[: args.queries]
        step = steps + 1
        t_earlier = median_ms(lambda pid: pool.earlier_attempts(pid, before_step=step, limit=1), probe)
        t_similar, hits = {}, {}
        for gamma in GAMMAS:
            hits[gamma] = sum(
                bool(pool.similar_problems(problems[int(pid[1:])], exclude_id=pid, gamma=gamma, top_k=4))
                for pid in probe
            )
            t_similar[gamma] = p50_p99_ms(
                lambda pid, g=gamma: pool.similar_problems(problems[int(pid[1:])], exclude_id=pid, gamma=g, top_k=4),
                probe,
            )
        recall = dict.fromkeys(GAMMAS, math.nan)
        if args.recall:
            texts = {pid: problems[int(pid[1:])] for pid in present}
            recall = brute_force_recall(pool, texts, probe[: args.recall], GAMMAS, top_k=4)
        t_traj = median_ms(lambda pid: pool.trajectories([pid, *probe[:3]], per_problem=2), probe)
        t_lesson = median_ms(pool.get_lesson, probe)
        t_stats = median_ms(lambda _: pool.stats(), range(5))
        # Half the batch revisits problems already holding max_per_problem attempts (per-problem eviction), half
        # continues the loader (global eviction at max_size).
        full = [int(pid[1:]) for pid, n, _ in pool.problem_attempts(limit=10_000) if n >= args.max_per_problem]
        adds = []
        for _ in range(50):
            ids = [next(order) for _ in range(per_step // 2)] + rng.sample(full, per_step - per_step // 2)
            adds.append(make_batch(ids, problems, step, args.group, rng))
            step += 1
        t_add = median_ms(pool.add, adds)
        evicting = "per-problem + global eviction" if stats["size"] >= args.max_size else "per-problem eviction"
        last = step - 1
        t_checkpoint = median_ms(pool.checkpointed, [last - 5])
        t_rollback = median_ms(pool.rollback, [last - 5])
        size_after = file_mib(path)
        pool.close()

    rows = [
        ("entries inserted", f"{steps * args.batch:,}"),
        ("distinct problems (synthetic)", f"{args.problems:,}"),
        ("live entries after fill", f"{stats['size']:,.0f}"),
        ("problems with live entries", f"{stats['problems']:,.0f}"),
        (f"insert throughput (add() of {args.batch})", f"{steps * args.batch / add_seconds:,.0f} entries/s"),
        ("fill wall time (incl. data generation)", f"{wall:,.1f} s"),
        ("earlier_attempts(limit=1)", f"{t_earlier:.3f} ms"),
        *[
            row
            for g in GAMMAS
            for row in (
                (f"similar_problems(gamma={g}, top_k=4) p50 / p99, {hits[g]}/{len(probe)} found some", t_similar[g]),
                (f"  top-4 recall vs brute-force cosine, {args.recall} queries", f"{recall[g]:.1%}"),
            )
        ],
        ("trajectories(4 problems, 2 each)", f"{t_traj:.3f} ms"),
        ("get_lesson (miss)", f"{t_lesson:.3f} ms"),
        (f"add() of {args.batch} after the fill ({evicting})", f"{t_add:.3f} ms"),
        ("stats()", f"{t_stats:.1f} ms"),
        ("checkpointed() 45 evicting steps later", f"{t_checkpoint:.1f} ms"),
        ("rollback() of 5 steps", f"{t_rollback:.1f} ms"),
        ("DB file size (db + wal) after fill", f"{size_before:,.1f} MiB"),
        ("DB file size at the end", f"{size_after:,.1f} MiB"),
    ]
    width = max(len(name) for name, _ in rows)
    print(
        f"ExperiencePool benchmark (median latencies unless stated; {os.cpu_count()} CPUs, "
        f"Python {sys.version.split()[0]})"
    )
    for name, value in rows:
        print(f"  {name:<{width}}  {value:>18}")


if __name__ == "__main__":
    main()
