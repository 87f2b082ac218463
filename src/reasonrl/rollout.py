"""Rollout: sample G completions per prompt and keep their token ids and behaviour log-probs.

The trainer talks only to `RolloutEngine.generate`, so a vLLM or SGLang engine can replace `HFEngine` without
touching the loop: it must return the same `Completion` records and accept `load_weights` after each update.

Two engines ship (`rollout.engine`):
- `hf`: `transformers.generate`, the reference.
- `fast` (default): a hand-written KV-cached sampling loop over the model's own layers (`FastEngine`). Same
  `Completion` records; it prefills each distinct prompt once and shares its cache between the n samples, writes
  keys and values into preallocated buffers instead of concatenating, builds the attention masks itself, and drops
  finished rows from the batch. It draws its random numbers exactly as `generate` does, so with the same seed it
  samples the same tokens (greedy: token for token); log-probs agree to float rounding (1e-5). On a CPU it splits
  each chunk's rows between worker processes (`rollout.workers`, `workers.py`) and still samples the same tokens.

`completion_logits` is the teacher-forced counterpart the trainer's log-prob and update passes use: each distinct
prompt runs once and its completions attend to its cached keys and values.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from reasonrl.errors import UserError
from reasonrl.workers import Workers, fork_available, one_thread, shared_memory_shortfall


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

    def close(self) -> None:
        """Release what the engine holds beyond the policy (worker processes, servers)."""
        ...


class _PolicyEngine:
    """An engine that samples from the policy module itself (no copy of its weights), `batch_size` sequences at a
    time (0: all at once); subclasses sample one chunk in `_generate_chunk`."""

    def __init__(self, model: Any, tokenizer: Any, batch_size: int = 0) -> None:
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.eos_ids = _eos_ids(model, tokenizer)

    def load_weights(self, model: torch.nn.Module) -> None:  # same module: nothing to copy
        self.model = model

    def close(self) -> None:
        pass

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
    per-call wrappers), on a CPU as one lean function over concatenated weights (`_LeanStack`, about 30 % fewer ops);
    otherwise it calls the model. Rows that emitted EOS are dropped from the batch once they are a quarter of it; the
    loop stops when every row has finished.

    Sampling follows `transformers.generate`: logits / temperature, then top-k (ties at the k-th value kept), then
    top-p (the low tail whose probability is at most 1 - top_p removed, the most likely token always kept), softmax,
    then one draw per row as argmax(p / q) with q ~ Exp(1). That is how `torch.multinomial` draws one sample, and the
    noise is drawn for all rows of the chunk at every step, finished or not, as `generate` does: with the same seed
    the two engines consume the RNG identically and sample the same tokens (up to float-rounding near-ties; on a CPU
    the noise is drawn as `exponential_` draws it, in fewer passes: `_exponential_noise`). Greedy is the argmax of
    the raw logits. The behaviour log-prob of each token is log softmax(logits / temperature), unfiltered, in
    float32, as `HFEngine` records it.

    Models outside `fast_forward_supported` get the same loop over transformers' `DynamicCache` with a 2-D padding
    mask (the model builds its own masks): slower, equally exact.
    """

    DROP_FRACTION = 0.25  # compact the batch once this share of its rows has finished

    def __init__(self, model: Any, tokenizer: Any, batch_size: int = 0, workers: int = 1) -> None:
        super().__init__(model, tokenizer, batch_size)
        self.workers = workers  # processes sampling each chunk on a CPU (`rollout.workers`; 0 = one per torch thread)
        self.pool: Workers | None = None
        # per chunk (and process) of the last `generate` call: its prompts and the batch rows of each decode step
        self.trace: list[tuple[list[list[int]], list[int]]] = []

    def generate(self, prompts: list[list[int]], n: int, sampling: SamplingParams) -> list[Completion]:
        self.trace = []
        return super().generate(prompts, n, sampling)

    def _generate_chunk(self, prompts: list[list[int]], sampling: SamplingParams) -> list[Completion]:
        """With worker processes (`rollout.workers`), the chunk's rows are split between them and this process.
        Each starts from this process's RNG state and draws the noise of the whole chunk at every step (`_sample`),
        so the split samples the same tokens as one process; afterwards this process takes the RNG state of
        whichever share ran the most steps, which is where one process would have left it."""
        pool = self.workers_pool()
        if pool is None:
            return self._sample(prompts, sampling)[0]
        B, k = len(prompts), min(pool.count, len(prompts))
        bounds = [round(i * B / k) for i in range(k + 1)]
        rng = torch.get_rng_state()
        shares = zip(bounds[1:-1], bounds[2:], strict=True)
        wait = pool.start([(_sample_share, (prompts[lo:hi], sampling, B, lo, rng)) for lo, hi in shares])
        try:
            with one_thread():
                out, draws = self._sample(prompts[: bounds[1]], sampling, B, 0)
        finally:  # every reply is read even when this share failed, so that none is left for the next call
            replies = wait()
        for comps, their_draws, state, trace in replies:
            out += comps
            self.trace += trace
            if their_draws > draws:
                draws = their_draws
                torch.set_rng_state(state)
        return out

    def workers_pool(self) -> Workers | None:
        """The worker processes of `workers` > 1 on a CPU model (started on first use), else None."""
        count = self.workers or torch.get_num_threads()  # 0 = auto: one process per torch thread
        if count <= 1 or next(self.model.parameters()).device.type != "cpu" or not fork_available():
            return None
        if self.pool is None or not self.pool.procs or self.pool.model is not self.model or self.pool.count != count:
            self.close()
            missing = shared_memory_shortfall(self.model)
            if missing:
                if self.workers == 0:  # auto: sample in this process alone
                    return None
                raise UserError(f"rollout.workers={self.workers}: {missing}; set rollout.workers=1")
            self.pool = Workers(self.model, count, self)
        return self.pool

    def close(self) -> None:
        """Stop the worker processes (if any); the next `generate` starts them again."""
        if self.pool is not None:
            self.pool.close()
            self.pool = None

    @torch.inference_mode()
    def _sample(
        self, prompts: list[list[int]], sampling: SamplingParams, chunk_rows: int = 0, first_row: int = 0
    ) -> tuple[list[Completion], int]:
        """(completions, noise draws) for `prompts`: rows `first_row`.. of a chunk of `chunk_rows` (0: these rows
        are the whole chunk). Each step draws the noise of the whole chunk and uses its own rows' share, so that a
        chunk split between processes samples what one process would, and each process's RNG advances alike."""
        model = self.model
        device = next(model.parameters()).device
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        eos = torch.tensor(self.eos_ids, dtype=torch.long, device=device)
        greedy = sampling.temperature == 0
        temp = 1.0 if greedy else sampling.temperature
        B, T = len(prompts), sampling.max_new_tokens
        chunk_rows = chunk_rows or B
        prompt_ids, prompt_mask, which = pad_prompts(prompts, pad_id, device)
        decoder = _BufferedDecoder if fast_forward_supported(model) else _CacheDecoder
        draws = 0
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
                    rows = slice(first_row, first_row + B) if len(active) == B else first_row + active
                    noise = _exponential_noise((chunk_rows, probs.shape[-1]), probs.dtype, device, rows)
                    draws += 1
                    nxt = torch.argmax(probs / noise, dim=-1)
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
        return out, draws


