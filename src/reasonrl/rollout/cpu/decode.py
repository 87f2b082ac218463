"""The fast engine's decode steps: KV buffers preallocated per chunk, and one step per token through the model's own
layers (`_BufferedDecoder`, Llama / Qwen families) or through its forward with transformers' cache (`_CacheDecoder`)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from reasonrl.model.layers import (
    RMS_NORMS,
    _additive,
    _attention,
    _cache_arg,
    _causal_lm,
    _layer_stack,
    _layerwise_parts,
    _mask,
    _prefill,
    _rotate,
    signed_sin,
)


class _KVBuffers:
    """Cache protocol over preallocated buffers: the prompt pass stores its keys and values as they are; once
    `expand` has copied them to every sample's buffer, each step writes its column at `length` and gets views of the
    filled columns back (no concatenation)."""

    def __init__(self) -> None:
        self.keys: dict[int, Tensor] = {}
        self.values: dict[int, Tensor] = {}
        self.length = 0  # columns filled before the current forward; 0 during the prompt pass

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args: Any, **kwargs: Any):
        if self.length == 0:
            self.keys[layer_idx], self.values[layer_idx] = key_states, value_states
            return key_states, value_states
        end = self.length + key_states.shape[-2]
        k, v = self.keys[layer_idx], self.values[layer_idx]
        k[:, :, self.length : end] = key_states
        v[:, :, self.length : end] = value_states
        return k[:, :, :end], v[:, :, :end]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def expand(self, rows: Tensor, capacity: int) -> None:
        """Give each sample (`rows`: its prompt) a buffer of `capacity` columns holding its prompt's keys, values."""
        for store in (self.keys, self.values):
            for layer, x in store.items():
                buf = x.new_empty((len(rows), x.shape[1], capacity, x.shape[3]))
                buf[:, :, : x.shape[2]] = x[rows]
                store[layer] = buf

    def select(self, keep: Tensor) -> None:
        """Keep only the batch rows `keep` (copying just the filled columns)."""
        for store in (self.keys, self.values):
            for layer, x in store.items():
                buf = x.new_empty((len(keep), *x.shape[1:]))
                buf[:, :, : self.length] = x[keep, :, : self.length]
                store[layer] = buf


