"""Resume after damage: a torn last log line is dropped with a warning, damage elsewhere is refused with its line,
and the newest complete checkpoint is found whatever `latest` says."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from reasonrl.errors import UserError
from reasonrl.training.checkpoint import checkpoint_problem, latest_checkpoint
from reasonrl.training.metrics import _open_log


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_torn_last_line_is_dropped_with_a_warning(tmp_path: Path) -> None:
    log = tmp_path / "metrics.jsonl"
    log.write_text("".join(json.dumps({"step": s, "x": s}) + "\n" for s in range(1, 5)) + '{"step": 5, "x"')
    with pytest.warns(UserWarning, match="torn last line"):
        _open_log(log, resume_step=3).close()
    assert [r["step"] for r in _records(log)] == [1, 2, 3]
    assert not list(tmp_path.glob("*.tmp"))  # rewritten through a temporary file, which is gone


def test_damage_before_the_last_line_is_refused_with_its_line(tmp_path: Path) -> None:
    log = tmp_path / "completions.jsonl"
    text = json.dumps({"step": 1}) + "\nnot json\n" + json.dumps({"step": 2}) + "\n"
    log.write_text(text)
    with pytest.raises(UserError, match=r"completions.jsonl, line 2: not a reasonrl log record"):
        _open_log(log, resume_step=2)
    assert log.read_text() == text  # nothing rewritten


def _checkpoint(root: Path, step: int, *, complete: bool = True) -> Path:
    path = root / "checkpoints" / f"step-{step:06d}"
    path.mkdir(parents=True)
    save_file({"w": torch.zeros(2)}, path / "model.safetensors")
    (path / "trainer_state.json").write_text(json.dumps({"step": step}))
    if complete:
        (path / "training_state.pt").write_bytes(b"x" * 8)
    return path


def test_newest_complete_checkpoint_is_found(tmp_path: Path) -> None:
    assert latest_checkpoint(tmp_path) is None
    two, four = _checkpoint(tmp_path, 2), _checkpoint(tmp_path, 4)
    _checkpoint(tmp_path, 6, complete=False)  # killed before its training state was written
    (tmp_path / "checkpoints" / "step-000008.tmp").mkdir()  # an unfinished write
    assert checkpoint_problem(tmp_path / "checkpoints" / "step-000006") == "training_state.pt is missing or empty"
    assert latest_checkpoint(tmp_path) == four  # no pointer at all
    pointer = tmp_path / "checkpoints" / "latest"
    pointer.write_text("step-000002")
    assert latest_checkpoint(tmp_path) == two  # a whole checkpoint named by the pointer is taken as it is
    pointer.write_text("step-000010")
    assert latest_checkpoint(tmp_path) == four  # a pointer to a missing step falls back to the steps that exist
    (four / "trainer_state.json").write_text("{")
    assert latest_checkpoint(tmp_path) == two
    weights = two / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4])  # a truncated weights file: its header says how long it must be
    assert "(truncated?)" in checkpoint_problem(two) and latest_checkpoint(tmp_path) is None
