"""Teacher-forced passes through the model's own `forward`: the default gradient path."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def pad_prompts(prompts: list[list[int]], pad_id: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """(ids [U, W], real [U, W] bool, which [N]): the distinct prompts left-padded, and the row of each prompt."""
    unique: dict[tuple[int, ...], int] = {}
    which = [unique.setdefault(tuple(p), len(unique)) for p in prompts]
    width = max(len(p) for p in unique)
    ids = torch.full((len(unique), width), pad_id, dtype=torch.long)
    real = torch.zeros((len(unique), width), dtype=torch.bool)
    for i, p in enumerate(unique):
        if p:
            ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            real[i, width - len(p) :] = True
    return ids.to(device), real.to(device), torch.tensor(which, dtype=torch.long, device=device)


FORWARDS = ("auto", "generic", "shared_prefix")


def resolve_forward(name: str, model: Any) -> str:
    """`train.forward` for this model: `generic` (the model's own `forward`) or `shared_prefix`. `auto` takes the
    shared-prefix pass only on a CPU and for the families whose equivalence with the generic pass is tested
    (Llama / Qwen2 / Qwen3, `tests/test_update_fast.py`); everywhere else the generic one."""
    from reasonrl.model.shared_prefix import shared_prefix_supported

    if name not in FORWARDS:
        raise ValueError(f"train.forward must be one of {', '.join(FORWARDS)}, got {name!r}")
    if name == "auto":
        on_cpu = next(model.parameters()).device.type == "cpu"
        return "shared_prefix" if on_cpu and shared_prefix_supported(model) else "generic"
    return name


def completion_logits(
    model: Any,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    which: Tensor,
    completions: Tensor,
    lengths: Tensor | None = None,
    *,
    forward: str = "generic",
) -> Tensor:
    """Teacher-forced logits [N, T, V] predicting each token of `completions` [N, T] (right-padded; `lengths` [N]
    tokens each, default all T) after its prompt (row `which[i]` of the left-padded distinct prompts `prompt_ids`
    [U, W] / `prompt_mask`).

    `forward="generic"`: every prompt + completion as one left-padded sequence through `model(...)` (its DDP / FSDP
    wrapper's hooks included). `"shared_prefix"`: the hand-written pass of `model/shared_prefix.py` where the model
    allows it (else the generic one); logits past a row's length are then zeros, not padding's."""
    if forward == "shared_prefix":
        from reasonrl.model.shared_prefix import shared_prefix_logits, shared_prefix_supported

        if shared_prefix_supported(model):
            return shared_prefix_logits(model, prompt_ids, prompt_mask, which, completions, lengths)
    T = completions.shape[1]
    ids = torch.cat([prompt_ids[which], completions], dim=1)
    attention = torch.cat([prompt_mask[which], torch.ones_like(completions, dtype=torch.bool)], dim=1).long()
    out = model(
        input_ids=ids,
        attention_mask=attention,
        position_ids=(attention.cumsum(-1) - 1).clamp(min=0),
        logits_to_keep=T + 1,
        use_cache=False,  # a loss pass reads no cache; a recomputed (checkpointed) layer would append to it again
    )
    return out.logits[:, :-1]
