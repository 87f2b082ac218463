"""Bad input, data family (issue 27): problems the model cannot take and datasets that cannot be reached, driven
through the CLI. Each case ends in one error line and exit 2 (no traceback), or a warning with a count.

Elsewhere: missing files and malformed rows (tests/test_cli.py::test_user_errors, tests/test_data.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import assert_one_line_error, assert_warned, cli

NO_WARMSTART = ["warmstart.steps=0", "train.steps=1", "train.run_name=r"]


def write(path, prompts: list[str]) -> str:
    path.write_text(
        "".join(json.dumps({"id": f"p{i}", "prompt": p, "answer": "2"}) + "\n" for i, p in enumerate(prompts))
    )
    return str(path)


# (prompts of a data file, "error" or "warning", the text it must contain)
CASES = [
    pytest.param(["Q: 1+1\n", "Q: " + "1+1=" * 1_000_000], "error",
                 ["problem 'p1' of", "does not fit the model's 512 positions", "data.max_prompt_length"],
                 id="hang:4-MB-prompt"),
    pytest.param(["Q: 1+1\n"] * 3 + ["Wie viel ist 1+1? Grüße\n"], "warning",
                 ["1 of 4 prompts of", "(e.g. problem 'p3') contain 2 characters the tokenizer does not know",
                  "'ß', 'ü'", "<unk>"], id="silent:characters-outside-the-tiny-alphabet"),
]  # fmt: skip


@pytest.mark.parametrize("prompts, outcome, parts", CASES)
def test_bad_data(prompts, outcome, parts, tiny_overrides, tmp_path, capfd):
    source = write(tmp_path / "data.jsonl", prompts)
    res = cli(capfd, "train", *tiny_overrides, *NO_WARMSTART, f"data.source={source}", f"data.eval_source={source}")
    if outcome == "error":
        assert_one_line_error(res, *parts)
    else:
        assert res.code == 0, res.err
        assert_warned(res, *parts)


def test_an_offline_hub_dataset_is_one_line(tiny_overrides, tmp_path):
    """End to end (the variable must be set before the hub library loads): no retry lines, one error line."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    cmd = [sys.executable, "-m", "reasonrl", "train", *tiny_overrides, "data.source=nobody-here/no-such-dataset"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
    assert "cannot load dataset 'nobody-here/no-such-dataset'" in res.stderr and "Traceback" not in res.stderr
