"""Tests of the reward stage: answer extraction, the process-isolated math verifier, and the Rewards combiner."""

from __future__ import annotations

import importlib
import multiprocessing
import sys
import textwrap
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from reasonrl.errors import UserError
from reasonrl.rewards.math import MathVerifier, VerifyResult, extract_answer
from reasonrl.rewards.stage import REWARD_FUNCTIONS, Rewards, load_reward_function

# Found by probing math-verify 0.9: sympy evaluates the power tower while comparing it with the gold, which runs for
# well over 30 s (confirmed both in the main thread with timeouts disabled and in a thread, where the GIL is held so
# long that a 35 s join does not even return). math-verify's own signal.alarm cannot be used outside the main thread.
HANGING = "9^{9^{9^{9^{9}}}}"

USER_MODULE = "rr_test_user_rewards"
USER_CODE = '''
def maybe(prompts, completions, problem_id, **columns):
    """0.25 for problem 'a', no opinion otherwise."""
    return [0.25 if p == "a" else None for p in problem_id]

def never(prompts, completions, **columns):
    return [None] * len(completions)

def boom(prompts, completions, **columns):
    raise ValueError("bad row")

def short(prompts, completions, **columns):
    return [1.0]

def text(prompts, completions, **columns):
    return ["1.0"] * len(completions)

NOT_CALLABLE = 3
'''


@pytest.fixture(scope="module")
def verifier() -> Iterator[MathVerifier]:
    with MathVerifier(num_workers=2, timeout_s=5.0) as v:
        yield v


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    (tmp_path / f"{USER_MODULE}.py").write_text(textwrap.dedent(USER_CODE))
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    yield USER_MODULE
    sys.modules.pop(USER_MODULE, None)


# ----------------------------------------------------------------------------------------------- extraction


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so the answer is \\boxed{936}.", "936"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\boxed{\\frac{\\sqrt{3}}{2^{x}}}", "\\frac{\\sqrt{3}}{2^{x}}"),
        ("first \\boxed{1}, no wait: \\boxed{2}", "2"),
        ("spaced \\boxed {7}", "7"),
        ("sets \\boxed{\\{1,2\\}}", "\\{1,2\\}"),
        ("reasoning\n#### 42 \nextra", "42"),
        ("#### 1 then #### 2", "2"),
        ("\\boxed{5}\n#### 6", "5"),  # boxed wins over ####
        ("\\boxed{3} and then truncated \\boxed{\\frac{1", None),  # last box unbalanced: no answer
        ("####   \n", None),
        ("the answer is 12", None),
        ("", None),
    ],
)
def test_extract_answer(text: str, expected: str | None) -> None:
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("Thus \\boxed{5}", 1.0),
        ("  Thus $\\boxed{5}$  \n", 1.0),
        ("\\boxed{5} because reasons", 0.0),
        ("\\boxed{4} or \\boxed{5}", 0.0),
        ("no box", 0.0),
        ("\\boxed{5", 0.0),
    ],
)
def test_format_reward(completion: str, expected: float) -> None:
    assert load_reward_function("format")(["p"], [completion]) == [expected]


# ----------------------------------------------------------------------------------------------- verifier


def test_verifier_cases(verifier: MathVerifier) -> None:
    res = verifier.verify(["936", "\\frac{1}{2}", "937", None, "  ", "x = 5"], ["936", "0.5", "936", "1", "1", "5"])
    assert res == [
        VerifyResult(1.0, "ok"),
        VerifyResult(1.0, "ok"),
        VerifyResult(0.0, "ok"),
        VerifyResult(0.0, "unparsable"),
        VerifyResult(0.0, "unparsable"),
        VerifyResult(1.0, "ok"),
    ]
    assert verifier.verify([], []) == []


def test_verifier_fast_path_does_not_start_pool() -> None:
    v = MathVerifier()
    assert v.verify(["936", None, " 7 "], ["936", "1", "7"]) == [
        VerifyResult(1.0, "ok"),
        VerifyResult(0.0, "unparsable"),
        VerifyResult(1.0, "ok"),
    ]
    assert v._pool is None
    v.close()


def test_hanging_item_times_out_and_verifier_recovers() -> None:
    timeout_s = 2.0
    with MathVerifier(num_workers=2, timeout_s=timeout_s) as v:
        assert v.verify(["1/2"], ["0.5"]) == [VerifyResult(1.0, "ok")]  # pool start-up is not part of the timing
        t0 = time.monotonic()
        res = v.verify([HANGING, "3", HANGING], ["936", "3.0", "936"])
        elapsed = time.monotonic() - t0
        assert res == [VerifyResult(0.0, "timeout"), VerifyResult(1.0, "ok"), VerifyResult(0.0, "timeout")]
        assert elapsed < timeout_s + 4.0, elapsed
        # the killed worker is replaced: later items still verify
        assert v.verify(["\\frac{3}{4}", "2"], ["0.75", "3"]) == [VerifyResult(1.0, "ok"), VerifyResult(0.0, "ok")]


def test_close_stops_workers() -> None:
    before = set(multiprocessing.active_children())
    v = MathVerifier(num_workers=2)
    assert v.verify(["2/4"], ["1/2"]) == [VerifyResult(1.0, "ok")]
    workers = set(multiprocessing.active_children()) - before
    assert workers
    v.close()
    assert not any(p.is_alive() for p in workers)
    assert v.verify(["2/4"], ["1/2"]) == [VerifyResult(1.0, "ok")]  # a closed verifier starts a fresh pool
    v.close()


# ----------------------------------------------------------------------------------------------- Rewards


def test_rewards_weights_and_skipping(user_module: str) -> None:
    completions = ["so \\boxed{936}", "\\boxed{1} then \\boxed{2} wait", "no answer"]
    columns = {"answer": ["936", "2", "5"], "reference": [None, None, None], "problem_id": ["a", "b", "a"]}
    with Rewards(["math_answer", "format", f"{user_module}:maybe"], [1.0, 0.5, 2.0]) as rewards:
        out = rewards(["p"] * 3, completions, columns)
    assert out.per_function == {
        "math_answer": [1.0, 1.0, 0.0],
        "format": [1.0, 0.0, 0.0],
        f"{user_module}:maybe": [0.25, None, 0.25],
    }
    # c0: 1 + 0.5*1 + 2*0.25; c1: 1 + 0 + (skipped); c2: 0 + 0 + 2*0.25
    assert out.total == pytest.approx([2.0, 1.0, 0.5])
    assert out.correct == [True, True, False]
    m = out.metrics
    assert m["reward/math_answer/mean"] == pytest.approx(2 / 3)
    assert m["reward/math_answer/std"] == pytest.approx((2 / 9) ** 0.5)
    assert m[f"reward/{user_module}:maybe/mean"] == pytest.approx(0.25)
    assert m[f"reward/{user_module}:maybe/std"] == pytest.approx(0.0)
    assert (m["reward/unparsable"], m["reward/verify_timeouts"], m["reward/verify_errors"]) == (1.0, 0.0, 0.0)
    assert m["reward/skipped"] == 0.0


def test_rewards_all_none(user_module: str) -> None:
    columns = {"answer": ["1", "2"], "reference": [None, None], "problem_id": ["a", "b"]}
    with Rewards([f"{user_module}:maybe", f"{user_module}.never"]) as rewards:
        out = rewards(["p", "q"], ["x", "y"], columns)
    assert out.total == [0.25, 0.0]
    assert out.correct is None
    assert out.metrics["reward/skipped"] == 1.0
    assert f"reward/{user_module}.never/mean" not in out.metrics
    assert out.metrics["reward/verify_timeouts"] == 0.0


def test_load_user_function_by_path(user_module: str) -> None:
    fn = load_reward_function(f"{user_module}:maybe")
    assert fn(["p"], ["c"], problem_id=["a"]) == [0.25]
    assert load_reward_function(f"{user_module}.maybe") is fn


