"""LANPO experience pool (SPEC §5): every scored rollout, in one embedded SQLite file.

The pool is training state: `rollback(step)` makes it exactly what it was right after step `step`, so a run resumed
from a checkpoint sees the same pool as an uninterrupted one.

Eviction rule (applied at the end of every `add`, deterministically):
  1. per problem, only the newest `max_per_problem` live attempts are kept (newer = higher `step`, ties broken by
     insertion order);
  2. then, globally, at most `max_size` live entries are kept, evicting the oldest (lowest `step`, then earliest
     inserted) first.
Eviction is logical: an evicted row gets `evicted_at` = the step of the `add` that evicted it (the highest step among
the entries added), so `rollback` can restore it. `checkpointed(step)` physically deletes rows evicted at or before a
step known to be checkpointed; a rollback below the last checkpointed step is refused.

Retrieval (`similar_problems`) is lexical. Terms: lowercase ASCII words `[a-z0-9]+`; for every run of digits, one
term per digit and place value (`"347"` adds `3@2`, `4@1`, `7@0`), so "347+589" and "347+588" get a graded
similarity instead of 0; and one term per arithmetic operator (`@plus`, `@times`, ...) so that "347+589" and
"347*589" differ. Non-ASCII letters give no terms. Similarity is the cosine of TF-IDF vectors (raw counts times
`idf = ln((1 + N) / (1 + df))`, plus 1, with N and df over the problems that have live entries), hence in [0, 1].
Candidates come from an SQLite FTS5 index (no fallback: this module needs FTS5) of the problems with live entries,
used for its compressed posting lists: every problem sharing a chosen query term is ranked by its partial dot
product over those terms, and the best `max(200, 50 * top_k)` get their exact cosine, computed in Python from their
stored term counts. The chosen terms leave out the commonest query terms as long as their share of the query's norm
stays below gamma (prefix filtering: a problem sharing none of the remaining terms cannot reach gamma), which keeps
long posting lists out of most queries; past `search_budget` postings only the rarest remaining terms are kept.
Results are exact while neither that budget nor the candidate count cuts anything, approximate (but fast) beyond.
Document frequencies live in a table kept in step with the index (FTS5's vocabulary table scans posting lists).
"""

from __future__ import annotations

import hashlib
import heapq
import json
import math
import re
import sqlite3
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import TypeVar

from reasonrl.config import LANPO_MODES as MODES  # SPEC §5 context modes

__all__ = ["MODES", "ExperiencePool", "PoolEntry", "idf", "term_counts", "tokenize"]

_SCHEMA_VERSION = 1
_CHUNK = 500  # ids per `IN (...)` list, well below SQLite's bound-parameter limit
_TOKEN = re.compile("[a-z0-9]+|[-+*/^=<>%\u00d7\u00f7]")
_OPERATORS = {
    "+": "@plus",
    "-": "@minus",
    "*": "@times",
    "\u00d7": "@times",  # multiplication sign
    "/": "@div",
    "\u00f7": "@div",  # division sign
    "^": "@pow",
    "=": "@eq",
    "<": "@lt",
    ">": "@gt",
    "%": "@pct",
}
_DIGITS = re.compile(r"[0-9]+")
_T = TypeVar("_T")
# Candidates scored exactly per query: the ranking before that sees only the chosen terms, so it is rough. With 200,
# top-4 recall against brute force was 97% at gamma 0.5 and 0.7, 100% at 0.9, on 200k synthetic problems
# (perf/bench_pool.py); 50 lost up to a third at gamma 0.7.
_MIN_CANDIDATES = 200
_CANDIDATES_PER_K = 50
_SIM_SLACK = 1e-12  # so that gamma = 1.0 still accepts identical texts despite rounding
_PID_MASK = (1 << 63) - 1


def tokenize(text: str) -> list[str]:
    """Similarity terms of `text`: words, per-place digits and operators (see the module docstring)."""
    lowered = text.lower()
    terms: list[str] = []
    for match in _TOKEN.finditer(lowered):
        token = match.group()
        operator = _OPERATORS.get(token)
        terms.append(operator if operator is not None else token)
    for run in _DIGITS.findall(lowered):
        places = len(run) - 1
        terms.extend(f"{digit}@{places - i}" for i, digit in enumerate(run))
    return terms


