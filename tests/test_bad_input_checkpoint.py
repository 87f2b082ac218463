"""Bad input, checkpoint family (issue 27): damaged or edited run directories met by `train --resume`, `eval` and
`pool`, and writes that fail (a full disk). Each case ends in one error line and exit 2 (no traceback), or resumes
with a warning saying what it repaired. One tiny LANPO run, trained once, is copied and damaged per case."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import TINY, assert_one_line_error, assert_warned, cli

from reasonrl.config import load_config
from reasonrl.training.trainer import Trainer


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A 2-step LANPO run as a kill during step 2 leaves it: checkpoint step 1, step 2's records and pool rows
    written after it, no final model."""
    tmp = tmp_path_factory.mktemp("trained")
    torch.set_num_threads(1)
    overrides = [*TINY, f"train.output_dir={tmp}", f"warmstart.cache_dir={tmp / 'cache'}", "train.run_name=run",
                 "algorithm.lanpo.enabled=true"]  # fmt: skip
    trainer = Trainer(load_config(None, overrides), tmp / "run")
    trainer.log(0, trainer.evaluate())
    for _ in range(2):
        metrics = trainer.step()
        trainer.global_step += 1
        trainer.log(trainer.global_step, metrics)
        if trainer.global_step == 1:
            trainer.checkpoint()
    trainer.close()
    return tmp / "run"


def interrupted(trained: Path, to: Path) -> Path:
    run = to / "run"
    shutil.copytree(trained, run)
    return run


def step1(run: Path) -> Path:
    return run / "checkpoints" / "step-000001"


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def edit_config(run: Path, old: str, new: str, *, keep_copy: bool = True) -> None:
    """Edit the run's config.yaml; without `keep_copy`, as a checkpoint from before run_config.yaml existed."""
    text = (run / "config.yaml").read_text()
    assert old in text
    (run / "config.yaml").write_text(text.replace(old, new))
    if not keep_copy:
        (step1(run) / "run_config.yaml").unlink()


def tear(path: Path) -> None:
    path.write_text(path.read_text() + '{"step": 2, "reward')


class FullDisk:
    """A log file on a full disk."""

    def write(self, text: str) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    def flush(self) -> None: ...

    def close(self) -> None: ...


# (what is done to the interrupted run, "error" or "warning", the text it must contain)
RESUME_CASES = [
    pytest.param(lambda r: truncate(step1(r) / "model.safetensors"), "error",
                 ["step-000001: model.safetensors is", "(truncated?)"], id="traceback:truncated-model-safetensors"),
    pytest.param(lambda r: (step1(r) / "model.safetensors").unlink(), "error",
                 ["step-000001: model.safetensors is missing or empty"], id="traceback:missing-model-safetensors"),
    pytest.param(lambda r: (step1(r) / "training_state.pt").unlink(), "error",
                 ["step-000001: training_state.pt is missing or empty"], id="traceback:missing-training-state"),
    pytest.param(lambda r: (step1(r) / "training_state.pt").write_bytes(b"garbage" * 100), "error",
                 ["training_state.pt is damaged (not a torch.save archive)"], id="traceback:garbage-training-state"),
    pytest.param(lambda r: (step1(r) / "trainer_state.json").unlink(), "error",
                 ["step-000001: trainer_state.json is missing or empty"], id="traceback:missing-trainer-state"),
    pytest.param(lambda r: edit_config(r, "hidden_size: 32", "hidden_size: 64"), "error",
                 ["config.yaml was edited after step-000001 was written (changed: model.hidden_size)"],
                 id="traceback:config-edited-to-another-model-size"),
    pytest.param(lambda r: edit_config(r, "hidden_size: 32", "hidden_size: 64", keep_copy=False), "error",
                 ["cannot be loaded into this run's model (size mismatch for", "was the run's config.yaml edited"],
                 id="traceback:config-edited-to-another-model-size-old-checkpoint"),
    pytest.param(lambda r: edit_config(r, "lr: 0.001", "lr: 0.01"), "error",
                 ["config.yaml was edited after step-000001 was written (changed: train.lr)"],
                 id="silent:train-lr-edited"),
    pytest.param(lambda r: edit_config(r, "sharding: none", "sharding: fsdp"), "error",
                 ["config.yaml was edited after step-000001 was written (changed: train.sharding)"],
                 id="silent:train-sharding-edited"),  # a DDP checkpoint keys AdamW's state by position, not name
    pytest.param(lambda r: edit_config(r, "lr: 0.001", "lr: 0.01", keep_copy=False), "error",
                 ["train.lr=0.01 in", "was trained at 0.001", "restore train.lr=0.001"],
                 id="silent:train-lr-edited-old-checkpoint"),
    pytest.param(lambda r: (r / "pool.sqlite").write_bytes(b"garbage" * 1000), "error",
                 ["cannot read the experience pool", "pool.sqlite (file is not a database)"],
                 id="traceback:corrupt-pool-on-resume"),
    pytest.param(lambda r: shutil.rmtree(r / "checkpoints"), "error",
                 ["no complete checkpoint to resume from (it stopped before its first one", "delete that directory"],
                 id="misleading:killed-before-first-checkpoint"),
    # repaired, and said so
    pytest.param(lambda r: tear(r / "metrics.jsonl"), "warning", ["metrics.jsonl: dropped a torn last line"],
                 id="traceback:torn-metrics-jsonl"),
    pytest.param(lambda r: tear(r / "completions.jsonl"), "warning", ["completions.jsonl: dropped a torn last line"],
                 id="traceback:torn-completions-jsonl"),
    pytest.param(lambda r: (r / "checkpoints" / "latest").write_text("step-000009"), "warning",
                 ["checkpoints/latest names step-000009 (missing); resuming from step-000001"],
                 id="misleading:latest-names-a-missing-step"),
]  # fmt: skip


