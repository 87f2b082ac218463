"""data.source=reasoning_gym:NAME and its scorer as a reward (and as the judge of eval accuracy).

The expected scores come from reasoning-gym itself: a dataset built here with `rg.create_dataset` and its
`score_answer`, independently of the Problems and reward path under test."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import user_error

from reasonrl.config import load_config
from reasonrl.data.presets import INSTRUCTION, load_eval_set, parse_data_spec
from reasonrl.data.problems import Problem, reward_columns
from reasonrl.data.reasoning_gym import COLUMN, EVAL_SEED_OFFSET
from reasonrl.data.sources import load_training_data
from reasonrl.rewards.math import _verify_one
from reasonrl.rewards.stage import Rewards

rg = pytest.importorskip("reasoning_gym", reason="reasoning-gym is not installed (pip install reasoning-gym)")

NUMERIC = ["basic_arithmetic", "chain_sum", "leg_counting", "gsm_symbolic"]


def config(name: str, *overrides: str, size: int = 30, eval_size: int = 8):
    return load_config(
        None,
        [
            f"data.source=reasoning_gym:{name}",
            f"data.reasoning_gym.size={size}",
            f"data.reasoning_gym.eval_size={eval_size}",
            *overrides,
        ],
    )


def questions(problems: list[Problem]) -> list[str]:
    return [p.metadata[COLUMN]["entry"]["question"] for p in problems]


@pytest.fixture(scope="module")
def rewards():
    """One verifier pool (one worker) for the module: math_answer and reasoning_gym side by side."""
    with Rewards(["math_answer", "reasoning_gym"], num_workers=1, timeout_s=30) as r:
        yield r


# ------------------------------------------------------------------------------------------------ the source


def test_loads_through_the_config_path_as_reasoning_gym_generates_it():
    train, test = load_training_data(config("basic_arithmetic"))
    assert len(train) == 30 and len(test) == 8
    ds = rg.create_dataset("basic_arithmetic", seed=0, size=30)
    held_out = rg.create_dataset("basic_arithmetic", seed=EVAL_SEED_OFFSET, size=8)
    first = train[0]
    assert first.id == "basic_arithmetic-train-0" and test[0].id == "basic_arithmetic-test-0"
    assert first.prompt == f"{ds[0]['question'].strip()}\n\n{INSTRUCTION}"
    assert first.answer == ds[0]["answer"]
    entry = first.metadata[COLUMN]["entry"]
    assert entry == {"question": ds[0]["question"], "answer": ds[0]["answer"], "metadata": ds[0]["metadata"]}
    assert first.metadata[COLUMN]["dataset"] == "basic_arithmetic"
    assert questions(test) == [held_out[i]["question"] for i in range(8)]
    assert reward_columns(train[:2])[COLUMN][1]["entry"]["answer"] == ds[1]["answer"]  # reaches reward functions


def test_splits_are_deterministic_and_disjoint():
    cfg = config("chain_sum")
    train, test = load_training_data(cfg)
    assert load_training_data(cfg) == (train, test)
    assert not set(questions(train)) & set(questions(test))
    # a tiny problem space: 1-digit a+b or a-b. Eval questions are dropped from train, so train is short but disjoint
    small = config("chain_sum", "data.reasoning_gym.config={min_terms: 2, max_terms: 2, max_digits: 1}", size=300)
    train, test = load_training_data(small)
    assert len(train) < 300 and not set(questions(train)) & set(questions(test))


def test_options_change_what_they_should():
    base_train, base_test = load_training_data(config("chain_sum"))
    seed_train, seed_test = load_training_data(config("chain_sum", "data.reasoning_gym.seed=7"))
    assert questions(seed_train) != questions(base_train) and questions(seed_test) != questions(base_test)
    assert (
        seed_train[0].metadata[COLUMN]["entry"]["question"]
        == rg.create_dataset("chain_sum", seed=7, size=1)[0]["question"]
    )
    bigger, same_test = load_training_data(config("chain_sum", size=45, eval_size=8))
    assert len(bigger) == 45 and bigger[:30] == base_train and same_test == base_test
    terms = config("chain_sum", "data.reasoning_gym.config={min_terms: 4, max_terms: 4}")
    train, _ = load_training_data(terms)
    assert {p.metadata[COLUMN]["entry"]["metadata"]["num_terms"] for p in train} == {4}
    assert train[0].metadata[COLUMN]["config"] == {"min_terms": 4, "max_terms": 4}
    limited, _ = load_training_data(config("chain_sum", "data.limit=5"))
    assert limited == base_train[:5]


def test_config_round_trips_through_the_saved_yaml(tmp_path):
    cfg = config("chain_sum", "data.reasoning_gym.config={min_terms: 3, max_terms: 3}")
    path = tmp_path / "config.yaml"
    cfg.save(path)
    again = load_config(path)
    assert again == cfg and load_training_data(again) == load_training_data(cfg)
    override = load_config(path, ["data.reasoning_gym.config.max_terms=5"])  # one option, the others kept
    assert override.data.reasoning_gym.config == {"min_terms": 3, "max_terms": 5}


def test_bad_names_and_options_are_one_line_user_errors():
    def fails(parts: list[str], name: str, *overrides: str) -> None:
        user_error(parts, load_training_data, config(name, *overrides))

    fails(["unknown reasoning-gym generator 'chain_sun'", "did you mean chain_sum"], "chain_sun")
    fails(["did you mean leg_counting"], "leg_countin")
    user_error(["name the generator", "reasoning_gym:chain_sum"], load_training_data,
               load_config(None, ["data.source=reasoning_gym"]))  # fmt: skip
    fails(
        ["'min_term' is not an option of generator 'chain_sum'", "did you mean min_terms", "its options:"],
        "chain_sum",
        "data.reasoning_gym.config={min_term: 2}",
    )
    fails(
        ["generator 'chain_sum' refuses these options", "max_terms must be >= min_terms"],
        "chain_sum",
        "data.reasoning_gym.config={min_terms: 5, max_terms: 2}",
    )
    fails(["set data.reasoning_gym.seed instead"], "chain_sum", "data.reasoning_gym.config={seed: 3}")


def test_eval_data_spec_and_eval_source():
    cfg = config("leg_counting")
    _, test = load_training_data(cfg)
    spec = parse_data_spec("reasoning_gym:leg_counting")
    assert spec.preset is None
    loaded = load_eval_set(spec, data=cfg.data, limit=5)
    assert loaded.problems == test[:5] and not loaded.builtin
    # data.eval_source: a reasoning-gym eval set beside a file of training problems
    other = load_config(
        None, ["data.eval_source=reasoning_gym:leg_counting", "data.reasoning_gym.eval_size=8", "task.train_size=5"]
    )
    assert load_training_data(other)[1] == test


def test_reasoning_gym_is_imported_lazily():
    code = (
        "import sys, reasonrl, reasonrl.data.sources, reasonrl.data.presets, reasonrl.rewards.stage, reasonrl.cli; "
        "assert 'reasoning_gym' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------------------------------------ the scorer


@pytest.mark.parametrize("name", NUMERIC)
def test_reward_is_the_generators_score(rewards, name):
    """A right boxed answer scores 1, a wrong one what reasoning-gym's own scorer gives (0, or gsm_symbolic's 0.01),
    no answer 0; math_answer scores these problems with the same scorer, so eval accuracy is the generator's."""
    train, _ = load_training_data(config(name, size=4))
    ds = rg.create_dataset(name, seed=0, size=4)
    entries = [ds[int(p.id.rsplit("-", 1)[1])] for p in train[:3]]
    wrong = [str(int(float(e["answer"])) + 1) for e in entries]
    completions = [f"... so the answer is \\boxed{{{e['answer']}}}." for e in entries]
    completions += [f"\\boxed{{{w}}}" for w in wrong] + ["I give up", "#### " + entries[0]["answer"]]
    problems = [*train[:3], *train[:3], train[0], train[0]]
    out = rewards([p.prompt for p in problems], completions, reward_columns(problems))
    expected = [1.0, 1.0, 1.0, *(ds.score_answer(w, e) for w, e in zip(wrong, entries, strict=True)), 0.0, 1.0]
    assert [ds.score_answer(e["answer"], e) for e in entries] == [1.0, 1.0, 1.0]
    assert out.per_function["reasoning_gym"] == pytest.approx(expected)
    assert out.per_function["math_answer"] == pytest.approx(expected)
    assert out.correct == [True, True, True, False, False, False, False, True]
    assert max(expected[3:6]) < 1.0
    # for these numeric tasks math-verify on the gold answer alone agrees on what is correct
    golds = [e["answer"] for e in entries]
    assert [_verify_one(a, g)[0] for a, g in zip(golds + wrong, golds * 2, strict=True)] == [1.0] * 3 + [0.0] * 3


