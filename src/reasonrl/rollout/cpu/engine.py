"""`rollout.engine=fast`: a hand-written KV-cached sampling loop over the policy's own layers (`FastEngine`).

Same `Completion` records as `hf`; it prefills each distinct prompt once and shares its cache between the n
samples, writes keys and values into preallocated buffers instead of concatenating, builds the attention masks
itself, and drops finished rows from the batch (`decode.py`). It draws its random numbers exactly as `generate` does,
so with the same seed it samples the same tokens (greedy: token for token); log-probs agree to float rounding (1e-5).
On a CPU it splits each chunk's rows between forked worker processes (`rollout.workers`, `workers.py`) and still
samples the same tokens.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from reasonrl.errors import UserError
from reasonrl.model.forward import pad_prompts
from reasonrl.model.layers import fast_forward_supported
from reasonrl.rollout.base import Completion, SamplingParams, _PolicyEngine, register_engine
from reasonrl.rollout.cpu.decode import _BufferedDecoder, _CacheDecoder
from reasonrl.rollout.cpu.workers import Workers, fork_available, one_thread, shared_memory_shortfall


@register_engine("fast")
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

    @classmethod
    def from_config(cls, model: Any, tokenizer: Any, rollout: Any) -> FastEngine:
        return cls(model, tokenizer, batch_size=rollout.batch_size, workers=rollout.workers)

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
