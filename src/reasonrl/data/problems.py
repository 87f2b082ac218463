"""Load verifiable-reward problems (prompt + gold answer) from JSONL, Parquet or Hugging Face datasets.

Every problem a user can fix (missing file, bad row, wrong column name, dataset that will not load) is raised
as a one-line :class:`~reasonrl.errors.UserError` naming the file and line/row and saying what to do, because
training runs are long and a data mistake should fail in the first second with an actionable message.

``datasets`` and ``pyarrow`` are imported lazily so that ``import reasonrl.data`` stays cheap and works
without the optional ``datasets`` extra.
"""

from __future__ import annotations

import json
import math
import numbers
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reasonrl.errors import UserError, did_you_mean

__all__ = [
    "DEFAULT_COLUMNS",
    "SUPPORTED_SUFFIXES",
    "ColumnLayout",
    "Problem",
    "RowLayout",
    "cell_id",
    "cell_messages",
    "cell_text",
    "conversations",
    "load_problems",
    "write_jsonl",
]


@dataclass(frozen=True)
class Problem:
    """One task: the prompt shown to the model and the gold answer its completion is verified against.

    ``metadata`` carries the dataset's unmapped columns (difficulty, source, ...) so they survive into logs
    and exports; it is compared for equality (so round trips are checkable) but not hashed (dicts cannot be).
    """

    id: str
    prompt: str
    answer: str
    reference: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict, hash=False, compare=True)
    # the problem statement without the prompt's template (instructions, worked examples): what LANPO retrieves
    # similar problems by and shows in trajectories; None when the prompt is the statement itself. Derived from the
    # prompt's source, so not compared (a file written from these problems holds the prompt only)
    question: str | None = field(default=None, compare=False)
    # a conversational prompt (TRL's form: a list of {role, content} ending with the user's turn), kept whole;
    # `prompt` is then the last user turn, which LANPO's feedback wraps, and `messages[:-1]` the turns before it
    messages: tuple[dict[str, str], ...] | None = field(default=None, hash=False, compare=True)

    @property
    def statement(self) -> str:
        return self.prompt if self.question is None else self.question

    @property
    def history(self) -> tuple[dict[str, str], ...]:
        """The conversation before the last user turn (empty for a text prompt)."""
        return self.messages[:-1] if self.messages else ()

    def conversation(self, text: str | None = None) -> list[dict[str, str]]:
        """The prompt as messages: the history, then `text` (default: the prompt) as the user's turn."""
        return [*self.history, {"role": "user", "content": self.prompt if text is None else text}]


DEFAULT_COLUMNS: dict[str, str] = {
    "id": "id",
    "prompt": "prompt",
    "answer": "answer",
    "reference": "reference",
}

#: File suffixes read directly (``.json`` is JSON lines, or a single JSON array of objects).
SUPPORTED_SUFFIXES: tuple[str, ...] = (".jsonl", ".json", ".parquet")

_REQUIRED_FIELDS = ("prompt", "answer")

# Common column names in public datasets, used for a hint when the default name is absent and no
# close spelling exists (e.g. GSM8K/MATH call the prompt 'question'/'problem').
_SYNONYMS: dict[str, tuple[str, ...]] = {
    "prompt": ("question", "problem", "query", "input", "instruction"),
    "answer": ("final_answer", "ground_truth", "target", "gold", "label", "expected_answer"),
    "reference": ("solution", "rationale", "explanation"),
    "id": ("uid", "idx", "index", "problem_id", "unique_id"),
}


class RowLayout:
    """How the rows of one table layout become Problems (pass one to ``load_problems(..., layout=...)``).

    :class:`ColumnLayout` (a column mapping, the default) is one; the benchmark presets in
    :mod:`reasonrl.data.presets` are others. A layout names what is missing from a table's (or row's) columns and
    builds a Problem from one row dict; it raises :class:`UserError` prefixed with ``where`` ('file line N') for a
    bad value, so its errors are one line naming the file and row like every other data error.
    """

    #: prefix of generated ids (``f"{id_prefix}-{index}"``); None: the file stem or the dataset name's last part
    id_prefix: str | None = None

    def missing(self, label: str, present: list[str]) -> str | None:
        """The one-line error (starting with ``label``) for the first required column absent from ``present``."""
        raise NotImplementedError

    def make(self, row: dict[str, Any], where: str, default_id: str) -> Problem:
        """The Problem of one row that has every required column; ``default_id`` when the layout has no id."""
        raise NotImplementedError

    def describe(self) -> str:
        """The columns a row needs, for messages: "columns {describe()}"."""
        raise NotImplementedError


