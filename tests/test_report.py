"""`reasonrl report` on small hand-built run directories: every figure is an embedded PNG that decodes, the table's
numbers equal a hand calculation, and the stage-sum check tells a consistent log from an inconsistent one."""

from __future__ import annotations

import base64
import json
import math
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml

from reasonrl.errors import UserError
from reasonrl.tools.report import build_report

ROOT = Path(__file__).resolve().parents[1]
FIGURES = {"progress_vs_step", "progress_vs_seconds", "progress_vs_tokens", "dynamics", "stages", "lanpo_modes"}
STEPS = 6  # eval records at steps 0, 2, 4, 6

# per run: seconds per step, tokens per step, eval accuracy at steps 0/2/4/6 (and feedback-augmented for LANPO)
RUNS = {
    "grpo-seed0": dict(seed=0, lanpo=False, dt=1.0, tokens=100, evals=[0.2, 0.5, 0.65, 0.7]),
    "grpo-seed1": dict(seed=1, lanpo=False, dt=1.5, tokens=120, evals=[0.2, 0.4, 0.63, 0.62]),
    "lanpo-seed0": dict(seed=0, lanpo=True, dt=2.0, tokens=90, evals=[0.2, 0.3, 0.4, 0.5], fb=[0.1, 0.3, 0.5, 0.55]),
    "lanpo-seed1": dict(seed=1, lanpo=True, dt=3.0, tokens=110, evals=[0.2, 0.3, 0.5, 0.6], fb=[0.1, 0.4, 0.6, 0.7]),
}


