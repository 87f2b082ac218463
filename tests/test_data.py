"""Tests for reasonrl.data: loading/exporting problems and the one-line UserErrors for bad data."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from conftest import user_error as expect_user_error

from reasonrl.data.problems import DEFAULT_COLUMNS, Problem, load_problems, write_jsonl
from reasonrl.errors import UserError

ROWS: list[dict[str, Any]] = [
    {"id": "a", "prompt": "What is 1+1?", "answer": "2", "reference": "1+1=2", "level": 1},
    {"id": "b", "prompt": "What is 2*3?", "answer": "6", "reference": None, "level": 2},
    {"id": "c", "prompt": "What is 10/4?", "answer": "2.5", "reference": "10/4=2.5", "level": 3},
]


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_rows(path: Path, rows: list[Any]) -> Path:
    return write_lines(path, [json.dumps(r) for r in rows])


def write_parquet(path: Path, rows: list[dict[str, Any]]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def user_error(match_parts: list[str], *args: Any, **kwargs: Any) -> str:
    """Call load_problems expecting a one-line UserError containing every part."""
    return expect_user_error(match_parts, load_problems, *args, **kwargs)


# ------------------------------------------------------------------------------------------- round trips


def test_jsonl_round_trip(tmp_path: Path) -> None:
    src = write_rows(tmp_path / "x.jsonl", ROWS)
    problems = load_problems(str(src))
    assert problems[0] == Problem("a", "What is 1+1?", "2", "1+1=2", {"level": 1})
    assert problems[1].reference is None
    out = tmp_path / "sub" / "out.jsonl"
    write_jsonl(out, problems)
    assert load_problems(str(out)) == problems
    assert not list(out.parent.glob("*.tmp"))
    first = json.loads(out.read_text(encoding="utf-8").splitlines()[0])
    assert first == {"id": "a", "prompt": "What is 1+1?", "answer": "2", "reference": "1+1=2", "level": 1}


def test_parquet_round_trip(tmp_path: Path) -> None:
    src = write_parquet(tmp_path / "x.parquet", ROWS)
    problems = load_problems(str(src))
    assert problems == load_problems(str(write_rows(tmp_path / "y.jsonl", ROWS)))
    out = tmp_path / "out.jsonl"
    write_jsonl(out, problems)
    assert load_problems(str(out)) == problems


def test_json_suffix_lines_and_array(tmp_path: Path) -> None:
    lines = write_rows(tmp_path / "lines.json", ROWS)
    array = tmp_path / "array.json"
    array.write_text(json.dumps(ROWS, indent=2), encoding="utf-8")
    assert load_problems(str(lines)) == load_problems(str(array))


def test_unicode_and_bom(tmp_path: Path) -> None:
    path = tmp_path / "u.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"prompt": "π ≈ ?", "answer": "3.14"}).encode())
    (p,) = load_problems(str(path))
    assert p.prompt == "π ≈ ?"
    out = tmp_path / "u_out.jsonl"
    write_jsonl(out, [p])
    assert "π" in out.read_text(encoding="utf-8")
    assert load_problems(str(out)) == [p]


# ----------------------------------------------------------------------------- mapping, metadata, limits


def test_column_mapping_and_metadata(tmp_path: Path) -> None:
    rows = [{"question": "Q1", "final": 7, "solution": "S1", "prompt": "unused", "src": "gsm8k"}]
    path = write_rows(tmp_path / "m.jsonl", rows)
    (p,) = load_problems(str(path), columns={"prompt": "question", "answer": "final", "reference": "solution"})
    assert (p.id, p.prompt, p.answer, p.reference) == ("m-0", "Q1", "7", "S1")
    assert p.metadata == {"prompt": "unused", "src": "gsm8k"}


def test_generated_ids_skip_blank_lines_and_numbers_become_str(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "gen.jsonl",
        ['{"prompt": "a", "answer": 1}', "", "   ", '{"prompt": 2, "answer": 0.5}', ""],
    )
    problems = load_problems(str(path))
    assert [(p.id, p.prompt, p.answer) for p in problems] == [("gen-0", "a", "1"), ("gen-1", "2", "0.5")]


def test_integer_ids_become_str(tmp_path: Path) -> None:
    path = write_rows(tmp_path / "i.jsonl", [{"id": 5, "prompt": "p", "answer": "a"}])
    assert load_problems(str(path))[0].id == "5"


def test_limit(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "l.jsonl", [json.dumps(r) for r in ROWS] + ["{broken"])
    assert [p.id for p in load_problems(str(path), limit=2)] == ["a", "b"]
    pq_path = write_parquet(tmp_path / "l.parquet", ROWS)
    assert [p.id for p in load_problems(str(pq_path), limit=1)] == ["a"]
    assert len(load_problems(str(pq_path), limit=100)) == 3
    user_error(["limit", "positive"], str(path), limit=0)


def test_default_columns_unchanged() -> None:
    assert DEFAULT_COLUMNS == {"id": "id", "prompt": "prompt", "answer": "answer", "reference": "reference"}


def test_problem_hashable_and_frozen() -> None:
    p = Problem("a", "p", "1", metadata={"k": [1]})
    assert hash(p) == hash(Problem("a", "p", "1", metadata={"k": [2]}))
    assert p != Problem("a", "p", "1", metadata={"k": [2]})
    with pytest.raises(AttributeError):
        p.answer = "2"  # type: ignore[misc]


# ------------------------------------------------------------------------------------------------ errors


def test_missing_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_rows(tmp_path / "train.jsonl", ROWS)
    missing = str(tmp_path / "trian.jsonl")
    msg = user_error([f"data file '{missing}' not found"], missing)
    assert "did you mean 'train.jsonl'" in msg
    user_error(["data file 'nope.parquet' not found"], "nope.parquet")
    user_error(["not found"], "./some/dir")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    user_error(["data file 'data/gsm8k' not found"], "data/gsm8k")  # not sent to the Hub: 'data/' exists


def test_unknown_suffix(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_text("prompt,answer\n1+1,2\n")
    user_error(["data.csv", ".jsonl", ".parquet"], str(path))


def test_invalid_json_line(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "bad.jsonl", [json.dumps(r) for r in ROWS] + ["", "", '{"prompt": "x" "answer": 1}'])
    msg = user_error(["bad.jsonl line 6: invalid JSON", "delimiter: column", "fix or remove the line"], str(path))
    assert "Expecting ',' delimiter: column 16" in msg


def test_invalid_utf8_line(tmp_path: Path) -> None:
    path = tmp_path / "enc.jsonl"
    path.write_bytes(b'{"prompt": "a", "answer": "1"}\n{"prompt": "\xff", "answer": "1"}\n')
    user_error(["enc.jsonl line 2", "UTF-8"], str(path))


def test_row_not_an_object(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "arr.jsonl", ['{"prompt": "a", "answer": "1"}', "[1, 2]"])
    user_error(["arr.jsonl line 2", "JSON object", "list"], str(path))


def test_missing_column_jsonl(tmp_path: Path) -> None:
    rows = [
        {"prompt": "a", "answer": "1"},
        {"prompt": "b", "answer": "2"},
        {"question": "c", "solution": "3"},
    ]
    path = write_rows(tmp_path / "x.jsonl", rows)
    user_error(
        [
            "x.jsonl line 3: missing column 'prompt'",
            "(columns: question, solution)",
            "map it with data.columns.prompt=<name>",
            "did you mean 'question'?",
        ],
        str(path),
    )


def test_missing_column_close_name_suggested(tmp_path: Path) -> None:
    path = write_rows(tmp_path / "x.jsonl", [{"prompt": "a", "answers": "1"}])
    user_error(
        ["x.jsonl line 1: missing column 'answer' (did you mean 'answers'?)", "data.columns.answer=<name>"],
        str(path),
    )


def test_explicit_mapping_must_exist(tmp_path: Path) -> None:
    path = write_rows(tmp_path / "x.jsonl", [{"prompt": "a", "answer": "1", "solution": "s"}])
    user_error(
        ["x.jsonl line 1", "missing column 'soln'", "data.columns.reference"],
        str(path),
        columns={"reference": "soln"},
    )


def test_unknown_columns_key(tmp_path: Path) -> None:
    path = write_rows(tmp_path / "x.jsonl", ROWS)
    user_error(["unknown data.columns key 'promt'", "did you mean 'prompt'"], str(path), columns={"promt": "q"})


@pytest.mark.parametrize(("value", "kind"), [(None, "null"), ([1], "list"), ({"a": 1}, "dict"), (True, "bool")])
def test_bad_answer_type(tmp_path: Path, value: Any, kind: str) -> None:
    path = write_rows(tmp_path / "t.jsonl", [{"prompt": "a", "answer": "1"}, {"prompt": "b", "answer": value}])
    user_error(["t.jsonl line 2", "column 'answer'", kind], str(path))


def test_null_prompt_and_empty_prompt(tmp_path: Path) -> None:
    path = write_rows(tmp_path / "t.jsonl", [{"prompt": None, "answer": "1"}])
    user_error(["t.jsonl line 1", "column 'prompt'", "null"], str(path))
    path = write_rows(tmp_path / "e.jsonl", [{"prompt": "  ", "answer": "1"}])
    user_error(["e.jsonl line 1", "column 'prompt' is empty"], str(path))


def test_bad_id(tmp_path: Path) -> None:
    path = write_rows(tmp_path / "t.jsonl", [{"id": None, "prompt": "a", "answer": "1"}])
    user_error(["t.jsonl line 1", "column 'id'"], str(path))


def test_empty_file(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "empty.jsonl", ["", "  "])
    user_error(["empty.jsonl contains no problems"], str(path))
    (tmp_path / "zero.jsonl").write_bytes(b"")
    user_error(["zero.jsonl contains no problems"], str(tmp_path / "zero.jsonl"))


def test_duplicate_ids(tmp_path: Path) -> None:
    rows = [{"id": "q1", "prompt": "a", "answer": "1"}, {"id": "q2", "prompt": "b", "answer": "2"}]
    path = write_lines(tmp_path / "d.jsonl", [json.dumps(r) for r in rows] + ["", json.dumps(rows[0])])
    user_error(["d.jsonl line 4", "duplicate id 'q1'", "line 1"], str(path))


def test_parquet_missing_column_reported_once(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "p.parquet", [{"question": "a", "answer": "1"}])
    msg = user_error(
        ["p.parquet: missing column 'prompt'", "(columns: question, answer)", "data.columns.prompt"],
        str(path),
    )
    assert "row" not in msg


def test_parquet_row_errors(tmp_path: Path) -> None:
    rows = [{"id": "a", "prompt": "p", "answer": "1"}, {"id": "b", "prompt": "q", "answer": None}]
    user_error(["n.parquet row 2", "column 'answer'", "null"], str(write_parquet(tmp_path / "n.parquet", rows)))
    rows = [{"id": "a", "prompt": "p", "answer": 1}, {"id": "a", "prompt": "q", "answer": 2}]
    user_error(["d.parquet row 2", "duplicate id 'a'", "row 1"], str(write_parquet(tmp_path / "d.parquet", rows)))


def test_parquet_corrupt_and_empty(tmp_path: Path) -> None:
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet at all")
    user_error(["bad.parquet", "cannot read Parquet"], str(bad))
    import pyarrow as pa
    import pyarrow.parquet as pq

    empty = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"prompt": pa.array([], pa.string()), "answer": pa.array([], pa.string())}), empty)
    user_error(["empty.parquet contains no problems"], str(empty))


def test_write_jsonl_metadata_clash(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="metadata key 'prompt'"):
        write_jsonl(tmp_path / "o.jsonl", [Problem("a", "p", "1", metadata={"prompt": "x"})])
    assert not (tmp_path / "o.jsonl").exists()
    assert not list(tmp_path.glob("*.tmp"))


# -------------------------------------------------------------------------------------- Hugging Face datasets


@pytest.fixture
def hf_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Force offline mode; env vars alone do not suffice once `datasets` is imported (read at import)."""
    datasets = pytest.importorskip("datasets")
    import huggingface_hub.constants

    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.mark.usefixtures("hf_offline")