class ColumnLayout(RowLayout):
    """The default layout: Problem fields read from columns named by ``columns`` (see :func:`load_problems`)."""

    def __init__(self, columns: Mapping[str, str] | None = None) -> None:
        self.mapping, self.explicit = _resolve_columns(columns)

    def missing(self, label: str, present: list[str]) -> str | None:
        for fld in DEFAULT_COLUMNS:
            if (fld in _REQUIRED_FIELDS or fld in self.explicit) and self.mapping[fld] not in present:
                return f"{label}: {_missing_column_message(fld, self.mapping, present)}"
        return None

    def make(self, row: dict[str, Any], where: str, default_id: str) -> Problem:
        mapping = self.mapping
        messages = None
        if isinstance(row[mapping["prompt"]], (list, tuple)):
            messages = cell_messages(row[mapping["prompt"]], where, mapping["prompt"])
            prompt = messages[-1]["content"]
        else:
            prompt = cell_text(row[mapping["prompt"]], where, mapping["prompt"])
        answer = cell_text(row[mapping["answer"]], where, mapping["answer"])
        reference = row.get(mapping["reference"])
        if reference is not None:
            reference = cell_text(reference, where, mapping["reference"], allow_empty=True)
        pid = cell_id(row[mapping["id"]], where, mapping["id"]) if mapping["id"] in row else default_id
        used = {mapping[f] for f in DEFAULT_COLUMNS}
        metadata = {k: v for k, v in row.items() if k not in used}
        return Problem(id=pid, prompt=prompt, answer=answer, reference=reference, metadata=metadata, messages=messages)

    def describe(self) -> str:
        return f"'{self.mapping['prompt']}' and '{self.mapping['answer']}'"


def load_problems(
    source: str,
    *,
    split: str = "train",
    columns: dict[str, str] | None = None,
    limit: int | None = None,
    layout: RowLayout | None = None,
    subset: str | None = None,
) -> list[Problem]:
    """Load problems from a data file or a Hugging Face dataset.

    ``source`` is a path ending ``.jsonl``/``.json`` (JSON lines; a ``.json`` file holding one JSON array of
    objects is accepted too), ``.parquet``, or anything ``datasets.load_dataset`` accepts (a hub name such as
    ``openai/gsm8k`` when online, a local dataset directory with e.g. ``train.jsonl`` inside, or a folder written by
    ``save_to_disk``). ``split`` is only used for ``datasets`` sources (and a saved ``DatasetDict``).

    ``columns`` maps Problem fields to the dataset's column names, merged over :data:`DEFAULT_COLUMNS`, e.g.
    ``{"prompt": "question"}``. A field named in ``columns`` must exist; otherwise only prompt and answer
    are required. Without an id column, ids are ``f"{stem}-{index}"`` with the 0-based index of the row
    among the data rows (``stem`` is the file stem, or the last part of the dataset name). Unmapped columns
    go into ``metadata``. Numeric prompts/answers/references are converted with ``str()``; integer ids too.

    ``limit`` keeps the first ``limit`` problems (later rows are not read or validated).

    ``layout`` replaces the column mapping by another :class:`RowLayout` (e.g. a benchmark preset's public layout;
    ``columns`` must then be empty); ``subset`` is the ``datasets`` configuration name (``load_dataset(source,
    subset, split=split)``, e.g. ``main`` for ``openai/gsm8k``), ignored for files.

    Error locations: JSON lines report the 1-based line number of the file (blank lines are skipped but
    counted); a JSON array, Parquet and ``datasets`` sources report the 1-based row number.
    """
    if not isinstance(source, (str, os.PathLike)):
        raise UserError(f"data source must be a path or dataset name, got {type(source).__name__}")
    source = os.fspath(source)
    if not source.strip():
        raise UserError("data source is empty; pass a .jsonl/.parquet file or a Hugging Face dataset name")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise UserError(f"data limit must be a positive integer or None, got {limit!r}")
    if layout is None:
        layout = ColumnLayout(columns)
    elif columns:
        raise UserError("data.columns cannot be combined with a benchmark preset: the preset fixes the columns")

    path = Path(source).expanduser()
    suffix = path.suffix.lower()
    if path.is_file() or (path.is_dir() and suffix == ".parquet"):
        if suffix not in SUPPORTED_SUFFIXES:
            raise UserError(
                f"unsupported data file '{source}': expected one of {', '.join(SUPPORTED_SUFFIXES)} "
                "(JSON lines or Parquet), or a Hugging Face dataset name/directory"
            )
        rows = _parquet_rows(source, path, layout, limit) if suffix == ".parquet" else _json_rows(source, path)
        stem = layout.id_prefix or path.stem
        problems = _build(rows, source, layout, stem, limit)
    elif path.is_dir() or not _looks_like_path(source):
        rows, label = _hf_rows(source, split, layout, limit, subset)
        stem = layout.id_prefix or Path(source.rstrip("/\\")).name or source
        problems = _build(rows, label, layout, stem, limit)
    else:
        raise UserError(_not_found_message(source, path))
    return problems


