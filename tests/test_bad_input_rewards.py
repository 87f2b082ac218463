"""Bad input, rewards family (issue 27): user reward functions that hang, exit or have no opinion, and a verifier
that times out at eval, driven through the CLI. Each case ends in one error line and exit 2 (no traceback), or the
run goes on and says what happened: a warning and a count in the metrics.

Elsewhere: `\\boxed` extraction is linear (tests/test_rewards.py::
test_a_megabyte_of_unclosed_boxes_is_scored_in_linear_time, test_boxed_spans_equal_the_per_box_rescan)."""

from __future__ import annotations

import json

import pytest
from conftest import TINY, assert_one_line_error, assert_warned, cli, untrained_run

USER = "rewards.functions=[math_answer, format, 'conftest:{fn}']"

# (reward function, extra overrides, "error" or "warning", the text it must contain, the step metric and its value)
CASES = [
    pytest.param("sleeping_reward", ["rewards.function_timeout_s=0.3"], "warning",
                 ["reward function 'conftest:sleeping_reward' took longer than rewards.function_timeout_s=0.3"],
                 ("reward/function_timeouts", 1.0), id="hang:reward-function-never-returns"),
    pytest.param("exiting_reward", [], "error", ["reward function 'conftest:exiting_reward' called sys.exit"], None,
                 id="hang:sys-exit-inside-a-reward-function"),
    pytest.param("no_opinion_reward", [], "warning",
                 ["'conftest:no_opinion_reward' returned None or NaN for all",
                  "reward/conftest:no_opinion_reward/missing"],
                 ("reward/conftest:no_opinion_reward/missing", 12.0), id="silent:reward-all-nan-or-none"),
]  # fmt: skip


@pytest.mark.parametrize("fn, extra, outcome, parts, metric", CASES)
def test_bad_reward_function(fn, extra, outcome, parts, metric, tiny_overrides, tmp_path, capfd):
    weights = "rewards.weights=[1, 0.1, 1]"
    res = cli(capfd, "train", *tiny_overrides, "train.steps=1", "train.run_name=r", USER.format(fn=fn), weights, *extra)
    if outcome == "error":
        assert_one_line_error(res, *parts)
        return
    assert res.code == 0, res.err
    assert_warned(res, *parts)
    records = [json.loads(line) for line in (tmp_path / "runs" / "r" / "metrics.jsonl").read_text().splitlines()]
    key, value = metric
    assert [r[key] for r in records if "loss" in r] == [value]


class BoxedAnswers:
    """A rollout engine whose every completion is a boxed answer sympy would evaluate for hours."""

    shares_policy_weights = True

    def __init__(self, *args, **kwargs) -> None: ...

    def generate(self, prompts, n, sampling):
        from reasonrl.rollout.base import Completion

        return [Completion(p, [5], [0.0], False, "\\boxed{9^{9^{9^{9^{9}}}}}") for p in prompts for _ in range(n)]

    def close(self) -> None: ...


def test_verifier_timeouts_at_eval_are_reported(tmp_path, capfd, monkeypatch):
    """A verifier cut off by rewards.timeout_s scored the answer wrong without a word; eval now counts them
    (verify_timeouts) and warns."""
    from reasonrl import evaluate

    monkeypatch.setattr(evaluate, "make_engine", BoxedAnswers)
    run = untrained_run(tmp_path, TINY)
    data = tmp_path / "problems.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Q: {i}+1\n", "answer": str(i + 1)}) + "\n" for i in range(3)))
    args = ["eval", "--model", str(run), "--data", str(data), "--json"]
    res = cli(capfd, *args, "rewards.timeout_s=1")
    assert res.code == 0 and json.loads(res.out)["verify_timeouts"] == 3, res.err
    assert_warned(res, "3 answers were cut off by the verifier's rewards.timeout_s")
