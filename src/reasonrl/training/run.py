"""A whole training run: run directories, resume, and the loop around `Trainer.step` (evaluate, log, checkpoint)."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from reasonrl.config import Config, config_diff, load_config
from reasonrl.errors import UserError
from reasonrl.rewards.stage import REWARD_FUNCTIONS
from reasonrl.training.checkpoint import latest_checkpoint, saved_config
from reasonrl.training.distributed import agree, rank_from_env
from reasonrl.training.trainer import Trainer


def new_run_dir(cfg: Config) -> Path:
    name = cfg.train.run_name or agree(f"{cfg.algorithm.advantage}-{datetime.now():%Y%m%d-%H%M%S}", cfg.model.device)
    path = Path(cfg.train.output_dir) / name
    if (path / "config.yaml").exists() and rank_from_env() == 0:  # process 0 writes it
        if latest_checkpoint(path) is None:
            raise UserError(f"run directory {path} exists but has no checkpoint; delete it or pick another run_name")
        raise UserError(f"run directory {path} exists; pick another train.run_name or resume with --resume {path}")
    return path  # created by the Trainer once data and model have loaded, so a failed start leaves nothing


def resume_config(run_dir: Path, path: str | None, overrides: list[str]) -> Config:
    """The run's saved config; anything the user passes on top must not change it (resuming must be exact)."""
    saved = run_dir / "config.yaml"
    if not saved.exists():
        raise UserError(f"{run_dir} is not a reasonrl run directory (no config.yaml)")
    cfg = load_config(saved)
    check_received_code(cfg, saved, load_config(path, overrides))
    requested = load_config(path, overrides, base=cfg.to_dict())
    if diff := config_diff(cfg, requested):
        raise UserError(f"--resume uses the run's saved config; these keys differ: {', '.join(diff)}")
    ckpt = latest_checkpoint(run_dir)
    copy = saved_config(ckpt) if ckpt is not None else None
    if copy is not None and (edited := config_diff(load_config(copy), cfg)):
        raise UserError(
            f"{saved} was edited after {ckpt.name} was written (changed: {', '.join(edited)}); a resumed run keeps "
            f"the config it was trained with: restore those keys (the checkpoint's copy is {copy}), or start a new run"
        )
    return cfg


def check_received_code(saved: Config, where: Path, command_line: Config, *, rewards: bool = True) -> None:
    """A run directory is something people share, so the code its config would run (`model.trust_remote_code`,
    reward functions that are not built in) runs only when the command line (overrides or --config) asks for it as
    well. `rewards=False`: the command does not call the run's reward functions (eval)."""
    if saved.model.trust_remote_code and not command_line.model.trust_remote_code:
        raise UserError(
            f"{where} sets model.trust_remote_code=true, which runs the model's own Python code; to allow it, repeat "
            "model.trust_remote_code=true on the command line"
        )
    if not rewards:
        return
    imported = [n for n in saved.rewards.functions if n not in REWARD_FUNCTIONS]
    if missing := [n for n in imported if n not in command_line.rewards.functions]:
        listed = ",".join(f"'{n}'" if ":" in n else n for n in saved.rewards.functions)
        raise UserError(
            f"{where} imports reward functions {', '.join(missing)}, whose code would run in this process; to allow "
            f"it, repeat rewards.functions=[{listed}] on the command line"
        )


def finished_state(run_dir: Path) -> dict[str, Any] | None:
    """The final trainer state (step, elapsed_seconds, tokens_total, stopped_by) of a run that completed, else None.

    A run is complete once its final checkpoint, written after `model/`, is marked finished; runs from before the
    marker existed count as complete when that checkpoint reached `train.steps`.
    """
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None or not (run_dir / "model").is_dir():
        return None
    state = json.loads((ckpt / "trainer_state.json").read_text())
    if state.get("finished"):
        return state
    saved = run_dir / "config.yaml"
    if "finished" not in state and saved.exists() and state["step"] >= load_config(saved).train.steps:
        return {**state, "finished": True, "stopped_by": "steps"}
    return None


def run_training(
    cfg: Config, run_dir: Path, *, resume: bool, console: Any = None, progress: Any = None
) -> dict[str, Any]:
    """Train until `train.steps` or a `train.max_seconds` / `max_tokens` budget is reached, evaluating before and
    after; returns a summary for the CLI (`Trainer.train`)."""
    return Trainer(cfg, run_dir, resume=resume, console=console).train(progress)