RESERVED_COLUMNS = ("prompts", "completions", "completion_ids", "answer", "reference", "problem_id")


def reward_columns(problems: list[Problem], repeat: int = 1) -> dict[str, list]:
    """The columns reward functions receive by name, one entry per completion (each problem `repeat` times):
    `answer`, `reference`, `problem_id`, and every other dataset column the problems carry (`metadata`; None where
    a problem lacks it). A column named like one of the reward call's own arguments is not passed."""
    extra: dict[str, None] = {}
    for p in problems:
        extra.update(dict.fromkeys(k for k in p.metadata if k not in RESERVED_COLUMNS))
    cols: dict[str, list] = {"answer": [], "reference": [], "problem_id": [], **{k: [] for k in extra}}
    for p in problems:
        cols["answer"] += [p.answer] * repeat
        cols["reference"] += [p.reference] * repeat
        cols["problem_id"] += [p.id] * repeat
        for k in extra:
            cols[k] += [p.metadata.get(k)] * repeat
    return cols


def conversations(problems: list[Problem], repeat: int = 1) -> list[list[dict[str, str]]] | None:
    """The prompts as messages, one per completion (each problem `repeat` times), when any problem's prompt is
    conversational (a text prompt becomes one user turn); None when all are text."""
    if not any(p.messages for p in problems):
        return None
    return [p.conversation() for p in problems for _ in range(repeat)]


def problems_from_rows(
    rows: Iterable[Any],
    *,
    label: str = "train_dataset",
    columns: Mapping[str, str] | None = None,
    layout: RowLayout | None = None,
) -> list[Problem]:
    """Problems from in-memory rows (a list of dicts, or a `datasets.Dataset`, which iterates as dicts), validated as
    a file's rows are; errors name `label` and the 1-based row. `layout` replaces the column mapping (a benchmark
    preset's layout: ids are then numbered with its prefix, as for its files)."""
    if isinstance(rows, (str, bytes)) or not hasattr(rows, "__iter__"):
        raise UserError(f"{label} must be a list of dicts or a datasets.Dataset, got {type(rows).__name__}")
    if layout is None:
        layout = ColumnLayout(columns)
    elif columns:
        raise UserError("data.columns cannot be combined with a benchmark preset: the preset fixes the columns")
    numbered = ((f"{label} row {i + 1}", row) for i, row in enumerate(rows))
    return _build(numbered, label, layout, layout.id_prefix or label, None)


