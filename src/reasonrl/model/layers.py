"""The hand-written layer pieces of Llama / Qwen2 / Qwen3 causal LMs, shared by the fast engine's decode step and the
opt-in shared-prefix log-prob pass (`train.forward=shared_prefix`). They call the model's own modules and functions
layer by layer, op for op as its forward does; `fast_forward_supported` says when a model is laid out so."""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
from torch import Tensor

# Decoder families whose transformers forward takes a ready 4-D attention mask as it is (boolean for sdpa, additive
# for eager), explicit position ids, and any object with an `update(key, value, layer_idx)` method as its cache.
FAST_FORWARD_MODEL_TYPES = ("llama", "qwen2", "qwen3")


def fast_forward_supported(model: Any) -> bool:
    """True when `model` can run with masks built here and a shared-prompt cache: a Llama / Qwen2 / Qwen3 causal LM
    with sdpa or eager attention and no sliding-window layers, under a transformers whose mask helpers pass 4-D masks
    through (`masking_utils`). Others use the generic paths (same results, slower)."""
    import importlib.util

    config = getattr(model, "config", None)
    if config is None or getattr(config, "model_type", None) not in FAST_FORWARD_MODEL_TYPES:
        return False
    if importlib.util.find_spec("transformers.masking_utils") is None:
        return False
    layer_types = getattr(config, "layer_types", None) or ["full_attention"]
    return getattr(config, "_attn_implementation", None) in ("sdpa", "eager") and set(layer_types) == {"full_attention"}


def _bare(model: Any) -> Any:
    """The model inside a DDP / FSDP wrapper (which has no `config`), else the model itself."""
    return getattr(model, "module", model)


def _checkpointing(model: Any) -> bool:
    """Whether HF activation (gradient) checkpointing is on; the property's name changed in transformers 5."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        value = getattr(model, name, None)  # (a peft wrapper forwards the attribute to its model)
        if value is not None:
            return bool(value)
    return False


def _mask(model: Any, allowed: Tensor) -> Tensor:
    """A ready 4-D attention mask from `allowed` (bool, True = attend): boolean for sdpa, additive for eager."""
    if _bare(model).config._attn_implementation == "eager":
        return _additive(allowed, next(model.parameters()).dtype)
    return allowed


def _additive(allowed: Tensor, dtype: torch.dtype) -> Tensor:
    """0 where `allowed`, the dtype's lowest value elsewhere: the mask that eager attention adds to its scores."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, torch.finfo(dtype).min)


def _cache_arg(model: Any, cache: Any) -> dict[str, Any]:
    """`cache` as the keyword argument `model`'s forward takes it by: `cache` in the transformers releases that
    renamed it (the old name then warns on every call), `past_key_values` before them and in models that kept it."""
    return {_cache_keyword(type(_causal_lm(model))): cache}


@functools.cache
def _cache_keyword(model_class: type) -> str:
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def _prefill(model: Any, ids: Tensor, real: Tensor, cache: Any) -> Tensor:
    """Run the left-padded prompts through `model` into `cache`; the next-token logits at the last column [U, V]."""
    width = ids.shape[1]
    eye = torch.eye(width, dtype=torch.bool, device=ids.device)
    causal = torch.ones((width, width), dtype=torch.bool, device=ids.device).tril()
    allowed = (causal[None] & real[:, None, :]) | eye  # a padding query sees only itself: its output stays finite
    out = model(
        input_ids=ids,
        attention_mask=_mask(model, allowed[:, None]),
        position_ids=(real.long().cumsum(-1) - 1).clamp(min=0),
        **_cache_arg(model, cache),
        use_cache=True,
        logits_to_keep=1,
    )
    return out.logits[:, -1]


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """The rotary embedding x * cos + rotate_half(x) * sin of these families, given `signed_sin(sin)` (broadcast to
    x): exactly the same values, in 4 ops instead of 7, and a backward without the slices' full-size zero gradients."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin


def _rolled_rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, unsqueeze_dim: int = 1) -> tuple[Tensor, Tensor]:
    """These families' `apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim)` given `signed_sin(sin)` (`_rotate`)."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


