"""Shared budgets and `reasonrl compare`: seconds / token budgets stop training and survive a kill, and a comparison
runs labels × seeds, records them in a manifest, and picks up where a killed invocation left off."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from reasonrl.cli import main
from reasonrl.errors import UserError
from reasonrl.tools.compare import parse_variant, split_overrides

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def steps(run_dir: Path) -> list[dict]:
    """The step records of metrics.jsonl (not the eval-only ones)."""
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "time/step" in r]


def final_state(run_dir: Path) -> dict:
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    return json.loads((run_dir / "checkpoints" / latest / "trainer_state.json").read_text())


def assert_cumulative(rows: list[dict]) -> None:
    """time/elapsed and tokens/total are running sums of time/step and tokens/sampled (same order: exact)."""
    elapsed, tokens = 0.0, 0
    for r in rows:
        elapsed, tokens = elapsed + r["time/step"], tokens + r["tokens/sampled"]
        assert (r["time/elapsed"], r["tokens/total"]) == (elapsed, tokens), r["step"]


# --------------------------------------------------------------------------------------------------------------
# Budgets in training


@pytest.mark.parametrize("budget", ["train.max_tokens=500", "train.max_seconds=0.2"])
def test_budget_stops_training_and_is_recorded(tiny_overrides, tmp_path, capsys, budget):
    args = ["train", *tiny_overrides, "train.steps=1000", "train.run_name=b", budget]
    assert main(args) == 0
    run = tmp_path / "runs" / "b"
    rows, state = steps(run), final_state(run)
    assert_cumulative(rows)
    key, limit = budget.split("=")
    counter = "tokens/total" if key == "train.max_tokens" else "time/elapsed"
    assert rows[-1][counter] >= float(limit) and (len(rows) == 1 or rows[-2][counter] < float(limit))
    assert state["finished"] and state["stopped_by"] == key.removeprefix("train.") and state["step"] == len(rows) < 1000
    assert (state["elapsed_seconds"], state["tokens_total"]) == (rows[-1]["time/elapsed"], rows[-1]["tokens/total"])
    assert (run / "model" / "model.safetensors").exists()
    assert "eval/accuracy" in json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])  # final eval
    assert "reached" in capsys.readouterr().out

    assert main(["train", "--resume", str(run)]) == 2
    assert f"already finished: {budget}" in capsys.readouterr().err


def test_budget_counters_survive_sigkill_and_resume(tiny_overrides, tmp_path):
    """Killed after a checkpoint and resumed, the counters go on from the checkpoint, and the token budget counts the
    tokens generated before the kill."""
    args = [*tiny_overrides, "train.steps=1000", "train.max_tokens=6000", "train.save_every=4", "train.run_name=k"]
    cmd = [sys.executable, "-m", "reasonrl", "train"]
    proc = subprocess.Popen([*cmd, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    run = tmp_path / "runs" / "k"
    latest = run / "checkpoints" / "latest"
    deadline = time.monotonic() + 120
    while not (latest.exists() and latest.read_text().strip() >= "step-000004") and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = final_state(run)
    assert killed_at["tokens_total"] > 0 and not killed_at.get("finished")

    res = subprocess.run([*cmd, "--resume", str(run)], capture_output=True, text=True, env=ENV, timeout=120)
    assert res.returncode == 0, res.stderr
    rows, state = steps(run), final_state(run)
    assert_cumulative(rows)
    at_kill = next(r for r in rows if r["step"] == killed_at["step"])
    assert at_kill["time/elapsed"] == killed_at["elapsed_seconds"]
    assert at_kill["tokens/total"] == killed_at["tokens_total"]
    assert state["stopped_by"] == "max_tokens" and rows[-1]["tokens/total"] >= 6000 > rows[-2]["tokens/total"]


# --------------------------------------------------------------------------------------------------------------
# reasonrl compare


@pytest.fixture
def common(tiny_overrides) -> list[str]:
    """The tiny config for every run; compare itself sets the output directory and the step budget."""
    return [o for o in tiny_overrides if not o.startswith(("train.output_dir=", "train.steps="))]


def compare(out: Path, *args: str, common: list[str]) -> list[str]:
    return [sys.executable, "-m", "reasonrl", "compare", *args, "--out", str(out), "--", *common]


def manifest(out: Path) -> dict:
    return json.loads((out / "compare.json").read_text())


def attempts(log: Path) -> int:
    return log.read_text().count("=== reasonrl compare: attempt")


def test_split_overrides_and_labels():
    assert split_overrides("a.b=1,c.d=[x, y] e.f='p q'") == ["a.b=1", "c.d=[x, y]", "e.f='p q'"]
    assert parse_variant("lanpo+lampo=algorithm.lanpo.enabled=true,algorithm.advantage=lampo") == (
        "lanpo+lampo",
        ["algorithm.lanpo.enabled=true", "algorithm.advantage=lampo"],
    )
    assert parse_variant("base=") == ("base", [])
    with pytest.raises(UserError, match="after `--`"):
        parse_variant("train.steps=3")
    with pytest.raises(UserError, match="not LABEL=OVERRIDES"):
        parse_variant("grpo")


def test_compare_two_labels_two_seeds_in_parallel(common, tmp_path):
    out = tmp_path / "cmp"
    labels = ["grpo=algorithm.advantage=grpo", "lampo=algorithm.advantage=lampo"]
    res = subprocess.run(
        compare(out, *labels, "--seeds", "0", "1", "--steps", "2", "--jobs", "2", common=common),
        capture_output=True, text=True, env=ENV, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    m = manifest(out)
    assert m["labels"] == {"grpo": ["algorithm.advantage=grpo"], "lampo": ["algorithm.advantage=lampo"]}
    assert m["seeds"] == [0, 1] and m["budget"] == {"steps": 2, "seconds": None, "tokens": None}
    assert list(m["runs"]) == ["grpo-seed0", "grpo-seed1", "lampo-seed0", "lampo-seed1"]
    for name, r in m["runs"].items():
        assert (r["status"], r["exit_code"], r["attempts"]) == ("done", 0, 1), name
        assert r["result"]["steps"] == 2 and r["result"]["eval_accuracy"] is not None
        run = out / r["dir"]
        assert (run / "model").is_dir() and (out / r["log"]).exists()
        saved = (run / "config.yaml").read_text()
        assert f"seed: {r['seed']}" in saved and f"advantage: {r['label']}" in saved and "eval_every: 10" in saved
    assert "reasonrl report" in res.stdout and "lampo" in res.stdout

    # a different comparison in the same directory is refused, in one line
    for other in (labels[:1], [*labels, "--steps", "3"]):
        res = subprocess.run(compare(out, *other, "--seeds", "0", "1", common=common), capture_output=True, text=True)
        assert res.returncode == 2 and res.stderr.count("\n") == 1 and "different comparison" in res.stderr


def test_killed_compare_continues_without_redoing_finished_runs(common, tmp_path):
    out = tmp_path / "cmp"
    cmd = compare(out, "a=algorithm.advantage=grpo", "b=algorithm.advantage=rloo", "--steps", "10",
                  common=[*common, "train.save_every=2"])  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV, start_new_session=True)
    second = out / "runs" / "b-seed0"
    deadline = time.monotonic() + 120
    while not (second / "checkpoints" / "latest").exists() and time.monotonic() < deadline:
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)  # compare and the run it started
    proc.wait()
    assert not (second / "model").exists(), "the second run finished before it could be killed"
    assert manifest(out)["runs"]["b-seed0"]["status"] == "running"
    first = out / "runs" / "a-seed0" / "model" / "model.safetensors"
    mtime = first.stat().st_mtime_ns

    res = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    runs = manifest(out)["runs"]
    assert [r["status"] for r in runs.values()] == ["done", "done"]
    assert runs["a-seed0"]["attempts"] == 1 and attempts(out / "runs" / "a-seed0.log") == 1
    assert first.stat().st_mtime_ns == mtime
    assert runs["b-seed0"]["attempts"] == 2 and runs["b-seed0"]["mode"] == "resume"
    assert "attempt 2 (resume)" in (out / "runs" / "b-seed0.log").read_text()
    assert runs["b-seed0"]["result"]["steps"] == 10


def test_a_failed_run_fails_the_comparison_but_not_the_others(common, tmp_path):
    out = tmp_path / "cmp"
    cmd = compare(out, "ok=", "broken=data.source=missing.jsonl", "--steps", "1", common=common)
    res = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    assert res.returncode == 1
    runs = manifest(out)["runs"]
    assert runs["ok-seed0"]["status"] == "done"
    assert (runs["broken-seed0"]["status"], runs["broken-seed0"]["exit_code"]) == ("failed", 2)
    assert "missing.jsonl" in (out / "runs" / "broken-seed0.log").read_text()


@pytest.mark.parametrize(
    "args,expected",
    [
        (["ok=", "bad=algorithm.advantag=grpo"], "label 'bad': unknown config key 'algorithm.advantag'"),
        (["ok=", "bad=algorithm.advantage=grp"], "label 'bad': unknown algorithm.advantage 'grp'"),
        (["bad=train.max_seconds=5"], "label 'bad': 'train.max_seconds' would change the shared budget"),
        (["bad=train.seed=3"], "label 'bad': 'train.seed' is set by compare"),
        (["a=", "a="], "label 'a' is given twice"),
    ],
)
def test_bad_overrides_fail_at_once_naming_the_label(common, tmp_path, args, expected):
    res = subprocess.run(compare(tmp_path / "cmp", *args, common=common), capture_output=True, text=True)
    assert res.returncode == 2 and expected in res.stderr and res.stderr.count("\n") == 1, res.stderr
    assert not (tmp_path / "cmp").exists()


def test_a_comment_edited_in_the_config_file_keeps_the_comparison(tmp_path):
    """The manifest pins the config file's settings, not its bytes: an edited comment continues the comparison, an
    edited setting is refused; a manifest that pinned the bytes (older versions) is accepted while they are the same."""
    import hashlib

    from reasonrl.tools.compare import make_plan, open_manifest

    config = tmp_path / "run.yaml"
    config.write_text("# a recipe\ntrain:\n  lr: 1.0e-5\n")
    out = tmp_path / "cmp"
    plan = lambda: make_plan(["a=algorithm.advantage=grpo"], [0], steps=1, out=out, config=str(config))  # noqa: E731
    out.mkdir()
    (out / "compare.json").write_text(json.dumps(open_manifest(plan())))
    config.write_text("# a recipe, its comment reworded\ntrain: {lr: 1.0e-5}\n")
    assert open_manifest(plan())["labels"] == {"a": ["algorithm.advantage=grpo"]}
    config.write_text("train:\n  lr: 2.0e-5\n")
    with pytest.raises(UserError, match="its config file contents differ"):
        open_manifest(plan())
    legacy = json.loads((out / "compare.json").read_text())
    legacy["config_sha256"] = hashlib.sha256(config.read_bytes()).hexdigest()
    (out / "compare.json").write_text(json.dumps(legacy))
    assert open_manifest(plan())["config_sha256"] == plan().config_digest()