def write_jsonl(path: str | os.PathLike[str], problems: Iterable[Problem]) -> None:
    """Write problems as JSON lines that :func:`load_problems` reads back unchanged.

    Metadata keys become top-level columns (so the file looks like any other dataset); the write goes
    through a temporary file so an interrupted export never leaves a half-written file behind.
    """
    target = Path(path).expanduser()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    try:
        with tmp.open("w", encoding="utf-8", newline="\n") as fh:
            for problem in problems:
                fh.write(_problem_line(problem, target) + "\n")
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


# ----------------------------------------------------------------------------------------------- helpers


def _resolve_columns(columns: Mapping[str, str] | None) -> tuple[dict[str, str], frozenset[str]]:
    """Merge user column names over the defaults; reject unknown fields early (typos would silently no-op)."""
    if columns is None:
        return dict(DEFAULT_COLUMNS), frozenset()
    if not isinstance(columns, Mapping):
        raise UserError(f"data.columns must be a mapping of field -> column name, got {type(columns).__name__}")
    for key, value in columns.items():
        if key not in DEFAULT_COLUMNS:
            raise UserError(
                f"unknown data.columns key '{key}'{did_you_mean(str(key), DEFAULT_COLUMNS)}; "
                f"valid keys: {', '.join(DEFAULT_COLUMNS)}"
            )
        if not isinstance(value, str) or not value:
            raise UserError(f"data.columns.{key} must be a non-empty column name, got {value!r}")
    return {**DEFAULT_COLUMNS, **columns}, frozenset(columns)


def _looks_like_path(source: str) -> bool:
    """Guess whether a missing source was meant as a local path (so we say 'not found', not 'cannot load').

    Hub names contain one '/' (``owner/name``), so a single '/' only counts when ``owner`` is an existing
    local directory; a known suffix, a leading '.', '/' or '~', a backslash, or two or more '/' do.
    """
    if Path(source).suffix.lower() in SUPPORTED_SUFFIXES:
        return True
    if "/" in source and Path(source.split("/", 1)[0]).is_dir():
        return True
    if source.startswith((".", "/", "~")) or "\\" in source:
        return True
    return source.count("/") >= 2 or (os.sep != "/" and os.sep in source)


def _not_found_message(source: str, path: Path) -> str:
    msg = f"data file '{source}' not found"
    parent = path.parent if str(path.parent) else Path(".")
    if not path.is_absolute():
        msg += f" (relative to {Path.cwd()})"
    if parent.is_dir():
        try:
            siblings = [p.name for p in parent.iterdir() if p.suffix.lower() in SUPPORTED_SUFFIXES]
        except OSError:
            siblings = []
        msg += did_you_mean(path.name, siblings)
    return msg + "; check the path"


def _json_rows(source: str, path: Path) -> Iterator[tuple[str, Any]]:
    """Yield (location, decoded row) for a JSON-lines file, or a JSON array if the file starts with '['."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read data file '{source}': {e.strerror or e}") from None
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    if raw.lstrip()[:1] == b"[":
        yield from _json_array_rows(source, raw)
        return
    for lineno, line in enumerate(raw.splitlines(), start=1):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise UserError(
                f"{source} line {lineno}: not valid UTF-8 (byte {e.start + 1}); re-save the file as UTF-8"
            ) from None
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(
                f"{source} line {lineno}: invalid JSON ({e.msg}: column {e.colno}); fix or remove the line"
            ) from None
        yield f"{source} line {lineno}", row


def _json_array_rows(source: str, raw: bytes) -> Iterator[tuple[str, Any]]:
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise UserError(f"{source}: not valid UTF-8 (byte {e.start + 1}); re-save the file as UTF-8") from None
    except json.JSONDecodeError as e:
        raise UserError(
            f"{source} line {e.lineno}: invalid JSON ({e.msg}: column {e.colno}); fix the JSON array "
            "or convert the file to JSON lines (one object per line)"
        ) from None
    for index, row in enumerate(data, start=1):
        yield f"{source} row {index}", row


def _parquet_rows(source: str, path: Path, layout: RowLayout, limit: int | None) -> Iterator[tuple[str, Any]]:
    """Yield (location, row dict) for a Parquet file after checking its schema once for the file."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"reading '{source}' needs pyarrow: pip install pyarrow") from None
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises many types for corrupt/unreadable files
        raise UserError(
            f"cannot read Parquet file '{source}': {_one_line(e)}; check that it is a valid Parquet file"
        ) from None
    _check_columns(source, list(table.column_names), layout)
    if limit is not None:
        table = table.slice(0, limit)
    for index, row in enumerate(table.to_pylist(), start=1):
        yield f"{source} row {index}", row


