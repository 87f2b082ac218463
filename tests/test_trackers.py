"""train.report_to: each tracker gets the run's config and every metrics record, offline, with the real library;
a resumed run continues the same tracker run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from reasonrl.config import load_config
from reasonrl.errors import UserError
from reasonrl.training.trackers import open_trackers

CONFIG = {"train": {"lr": 1e-5, "seed": 3}, "rollout": {"group_size": 8}}
RECORDS = [(1, {"loss": 0.5, "reward/mean": 0.25}), (2, {"loss": 0.25, "reward/mean": 0.5, "eval/pass@4": 0.75})]


def _log(names: list[str], run_dir: Path, records: list, resume: bool = False) -> None:
    trackers = open_trackers(names, run_dir, CONFIG, resume)
    for step, metrics in records:
        for t in trackers:
            t.log(step, metrics)
    for t in trackers:
        t.close()


def test_mlflow_records_params_and_metrics_by_step_and_resumes_the_same_run(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    _log(["mlflow"], run_dir, RECORDS[:1])
    _log(["mlflow"], run_dir, RECORDS[1:], resume=True)
    run_id = json.loads((run_dir / "trackers.json").read_text())["mlflow"]
    client = mlflow.tracking.MlflowClient(f"sqlite:///{(run_dir / 'mlflow.db').resolve()}")
    run = client.get_run(run_id)
    assert run.data.params["train.lr"] == "1e-05" and run.data.params["rollout.group_size"] == "8"
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")] == [(1, 0.5), (2, 0.25)]
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "eval/pass_4")] == [(2, 0.75)]


def test_wandb_offline_writes_the_run_and_resumes_its_id(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    _log(["wandb"], run_dir, RECORDS[:1])
    first = json.loads((run_dir / "trackers.json").read_text())["wandb"]
    time.sleep(1.1)  # W&B names an offline run's folder by the second it starts: two in one second would share it
    _log(["wandb"], run_dir, RECORDS[1:], resume=True)
    assert json.loads((run_dir / "trackers.json").read_text())["wandb"] == first
    offline = list((run_dir / "wandb").glob(f"offline-run-*-{first}"))
    assert len(offline) == 2 and all(list(d.glob("*.wandb")) for d in offline)


def test_trackio_logs_locally(tmp_path):
    """In a fresh process: trackio reads TRACKIO_DIR when it is imported."""
    pytest.importorskip("trackio")
    code = textwrap.dedent(
        f"""
        import json, pathlib
        from reasonrl.training.trackers import open_trackers
        from trackio.sqlite_storage import SQLiteStorage
        run_dir = pathlib.Path({str(tmp_path / "run")!r}); run_dir.mkdir()
        [t] = open_trackers(["trackio"], run_dir, {CONFIG!r}, False)
        for step, metrics in {RECORDS!r}:
            t.log(step, metrics)
        t.close()
        print(json.dumps([(r["step"], r["loss"]) for r in SQLiteStorage.get_logs("reasonrl", "run")]))
        """
    )
    env = {**os.environ, "TRACKIO_DIR": str(tmp_path / "trackio")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [[1, 0.5], [2, 0.25]]
    assert (tmp_path / "trackio").is_dir()


def test_report_to_values_are_checked():
    assert load_config().train.report_to == []
    with pytest.raises(UserError, match="'wandbb'.*did you mean 'wandb'"):
        load_config(None, ["train.report_to=[wandbb]"])
    with pytest.raises(UserError, match="TensorBoard is train.tensorboard"):
        load_config(None, ["train.report_to=[tensorboard]"])


def test_a_run_reports_its_records_to_the_tracker(tiny_overrides, tmp_path, monkeypatch):
    """The trainer hands every metrics.jsonl record to the trackers of train.report_to."""
    mlflow = pytest.importorskip("mlflow")
    from reasonrl.training.trainer import Trainer

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_config(None, [*tiny_overrides, "train.report_to=[mlflow]", "train.steps=1"])
    trainer = Trainer(cfg, tmp_path / "run")
    trainer.train()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    run_id = json.loads((tmp_path / "run" / "trackers.json").read_text())["mlflow"]
    client = mlflow.tracking.MlflowClient(f"sqlite:///{(tmp_path / 'run' / 'mlflow.db').resolve()}")
    logged = {(m.step, m.value) for m in client.get_metric_history(run_id, "loss")}
    assert logged == {(r["step"], r["loss"]) for r in records if "loss" in r} and logged


def wandb_history(path: Path) -> dict[str, list[tuple[int, float]]]:
    """The history rows of an offline W&B run file, which W&B gives no reader for: a LevelDB-style log (a 7-byte
    header, then records of crc32, little-endian length and type in 32 KiB blocks) of `Record` protobufs."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, buf = path.read_bytes(), 7, b""
    assert data[:4] == b":W&B", "not a W&B run file"
    series: dict[str, list[tuple[int, float]]] = {}
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        buf += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind not in (1, 4):  # FULL or LAST ends a record
            continue
        record, buf = pb.Record.FromString(buf), b""
        if record.WhichOneof("record_type") == "history":
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                if not key.startswith("_"):
                    series.setdefault(key, []).append((record.history.step.num, json.loads(item.value_json)))
    return series


def test_wandb_and_mlflow_record_the_same_scalars_as_tensorboard(tiny_overrides, tmp_path, monkeypatch):
    """A 2-step run with train.report_to=[wandb, mlflow] and TensorBoard: W&B (offline) and MLflow (its local store, a
    SQLite file in the run directory; MLflow 3 refuses the old ./mlruns file store by default) hold every TensorBoard
    series, point for point."""
    mlflow = pytest.importorskip("mlflow")
    pytest.importorskip("wandb")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from reasonrl.training.trainer import Trainer

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "run"
    cfg = load_config(
        None, [*tiny_overrides, "train.report_to=[wandb,mlflow]", "train.steps=2", "train.tensorboard=true"]
    )
    Trainer(cfg, run_dir).train()
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0}).Reload()
    tb = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    assert {"loss", "reward/mean", "eval/accuracy"} <= set(tb) and len(tb["loss"]) == 2

    ids = json.loads((run_dir / "trackers.json").read_text())
    client = mlflow.tracking.MlflowClient(f"sqlite:///{(run_dir / 'mlflow.db').resolve()}")
    [wandb_file] = (run_dir / "wandb").glob(f"offline-run-*-{ids['wandb']}/run-{ids['wandb']}.wandb")
    wandb = wandb_history(wandb_file)
    assert set(wandb) == set(tb)
    for tag, series in tb.items():
        logged = sorted((m.step, m.value) for m in client.get_metric_history(ids["mlflow"], tag.replace("@", "_")))
        for name, got in (("mlflow", logged), ("wandb", sorted(wandb[tag]))):
            assert [s for s, _ in got] == [s for s, _ in series], (name, tag)
            assert [v for _, v in got] == pytest.approx([v for _, v in series], rel=1e-6), (name, tag)  # TB: float32