def test_load_local_dataset_directory(tmp_path: Path) -> None:
    ds_dir = tmp_path / "mini_ds"
    ds_dir.mkdir()
    rows = [{"question": f"q{i}", "answer": i, "level": i % 2} for i in range(4)]
    write_rows(ds_dir / "train.jsonl", rows)
    write_rows(ds_dir / "test.jsonl", rows[:1])
    problems = load_problems(str(ds_dir), columns={"prompt": "question"}, limit=3)
    assert [(p.id, p.prompt, p.answer, p.metadata) for p in problems] == [
        (f"mini_ds-{i}", f"q{i}", str(i), {"level": i % 2}) for i in range(3)
    ]
    assert len(load_problems(str(ds_dir), split="test", columns={"prompt": "question"})) == 1
    user_error(
        ["cannot load dataset", "split 'validation'", "pass a local .jsonl/.parquet"],
        str(ds_dir),
        split="validation",
        columns={"prompt": "question"},
    )
    user_error(
        [f"dataset '{ds_dir}' (split 'train'): missing column 'prompt'", "did you mean 'question'"],
        str(ds_dir),
    )


@pytest.mark.usefixtures("hf_offline")
def test_unknown_hub_dataset_offline() -> None:
    msg = user_error(
        ["cannot load dataset 'no-such-org-zz/no-such-dataset-zz' (split 'train'):", "pass a local"],
        "no-such-org-zz/no-such-dataset-zz",
    )
    assert "Error" in msg  # exception type is named


