"""The command line as a user meets it: instant help, one-line errors, non-zero exit, no traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest


def run_cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "reasonrl", *args], capture_output=True, text=True, cwd=cwd, timeout=120
    )


def test_help_is_instant_and_imports_nothing_heavy():
    code = "import sys; from reasonrl.cli import build_parser; build_parser(); print(sorted(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "'torch'" not in out and "'transformers'" not in out
    res = run_cli("--help")
    assert res.returncode == 0 and "train" in res.stdout and "eval" in res.stdout


@pytest.mark.parametrize(
    "args,expected",
    [
        (["train", "algorithm.advantag=rloo"], "unknown config key 'algorithm.advantag' (did you mean"),
        (["train", "data.source=missing.jsonl"], "data file 'missing.jsonl' not found"),
        (["train", "data.source=bad.jsonl"], "bad.jsonl line 2: invalid JSON"),
        (["train", "--config", "nope.yaml"], "config file 'nope.yaml' not found"),
        (["train", "--resume", "no_such_run"], "not a reasonrl run directory"),
        (["eval", "--model", "no_such_model_dir/", "--data", "bad.jsonl"], "cannot load model"),
    ],
)
def test_user_errors(tmp_path, args, expected):
    (tmp_path / "bad.jsonl").write_text('{"prompt": "Q: 1+1\\n", "answer": "2"}\n{"prompt": "x", "answer": \n')
    res = run_cli(*args, cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    errors = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert errors == [errors[0]] and errors[0].startswith("reasonrl: error: ") and expected in errors[0], res.stderr
    assert "Traceback" not in res.stderr + res.stdout
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def _vllm_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


@pytest.mark.skipif(_vllm_installed(), reason="vLLM is installed here: its absence cannot be shown")
def test_vllm_engine_without_vllm_names_the_install_command(tiny_overrides):
    res = run_cli("train", *tiny_overrides, "rollout.engine=vllm", "model.hidden_size=64", "model.num_heads=2")
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
    assert "rollout.engine=vllm needs vLLM" in res.stderr and "pip install 'reasonrl[vllm]'" in res.stderr


def test_vllm_under_several_cpu_processes_is_refused_before_launch(tiny_overrides):
    res = run_cli("train", "--num-processes", "2", *tiny_overrides, "rollout.engine=vllm")
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
    assert "needs one GPU per process" in res.stderr


def test_vllm_with_top_p_is_refused():
    res = run_cli("train", "rollout.engine=vllm", "rollout.top_p=0.9")
    assert res.returncode == 2 and "set rollout.top_p=1 and rollout.top_k=0" in res.stderr


def test_a_run_without_math_answer_reports_eval_reward(tiny_overrides):
    res = run_cli("train", *tiny_overrides, "rewards.functions=[format]", "rewards.weights=[1.0]")
    assert res.returncode == 0, res.stderr
    assert "eval mean reward: " in res.stdout and "eval accuracy" not in res.stdout


def test_overrides_may_sit_between_options():
    res = run_cli("train", "rollout.group_size=4", "--print-config", "algorithm.advantage=lampo")
    assert res.returncode == 0, res.stderr
    assert "group_size: 4" in res.stdout and "advantage: lampo" in res.stdout
    res = run_cli("eval", "rollout.max_new_tokens=8", "--model", "not-read", "eval.kk=2", "-k", "2")
    assert res.returncode == 2 and "'eval.kk'" in res.stderr and "eval.k" in res.stderr  # reached the config
    res = run_cli("train", "--print-config", "--no-such-option")
    assert res.returncode == 2 and "unrecognized arguments: --no-such-option" in res.stderr


def test_print_config_gives_a_config_file_that_loads_unchanged(tmp_path):
    from reasonrl.config import load_config

    res = run_cli("train", "--print-config", "rollout.group_size=4", "algorithm.advantage=lampo")
    assert res.returncode == 0, res.stderr
    path = tmp_path / "printed.yaml"
    path.write_text(res.stdout)
    cfg = load_config(path)
    assert cfg == load_config(None, ["rollout.group_size=4", "algorithm.advantage=lampo"])
    assert cfg.rollout.group_size == 4 and "train:" in res.stdout and "lr:" in res.stdout


@pytest.mark.parametrize(
    "override, expected",
    [("num_generations=4", "rollout.group_size"), ("train.learning_rate=1e-6", "train.lr"),
     ("max_completion_length=256", "rollout.max_new_tokens"), ("use_vllm=true", "rollout.engine=vllm")],
)  # fmt: skip
def test_trl_field_names_get_the_reasonrl_key(override, expected):
    res = run_cli("train", "--print-config", override)
    assert res.returncode == 2 and f"did you mean '{expected}'? " in res.stderr and "GRPOConfig" in res.stderr


def test_every_trl_mapping_names_a_real_key():
    from reasonrl.config import TRL_KEYS, all_keys

    assert {v.split("=")[0] for v in TRL_KEYS.values()} <= set(all_keys())
