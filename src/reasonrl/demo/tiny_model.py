"""The embedded demo's policy: a small Qwen2 with random weights."""

from __future__ import annotations

from typing import Any

from reasonrl.errors import UserError


def build_tiny_model(cfg: Any, vocab_size: int, pad_id: int, eos_id: int):
    """A small Qwen2 with random weights (~1M parameters at the defaults) from the config's `model` section."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if cfg.hidden_size % cfg.num_heads:
        raise UserError(f"model.hidden_size ({cfg.hidden_size}) must be divisible by model.num_heads ({cfg.num_heads})")
    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=pad_id,
        eos_token_id=eos_id,
        bos_token_id=eos_id,
        attention_dropout=0.0,
    )
    return Qwen2ForCausalLM(config)