def test_data_module_does_not_import_torch_or_datasets() -> None:
    import subprocess
    import sys

    code = (
        "import sys, reasonrl.data; "
        "bad = [m for m in ('torch', 'datasets', 'pyarrow') if m in sys.modules]; "
        "assert not bad, bad"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def test_a_save_to_disk_folder_loads(tmp_path: Path) -> None:
    """Folders written by datasets' save_to_disk load like any source: a Dataset, or a DatasetDict's split."""
    datasets = pytest.importorskip("datasets")
    rows = {"question": ["1+1", "2+2"], "answer": ["2", "4"]}
    datasets.Dataset.from_dict(rows).save_to_disk(tmp_path / "one")
    got = load_problems(str(tmp_path / "one"), columns={"prompt": "question"})
    assert [(p.prompt, p.answer) for p in got] == [("1+1", "2"), ("2+2", "4")]
    both = datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows), "test": datasets.Dataset.from_dict(
        {"question": ["3+3"], "answer": ["6"]})})  # fmt: skip
    both.save_to_disk(tmp_path / "dict")
    assert [p.answer for p in load_problems(str(tmp_path / "dict"), split="test", columns={"prompt": "question"})] == [
        "6"
    ]
    with pytest.raises(UserError, match="no such split; the folder has train, test"):
        load_problems(str(tmp_path / "dict"), split="validation", columns={"prompt": "question"})


