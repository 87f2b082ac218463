"""Rollout: sample G completions per prompt and keep their token ids and behaviour log-probs.

The trainer talks only to `RolloutEngine.generate`, so a vLLM or SGLang engine can replace `HFEngine` without
touching the loop: it must return the same `Completion` records and accept `load_weights` after each update.

Two engines ship (`rollout.engine`):
- `hf`: `transformers.generate`, the reference.
- `fast` (default): a hand-written KV-cached sampling loop over the model's own layers (`FastEngine`). Same
  `Completion` records; it prefills each distinct prompt once and shares its cache between the n samples, writes
  keys and values into preallocated buffers instead of concatenating, builds the attention masks itself, and drops
  finished rows from the batch. It draws its random numbers exactly as `generate` does, so with the same seed it
  samples the same tokens (greedy: token for token); log-probs agree to float rounding (1e-5).

`completion_logits` is the teacher-forced counterpart the trainer's log-prob and update passes use: each distinct
prompt runs once and its completions attend to its cached keys and values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off


@dataclass
class Completion:
    prompt_ids: list[int]
    token_ids: list[int]  # includes the EOS token when the completion stopped by itself
    logprobs: list[float]  # behaviour log-prob of each token: log softmax(logits / temperature), unfiltered
    truncated: bool  # hit max_new_tokens without EOS
    text: str  # decoded, special tokens removed
    # entropy of the behaviour distribution softmax(logits / temperature), unfiltered, at each token; engines that
    # cannot give it leave None (the trainer then computes the entropy metric in a forward pass)
    entropies: list[float] | None = None


class RolloutEngine(Protocol):
    def generate(self, prompts: list[list[int]], n: int, sampling: SamplingParams) -> list[Completion]:
        """n completions per prompt, prompt-major: completions of prompt i are [i*n, (i+1)*n)."""
        ...

    def load_weights(self, model: torch.nn.Module) -> None:
        """Called after every optimiser step; engines holding their own copy of the weights sync here."""
        ...


class _PolicyEngine:
    """An engine that samples from the policy module itself (no copy of its weights), `batch_size` sequences at a
    time (0: all at once); subclasses sample one chunk in `_generate_chunk`."""

    def __init__(self, model: Any, tokenizer: Any, batch_size: int = 0) -> None:
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.eos_ids = _eos_ids(model, tokenizer)

    def load_weights(self, model: torch.nn.Module) -> None:  # same module: nothing to copy
        self.model = model

    def generate(self, prompts: list[list[int]], n: int, sampling: SamplingParams) -> list[Completion]:
        flat = [p for p in prompts for _ in range(n)]
        size = self.batch_size or len(flat)
        out: list[Completion] = []
        for start in range(0, len(flat), size):
            out += self._generate_chunk(flat[start : start + size], sampling)
        return out

    def _generate_chunk(self, prompts: list[list[int]], sampling: SamplingParams) -> list[Completion]:
        raise NotImplementedError


class HFEngine(_PolicyEngine):
    """Batched, left-padded sampling with `transformers.generate` on the policy itself (shares its weights)."""

    @torch.no_grad()
    def _generate_chunk(self, prompts: list[list[int]], sampling: SamplingParams) -> list[Completion]:
        from transformers import GenerationConfig

        device = next(self.model.parameters()).device
        pad_id = self.tokenizer.pad_token_id
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding keeps every prompt's last token at the same column
            input_ids[i, width - len(p) :] = torch.tensor(p)
            attention[i, width - len(p) :] = 1
        greedy = sampling.temperature == 0
        gen_config = GenerationConfig(
            max_new_tokens=sampling.max_new_tokens,
            do_sample=not greedy,
            temperature=None if greedy else sampling.temperature,
            top_p=None if greedy else sampling.top_p,
            top_k=None if greedy else sampling.top_k,
            pad_token_id=pad_id,
            eos_token_id=self.eos_ids,
            return_dict_in_generate=True,
            output_logits=True,
        )
        was_training = self.model.training
        self.model.eval()
        res = self.model.generate(
            input_ids=input_ids.to(device), attention_mask=attention.to(device), generation_config=gen_config
        )
        self.model.train(was_training)
        tokens = res.sequences[:, width:].cpu()
        logits = torch.stack(res.logits, dim=1).float()  # [B, T, V], raw (before temperature / filtering)
        logits = logits / (1.0 if greedy else sampling.temperature)
        logp_all = torch.log_softmax(logits, dim=-1)
        logprobs = logp_all.gather(-1, tokens.to(logits.device).unsqueeze(-1)).squeeze(-1).cpu()
        entropies = -(logp_all.exp() * logp_all).sum(-1).cpu()
        is_eos = torch.isin(tokens, torch.tensor(self.eos_ids))
        completions = []
        for i, p in enumerate(prompts):
            eos_at = torch.nonzero(is_eos[i])
            length = int(eos_at[0]) + 1 if len(eos_at) else tokens.shape[1]
            ids = tokens[i, :length].tolist()
            completions.append(
                Completion(
                    prompt_ids=p,
                    token_ids=ids,
                    logprobs=logprobs[i, :length].tolist(),
                    truncated=not len(eos_at),
                    text=self.tokenizer.decode(ids, skip_special_tokens=True),
                    entropies=entropies[i, :length].tolist(),
                )
            )
        return completions


class FastEngine(_PolicyEngine):
    """KV-cached batched sampling with a hand-written loop over the policy's own forward (shares its weights).

    Per chunk of `batch_size` sequences (cut exactly as `HFEngine` cuts them): the distinct prompts are left-padded
    and prefilled once; their keys and values are copied to each of their samples in preallocated buffers of
    `prompt width + max_new_tokens` columns; each decode step runs one token per row with a mask built here, so
    transformers builds no mask and concatenates no cache. For Llama / Qwen2 / Qwen3 the step calls the model's own
    modules and functions layer by layer (`_decode_layerwise`: the same ops as its forward, without transformers'
    per-call wrappers); otherwise it calls the model. Rows that emitted EOS are dropped from the batch once they are
    a quarter of it; the loop stops when every row has finished.

    Sampling follows `transformers.generate`: logits / temperature, then top-k (ties at the k-th value kept), then
    top-p (the low tail whose probability is at most 1 - top_p removed, the most likely token always kept), softmax,
    then one draw per row as argmax(p / q) with q ~ Exp(1). That is how `torch.multinomial` draws one sample, and the
    noise is drawn for all rows of the chunk at every step, finished or not, as `generate` does: with the same seed
    the two engines consume the RNG identically and sample the same tokens (up to float-rounding near-ties). Greedy is
    the argmax of the raw logits. The behaviour log-prob of each token is log softmax(logits / temperature),
    unfiltered, in float32, as `HFEngine` records it.

    Models outside `fast_forward_supported` get the same loop over transformers' `DynamicCache` with a 2-D padding
    mask (the model builds its own masks): slower, equally exact.
    """

    DROP_FRACTION = 0.25  # compact the batch once this share of its rows has finished

    def __init__(self, model: Any, tokenizer: Any, batch_size: int = 0) -> None:
        super().__init__(model, tokenizer, batch_size)
        # per chunk of the last `generate` call: its prompts and the batch rows of each decode step (for profiling)
        self.trace: list[tuple[list[list[int]], list[int]]] = []

    def generate(self, prompts: list[list[int]], n: int, sampling: SamplingParams) -> list[Completion]:
        self.trace = []
        return super().generate(prompts, n, sampling)

    @torch.inference_mode()
    def _generate_chunk(self, prompts: list[list[int]], sampling: SamplingParams) -> list[Completion]:
        model = self.model
        device = next(model.parameters()).device
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        eos = torch.tensor(self.eos_ids, dtype=torch.long, device=device)
        greedy = sampling.temperature == 0
        temp = 1.0 if greedy else sampling.temperature
        B, T = len(prompts), sampling.max_new_tokens
        prompt_ids, prompt_mask, which = pad_prompts(prompts, pad_id, device)
        decoder = _BufferedDecoder if fast_forward_supported(model) else _CacheDecoder
        was_training = model.training
        model.eval()
        try:
            step = decoder(model, prompt_ids, prompt_mask, which, T)
            logits = step.prefill()  # [B, V]: next-token logits at each prompt's last token
            tokens = torch.full((B, T), pad_id, dtype=torch.long, device=device)
            logprobs = torch.zeros((B, T), dtype=torch.float32, device=device)
            entropies = torch.zeros((B, T), dtype=torch.float32, device=device)
            kept = torch.full((B,), T, dtype=torch.long, device=device)  # tokens kept per row (through its EOS)
            stopped = torch.zeros(B, dtype=torch.bool, device=device)  # per sequence: emitted EOS
            active = torch.arange(B, device=device)  # the sequence in each batch row
            finished = torch.zeros(B, dtype=torch.bool, device=device)  # per batch row
            positions = prompt_mask.sum(-1)[which]  # position id of the next token of each batch row
            done = 0  # finished rows still in the batch
            rows_per_step: list[int] = []
            self.trace.append((prompts, rows_per_step))
            for t in range(T):
                scores = logits.float() if temp == 1.0 else logits.float() / temp
                if greedy:
                    nxt = torch.argmax(scores, dim=-1)
                else:
                    probs = torch.softmax(_filter(scores, sampling.top_k, sampling.top_p), dim=-1)
                    noise = torch.empty((B, probs.shape[-1]), dtype=probs.dtype, device=device).exponential_()
                    nxt = torch.argmax(probs / noise[active], dim=-1)
                logp_all = torch.log_softmax(scores, dim=-1)
                logp = logp_all.gather(-1, nxt[:, None]).squeeze(1)
                entropy = -(logp_all.exp() * logp_all).sum(-1)
                hit = nxt == eos[0] if len(eos) == 1 else torch.isin(nxt, eos)
                if done:  # write only the rows still running
                    live = ~finished
                    hit &= live
                    rows, nxt_w, logp, entropy = active[live], nxt[live], logp[live], entropy[live]
                    tokens[rows, t], logprobs[rows, t], entropies[rows, t] = nxt_w, logp, entropy
                elif len(active) == B:  # no row dropped yet: the batch rows are the sequences
                    tokens[:, t], logprobs[:, t], entropies[:, t] = nxt, logp, entropy
                else:
                    tokens[active, t], logprobs[active, t], entropies[active, t] = nxt, logp, entropy
                if bool(hit.any()):
                    kept[active[hit]] = t + 1
                    stopped[active[hit]] = True
                    finished |= hit
                    done = int(finished.sum())
                    if done == len(active):
                        break
                if t == T - 1:
                    break
                keep = None
                if done and done >= self.DROP_FRACTION * len(active):
                    keep = torch.nonzero(~finished).squeeze(1)
                    active, nxt, positions, finished = active[keep], nxt[keep], positions[keep], finished[keep]
                    done = 0
                rows_per_step.append(len(active))
                logits = step.decode(nxt, positions, keep)
                positions = positions + 1
        finally:
            model.train(was_training)

        tokens_l, logprobs_l, entropies_l = tokens.cpu().tolist(), logprobs.cpu().tolist(), entropies.cpu().tolist()
        kept_l, stopped_l = kept.tolist(), stopped.tolist()
        out = []
        for i, p in enumerate(prompts):
            ids = tokens_l[i][: kept_l[i]]
            out.append(
                Completion(
                    prompt_ids=p,
                    token_ids=ids,
                    logprobs=logprobs_l[i][: kept_l[i]],
                    truncated=not stopped_l[i],
                    text=self.tokenizer.decode(ids, skip_special_tokens=True),
                    entropies=entropies_l[i][: kept_l[i]],
                )
            )
        return out


def _filter(scores: Tensor, top_k: int, top_p: float) -> Tensor:
    """Top-k, then top-p, with `transformers.generate`'s semantics; removed tokens get -inf."""
    if 0 < top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        ascending, order = torch.sort(scores, dim=-1)
        drop = ascending.softmax(-1).cumsum(-1) <= 1 - top_p  # the low tail whose mass is at most 1 - top_p
        drop[:, -1] = False
        scores = scores.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return scores