def test_load_errors(user_module: str) -> None:
    with pytest.raises(UserError, match=r"did you mean 'math_answer'"):
        load_reward_function("math_anwser")
    with pytest.raises(UserError, match=r"cannot import module 'no_such_mod_xyz' \(ModuleNotFoundError: No module"):
        load_reward_function("no_such_mod_xyz:fn")
    with pytest.raises(UserError, match=r"has no attribute 'mabye'.*did you mean 'maybe'"):
        load_reward_function(f"{user_module}:mabye")
    with pytest.raises(UserError, match=r"not a function"):
        load_reward_function(f"{user_module}:NOT_CALLABLE")
    assert {"math_answer", "format"} <= set(REWARD_FUNCTIONS)


@pytest.mark.parametrize(
    ("fn", "message"),
    [
        ("boom", r"reward function '.*:boom' raised ValueError: bad row"),
        ("short", r"reward function '.*:short' returned 1 values for 2 completions"),
        ("text", r"reward function '.*:text' returned a non-number at index 0"),
    ],
)
def test_bad_user_functions(user_module: str, fn: str, message: str) -> None:
    columns = {"answer": ["1", "2"], "reference": [None, None], "problem_id": ["a", "b"]}
    with Rewards([f"{user_module}:{fn}"]) as rewards, pytest.raises(UserError, match=message):
        rewards(["p", "q"], ["x", "y"], columns)


def test_rewards_config_errors() -> None:
    with pytest.raises(UserError, match="2 functions but 1 weights"):
        Rewards(["math_answer", "format"], [1.0])
    with pytest.raises(UserError, match="did you mean 'format'"):
        Rewards(["math_answer", "fromat"])


def test_rewards_module_does_not_import_torch() -> None:
    import subprocess

    code = "import sys, reasonrl.rewards; print('torch' in sys.modules, 'sympy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def _naive_boxed_spans(text: str) -> list[tuple[int, int | None]]:
    """The per-box rescan (quadratic on unclosed boxes), as the reference for the one-pass version."""
    import re

    spans = []
    for m in re.finditer(r"\\boxed\s*\{", text):
        depth, i, end = 1, m.end(), None
        while i < len(text):
            if text[i] == "\\":
                i += 2
                continue
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
                if depth == 0:
                    end = i + 1
                    break
            i += 1
        spans.append((m.start(), end))
    return spans


def test_boxed_spans_equal_the_per_box_rescan():
    import random

    from reasonrl.rewards.math import _boxed_spans

    rng = random.Random(0)
    pieces = ["\\boxed{", "\\boxed {", "{", "}", "\\{", "\\}", "\\\\", "\\", "x", " ", "\n", "$"]
    for _ in range(3000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 30)))
        assert _boxed_spans(text) == _naive_boxed_spans(text), repr(text)


def test_a_megabyte_of_unclosed_boxes_is_scored_in_linear_time():
    """10,000 unclosed \\boxed{ in 1 MiB: the per-box rescan took hours at this size; one pass takes milliseconds."""
    import time

    from reasonrl.rewards.math import extract_answer, format_reward

    text = ("\\boxed{" + "x" * 97) * 10_000 + "y" * (2**20 - 104 * 10_000)
    assert len(text) == 2**20
    start = time.perf_counter()
    assert extract_answer(text) is None and format_reward([""], [text]) == [0.0]
    assert time.perf_counter() - start < 1.0


def trl_style(completions, answer, **kwargs):
    """TRL's convention: keyword arguments, the completions first; a positional call would pass the prompts here."""
    assert all(c.startswith("C") for c in completions) and kwargs["prompts"] == ["P1", "P2"]
    assert kwargs["completion_ids"] == [[1, 2], [3]] and kwargs["problem_id"] == ["a", "b"]
    return [1.0 if c.endswith(a) else 0.0 for c, a in zip(completions, answer, strict=True)]


async def async_reward(prompts, completions, **kwargs):
    return [float(len(c)) for c in completions]


def exits(prompts, completions, **kwargs):
    raise SystemExit(0)


def test_reward_functions_get_keyword_arguments_in_trl_convention():
    with Rewards(["tests.test_rewards:trl_style", "tests.test_rewards:async_reward"], [1.0, 0.5]) as rewards:
        out = rewards(
            ["P1", "P2"], ["C 4", "C 5"], {"answer": ["4", "6"], "problem_id": ["a", "b"]}, completion_ids=[[1, 2], [3]]
        )
    assert out.per_function == {"tests.test_rewards:trl_style": [1.0, 0.0], "tests.test_rewards:async_reward": [3, 3]}
    assert out.total == [2.5, 1.5]


