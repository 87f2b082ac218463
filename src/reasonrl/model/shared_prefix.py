"""The opt-in shared-prefix log-prob pass (`train.forward=shared_prefix`): each distinct prompt runs once and its
completions attend to its keys and values, padding-free, through the model's own layers (`model/layers.py`)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from reasonrl.model.layers import (
    _additive,
    _attention,
    _bare,
    _cache_arg,
    _causal_lm,
    _checkpointing,
    _layer_stack,
    _layerwise_parts,
    _mask,
    _prefill,
    _rolled_rope,
    fast_forward_supported,
    signed_sin,
)


class _SharedPrefix:
    """Cache protocol for teacher forcing: the prompt pass stores each layer's keys and values; the completion pass
    gets its rows' prompt keys and values in front of its own (differentiable: gradients reach the prompt pass)."""

    def __init__(self) -> None:
        self.keys: dict[int, Tensor] = {}
        self.values: dict[int, Tensor] = {}
        self.which: Tensor | None = None  # set between the two passes

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args: Any, **kwargs: Any):
        # Under CPU autocast, rotary embeddings leave keys in float32 beside bfloat16 values; sdpa with an explicit
        # mask needs one dtype. (A no-op without autocast.)
        value_states = value_states.to(key_states.dtype)
        if self.which is None:
            self.keys[layer_idx], self.values[layer_idx] = key_states, value_states
            return key_states, value_states
        keys = torch.cat([self.keys[layer_idx][self.which], key_states], dim=-2)
        values = torch.cat([self.values[layer_idx][self.which], value_states], dim=-2)
        return keys, values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.keys[layer_idx].shape[-2] if layer_idx in self.keys else 0


def shared_prefix_supported(model: Any) -> bool:
    """Whether the shared-prefix pass can run `model` (a data-parallel wrapper is looked through): a Llama / Qwen2 /
    Qwen3 layout (`fast_forward_supported`), without HF activation checkpointing while training (which turns the
    shared cache off)."""
    bare = _bare(model)
    return fast_forward_supported(bare) and not (bare.training and _checkpointing(bare))