def _sample_share(engine: FastEngine, prompts: list[list[int]], sampling: SamplingParams, chunk_rows: int,
                  first_row: int, rng: Tensor) -> tuple[list[Completion], int, Tensor, list]:  # fmt: skip
    """A worker's share of a chunk (`FastEngine._generate_chunk`), from this process's RNG state."""
    torch.set_rng_state(rng)
    engine.trace = []
    comps, draws = engine._sample(prompts, sampling, chunk_rows, first_row)
    return comps, draws, torch.get_rng_state(), engine.trace


def _exponential_noise(
    shape: tuple[int, int], dtype: torch.dtype, device: torch.device, rows: slice | Tensor | None = None
) -> Tensor:
    """Rows `rows` (all by default) of Exp(1) noise of `shape`: the values and RNG use of
    `torch.empty(shape, dtype).exponential_()[rows]`. On a CPU, torch draws each float32 value as -log1p(-u) of one
    double uniform u, rounded to float32, one element at a time; here the same uniforms are drawn in one call and
    only the rows needed are transformed, with vectorised ops: less than half the time. The vectorised log1p can
    differ from the scalar one by one double ulp, which changes the float32 value only when that lies on a rounding
    boundary (none in 2M draws, tests/test_rollout_fast.py)."""
    rows = slice(None) if rows is None else rows
    if device.type != "cpu" or dtype != torch.float32:
        return torch.empty(shape, dtype=dtype, device=device).exponential_()[rows]
    return torch.log1p(torch.empty(shape, dtype=torch.float64).uniform_()[rows].neg_()).neg_().to(dtype)


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
    model: Any,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    which: Tensor,
    completions: Tensor,
    lengths: Tensor | None = None,
) -> Tensor:
    """Teacher-forced logits [N, T, V] predicting each token of `completions` [N, T] (right-padded; `lengths` [N]
    tokens each, default all T) after its prompt (row `which[i]` of the left-padded distinct prompts `prompt_ids`
    [U, W] / `prompt_mask`). Logits past a row's length are zeros (fast path) or padding's (generic path).

    Fast path: each distinct prompt runs once; its keys and values are shared by its completions, which run behind
    them (the last completion token is only a target and is not run). For Llama / Qwen2 / Qwen3 the prompts' and
    completions' tokens run together, padding-free, through the model's own layers (`_layer_stack`): projections,
    norms and MLPs see only real tokens, in one pass, and only attention works on padded blocks: the prompts', then
    one per group of completion rows of similar length (`attention_buckets`). The logits equal those of running
    every prompt + completion as one sequence, up to float rounding. Generic path: exactly that, prompts left-padded
    in front of their completions."""
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
    # sizes the fused sdpa kernel's forward and backward cost 1.7x as much (docs/benchmarks.md); same values to float
    # rounding. Elsewhere, the attention the model is configured with.
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
# about the cost of a block's 40-odd extra ops per layer, forward and backward, on a CPU (docs/benchmarks.md).
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


