"""Prompt building: turn a problem into the token ids the policy is sampled from.

Applies the tokenizer's chat template when it has one (instruct models); otherwise uses the raw prompt text
(base models, the built-in task). LANPO's feedback contexts are built here too, before rollout.
"""

from __future__ import annotations

from typing import Any


def prompt_ids(tokenizer: Any, text: str, system_prompt: str | None = None) -> list[int]:
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        messages.append({"role": "user", "content": text})
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    return tokenizer(text, add_special_tokens=False)["input_ids"]