# --------------------------------------------------------------------------------------------------------------
# Forward passes that share each prompt between its samples (the fast engine, and the trainer's log-prob passes)

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
        dtype = next(model.parameters()).dtype
        additive = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
        return additive.masked_fill(~allowed, torch.finfo(dtype).min)
    return allowed


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
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    return out.logits[:, -1]


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


def completion_logits(
    model: Any, prompt_ids: Tensor, prompt_mask: Tensor, which: Tensor, completions: Tensor
) -> Tensor:
    """Teacher-forced logits [N, T, V] predicting each token of `completions` [N, T] (right-padded) after its prompt
    (row `which[i]` of the left-padded distinct prompts `prompt_ids` [U, W] / `prompt_mask`).

    Fast path: each distinct prompt runs once; its keys and values are shared by its completions, which run as one
    right-padded block behind them (the last completion token is only a target and is not run). The logits equal
    those of running every prompt + completion as one sequence, up to float rounding. Generic path: exactly that,
    prompts left-padded in front of their completions."""
    N, T = completions.shape
    bare = _bare(model)  # `model` may be a data-parallel wrapper: it runs the passes, the bare model describes them
    # (HF gradient checkpointing turns the shared-prefix cache off while training: then run whole sequences)
    if not fast_forward_supported(bare) or (bare.training and _checkpointing(bare)):
        ids = torch.cat([prompt_ids[which], completions], dim=1)
        attention = torch.cat([prompt_mask[which], torch.ones_like(completions, dtype=torch.bool)], dim=1).long()
        out = model(
            input_ids=ids,
            attention_mask=attention,
            position_ids=(attention.cumsum(-1) - 1).clamp(min=0),
            logits_to_keep=T + 1,
        )
        return out.logits[:, :-1]
    cache = _SharedPrefix()
    first = _prefill(model, prompt_ids, prompt_mask, cache)[which][:, None]  # predicts completion token 0
    if T == 1:
        return first
    cache.which = which
    W, steps = prompt_ids.shape[1], T - 1
    causal = torch.ones((steps, steps), dtype=torch.bool, device=completions.device).tril()
    allowed = torch.cat([prompt_mask[which][:, None, :].expand(N, steps, W), causal[None].expand(N, steps, steps)], -1)
    positions = prompt_mask.sum(-1)[which][:, None] + torch.arange(steps, device=completions.device)
    out = model(
        input_ids=completions[:, :-1],
        attention_mask=_mask(model, allowed[:, None]),
        position_ids=positions,
        past_key_values=cache,
        use_cache=True,
    )
    return torch.cat([first, out.logits], dim=1)


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
        self.layerwise = _layerwise_parts(model)

    def prefill(self) -> Tensor:
        logits = _prefill(self.model, self.ids, self.real, self.cache)
        width = self.ids.shape[1]
        self.cache.expand(self.which, self.capacity)
        self.cache.length = width
        self.allowed = torch.ones((len(self.which), self.capacity), dtype=torch.bool, device=self.ids.device)
        self.allowed[:, :width] = self.real[self.which]
        return logits[self.which]

    def decode(self, tokens: Tensor, positions: Tensor, keep: Tensor | None) -> Tensor:
        c = self.cache
        if keep is not None:
            c.select(keep)
            self.allowed = self.allowed[keep]
        mask = _mask(self.model, self.allowed[:, None, None, : c.length + 1])
        if self.layerwise is not None:
            logits = self._decode_layerwise(tokens[:, None], positions[:, None], mask)
        else:
            out = self.model(
                input_ids=tokens[:, None],
                attention_mask=mask,
                position_ids=positions[:, None],
                past_key_values=c,
                use_cache=True,
            )
            logits = out.logits[:, -1]
        c.length += 1
        return logits

    def _decode_layerwise(self, input_ids: Tensor, position_ids: Tensor, mask: Tensor) -> Tensor:
        """One decode step through the model's own modules and functions, layer by layer: what its forward computes,
        op for op, without transformers' per-call wrappers (argument merging, output records, mask dispatch)."""
        model, (rope, attention) = self.model, self.layerwise
        inner = model.model
        hidden = inner.embed_tokens(input_ids)
        cos, sin = inner.rotary_emb(hidden, position_ids)
        rows = input_ids.shape[0]
        for i, layer in enumerate(inner.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(hidden)
            shape = (rows, 1, -1, attn.head_dim)
            q, k, v = attn.q_proj(x).view(shape), attn.k_proj(x).view(shape), attn.v_proj(x).view(shape)
            if hasattr(attn, "q_norm"):  # Qwen3: RMSNorm of each head's query and key
                q, k = attn.q_norm(q), attn.k_norm(k)
            q, k = rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
            k, v = self.cache.update(k, v.transpose(1, 2), i)
            extra = {"sliding_window": attn.sliding_window} if hasattr(attn, "sliding_window") else {}
            out, _ = attention(attn, q, k, v, mask, dropout=0.0, scaling=attn.scaling, **extra)
            hidden = hidden + attn.o_proj(out.reshape(rows, 1, -1).contiguous())
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        return model.lm_head(inner.norm(hidden))[:, -1]


def _layerwise_parts(model: Any) -> tuple[Any, Any] | None:
    """(rotary function, attention function) of a Llama / Qwen2 / Qwen3 model laid out as transformers writes them,
    for `_BufferedDecoder._decode_layerwise`; None when anything differs (the decoder then calls the model)."""
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
    return rope, ALL_ATTENTION_FUNCTIONS.get_interface(model.config._attn_implementation, eager)


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
            past_key_values=self.cache,
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
            past_key_values=self.cache,
            use_cache=True,
        )
        return out.logits[:, -1]


ENGINES = {"hf": HFEngine, "fast": FastEngine}


def make_engine(name: str, model: Any, tokenizer: Any, batch_size: int = 0) -> RolloutEngine:
    """The rollout engine called `name` (`rollout.engine`)."""
    if name not in ENGINES:
        raise ValueError(f"unknown rollout engine {name!r}; choose one of {', '.join(ENGINES)}")
    return ENGINES[name](model, tokenizer, batch_size=batch_size)


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    ids = model.generation_config.eos_token_id if model.generation_config is not None else None
    ids = ids if isinstance(ids, list) else [ids] if ids is not None else []
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids
