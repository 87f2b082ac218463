"""The public surface: `import reasonrl` exposes the library's names lazily and stays light."""

from __future__ import annotations

import json
import subprocess
import sys


def test_import_is_light_and_exports_the_surface():
    code = (
        "import sys, reasonrl\n"
        "assert 'torch' not in sys.modules, 'import reasonrl must not import torch'\n"
        "from reasonrl import Config, Trainer, run_training, evaluate, load_config\n"
        "from reasonrl import register_advantage, register_reward, register_engine, register_source, register_model\n"
        "from reasonrl.algorithms import ADVANTAGES\n"
        "from reasonrl.rollout import ENGINES\n"
        "from reasonrl.data.sources import SOURCES\n"
        "from reasonrl.model.builtin import BUILTIN_MODELS\n"
        "assert {'grpo', 'rloo', 'lampo'} <= set(ADVANTAGES) and {'hf', 'fast'} <= set(ENGINES)\n"
        "assert 'arithmetic' in SOURCES and 'tiny' in BUILTIN_MODELS  # the demo registers itself\n"
        "assert Trainer.__module__ == 'reasonrl.training.trainer' and Config.__module__ == 'reasonrl.config'\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr


def test_unknown_name_is_an_attribute_error():
    import pytest

    import reasonrl

    with pytest.raises(AttributeError, match="no attribute 'Trainr'"):
        reasonrl.Trainr  # noqa: B018


def brevity(completions, **kwargs):
    """A TRL-style reward: keyword arguments, completions first."""
    assert "prompts" in kwargs and "completion_ids" in kwargs and "answer" in kwargs
    return [-len(c) / 50 for c in completions]


def _rows(n: int, offset: int = 0) -> list[dict]:
    return [{"prompt": f"{a}+{a + 1}=", "answer": str(2 * a + 1)} for a in range(offset, offset + n)]


API_CONFIG = {
    "model.hidden_size": 32, "model.num_layers": 2, "model.num_heads": 2, "model.intermediate_size": 64,
    "warmstart.steps": 0, "rollout.group_size": 4, "rollout.prompts_per_step": 3, "rollout.max_new_tokens": 16,
    "train.steps": 2, "train.tensorboard": False, "eval.num_problems": 4, "rewards.num_workers": 1,
}  # fmt: skip


def test_train_from_a_list_of_dicts_with_a_callable_reward(tmp_path):
    import reasonrl

    seen: list[tuple[int, dict]] = []
    result = reasonrl.train(
        model="tiny",
        train_dataset=_rows(12),
        reward_funcs=["math_answer", brevity],
        config=API_CONFIG,
        eval_dataset=_rows(4, offset=50),
        run_dir=tmp_path / "run",
        callbacks=[lambda step, metrics: seen.append((step, metrics))],
    )
    # the callback saw every logged record: eval before (step 0), two steps, eval after
    assert [s for s, _ in seen] == [0, 1, 2, 2] and "eval/accuracy" in seen[0][1] and "loss" in seen[1][1]
    assert result.run_dir == tmp_path / "run" and (result.run_dir / "model").is_dir()
    assert result.metrics["step"] == 2 and 0 <= result.metrics["eval/accuracy"] <= 1
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "time/step" in r]
    from reasonrl.rewards.stage import reward_name

    name = reward_name(brevity)  # its import path: the saved config names it
    assert name.endswith("test_api:brevity") and len(steps) == 2 and f"reward/{name}/mean" in steps[0]
    saved = (result.run_dir / "config.yaml").read_text()
    assert name in saved and "source: train_dataset" in saved


def test_train_from_a_datasets_dataset_and_a_model_object(tmp_path):
    import datasets
    import pytest

    import reasonrl
    from reasonrl.demo import arithmetic
    from reasonrl.demo.tiny_model import build_tiny_model

    tok = arithmetic.build_tokenizer()
    cfg = reasonrl.load_config(None, [f"{k}={v}" for k, v in API_CONFIG.items()])
    model = build_tiny_model(cfg.model, len(tok), tok.pad_token_id, tok.eos_token_id)
    with pytest.warns(UserWarning, match="measured on the training problems"):
        result = reasonrl.train(
            model=model, tokenizer=tok, train_dataset=datasets.Dataset.from_list(_rows(12)),
            reward_funcs=["math_answer", brevity], config=cfg, run_dir=tmp_path / "run",
        )  # fmt: skip
    assert result.metrics["step"] == 2 and result.summary["stopped_by"] == "steps"


def test_bad_datasets_are_one_line_errors(tmp_path):
    import pytest

    import reasonrl
    from reasonrl.errors import UserError

    with pytest.raises(UserError, match="train_dataset row 2: .*answer"):
        reasonrl.train(train_dataset=[{"prompt": "1+1=", "answer": "2"}, {"prompt": "2+2="}], config=API_CONFIG,
                       run_dir=tmp_path / "a")  # fmt: skip
    with pytest.raises(UserError, match="train_dataset must be a list of dicts"):
        reasonrl.train(train_dataset="data.jsonl", config=API_CONFIG, run_dir=tmp_path / "b")


def difficulty_seen(completions, difficulty, **kwargs):
    """Every dataset column reaches a reward function by name (here `difficulty`, an extra column)."""
    assert set(difficulty) <= {"easy", "hard"}
    return [0.5 if d == "hard" else 0.0 for d in difficulty]


def test_extra_dataset_columns_reach_reward_functions(tmp_path):
    import reasonrl

    rows = [{**r, "difficulty": "hard" if i % 2 else "easy"} for i, r in enumerate(_rows(8))]
    result = reasonrl.train(train_dataset=rows, eval_dataset=rows[:4], reward_funcs=["math_answer", difficulty_seen],
                            config=API_CONFIG, run_dir=tmp_path / "run")  # fmt: skip
    steps = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    means = [r[k] for r in steps for k in r if k.endswith("difficulty_seen/mean")]
    assert means and all(0 <= m <= 0.5 for m in means)