@pytest.mark.parametrize("damage, outcome, parts", RESUME_CASES)
def test_bad_run_directory_on_resume(damage, outcome, parts, trained, tmp_path, capfd):
    run = interrupted(trained, tmp_path)
    damage(run)
    res = cli(capfd, "train", "--resume", str(run))
    if outcome == "error":
        assert_one_line_error(res, *parts)
        assert not (run / "model").exists()
    else:
        assert res.code == 0, res.err
        assert_warned(res, *parts)
        assert (run / "model").is_dir()  # resumed and finished
        steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert steps == [0, 1, 2, 2]  # eval before, step 1, step 2, eval after: nothing torn or repeated


def test_a_new_run_over_a_run_killed_before_its_first_checkpoint_gets_no_circular_advice(trained, tmp_path, capfd):
    run = interrupted(trained, tmp_path)
    shutil.rmtree(run / "checkpoints")
    res = cli(capfd, "train", *TINY, f"train.output_dir={tmp_path}", "train.run_name=run")
    line = assert_one_line_error(res, "exists but has no checkpoint; delete it or pick another run_name")
    assert "--resume" not in line  # --resume says "delete that directory": neither sends the user to the other


def test_corrupt_pool_under_the_pool_command(trained, tmp_path, capfd):
    run = interrupted(trained, tmp_path)
    (run / "pool.sqlite").write_bytes(b"garbage" * 1000)
    assert_one_line_error(cli(capfd, "pool", str(run)), "cannot read the experience pool", "not a database")


def test_eval_of_an_empty_directory(tmp_path, capfd):
    res = cli(capfd, "eval", "--model", str(tmp_path), "-n", "1")
    assert_one_line_error(res, "is not a model directory (no config.json)")


def test_disk_full_during_a_checkpoint(tmp_path, capfd, monkeypatch):
    """The first checkpoint cannot be written: one line, and no partial checkpoint is left behind."""
    real_save = torch.save

    def full(obj, f, *args, **kwargs):
        if str(f).endswith("training_state.pt"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full)
    args = [*TINY, f"train.output_dir={tmp_path}", f"warmstart.cache_dir={tmp_path / 'cache'}", "train.run_name=r"]
    res = cli(capfd, "train", *args, "train.save_every=1", "train.steps=1")
    assert_one_line_error(res, "cannot write checkpoint", "step-000001 (No space left on device)", "start the run")
    assert list((tmp_path / "r" / "checkpoints").iterdir()) == []


def test_disk_full_during_a_metrics_write(tmp_path, capfd, monkeypatch):
    from reasonrl.training import metrics

    monkeypatch.setattr(metrics, "_open_log", lambda path, resume_step: FullDisk())
    args = [*TINY, f"train.output_dir={tmp_path}", f"warmstart.cache_dir={tmp_path / 'cache'}", "train.run_name=r"]
    res = cli(capfd, "train", *args)
    assert_one_line_error(res, "cannot write", "metrics.jsonl (No space left on device)", "--resume")
