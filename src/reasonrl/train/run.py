"""A whole training run: run directories, resume, and the loop around `Trainer.step` (evaluate, log, checkpoint)."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from reasonrl.config import Config, config_diff, load_config
from reasonrl.errors import UserError
from reasonrl.train.checkpoint import latest_checkpoint
from reasonrl.train.distributed import agree, rank_from_env
from reasonrl.train.trainer import Trainer


def new_run_dir(cfg: Config) -> Path:
    name = cfg.train.run_name or agree(f"{cfg.algorithm.advantage}-{datetime.now():%Y%m%d-%H%M%S}", cfg.model.device)
    path = Path(cfg.train.output_dir) / name
    if (path / "config.yaml").exists() and rank_from_env() == 0:  # process 0 writes it
        raise UserError(f"run directory {path} exists; pick another train.run_name or resume with --resume {path}")
    return path  # created by the Trainer once data and model have loaded, so a failed start leaves nothing


def resume_config(run_dir: Path, path: str | None, overrides: list[str]) -> Config:
    """The run's saved config; anything the user passes on top must not change it (resuming must be exact)."""
    saved = run_dir / "config.yaml"
    if not saved.exists():
        raise UserError(f"{run_dir} is not a reasonrl run directory (no config.yaml)")
    cfg = load_config(saved)
    requested = load_config(path, overrides, base=cfg.to_dict())
    if diff := config_diff(cfg, requested):
        raise UserError(f"--resume uses the run's saved config; these keys differ: {', '.join(diff)}")
    return cfg


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


def run_training(cfg: Config, run_dir: Path, *, resume: bool, console: Any, progress: Any) -> dict[str, Any]:
    """Train until `train.steps` or a `train.max_seconds` / `max_tokens` budget is reached, evaluating before and
    after; returns a summary for the CLI."""
    trainer = Trainer(cfg, run_dir, resume=resume, console=console)
    t = cfg.train
    summary: dict[str, Any] = {"run_dir": str(run_dir)}
    try:
        if not resume:
            before = trainer.evaluate()
            trainer.log(0, before)
            summary["eval_before"] = before
        elif trainer.procs.is_main:
            summary["eval_before"] = next((m for m in _read_log(run_dir) if "eval/accuracy" in m), {})
        task = progress.add_task("RL", total=t.steps, completed=trainer.global_step, status="")
        while trainer.stop_reason() is None:
            metrics = trainer.step()
            trainer.global_step += 1
            # cumulative counters, so that reports can plot against wall-clock and tokens as well as steps
            trainer.elapsed += metrics["time/step"]
            trainer.tokens_total += int(metrics["tokens/sampled"])
            metrics["time/elapsed"], metrics["tokens/total"] = trainer.elapsed, trainer.tokens_total
            last = trainer.stop_reason() is not None  # the final eval and checkpoint follow the loop
            if t.eval_every and trainer.global_step % t.eval_every == 0 and not last:
                metrics.update(trainer.evaluate())
            trainer.log(trainer.global_step, metrics)
            progress.update(
                task,
                advance=1,
                status=f"reward {metrics.get('reward/mean', float('nan')):.3f} "
                f"acc {metrics.get('accuracy', float('nan')):.3f}" + _budget_status(trainer),
            )
            if t.sample_every and trainer.global_step % t.sample_every == 0 and console is not None:
                for prompt, text, reward in trainer.last_samples:
                    console.print(
                        f"[dim]step {trainer.global_step} · reward {reward:.2f}[/dim] "
                        f"{prompt.strip()!r} → {text.strip()!r}",
                        highlight=False,
                    )
            if t.save_every and trainer.global_step % t.save_every == 0 and not last:
                trainer.checkpoint()
        after = trainer.evaluate()
        trainer.log(trainer.global_step, after)
        summary["eval_after"] = after
        if trainer.procs.is_main:
            final = run_dir / "model"
            trainer.model.save_pretrained(final)
            trainer.tokenizer.save_pretrained(final)
        trainer.checkpoint(finished=True)  # last: a run killed before this resumes from its previous checkpoint
        summary.update(
            step=trainer.global_step,
            stopped_by=trainer.stop_reason(),
            elapsed_seconds=trainer.elapsed,
            tokens_total=trainer.tokens_total,
        )
    finally:
        trainer.close()
    return summary


def _budget_status(trainer: Trainer) -> str:
    """How much of a seconds / tokens budget is spent, for the progress line (the bar itself counts steps)."""
    t = trainer.cfg.train
    out = f" · {trainer.elapsed:.1f}/{t.max_seconds:g} s" if t.max_seconds is not None else ""
    return out + (f" · {trainer.tokens_total}/{t.max_tokens} tokens" if t.max_tokens is not None else "")


def _read_log(run_dir: Path) -> list[dict[str, Any]]:
    from reasonrl.train.metrics import read_metrics

    return read_metrics(run_dir)
