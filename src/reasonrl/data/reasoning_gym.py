"""Problems from reasoning-gym's procedural generators: ``data.source=reasoning_gym:NAME``.

reasoning-gym (Apache-2.0, https://github.com/open-thought/reasoning-gym) generates verifiable problems (arithmetic,
logic, puzzles, ...) from a seed, and each generator has its own scorer. A Problem keeps what the scorer needs in
its ``reasoning_gym`` metadata column (the generator's name and options, and the entry: question, answer, metadata),
so the reward stage scores a completion with the generator's own ``score_answer`` without regenerating anything
(:mod:`reasonrl.rewards.reasoning_gym`). ``reasoning_gym`` is imported only when such a source is loaded.

The prompt is ``data.reasoning_gym.template`` with the generator's question in place of ``{question}``; by default
the question followed by the usual instruction to put the final answer in ``\\boxed{}``
(:data:`~reasonrl.data.presets.INSTRUCTION`), the convention every reward here extracts answers by. A small model may
need a worked example in the template to box its answer at all (``recipes/smollm2-arithmetic.yaml``).

The training split is problems ``0 .. size-1`` of ``seed``, the eval split problems ``0 .. eval_size-1`` of
``seed + EVAL_SEED_OFFSET``. Most generators seed problem ``i`` with ``seed + i``, so nearby seeds would share most
problems; the offset keeps the two ranges apart, and a training problem whose question is also an eval question is
dropped, so the splits never share a question (a small generator space then gives fewer than ``size`` problems).
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any

from reasonrl.data.problems import Problem
from reasonrl.errors import UserError

__all__ = ["COLUMN", "EVAL_SEED_OFFSET", "PREFIX", "load_split"]

#: ``data.source`` values ``reasoning_gym:NAME`` name generator NAME
PREFIX = "reasoning_gym"
#: the metadata column the scorer reads: {"dataset": NAME, "config": {...}, "entry": {question, answer, metadata}}
COLUMN = "reasoning_gym"
#: the eval split's seed is the training seed plus this
EVAL_SEED_OFFSET = 1_000_000_000
# set by data.reasoning_gym.seed/size and the split, not by the generator options
_OWN_KEYS = ("seed", "size")


def _import() -> Any:
    try:
        import reasoning_gym
    except ImportError:
        raise UserError(
            f"data.source={PREFIX}:NAME needs the reasoning-gym package: pip install reasoning-gym "
            "(or pip install 'reasonrl[real]')"
        ) from None
    return reasoning_gym


def _close(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=3, cutoff=0.5)
    return f" (did you mean {', '.join(close)}?)" if close else ""


def _create(name: str, options: dict[str, Any], *, seed: int, size: int) -> Any:
    """The generator, with every way its name or options can be wrong turned into one UserError line."""
    rg = _import()
    from reasoning_gym.factory import DATASETS

    where = f"data.source={PREFIX}:{name}"
    if name not in DATASETS:
        raise UserError(
            f"{where}: unknown reasoning-gym generator '{name}'{_close(name, sorted(DATASETS))}; "
            f"{len(DATASETS)} generators, e.g. {', '.join(sorted(DATASETS)[:6])}, ..."
        )
    clash = [k for k in _OWN_KEYS if k in options]
    if clash:
        raise UserError(
            f"data.reasoning_gym.config.{clash[0]}: set data.reasoning_gym.{clash[0]} instead (it also decides the "
            "eval split)"
        )
    fields = [f.name for f in dataclasses.fields(DATASETS[name][1]) if f.name not in _OWN_KEYS]
    for key in options:
        if key not in fields:
            raise UserError(
                f"data.reasoning_gym.config: '{key}' is not an option of generator '{name}'{_close(key, fields)}; "
                f"its options: {', '.join(fields) or 'none'}"
            )
    try:
        return rg.create_dataset(name, seed=seed, size=size, **options)
    except Exception as e:  # the generators validate their options with assert / ValueError / TypeError
        raise UserError(
            f"data.reasoning_gym.config {options}: generator '{name}' refuses these options ({_one_line(e)})"
        ) from None


def _one_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:200]}" if lines else type(e).__name__


def _problems(name: str, options: dict[str, Any], seed: int, size: int, split: str, template: str) -> list[Problem]:
    ds = _create(name, options, seed=seed, size=size)
    out = []
    for i in range(size):
        try:
            entry = ds[i]
        except Exception as e:  # options the generator accepted but cannot generate with
            raise UserError(
                f"data.source={PREFIX}:{name}: the generator failed on problem {i} of seed {seed} with options "
                f"{options} ({_one_line(e)}); try other data.reasoning_gym.config values"
            ) from None
        question = str(entry["question"])
        gold = entry.get("answer")  # None for a few generators that accept many answers (rush_hour, graph_color, ...)
        column = {  # the entry as generated: its scorer gets exactly what it would from reasoning-gym
            "dataset": name,
            "config": options,
            "entry": {"question": question, "answer": gold, "metadata": entry.get("metadata", {})},
        }
        prompt = template.replace("{question}", question.strip())
        answer = "" if gold is None else str(gold)
        out.append(Problem(f"{name}-{split}-{i}", prompt, answer, metadata={COLUMN: column}, question=question.strip()))
    return out


def load_split(name: str, rg: Any, split: str) -> list[Problem]:
    """The ``train`` or ``test`` split of generator ``name`` with the ``data.reasoning_gym`` options ``rg``.

    Deterministic for given options; the splits never share a question (see the module docstring)."""
    if not name:
        raise UserError(f"data.source={PREFIX}: name the generator, e.g. {PREFIX}:chain_sum")
    if "{question}" not in rg.template:
        raise UserError(
            f"data.reasoning_gym.template must contain {{question}} (where the generated question goes), got "
            f"{rg.template!r:.80}"
        )
    options = dict(rg.config)
    test = _problems(name, options, rg.seed + EVAL_SEED_OFFSET, rg.eval_size, "test", rg.template)
    if split == "test":
        return test
    held_out = {p.metadata[COLUMN]["entry"]["question"] for p in test}
    train = [
        p
        for p in _problems(name, options, rg.seed, rg.size, "train", rg.template)
        if p.metadata[COLUMN]["entry"]["question"] not in held_out
    ]
    if not train:
        raise UserError(
            f"data.source={PREFIX}:{name}: every generated training problem is also an eval problem; the generator's "
            "options leave too few distinct problems (widen data.reasoning_gym.config or lower eval_size)"
        )
    return train
