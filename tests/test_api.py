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

    result = reasonrl.train(
        model="tiny",
        train_dataset=_rows(12),
        reward_funcs=["math_answer", brevity],
        config=API_CONFIG,
        eval_dataset=_rows(4, offset=50),
        run_dir=tmp_path / "run",
    )
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