def test_scorer_not_math_verify_decides_reasoning_gym_problems(rewards):
    """leg_counting uses reasoning-gym's default scorer: '292.0' for '292' is partial credit (len 3 / len 5), where
    math-verify would say equal; a problem from elsewhere in the same batch is still verified by math-verify."""
    train, _ = load_training_data(config("leg_counting", size=2))
    gold = train[0].answer
    plain = Problem("plain-0", "1+1=", "2")
    problems = [train[0], plain]
    out = rewards([p.prompt for p in problems], [f"\\boxed{{{gold}.0}}", "\\boxed{2.0}"], reward_columns(problems))
    partial = len(gold) / (len(gold) + 2)
    assert out.per_function["math_answer"] == pytest.approx([partial, 1.0])
    assert out.per_function["reasoning_gym"] == [pytest.approx(partial), None]  # no opinion on other problems
    assert out.correct == [False, True]


def test_reasoning_gym_alone_judges_accuracy():
    train, _ = load_training_data(config("chain_sum", size=2))
    with Rewards(["reasoning_gym"], num_workers=1, timeout_s=30) as alone:
        out = alone([p.prompt for p in train], [f"\\boxed{{{train[0].answer}}}", "\\boxed{x}"], reward_columns(train))
    assert out.correct == [True, False]


