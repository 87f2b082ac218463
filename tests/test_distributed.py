"""Multi-process training on CPU (gloo), launched the way users launch it: `accelerate launch`."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from reasonrl.training.checkpoint import latest_checkpoint

ROOT = Path(__file__).resolve().parents[1]
# no GPU: accelerate's torchrun launcher falls back to gloo on the CPU
LAUNCH_2 = [
    "accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
    "--mixed_precision", "no", "--dynamo_backend", "no",
]  # fmt: skip


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(_free_port())}


def _free_port() -> int:
    """A port no one listens on now: each launch gets its own, so that one still closing cannot collide with it."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env(), cwd=ROOT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


AGGREGATIONS = ["seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm"]


# train.fsdp.* away from their defaults (the default values are checked in every other fsdp case)
FSDP_OPTIONS = (
    "train.fsdp.reshard_after_forward=false", "train.fsdp.cpu_offload=true", "train.fsdp.activation_checkpointing=true",
)  # fmt: skip


CASES = [*((agg, sharding) for sharding in ("none", "fsdp") for agg in AGGREGATIONS), ("token-mean", "fsdp+options")]


@pytest.mark.parametrize(("loss_agg", "sharding"), CASES)
def test_two_processes_take_the_same_step_as_one(tiny_overrides, tmp_path, loss_agg, sharding):
    """2 processes (DDP, or FSDP2 with `train.sharding=fsdp`) against 1 unsharded process on the same global batch:
    3 groups on process 0 and 2 on process 1, micro-batches of 3 (4 against 3 passes); under FSDP the worker also
    checks that every decoder layer is whole inside each sampling window and a shard again after it, and that each
    `train.fsdp.*` value shows in the model (`_check_fsdp_options`): with the non-default ones the step is the same."""
    sharding, _, extra = sharding.partition("+")
    overrides = [
        *tiny_overrides, "warmstart.steps=0", "model.device=cpu", "rollout.prompts_per_step=5",
        "train.micro_batch_size=3", f"algorithm.loss_agg={loss_agg}", "algorithm.beta=0.05", "train.max_grad_norm=0",
    ]  # fmt: skip
    worker = str(ROOT / "tests" / "distributed_worker.py")
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    _run([sys.executable, worker, str(one), str(tmp_path / "run1"), *overrides])
    options = FSDP_OPTIONS if extra else ()  # (one process refuses train.fsdp.* without train.sharding=fsdp)
    _run([*LAUNCH_2, worker, str(two), str(tmp_path / "run2"), *overrides, f"train.sharding={sharding}", *options])
    a, b = torch.load(one), torch.load(two)
    assert (a["world"], b["world"]) == (1, 2)
    if extra:  # saved with the run
        saved = (tmp_path / "run2" / "config.yaml").read_text()
        assert all(f"{o.split('.')[-1].replace('=', ': ')}" in saved for o in FSDP_OPTIONS), saved
    initial = _initial_params(overrides)
    moved = 0
    for name, p in a["params"].items():
        assert torch.allclose(a["grads"][name], b["grads"][name], rtol=1e-4, atol=1e-7), name
        assert torch.allclose(p, b["params"][name], atol=1e-5, rtol=0), name
        moved += not torch.equal(p, initial[name])
    assert moved == len(initial)  # the step changed every parameter, in both runs
    for key, value in a["metrics"].items():
        assert b["metrics"][key] == pytest.approx(value, rel=1e-4, abs=1e-6), key