def term_counts(text: str) -> dict[str, int]:
    """Term -> count, keys sorted (the stored form, so it serialises canonically)."""
    return dict(sorted(Counter(tokenize(text)).items()))


def idf(n_problems: int, df: int) -> float:
    """Smoothed IDF: positive for every term, so TF-IDF cosines stay in [0, 1]."""
    return math.log((1 + n_problems) / (1 + df)) + 1.0


@dataclass(frozen=True)
class PoolEntry:
    """One scored rollout, as the trainer records it."""

    problem_id: str
    problem: str  # the plain prompt text
    response: str
    reward: float
    step: int  # training step it was sampled at
    mode: str  # one of MODES
    prompt_tokens: int
    response_tokens: int

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"PoolEntry.mode must be one of {MODES}, got {self.mode!r}")
        # SQLite stores NaN as NULL; a non-finite reward is a bug upstream anyway.
        if not math.isfinite(self.reward):
            raise ValueError(f"PoolEntry.reward must be finite, got {self.reward!r}")


@dataclass
class _Delta:
    """Net change of one write to the live entries: per problem, per mode, and reward value -> count."""

    per_problem: Counter[int] = field(default_factory=Counter)
    per_mode: Counter[str] = field(default_factory=Counter)
    rewards: Counter[float] = field(default_factory=Counter)

    def count(self, pid: int, mode: str, reward: float, sign: int) -> None:
        self.per_problem[pid] += sign
        self.per_mode[mode] += sign
        self.rewards[reward] += sign


_SCHEMA = """
-- counters and totals of the live entries (reward_sum: an exact fraction, so it is independent of update order)
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value NOT NULL);
-- one row per problem id that still has entry rows (live, or evicted but not yet purged):
-- the problem is in problem_index (rowid = pid) and counted in terms.df iff live > 0
CREATE TABLE IF NOT EXISTS problems (
    pid INTEGER PRIMARY KEY,
    problem_id TEXT NOT NULL UNIQUE,
    text TEXT NOT NULL,
    terms TEXT NOT NULL,
    live INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS entries (
    id INTEGER PRIMARY KEY,
    pid INTEGER NOT NULL,
    response TEXT NOT NULL,
    reward REAL NOT NULL,
    step INTEGER NOT NULL,
    mode TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    response_tokens INTEGER NOT NULL,
    added_at INTEGER NOT NULL,
    evicted_at INTEGER
);
CREATE INDEX IF NOT EXISTS entries_live_by_problem ON entries(pid, step, id) WHERE evicted_at IS NULL;
CREATE INDEX IF NOT EXISTS entries_live_by_age ON entries(step, id) WHERE evicted_at IS NULL;
CREATE INDEX IF NOT EXISTS entries_added ON entries(added_at);
CREATE INDEX IF NOT EXISTS entries_evicted ON entries(pid, evicted_at) WHERE evicted_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS terms (term TEXT PRIMARY KEY, df INTEGER NOT NULL) WITHOUT ROWID;
-- lessons keep every version so that rollback can restore an overwritten one, and the newest (highest seq) is visible
CREATE TABLE IF NOT EXISTS lessons (
    seq INTEGER PRIMARY KEY, key TEXT NOT NULL, step INTEGER NOT NULL, text TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS lessons_by_key ON lessons(key, seq);
CREATE VIRTUAL TABLE IF NOT EXISTS problem_index USING fts5(
    terms, content='', detail=none, tokenize="ascii tokenchars '@'"
);
"""


def _chunks(items: Sequence[_T]) -> Iterator[Sequence[_T]]:
    for start in range(0, len(items), _CHUNK):
        yield items[start : start + _CHUNK]


def _marks(n: int) -> str:
    return ",".join("?" * n)


def _hash_pid(problem_id: str) -> int:
    """A problem's row id from its id alone, not from history: retrieval breaks score ties by it, and a resumed run
    (whose purges and rollbacks may differ) must break them the same way."""
    return int.from_bytes(hashlib.sha256(problem_id.encode()).digest()[:8], "big") & _PID_MASK


def _index_doc(terms: dict[str, int]) -> str:
    # Distinct terms, sorted: regenerable from `problems.terms`, which a contentless FTS5 delete needs.
    return " ".join(terms)