def shared_prefix_logits(
    model: Any,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    which: Tensor,
    completions: Tensor,
    lengths: Tensor | None = None,
) -> Tensor:
    """`model.forward.completion_logits` for a model that `shared_prefix_supported` accepts; logits past a row's
    length are zeros.

    Each distinct prompt runs once; its keys and values are shared by its completions, which run behind them (the
    last completion token is only a target and is not run). For Llama / Qwen2 / Qwen3 the prompts' and completions'
    tokens run together, padding-free, through the model's own layers (`_layer_stack`): projections, norms and MLPs
    see only real tokens, in one pass, and only attention works on padded blocks: the prompts', then one per group
    of completion rows of similar length (`attention_buckets`). The logits equal those of the generic pass (every
    prompt + completion as one sequence) up to float rounding: tests/test_update_fast.py pins it per family."""
    N, T = completions.shape
    bare = _bare(model)  # `model` may be a data-parallel wrapper: it runs the passes, the bare model describes them
    W, steps, device = prompt_ids.shape[1], T - 1, completions.device
    causal = torch.ones((steps, steps), dtype=torch.bool, device=device).tril()
    positions = prompt_mask.sum(-1)[which][:, None] + torch.arange(steps, device=device)
    lm = _causal_lm(bare)
    parts = _layerwise_parts(lm)
    if parts is None:  # the same layout through the model's forward: a prompt pass, then the completions (padded)
        cache = _SharedPrefix()
        first = _prefill(model, prompt_ids, prompt_mask, cache)[which][:, None]  # predicts completion token 0
        if T == 1:
            return first
        cache.which = which
        allowed = torch.cat([prompt_mask[which][:, None, :].expand(N, steps, W), causal[None].expand(N, steps, steps)],
                            -1)  # fmt: skip
        out = model(
            input_ids=completions[:, :-1],
            attention_mask=_mask(model, allowed[:, None]),
            position_ids=positions,
            **_cache_arg(model, cache),
            use_cache=True,
        )
        return torch.cat([first, out.logits], dim=1)
    U = prompt_ids.shape[0]
    lengths = torch.full((N,), T, device=device) if lengths is None else lengths.clamp(max=T)
    # One pass over the prompts' and completions' tokens together: projections, norms and MLPs see each real token
    # once, in one row (no padding, and no second pass with its own ~2,000 ops under autograd). Attention works on
    # padded blocks: the prompts' [U, W] block, causal behind left padding, then one block per bucket of completion
    # rows of similar length (`attention_buckets`), each behind its rows' prompt keys and values, so that one long
    # completion does not pad every row's block. `p_index`: each run prompt token's place in the [U, W] block (the
    # real ones, and every last column, which predicts completion token 0); `at_all`: each run completion token's
    # place in the [N, steps] block; `local[b]`: bucket b's tokens in its own [rows, width] block.
    dtype = next(model.parameters()).dtype
    on_cpu = device.type == "cpu"
    run_prompt = prompt_mask.clone()
    run_prompt[:, -1] = True
    p_index = run_prompt.flatten().nonzero().squeeze(1)
    eye = torch.eye(W, dtype=torch.bool, device=device)
    p_allowed = (torch.ones((W, W), dtype=torch.bool, device=device).tril()[None] & prompt_mask[:, None, :]) | eye
    p_mask = _additive(p_allowed[:, None], dtype) if on_cpu else _mask(model, p_allowed[:, None])  # a padding query
    p_positions = (prompt_mask.long().cumsum(-1) - 1).clamp(min=0)  # sees only itself: its output stays finite
    runs = (lengths - 1).clamp(min=0)  # tokens run per row (the last one is only a target)
    buckets = attention_buckets(runs, W)
    local, at, masks, prompt_rows = [], [], [], []
    for rows, width in buckets:
        real = torch.arange(width, device=device)[None] < runs[rows, None]
        local.append(real.flatten().nonzero().squeeze(1))
        at.append((rows[:, None] * steps + torch.arange(width, device=device)).flatten()[local[-1]])
        prompt_rows.append(which[rows])
        causal_b = causal[:width, :width][None].expand(len(rows), width, width)
        allowed = torch.cat([prompt_mask[prompt_rows[-1]][:, None, :].expand(len(rows), width, W), causal_b], -1)
        masks.append(_additive(allowed[:, None], dtype) if on_cpu else _mask(model, allowed[:, None]))
    at_all = torch.cat(at) if at else torch.zeros(0, dtype=torch.long, device=device)
    # On a CPU the blocks go through the model's eager attention (two matmuls and a float32 softmax): at these block
    # sizes the fused sdpa kernel's forward and backward cost 1.7x as much (measured in the performance history,
    # `git show d061be7:docs/benchmarks.md`); same values to float rounding. Elsewhere, the attention the model is
    # configured with.
    function = parts[2] if on_cpu else parts[1]
    ids = torch.cat([prompt_ids.flatten()[p_index], completions[:, :-1].flatten()[at_all]])
    hidden = lm.model.embed_tokens(ids)[None]  # [1, Mp + M, H]: the run tokens in a row
    cos, sin = lm.model.rotary_emb(
        hidden, torch.cat([p_positions.flatten()[p_index], positions.flatten()[at_all]])[None]
    )

    def block(x: Tensor, index: Tensor, rows: int, width: int) -> Tensor:  # [m, ...] -> [rows, width, ...], zeros
        return x.new_zeros((rows * width, *x.shape[1:])).index_copy(0, index, x).unflatten(0, (rows, width))

    def attend(i: int, attn: Any, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        # block by block: its tokens' q, k, v as a padded block [rows, heads, width, d], and back to the tokens
        # (split, not sliced, and the prompts' rows gathered by index_select: their backward passes are one
        # concatenation and an index_add, where slicing and indexing fill and scatter a full-size gradient each)
        v = v.to(k.dtype)  # under CPU autocast, rotary embeddings leave keys in float32 beside bfloat16 values
        sizes = [len(p_index)] + [len(index) for index in local]
        pieces = list(zip(*(x.view(x.shape[1:]).split(sizes) for x in (q, k, v)), strict=True))
        qp, kp, vp = (block(x, p_index, U, W).transpose(1, 2) for x in pieces[0])
        out = _attention(function, attn, qp, kp, vp, p_mask)  # [U, W, heads, d]
        outs = [out.reshape(U * W, -1).index_select(0, p_index)]
        for (rows, width), index, mask, prompts, qkv in zip(
            buckets, local, masks, prompt_rows, pieces[1:], strict=True
        ):
            qb, kb, vb = (block(x, index, len(rows), width).transpose(1, 2) for x in qkv)
            keys = torch.cat([kp.index_select(0, prompts), kb], dim=-2)
            values = torch.cat([vp.index_select(0, prompts), vb], dim=-2)
            out = _attention(function, attn, qb, keys, values, mask)  # [rows, width, heads, d]
            outs.append(out.reshape(len(rows) * width, -1).index_select(0, index))
        return (torch.cat(outs) if len(outs) > 1 else outs[0])[None]

    final = _layer_stack(lm, _rolled_rope, hidden, cos, signed_sin(sin), attend)[0]  # [Mp + M, H]
    last = run_prompt.sum(-1).cumsum(0) - 1  # each prompt's last column among the run prompt tokens
    keep = torch.cat([last, len(p_index) + torch.arange(len(at_all), device=device)])
    logits = lm.lm_head(final.index_select(0, keep))  # [U + M, V]
    first = logits[:U][which][:, None]  # predicts completion token 0
    padded = logits.new_zeros((N * steps, logits.shape[-1])).index_copy(0, at_all, logits[U:]).unflatten(0, (N, steps))
    return torch.cat([first, padded], dim=1)


# Fixed cost of one more attention block, in units of the work a block grows by (one row x one query x one key):
# about the cost of a block's 40-odd extra ops per layer, forward and backward, on a CPU (measured in the
# performance history, `git show d061be7:docs/benchmarks.md`).
BUCKET_OVERHEAD = 20_000.0


def attention_buckets(runs: Tensor, prompt_width: int, max_buckets: int = 4) -> list[tuple[Tensor, int]]:
    """Rows with run lengths `runs` [N] (completion tokens run behind a `prompt_width`-column prompt) grouped for
    padded attention: [(rows, width)], each group padded to its longest row, minimising the blocks' work
    rows x width x (prompt_width + width) plus `BUCKET_OVERHEAD` per block. Rows with nothing to run are left out.
    Dynamic programming over the sorted distinct lengths (a group is a range of them), at most `max_buckets`."""
    runs_cpu = runs.cpu()
    values, counts = torch.unique(runs_cpu[runs_cpu > 0], sorted=True, return_counts=True)
    D = len(values)
    if D == 0:
        return []
    before = torch.cat([torch.zeros(1, dtype=torch.float64), counts.cumsum(0).double()])  # rows below each value
    area = values.double() * (prompt_width + values.double())  # per row, of a block as wide as each value
    starts = torch.arange(D)
    # cost[i, k]: one block for the values i..k (its rows padded to values[k]); inf where i > k
    cost = (before[1:][None] - before[:-1][:, None]) * area[None] + BUCKET_OVERHEAD
    cost = cost.masked_fill(starts[:, None] > starts[None], float("inf"))
    best, cuts = [cost[0]], [torch.zeros(D, dtype=torch.long)]  # per block count: best[k] covers values 0..k
    for _ in range(1, min(max_buckets, D)):
        prev = torch.cat([torch.full((1,), float("inf"), dtype=torch.float64), best[-1][:-1]])  # covers 0..i-1
        total, cut = (prev[:, None] + cost).min(0)  # the last block starts at value `cut`
        best.append(total)
        cuts.append(cut)
    count = int(torch.stack([b[-1] for b in best]).argmin())
    bounds, k = [], D - 1
    for level in range(count, -1, -1):  # walk the cuts back from the last value
        i = int(cuts[level][k])
        bounds.append((int(values[i]), int(values[k])))
        k = i - 1
    return [
        (torch.nonzero((runs_cpu >= lo) & (runs_cpu <= hi)).squeeze(1).to(runs.device), hi)
        for lo, hi in reversed(bounds)
    ]
