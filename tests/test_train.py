"""End to end on a tiny model: a step trains and logs, micro-batching is exact, a hung verifier cannot stall
training, and a SIGKILLed run resumes to exactly the same metrics and weights."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from reasonrl.config import load_config
from reasonrl.data.prompts import prompt_ids
from reasonrl.training.batch import make_micro_batches
from reasonrl.training.trainer import Trainer
from reasonrl.training.update import token_logprobs

SPEC_METRICS = {
    "reward/mean",
    "reward/std",
    "accuracy",
    "zero_std_groups",
    "completion/len_mean",
    "completion/len_max",
    "completion/truncated",
    "entropy",
    "clip/low",
    "clip/high",
    "clip/region",
    "time/generation",
    "time/reward",
    "time/logprobs",
    "time/update",
    "time/step",
    "tokens_per_s",
    "loss",
    "grad_norm",
    "reward/math_answer/mean",
    "reward/format/mean",
}


def make_trainer(cfg, tmp_path: Path, name: str = "run") -> Trainer:
    return Trainer(cfg, tmp_path / name)


def test_one_step_changes_parameters_and_logs_metrics(tiny_overrides, tmp_path):
    dense = ["rewards.functions=[math_answer, format, 'conftest:length_reward']", "rewards.weights=[1, 0.1, 1]"]
    trainer = make_trainer(load_config(None, [*tiny_overrides, *dense]), tmp_path)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    metrics = trainer.step()
    trainer.close()
    assert set(metrics) >= SPEC_METRICS, SPEC_METRICS - set(metrics)
    changed = [not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters(), strict=True)]
    assert all(changed)
    assert metrics["advantage/abs_mean"] > 0 and metrics["reward/conftest:length_reward/mean"] > 0


def test_rollout_logprobs_match_training_forward(tiny_config, tmp_path):
    trainer = make_trainer(tiny_config, tmp_path)
    problems = trainer.stream.take(3)
    comps = trainer.engine.generate([prompt_ids(trainer.tokenizer, p.prompt) for p in problems], 4, trainer.sampling)
    assert len(comps) == 12 and all(c.truncated == (trainer.tokenizer.eos_token_id not in c.token_ids) for c in comps)
    mb = make_micro_batches(comps, torch.zeros(12), [True] * 12, 0, trainer.tokenizer.pad_token_id, trainer.device)[0]
    logp, _ = token_logprobs(trainer.model, mb, tiny_config.rollout.temperature)
    assert ((logp - mb.behaviour_logp).abs() * mb.mask).max() < 1e-4
    assert mb.mask.sum() == sum(len(c.token_ids) for c in comps)
    trainer.close()


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
@pytest.mark.parametrize("mode", ["seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm"])
def test_micro_batches_give_the_same_gradient(tiny_overrides, tmp_path, mode):
    grads = []
    for size in (0, 5):  # one micro-batch of 12 sequences vs 5 + 5 + 2 accumulated
        cfg = load_config(
            None,
            [
                *tiny_overrides,
                f"algorithm.loss_agg={mode}",
                f"train.micro_batch_size={size}",
                "rewards.functions=['conftest:length_reward']",
                "rewards.weights=null",
            ],
        )
        torch.manual_seed(0)
        trainer = make_trainer(cfg, tmp_path, f"run{size}")
        torch.manual_seed(0)
        params = list(trainer.model.parameters())
        trainer.optimizer.step = lambda params=params: grads.append([p.grad.clone() for p in params])
        trainer.step()
        trainer.close()
    for a, b in zip(*grads, strict=True):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)


def test_hanging_verifier_scores_zero_and_training_continues(tiny_overrides, tmp_path):
    cfg = load_config(None, [*tiny_overrides, "rewards.timeout_s=2"])
    trainer = make_trainer(cfg, tmp_path)
    generate = trainer.engine.generate

    def poisoned(prompts, n, sampling):
        comps = generate(prompts, n, sampling)
        comps[0].text = "1+1=2\n\\boxed{9^{9^{9^{9^{9}}}}}"  # sympy would evaluate this for hours
        return comps

    trainer.engine.generate = poisoned
    start = time.monotonic()
    first = trainer.step()
    assert time.monotonic() - start < 30
    assert first["reward/verify_timeouts"] == 1
    second = trainer.step()  # the pool replaced its killed worker
    assert second["reward/verify_timeouts"] == 1
    trainer.close()


def comparable(run_dir: Path) -> list[dict]:
    """metrics.jsonl without wall-clock measurements."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("time/") and k != "tokens_per_s"} for r in rows]


def test_sigkill_and_resume_equals_uninterrupted_run(tiny_overrides, tmp_path):
    args = [*tiny_overrides, "train.steps=24", "train.save_every=4", "train.keep_checkpoints=1"]
    cmd = [sys.executable, "-m", "reasonrl", "train", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([*cmd, "train.run_name=straight"], check=True, capture_output=True, env=env, timeout=300)

    proc = subprocess.Popen(
        [*cmd, "train.run_name=killed"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env
    )
    latest = tmp_path / "runs" / "killed" / "checkpoints" / "latest"
    deadline = time.monotonic() + 300
    while not (latest.exists() and latest.read_text().strip() >= "step-000008") and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    killed = tmp_path / "runs" / "killed"
    assert not (killed / "model").exists()

    res = subprocess.run([*cmd[:4], "--resume", str(killed)], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr

    straight = tmp_path / "runs" / "straight"
    assert comparable(killed) == comparable(straight)
    a, b = load_file(killed / "model" / "model.safetensors"), load_file(straight / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_a_different_config(tiny_overrides, tmp_path):
    cmd = [sys.executable, "-m", "reasonrl", "train", *tiny_overrides, "train.run_name=r", "train.steps=1"]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    run = tmp_path / "runs" / "r"
    res = subprocess.run([*cmd[:4], "--resume", str(run), "train.steps=5"], capture_output=True, text=True)
    assert res.returncode == 2 and "these keys differ: train.steps" in res.stderr
    res = subprocess.run([*cmd[:4], "--resume", str(run)], capture_output=True, text=True)
    assert res.returncode == 2 and "already finished" in res.stderr


def test_an_empty_share_makes_no_micro_batch():
    """Under several processes a process may get no group (fewer prompts than processes, a one-prompt resampling
    round); it still joins the update with no micro-batch."""
    from reasonrl.training.batch import make_micro_batches

    assert make_micro_batches([], torch.zeros(0), [], 0, 0, torch.device("cpu")) == []


WORKER_SCRIPT = """
import sys, time
from pathlib import Path
import reasonrl
from reasonrl.config import load_config
from reasonrl.training.trainer import Trainer

if __name__ == "__main__":
    trainer = Trainer(load_config(None, sys.argv[2:]), Path(sys.argv[1]))
    trainer.step()
    print(" ".join(str(p.pid) for p in trainer.engine.pool.procs), flush=True)
    time.sleep(600)
"""


def test_rollout_workers_do_not_outlive_a_killed_trainer(tiny_overrides, tmp_path):
    script = tmp_path / "train.py"
    script.write_text(WORKER_SCRIPT)
    args = [*tiny_overrides, "rollout.workers=3", "train.tensorboard=false"]
    proc = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "run"), *args], stdout=subprocess.PIPE, text=True
    )
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert len(pids) == 2 and all(Path(f"/proc/{p}").exists() for p in pids)
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 5
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(p) for p in pids), "a rollout worker outlived its killed trainer by more than 5 s"


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its parent's reaper counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False