def test_eval_accuracy_uses_the_generators_scorer(monkeypatch, rewards):
    """`evaluate` (training-time eval and `reasonrl eval`, whose verifier is math_answer) on reasoning-gym problems:
    accuracy counts full scores of the generator's scorer; partial credit is not correct."""
    import reasonrl.evaluate as evaluate_module
    from reasonrl.rollout.base import Completion

    problems, _ = load_training_data(config("leg_counting", size=3))
    greedy = [f"\\boxed{{{problems[0].answer}}}", f"\\boxed{{{problems[1].answer}.0}}", "no answer"]
    sampled = [greedy[0], greedy[0], greedy[1], f"\\boxed{{{problems[1].answer}}}", "?", greedy[2]]

    class Engine:
        def __init__(self, *args, **kwargs) -> None:
            pass

        def generate(self, prompts, n, sampling):
            texts = greedy if sampling.temperature == 0.0 else sampled
            return [Completion([0], [1], [0.0], False, t) for t in texts]

        def close(self) -> None:
            pass

    class Tokenizer:
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) % 50 for c in text[:8]]}

    monkeypatch.setattr(evaluate_module, "make_engine", lambda name, *a, **k: Engine())
    res = evaluate_module.evaluate(None, Tokenizer(), problems, rewards, max_new_tokens=8, k=2)
    assert res["accuracy"] == pytest.approx(1 / 3)
    assert res["mean@2"] == pytest.approx(3 / 6) and res["pass@2"] == pytest.approx(2 / 3)


def test_template_wraps_the_question_and_lanpo_sees_the_bare_statement() -> None:
    """data.reasoning_gym.template shapes the prompt; the problem's statement (what LANPO retrieves by) stays the
    generated question, so a shared template cannot make every problem look alike; a template without
    {question} is refused."""
    from reasonrl.config import load_config
    from reasonrl.data.sources import load_training_data
    from reasonrl.errors import UserError

    template = "data.reasoning_gym.template=Example first. {question} Box it."
    sizes = ["data.reasoning_gym.size=3", "data.reasoning_gym.eval_size=2"]
    cfg = load_config(None, ["data.source=reasoning_gym:chain_sum", *sizes, template])
    train, _ = load_training_data(cfg)
    for p in train:
        question = p.metadata["reasoning_gym"]["entry"]["question"].strip()
        assert p.prompt == f"Example first. {question} Box it." and p.statement == question
    cfg.data.reasoning_gym.template = "no placeholder"
    with pytest.raises(UserError, match=r"must contain \{question\}"):
        load_training_data(cfg)


def test_reasoning_gym_alone_cannot_judge_other_problems() -> None:
    """With reasoning_gym as the only judge, an eval set of other problems would score 0 % silently: refused."""
    from reasonrl.data.problems import Problem
    from reasonrl.errors import UserError
    from reasonrl.evaluate import evaluate
    from reasonrl.rewards.stage import Rewards

    with Rewards(["reasoning_gym"]) as judge, pytest.raises(UserError, match="add math_answer"):
        evaluate(None, None, [Problem("q1", "1+1=", "2")], judge, max_new_tokens=4, engine=object())