def write_run(run_dir: Path, seed: int, lanpo: bool, dt: float, tokens: int, evals: list[float],
              fb: list[float] | None = None, stage_gap_at: int | None = None) -> None:  # fmt: skip
    """A run directory as the trainer leaves it: config.yaml, and metrics.jsonl with step and eval records.

    GRPO runs log no cumulative counters (the report sums time/step and tokens/generated); LANPO runs log
    `time/elapsed` = 0.5 s more than the sum per step (as if evaluation were counted), so the logged clock must win.
    """
    run_dir.mkdir(parents=True)
    config = {
        "algorithm": {"advantage": "grpo", "beta": 0.0 if lanpo else 0.01, "lanpo": {"enabled": lanpo}},
        "train": {"seed": seed, "run_name": run_dir.name, "steps": STEPS, "eval_every": 2, "output_dir": "runs"},
    }
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    records = []
    for i, step in enumerate(range(0, STEPS + 1, 2)):
        rec = {"step": step, "eval/accuracy": evals[i]}
        if fb:
            rec["eval/feedback_accuracy"] = fb[i]
        if step == 0 or step == STEPS:
            records.append(rec)  # before RL and after: records of their own
    for step in range(1, STEPS + 1):
        r = {"step": step, "reward/mean": 0.1 * step + seed, "accuracy": 0.1 * step, "zero_std_groups": 0.25,
             "completion/len_mean": 30.0 + step, "entropy": 0.5, "clip/region": 0.01, "tokens/generated": tokens,
             "time/generation": 0.6 * dt, "time/update": 0.4 * dt, "time/step": dt}  # fmt: skip
        if not lanpo:
            r["kl"] = 0.001 * step
        else:
            r.update({"time/generation": 0.4 * dt, "time/abstraction": 0.1 * dt, "time/pool": 0.05 * dt,
                      "time/prompts": 0.05 * dt, "time/elapsed": step * (dt + 0.5), "tokens/total": step * tokens,
                      "tokens/feedback": 10.0 * (seed + 1), "lanpo/context_tokens": 40.0,
                      "lanpo/fallback/reflect": 1.0, "lanpo/fallback/abstract": 2.0})  # fmt: skip
            for mode, n, acc in (("scratch", 8, 0.5), ("reflect", 4, 0.25), ("abstract", 4, 0.75)):
                r[f"lanpo/{mode}/count"] = float(n)
                r[f"lanpo/{mode}/accuracy"] = acc
        if step == stage_gap_at:
            r["time/update"] *= 0.5  # 20 % of time/step unaccounted for
        if step % 2 == 0 and step < STEPS:
            r["eval/accuracy"] = evals[step // 2]  # train.eval_every: merged into the step record
            if fb:
                r["eval/feedback_accuracy"] = fb[step // 2]
        records.append(r)
    records.sort(key=lambda r: r["step"])
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.fixture
def comparison(tmp_path: Path) -> Path:
    """A comparison directory: 2 labels × 2 seeds (one label LANPO), plus a run that died before logging."""
    cmp = tmp_path / "cmp"
    for name, spec in RUNS.items():
        write_run(cmp / "runs" / name, **spec)
    (cmp / "runs" / "dead-seed0").mkdir()
    (cmp / "runs" / "dead-seed0" / "config.yaml").write_text("train: {seed: 0, run_name: dead-seed0}\n")
    return cmp


class Tables(HTMLParser):
    """Every <table> as rows of cell texts; and every <img> src."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self.imgs: list[dict[str, str | None]] = []
        self._cell: list[str] | None = None
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "img":
            self.imgs.append(dict(attrs))

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def rows_by_label(table: list[list[str]]) -> dict[str, dict[str, str]]:
    header = table[0]
    return {row[0]: dict(zip(header, row, strict=True)) for row in table[1:]}


def sample_std(a: float, b: float) -> float:
    """Two values: sqrt(((a - m)² + (b - m)²) / (2 - 1)) = |a - b| / sqrt(2)."""
    return abs(a - b) / math.sqrt(2)


def test_report_figures_table_and_checks(comparison: Path) -> None:
    warnings: list[str] = []
    path = build_report([comparison], target=0.6, warn=warnings.append)
    assert path == comparison / "report" / "report.html"
    text = path.read_text()
    assert any("dead-seed0" in w and "no metrics.jsonl" in w for w in warnings), warnings
    assert "<script" not in text and "http://" not in text and "https://" not in text and "<link" not in text

    # every figure embedded as a PNG that decodes, identical to the file written beside the report
    from matplotlib.image import imread

    page = Tables(text)
    names = set()
    for img in page.imgs:
        src, name = img["src"] or "", img["data-file"] or ""
        assert src.startswith("data:image/png;base64,"), src[:40]
        png = base64.b64decode(src.split(",", 1)[1], validate=True)
        pixels = imread(__import__("io").BytesIO(png))
        assert pixels.shape[0] > 100 and pixels.shape[1] > 500 and pixels[..., :3].std() > 0.01
        assert (path.parent / name).read_bytes() == png
        names.add(name.removesuffix(".png"))
    assert names == FIGURES

    results = rows_by_label(page.tables[0])
    assert set(results) == {"grpo", "lanpo"}
    grpo, lanpo = results["grpo"], results["lanpo"]
    assert grpo["seeds"] == "2" and grpo["steps"] == "6"
    # final eval: 0.70 and 0.62 → 66.0 ± 5.7; best: 0.70 and 0.63 → 66.5 ± 4.9
    assert grpo["final eval acc. (%)"] == f"66.0 ± {100 * sample_std(0.70, 0.62):.1f}" == "66.0 ± 5.7"
    assert grpo["best eval acc. (%)"] == f"66.5 ± {100 * sample_std(0.70, 0.63):.1f}" == "66.5 ± 4.9"
    # GRPO budget: 6 steps × 1.0 s and × 1.5 s → 6.0 and 9.0 s; 600 and 720 tokens
    assert grpo["seconds"] == f"7.5 ± {sample_std(6.0, 9.0):.1f}" == "7.5 ± 2.1"
    assert grpo["generated tokens"] == "660 ± 85"
    # target 0.6: seed 0 at step 4 (0.65: 4 s, 400 tokens), seed 1 at step 4 (0.63: 6 s, 480 tokens)
    assert grpo["steps to 60%"] == "4"
    assert grpo["seconds to 60%"] == f"5.0 ± {sample_std(4.0, 6.0):.1f}" == "5.0 ± 1.4"
    assert grpo["tokens to 60%"] == f"440 ± {sample_std(400, 480):.0f}" == "440 ± 57"
    assert grpo["feedback-aug. final acc. (%)"] == "—"
    # LANPO: logged clock time/elapsed = step × (dt + 0.5): 6 × 2.5 = 15 s and 6 × 3.5 = 21 s
    assert lanpo["seconds"] == f"18.0 ± {sample_std(15.0, 21.0):.1f}" == "18.0 ± 4.2"
    assert lanpo["final eval acc. (%)"] == "55.0 ± 7.1"
    assert lanpo["feedback-aug. final acc. (%)"] == f"62.5 ± {100 * sample_std(0.55, 0.7):.1f}" == "62.5 ± 10.6"
    # only seed 1 reaches 0.6 (exactly: "at or above"), at step 6: 21 s and 6 × 110 = 660 tokens
    assert lanpo["steps to 60%"] == "6 (1/2 seeds)"
    assert lanpo["seconds to 60%"] == "21.0 (1/2 seeds)"
    assert lanpo["tokens to 60%"] == "660 (1/2 seeds)"

    # stage-sum check: the synthetic stages add up exactly
    assert "✓ pass</span> <b>grpo</b>: stage times sum to time/step within 5% on 12/12 steps" in text
    assert "✓ pass</span> <b>lanpo</b>: stage times sum to time/step within 5% on 12/12 steps" in text

    # LANPO cost (feedback_summary averaged over seeds): lesson tokens 6 × 10 and 6 × 20 → 90
    cost = rows_by_label(next(t for t in page.tables if t[0][0] == "configuration" and "lesson tokens" in t[0]))
    assert cost["lanpo"]["lesson tokens"] == "90"
    assert cost["lanpo"]["reflect acc. (n)"] == "25.0% (24)"  # 4 rollouts × 6 steps per seed
    assert cost["lanpo"]["context tokens / feedback rollout"] == "40.0"

    diff = {row[0]: row[1:] for row in next(t for t in page.tables if t[0][0] == "key")[1:]}
    assert diff["algorithm.lanpo.enabled"] == ["false", "true"]
    assert diff["train.seed"] == ["0 / 1", "0 / 1"]
    assert "reasonrl report " + str(comparison.resolve()) in text
    assert "dynamics.png" in text and "kl" in text  # KL only logged by the GRPO runs: still plotted


def test_stage_gap_fails_the_check(tmp_path: Path) -> None:
    write_run(tmp_path / "gap", **{**RUNS["grpo-seed0"], "stage_gap_at": 3})
    text = build_report([tmp_path / "gap"], out=tmp_path / "out", warn=lambda m: None).read_text()
    assert "✗ FAIL</span> <b>gap</b>: stage times sum to time/step within 5% on 5/6 steps (largest gap 20.0%)" in text


def test_manifest_labels_and_config_split(tmp_path: Path) -> None:
    """compare.json names the configurations; without it, same-named runs with different configs are split."""
    cmp = tmp_path / "cmp"
    write_run(cmp / "runs" / "a-seed0", **RUNS["grpo-seed0"])
    write_run(cmp / "runs" / "b-seed1", **RUNS["grpo-seed1"])
    manifest = {"runs": {"a-seed0": {"label": "base", "seed": 0, "dir": "runs/a-seed0", "status": "done"},
                         "b-seed1": {"label": "base", "seed": 1, "dir": "runs/b-seed1", "status": "done"}},
                "budget": {"steps": 6, "seconds": None, "tokens": None}}  # fmt: skip
    (cmp / "compare.json").write_text(json.dumps(manifest))
    text = build_report([cmp], warn=lambda m: None).read_text()
    assert list(rows_by_label(Tables(text).tables[0])) == ["base"]
    assert "shared budget per run (compare.json): 6 steps" in text

    # the same run name, but a different lr: not seeds of one configuration
    other = tmp_path / "x"
    write_run(other / "runs" / "grpo-seed0", **RUNS["grpo-seed0"])
    write_run(other / "runs2" / "grpo-seed1", **RUNS["grpo-seed1"])
    cfg = yaml.safe_load((other / "runs2" / "grpo-seed1" / "config.yaml").read_text())
    cfg["train"]["lr"] = 0.1
    (other / "runs2" / "grpo-seed1" / "config.yaml").write_text(yaml.safe_dump(cfg))
    warnings: list[str] = []
    html = build_report([other / "runs" / "grpo-seed0", other / "runs2" / "grpo-seed1"], warn=warnings.append)
    labels = list(rows_by_label(Tables(html.read_text()).tables[0]))
    assert labels == ["grpo (lr=3e-05)", "grpo (lr=0.1)"] and any("differ in train.lr" in w for w in warnings)


def test_keys_a_run_predates_take_their_defaults(tmp_path: Path) -> None:
    """A run whose config.yaml lacks a key (written before the key existed) did what its default says: it is a seed
    of the same configuration as a run that states the default, not a configuration of its own."""
    from reasonrl.config import Config

    cmp = tmp_path / "cmp"
    write_run(cmp / "runs" / "grpo-seed0", **RUNS["grpo-seed0"])
    write_run(cmp / "runs" / "grpo-seed1", **RUNS["grpo-seed1"])
    path = cmp / "runs" / "grpo-seed1" / "config.yaml"
    cfg = yaml.safe_load(path.read_text())
    cfg.setdefault("rewards", {})["completion_format"] = Config().rewards.completion_format  # stated, at its default
    path.write_text(yaml.safe_dump(cfg))
    warnings: list[str] = []
    text = build_report([cmp], warn=warnings.append).read_text()
    assert list(rows_by_label(Tables(text).tables[0])) == ["grpo"] and not any("differ" in w for w in warnings)
    cfg["rewards"]["completion_format"] = "messages"  # not the default: now they differ
    path.write_text(yaml.safe_dump(cfg))
    text = build_report([cmp], warn=warnings.append).read_text()
    assert len(rows_by_label(Tables(text).tables[0])) == 2 and any("rewards.completion_format" in w for w in warnings)


def test_bad_inputs(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a run directory"):
        build_report([tmp_path / "empty"])
    write_run(tmp_path / "r", **RUNS["grpo-seed0"])
    (tmp_path / "r" / "metrics.jsonl").write_text('{"step": 0, "eval/accuracy": 0.2}\n{"step": 1, "rew')
    warnings: list[str] = []
    with pytest.raises(UserError, match="no run with metrics"):
        build_report([tmp_path / "r"], warn=warnings.append)
    assert any("line 2: not valid JSON" in w for w in warnings) and any("no step records" in w for w in warnings)


def test_cli_report(comparison: Path, tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "reasonrl", "report", str(comparison), "--target", "0.5"],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"report: {comparison / 'report' / 'report.html'}"
    assert res.stderr.count("warning: skipping") == 1 and "dead-seed0" in res.stderr
    (tmp_path / "nothing").mkdir()
    res = subprocess.run([sys.executable, "-m", "reasonrl", "report", str(tmp_path / "nothing")],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert (
        res.returncode == 2
        and len(lines) == 1
        and lines[0].startswith("reasonrl: error: ")
        and "Traceback" not in res.stderr
    )


BROWSER = next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


@pytest.mark.skipif(BROWSER is None, reason="no chromium on PATH")
def test_report_renders_in_chromium(comparison: Path, tmp_path: Path) -> None:
    report = build_report([comparison], warn=lambda m: None)
    shot = tmp_path / "shot.png"
    script = ROOT / "scripts" / "check_report.py"
    res = subprocess.run([sys.executable, str(script), str(report), "--screenshot", str(shot)],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    assert "6 images" in res.stdout and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # a corrupted image must be caught
    broken = tmp_path / "broken.html"
    text = report.read_text()
    start = text.index("data:image/png;base64,") + len("data:image/png;base64,")
    broken.write_text(text[:start] + "AAAA" + text[start + 200 :])
    res = subprocess.run([sys.executable, str(script), str(broken), "--screenshot", str(tmp_path / "b.png")],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert res.returncode == 1 and "image did not render" in res.stderr, res.stdout + res.stderr


def test_unfinished_run_is_flagged(tmp_path: Path) -> None:
    """A run still training: warned about, and its 'final' accuracy says which step it is from."""
    write_run(tmp_path / "live", **RUNS["grpo-seed0"])
    lines = (tmp_path / "live" / "metrics.jsonl").read_text().splitlines()
    (tmp_path / "live" / "metrics.jsonl").write_text("\n".join(ln for ln in lines if json.loads(ln)["step"] <= 3))
    warnings: list[str] = []
    text = build_report([tmp_path / "live"], warn=warnings.append).read_text()
    assert any("3 of 6 steps logged" in w for w in warnings)
    row = rows_by_label(Tables(text).tables[0])["live"]
    assert row["final eval acc. (%)"] == "50.0 (at step 2)" and row["steps"] == "3"