class _LeanStack:
    """A CPU decode step of a Llama / Qwen2 / Qwen3 causal LM as one function over plain tensors: the query, key and
    value projections concatenated into one matrix and the MLP's gate and up projections into another (once per
    chunk: the weights do not change while it samples), rotary embeddings applied to the queries and keys together
    (`signed_sin`), and one new query per row attending to the cached keys and values as transformers' eager
    attention computes it. The same values as the model's forward (bit for bit on the tiny Qwen2; float rounding at
    most), in 152 ops a step instead of 216 on the 4-layer default: at a small model's decode shapes each op costs
    more than its arithmetic (docs/benchmarks.md, round 5).

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


ENGINES = {"hf": HFEngine, "fast": FastEngine}


def make_engine(name: str, model: Any, tokenizer: Any, batch_size: int = 0, workers: int = 1) -> RolloutEngine:
    """The rollout engine called `name` (`rollout.engine`); `workers` is the fast engine's process count."""
    if name not in ENGINES:
        raise ValueError(f"unknown rollout engine {name!r}; choose one of {', '.join(ENGINES)}")
    if name == "fast":
        return FastEngine(model, tokenizer, batch_size=batch_size, workers=workers)
    return ENGINES[name](model, tokenizer, batch_size=batch_size)


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    ids = model.generation_config.eos_token_id if model.generation_config is not None else None
    ids = ids if isinstance(ids, list) else [ids] if ids is not None else []
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids
