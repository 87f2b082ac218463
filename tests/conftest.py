"""Shared fixtures: a tiny, fast configuration of the embedded task."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from reasonrl.config import Config, load_config

TINY = [
    "model.hidden_size=32",
    "model.num_layers=2",
    "model.num_heads=2",
    "model.intermediate_size=64",
    "task.train_size=200",
    "task.eval_size=8",
    "warmstart.steps=3",
    "warmstart.batch_size=8",
    "rollout.group_size=4",
    "rollout.prompts_per_step=3",
    "rollout.max_new_tokens=24",
    "train.steps=2",
    "train.lr=1e-3",
    "train.tensorboard=false",
    "train.sample_every=0",
    "eval.num_problems=8",
    "rewards.num_workers=1",
]


@pytest.fixture
def tiny_overrides(tmp_path) -> list[str]:
    return [*TINY, f"train.output_dir={tmp_path / 'runs'}", f"warmstart.cache_dir={tmp_path / 'cache'}"]


@pytest.fixture
def tiny_config(tiny_overrides) -> Config:
    torch.set_num_threads(1)
    return load_config(None, tiny_overrides)


def user_error(parts: list[str], fn, *args, **kwargs) -> str:
    """Call fn expecting a UserError: one line containing every part."""
    from reasonrl.errors import UserError

    with pytest.raises(UserError) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg, msg
    for part in parts:
        assert part in msg, f"{part!r} not in {msg!r}"
    return msg


def length_reward(prompts: list[str], completions: list[str], **columns) -> list[float]:
    """A dense test reward (length plus a content hash) so that even an untrained policy gets non-zero advantages."""
    return [len(c) / 10 + sum(map(ord, c)) % 7 / 7 for c in completions]


def held_length_reward(prompts: list[str], completions: list[str], **columns) -> list[float]:
    """`length_reward`; with REASONRL_TEST_HOLD=RUN_DIR set, a call made once RUN_DIR has a checkpoint marks its process
    (RUN_DIR/held-PID) and sleeps: a run held inside the step after its first checkpoint, for a test to SIGKILL."""
    hold = os.environ.get("REASONRL_TEST_HOLD")
    if hold and (Path(hold) / "checkpoints" / "latest").exists():
        (Path(hold) / f"held-{os.getpid()}").touch()
        time.sleep(120)
    return length_reward(prompts, completions, **columns)


def untrained_run(tmp_path: Path, overrides: list[str]) -> Path:
    """A run directory as `reasonrl train` leaves it, without training: config.yaml and an untrained model/."""
    from reasonrl.demo import arithmetic
    from reasonrl.demo.tiny_model import build_tiny_model

    cfg = load_config(None, overrides)
    run = tmp_path / "run"
    run.mkdir(parents=True)
    cfg.save(run / "config.yaml")
    tok = arithmetic.build_tokenizer()
    torch.manual_seed(0)
    model = build_tiny_model(cfg.model, len(tok), tok.pad_token_id, tok.eos_token_id)
    model.save_pretrained(run / "model")
    tok.save_pretrained(run / "model")
    return run


def constant_reward(prompts: list[str], completions: list[str], **columns) -> list[float]:
    """The same non-dyadic reward for every completion: a float32 std of such a group is a rounding residue, not 0."""
    return [0.1] * len(completions)


# ---- bad input (tests/test_bad_input_*.py): the CLI driven as a user would, one table of cases per family


@dataclass
class CliResult:
    code: int
    out: str
    err: str
    warnings: list[str]


def cli(capfd, *argv: str) -> CliResult:
    """`reasonrl ARGV` through the CLI's `main` in this process: exit code, stdout, stderr and reasonrl's warnings
    (which pytest captures instead of printing). Any exception but a UserError escapes `main`, so a traceback the
    user would see fails the test."""
    import warnings

    import transformers
    from huggingface_hub.utils import disable_progress_bars

    from reasonrl.cli import main

    # what main()'s environment variables do when libraries are imported after them, as in a real `reasonrl` run
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    disable_progress_bars()
    capfd.readouterr()
    formatwarning = warnings.formatwarning  # main() installs its one-line format: restored for the other tests
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            code = main(list(argv))
    finally:
        warnings.formatwarning = formatwarning
    out, err = capfd.readouterr()
    return CliResult(code, out, err, [str(w.message) for w in caught])


def assert_one_line_error(res: CliResult, *parts: str) -> str:
    """Exit 2, stderr exactly one 'reasonrl: error:' line containing every part, no traceback anywhere."""
    lines = [ln for ln in res.err.splitlines() if ln.strip()]
    assert res.code == 2, (res.code, res.err)
    assert len(lines) == 1 and lines[0].startswith("reasonrl: error: "), res.err
    for part in parts:
        assert part in lines[0], f"{part!r} not in {lines[0]!r}"
    assert "Traceback" not in res.err + res.out
    return lines[0]


def assert_warned(res: CliResult, *parts: str) -> str:
    """A warning containing every part was given (and the command itself did not fail with a traceback)."""
    hits = [w for w in res.warnings if all(p in w for p in parts)]
    assert hits, f"no warning with {parts}; warnings: {res.warnings}"
    assert "\n" not in hits[0] and "Traceback" not in res.err
    return hits[0]


def sleeping_reward(prompts: list[str], completions: list[str], **columns) -> list[float]:
    """Never returns within any test's timeout (a hung user reward)."""
    time.sleep(3600)
    return [0.0] * len(completions)


def exiting_reward(prompts: list[str], completions: list[str], **columns) -> list[float]:
    raise SystemExit(0)


def no_opinion_reward(prompts: list[str], completions: list[str], **columns) -> list[float | None]:
    """No value for any completion: half None, half NaN (a broken function looks like this)."""
    return [None if i % 2 else float("nan") for i in range(len(completions))]