def test_sys_exit_inside_a_reward_function_is_a_clear_error():
    with (
        Rewards(["tests.test_rewards:exits"]) as rewards,
        pytest.raises(UserError, match="'tests.test_rewards:exits' called sys.exit"),
    ):
        rewards(["p"], ["c"], {})


def test_a_reward_function_that_never_returns_is_cut_off_and_counted() -> None:
    """rewards.function_timeout_s bounds every call; the stuck function's rewards are skipped, the others count."""
    import threading
    import time

    from reasonrl.rewards.stage import Rewards

    release = threading.Event()

    def stuck(completions, **_):
        release.wait()  # "forever", until the test lets the abandoned thread finish
        return [1.0] * len(completions)

    def length(completions, **_):
        return [float(len(c)) for c in completions]

    rewards = Rewards(["stuck", "length"], callables={"stuck": stuck, "length": length}, function_timeout_s=0.3)
    start = time.perf_counter()
    with pytest.warns(UserWarning, match="rewards.function_timeout_s=0.3"):
        out = rewards(["p", "p"], ["ab", "abc"], {})
    release.set()
    assert time.perf_counter() - start < 5
    assert out.per_function["stuck"] == [None, None] and out.total == [2.0, 3.0]
    assert out.metrics["reward/function_timeouts"] == 1.0


def test_reward_function_timeout_is_an_option_that_changes_the_cutoff() -> None:
    from reasonrl.config import load_config
    from reasonrl.rewards.stage import Rewards

    assert load_config().rewards.function_timeout_s == 60.0

    def slow(completions, **_):
        import time

        time.sleep(0.5)
        return [1.0] * len(completions)

    for limit, expected in ((5.0, [1.0]), (0.1, [None])):
        rewards = Rewards(["slow"], callables={"slow": slow}, function_timeout_s=limit)
        with rewards, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert rewards(["p"], ["c"], {}).per_function["slow"] == expected


def test_trl_reward_functions_work_unchanged_with_messages() -> None:
    """rewards.completion_format=messages hands user functions TRL's conversational form, so trl.rewards functions
    run as they are (with a `solution` dataset column); built-in functions still get text; `auto` (the default) gives
    strings for text prompts, on which TRL's functions fail, and messages for conversational ones; `text` never."""
    trl_rewards = pytest.importorskip("trl.rewards")
    completions = ["<think>\n2 and 2\n</think>\nThe answer is $4$.", "no thinking, $5$"]
    columns = {"answer": ["4", "4"], "solution": ["$4$", "$4$"]}
    funcs = {"think": trl_rewards.think_format_reward, "acc": trl_rewards.accuracy_reward}
    names = ["think", "acc", "math_answer"]
    with Rewards(names, callables=funcs, completion_format="messages", num_workers=1) as rewards:
        out = rewards(["2+2?", "2+2?"], completions, columns)
    assert out.per_function["think"] == [1.0, 0.0] and out.per_function["acc"] == [1.0, 0.0]
    assert out.per_function["math_answer"] == [0.0, 0.0]  # text as always: neither completion boxes an answer
    with Rewards(["think"], callables=funcs) as rewards, pytest.raises(UserError, match="reward function 'think'"):
        rewards(["2+2?", "2+2?"], completions, columns)
    chats = [[{"role": "system", "content": "Think."}, {"role": "user", "content": "2+2?"}]] * 2
    seen = []

    def spy(prompts, completions, **kwargs):
        seen.append(prompts)
        return trl_rewards.think_format_reward(completions, **kwargs)

    with Rewards(["spy"], callables={"spy": spy}) as rewards:
        assert rewards(["2+2?", "2+2?"], completions, columns, conversations=chats).per_function["spy"] == [1.0, 0.0]
    assert seen == [chats]  # the dataset's conversation, system turn included
    with Rewards(["spy"], callables={"spy": spy}, completion_format="text") as rewards, pytest.raises(UserError):
        rewards(["2+2?", "2+2?"], completions, columns, conversations=chats)
