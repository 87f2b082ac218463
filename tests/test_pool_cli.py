"""`reasonrl pool RUN_DIR`: inspecting a LANPO run's experience pool, without torch and without changing it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from reasonrl.cli import main
from reasonrl.lanpo.pool import ExperiencePool, PoolEntry


@pytest.fixture
def run_dir(tmp_path):
    """A run directory whose pool holds 3 problems (p0 most attempted), all modes, and one lesson."""
    run = tmp_path / "run"
    with ExperiencePool(run / "pool.sqlite") as pool:
        for step in range(3):
            pool.add(
                [
                    PoolEntry(
                        f"p{i}",
                        f"Q: {i}+{i}\n",
                        f"{i}+{i}={2 * i}\n\\boxed{{{2 * i + (step + i) % 2}}}",
                        float((step + i) % 2 == 0),
                        step,
                        mode,
                        8,
                        12,
                    )  # fmt: skip
                    for i in range(3)
                    for mode in ("scratch", "reflect", "abstract")[: 3 - i]
                ]
            )
        pool.put_lesson("p0|abc", "carry the 1.", 2)
    return run


def test_json_summary_problems_and_entries(run_dir, capsys):
    with ExperiencePool(run_dir / "pool.sqlite") as pool:
        before = pool.fingerprint()
    assert main(["pool", str(run_dir), "--json", "-n", "4"]) == 0
    out = json.loads(capsys.readouterr().out)
    stats = out["stats"]
    assert stats["size"] == 17 and stats["problems"] == 3 and stats["lessons"] == 1
    assert (stats["mode_scratch"], stats["mode_reflect"], stats["mode_abstract"]) == (8, 6, 3)
    assert [p["problem_id"] for p in out["problems"]] == ["p0", "p1", "p2"]
    assert out["problems"][0]["attempts"] == 8  # 9 added, the pool keeps the newest 8 per problem (a scratch left)
    assert len(out["entries"]) == 4 and all(e["step"] == 2 for e in out["entries"])
    assert {"problem", "response", "reward", "mode", "prompt_tokens", "response_tokens"} <= set(out["entries"][0])
    with ExperiencePool(run_dir / "pool.sqlite") as pool:
        assert pool.stats() == stats and pool.fingerprint() == before


def test_one_problem(run_dir, capsys):
    assert main(["pool", str(run_dir), "--problem", "p2", "--json", "-n", "10"]) == 0
    entries = json.loads(capsys.readouterr().out)["entries"]
    assert len(entries) == 3 and {e["problem_id"] for e in entries} == {"p2"}
    assert main(["pool", str(run_dir), "--problem", "nope"]) == 2
    assert "problem 'nope' has no live entries" in capsys.readouterr().err


def test_tables(run_dir, capsys):
    assert main(["pool", str(run_dir)]) == 0
    out = capsys.readouterr().out
    for text in ("experience pool", "mean reward", "mode scratch", "most attempted problems", "newest entries"):
        assert text in out
    assert "p0" in out and "\\boxed{" in out  # rich markup in the texts is shown, not interpreted
    assert main(["pool", str(run_dir), "--problem", "p1"]) == 0
    out = capsys.readouterr().out
    assert "entries of p1" in out and "most attempted problems" not in out


def test_missing_pool_is_a_one_line_error(tmp_path):
    for run in (tmp_path / "nothing_here", tmp_path):
        res = subprocess.run(
            [sys.executable, "-m", "reasonrl", "pool", str(run)], capture_output=True, text=True, timeout=120
        )
        assert res.returncode == 2 and "Traceback" not in res.stderr
        lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("reasonrl: error: ")
        assert "has no experience pool: was it trained with algorithm.lanpo.enabled=true?" in lines[0]
    assert not (tmp_path / "pool.sqlite").exists()  # looking did not create one


def test_pool_command_needs_no_torch(run_dir):
    code = (
        "import sys; from reasonrl.cli import main; rc = main(['pool', sys.argv[1]]); "
        "assert rc == 0 and 'torch' not in sys.modules and 'transformers' not in sys.modules, rc"
    )
    res = subprocess.run([sys.executable, "-c", code, str(run_dir)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    res = subprocess.run([sys.executable, "-m", "reasonrl", "--help"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "pool" in res.stdout