def _initial_params(overrides: list[str]) -> dict[str, torch.Tensor]:
    from reasonrl.config import load_config
    from reasonrl.demo import arithmetic
    from reasonrl.demo.tiny_model import build_tiny_model

    cfg = load_config(None, overrides)
    tok = arithmetic.build_tokenizer()
    torch.manual_seed(cfg.train.seed)
    model = build_tiny_model(cfg.model, len(tok), tok.pad_token_id, tok.eos_token_id)
    return {k: v.detach() for k, v in model.named_parameters()}


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_two_process_run_logs_once_checkpoints_and_resumes_exactly(tiny_overrides, tmp_path):
    run = tmp_path / "runs" / "ddp"
    args = [*tiny_overrides, "train.steps=4", "train.save_every=2", "train.run_name=ddp", "train.keep_checkpoints=4"]
    _run([*LAUNCH_2, "-m", "reasonrl", "train", *args])
    records = _records(run)
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4, 4]  # eval before, 4 steps, eval after: one process logs
    steps = [r for r in records if "time/step" in r]
    assert all(r["groups"] == 3 for r in steps)  # the global batch: 3 groups over 2 processes
    logged = [json.loads(line)["step"] for line in (run / "completions.jsonl").read_text().splitlines()]
    assert logged == [s for s in (1, 2, 3, 4) for _ in range(3 * 4)]  # every process's rollouts, logged once
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == ["step-000002", "step-000004"]

    # resume from step 2 on 2 processes: the same steps 3 and 4 as the uninterrupted run
    copy = tmp_path / "runs" / "resumed"
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "checkpoints" / "step-000004")
    shutil.rmtree(copy / "model")
    (copy / "checkpoints" / "latest").write_text("step-000002")
    assert latest_checkpoint(copy).name == "step-000002"
    _run([*LAUNCH_2, "-m", "reasonrl", "train", "--resume", str(copy)])
    resumed = _records(copy)
    assert [r["step"] for r in resumed] == [0, 1, 2, 3, 4, 4]
    for x, y in zip(records[3:5], resumed[3:5], strict=True):
        for key in ("reward/mean", "loss", "entropy", "completion/len_mean", "grad_norm", "accuracy"):
            assert y[key] == pytest.approx(x[key], rel=1e-6, abs=1e-9), key

    # the same checkpoint resumes on 1 process (re-seeded: it continues, but samples differently)
    single = tmp_path / "runs" / "single"
    shutil.copytree(run, single)
    shutil.rmtree(single / "checkpoints" / "step-000004")
    shutil.rmtree(single / "model")
    (single / "checkpoints" / "latest").write_text("step-000002")
    _run([sys.executable, "-m", "reasonrl", "train", "--resume", str(single)])
    again = _records(single)
    assert [r["step"] for r in again] == [0, 1, 2, 3, 4, 4] and again[:3] == records[:3]
    assert all(r["groups"] == 3 for r in again if "time/step" in r) and (single / "model").is_dir()


@pytest.mark.parametrize("kind", ["FSDP", "DEEPSPEED"])
def test_sharded_launches_are_refused_with_one_line(tiny_overrides, kind, monkeypatch, capsys):
    from reasonrl.cli import main

    monkeypatch.setenv(f"ACCELERATE_USE_{kind}", "true")  # what `accelerate launch --use_fsdp / --use_deepspeed` sets
    assert main(["train", *tiny_overrides]) == 2
    err = capsys.readouterr().err
    assert kind in err and "ddp.yaml" in err and "train.sharding=fsdp" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_two_process_lanpo_writes_one_pool_from_process_zero(tiny_overrides, tmp_path):
    from reasonrl.lanpo.pool import ExperiencePool

    run = tmp_path / "runs" / "lanpo"
    args = [
        *tiny_overrides, "task.train_size=6", "train.steps=4", "train.run_name=lanpo", "algorithm.lanpo.enabled=true",
        "algorithm.lanpo.gamma=0.01", "algorithm.lanpo.mix={scratch: 0.5, reflect: 0.25, abstract: 0.25}",
    ]  # fmt: skip
    _run([*LAUNCH_2, "-m", "reasonrl", "train", *args])
    steps = [r for r in _records(run) if "groups" in r]
    assert sum(r["lanpo/reflect/count"] for r in steps) > 0 and sum(r["lanpo/abstract/count"] for r in steps) > 0
    with ExperiencePool(run / "pool.sqlite", read_only=True) as pool:
        stats = pool.stats()
        assert stats["size"] == 4 * 3 * 4  # every rollout of both processes, once (6 problems: no eviction at 8)
        assert stats["lessons"] == sum(r["lanpo/lessons_generated"] for r in steps) > 0


def test_num_processes_shortcut_launches_data_parallel(tiny_overrides, tmp_path):
    cmd = [sys.executable, "-m", "reasonrl", "train", "--num-processes", "2", *tiny_overrides]
    res = _run(cmd)
    assert res.stdout.count("data-parallel over 2 processes") == 1  # process 1 prints nothing
    (run,) = (tmp_path / "runs").iterdir()  # the clock-drawn run name is process 0's, on both processes
    records = _records(run)
    assert [r["step"] for r in records] == [0, 1, 2, 2]  # logged once, by process 0 of 2
    logged = [json.loads(line) for line in (run / "completions.jsonl").read_text().splitlines()]
    assert len(logged) == 2 * 3 * 4  # both processes' rollouts


def test_num_processes_must_be_positive(capsys):
    from reasonrl.cli import main

    assert main(["train", "--num-processes", "0"]) == 2
    assert "--num-processes" in capsys.readouterr().err


