"""LANPO experience pool: reward-agnostic reflection material, retrieval, eviction, exact rollback."""

from __future__ import annotations

import inspect
import math
import random
from collections import Counter
from collections.abc import Callable, Iterator
from fractions import Fraction
from pathlib import Path

import pytest

from reasonrl.lanpo.pool import MODES, ExperiencePool, PoolEntry, tokenize

WORDS = ["apples", "pears", "tom", "ann", "buys", "sells", "how", "many", "left", "total", "and", "or", "the", "sum"]


def entry(pid: str, step: int, reward: float = 1.0, *, text: str | None = None, mode: str = "scratch") -> PoolEntry:
    return PoolEntry(pid, text or f"Problem {pid}", f"answer to {pid} at {step} ({reward})", reward, step, mode, 5, 7)


def random_text(rng: random.Random) -> str:
    parts = [rng.choice(WORDS) for _ in range(rng.randint(1, 6))]
    parts += [f"{rng.randint(0, 999)}{rng.choice('+-*')}{rng.randint(0, 999)}" for _ in range(rng.randint(0, 2))]
    rng.shuffle(parts)
    return " ".join(parts)


def naive_similar(problems: dict[str, str], query: str, exclude_id: str, gamma: float) -> dict[str, float]:
    """TF-IDF cosine against every problem with plain dicts: the reference for `similar_problems`."""
    docs = {pid: Counter(tokenize(text)) for pid, text in problems.items()}
    df: Counter[str] = Counter()
    for counts in docs.values():
        df.update(set(counts))
    n = len(docs)

    def vector(counts: Counter[str]) -> dict[str, float]:
        return {t: c * (math.log((1 + n) / (1 + df[t])) + 1) for t, c in counts.items()}

    q = vector(Counter(tokenize(query)))
    out = {}
    for pid, counts in docs.items():
        d = vector(counts)
        dot = sum(w * d[t] for t, w in q.items() if t in d)
        if pid == exclude_id or dot <= 0:
            continue
        sim = dot / (math.sqrt(sum(w * w for w in q.values())) * math.sqrt(sum(w * w for w in d.values())))
        if sim >= gamma:
            out[pid] = sim
    return out


def live_problems(pool: ExperiencePool) -> dict[str, str]:
    return {e.problem_id: e.problem for e in pool.sample_entries(10**9)}


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[ExperiencePool]:
    with ExperiencePool(tmp_path / "pool.db") as p:
        yield p


# -- reflection material --------------------------------------------------------------------------------------------


def test_earlier_attempts_only_earlier_steps_newest_first_texts_only(pool: ExperiencePool) -> None:
    pool.add([entry("p", 1, 0.0), entry("q", 1, 1.0)])
    pool.add([entry("p", 2, 1.0), entry("p", 3, 0.25)])
    pool.add([entry("p", 4, 1.0)])  # a sibling from the current step: never reflected on
    got = pool.earlier_attempts("p", before_step=4, limit=10)
    assert got == ["answer to p at 3 (0.25)", "answer to p at 2 (1.0)", "answer to p at 1 (0.0)"]
    assert all(type(text) is str for text in got)
    assert pool.earlier_attempts("p", before_step=4) == ["answer to p at 3 (0.25)"]
    assert pool.earlier_attempts("p", before_step=1, limit=10) == []
    assert pool.earlier_attempts("unknown", before_step=9) == []
    assert pool.earlier_attempts("p", before_step=9, limit=0) == []


def test_earlier_attempts_cannot_leak_rewards(pool: ExperiencePool) -> None:
    # Responses that do not mention the reward: nothing in the result may carry it.
    pool.add([PoolEntry("p", "Q: 2+2", "I think 4.", 0.123456, 1, "reflect", 3, 4)])
    got = pool.earlier_attempts("p", before_step=2, limit=5)
    assert got == ["I think 4."]
    assert "0.123456" not in repr(got)
    # The API has no switch that would add rewards, modes or answers.
    assert list(inspect.signature(pool.earlier_attempts).parameters) == ["problem_id", "before_step", "limit"]
    assert inspect.signature(ExperiencePool.earlier_attempts).return_annotation == "list[str]"


def test_entry_validation() -> None:
    with pytest.raises(ValueError, match="mode"):
        entry("p", 1, mode="sideways")
    with pytest.raises(ValueError, match="finite"):
        entry("p", 1, reward=float("nan"))


# -- retrieval ------------------------------------------------------------------------------------------------------


def test_tokenize_digits_by_place_and_operators() -> None:
    assert tokenize("Q: 347+5") == ["q", "347", "@plus", "5", "3@2", "4@1", "7@0", "5@0"]
    assert "@times" in tokenize("3*4") and "@plus" not in tokenize("3*4")


