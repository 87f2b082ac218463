"""LANPO retrieval latency at scale, per retriever: `ExperiencePool.similar_problems` (lexical and embedding).

Fills one pool with `--entries` synthetic rollouts, `--per-problem` per problem (bench_pool.py's problem texts:
arithmetic and templated word problems, 1 in 20 a near-duplicate). The vectors come from a stand-in embedder (a
unit vector per text, seeded by its hash, at MiniLM's 384 dimensions) so that 200k problems are "embedded" in
seconds; they still go through the pool's write path (`add` -> float32 BLOBs in SQLite). Then, on `--queries`
problems of the pool, it times the real query path of each retriever: `similar_problems` one query at a time
(p50 / p99, γ 0.5 and 0.9, top-4; the query's own vector read back from SQLite, as for a problem seen before), the
embedding retriever's first query (loading its matrix from SQLite), and `search_many` over `--step` queries (what
a training step calls) per query. The cost of embedding a new query with the real model is timed apart (`--model`).

Usage: python perf/bench_retrieval.py [--entries 100000 1000000] [--per-problem 5] [--queries 300] [--model]
The worst case, one problem per entry: python perf/bench_retrieval.py --entries 1000000 --per-problem 1
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np

from reasonrl.lanpo.embedding import unit_rows
from reasonrl.lanpo.pool import ExperiencePool, PoolEntry

sys.path.insert(0, str(Path(__file__).parent))
from bench_pool import make_problem  # noqa: E402  (the same synthetic problems as the pool benchmark)

GAMMAS = (0.5, 0.9)
T = TypeVar("T")


class HashEmbedder:
    """Stand-in for the sentence model when filling: a fixed unit vector per text, thousands per second."""

    name = "bench-hash-384"
    dim = 384

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        seeds = [int.from_bytes(hashlib.sha256(t.encode()).digest()[:8], "little") for t in texts]
        return unit_rows(np.stack([np.random.default_rng(s).standard_normal(self.dim) for s in seeds]))


def p50_p99(times: list[float]) -> str:
    """'p50 / p99' in milliseconds (p99 by nearest rank)."""
    t = sorted(times)
    return f"{statistics.median(t) * 1e3:.2f} / {t[min(len(t) - 1, math.ceil(0.99 * len(t)) - 1)] * 1e3:.2f}"


def timed(fn: Callable[[T], object], inputs: Sequence[T]) -> list[float]:
    out = []
    for x in inputs:
        start = time.perf_counter()
        fn(x)
        out.append(time.perf_counter() - start)
    return out


def fill(path: Path, entries: int, per_problem: int, rng: random.Random) -> list[str]:
    """Problem texts; the pool at `path` gets `per_problem` entries of each, 2,560 entries per `add`."""
    problems: list[str] = []
    for i in range(entries // per_problem):
        problems.append(make_problem(i, rng, problems))
    pool = ExperiencePool(path, max_per_problem=per_problem, max_size=entries, embedder=HashEmbedder())
    per_add = max(1, 2560 // per_problem)
    for step, start in enumerate(range(0, len(problems), per_add), 1):
        pool.add(
            [
                PoolEntry(f"p{i}", problems[i], f"attempt {k}", float(k % 2), step, "scratch", 40, 120)
                for i in range(start, min(len(problems), start + per_add))
                for k in range(per_problem)
            ]
        )
        if step % 50 == 0:
            print(f"  {start + per_add:,} / {len(problems):,} problems", file=sys.stderr, flush=True)
    pool.close()
    return problems


def measure(path: Path, problems: list[str], args: argparse.Namespace, rng: random.Random) -> dict[str, str]:
    probe = rng.sample(range(len(problems)), args.queries)
    out: dict[str, str] = {}
    for retriever, embedder in (("lexical", None), ("embedding", HashEmbedder())):
        with ExperiencePool(path, embedder=embedder) as pool:
            if embedder is not None:
                start = time.perf_counter()
                pool.similar_problems(problems[probe[0]], exclude_id=f"p{probe[0]}", gamma=0.9, top_k=4)
                out["embedding: first query (matrix loaded from SQLite)"] = f"{time.perf_counter() - start:.2f} s"
                out["embedding: matrix in memory"] = f"{len(pool._index) * embedder.dim * 4 / 2**20:,.0f} MiB"
            for gamma in GAMMAS:
                times = timed(
                    lambda i, g=gamma: pool.similar_problems(problems[i], exclude_id=f"p{i}", gamma=g, top_k=4), probe
                )
                out[f"{retriever}: similar_problems γ={gamma} p50 / p99 ms"] = p50_p99(times)
            batches = [probe[s : s + args.step] for s in range(0, len(probe) - args.step + 1, args.step)]
            times = timed(lambda b: pool.search_many([(f"p{i}", problems[i]) for i in b], gamma=0.9, top_k=4), batches)
            out[f"{retriever}: search_many of {args.step} γ=0.9, per query, median ms"] = (
                f"{statistics.median(times) / args.step * 1e3:.2f}"
            )
    return out


def model_costs(queries: list[str], threads: int) -> dict[str, str]:
    """Embedding new query texts with the real model (all-MiniLM-L6-v2, CPU): one at a time, and batched."""
    import torch

    from reasonrl.lanpo.embedding import load_embedder

    torch.set_num_threads(threads)
    model = load_embedder("all-MiniLM-L6-v2")
    model.encode(queries[:8])  # warm-up
    single = timed(lambda q: model.encode([q]), queries[:50])
    start = time.perf_counter()
    model.encode(queries[:256])
    batched = (time.perf_counter() - start) / len(queries[:256])
    return {
        f"MiniLM encode ({threads} torch threads), one query p50 / p99 ms": p50_p99(single),
        f"MiniLM encode ({threads} torch threads), batches of 64, per query ms": f"{batched * 1e3:.2f}",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entries", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--per-problem", type=int, default=5, help="entries per problem (bench_pool.py's ratio)")
    parser.add_argument("--queries", type=int, default=300, help="queries timed per retriever and γ")
    parser.add_argument("--step", type=int, default=64, help="queries per search_many call (a step's problems)")
    parser.add_argument("--model", action="store_true", help="also time the real MiniLM on the query texts")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the model timing")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    table: dict[str, dict[str, str]] = {}
    problems: list[str] = []
    for entries in args.entries:
        rng = random.Random(args.seed)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "pool.sqlite"
            start = time.perf_counter()
            problems = fill(path, entries, args.per_problem, rng)
            fill_s = time.perf_counter() - start
            label = f"{entries:,} entries / {len(problems):,} problems"
            table[label] = {"fill (add, incl. stand-in embedding)": f"{fill_s:.0f} s"}
            table[label].update(measure(path, problems, args, rng))
    if args.model:
        table["model"] = model_costs(problems[: max(args.queries, 256)], args.threads)

    print(f"LANPO retrieval benchmark ({os.cpu_count()} CPUs, Python {sys.version.split()[0]}, numpy {np.__version__})")
    for label, rows in table.items():
        print(f"\n{label}")
        width = max(len(name) for name in rows)
        for name, value in rows.items():
            print(f"  {name:<{width}}  {value:>16}")


if __name__ == "__main__":
    main()