class ExperiencePool:
    """LANPO's experience pool, an SQLite file (WAL journal, synchronous=NORMAL); see the module docstring."""

    def __init__(
        self,
        path: str | Path,
        *,
        max_per_problem: int = 8,
        max_size: int = 1_000_000,
        search_budget: int = 10_000,
        read_only: bool = False,
    ) -> None:
        """`read_only`: a reader of a pool another process owns (multi-process training); SQLite refuses its writes
        and WAL lets it read while the owner writes."""
        if max_per_problem < 1 or max_size < 1:
            raise ValueError(f"max_per_problem and max_size must be >= 1, got {max_per_problem}, {max_size}")
        self.path = Path(path)
        self.max_per_problem = max_per_problem
        self.max_size = max_size
        # Postings one similar_problems query may read (~0.5 us each): caps its latency, at some recall (module doc).
        self.search_budget = search_budget
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Autocommit mode: transactions are explicit (`_write`), so each `add` is exactly one transaction.
        self._db = sqlite3.connect(self.path, isolation_level=None)
        try:
            self._db.execute("CREATE VIRTUAL TABLE temp.fts5_probe USING fts5(x)").close()
            self._db.execute("DROP TABLE temp.fts5_probe")
        except sqlite3.OperationalError as err:
            self._db.close()
            raise RuntimeError("the LANPO experience pool needs an SQLite build with FTS5") from err
        self._db.execute("PRAGMA busy_timeout=60000")  # wait for the owner's write transaction instead of failing
        if read_only:
            self._db.execute("PRAGMA query_only=ON")
        else:
            self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA cache_size=-65536")  # 64 MiB: the live indexes of a 1M-entry pool stay cached
        self._db.execute("PRAGMA temp_store=MEMORY")
        # Checkpoint the WAL every ~40 MiB rather than 4: each checkpoint syncs, and steps write scattered pages.
        self._db.execute("PRAGMA wal_autocheckpoint=10000")
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version not in (0, _SCHEMA_VERSION):
            self._db.close()
            raise RuntimeError(f"{self.path}: pool schema version {version}, this code reads {_SCHEMA_VERSION}")
        if version == 0:  # a new file (an existing one is opened without writing: `reasonrl pool` reads a live run)
            with self._write() as cur:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        cur.execute(statement)
                cur.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")

    # -- plumbing ---------------------------------------------------------------------------------------------------

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Cursor]:
        cur = self._db.cursor()
        cur.execute("BEGIN IMMEDIATE")
        try:
            yield cur
        except BaseException:
            cur.execute("ROLLBACK")
            raise
        else:
            cur.execute("COMMIT")
        finally:
            cur.close()

    def _meta(self, key: str, cur: sqlite3.Cursor | None = None) -> int | str | None:
        row = (cur or self._db).execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def _counter(self, key: str, cur: sqlite3.Cursor | None = None) -> int:
        return int(self._meta(key, cur) or 0)

    def _reward_sum(self, cur: sqlite3.Cursor | None = None) -> Fraction:
        return Fraction(str(self._meta("reward_sum", cur) or "0"))

    @staticmethod
    def _set_meta(cur: sqlite3.Cursor, key: str, value: int | str) -> None:
        cur.execute(
            "INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    def _apply(self, cur: sqlite3.Cursor, delta: _Delta) -> None:
        """Apply `delta` to problems' live counts and the meta totals; (un)index problems whose count crosses zero."""
        changed = sorted(pid for pid, d in delta.per_problem.items() if d)
        updates: list[tuple[int, int]] = []
        index_rows: list[tuple[int, str]] = []
        unindex_rows: list[tuple[int, str]] = []
        df_up: list[tuple[str]] = []
        df_down: list[tuple[str]] = []
        for chunk in _chunks(changed):
            rows = cur.execute(f"SELECT pid, live, terms FROM problems WHERE pid IN ({_marks(len(chunk))})", chunk)
            for pid, live, terms_json in rows.fetchall():
                new = live + delta.per_problem[pid]
                if new < 0:
                    raise RuntimeError(f"experience pool corrupt: problem {pid} would have {new} live entries")
                updates.append((new, pid))
                if (live > 0) == (new > 0):
                    continue
                terms = json.loads(terms_json)
                target, df_list = (index_rows, df_up) if new > 0 else (unindex_rows, df_down)
                target.append((pid, _index_doc(terms)))
                df_list.extend((term,) for term in terms)
        cur.executemany("UPDATE problems SET live = ? WHERE pid = ?", updates)
        cur.executemany("INSERT INTO problem_index(rowid, terms) VALUES (?, ?)", index_rows)
        cur.executemany("INSERT INTO problem_index(problem_index, rowid, terms) VALUES ('delete', ?, ?)", unindex_rows)
        cur.executemany("INSERT INTO terms(term, df) VALUES (?, 1) ON CONFLICT(term) DO UPDATE SET df = df + 1", df_up)
        cur.executemany("UPDATE terms SET df = df - 1 WHERE term = ?", df_down)
        cur.executemany("DELETE FROM terms WHERE term = ? AND df <= 0", df_down)
        self._set_meta(cur, "live", self._counter("live", cur) + sum(delta.per_problem.values()))
        self._set_meta(cur, "indexed", self._counter("indexed", cur) + len(index_rows) - len(unindex_rows))
        for mode in MODES:
            if delta.per_mode[mode]:
                self._set_meta(cur, f"mode_{mode}", self._counter(f"mode_{mode}", cur) + delta.per_mode[mode])
        if any(delta.rewards.values()):
            added = sum((Fraction(reward) * n for reward, n in delta.rewards.items()), Fraction(0))
            self._set_meta(cur, "reward_sum", str(self._reward_sum(cur) + added))

    @staticmethod
    def _drop_orphans(cur: sqlite3.Cursor, pids: Iterable[int]) -> None:
        """Delete problem rows left with no entry rows at all (they are already out of the index: live = 0)."""
        for chunk in _chunks(sorted(set(pids))):
            cur.execute(
                f"DELETE FROM problems WHERE pid IN ({_marks(len(chunk))}) AND live = 0 AND NOT EXISTS "
                "(SELECT 1 FROM entries e WHERE e.pid = problems.pid AND e.evicted_at IS NOT NULL)",
                chunk,
            )

    @staticmethod
    def _evict(cur: sqlite3.Cursor, rows: list[tuple[int, int, str, float]], step: int, delta: _Delta) -> None:
        cur.executemany("UPDATE entries SET evicted_at = ? WHERE id = ?", [(step, row[0]) for row in rows])
        for _, pid, mode, reward in rows:
            delta.count(pid, mode, reward, -1)

    # -- writing ----------------------------------------------------------------------------------------------------

    def add(self, entries: Sequence[PoolEntry]) -> None:
        """Record `entries` in one transaction, then apply the eviction rule at step max(entry.step)."""
        if not entries:
            return
        step = max(entry.step for entry in entries)
        with self._write() as cur:
            pids: dict[str, int] = {}
            wanted = sorted({entry.problem_id for entry in entries})
            for chunk in _chunks(wanted):
                rows = cur.execute(
                    f"SELECT problem_id, pid FROM problems WHERE problem_id IN ({_marks(len(chunk))})", chunk
                )
                pids.update(rows.fetchall())
            for entry in entries:  # the first text seen for an id is kept
                if entry.problem_id not in pids:
                    pid = _hash_pid(entry.problem_id)
                    while cur.execute("SELECT 1 FROM problems WHERE pid = ?", (pid,)).fetchone():
                        pid = (pid + 1) & _PID_MASK  # a 63-bit collision: vanishingly rare
                    terms = json.dumps(term_counts(entry.problem), separators=(",", ":"))
                    cur.execute(
                        "INSERT INTO problems(pid, problem_id, text, terms) VALUES (?, ?, ?, ?)",
                        (pid, entry.problem_id, entry.problem, terms),
                    )
                    pids[entry.problem_id] = pid
            cur.executemany(
                "INSERT INTO entries(pid, response, reward, step, mode, prompt_tokens, response_tokens, added_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        pids[e.problem_id],
                        e.response,
                        float(e.reward),
                        int(e.step),
                        e.mode,
                        int(e.prompt_tokens),
                        int(e.response_tokens),
                        step,
                    )
                    for e in entries
                ],
            )
            delta = _Delta()
            for e in entries:
                delta.count(pids[e.problem_id], e.mode, float(e.reward), 1)
            touched = sorted(delta.per_problem)
            live: dict[int, int] = {}
            for chunk in _chunks(touched):
                live.update(cur.execute(f"SELECT pid, live FROM problems WHERE pid IN ({_marks(len(chunk))})", chunk))
            for pid in touched:
                excess = live[pid] + delta.per_problem[pid] - self.max_per_problem
                if excess > 0:
                    rows = cur.execute(
                        "SELECT id, pid, mode, reward FROM entries WHERE pid = ? AND evicted_at IS NULL "
                        "ORDER BY step, id LIMIT ?",
                        (pid, excess),
                    ).fetchall()
                    self._evict(cur, rows, step, delta)
            excess = self._counter("live", cur) + sum(delta.per_problem.values()) - self.max_size
            if excess > 0:
                rows = cur.execute(
                    "SELECT id, pid, mode, reward FROM entries WHERE evicted_at IS NULL ORDER BY step, id LIMIT ?",
                    (excess,),
                ).fetchall()
                self._evict(cur, rows, step, delta)
            self._apply(cur, delta)

    def put_lesson(self, key: str, text: str, step: int) -> None:
        """Cache a lesson under `key` (built by the caller); a later put for the same key supersedes it."""
        with self._write() as cur:
            cur.execute("INSERT INTO lessons(key, step, text) VALUES (?, ?, ?)", (key, int(step), text))

    def rollback(self, step: int) -> None:
        """Make the pool exactly what it was right after training step `step` (resuming from its checkpoint).

        Removes entries and lessons added at later steps and restores entries evicted at later steps. Raises
        ValueError below the last `checkpointed` step, whose evicted rows are gone for good.
        """
        floor = self._meta("checkpointed")
        if floor is not None and step < int(floor):
            raise ValueError(f"cannot roll the pool back to step {step}: rows evicted up to step {floor} were purged")
        with self._write() as cur:
            delta = _Delta()
            dropped: set[int] = set()
            rows = cur.execute("SELECT pid, mode, reward, evicted_at IS NULL FROM entries WHERE added_at > ?", (step,))
            for pid, mode, reward, is_live in rows.fetchall():
                dropped.add(pid)
                if is_live:
                    delta.count(pid, mode, reward, -1)
            rows = cur.execute(
                # `+added_at`: scan the small index of evicted rows, not the added_at index over every row
                "SELECT pid, mode, reward FROM entries WHERE evicted_at IS NOT NULL AND evicted_at > ? "
                "AND +added_at <= ?",
                (step, step),
            )
            for pid, mode, reward in rows.fetchall():
                delta.count(pid, mode, reward, 1)
            self._apply(cur, delta)  # while the dropped problems' rows are still there to unindex
            cur.execute("DELETE FROM entries WHERE added_at > ?", (step,))
            cur.execute("UPDATE entries SET evicted_at = NULL WHERE evicted_at IS NOT NULL AND evicted_at > ?", (step,))
            self._drop_orphans(cur, dropped)
            cur.execute("DELETE FROM lessons WHERE step > ?", (step,))

    def checkpointed(self, step: int) -> None:
        """Step `step` is safely checkpointed: purge rows evicted at or before it, orphan problems, stale lessons."""
        with self._write() as cur:
            pids = [
                pid
                for (pid,) in cur.execute(
                    "SELECT DISTINCT pid FROM entries WHERE evicted_at IS NOT NULL AND evicted_at <= ?", (step,)
                )
            ]
            cur.execute("DELETE FROM entries WHERE evicted_at IS NOT NULL AND evicted_at <= ?", (step,))
            self._drop_orphans(cur, pids)
            # A lesson version superseded by another one put at or before `step` can no longer become visible.
            cur.execute(
                "DELETE FROM lessons WHERE step <= ?1 AND EXISTS (SELECT 1 FROM lessons newer "
                "WHERE newer.key = lessons.key AND newer.seq > lessons.seq AND newer.step <= ?1)",
                (step,),
            )
            previous = self._meta("checkpointed", cur)
            self._set_meta(cur, "checkpointed", step if previous is None else max(step, int(previous)))

    # -- reading ----------------------------------------------------------------------------------------------------

    def earlier_attempts(self, problem_id: str, before_step: int, limit: int = 1) -> list[str]:
        """Response texts only (never reward, mode or answer) of `problem_id` from steps < `before_step`, newest first.

        This is all that LANPO's reward-agnostic reflection gets to see; the current step's siblings are excluded.
        """
        if limit <= 0:
            return []
        rows = self._db.execute(
            "SELECT e.response FROM problems p JOIN entries e ON e.pid = p.pid "
            "WHERE p.problem_id = ? AND e.evicted_at IS NULL AND e.step < ? ORDER BY e.step DESC, e.id DESC LIMIT ?",
            (problem_id, before_step, limit),
        )
        return [response for (response,) in rows]

    def _df(self, terms: Iterable[str]) -> dict[str, int]:
        wanted = sorted(set(terms))
        found: dict[str, int] = {}
        for start in range(0, len(wanted), _CHUNK):
            chunk = wanted[start : start + _CHUNK]
            found.update(self._db.execute(f"SELECT term, df FROM terms WHERE term IN ({_marks(len(chunk))})", chunk))
        return found

    def _prefix_terms(self, q_vec: dict[str, float], q_norm: float, df: dict[str, int], gamma: float) -> list[str]:
        """The query terms a problem must share to possibly reach cosine `gamma` (prefix filtering), capped.

        Leave out the commonest terms while their share of the query norm stays below gamma: by Cauchy-Schwarz, a
        problem sharing none of the other terms has cosine < gamma. Past `search_budget` postings, keep the rarest.
        """
        present = sorted((t for t in q_vec if t in df), key=lambda t: (-df[t], t))  # commonest first
        left_out = 0.0
        bound = (gamma - _SIM_SLACK) * q_norm
        while present and left_out + q_vec[present[0]] ** 2 < bound * abs(bound):
            left_out += q_vec[present.pop(0)] ** 2
        chosen: list[str] = []
        budget = self.search_budget
        for term in reversed(present):  # rarest first
            if chosen and df[term] > budget:
                break
            chosen.append(term)
            budget -= df[term]
        return chosen

    def similar_problems(self, problem: str, *, exclude_id: str, gamma: float, top_k: int) -> list[tuple[str, float]]:
        """(problem_id, similarity) of other problems with live entries, similarity >= gamma and > 0, best first.

        Ties are broken by problem id. At most `top_k`; never `exclude_id`.
        """
        query = term_counts(problem)
        n_problems = self._counter("indexed")
        if top_k <= 0 or not query or n_problems == 0:
            return []
        limit = max(_MIN_CANDIDATES, _CANDIDATES_PER_K * top_k)
        df = self._df(query)
        q_vec = {t: c * idf(n_problems, df.get(t, 0)) for t, c in query.items()}
        q_norm = math.sqrt(sum(w * w for w in q_vec.values()))
        chosen = self._prefix_terms(q_vec, q_norm, df, gamma)
        if not chosen:
            return []
        # Rank every problem sharing a chosen term by its partial dot product over those terms (tf taken as 1), via
        # each term's posting list; this is cheaper than FTS5's bm25, which rescans the lists to count documents.
        scores: dict[int, float] = {}
        for term in chosen:
            weight = q_vec[term] * idf(n_problems, df[term])
            for (pid,) in self._db.execute(
                "SELECT rowid FROM problem_index WHERE problem_index MATCH ?", (f'"{term}"',)
            ):
                scores[pid] = scores.get(pid, 0.0) + weight  # terms are [a-z0-9@]+: quoting makes them safe
        best = [pid for pid, _ in heapq.nsmallest(limit + 1, scores.items(), key=lambda item: (-item[1], item[0]))]
        found: dict[int, tuple[str, str]] = {}
        for chunk in _chunks(best):
            rows = self._db.execute(
                f"SELECT pid, problem_id, terms FROM problems WHERE pid IN ({_marks(len(chunk))})", chunk
            )
            found.update((pid, (problem_id, terms)) for pid, problem_id, terms in rows)
        rows = [found[pid] for pid in best if found[pid][0] != exclude_id][:limit]
        candidates = [(problem_id, json.loads(terms)) for problem_id, terms in rows]
        df.update(self._df(t for _, terms in candidates for t in terms if t not in df))
        term_idf = {t: idf(n_problems, count) for t, count in df.items()}
        scored: list[tuple[str, float]] = []
        for problem_id, terms in candidates:
            dot = 0.0
            d_sq = 0.0
            for t, c in terms.items():
                w = c * term_idf[t]
                d_sq += w * w
                if t in q_vec:
                    dot += w * q_vec[t]
            sim = min(1.0, dot / (q_norm * math.sqrt(d_sq))) if dot > 0 else 0.0
            if sim > 0 and sim >= gamma - _SIM_SLACK:
                scored.append((problem_id, sim))
        scored.sort(key=lambda item: (-item[1], item[0]))
        return scored[:top_k]

    def trajectories(self, problem_ids: Sequence[str], per_problem: int = 2) -> list[tuple[str, str, float]]:
        """(problem text, response, reward) of those problems' newest live entries, for lesson writing."""
        out: list[tuple[str, str, float]] = []
        for problem_id in dict.fromkeys(problem_ids):
            rows = self._db.execute(
                "SELECT p.text, e.response, e.reward FROM problems p JOIN entries e ON e.pid = p.pid "
                "WHERE p.problem_id = ? AND e.evicted_at IS NULL ORDER BY e.step DESC, e.id DESC LIMIT ?",
                (problem_id, per_problem),
            )
            out.extend(rows.fetchall())
        return out

    def get_lesson(self, key: str) -> str | None:
        row = self._db.execute("SELECT text FROM lessons WHERE key = ? ORDER BY seq DESC LIMIT 1", (key,)).fetchone()
        return None if row is None else row[0]

    def stats(self) -> dict[str, float]:
        """size (live entries), problems (with live entries), lessons, mean_reward (0.0 if empty), mode_<m> counts.

        O(1) in the pool size except `lessons`: the counters are kept up to date by every write.
        """
        size = self._counter("live")
        lessons = self._db.execute("SELECT count(DISTINCT key) FROM lessons").fetchone()[0]
        out: dict[str, float] = {
            "size": float(size),
            "problems": float(self._counter("indexed")),
            "lessons": float(lessons),
            "mean_reward": float(self._reward_sum() / size) if size else 0.0,
        }
        out.update((f"mode_{mode}", float(self._counter(f"mode_{mode}"))) for mode in MODES)
        return out

    def problem_attempts(self, limit: int = 20) -> list[tuple[str, int, float]]:
        """(problem_id, live attempts, mean reward), most attempted first, then by id."""
        rows = self._db.execute(
            "SELECT p.problem_id, p.live, (SELECT avg(e.reward) FROM entries e WHERE e.pid = p.pid "
            "AND e.evicted_at IS NULL) FROM problems p WHERE p.live > 0 ORDER BY p.live DESC, p.problem_id LIMIT ?",
            (limit,),
        )
        return [(problem_id, int(live), float(mean)) for problem_id, live, mean in rows]

    def sample_entries(self, n: int = 5, problem_id: str | None = None) -> list[PoolEntry]:
        """The newest `n` live entries, of one problem or of all."""
        columns = "p.problem_id, p.text, e.response, e.reward, e.step, e.mode, e.prompt_tokens, e.response_tokens"
        if problem_id is None:
            rows = self._db.execute(
                f"SELECT {columns} FROM entries e JOIN problems p ON p.pid = e.pid "
                "WHERE e.evicted_at IS NULL ORDER BY e.step DESC, e.id DESC LIMIT ?",
                (n,),
            )
        else:
            rows = self._db.execute(
                f"SELECT {columns} FROM problems p JOIN entries e ON e.pid = p.pid "
                "WHERE p.problem_id = ? AND e.evicted_at IS NULL ORDER BY e.step DESC, e.id DESC LIMIT ?",
                (problem_id, n),
            )
        return [PoolEntry(*row) for row in rows]

    def fingerprint(self) -> str:
        """sha256 over all live entries (in insertion order) and visible lessons (by key): equal pools, equal hash."""
        digest = hashlib.sha256()
        rows = self._db.execute(
            "SELECT p.problem_id, p.text, e.response, e.reward, e.step, e.mode, e.prompt_tokens, e.response_tokens "
            "FROM entries e JOIN problems p ON p.pid = e.pid WHERE e.evicted_at IS NULL ORDER BY e.id"
        )
        for row in rows:
            digest.update(json.dumps(["entry", *row]).encode())
            digest.update(b"\n")
        rows = self._db.execute(
            "SELECT key, step, text FROM lessons l WHERE seq = (SELECT max(seq) FROM lessons WHERE key = l.key) "
            "ORDER BY key"
        )
        for row in rows:
            digest.update(json.dumps(["lesson", *row]).encode())
            digest.update(b"\n")
        return digest.hexdigest()

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> ExperiencePool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
