"""A model family the shared-prefix pass does not special-case (GPT-2) trains through the generic forward path:
the loss's log-probs come from the model's own `forward`, and equal the rollout's behaviour log-probs."""

from __future__ import annotations

import math

import pytest
import torch

from reasonrl.config import load_config
from reasonrl.demo import arithmetic
from reasonrl.model.forward import resolve_forward
from reasonrl.training.batch import make_micro_batches
from reasonrl.training.trainer import Trainer
from reasonrl.training.update import token_logprobs


def tiny_gpt2(path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = arithmetic.build_tokenizer()
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=256,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id,
    )  # fmt: skip
    GPT2LMHeadModel(config).save_pretrained(path)
    tok.save_pretrained(path)


def test_gpt2_trains_through_the_generic_forward(tiny_overrides, tmp_path):
    tiny_gpt2(tmp_path / "gpt2")
    overrides = [*tiny_overrides, f"model.name={tmp_path / 'gpt2'}", "rewards.functions=[tests.conftest:length_reward]"]
    trainer = Trainer(load_config(None, [*overrides, "rewards.weights=[1.0]"]), tmp_path / "run")
    try:
        assert trainer.model.config.model_type == "gpt2"
        assert trainer.updater.forward == "generic"  # auto: this family has no shared-prefix pass
        before = [p.detach().clone() for p in trainer.model.parameters()]
        for _ in range(2):
            metrics = trainer.step()
            trainer.global_step += 1
            assert math.isfinite(metrics["loss"]) and metrics["grad_norm"] > 0
        assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters(), strict=True))
        # the generic pass reproduces the engine's behaviour log-probs (same weights, same temperature)
        prompts = trainer._prompt_ids([p.prompt for p in trainer.problems[:2]])
        comps = trainer.engine.generate(prompts, 2, trainer.sampling)
        mb = make_micro_batches(comps, torch.zeros(len(comps)), [True] * len(comps), 0, 0, torch.device("cpu"))[0]
        with torch.no_grad():
            logp, _ = token_logprobs(trainer.model, mb, trainer.sampling.temperature, forward="generic")
        assert ((logp - mb.behaviour_logp).abs() * mb.mask).max() < 1e-5
    finally:
        trainer.close()


def test_auto_forward_takes_the_shared_prefix_pass_only_where_it_is_tested():
    from transformers import GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM

    qwen = Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2))  # fmt: skip
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2))
    assert resolve_forward("auto", qwen) == "shared_prefix"
    assert resolve_forward("auto", gpt2) == "generic"
    assert resolve_forward("generic", qwen) == "generic"
    assert resolve_forward("shared_prefix", qwen) == "shared_prefix"


def test_attn_implementation_reaches_from_pretrained(tmp_path):
    """model.attn_implementation picks transformers' attention kernel; one it cannot use is a one-line error."""
    import torch

    from reasonrl.config import load_config
    from reasonrl.errors import UserError
    from reasonrl.model.loading import load_pretrained

    tiny_gpt2(tmp_path)
    for impl in ("eager", "sdpa"):
        cfg = load_config(None, [f"model.attn_implementation={impl}"])
        model, _ = load_pretrained(str(tmp_path), cfg.model, torch.device("cpu"), torch.float32)
        assert model.config._attn_implementation == impl
    cfg = load_config(None, ["model.attn_implementation=no_such_kernel"])
    with pytest.raises(UserError, match="model.attn_implementation=no_such_kernel"):
        load_pretrained(str(tmp_path), cfg.model, torch.device("cpu"), torch.float32)