def test_similar_problems_basic(pool: ExperiencePool) -> None:
    texts = {"a": "Q: 347+589", "b": "Q: 347+589", "c": "Q: 347+588", "d": "Q: 12+66", "e": "Tom buys apples"}
    pool.add([entry(pid, 1, text=text) for pid, text in texts.items()])
    got = dict(pool.similar_problems("Q: 347+589", exclude_id="a", gamma=0.0, top_k=10))
    assert "a" not in got
    assert got["b"] == pytest.approx(1.0, abs=1e-12)
    assert 0.0 < got["d"] < got["c"] < 1.0  # graded: sharing digits by place counts
    assert "e" not in got  # nothing in common: similarity 0 is never returned
    assert all(0.0 <= sim <= 1.0 for sim in got.values())
    assert pool.similar_problems("Q: 347+589", exclude_id="a", gamma=1.0, top_k=10) == [("b", got["b"])]
    assert [pid for pid, _ in pool.similar_problems("Q: 347+589", exclude_id="a", gamma=0.0, top_k=2)] == ["b", "c"]
    assert pool.similar_problems("Q: 347+589", exclude_id="a", gamma=0.0, top_k=0) == []
    assert pool.similar_problems("???", exclude_id="a", gamma=0.0, top_k=3) == []
    assert pool.similar_problems("zebra", exclude_id="a", gamma=0.0, top_k=3) == []


def templated_text(rng: random.Random) -> str:
    """Word problems sharing most of their words, which makes prefix filtering leave terms out."""
    name, item = rng.choice(["Tom", "Ann", "Mei"]), rng.choice(["apples", "pears"])
    return f"{name} has {rng.randint(1, 99)} {item} and buys {rng.randint(1, 99)} more. How many {item} now?"


@pytest.mark.parametrize(("seed", "make", "n"), [(s, random_text, 40) for s in range(4)] + [(9, templated_text, 150)])
def test_similar_problems_matches_naive_cosine(tmp_path: Path, seed: int, make: Callable, n: int) -> None:
    # Fewer problems than the 200 candidates, and under the search budget: results must be exact.
    rng = random.Random(seed)
    problems = {f"p{i}": make(rng) for i in range(n)}
    with ExperiencePool(tmp_path / "pool.db", max_per_problem=2) as pool:
        for step in range(1, 4):
            pool.add([entry(pid, step, text=text) for pid, text in problems.items() if rng.random() < 0.7])
        problems = live_problems(pool)
        for _ in range(20):
            query_id = rng.choice([*problems, "new"])
            query = problems.get(query_id) or make(rng)
            gamma = rng.choice([0.0, 0.2, 0.5, 0.7, 0.9])
            want = naive_similar(problems, query, query_id, gamma)
            got = dict(pool.similar_problems(query, exclude_id=query_id, gamma=gamma, top_k=len(problems)))
            assert got.keys() == want.keys()
            for pid, sim in want.items():
                assert got[pid] == pytest.approx(sim, abs=1e-9)
            top = pool.similar_problems(query, exclude_id=query_id, gamma=gamma, top_k=3)
            assert top == sorted(got.items(), key=lambda item: (-item[1], item[0]))[:3]


@pytest.mark.parametrize("budget", [10_000, 50])
def test_similar_problems_large_pool_is_consistent(tmp_path: Path, budget: int) -> None:
    # More problems than candidates, or a tiny search budget: approximate, but every similarity is the exact cosine.
    rng = random.Random(7)
    problems = {f"p{i}": f"Q: {rng.randint(100, 999)}+{rng.randint(100, 999)}" for i in range(600)}
    problems["twin"] = problems["p0"]
    with ExperiencePool(tmp_path / "pool.db", search_budget=budget) as pool:
        pool.add([entry(pid, 1, text=text) for pid, text in problems.items()])
        got = pool.similar_problems(problems["p0"], exclude_id="p0", gamma=0.3, top_k=4)
        assert got[0] == ("twin", pytest.approx(1.0, abs=1e-12))
        assert 1 < len(got) <= 4
        want = naive_similar(problems, problems["p0"], "p0", 0.3)
        for pid, sim in got:
            assert sim == pytest.approx(want[pid], abs=1e-9)


def test_special_characters_do_not_break_retrieval(pool: ExperiencePool) -> None:
    nasty = [
        'He said "hi" AND left',
        "x* OR (y NOT z) NEAR(a b)",
        "-1 - -2 = ? ^ col:umn {braces} [brackets] 'quote' \\ back",
        "Ünïcode — ∑ 数学 🙂 café",
        "",
        '"',
        "AND",
    ]
    pool.add([entry(f"n{i}", 1, text=text) for i, text in enumerate(nasty)])
    for i, text in enumerate(nasty):
        got = pool.similar_problems(text, exclude_id="other", gamma=0.0, top_k=3)
        if tokenize(text):
            assert got[0] == (f"n{i}", pytest.approx(1.0, abs=1e-12))
        else:
            assert got == []
    assert pool.trajectories(["n0"]) == [(nasty[0], "answer to n0 at 1 (1.0)", 1.0)]


def test_trajectories_newest_first_with_rewards(pool: ExperiencePool) -> None:
    pool.add([entry("a", 1, 0.0), entry("b", 1, 1.0)])
    pool.add([entry("a", 2, 1.0), entry("a", 2, 0.5)])
    assert pool.trajectories(["b", "a", "missing"], per_problem=2) == [
        ("Problem b", "answer to b at 1 (1.0)", 1.0),
        ("Problem a", "answer to a at 2 (0.5)", 0.5),
        ("Problem a", "answer to a at 2 (1.0)", 1.0),
    ]


# -- eviction -------------------------------------------------------------------------------------------------------


def test_per_problem_cap_keeps_newest(tmp_path: Path) -> None:
    with ExperiencePool(tmp_path / "pool.db", max_per_problem=3) as pool:
        for step in range(1, 6):
            pool.add([entry("p", step), entry("q", step)])
        assert pool.earlier_attempts("p", 99, limit=10) == [f"answer to p at {s} (1.0)" for s in (5, 4, 3)]
        # Ties within a step: insertion order decides, the last inserted are the newest.
        pool.add([PoolEntry("p", "Problem p", f"r{i}", 0.0, 6, "scratch", 1, 1) for i in range(5)])
        assert pool.earlier_attempts("p", 99, limit=10) == ["r4", "r3", "r2"]
        assert pool.stats()["size"] == 6


def test_global_cap_evicts_oldest_steps(tmp_path: Path) -> None:
    with ExperiencePool(tmp_path / "pool.db", max_size=4) as pool:
        pool.add([entry("a", 1), entry("b", 1)])
        pool.add([entry("c", 2), entry("a", 2)])
        pool.add([entry("d", 3)])  # evicts the first-inserted step-1 entry: a's
        assert pool.stats()["size"] == 4
        assert pool.earlier_attempts("a", 99, limit=5) == ["answer to a at 2 (1.0)"]
        pool.add([entry("e", 4), entry("e", 4)])  # evicts b (step 1) and c (step 2)
        assert pool.sample_entries(10, "b") == [] and pool.sample_entries(10, "c") == []
        assert pool.stats()["problems"] == 3
        # A problem with no live entries is no longer retrievable.
        assert pool.similar_problems("Problem b", exclude_id="x", gamma=0.5, top_k=5) == []
        assert pool.problem_attempts() == [("e", 2, 1.0), ("a", 1, 1.0), ("d", 1, 1.0)]


def random_steps(seed: int, steps: int = 6) -> list[list[PoolEntry]]:
    rng = random.Random(seed)
    ids = [f"p{i}" for i in range(12)]
    batches = []
    for step in range(1, steps + 1):
        batch = []
        for pid in rng.sample(ids, 4):
            for _ in range(rng.randint(1, 4)):
                mode = rng.choice(["scratch", "reflect", "abstract"])
                reward = rng.choice([0.0, 0.1, 0.2, 0.5, 1.0, 1 / 3])
                batch.append(
                    PoolEntry(pid, f"Q{pid[1:]}: {pid} + 1", f"s{step} {rng.random()}", reward, step, mode, 3, 9)
                )
        batches.append(batch)
    return batches


def build(path: Path, batches: list[list[PoolEntry]], *, lessons: bool = True) -> ExperiencePool:
    pool = ExperiencePool(path, max_per_problem=3, max_size=25)
    for batch in batches:
        feed(pool, batch, lessons=lessons)
    return pool


def feed(pool: ExperiencePool, batch: list[PoolEntry], *, lessons: bool = True) -> None:
    pool.add(batch)
    if lessons:
        step = batch[0].step
        pool.put_lesson(f"k{step % 3}", f"lesson written at {step}", step)


def check_counters(pool: ExperiencePool) -> None:
    """The O(1) counters behind stats() agree with a recount of the live entries."""
    live = pool.sample_entries(10**9)
    stats = pool.stats()
    assert stats["size"] == len(live)
    assert stats["problems"] == len({e.problem_id for e in live})
    assert stats["mean_reward"] == (float(sum(Fraction(e.reward) for e in live) / len(live)) if live else 0.0)
    assert Counter(e.mode for e in live) == Counter({m: int(stats[f"mode_{m}"]) for m in MODES})


def observe(pool: ExperiencePool) -> tuple[object, ...]:
    check_counters(pool)
    queries = [pool.similar_problems(f"Q{i}: p{i} + 1", exclude_id="p0", gamma=0.1, top_k=5) for i in range(12)]
    return pool.fingerprint(), pool.stats(), queries, [pool.get_lesson(f"k{i}") for i in range(3)]


