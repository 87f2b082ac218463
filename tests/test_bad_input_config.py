"""Bad input, config family (issue 27): every bad config or command-line value the hardening issue lists, driven
through the CLI. Each case ends in one error line and exit 2 (no traceback), or, where the value is legal but
almost surely a mistake, a warning. Errors that need a model must come before any model work: those cases name a
model that does not exist, so reaching the model would give a different error."""

from __future__ import annotations

import pytest
from conftest import assert_one_line_error, assert_warned, cli

NO_MODEL = "model.name=/nonexistent/model-that-would-fail-to-load"

FILES = {
    "binary.yaml": bytes(range(256)) * 4,
    "invalid.yaml": b"train:\n  lr: 1.0e-5\n  steps: [1,\n",
    "twice.yaml": b"train:\n  lr: 1.0e-5\n  steps: 3\n  lr: 1.0e-3\n",
    "a_file": b"not a directory\n",
}

# (argv with {tmp} for the test's directory, "error" or "warning", the text it must contain)
CASES = [
    # YAML files
    pytest.param(["train", "--config", "{tmp}/binary.yaml"], "error", ["binary.yaml is not a text file"],
                 id="traceback:binary-yaml"),
    pytest.param(["train", "--config", "{tmp}/invalid.yaml"], "error", ["invalid.yaml: invalid YAML at line 4"],
                 id="misleading:invalid-yaml-names-its-line"),
    pytest.param(["train", "--config", "{tmp}"], "error", ["is a directory; give a YAML file"],
                 id="misleading:config-is-a-directory"),
    pytest.param(["train", "--config", "{tmp}/twice.yaml"], "error", ["key 'lr' is given twice (line 4); keep one"],
                 id="silent:duplicate-yaml-key"),
    # NaN and inf pass every bound check (nan < x is False) and trained silently wrong
    *[
        pytest.param(["train", "--print-config", o], "error", [f"config '{o.split('=')[0]}' must be a finite number"],
                     id=f"{'traceback' if o == 'train.lr=nan' else 'silent'}:{o}")
        for o in ("train.lr=nan", "train.lr=inf", "train.lr='nan'", "train.lr='inf'", "rollout.temperature=nan",
                  "algorithm.eps_low=nan", "algorithm.eps_high=.nan", "algorithm.beta=nan", "train.max_seconds=nan",
                  "rewards.timeout_s=inf", "algorithm.lampo.tau=-inf")
    ],
    # cross-field rules and legal-but-useless values
    pytest.param(["train", "--print-config", "algorithm.lanpo.mix={scratch: 1, reflect: 1}"], "error",
                 ["'algorithm.lanpo.mix' shares sum to 2", "make them sum to 1"], id="silent:lanpo-mix-not-1"),
    pytest.param(["train", "--print-config", "rollout.group_size=1"], "warning",
                 ["rollout.group_size=1", "nothing is learned"], id="silent:group-size-1"),
    # errors found before any model work (the model named here does not exist)
    pytest.param(["train", NO_MODEL, "rewards.weights=[1, 2, 3]"], "error", ["2 functions but 3 weights"],
                 id="misleading:reward-weights-length-before-model"),
    pytest.param(["train", NO_MODEL, "rewards.functions=[math_answer, 'no_such_module:f']", "rewards.weights=null"],
                 "error", ["cannot import module 'no_such_module'"], id="misleading:reward-import-before-model"),
    pytest.param(["train", NO_MODEL, "train.output_dir={tmp}/a_file"], "error",
                 ["a_file is a file; set train.output_dir to a directory"], id="traceback:output-dir-is-a-file"),
    # /proc takes no new directory, even from root (a chmod'ed directory would not stop root)
    pytest.param(["train", NO_MODEL, "train.output_dir=/proc/reasonrl-runs"], "error",
                 ["cannot write run directory /proc/reasonrl-runs/", "set train.output_dir to a writable"],
                 id="traceback:output-dir-read-only"),
    # eval's counts: 0 became the default, a negative count a slice (-n -5 evaluated 195 problems)
    *[
        pytest.param(["eval", "--model", "{tmp}/not-read", flag, value], "error", [f"{name} must be >= 1"],
                     id=f"{'traceback' if value == '-1' else 'silent'}:eval{flag}={value}")
        for flag, value in (("-k", "-1"), ("-k", "0"), ("-n", "0"), ("-n", "-5"), ("--samples", "0"))
        for name in [flag.replace("-n", "-n/--num-problems") if flag == "-n" else flag]
    ],
]  # fmt: skip


@pytest.mark.parametrize("argv, outcome, parts", CASES)
def test_bad_config(argv, outcome, parts, tmp_path, capfd, monkeypatch):
    for name, data in FILES.items():
        (tmp_path / name).write_bytes(data)
    monkeypatch.chdir(tmp_path)  # a run directory created by mistake would land here
    res = cli(capfd, *(a.replace("{tmp}", str(tmp_path)) for a in argv))
    if outcome == "error":
        assert_one_line_error(res, *(p.replace("{tmp}", str(tmp_path)) for p in parts))
        assert not (tmp_path / "runs").exists()
    else:
        assert res.code == 0, res.err
        assert_warned(res, *parts)


def test_case_ids_are_unique():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))
