"""Where a run's problems come from: the user's files and datasets, or a named built-in source.

Built-in sources are `math_train` (the MATH test problems outside MATH-500, for training; its held-out split is
MATH-500), `reasoning_gym:NAME` (a reasoning-gym generator, `data.reasoning_gym.*`) and those registered here
(`register_source`); the embedded arithmetic task registers from `reasonrl.demo`, which the entry points
(`import reasonrl`, the CLI) import, so the core never imports the demo."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

from reasonrl.data.problems import Problem, load_problems

# name -> loader(task, split): `task` is the config's `task` section, split "train" or "test"
SOURCES: dict[str, Callable[[Any, str], list[Problem]]] = {}


def register_source(name: str, loader: Callable[[Any, str], list[Problem]]) -> None:
    SOURCES[name] = loader


def source_split(source: str, split: str, *, task: Any = None, data: Any = None) -> list[Problem] | None:
    """The ``train`` or ``test`` split of a built-in source, or None when ``source`` names none (then it is a file or
    a ``datasets`` name). ``task`` is the config's ``task`` section (registered sources), ``data`` its ``data``
    section (``reasoning_gym:NAME`` reads ``data.reasoning_gym``; None: the defaults)."""
    if source in SOURCES:
        return SOURCES[source](task, split)
    if source == "math_train":
        from reasonrl.data.presets import load_preset, math_train

        return math_train() if split == "train" else load_preset("math500")
    prefix, _, name = source.partition(":")
    if prefix == "reasoning_gym":
        from reasonrl.config import ReasoningGymConfig
        from reasonrl.data.reasoning_gym import load_split

        options = data.reasoning_gym if data is not None else ReasoningGymConfig()
        return load_split(name.strip(), options, split)
    return None


def has_held_out(source: str) -> bool:
    """True when `source` is a built-in source with its own held-out split (see `source_split`)."""
    return source in SOURCES or source == "math_train" or source.partition(":")[0] == "reasoning_gym"


def load_training_data(cfg: Any) -> tuple[list[Problem], list[Problem]]:
    """(train, eval) problems of `data.*`: a built-in source's splits, or the user's files / datasets."""
    d = cfg.data
    train = source_split(d.source, "train", task=cfg.task, data=d)
    if train is None:
        train = load_problems(d.source, split=d.split, columns=d.columns, limit=d.limit)
    else:
        train = train[: d.limit]
    test = source_split(d.source if d.eval_source is None else d.eval_source, "test", task=cfg.task, data=d)
    if test is None and d.eval_source is None:
        warnings.warn(
            f"data.eval_source is not set: eval accuracy is measured on the training problems of {d.source} (set "
            "data.eval_source to a held-out file or dataset)",
            stacklevel=2,
        )
        test = train
    elif test is None:
        test = load_problems(d.eval_source, split=d.eval_split, columns=d.columns)
    return train, test
