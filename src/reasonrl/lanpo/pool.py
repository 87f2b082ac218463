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

With an `embedder` (`lanpo.retriever=embedding`), similarity is instead the cosine of L2-normalised sentence
embeddings, clipped at 0 (SPEC §7). Each problem is embedded once, when first added (or when first queried, with
the query's vector reused at add); its vector is stored in the `vectors` table as a float32 BLOB, one row per
problem, so it is pool state like the rest: `fingerprint` covers the live problems' vectors, `rollback` and
`checkpointed` delete the vectors of problems they delete, and a reopened pool serves the stored bytes. Search is
exact, over an in-memory matrix of the live problems' vectors (`embedding.VectorIndex`), loaded from SQLite at the
first query and then kept in step incrementally: every change of a problem's liveness stamps its vector row with a
new `vec_seq`, so a query first reads only the rows stamped since the last one (also those another process wrote:
`PRAGMA data_version`), and after a purge (`vec_purges`) drops the rows whose vector is gone.
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

import numpy as np

from reasonrl.config import LANPO_MODES as MODES  # SPEC §5 context modes
from reasonrl.errors import UserError
from reasonrl.lanpo.embedding import Embedder, VectorIndex

__all__ = ["MODES", "ExperiencePool", "PoolEntry", "Retrieval", "idf", "term_counts", "tokenize"]

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
_VEC = np.dtype("<f4")  # stored vector format: little-endian float32, whatever the machine
_QUERY_CACHE = 16_384  # embedded query texts kept until their problem is added (~1.5 KB each at 384 dimensions)


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


@dataclass(frozen=True)
class Retrieval:
    """One query's neighbours (`similar_problems`), and the best similarity found, for the γ metric.

    `best` is None when there was no other problem to compare with. The embedding retriever compares with every
    live problem, so its `best` is exact; the lexical one scores only candidates that share a term the prefix filter
    kept, so a `best` below γ is a lower bound (one at or above γ is exact while the search is).
    """

    neighbours: list[tuple[str, float]]
    best: float | None


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
# The embedding retriever's vectors (created in new pools, and in older ones when an embedder opens them). `seq`: the
# meta `vec_seq` of the row's last change (insert, or its problem's liveness crossing zero), for incremental sync.
_VECTORS_SCHEMA = """
CREATE TABLE IF NOT EXISTS vectors (pid INTEGER PRIMARY KEY, seq INTEGER NOT NULL, vec BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS vectors_by_seq ON vectors(seq);
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


def _statements(script: str) -> list[str]:
    return [statement for statement in script.split(";") if statement.strip()]


def _encode_vector(vector: np.ndarray) -> bytes:
    return np.asarray(vector, dtype=_VEC).tobytes()


def _decode_vector(blob: bytes) -> np.ndarray:
    return np.frombuffer(blob, dtype=_VEC).astype(np.float32)


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
        embedder: Embedder | None = None,
    ) -> None:
        """`read_only`: a reader of a pool another process owns (multi-process training); SQLite refuses its writes
        and WAL lets it read while the owner writes. `embedder`: retrieve by sentence-embedding cosine instead of
        lexically (the module docstring); a writer embeds the problems that have no vector yet."""
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
                for statement in _statements(_SCHEMA + _VECTORS_SCHEMA):
                    cur.execute(statement)
                cur.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")
        self._embedder = embedder
        self._index: VectorIndex | None = None  # the live problems' vectors, loaded at the first embedding query
        self._synced = (-1, 0, 0)  # (data_version, vec_seq, vec_purges) the index reflects
        self._index_stale = True  # this connection wrote since the last sync (its own commits keep data_version)
        self._query_vectors: dict[str, tuple[str, np.ndarray]] = {}  # problem id -> (text, vector), not yet added
        self._vectors_table = self._has_table("vectors")  # false in a pool written before vectors existed
        if embedder is not None:
            self._open_vectors(embedder, read_only)

    def _has_table(self, name: str) -> bool:
        row = self._db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)).fetchone()
        return row is not None

    def _open_vectors(self, embedder: Embedder, read_only: bool) -> None:
        """Check that stored vectors come from this model; a writer also gives every problem lacking one its vector
        (a pool first written by the lexical retriever, or by an older version)."""
        stored = self._meta("embedding_model")
        if stored is not None and stored != embedder.name:
            self._db.close()
            raise UserError(
                f"{self.path} holds vectors of embedding model {stored}, not {embedder.name}; start a new run directory"
            )
        if read_only:
            return
        with self._write() as cur:
            for statement in _statements(_VECTORS_SCHEMA):
                cur.execute(statement)
            self._set_meta(cur, "embedding_model", embedder.name)
        self._vectors_table = True
        rows = self._db.execute(
            "SELECT pid, text FROM problems p WHERE NOT EXISTS (SELECT 1 FROM vectors v WHERE v.pid = p.pid)"
        ).fetchall()
        for start in range(0, len(rows), _CHUNK):
            chunk = rows[start : start + _CHUNK]
            vectors = embedder.encode([text for _, text in chunk])
            with self._write() as cur:
                self._insert_vectors(cur, [pid for pid, _ in chunk], vectors)

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
            self._index_stale = True
        finally:
            cur.close()

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Cursor]:
        """One read transaction: its statements see one snapshot, even while the owner process writes."""
        cur = self._db.cursor()
        cur.execute("BEGIN")
        try:
            yield cur
        finally:
            cur.execute("COMMIT")
            cur.close()

    def _meta(self, key: str, cur: sqlite3.Cursor | None = None) -> int | str | None:
        row = (cur or self._db).execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def _counter(self, key: str, cur: sqlite3.Cursor | None = None) -> int:
        return int(self._meta(key, cur) or 0)

    def _bump(self, cur: sqlite3.Cursor, key: str) -> int:
        value = self._counter(key, cur) + 1
        self._set_meta(cur, key, value)
        return value

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
        crossed = [pid for pid, _ in index_rows + unindex_rows]
        if crossed and self._vectors_table:  # readers of the in-memory index pick these liveness changes up
            seq = self._bump(cur, "vec_seq")
            cur.executemany("UPDATE vectors SET seq = ? WHERE pid = ?", [(seq, pid) for pid in crossed])
        self._set_meta(cur, "live", self._counter("live", cur) + sum(delta.per_problem.values()))
        self._set_meta(cur, "indexed", self._counter("indexed", cur) + len(index_rows) - len(unindex_rows))
        for mode in MODES:
            if delta.per_mode[mode]:
                self._set_meta(cur, f"mode_{mode}", self._counter(f"mode_{mode}", cur) + delta.per_mode[mode])
        if any(delta.rewards.values()):
            added = sum((Fraction(reward) * n for reward, n in delta.rewards.items()), Fraction(0))
            self._set_meta(cur, "reward_sum", str(self._reward_sum(cur) + added))

    def _drop_orphans(self, cur: sqlite3.Cursor, pids: Iterable[int]) -> None:
        """Delete problem rows left with no entry rows at all (they are already out of the index: live = 0), and
        their vectors."""
        purged = 0
        for chunk in _chunks(sorted(set(pids))):
            cur.execute(
                f"DELETE FROM problems WHERE pid IN ({_marks(len(chunk))}) AND live = 0 AND NOT EXISTS "
                "(SELECT 1 FROM entries e WHERE e.pid = problems.pid AND e.evicted_at IS NOT NULL)",
                chunk,
            )
            if self._vectors_table:
                cur.execute(
                    f"DELETE FROM vectors WHERE pid IN ({_marks(len(chunk))}) "
                    "AND NOT EXISTS (SELECT 1 FROM problems p WHERE p.pid = vectors.pid)",
                    chunk,
                )
                purged += cur.rowcount
        if purged:
            self._bump(cur, "vec_purges")

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
        vectors = self._missing_vectors(entries) if self._embedder is not None else {}
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
            if vectors:
                self._insert_vectors(cur, [pids[i] for i in vectors], np.stack(list(vectors.values())))
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

    def _missing_vectors(self, entries: Sequence[PoolEntry]) -> dict[str, np.ndarray]:
        """Vectors for the entries' problems that have none stored yet (of the stored text for a known problem, else
        of the first text given: the text the pool keeps)."""
        texts: dict[str, str] = {}
        for entry in entries:
            texts.setdefault(entry.problem_id, entry.problem)
        todo = dict(texts)
        for chunk in _chunks(sorted(texts)):
            rows = self._db.execute(
                "SELECT problem_id, text, EXISTS (SELECT 1 FROM vectors v WHERE v.pid = p.pid) FROM problems p "
                f"WHERE problem_id IN ({_marks(len(chunk))})",
                chunk,
            )
            for problem_id, text, stored in rows:
                if stored:
                    del todo[problem_id]
                else:
                    todo[problem_id] = text
        vectors = self._embed(list(todo.items()))
        for problem_id in vectors:
            self._query_vectors.pop(problem_id, None)  # stored from now on
        return vectors

    def _insert_vectors(self, cur: sqlite3.Cursor, pids: Sequence[int], vectors: np.ndarray) -> None:
        seq = self._bump(cur, "vec_seq")
        cur.executemany(
            "INSERT OR IGNORE INTO vectors(pid, seq, vec) VALUES (?, ?, ?)",
            [(pid, seq, _encode_vector(v)) for pid, v in zip(pids, vectors, strict=True)],
        )

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
        return self.search(problem, exclude_id=exclude_id, gamma=gamma, top_k=top_k).neighbours

    def search(self, problem: str, *, exclude_id: str, gamma: float, top_k: int) -> Retrieval:
        """`similar_problems`, with the best similarity found (the distribution that tells a user which γ fires)."""
        return self.search_many([(exclude_id, problem)], gamma=gamma, top_k=top_k)[0]

    def search_many(self, problems: Sequence[tuple[str, str]], *, gamma: float, top_k: int) -> list[Retrieval]:
        """`search` for each (problem id, text), excluding that id. A step's queries go together: the embedding
        retriever embeds their texts in one batch and reads its matrix once for all of them."""
        if top_k <= 0 or not problems:
            return [Retrieval([], None) for _ in problems]
        if self._embedder is None:
            return [self._lexical_search(text, problem_id, gamma, top_k) for problem_id, text in problems]
        return self._embedding_search(problems, gamma, top_k)

    def _lexical_search(self, problem: str, exclude_id: str, gamma: float, top_k: int) -> Retrieval:
        query = term_counts(problem)
        n_problems = self._counter("indexed")
        if not query or n_problems == 0:
            return Retrieval([], None)
        limit = max(_MIN_CANDIDATES, _CANDIDATES_PER_K * top_k)
        df = self._df(query)
        q_vec = {t: c * idf(n_problems, df.get(t, 0)) for t, c in query.items()}
        q_norm = math.sqrt(sum(w * w for w in q_vec.values()))
        chosen = self._prefix_terms(q_vec, q_norm, df, gamma)
        if not chosen:  # no problem can reach γ: the best similarity is below it, not known
            return Retrieval([], None)
        # Rank every problem sharing a chosen term by its partial dot product over those terms (tf taken as 1), via
        # each term's posting list; this is cheaper than FTS5's bm25, which rescans the lists to count documents.
        scores: dict[int, float] = {}
        for term in chosen:
            weight = q_vec[term] * idf(n_problems, df[term])
            for (pid,) in self._db.execute(
                "SELECT rowid FROM problem_index WHERE problem_index MATCH ?", (f'"{term}"',)
            ):
                scores[pid] = scores.get(pid, 0.0) + weight  # terms are [a-z0-9@]+: quoting makes them safe
        ranked = [pid for pid, _ in heapq.nsmallest(limit + 1, scores.items(), key=lambda item: (-item[1], item[0]))]
        found: dict[int, tuple[str, str]] = {}
        for chunk in _chunks(ranked):
            rows = self._db.execute(
                f"SELECT pid, problem_id, terms FROM problems WHERE pid IN ({_marks(len(chunk))})", chunk
            )
            found.update((pid, (problem_id, terms)) for pid, problem_id, terms in rows)
        rows = [found[pid] for pid in ranked if found[pid][0] != exclude_id][:limit]
        candidates = [(problem_id, json.loads(terms)) for problem_id, terms in rows]
        df.update(self._df(t for _, terms in candidates for t in terms if t not in df))
        term_idf = {t: idf(n_problems, count) for t, count in df.items()}
        scored: list[tuple[str, float]] = []
        best: float | None = None
        for problem_id, terms in candidates:
            dot = 0.0
            d_sq = 0.0
            for t, c in terms.items():
                w = c * term_idf[t]
                d_sq += w * w
                if t in q_vec:
                    dot += w * q_vec[t]
            sim = min(1.0, dot / (q_norm * math.sqrt(d_sq))) if dot > 0 else 0.0
            best = sim if best is None else max(best, sim)
            if sim > 0 and sim >= gamma - _SIM_SLACK:
                scored.append((problem_id, sim))
        scored.sort(key=lambda item: (-item[1], item[0]))
        return Retrieval(scored[:top_k], best)

    def _embedding_search(self, problems: Sequence[tuple[str, str]], gamma: float, top_k: int) -> list[Retrieval]:
        index = self._sync_index()
        if not len(index):
            return [Retrieval([], None) for _ in problems]
        vectors = self._query_vectors_for(problems)
        pids: dict[str, int] = {}
        for chunk in _chunks(sorted({problem_id for problem_id, _ in problems})):
            rows = self._db.execute(
                f"SELECT problem_id, pid FROM problems WHERE problem_id IN ({_marks(len(chunk))})", chunk
            )
            pids.update(rows.fetchall())
        found = index.search(
            np.stack([vectors[problem_id] for problem_id, _ in problems]),
            exclude_pids=[pids.get(problem_id) for problem_id, _ in problems],
            gamma=gamma,
            top_k=top_k,
            sim_slack=_SIM_SLACK,
        )
        return [Retrieval(neighbours, best) for neighbours, best in found]

    def _query_vectors_for(self, problems: Sequence[tuple[str, str]]) -> dict[str, np.ndarray]:
        """Vectors of (problem id, text) to query with: the stored one when the pool holds that text under that id,
        else one embedding (cached until the problem is added, so that its text is embedded once)."""
        wanted = dict(problems)
        out: dict[str, np.ndarray] = {}
        if self._vectors_table:
            for chunk in _chunks(sorted(wanted)):
                rows = self._db.execute(
                    "SELECT p.problem_id, p.text, v.vec FROM problems p JOIN vectors v ON v.pid = p.pid "
                    f"WHERE p.problem_id IN ({_marks(len(chunk))})",
                    chunk,
                )
                out.update((i, _decode_vector(blob)) for i, text, blob in rows if text == wanted[i])
        embedded = self._embed([(i, text) for i, text in wanted.items() if i not in out])
        for problem_id, vector in embedded.items():
            self._query_vectors.pop(problem_id, None)
            if len(self._query_vectors) >= _QUERY_CACHE:
                del self._query_vectors[next(iter(self._query_vectors))]  # the oldest
            self._query_vectors[problem_id] = (wanted[problem_id], vector)
        return {**out, **embedded}

    def _embed(self, problems: Sequence[tuple[str, str]]) -> dict[str, np.ndarray]:
        """Vectors of (problem id, text): from the query cache when the text matches, the rest in one batch."""
        assert self._embedder is not None
        out: dict[str, np.ndarray] = {}
        todo: list[tuple[str, str]] = []
        for problem_id, text in problems:
            hit = self._query_vectors.get(problem_id)
            if hit is not None and hit[0] == text:
                out[problem_id] = hit[1]
            else:
                todo.append((problem_id, text))
        if todo:
            out.update(zip((i for i, _ in todo), self._embedder.encode([t for _, t in todo]), strict=True))
        return out

    def _sync_index(self) -> VectorIndex:
        """The in-memory index of the live problems' vectors, brought up to date with the database."""
        assert self._embedder is not None
        version = self._db.execute("PRAGMA data_version").fetchone()[0]
        if self._index is not None and not self._index_stale and version == self._synced[0]:
            return self._index
        self._vectors_table = self._vectors_table or self._has_table("vectors")
        if not self._vectors_table:  # a reader of a pool whose owner has not written vectors yet
            return VectorIndex(self._embedder.dim)
        with self._read() as cur:
            seq, purges = self._counter("vec_seq", cur), self._counter("vec_purges", cur)
            if self._index is None:
                self._index = VectorIndex(self._embedder.dim)
                rows = cur.execute(
                    "SELECT v.pid, p.problem_id, 1, v.vec FROM vectors v JOIN problems p ON p.pid = v.pid "
                    "WHERE p.live > 0"
                )
            else:
                if purges != self._synced[2]:  # vectors were deleted (with their problems): drop those rows
                    present = {pid for (pid,) in cur.execute("SELECT pid FROM vectors")}
                    for pid in self._index.pids():
                        if pid not in present:
                            self._index.remove(pid)
                rows = cur.execute(
                    "SELECT v.pid, p.problem_id, p.live, v.vec FROM vectors v JOIN problems p ON p.pid = v.pid "
                    "WHERE v.seq > ?",
                    (self._synced[1],),
                )
            for pid, problem_id, live, blob in rows:
                if live > 0:
                    self._index.add(pid, problem_id, _decode_vector(blob))
                else:
                    self._index.remove(pid)
        self._synced, self._index_stale = (version, seq, purges), False
        return self._index

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
        """sha256 over all live entries (in insertion order), visible lessons (by key) and the vectors of problems
        with live entries (by id): equal pools, equal hash."""
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
        if self._vectors_table:  # the embedding retriever's state: the live problems' vectors, bit for bit
            rows = self._db.execute(
                "SELECT p.problem_id, v.vec FROM vectors v JOIN problems p ON p.pid = v.pid WHERE p.live > 0 "
                "ORDER BY p.problem_id"
            )
            for problem_id, blob in rows:
                digest.update(json.dumps(["vector", problem_id]).encode())
                digest.update(blob)
        return digest.hexdigest()

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> ExperiencePool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