def test_a_process_with_no_group_still_joins_the_update(tiny_overrides, tmp_path):
    """One prompt per step on 2 processes: process 1's share is empty every step; it must take part in every
    collective of the update (no hang) and the run must train."""
    run = tmp_path / "runs" / "one-prompt"
    dense = ["rewards.functions=[math_answer,tests.conftest:length_reward]", "rewards.weights=[1.0,1.0]"]
    args = [*tiny_overrides, *dense, "rollout.prompts_per_step=1", "train.steps=2", "train.run_name=one-prompt"]
    _run([*LAUNCH_2, "-m", "reasonrl", "train", *args], timeout=300)
    steps = [r for r in _records(run) if "time/step" in r]
    assert [r["groups"] for r in steps] == [1, 1] and all(r["grad_norm"] > 0 for r in steps)


def test_a_sharded_run_logs_what_ddp_logs_and_resumes_exactly(tiny_overrides, tmp_path):
    """`train.sharding=fsdp` against DDP over 3 steps (the same global batches and seeds): the same metrics and final
    weights; `model/` is a whole transformers folder. A third sharded launch is SIGKILLed (launcher and both workers)
    inside step 3, after its step-2 checkpoint; resumed on 2 processes (AdamW's state gathered by name, weights
    broadcast back into shards) it logs the uninterrupted run's step 3 and ends with bit-identical weights: the same
    process count restores every process's RNG, and one thread per process with gloo's fixed reduction order makes
    the arithmetic deterministic. The same checkpoint also resumes on one process, with its exact state, and a
    checkpoint one process wrote resumes on 2 (re-seeded: another process count cannot continue the RNG streams)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    dense = ["rewards.functions=[math_answer,tests.conftest:held_length_reward]", "rewards.weights=[1.0,1.0]"]
    args = [*tiny_overrides, *dense, "algorithm.beta=0.05", "train.steps=3", "train.save_every=2"]
    _run([*LAUNCH_2, "-m", "reasonrl", "train", *args, "train.run_name=ddp"])
    _run([*LAUNCH_2, "-m", "reasonrl", "train", *args, "train.run_name=fsdp", "train.sharding=fsdp"])
    ddp, fsdp = tmp_path / "runs" / "ddp", tmp_path / "runs" / "fsdp"
    a, b = _records(ddp), _records(fsdp)
    assert [r["step"] for r in b] == [0, 1, 2, 3, 3] and all(r["grad_norm"] > 0 for r in b[1:4])
    _assert_same_metrics(a, b, rel=1e-4)
    sharded = AutoModelForCausalLM.from_pretrained(fsdp / "model").state_dict()
    whole = AutoModelForCausalLM.from_pretrained(ddp / "model").state_dict()
    assert sharded.keys() == whole.keys()
    for name, w in whole.items():
        assert torch.allclose(sharded[name], w, atol=1e-5, rtol=0), name
    step2 = AutoModelForCausalLM.from_pretrained(fsdp / "checkpoints" / "step-000002").state_dict()
    assert not all(torch.equal(step2[k], v) for k, v in sharded.items())  # a checkpoint of its own step

    killed = tmp_path / "runs" / "killed"
    _launch_and_kill_after_checkpoint([*LAUNCH_2, "-m", "reasonrl", "train", *args, "train.run_name=killed",
                                       "train.sharding=fsdp"], killed)  # fmt: skip
    assert latest_checkpoint(killed).name == "step-000002" and not (killed / "model").exists()
    assert [r["step"] for r in _records(killed)] == [0, 1, 2]  # killed inside step 3
    single = tmp_path / "single"
    shutil.copytree(killed, single)
    _run([*LAUNCH_2, "-m", "reasonrl", "train", "--resume", str(killed), dense[0]])
    resumed = _records(killed)
    assert [r["step"] for r in resumed] == [0, 1, 2, 3, 3]
    _assert_same_metrics(b, resumed, rel=1e-6)  # steps 1-2 before the kill, 3 and the final eval after it
    _assert_same_metrics(a, resumed, rel=1e-4)
    again = AutoModelForCausalLM.from_pretrained(killed / "model").state_dict()
    for name, w in sharded.items():
        assert torch.equal(again[name], w), name

    # another process count: one process reads the 2-process checkpoint's full weights and AdamW state by name
    from reasonrl.config import load_config
    from reasonrl.training.trainer import Trainer

    torch.set_num_threads(1)
    trainer = Trainer(load_config(single / "config.yaml"), single, resume=True)
    assert trainer.procs.world == 1 and trainer.global_step == 2
    ckpt = single / "checkpoints" / "step-000002"
    saved, blob = load_file(ckpt / "model.safetensors"), torch.load(ckpt / "training_state.pt")
    assert blob["optimizer_format"] == "fqn"
    params = dict(trainer.model.named_parameters())
    assert saved.keys() <= params.keys()
    for name, w in saved.items():
        assert torch.equal(params[name].detach(), w), name
        state = trainer.optimizer.state[params[name]]
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(state[key], blob["optimizer"]["state"][name][key]), (name, key)
    trainer.checkpoint()  # the same state, written by one process
    grow = tmp_path / "grow"
    shutil.copytree(single, grow)
    trainer.train()
    again = _records(single)
    assert [r["step"] for r in again] == [0, 1, 2, 3, 3] and again[3]["grad_norm"] > 0
    written = torch.load(single / "checkpoints" / "step-000003" / "training_state.pt")
    assert written["optimizer_format"] == "fqn"  # a one-process fsdp checkpoint: 2 processes resume it alike
    AutoModelForCausalLM.from_pretrained(single / "model")
    trainer.close()

    # and back: 2 processes resume the checkpoint one process wrote (each keeps its shard of the same state)
    assert len(torch.load(grow / "checkpoints" / "step-000002" / "training_state.pt")["rng"]) == 1
    _run([*LAUNCH_2, "-m", "reasonrl", "train", "--resume", str(grow), dense[0]])
    grown = _records(grow)
    assert [r["step"] for r in grown] == [0, 1, 2, 3, 3] and grown[3]["grad_norm"] > 0
    assert grown[:3] == again[:3]  # continued after step 2, not started again
    AutoModelForCausalLM.from_pretrained(grow / "model")


def _assert_same_metrics(a: list[dict], b: list[dict], rel: float) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key, value in x.items():
            if not key.startswith("time/") and key != "tokens_per_s":
                assert y[key] == pytest.approx(value, rel=rel, abs=1e-6), (x["step"], key)


def _launch_and_kill_after_checkpoint(cmd: list[str], run: Path) -> None:
    """Start a 2-process launch whose reward (`held_length_reward`) holds each process once `run` has a checkpoint;
    when both processes are held, SIGKILL the launcher and every process under it."""
    import signal
    import time

    import psutil

    log = open(run.parent / f"{run.name}.log", "w")  # noqa: SIM115 - closed below, after the processes are gone
    launcher = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
                                env={**_env(), "REASONRL_TEST_HOLD": str(run)})  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while len(list(run.glob("held-*"))) < 2:
            assert launcher.poll() is None, (run.parent / f"{run.name}.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the run never reached its step after the checkpoint"
            time.sleep(0.1)
        tree = [psutil.Process(launcher.pid), *psutil.Process(launcher.pid).children(recursive=True)]
        held = {int(f.name.removeprefix("held-")) for f in run.glob("held-*")}
        assert held <= {p.pid for p in tree}  # the two workers are the launch's own processes
        for proc in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.send_signal(signal.SIGKILL)
        assert launcher.wait(timeout=30) == -signal.SIGKILL
        _, alive = psutil.wait_procs(tree[1:], timeout=30)
        assert not alive
    finally:
        if launcher.poll() is None:
            launcher.kill()
        log.close()


@pytest.mark.parametrize(
    ("option", "named"),
    [
        ("lora.enabled=true", "lora"), ("train.ref_offload=true", "ref_offload"),
        ("train.gradient_checkpointing=true train.fsdp.activation_checkpointing=true", "gradient_checkpointing"),
    ],
)  # fmt: skip
def test_fsdp_refuses_what_it_does_not_combine_with(tiny_overrides, option, named, capsys):
    from reasonrl.cli import main

    assert main(["train", *tiny_overrides, "train.sharding=fsdp", *option.split()]) == 2
    err = capsys.readouterr().err
    assert "train.sharding=fsdp" in err and named in err and len(err.strip().splitlines()) == 1


def test_fsdp_options_without_fsdp_are_refused(tiny_overrides, capsys):
    from reasonrl.cli import main

    assert main(["train", *tiny_overrides, "train.fsdp.cpu_offload=true"]) == 2
    err = capsys.readouterr().err
    assert "train.fsdp.cpu_offload" in err and "train.sharding=fsdp" in err and len(err.strip().splitlines()) == 1
