"""docs/metrics.md names every metric a step and an evaluation log, so its TRL/verl table cannot fall behind."""

from __future__ import annotations

import re
from pathlib import Path

from reasonrl.config import load_config
from reasonrl.training.trainer import Trainer

DOC = Path(__file__).parents[1] / "docs" / "metrics.md"


def documented() -> set[str]:
    """Every `name` in the first column of the doc's tables, with `/suffix` shorthands expanded."""
    names: set[str] = set()
    for line in DOC.read_text().splitlines():
        if not line.startswith("| `"):
            continue
        last = ""
        for name in re.findall(r"`([^`]+)`", line.split(" | ")[0]):
            if name.startswith("/"):  # `lanpo/best_similarity_p50`, `/p90`: the suffix replaces the last part
                name = last.rsplit("/", 1)[0] + name
            names.add(name)
            last = name
    return names


def as_documented(key: str) -> str:
    """A logged key in the doc's spelling: reward functions as NAME, LANPO modes as MODE, stages as STAGE."""
    key = re.sub(r"^reward/(?!mean$|std$|verify_|unparsable$|function_timeouts$|skipped$)[^/]+/", "reward/NAME/", key)
    key = re.sub(r"^lanpo/(scratch|reflect|abstract)/", "lanpo/MODE/", key)
    key = re.sub(r"^time/(?!step$|elapsed$).+", "time/STAGE", key)
    return re.sub(r"@\d+$", "@k", key)


def test_every_logged_metric_is_documented(tiny_overrides, tmp_path):
    cfg = load_config(
        None,
        [*tiny_overrides, "algorithm.lanpo.enabled=true", "algorithm.advantage=lampo", "algorithm.beta=0.01",
         "rewards.functions=[math_answer,tests.conftest:length_reward]", "rewards.weights=[1.0,1.0]",
         "eval.num_problems=4", "eval.k=2"],
    )  # fmt: skip
    trainer = Trainer(cfg, tmp_path / "run")
    try:
        keys = set(trainer.step()) | set(trainer.evaluate())
    finally:
        trainer.close()
    names = documented()
    missing = sorted(k for k in keys if as_documented(k) not in names)
    assert not missing, f"add these to docs/metrics.md: {missing}"
    assert {"reward/NAME/mean", "lanpo/MODE/accuracy", "eval/pass@k", "time/STAGE"} <= names
