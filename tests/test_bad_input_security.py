"""Bad input, security family (issue 27): a run directory is something people share, so what it holds must not run
code on `train --resume` or `eval --model RUN` unless the command line asks for it. Each refusal is one error line
and exit 2 (no traceback).

Elsewhere: rollout workers die with their trainer (tests/test_train.py::
test_rollout_workers_do_not_outlive_a_killed_trainer); a hung or exiting user reward (tests/test_bad_input_rewards.py).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import TINY, assert_one_line_error, cli

from reasonrl.config import load_config
from reasonrl.training.checkpoint import latest_checkpoint
from reasonrl.training.trainer import Trainer

USER_REWARD = "'conftest:length_reward'"


@pytest.fixture(scope="module")
def received(tmp_path_factory) -> Path:
    """A run stopped after its step-1 checkpoint, with a user reward function, as someone might send it."""
    tmp = tmp_path_factory.mktemp("received")
    torch.set_num_threads(1)
    overrides = [*TINY, f"train.output_dir={tmp}", f"warmstart.cache_dir={tmp / 'cache'}",
                 f"rewards.functions=[math_answer, format, {USER_REWARD}]", "rewards.weights=[1, 0.1, 1]"]  # fmt: skip
    trainer = Trainer(load_config(None, overrides), tmp / "run")
    trainer.step()
    trainer.global_step += 1
    trainer.checkpoint()
    trainer.close()
    return tmp / "run"


class _RunsCode:
    """A pickle that would create a file when unpickled (as a crafted training_state.pt would run a command)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def craft_pickle(run: Path) -> None:
    state = latest_checkpoint(run) / "training_state.pt"
    blob = torch.load(state, weights_only=True)  # what reasonrl writes loads as tensors and plain values
    assert set(blob) == {"optimizer", "scheduler", "rng"}
    torch.save({"optimizer": _RunsCode(str(run.parent / "code-ran"))}, state)


def trust_remote_code(run: Path) -> None:
    for name in ("config.yaml", "checkpoints/step-000001/run_config.yaml"):
        path = run / name
        path.write_text(path.read_text().replace("trust_remote_code: false", "trust_remote_code: true"))


REPEAT = f"rewards.functions=[math_answer,format,{USER_REWARD}]"

# (what is done to the received run, the command after `reasonrl`, the text of the refusal)
CASES = [
    pytest.param(craft_pickle, ["train", "--resume", "{run}", REPEAT],
                 ["training_state.pt is not a reasonrl training state", "unpickling them could run code"],
                 id="code-execution:crafted-training-state-on-resume"),
    pytest.param(trust_remote_code, ["train", "--resume", "{run}", REPEAT],
                 ["config.yaml sets model.trust_remote_code=true", "repeat model.trust_remote_code=true"],
                 id="trust-remote-code-from-the-run-on-resume"),
    pytest.param(trust_remote_code, ["eval", "--model", "{run}", "-n", "1"],
                 ["config.yaml sets model.trust_remote_code=true", "repeat model.trust_remote_code=true"],
                 id="trust-remote-code-from-the-run-on-eval"),
    pytest.param(lambda run: None, ["train", "--resume", "{run}"],
                 ["config.yaml imports reward functions conftest:length_reward", f"repeat {REPEAT} on the command"],
                 id="reward-import-from-the-run-on-resume"),
]  # fmt: skip


@pytest.mark.parametrize("tamper, argv, parts", CASES)
def test_a_received_run_cannot_run_code_unasked(tamper, argv, parts, received, tmp_path, capfd):
    run = tmp_path / "run"
    shutil.copytree(received, run)
    tamper(run)
    res = cli(capfd, *(a.replace("{run}", str(run)) for a in argv))
    assert_one_line_error(res, *parts)
    assert not (tmp_path / "code-ran").exists()


def test_repeating_the_settings_on_the_command_line_allows_them(received, tmp_path, capfd):
    """The refusals above are not blanket ones: saying it again on the command line resumes the run."""
    run = tmp_path / "run"
    shutil.copytree(received, run)
    trust_remote_code(run)
    res = cli(capfd, "train", "--resume", str(run), REPEAT, "model.trust_remote_code=true")
    assert res.code == 0, res.err
    assert (run / "model").is_dir()
