"""External experiment trackers (`train.report_to`): Weights & Biases, MLflow, Trackio.

Each receives the run's config once and every metrics record with its step, beside `metrics.jsonl` (the record of
truth) and TensorBoard. Where they store data is each library's own setting (`WANDB_MODE=offline`, `WANDB_PROJECT`,
`MLFLOW_TRACKING_URI`, `MLFLOW_EXPERIMENT_NAME`, `TRACKIO_DIR`, ...); without one, MLflow writes a SQLite store in
the run directory (`mlflow.db`). The tracker's run id is kept in `trackers.json` in the run directory, so
`--resume` continues the same tracker run. A tracker keeps what the killed run logged after its last checkpoint;
`metrics.jsonl` does not.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from pathlib import Path
from typing import Any, Protocol

from reasonrl.config import flatten
from reasonrl.errors import UserError

TRACKERS = ("wandb", "mlflow", "trackio")
PROJECT = "reasonrl"  # the project / experiment name when the library's own setting gives none


class Tracker(Protocol):
    def log(self, step: int, metrics: dict[str, float]) -> None: ...

    def close(self) -> None: ...


def open_trackers(names: list[str], run_dir: Path, config: dict[str, Any], resume: bool) -> list[Tracker]:
    """One tracker per name (process 0 only), continuing the run's earlier tracker runs on resume."""
    ids_file = run_dir / "trackers.json"
    ids = json.loads(ids_file.read_text()) if resume and ids_file.is_file() else {}
    opened: list[Tracker] = []
    for name in names:
        try:
            module = __import__(name)
        except ImportError:
            raise UserError(f"train.report_to lists {name}, which is not installed: pip install {name}") from None
        tracker, ids[name] = _OPEN[name](module, run_dir, config, ids.get(name))
        opened.append(tracker)
    if names:
        ids_file.write_text(json.dumps(ids))
    return opened


def _numbers(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class _LogFinish:
    """A tracker whose run object has `log(metrics, step=)` and `finish()`: a W&B run, the trackio module."""

    def __init__(self, run: Any) -> None:
        self.run = run

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(_numbers(metrics), step=step)

    def close(self) -> None:
        self.run.finish()


def _open_wandb(wandb: Any, run_dir: Path, config: dict[str, Any], run_id: str | None) -> tuple[Tracker, str]:
    run_id = run_id or secrets.token_hex(4)  # wandb ids: short, unique per project
    run = wandb.init(
        project=os.environ.get("WANDB_PROJECT", PROJECT), name=run_dir.name, id=run_id, dir=str(run_dir),
        config=config, resume="allow",
    )  # fmt: skip
    return _LogFinish(run), run_id


class _Mlflow:
    _BAD = re.compile(r"[^\w\-. /]")  # MLflow's allowed metric-name characters

    def __init__(self, mlflow: Any, run_id: str) -> None:
        self.mlflow, self.run_id = mlflow, run_id

    def log(self, step: int, metrics: dict[str, float]) -> None:
        named = {self._BAD.sub("_", k): v for k, v in _numbers(metrics).items()}  # e.g. eval/pass@8 -> eval/pass_8
        self.mlflow.log_metrics(named, step=step, run_id=self.run_id)

    def close(self) -> None:
        self.mlflow.end_run()


def _open_mlflow(mlflow: Any, run_dir: Path, config: dict[str, Any], run_id: str | None) -> tuple[Tracker, str]:
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        mlflow.set_tracking_uri(f"sqlite:///{(run_dir / 'mlflow.db').resolve()}")  # MLflow's local default store
    if run_id is None:
        mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", PROJECT))
        run = mlflow.start_run(run_name=run_dir.name)
        mlflow.log_params({k: str(v)[:500] for k, v in flatten(config).items()})
    else:
        run = mlflow.start_run(run_id=run_id)
    return _Mlflow(mlflow, run.info.run_id), run.info.run_id


def _open_trackio(trackio: Any, run_dir: Path, config: dict[str, Any], run_id: str | None) -> tuple[Tracker, str]:
    name = run_id or run_dir.name
    trackio.init(
        project=PROJECT, name=name, config=config, resume="allow" if run_id else "never", embed=False,
        auto_log_cpu=False, auto_log_gpu=False,  # the run's own metrics only
    )  # fmt: skip
    return _LogFinish(trackio), name


_OPEN = {"wandb": _open_wandb, "mlflow": _open_mlflow, "trackio": _open_trackio}