def _hf_rows(
    name: str, split: str, layout: RowLayout, limit: int | None, subset: str | None = None
) -> tuple[Iterator[tuple[str, Any]], str]:
    """Load a ``datasets`` split and return (rows, label); any load failure becomes one UserError line."""
    where = f"split '{split}'" if subset is None else f"config '{subset}', split '{split}'"
    label = f"dataset '{name}' ({where})"
    try:
        import datasets
    except ImportError:
        raise UserError(
            f"cannot load dataset '{name}': the 'datasets' package is not installed "
            "(pip install 'reasonrl[datasets]'); or pass a local .jsonl/.parquet file instead"
        ) from None
    try:
        if _saved_to_disk(name):  # a folder written by Dataset.save_to_disk / DatasetDict.save_to_disk
            ds = datasets.load_from_disk(name)
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise UserError(f"{label}: no such split; the folder has {', '.join(ds)} (data.split / --split)")
                ds = ds[split]
        else:
            args = (name,) if subset is None else (name, subset)
            ds = datasets.load_dataset(*args, split=split)
    except UserError:
        raise
    except Exception as e:  # network, hub, builder and split errors all mean "cannot load"
        raise UserError(
            f"cannot load dataset '{name}' ({where}): {_one_line(e)}; pass a local .jsonl/.parquet file instead"
        ) from None
    column_names = getattr(ds, "column_names", None)
    if not isinstance(column_names, list):
        raise UserError(f"{label}: expected a single split, got {type(ds).__name__}; pass split=<name>")
    _check_columns(label, column_names, layout)
    if limit is not None and limit < len(ds):
        ds = ds.select(range(limit))

    def rows() -> Iterator[tuple[str, Any]]:
        for index, row in enumerate(ds, start=1):
            yield f"{label} row {index}", row

    return rows(), label


