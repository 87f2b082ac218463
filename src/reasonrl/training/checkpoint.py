"""Atomic checkpoints: weights (safetensors), optimiser, scheduler, RNG states and data position.

A checkpoint is written to `checkpoints/step-N.tmp`, renamed into place, and only then named in `checkpoints/latest`
(itself replaced atomically): a run killed at any instant leaves the previous checkpoint intact and loadable.

A multi-process run's checkpoint holds every process's RNG state. Resumed on the same number of processes it
continues exactly; on another number, the processes it did not have are re-seeded (training continues correctly,
but its samples differ from an uninterrupted run). LoRA runs save only their adapters.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from reasonrl.errors import UserError

RUN_CONFIG = "run_config.yaml"  # the run's config as it was when the checkpoint was written


def rng_state() -> dict[str, Any]:
    """Every RNG's state as tensors and plain Python values, so that `torch.load(weights_only=True)` reads it back."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = (kind, keys.tolist(), int(pos), int(has_gauss), float(gauss))
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: Any,
    tokenizer: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    trainer_state: dict[str, Any],
    keep: int,
    rng: list[dict[str, Any]] | None = None,
    weights: dict[str, torch.Tensor] | None = None,
    optimizer_state: dict[str, Any] | None = None,
    config_yaml: str | None = None,
) -> Path:
    """`rng`: the RNG state of every process, in rank order (default: this process's). `weights` /
    `optimizer_state`: the full states gathered from a sharded model (default: the model's and optimiser's own);
    a `train.sharding=fsdp` run's optimiser state is keyed by parameter name (whatever its process count), marked
    `optimizer_format: fqn`, so that any process count resumes it. `config_yaml`: the run's config, kept as
    `run_config.yaml` so that a resume can tell an edited `config.yaml`.

    A write that fails (a full disk) removes its partial checkpoint and raises a UserError; the previous checkpoint
    is untouched."""
    root = run_dir / "checkpoints"
    final = root / f"step-{step:06d}"
    tmp = root / f"step-{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        model.save_pretrained(tmp, safe_serialization=True, state_dict=weights)
        tokenizer.save_pretrained(tmp)
        blob = {"scheduler": scheduler.state_dict(), "rng": rng or [rng_state()]}
        if optimizer_state is None:
            blob["optimizer"] = optimizer.state_dict()
        else:
            blob.update(optimizer=optimizer_state, optimizer_format="fqn")
        torch.save(blob, tmp / "training_state.pt")
        if config_yaml is not None:
            (tmp / RUN_CONFIG).write_text(config_yaml)
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **trainer_state}, indent=1))
        _fsync_dir(tmp)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_checkpoint(run_dir)
        after = f"resume from {previous.name} with --resume {run_dir}" if previous else "start the run again"
        raise UserError(
            f"cannot write checkpoint {final} ({e.strerror or e}); free space or fix the directory, then {after}"
        ) from None
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _write_atomic(root / "latest", final.name)
    for old in sorted(p for p in root.glob("step-*") if not p.name.endswith(".tmp"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def check_writable(run_dir: Path) -> None:
    """Refuse, before any model work, a run directory that cannot be created or written (a read-only place, a file
    where a directory should be); the probe leaves nothing behind."""
    import tempfile

    existing = run_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(
            f"cannot create run directory {run_dir}: {existing} is a file; set train.output_dir to a directory"
        )
    try:
        tempfile.TemporaryDirectory(dir=existing).cleanup()
    except OSError as e:
        raise UserError(
            f"cannot write run directory {run_dir} ({e.strerror or e} in {existing}); set train.output_dir to a "
            "writable directory"
        ) from None


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint: the one `latest` names when it is whole, else the newest `step-*` directory
    that is (a pointer to a deleted or damaged step falls back to the steps that exist)."""
    root = run_dir / "checkpoints"
    pointer = root / "latest"
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        if checkpoint_problem(named) is None:
            return named
    return next((p for p in reversed(_step_dirs(root)) if checkpoint_problem(p) is None), None)


def _step_dirs(root: Path) -> list[Path]:
    """The `step-*` checkpoint directories under `root`, oldest first (unfinished `.tmp` writes aside)."""
    return sorted(p for p in root.glob("step-*") if not p.name.endswith(".tmp"))


def checkpoint_problem(path: Path) -> str | None:
    """Why `path` is not a complete checkpoint (a missing or empty file, an unreadable trainer state), else None."""
    if not path.is_dir():
        return "missing"
    weights = "adapter_model.safetensors" if (path / "adapter_model.safetensors").exists() else "model.safetensors"
    for name in (weights, "training_state.pt", "trainer_state.json"):
        file = path / name
        if not file.is_file() or file.stat().st_size == 0:
            return f"{name} is missing or empty"
    if problem := _safetensors_problem(path / weights):
        return f"{weights} {problem}"
    try:
        state = json.loads((path / "trainer_state.json").read_text())
        int(state["step"])
    except (ValueError, KeyError, TypeError):
        return "trainer_state.json is unreadable"
    return None


def _safetensors_problem(file: Path) -> str | None:
    """Why a safetensors file is not whole (its header unreadable, its size not the one the header gives), or None;
    reads the header only."""
    size = file.stat().st_size
    try:
        with open(file, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n <= 0 or 8 + n > size:
                return "is truncated or not a safetensors file"
            header = json.loads(f.read(n))
        end = max((int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError):
        return "has a damaged header"
    return None if size == 8 + n + end else f"is {size} bytes, its header says {8 + n + end} (truncated?)"


def damaged_checkpoints(run_dir: Path) -> list[str]:
    """'step-N: why' for every checkpoint directory of `run_dir` that is not complete."""
    steps = _step_dirs(run_dir / "checkpoints")
    return [f"{p.name}: {why}" for p in steps if (why := checkpoint_problem(p)) is not None]


def pointer_fallback(run_dir: Path, used: Path) -> str | None:
    """What `checkpoints/latest` names when that is not the checkpoint `latest_checkpoint` chose, else None."""
    pointer = run_dir / "checkpoints" / "latest"
    named = pointer.read_text().strip() if pointer.is_file() else None
    return named if named is not None and named != used.name else None


def saved_config(checkpoint: Path) -> Path | None:
    """The run's config as the checkpoint was written (`run_config.yaml`; checkpoints from before it: None)."""
    path = checkpoint / RUN_CONFIG
    return path if path.is_file() else None


def load_checkpoint(
    path: Path, model: Any, optimizer: torch.optim.Optimizer, scheduler: Any, rank: int = 0, world: int = 1
) -> dict[str, Any]:
    """Restore weights (or LoRA adapters), optimiser, scheduler and this process's RNG in place; return the trainer
    state (step, data cursor...)."""
    from safetensors.torch import load_file, load_model

    from reasonrl.training.fsdp import is_sharded

    sharded = is_sharded(model)
    blob = _load_training_state(path / "training_state.pt")
    by_name = blob.get("optimizer_format") == "fqn"
    if sharded and not by_name:  # AdamW's state keyed by position: only the model it was written from reads it
        raise UserError(f"checkpoint {path} was written with train.sharding=none: resume it with train.sharding=none")
    try:
        if sharded:  # every process reads the full weights and keeps its shard (any process count)
            from reasonrl.training.fsdp import load_model_state

            load_model_state(model, load_file(path / "model.safetensors"))
        elif (path / "adapter_model.safetensors").exists():
            from peft import set_peft_model_state_dict

            result = set_peft_model_state_dict(model, load_file(path / "adapter_model.safetensors"))
            if result.unexpected_keys:
                raise UserError(
                    f"checkpoint {path} does not fit the adapters (unexpected {result.unexpected_keys[:3]}); was the "
                    "run's config.yaml (lora.*) edited? restore it"
                )
        else:
            missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False)
            tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
            if unexpected or set(missing) - tied:
                raise UserError(
                    f"checkpoint {path} does not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]}); "
                    "was the run's config.yaml (model.*) edited? restore it"
                )
    except UserError:
        raise
    except Exception as e:  # safetensors' header errors, torch's size mismatches: a damaged or foreign checkpoint
        first = str(e).strip().splitlines()
        detail = next((ln.strip() for ln in first if "size mismatch" in ln), first[0] if first else type(e).__name__)
        raise UserError(
            f"checkpoint {path} cannot be loaded into this run's model ({detail}); was the run's config.yaml "
            "edited (restore it), or is the checkpoint damaged (delete it to resume from an earlier one)?"
        ) from None
    if by_name:  # any process count, sharded or not: each process keeps its shard of the full state
        from reasonrl.training.fsdp import load_optimizer_state

        load_optimizer_state(model, optimizer, blob["optimizer"])
    else:
        optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    states = blob["rng"] if isinstance(blob["rng"], list) else [blob["rng"]]  # a dict: single-process checkpoints
    state = json.loads((path / "trainer_state.json").read_text())
    if len(states) == world:
        set_rng_state(states[rank])
    else:  # another process count: no exact continuation of the samples exists; seed each process apart
        seed = int(state["step"]) * 1_000_003 + rank
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
    return state


def _load_training_state(file: Path) -> dict[str, Any]:
    """The optimiser, scheduler and RNG states, unpickled with `weights_only=True`: a run directory is something
    people share, and a crafted pickle must not run code on `--resume`. Checkpoints written before the RNG states
    were stored as plain values hold numpy arrays; their reconstruction (data, not code) is allowed as well."""
    import pickle
    import zipfile

    if not zipfile.is_zipfile(file):  # torch.save writes a zip archive; anything else is damage, not a pickle to try
        raise UserError(
            f"{file} is damaged (not a torch.save archive); delete its checkpoint directory to resume from an "
            "earlier one, or start a new run"
        )
    core = getattr(np, "_core", None) or np.core  # numpy 2 renamed numpy.core
    allowed = [np.ndarray, np.dtype, type(np.dtype(np.uint32)), core.multiarray._reconstruct]
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(file, weights_only=True)
    except pickle.UnpicklingError:
        raise UserError(
            f"{file} is not a reasonrl training state: it holds objects other than tensors and plain values, and "
            "unpickling them could run code; resume from another checkpoint or start a new run"
        ) from None


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    for p in path.iterdir():
        with open(p, "rb") as f:
            os.fsync(f.fileno())