def signed_sin(sin: Tensor) -> Tensor:
    """sin with its first half negated, so that rotate_half(x) * sin = x.roll(d / 2, -1) * signed_sin(sin), exactly:
    rotate_half(x) = cat(-x[d/2:], x[:d/2]) is the roll with the first half's sign flipped, and a sign flip is
    exact. The rotary embedding x * cos + rotate_half(x) * sin then takes 4 ops instead of 7."""
    h = sin.shape[-1] // 2
    return torch.cat([-sin[..., :h], sin[..., h:]], dim=-1)


def _causal_lm(model: Any) -> Any:
    """The transformers causal LM inside data-parallel and peft wrappers (its modules carry any LoRA layers)."""
    model = _bare(model)
    get_base = getattr(model, "get_base_model", None)  # peft
    return get_base() if callable(get_base) else model


def _attention(function: Any, attn: Any, q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """The model's attention `function` (sdpa or eager) as its attention module `attn` calls it: [B, L, heads, d]."""
    extra = {"sliding_window": attn.sliding_window} if hasattr(attn, "sliding_window") else {}
    dropout = attn.attention_dropout if attn.training else 0.0
    return function(attn, q, k, v, mask, dropout=dropout, scaling=attn.scaling, **extra)[0]


def _layer_stack(lm: Any, rope: Any, hidden: Tensor, cos: Tensor, sin: Tensor, attend: Any) -> Tensor:
    """The decoder layers and final norm of a Llama / Qwen2 / Qwen3 causal LM over `hidden` [B, L, H], written as
    their forward writes them; `attend(i, attention module, q, k, v)` (post-rotary, token-major [B, L, heads, d])
    returns layer i's attention output [B, L, heads * d], so that callers choose the keys, values and masks.
    `rope` is the model's rotary function (`_layerwise_parts`), or `_rolled_rope` with `sin` given as `signed_sin`'s."""
    B, L = hidden.shape[:2]
    for i, layer in enumerate(lm.model.layers):
        attn = layer.self_attn
        x = _rms_norm(layer.input_layernorm, hidden)
        shape = (B, L, -1, attn.head_dim)
        q, k, v = attn.q_proj(x).view(shape), attn.k_proj(x).view(shape), attn.v_proj(x).view(shape)
        if hasattr(attn, "q_norm"):  # Qwen3: RMSNorm of each head's query and key
            q, k = _rms_norm(attn.q_norm, q), _rms_norm(attn.k_norm, k)
        q, k = rope(q, k, cos, sin, unsqueeze_dim=2)  # token-major: contiguous elementwise ops
        hidden = hidden + attn.o_proj(attend(i, attn, q, k, v).contiguous())
        hidden = hidden + layer.mlp(_rms_norm(layer.post_attention_layernorm, hidden))
    return _rms_norm(lm.model.norm, hidden)


RMS_NORMS = ("LlamaRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")  # weight * x / sqrt(mean(x²) + eps), computed in fp32


def _rms_norm(module: Any, x: Tensor) -> Tensor:
    """`module(x)` for transformers' RMSNorm modules of these families, as torch's single `rms_norm` op in float32
    (bit for bit the same values as their six ops there); any other module or dtype runs its own forward."""
    if type(module).__name__ in RMS_NORMS and x.dtype == torch.float32 and module.weight.dtype == torch.float32:
        return torch.nn.functional.rms_norm(x, (x.shape[-1],), module.weight, module.variance_epsilon)
    return module(x)


def _layerwise_parts(model: Any) -> tuple[Any, Any, Any] | None:
    """(rotary function, configured attention function, eager attention function) of a Llama / Qwen2 / Qwen3 causal
    LM laid out as transformers writes them, for `_layer_stack`; None when anything differs (callers then run the
    model's forward)."""
    import sys

    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not layers or not all(hasattr(inner, n) for n in ("embed_tokens", "rotary_emb", "norm")):
        return None
    if not hasattr(model, "lm_head"):
        return None
    for layer in layers:
        attn = getattr(layer, "self_attn", None)
        needed = ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling")
        if attn is None or not all(hasattr(attn, n) for n in needed):
            return None
        if not all(hasattr(layer, n) for n in ("input_layernorm", "post_attention_layernorm", "mlp")):
            return None
    module = sys.modules.get(type(layers[0].self_attn).__module__)
    rope = getattr(module, "apply_rotary_pos_emb", None)
    eager = getattr(module, "eager_attention_forward", None)
    if rope is None or eager is None:
        return None
    try:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    except ImportError:
        return None
    return rope, ALL_ATTENTION_FUNCTIONS.get_interface(model.config._attn_implementation, eager), eager
