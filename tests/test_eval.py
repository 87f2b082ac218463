"""Evaluation: unbiased pass@k, the eval command on run directories and local model files, chat templates."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

import pytest
import torch

from reasonrl.data.prompts import PromptFormat, prompt_ids
from reasonrl.demo.arithmetic import build_tokenizer
from reasonrl.evaluate import pass_at_k


@pytest.mark.parametrize("n,c,k", [(n, c, k) for n in range(1, 7) for c in range(n + 1) for k in range(1, n + 1)])
def test_pass_at_k_equals_brute_force(n, c, k):
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    brute = sum(any(samples[i] for i in s) for s in subsets) / len(subsets)
    assert pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12)


def test_chat_template_is_applied_when_present():
    tok = build_tokenizer()
    plain = prompt_ids(tok, "Q: 1+2\n")
    assert tok.decode(plain) == "Q: 1+2\n"
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>"
    templated = tok.decode(prompt_ids(tok, "Q: 1+2\n", PromptFormat(system_prompt="Be brief.")))
    assert templated == "<system>Be brief.<user>Q: 1+2\n<assistant>"


def reasonrl(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "reasonrl", *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )


def test_eval_command_on_run_dir_and_local_model(tiny_overrides, tmp_path):
    res = reasonrl("train", *tiny_overrides, "train.run_name=r", "train.steps=1")
    assert res.returncode == 0, res.stderr
    run = tmp_path / "runs" / "r"
    out = reasonrl("eval", "--model", str(run), "-k", "3", "-n", "4", "--json")
    assert out.returncode == 0, out.stderr
    metrics = json.loads(out.stdout.strip().splitlines()[-1])
    assert metrics["problems"] == 4 and {"accuracy", "mean@3", "pass@3"} <= set(metrics)
    assert 0 <= metrics["mean@3"] <= metrics["pass@3"] <= 1

    # a plain model directory (from_pretrained on local files) on a user JSONL file
    data = tmp_path / "problems.jsonl"
    data.write_text("".join(json.dumps({"question": f"Q: {a}+{a}\n", "answer": str(2 * a)}) + "\n" for a in range(5)))
    out = reasonrl(
        "eval",
        "--model",
        str(run / "model"),
        "--data",
        str(data),
        "--json",
        "data.columns={prompt: question}",
        "rewards.num_workers=1",
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1])["problems"] == 5


def test_train_from_a_local_pretrained_directory(tiny_overrides, tmp_path):
    res = reasonrl("train", *tiny_overrides, "train.run_name=base", "train.steps=1")
    assert res.returncode == 0, res.stderr
    model_dir = tmp_path / "runs" / "base" / "model"
    res = reasonrl("train", *tiny_overrides, f"model.name={model_dir}", "train.run_name=ft", "train.steps=1")
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "runs" / "ft" / "model" / "model.safetensors").exists()


def test_saved_tiny_model_reloads_with_its_character_tokenizer(tmp_path):
    # transformers maps model type qwen2 to its own tokenizer class, which would drop spaces and newlines
    from reasonrl.config import ModelConfig
    from reasonrl.demo import arithmetic
    from reasonrl.demo.tiny_model import build_tiny_model
    from reasonrl.model.loading import load_pretrained

    tok = arithmetic.build_tokenizer()
    cfg = ModelConfig(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32)
    build_tiny_model(cfg, len(tok), tok.pad_token_id, tok.eos_token_id).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    _, loaded = load_pretrained(str(tmp_path), cfg, torch.device("cpu"), torch.float32)
    text = "Q: 347+589\n7+9=16\n\\boxed{936}"
    ids = loaded(text, add_special_tokens=False)["input_ids"]
    assert ids == tok(text, add_special_tokens=False)["input_ids"] and loaded.decode(ids) == text


def test_chat_template_kwargs_and_max_prompt_length_shape_the_prompt():
    """data.chat_template_kwargs reach the template; data.max_prompt_length keeps a long prompt's last tokens, with a
    warning; both are read from the config by PromptFormat.from_config."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from reasonrl.config import load_config

    tok = PreTrainedTokenizerFast(
        tokenizer_object=_word_tokenizer(Tokenizer, models, pre_tokenizers),
        unk_token="<unk>",
    )
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% if not enable_thinking %} nothink{% endif %}{% endif %}"
    )
    cfg = load_config(None, ["data.chat_template_kwargs={enable_thinking: false}", "data.max_prompt_length=3"])
    fmt = PromptFormat.from_config(cfg.data)
    assert fmt.template_kwargs == {"enable_thinking": False} and fmt.max_length == 3
    thinking = tok.decode(prompt_ids(tok, "a b", PromptFormat(template_kwargs={"enable_thinking": True})))
    assert "nothink" not in thinking
    assert "nothink" in tok.decode(prompt_ids(tok, "a b", PromptFormat(template_kwargs={"enable_thinking": False})))
    full = prompt_ids(tok, "a b c d e f")
    with pytest.warns(UserWarning, match="data.max_prompt_length=3"):
        assert prompt_ids(tok, "a b c d e f", fmt) == full[-3:]


def _word_tokenizer(Tokenizer, models, pre_tokenizers):
    words = ["<unk>", "a", "b", "c", "d", "e", "f", "user", "assistant", ":", "nothink"]
    t = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    return t