# ---- TRL's reward functions on conversational data (issue: the surface a TRL user meets) ------------------------

CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"  # the character tokenizer's alphabet only


def _chat_rows(n: int) -> list[dict]:
    """TRL's conversational form: an earlier exchange, then the question; a `solution` column as TRL's accuracy
    reward wants it."""
    return [
        {"id": f"q{a}", "prompt": [{"role": "user", "content": "1+1="}, {"role": "assistant", "content": "2"},
                                   {"role": "user", "content": f"{a}+{a + 1}="}],
         "answer": str(2 * a + 1), "solution": f"${2 * a + 1}$"}
        for a in range(n)
    ]  # fmt: skip


def test_trl_reward_functions_train_on_conversational_data(tmp_path):
    """A TRL-style `f(completions, solution, **kwargs)`, trl.rewards.think_format_reward, trl.rewards.accuracy_reward
    and an async function each train 2 steps on conversational prompts; each asserts what it receives: the dataset's
    conversation as `prompts`, assistant messages as `completions`, the `solution` column of the same problem."""
    import asyncio

    import pytest

    trl_rewards = pytest.importorskip("trl.rewards")
    import reasonrl
    from reasonrl.demo import arithmetic
    from reasonrl.demo.tiny_model import build_tiny_model

    rows = _chat_rows(12)
    by_id = {r["id"]: r for r in rows}
    calls: dict[str, int] = {}

    def check(name, prompts, completions, problem_id, solution):
        calls[name] = calls.get(name, 0) + 1
        assert len(prompts) == len(completions) == len(solution) == len(problem_id) > 0
        for p, c, pid, s in zip(prompts, completions, problem_id, solution, strict=True):
            assert p == by_id[pid]["prompt"] and s == by_id[pid]["solution"]
            assert isinstance(c, list) and len(c) == 1 and c[0]["role"] == "assistant"
            assert isinstance(c[0]["content"], str)

    def trl_style(completions, solution, **kwargs):
        check("trl_style", kwargs["prompts"], completions, kwargs["problem_id"], solution)
        pairs = zip(completions, solution, strict=True)
        return [1.0 if c[0]["content"].strip().startswith(s.strip("$")) else 0.0 for c, s in pairs]

    def think(completions, **kwargs):
        check("think", kwargs["prompts"], completions, kwargs["problem_id"], kwargs["solution"])
        out = trl_rewards.think_format_reward(completions, **kwargs)
        assert out == [0.0] * len(completions)  # the tiny model never writes <think>…</think>
        return out

    def accuracy(completions, solution, **kwargs):
        check("accuracy", kwargs["prompts"], completions, kwargs["problem_id"], solution)
        out = trl_rewards.accuracy_reward(completions, solution, **kwargs)
        assert all(v in (0.0, 1.0) for v in out) and len(out) == len(completions)
        return out

    async def later(prompts, completions, **kwargs):
        check("later", prompts, completions, kwargs["problem_id"], kwargs["solution"])
        await asyncio.sleep(0)
        return [0.0] * len(completions)

    tok = arithmetic.build_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    cfg = reasonrl.load_config(None, [f"{k}={v}" for k, v in API_CONFIG.items()])
    model = build_tiny_model(cfg.model, len(tok), tok.pad_token_id, tok.eos_token_id)
    result = reasonrl.train(
        model=model, tokenizer=tok, train_dataset=rows, eval_dataset=_chat_rows(4),
        reward_funcs=["math_answer", trl_style, think, accuracy, later], config=cfg, run_dir=tmp_path / "run",
    )  # fmt: skip
    assert result.metrics["step"] == 2 and 0 <= result.metrics["eval/accuracy"] <= 1
    assert all(calls.get(n, 0) >= 2 for n in ("trl_style", "think", "accuracy", "later")), calls  # 2 steps + eval
    logged = json.loads((result.run_dir / "completions.jsonl").read_text().splitlines()[0])
    # the model saw the whole conversation through the chat template; the log has both forms
    assert logged["templated_prompt"].startswith("1+1=2") and logged["prompt"] == logged["templated_prompt"][5:]


def test_without_a_judging_reward_eval_reports_the_reward_only(tmp_path):
    """No math_answer (nor reasoning_gym) among the reward functions: evaluation has no notion of correct, so it
    reports the greedy completions' mean reward, which the summary prints before → after; no error, no accuracy."""
    import reasonrl
    from reasonrl.cli import _print_eval_change

    result = reasonrl.train(train_dataset=_rows(12), eval_dataset=_rows(4, offset=50), reward_funcs=[brevity],
                            config=API_CONFIG, run_dir=tmp_path / "run")  # fmt: skip
    after = {k: v for k, v in result.metrics.items() if k.startswith("eval/")}
    assert "eval/accuracy" not in after and after["eval/reward"] <= 0  # brevity is -len/50
    before = result.summary["eval_before"]
    assert "eval/accuracy" not in before and before["eval/reward"] <= 0

    class Console:
        def print(self, text):
            self.text = text

    console = Console()
    _print_eval_change(console, before, result.summary["eval_after"])
    assert console.text.startswith("eval mean reward: ") and "before RL" in console.text
    _print_eval_change(console, {"eval/accuracy": 0.25, "eval/reward": 0.1}, {"eval/accuracy": 0.5, "eval/reward": 1})
    assert "25.0% before RL" in console.text and "+25.0 points" in console.text