def test_eval_on_the_training_file_is_said_out_loud(tmp_path: Path) -> None:
    import warnings

    from reasonrl.config import load_config
    from reasonrl.data.sources import load_training_data

    train = tmp_path / "train.jsonl"
    write_jsonl(train, [Problem("a", "1+1", "2"), Problem("b", "2+2", "4")])
    held_out = tmp_path / "test.jsonl"
    write_jsonl(held_out, [Problem("c", "3+3", "6")])
    with pytest.warns(UserWarning, match="eval accuracy is measured on the training problems"):
        _, test = load_training_data(load_config(None, [f"data.source={train}"]))
    assert [p.id for p in test] == ["a", "b"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, test = load_training_data(load_config(None, [f"data.source={train}", f"data.eval_source={held_out}"]))
    assert [p.id for p in test] == ["c"]


CHAT = [
    {"role": "system", "content": "Answer with a number."},
    {"role": "user", "content": "What is 1+1?"},
    {"role": "assistant", "content": "2"},
    {"role": "user", "content": "And 2+3?"},
]


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_conversational_prompts_load_and_round_trip(tmp_path: Path, suffix: str) -> None:
    """TRL's conversational form: the prompt column holds messages; the problem keeps them, its prompt is the last
    user turn (what LANPO's feedback wraps) and its history the turns before; write_jsonl writes them back."""
    rows = [{"id": "a", "prompt": CHAT, "answer": "5"}, {"id": "b", "prompt": "What is 2*3?", "answer": "6"}]
    if suffix == ".jsonl":
        path = write_rows(tmp_path / "chat.jsonl", rows)
    else:
        pd = pytest.importorskip("pandas")
        path = tmp_path / "chat.parquet"
        pd.DataFrame(rows[:1]).to_parquet(path)
        rows = rows[:1]
    problems = load_problems(str(path))
    chat = problems[0]
    assert chat.messages == tuple(CHAT) and chat.prompt == "And 2+3?" and chat.history == tuple(CHAT[:3])
    assert chat.conversation("wrapped") == [*CHAT[:3], {"role": "user", "content": "wrapped"}]
    if len(problems) > 1:
        assert problems[1].messages is None and problems[1].history == ()
    write_jsonl(tmp_path / "out.jsonl", problems)
    assert load_problems(str(tmp_path / "out.jsonl")) == problems


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ([], "empty list of messages"),
        ([{"role": "user"}], r"message 1 must be \{\"role\""),
        ([{"role": "usr", "content": "x"}], "role 'usr'.*did you mean 'user'"),
        ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "must end with a non-empty user"),
        (["plain string in a list"], "message 1 must be"),
    ],
)
def test_bad_conversational_prompts_are_one_line_errors(tmp_path: Path, prompt: Any, message: str) -> None:
    path = write_rows(tmp_path / "bad.jsonl", [{"prompt": "ok", "answer": "1"}, {"prompt": prompt, "answer": "1"}])
    with pytest.raises(UserError, match=rf"bad\.jsonl line 2: column 'prompt' .*{message}") as info:
        load_problems(str(path))
    assert "\n" not in str(info.value)


def test_conversational_prompts_through_a_chat_template() -> None:
    """The history precedes the (possibly wrapped) user turn; data.system_prompt opens a conversation without its
    own system message only; a tokenizer without a chat template refuses messages in one line."""
    from reasonrl.data.prompts import PromptFormat, prompt_ids

    class Tok:
        chat_template = "x"

        def apply_chat_template(self, messages, **kw):
            self.seen = messages
            return [len(m["content"]) for m in messages]

    tok, fmt = Tok(), PromptFormat(system_prompt="Be brief.")
    prompt_ids(tok, "And 2+3?", fmt, tuple(CHAT[:3]))
    assert tok.seen == CHAT  # its own system message, so no second one
    prompt_ids(tok, "Q", fmt, ({"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}))
    assert [m["role"] for m in tok.seen] == ["system", "user", "assistant", "user"]
    assert tok.seen[0]["content"] == "Be brief."

    class Plain:
        chat_template = None

    expect_user_error(["need a tokenizer with a chat template"], prompt_ids, Plain(), "Q", None, tuple(CHAT[:3]))
