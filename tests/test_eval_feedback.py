"""Feedback-augmented evaluation (SPEC §5): the second attempt sees its own first attempt and nothing else."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import untrained_run

from reasonrl import evaluate as evaluate_module
from reasonrl.cli import main
from reasonrl.demo import arithmetic
from reasonrl.evaluate import evaluate
from reasonrl.lanpo.feedback import ARITHMETIC, GENERIC
from reasonrl.rewards.stage import Rewards
from reasonrl.rollout.base import Completion

PROBLEMS = [arithmetic.make_problem(a, b, f"p{i}") for i, (a, b) in enumerate([(12, 34), (57, 68), (205, 99), (7, 8)])]
FIRST = ["1+3=4\n\\boxed{44}", "7+8=15\n5+6=11\n\\boxed{115}", "I give up", "\\boxed{15}"]  # only the last is right
SECOND = ["\\boxed{46}", "\\boxed{115}", "\\boxed{304}", "\\boxed{15}"]  # 1st, 3rd (304 = 205 + 99) and 4th right


class FakeEngine:
    """Answers round r with the texts of round r and records every prompt it was given, decoded."""

    rounds: list[list[str]] = []

    def __init__(self, model, tokenizer, batch_size: int = 0) -> None:
        self.tokenizer, self.calls = tokenizer, 0

    def generate(self, prompts, n, sampling):
        assert n == 1 and sampling.temperature == 0.0
        FakeEngine.rounds.append([self.tokenizer.decode(p) for p in prompts])
        texts = FIRST if self.calls == 0 else SECOND
        self.calls += 1
        return [Completion(p, [1, 2], [0.0, 0.0], False, t) for p, t in zip(prompts, texts, strict=True)]

    def close(self) -> None:
        pass


@pytest.fixture
def verifier():
    with Rewards(["math_answer"], num_workers=1) as v:
        yield v


@pytest.mark.parametrize("template", [ARITHMETIC.reflect, GENERIC.reflect])
def test_second_round_prompts_are_the_template_filled_with_the_first_attempt(monkeypatch, verifier, template):
    monkeypatch.setattr(evaluate_module, "make_engine", lambda name, *a, **k: FakeEngine(*a, **k))
    FakeEngine.rounds = []
    tok = arithmetic.build_tokenizer()
    res = evaluate(None, tok, PROBLEMS, verifier, max_new_tokens=8, reflect_template=template)
    first, second = FakeEngine.rounds
    assert first == [p.prompt for p in PROBLEMS]
    assert second == [template.format(problem=p.prompt, attempt=a) for p, a in zip(PROBLEMS, FIRST, strict=True)]
    for p, a, prompt in zip(PROBLEMS, FIRST, second, strict=True):
        added = prompt.replace(p.prompt, "").replace(a, "")  # what evaluation itself put around the two texts
        assert p.answer not in added and "reward" not in added.lower() and "correct" not in added.lower()
    assert "46" not in second[0] and "125" not in second[1]  # wrong first attempts: the gold answer is nowhere
    assert res["accuracy"] == 0.25 and res["feedback_accuracy"] == 0.75 and res["feedback_truncated"] == 0.0
    assert res["feedback_fixed"] == 0.5 and res["feedback_broken"] == 0.0  # problems 1 and 3 fixed, none broken


def test_no_template_no_second_round(monkeypatch, verifier):
    monkeypatch.setattr(evaluate_module, "make_engine", lambda name, *a, **k: FakeEngine(*a, **k))
    FakeEngine.rounds = []
    res = evaluate(None, arithmetic.build_tokenizer(), PROBLEMS, verifier, max_new_tokens=8)
    assert len(FakeEngine.rounds) == 1 and not any(k.startswith("feedback") for k in res)


def test_eval_feedback_command(tiny_overrides, tmp_path, capsys):
    torch.set_num_threads(1)
    run = untrained_run(tmp_path, tiny_overrides)
    assert main(["eval", "--model", str(run), "-n", "3", "--feedback", "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["problems"] == 3 and {"accuracy", "feedback_accuracy", "feedback_truncated"} <= set(metrics)
    assert 0 <= metrics["feedback_accuracy"] <= 1

    assert main(["eval", "--model", str(run), "-n", "2", "--feedback"]) == 0
    assert "feedback_accuracy" in capsys.readouterr().out
    assert main(["eval", "--model", str(run), "-n", "2"]) == 0
    assert "feedback_accuracy" not in capsys.readouterr().out


def test_eval_feedback_uses_the_configured_template(tiny_overrides, tmp_path, monkeypatch, capsys):
    seen = []

    def fake_evaluate(*args, reflect_template=None, **kwargs):
        seen.append(reflect_template)
        return {"accuracy": 0.0}

    monkeypatch.setattr(evaluate_module, "evaluate", fake_evaluate)
    template = "[{attempt}] {problem}"
    run = untrained_run(tmp_path, [*tiny_overrides, f"algorithm.lanpo.reflect_template={template}"])
    assert main(["eval", "--model", str(run), "-n", "2", "--feedback"]) == 0
    assert main(["eval", "--model", str(run), "-n", "2"]) == 0
    default = untrained_run(tmp_path / "default", tiny_overrides)
    assert main(["eval", "--model", str(default), "-n", "2", "--feedback"]) == 0
    data = tmp_path / "problems.jsonl"
    data.write_text(json.dumps({"prompt": "Q: 1+1\n", "answer": "2"}) + "\n")
    assert main(["eval", "--model", str(default), "--data", str(data), "--feedback"]) == 0
    assert seen == [template, None, ARITHMETIC.reflect, GENERIC.reflect]  # a user's dataset: the generic wording

    bad = untrained_run(tmp_path / "bad", [*tiny_overrides, "algorithm.lanpo.reflect_template={problem} {reward}"])
    capsys.readouterr()
    assert main(["eval", "--model", str(bad), "--feedback"]) == 2
    assert "reflect_template uses reward" in capsys.readouterr().err
