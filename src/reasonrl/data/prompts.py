"""Prompt building: turn a problem into the token ids the policy is sampled from.

Applies the tokenizer's chat template when it has one (instruct models); otherwise uses the raw prompt text
(base models, the built-in task). LANPO's feedback contexts are built here too, before rollout.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from reasonrl.data.problems import Problem
from reasonrl.errors import UserError


@dataclass(frozen=True)
class PromptFormat:
    """How a problem's text becomes prompt tokens: `data.system_prompt`, `data.chat_template_kwargs` (extra
    variables of the chat template, e.g. Qwen3's `enable_thinking`) and `data.max_prompt_length`."""

    system_prompt: str | None = None
    template_kwargs: Mapping[str, Any] = field(default_factory=dict)
    max_length: int | None = None

    @classmethod
    def from_config(cls, data: Any) -> PromptFormat:
        return cls(data.system_prompt, dict(data.chat_template_kwargs), data.max_prompt_length)


def prompt_ids(
    tokenizer: Any, text: str, fmt: PromptFormat | None = None, history: Sequence[Mapping[str, str]] = ()
) -> list[int]:
    """`encode_prompt`, warning when a prompt is cut to `data.max_prompt_length`."""
    ids, dropped = encode_prompt(tokenizer, text, fmt, history)
    if dropped:
        warnings.warn(
            f"a prompt of {len(ids) + dropped} tokens is longer than data.max_prompt_length={len(ids)}: its first "
            f"{dropped} tokens are dropped",
            stacklevel=2,
        )
    return ids


def encode_prompt(
    tokenizer: Any, text: str, fmt: PromptFormat | None = None, history: Sequence[Mapping[str, str]] = ()
) -> tuple[list[int], int]:
    """The token ids of `text` as the user's turn after `history` (a conversational prompt's earlier turns), through
    the chat template (`data.system_prompt` opens the conversation unless the history has its own system message),
    and how many leading tokens `data.max_prompt_length` cut off."""
    fmt = fmt or PromptFormat()
    if getattr(tokenizer, "chat_template", None):
        own_system = any(m["role"] == "system" for m in history)
        messages = [{"role": "system", "content": fmt.system_prompt}] if fmt.system_prompt and not own_system else []
        messages += [*history, {"role": "user", "content": text}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, **fmt.template_kwargs)
        ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    elif history:
        raise UserError(
            "conversational prompts (lists of messages) need a tokenizer with a chat template; give the data as text "
            "prompts or use an instruct model"
        )
    else:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if fmt.max_length is not None and len(ids) > fmt.max_length:
        # TRL's rule: the end of the prompt (the question, the assistant turn's opening) matters most
        return ids[-fmt.max_length :], len(ids) - fmt.max_length
    return ids, 0


def check_prompts(
    tokenizer: Any,
    problems: Sequence[Problem],
    fmt: PromptFormat,
    *,
    max_new_tokens: int,
    max_positions: int | None,
    label: str,
) -> None:
    """Checks of the problems' prompts (every turn of a conversation) before any rollout. A prompt that with
    `max_new_tokens` does not fit the model's `max_positions` is refused, naming the problem (sampling it would
    allocate memory quadratic in its length); characters the tokenizer cannot represent (they become its unknown
    token) are warned about, counted."""
    prompts = [(p.id, "\n".join(m["content"] for m in p.conversation())) for p in problems]

    if max_positions is not None and prompts:
        limit = max_positions - max_new_tokens
        if limit < 1:
            raise UserError(
                f"rollout.max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's "
                f"{max_positions} positions; lower it"
            )
        if fmt.max_length is not None:  # longer prompts are cut to max_length (with a warning)
            if fmt.max_length > limit:
                raise UserError(
                    f"data.max_prompt_length={fmt.max_length} plus rollout.max_new_tokens={max_new_tokens} exceeds "
                    f"the model's {max_positions} positions; set data.max_prompt_length <= {limit}"
                )
        else:
            overhead = len(prompt_ids(tokenizer, "", fmt)) + 2
            for pid, text in prompts:
                if len(text.encode()) + overhead <= limit:  # never more tokens than bytes (+ the template's)
                    continue
                # a long text's head already tells (its tokens are at most the whole text's), at a bounded cost
                n = len(prompt_ids(tokenizer, text[: 64 * (limit + 1)], fmt))
                if n > limit:
                    raise UserError(
                        f"problem '{pid}' of {label}: its prompt is over {limit} tokens, and with "
                        f"rollout.max_new_tokens={max_new_tokens} it does not fit the model's {max_positions} "
                        "positions; remove or shorten it, or set data.max_prompt_length (keeps a prompt's last tokens)"
                    )
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None or not prompts:
        return
    chars = set().union(*(set(text) for _, text in prompts))
    unknown = {c for c in chars if unk in tokenizer(c, add_special_tokens=False)["input_ids"]}
    if unknown:
        hit = [pid for pid, text in prompts if not unknown.isdisjoint(text)]
        shown = ", ".join(repr(c) for c in sorted(unknown)[:8]) + (", ..." if len(unknown) > 8 else "")
        warnings.warn(
            f"{len(hit)} of {len(prompts)} prompts of {label} (e.g. problem '{hit[0]}') contain {len(unknown)} "
            f"characters the tokenizer does not know ({shown}); the model sees them as {tokenizer.unk_token}",
            stacklevel=2,
        )