def _saved_to_disk(name: str) -> bool:
    path = Path(name).expanduser()
    return (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()


def _check_columns(label: str, present: list[str], layout: RowLayout) -> None:
    """Report a missing column once per file (tabular sources have one schema for all rows)."""
    msg = layout.missing(label, present)
    if msg is not None:
        raise UserError(msg)


def _missing_column_message(fld: str, mapping: dict[str, str], present: Iterable[str]) -> str:
    present = list(present)
    column = mapping[fld]
    mapped = set(mapping.values())
    unmapped = [c for c in present if c not in mapped]
    hint = did_you_mean(column, unmapped)
    if not hint:
        synonyms = [c for c in _SYNONYMS.get(fld, ()) if c in unmapped]
        hint = f" (did you mean '{synonyms[0]}'?)" if synonyms else ""
    shown = ", ".join(present[:20]) + (", ..." if len(present) > 20 else "")
    return f"missing column '{column}'{hint} (columns: {shown or 'none'}); map it with data.columns.{fld}=<name>"


def _build(
    rows: Iterable[tuple[str, Any]], label: str, layout: RowLayout, stem: str, limit: int | None
) -> list[Problem]:
    problems: list[Problem] = []
    seen: dict[str, str] = {}
    for index, (where, row) in enumerate(rows):
        if limit is not None and index >= limit:
            break
        problem = _make_problem(row, where, layout, f"{stem}-{index}")
        if problem.id in seen:
            first = seen[problem.id].removeprefix(label).strip()
            raise UserError(f"{where}: duplicate id '{problem.id}' (first seen at {first}); ids must be unique")
        seen[problem.id] = where
        problems.append(problem)
    if not problems:
        raise UserError(f"{label} contains no problems; add rows with {layout.describe()} columns")
    return problems


def _make_problem(row: Any, where: str, layout: RowLayout, default_id: str) -> Problem:
    """Validate one row and turn it into a Problem; ``where`` is the 'file line N' prefix for errors."""
    if not isinstance(row, dict):
        kind = "null" if row is None else type(row).__name__
        raise UserError(
            f"{where}: expected a JSON object with columns {layout.describe()}, got {kind}; fix or remove it"
        )
    msg = layout.missing(where, list(row))
    if msg is not None:
        raise UserError(msg)
    return layout.make(row, where, default_id)


def _describe(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Number) and not isinstance(value, (bool, complex))


def cell_text(value: Any, where: str, column: str, *, allow_empty: bool = False) -> str:
    """A cell as text: strings and finite numbers (gold answers are often stored as numbers); anything else, and an
    empty string unless ``allow_empty``, is a one-line UserError starting with ``where`` and naming ``column``."""
    if isinstance(value, str):
        if not allow_empty and not value.strip():
            raise UserError(f"{where}: column '{column}' is empty; fill it in or remove the row")
        return value
    if _is_number(value):
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{where}: column '{column}' is {value}, not a finite number; fix or remove the row")
        return str(value)
    raise UserError(
        f"{where}: column '{column}' must be a string or number, got {_describe(value)}; fix or remove the row"
    )


_ROLES = ("system", "user", "assistant")


def cell_messages(value: Any, where: str, column: str) -> tuple[dict[str, str], ...]:
    """A conversational prompt cell (TRL's form): a non-empty list of {role, content} with roles system, user or
    assistant, ending with the user's turn (the one the model answers); anything else is a one-line UserError."""
    if not value:
        raise UserError(f"{where}: column '{column}' is an empty list of messages; fill it in or remove the row")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise UserError(
                f'{where}: column \'{column}\' message {i + 1} must be {{"role": ..., "content": "text"}}, '
                f"got {_describe(m)}; fix or remove the row"
            )
        if m["role"] not in _ROLES:
            raise UserError(
                f"{where}: column '{column}' message {i + 1} has role '{m['role']}'{did_you_mean(m['role'], _ROLES)}; "
                f"roles are {', '.join(_ROLES)}"
            )
        out.append({"role": m["role"], "content": m["content"]})
    if out[-1]["role"] != "user" or not out[-1]["content"].strip():
        raise UserError(
            f"{where}: column '{column}' must end with a non-empty user message (the turn the model answers); "
            "fix or remove the row"
        )
    return tuple(out)


def cell_id(value: Any, where: str, column: str) -> str:
    """An id cell as text: a non-empty string or an integer; anything else is a one-line UserError."""
    if isinstance(value, str) and value.strip():
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    got = "an empty string" if isinstance(value, str) else _describe(value)
    raise UserError(
        f"{where}: column '{column}' (id) must be a non-empty string or integer, got {got}; "
        "fix it or drop the id column to number rows automatically"
    )


def _problem_line(problem: Problem, target: Path) -> str:
    clash = [k for k in problem.metadata if k in DEFAULT_COLUMNS]
    if clash:
        raise UserError(
            f"cannot write problem '{problem.id}' to {target}: metadata key '{clash[0]}' clashes with a "
            "Problem field; rename the metadata key"
        )
    record: dict[str, Any] = {
        "id": problem.id,
        "prompt": list(problem.messages) if problem.messages else problem.prompt,
        "answer": problem.answer,
        "reference": problem.reference,
        **problem.metadata,
    }
    try:
        return json.dumps(record, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise UserError(
            f"cannot write problem '{problem.id}' to {target}: {_one_line(e)}; "
            "metadata values must be JSON-serialisable"
        ) from None


def _one_line(exc: BaseException, max_len: int = 300) -> str:
    """'ExceptionType: first line of message', so foreign errors fit the one-line UserError contract."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    first = lines[0] if lines else ""
    if len(first) > max_len:
        first = first[: max_len - 3] + "..."
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__
