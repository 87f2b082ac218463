"""Where a run's problems come from: the user's files and datasets, or a named built-in source.

Built-in sources register here (`register_source`); the embedded arithmetic task does so from `reasonrl.demo`, which
the entry points (`import reasonrl`, the CLI) import, so the core never imports the demo."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from reasonrl.data.problems import Problem, load_problems

# name -> loader(task, split): `task` is the config's `task` section, split "train" or "test"
SOURCES: dict[str, Callable[[Any, str], list[Problem]]] = {}


def register_source(name: str, loader: Callable[[Any, str], list[Problem]]) -> None:
    SOURCES[name] = loader


def load_training_data(cfg: Any) -> tuple[list[Problem], list[Problem]]:
    """(train, eval) problems of `data.*`: a registered source's splits, or the user's files / datasets."""
    d = cfg.data
    if d.source in SOURCES:
        train = SOURCES[d.source](cfg.task, "train")[: d.limit]
    else:
        train = load_problems(d.source, split=d.split, columns=d.columns, limit=d.limit)
    if d.eval_source is None:
        test = SOURCES[d.source](cfg.task, "test") if d.source in SOURCES else train
    elif d.eval_source in SOURCES:
        test = SOURCES[d.eval_source](cfg.task, "test")
    else:
        test = load_problems(d.eval_source, split=d.eval_split, columns=d.columns)
    return train, test