def test_eviction_is_deterministic(tmp_path: Path) -> None:
    a = build(tmp_path / "a.db", random_steps(1))
    b = build(tmp_path / "b.db", random_steps(1))
    assert observe(a) == observe(b)
    assert a.stats()["size"] == 25


# -- rollback -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("checkpoint", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rollback_replays_to_the_same_pool(tmp_path: Path, seed: int, checkpoint: bool) -> None:
    batches = random_steps(seed)
    reference = build(tmp_path / "a.db", batches)
    at_three = build(tmp_path / "a3.db", batches[:3])
    resumed = build(tmp_path / "b.db", batches[:3])
    if checkpoint:
        resumed.checkpointed(3)
    for batch in batches[3:]:
        feed(resumed, batch)
    resumed.rollback(3)  # the run was killed after step 6 and resumes from the checkpoint of step 3
    assert observe(resumed) == observe(at_three)
    for batch in batches[3:]:
        feed(resumed, batch)
    assert observe(resumed) == observe(reference)
    # Reopening the file keeps everything, and the reopened pool evolves the same way.
    resumed.close()
    reopened = ExperiencePool(tmp_path / "b.db", max_per_problem=3, max_size=25)
    assert observe(reopened) == observe(reference)
    extra = [entry("p1", 7, 0.0, text="Q1: p1 + 1"), entry("new", 7, 1.0)]
    for pool in (reopened, reference):
        pool.add(extra)
        pool.checkpointed(6)
    assert observe(reopened) == observe(reference)


def test_rollback_below_checkpoint_is_refused(pool: ExperiencePool) -> None:
    pool.add([entry("p", 1)])
    pool.checkpointed(2)
    pool.rollback(2)
    with pytest.raises(ValueError, match="purged"):
        pool.rollback(1)


def test_checkpointed_purges_but_keeps_live_view(tmp_path: Path) -> None:
    pool = build(tmp_path / "a.db", random_steps(3))
    before = observe(pool)
    pool.checkpointed(6)
    assert observe(pool) == before
    evicted = pool._db.execute("SELECT count(*) FROM entries WHERE evicted_at IS NOT NULL").fetchone()[0]
    orphans = pool._db.execute("SELECT count(*) FROM problems WHERE live = 0").fetchone()[0]
    assert (evicted, orphans) == (0, 0)


def test_rollback_removes_new_problems_from_retrieval(pool: ExperiencePool) -> None:
    pool.add([entry("a", 1, text="Q: 1+2")])
    pool.add([entry("b", 2, text="Q: 1+2")])
    assert pool.similar_problems("Q: 1+2", exclude_id="a", gamma=0.9, top_k=3) == [("b", pytest.approx(1.0))]
    pool.rollback(1)
    assert pool.similar_problems("Q: 1+2", exclude_id="a", gamma=0.9, top_k=3) == []
    assert pool.stats()["problems"] == 1
    assert pool._db.execute("SELECT problem_id FROM problems").fetchall() == [("a",)]


# -- lessons --------------------------------------------------------------------------------------------------------


def test_lessons_put_get_and_rollback(pool: ExperiencePool) -> None:
    assert pool.get_lesson("k") is None
    pool.put_lesson("k", "first", 1)
    pool.put_lesson("k", "second", 3)
    pool.put_lesson("other", "late", 4)
    assert pool.get_lesson("k") == "second"
    assert pool.stats()["lessons"] == 2
    pool.rollback(2)
    assert (pool.get_lesson("k"), pool.get_lesson("other")) == ("first", None)
    pool.put_lesson("k", "third", 3)
    pool.checkpointed(3)  # "first" is superseded for good, "third" stays visible
    assert pool.get_lesson("k") == "third"
    assert pool._db.execute("SELECT count(*) FROM lessons").fetchone()[0] == 1


def test_stats_and_samples(pool: ExperiencePool) -> None:
    assert pool.stats()["size"] == 0 and pool.stats()["mean_reward"] == 0.0
    pool.add([entry("a", 1, 1.0, mode="reflect"), entry("a", 2, 0.0), entry("b", 2, 0.5, mode="abstract")])
    stats = pool.stats()
    assert stats == {
        "size": 3.0,
        "problems": 2.0,
        "lessons": 0.0,
        "mean_reward": 0.5,
        "mode_scratch": 1.0,
        "mode_reflect": 1.0,
        "mode_abstract": 1.0,
    }
    assert [e.response for e in pool.sample_entries(2)] == ["answer to b at 2 (0.5)", "answer to a at 2 (0.0)"]
    assert pool.sample_entries(5, "a")[1] == entry("a", 1, 1.0, mode="reflect")
    assert pool.problem_attempts(1) == [("a", 2, 0.5)]