class _BufferedDecoder:
    def __init__(self, model: Any, ids: Tensor, real: Tensor, which: Tensor, max_new_tokens: int) -> None:
        self.model, self.ids, self.real, self.which = model, ids, real, which
        self.capacity = ids.shape[1] + max_new_tokens
        self.cache = _KVBuffers()
        self.lm = _causal_lm(model)
        self.layerwise = _layerwise_parts(self.lm)
        self.rotary: tuple[Tensor, Tensor] | None = None  # cos, sin [capacity, d] of every position (`rotary_at`)
        # on a CPU, the decode step's projections concatenated once per chunk (`_LeanStack`), where the layers allow
        self.lean = _LeanStack.build(self.lm) if self.layerwise is not None and ids.device.type == "cpu" else None

    def prefill(self) -> Tensor:
        logits = _prefill(self.model, self.ids, self.real, self.cache)
        width = self.ids.shape[1]
        self.cache.expand(self.which, self.capacity)
        self.cache.length = width
        allowed = torch.ones((len(self.which), self.capacity), dtype=torch.bool, device=self.ids.device)
        allowed[:, :width] = self.real[self.which]
        # the mask of every column, kept with the rows (decode tokens: all allowed); the lean step reads it additive
        self.mask = allowed if self.lean is None else _additive(allowed, next(self.model.parameters()).dtype)
        return logits[self.which]

    def select(self, keep: Tensor) -> None:
        """Keep only the batch rows `keep`: their cache and mask."""
        self.cache.select(keep)
        self.mask = self.mask[keep]

    def rotary_at(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """cos, sin [B, 1, d] at each row's position, looked up in a table of every position computed once per
        chunk by the model's own rotary module; for the lean step the sine is `signed_sin`'s."""
        if self.rotary is None:
            probe = torch.zeros((1, 1, self.lm.config.hidden_size), dtype=next(self.lm.parameters()).dtype,
                                device=positions.device)  # fmt: skip
            cos, sin = self.lm.model.rotary_emb(probe, torch.arange(self.capacity, device=positions.device)[None])
            self.rotary = cos[0], signed_sin(sin[0]) if self.lean is not None else sin[0]
        return self.rotary[0][positions][:, None], self.rotary[1][positions][:, None]

    def decode(self, tokens: Tensor, positions: Tensor, keep: Tensor | None) -> Tensor:
        c = self.cache
        if keep is not None:
            self.select(keep)
        if self.lean is not None:
            cos, sin = self.rotary_at(positions)
            logits = self.lean.step(tokens, cos, sin, self.mask[:, None, None, : c.length + 1], c)
            c.length += 1
            return logits
        allowed = self.mask[:, None, None, : c.length + 1]
        if self.layerwise is not None:
            logits = self._decode_layerwise(tokens[:, None], positions, allowed)
        else:
            out = self.model(
                input_ids=tokens[:, None],
                attention_mask=_mask(self.model, allowed),
                position_ids=positions[:, None],
                **_cache_arg(self.model, c),
                use_cache=True,
            )
            logits = out.logits[:, -1]
        c.length += 1
        return logits

    def _decode_layerwise(self, input_ids: Tensor, positions: Tensor, allowed: Tensor) -> Tensor:
        """One decode step through the model's own modules and functions, layer by layer (`_layer_stack`): what its
        forward computes, op for op, without transformers' per-call wrappers. The rotary cosines and sines of every
        position are computed once per chunk (by the model's own rotary module) and looked up. On a CPU the one new
        query per row attends through `_decode_attention`; elsewhere through the model's attention function."""
        lm, (rope, attention, _) = self.lm, self.layerwise
        hidden = lm.model.embed_tokens(input_ids)
        cos, sin = self.rotary_at(positions)
        on_cpu = input_ids.device.type == "cpu"
        mask = _additive(allowed, hidden.dtype) if on_cpu else _mask(self.model, allowed)

        def attend(i: int, attn: Any, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            q = q.transpose(1, 2)
            k, v = self.cache.update(k.transpose(1, 2), v.transpose(1, 2), i)
            if on_cpu:
                return _decode_attention(q, k, v, mask, attn.scaling)
            return _attention(attention, attn, q, k, v, mask).reshape(len(input_ids), 1, -1)

        return lm.lm_head(_layer_stack(lm, rope, hidden, cos, sin, attend))[:, -1]


def _decode_attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, scaling: float) -> Tensor:
    """Attention of one new query per row, q [B, heads, 1, d] (or [B, heads, d]), over the cached k, v [B, kv heads,
    L, d] with an additive mask `bias` [B, 1, 1, L]: [B, 1, heads * d]. Computed as transformers' eager attention
    computes it (scores, float32 softmax, weighted values), with each key / value head's query heads grouped instead
    of its cache repeated. On a CPU this beats the fused sdpa kernel, whose overhead per row and head outweighs a
    single query's work; it agrees with it to float rounding."""
    B, kv_heads = k.shape[:2]
    scores = torch.matmul(q.reshape(B, kv_heads, -1, q.shape[-1]), k.transpose(-1, -2)) * scaling + bias
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(weights, v).reshape(B, 1, -1)


class _LeanStack:
    """A CPU decode step of a Llama / Qwen2 / Qwen3 causal LM as one function over plain tensors: the query, key and
    value projections concatenated into one matrix and the MLP's gate and up projections into another (once per
    chunk: the weights do not change while it samples), rotary embeddings applied to the queries and keys together
    (`signed_sin`), and one new query per row attending to the cached keys and values as transformers' eager
    attention computes it. The same values as the model's forward (bit for bit on the tiny Qwen2; float rounding at
    most), in 152 ops a step instead of 216 on the 4-layer default: at a small model's decode shapes each op costs
    more than its arithmetic (`git show d061be7:docs/benchmarks.md`, round 5).

    `build` gives None unless every projection is a plain `nn.Linear` (no LoRA or quantised layers), the norms are
    these families' RMSNorm in float32, and the MLP is their gated one (gate, up, down, act_fn); the decoder then
    runs `_layer_stack`. Weights are transposed once and norms called as torch's op, without the modules' calls:
    F.linear's own kernels, and `_rms_norm`'s."""

    def __init__(self, lm: Any, layers: list[dict[str, Any]], final_norm: tuple[Tensor, float]) -> None:
        self.lm, self.layers, self.final_norm = lm, layers, final_norm

    @classmethod
    def build(cls, lm: Any) -> _LeanStack | None:
        def cat(xs: list[Tensor]) -> Tensor:
            return torch.cat(xs).detach()

        def norm(module: Any) -> tuple[Tensor, float] | None:  # (weight, eps) of an RMSNorm `_rms_norm` runs as one op
            ok = type(module).__name__ in RMS_NORMS and module.weight.dtype == torch.float32
            return (module.weight.detach(), module.variance_epsilon) if ok else None

        final_norm = norm(lm.model.norm)
        if final_norm is None:
            return None
        layers = []
        for layer in lm.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            projections = [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj]
            projections += [getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
            norms = [norm(layer.input_layernorm), norm(layer.post_attention_layernorm)]
            norms += [norm(attn.q_norm), norm(attn.k_norm)] if hasattr(attn, "q_norm") else []
            if not all(type(m) is torch.nn.Linear for m in projections) or not hasattr(mlp, "act_fn"):
                return None
            if any(n is None for n in norms):
                return None
            q, k, v, o, gate, up, down = projections
            biases = [q.bias, k.bias, v.bias]
            if any(b is not None for b in biases) and not all(b is not None for b in biases):
                return None  # some projections with a bias, some without
            act = mlp.act_fn  # SiLU as the function (a module call costs more than the op at these shapes)
            silu = isinstance(act, torch.nn.SiLU) or type(act).__name__ == "SiLUActivation"
            layers.append(
                {
                    # weights transposed once (views), as F.linear would at every call: the same matmul kernels
                    "qkv": cat([q.weight, k.weight, v.weight]).t(),
                    "qkv_bias": cat(biases) if biases[0] is not None else None,
                    "o": o.weight.detach().t(),
                    "o_bias": o.bias.detach() if o.bias is not None else None,
                    "gate_up": cat([gate.weight, up.weight]).t(),
                    "gate_up_bias": cat([gate.bias, up.bias]) if gate.bias is not None else None,
                    "down": down.weight.detach().t(),
                    "down_bias": down.bias.detach() if down.bias is not None else None,
                    "act": torch.nn.functional.silu if silu else act,
                    "norms": norms,  # input, post-attention, (Qwen3) query and key
                    "split": (q.out_features, k.out_features),
                    "head_dim": attn.head_dim,
                    "scaling": attn.scaling,
                }
            )
        return cls(lm, layers, final_norm)

    def run(self, x: Tensor, cos: Tensor, sin: Tensor, attend: Any) -> Tensor:
        """The decoder layers and final norm over token rows `x` [M, H] at rotary `cos`, `signed_sin(sin)`
        [M, 1, d]; `attend(i, scaling, q, k, v)` (post-rotary, [M, heads, d]) gives layer i's attention output
        [M, q heads * d], so that callers choose the keys, values and masks."""
        F, M = torch.nn.functional, len(x)
        for i, w in enumerate(self.layers):
            d, (nq, nk), norms = w["head_dim"], w["split"], w["norms"]
            qkv = _linear(F.rms_norm(x, (x.shape[-1],), *norms[0]), w["qkv"], w["qkv_bias"])
            if len(norms) > 2:  # Qwen3: RMSNorm of each head's query and key, before the rotation
                q = F.rms_norm(qkv[:, :nq].view(M, -1, d), (d,), *norms[2])
                qk = torch.cat([q, F.rms_norm(qkv[:, nq : nq + nk].view(M, -1, d), (d,), *norms[3])], dim=1)
            else:
                qk = qkv[:, : nq + nk].view(M, -1, d)
            qk = _rotate(qk, cos, sin)  # [M, q heads + kv heads, d]
            out = attend(i, w["scaling"], qk[:, : nq // d], qk[:, nq // d :], qkv[:, nq + nk :].view(M, -1, d))
            x = x + _linear(out, w["o"], w["o_bias"])
            h = _linear(F.rms_norm(x, (x.shape[-1],), *norms[1]), w["gate_up"], w["gate_up_bias"])
            gate, up = h.chunk(2, dim=-1)
            x = x + _linear(w["act"](gate) * up, w["down"], w["down_bias"])
        return F.rms_norm(x, (x.shape[-1],), *self.final_norm)

    def step(self, tokens: Tensor, cos: Tensor, sin: Tensor, bias: Tensor, cache: _KVBuffers) -> Tensor:
        """Next-token logits [B, V] after `tokens` [B] at rotary `cos`, `signed_sin(sin)` [B, 1, d], writing each
        layer's key and value at column `cache.length` and attending over columns 0 .. length with additive mask
        `bias` [B, 1, 1, length + 1], as transformers' eager attention does."""
        at = cache.length

        def attend(i: int, scaling: float, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            keys, values = cache.keys[i], cache.values[i]  # [B, kv heads, capacity, d]
            keys[:, :, at], values[:, :, at] = k, v
            return _decode_attention(q, keys[:, :, : at + 1], values[:, :, : at + 1], bias, scaling)[:, 0]

        return self.lm.lm_head(self.run(self.lm.model.embed_tokens(tokens), cos, sin, attend))


def _linear(x: Tensor, weight_t: Tensor, bias: Tensor | None) -> Tensor:
    """F.linear(x, weight, bias) for 2-D x given weight.t(): the kernel F.linear calls (addmm, or mm)."""
    return torch.addmm(bias, x, weight_t) if bias is not None else torch.mm(x, weight_t)


class _CacheDecoder:
    """The generic loop: transformers' `DynamicCache` and a 2-D padding mask; the model builds its own masks."""

    def __init__(self, model: Any, ids: Tensor, real: Tensor, which: Tensor, max_new_tokens: int) -> None:
        self.model, self.ids, self.real, self.which = model, ids, real, which

    def prefill(self) -> Tensor:
        from transformers import DynamicCache

        self.attention = self.real[self.which].long()
        self.cache = DynamicCache(config=self.model.config)
        out = self.model(
            input_ids=self.ids[self.which],
            attention_mask=self.attention,
            position_ids=(self.attention.cumsum(-1) - 1).clamp(min=0),
            **_cache_arg(self.model, self.cache),
            use_cache=True,
            logits_to_keep=1,
        )
        return out.logits[:, -1]

    def decode(self, tokens: Tensor, positions: Tensor, keep: Tensor | None) -> Tensor:
        if keep is not None:
            self.cache.batch_select_indices(keep)
            self.attention = self.attention[keep]
        self.attention = torch.cat([self.attention, self.attention.new_ones((len(tokens), 1))], dim=-1)
        out = self.model(
            input_ids=tokens[:, None],
            attention_mask=self.attention,
            position_ids=positions[:, None],
            **_cache_arg(self.model, self.cache),
            use_cache=True,
        )
        return out.logits[:, -1]
