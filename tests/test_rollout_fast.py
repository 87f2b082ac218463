"""The fast rollout engine against `HFEngine` (transformers.generate) on the tiny model, and the shared-prompt
log-prob pass against one pass per prompt + completion.

Tolerances (docs/performance.md, "Equivalence"): greedy tokens identical; with the same seed, sampled tokens
identical (the engine draws its noise exactly as `torch.multinomial` does); behaviour log-probs within 1e-5 of
HFEngine's and of the trainer's recomputation; shared-prompt logits within 1e-5 of the plain pass, gradients within
1e-5 of each tensor's largest entry.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import TINY

from reasonrl.config import load_config
from reasonrl.data.prompts import prompt_ids
from reasonrl.data.sources import load_training_data
from reasonrl.errors import UserError
from reasonrl.model import layers as rollout_layers
from reasonrl.model import shared_prefix as rollout_shared_prefix
from reasonrl.model.forward import completion_logits, pad_prompts
from reasonrl.model.loading import load_policy
from reasonrl.rollout.base import SamplingParams, make_engine
from reasonrl.rollout.cpu import decode as rollout_decode
from reasonrl.rollout.cpu import engine as rollout_engine
from reasonrl.rollout.cpu.engine import FastEngine, _filter
from reasonrl.rollout.hf import HFEngine
from reasonrl.training.batch import make_micro_batches
from reasonrl.training.trainer import Trainer
from reasonrl.training.update import token_logprobs

TEXTS = ["Q: 7+5\n", "Q: 648+500\n", "Q: 12+345\n", "Q: 1+1\n", "Q: 99+999\n"]  # left padding: lengths 7 to 11


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    """(model, tokenizer, prompts): the tiny test model warm-started enough to write varied text (once per module),
    and prompts of different lengths."""
    torch.set_num_threads(1)
    cache = tmp_path_factory.mktemp("warmstart")
    cfg = load_config(None, [*TINY, "warmstart.steps=150", f"warmstart.cache_dir={cache}"])
    problems, _ = load_training_data(cfg)
    model, tokenizer, _ = load_policy(cfg, problems)
    prompts = [prompt_ids(tokenizer, t) for t in TEXTS]
    assert len({len(p) for p in prompts}) > 2
    return model, tokenizer, prompts


def _same(a, b, logprob_tol: float = 1e-5) -> None:
    """Same tokens, flags, prompts and texts; log-probs within `logprob_tol`, relative beyond magnitude 1 (float32
    rounding of a large log-prob differs between CPUs' matmul kernels)."""
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    assert [c.truncated for c in a] == [c.truncated for c in b]
    assert [c.prompt_ids for c in a] == [c.prompt_ids for c in b]
    assert [c.text for c in a] == [c.text for c in b]
    for x, y in zip(a, b, strict=True):
        assert len(x.logprobs) == len(x.token_ids)
        gaps = (abs(u - v) / max(1.0, abs(v)) for u, v in zip(x.logprobs, y.logprobs, strict=True))
        assert max(gaps, default=0.0) < logprob_tol


def _both(engine_a, engine_b, prompts, n, sampling, seed=0):
    torch.manual_seed(seed)
    a = engine_a.generate(prompts, n, sampling)
    after_a = torch.rand(3)
    torch.manual_seed(seed)
    b = engine_b.generate(prompts, n, sampling)
    after_b = torch.rand(3)
    return a, b, torch.equal(after_a, after_b)


def test_greedy_equals_hf_token_for_token(policy):
    model, tok, prompts = policy
    greedy = SamplingParams(max_new_tokens=24, temperature=0.0)
    a, b, _ = _both(HFEngine(model, tok), FastEngine(model, tok), prompts, 1, greedy)
    _same(a, b)
    assert len({tuple(c.token_ids) for c in b}) > 2  # a model that writes varied text, not one token over and over


@pytest.mark.parametrize(
    "sampling",
    [
        SamplingParams(max_new_tokens=20, temperature=1.0),
        SamplingParams(max_new_tokens=20, temperature=0.7, top_p=0.9, top_k=5),
        SamplingParams(max_new_tokens=6, temperature=1.5, top_k=3),
        SamplingParams(max_new_tokens=20, temperature=1.2, top_p=0.5),
    ],
)
def test_sampling_with_a_seed_equals_hf_and_uses_the_rng_alike(policy, sampling):
    model, tok, prompts = policy
    for seed in (0, 1):
        a, b, same_rng = _both(HFEngine(model, tok), FastEngine(model, tok), prompts, 4, sampling, seed)
        _same(a, b)
        assert same_rng  # the RNG is left in the same state: the rest of a training run is unchanged too


def test_behaviour_logprobs_equal_the_trainers_recomputation(policy):
    model, tok, prompts = policy
    for temperature in (1.0, 0.6):
        torch.manual_seed(3)
        comps = FastEngine(model, tok).generate(prompts, 3, SamplingParams(24, temperature))
        mb = make_micro_batches(comps, torch.zeros(len(comps)), [True] * len(comps), 0, tok.pad_token_id, "cpu")[0]
        for forward in ("generic", "shared_prefix"):
            with torch.no_grad():
                logp, _ = token_logprobs(model, mb, temperature, forward=forward)
            assert mb.mask.sum() == sum(len(c.token_ids) for c in comps)
            assert ((logp - mb.behaviour_logp).abs() * mb.mask).max() < 1e-5


def test_eos_stops_each_row_and_sets_the_truncation_flags(policy):
    """Make a token that greedy decoding emits early for some prompts (not all) an EOS: those rows stop right after
    it, untruncated; the others run to max_new_tokens, truncated. Same as transformers.generate."""
    model, tok, prompts = policy
    greedy = SamplingParams(max_new_tokens=16, temperature=0.0)
    free = FastEngine(model, tok).generate(prompts, 1, greedy)
    # an early token of the first prompt's completion that some other completion never emits
    stop = next(t for t in free[0].token_ids[:4] if any(t not in c.token_ids for c in free[1:]))
    hf, fast = HFEngine(model, tok), FastEngine(model, tok)
    hf.eos_ids, fast.eos_ids = [*hf.eos_ids, stop], [*fast.eos_ids, stop]
    a, b, _ = _both(hf, fast, prompts, 1, greedy)
    _same(a, b)
    assert not b[0].truncated and len(b[0].token_ids) <= 4 and b[0].token_ids[-1] == stop
    assert any(c.truncated for c in b), "pick a stop token that leaves some rows running"
    for c in b:
        eos = [i for i, t in enumerate(c.token_ids) if t in fast.eos_ids]
        if c.truncated:
            assert not eos and len(c.token_ids) == 16
        else:
            assert eos == [len(c.token_ids) - 1]
    sampled = SamplingParams(max_new_tokens=16, temperature=1.0)
    a, b, _ = _both(hf, fast, prompts, 4, sampled, seed=5)
    _same(a, b)


def test_top_k_and_top_p_restrict_the_support(policy):
    """Every sampled token is in the top-k / nucleus of the policy's distribution at its position."""
    model, tok, prompts = policy
    engine = FastEngine(model, tok)
    for sampling in (SamplingParams(12, 1.0, top_k=2), SamplingParams(12, 1.0, top_p=0.3)):
        torch.manual_seed(0)
        comps = engine.generate(prompts, 8, sampling)
        mb = make_micro_batches(comps, torch.zeros(len(comps)), [True] * len(comps), 0, tok.pad_token_id, "cpu")[0]
        with torch.no_grad():
            scores = completion_logits(model, mb.prompt_ids, mb.prompt_mask, mb.which, mb.targets).float()
        allowed = torch.isfinite(_filter(scores.flatten(0, 1), sampling.top_k, sampling.top_p)).view(scores.shape)
        picked = allowed.gather(-1, mb.targets.unsqueeze(-1)).squeeze(-1)
        assert bool(picked[mb.mask > 0].all())
        if sampling.top_k:
            assert bool((allowed.sum(-1) >= 2).all())


def test_filter_matches_transformers_warpers():
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(64, 50, generator=gen) * 3
    scores[0, :10] = 1.0  # ties at the k-th value are kept
    for k, p in [(5, 1.0), (0, 0.8), (7, 0.6), (1, 1.0), (0, 0.05)]:
        expected = scores.clone()
        if k:
            expected = TopKLogitsWarper(k)(None, expected)
        if p < 1.0:
            expected = TopPLogitsWarper(p)(None, expected)
        assert torch.equal(_filter(scores, k, p), expected)


def test_n_samples_per_prompt_are_prompt_major_in_any_chunking(policy):
    model, tok, prompts = policy
    greedy = SamplingParams(max_new_tokens=10, temperature=0.0)
    whole = FastEngine(model, tok).generate(prompts, 3, greedy)
    assert len(whole) == 15
    for i, c in enumerate(whole):
        assert c.prompt_ids == prompts[i // 3]
        assert c.token_ids == whole[(i // 3) * 3].token_ids  # greedy: the n samples of a prompt agree
    for size in (1, 4, 7):  # chunks that split a prompt's samples
        _same(FastEngine(model, tok, batch_size=size).generate(prompts, 3, greedy), whole)
        sampling = SamplingParams(max_new_tokens=10, temperature=1.0)
        hf, fast = HFEngine(model, tok, batch_size=size), FastEngine(model, tok, batch_size=size)
        a, b, _ = _both(hf, fast, prompts, 3, sampling)
        _same(a, b)


def test_generic_path_and_eager_attention_give_the_same_samples(policy, monkeypatch):
    model, tok, prompts = policy
    sampling = SamplingParams(max_new_tokens=12, temperature=1.0)
    reference = _both(HFEngine(model, tok), FastEngine(model, tok), prompts, 2, sampling)[0]
    model.set_attn_implementation("eager")
    try:
        _same(_both(HFEngine(model, tok), FastEngine(model, tok), prompts, 2, sampling)[1], reference)
    finally:
        model.set_attn_implementation("sdpa")
    monkeypatch.setattr(rollout_engine, "fast_forward_supported", lambda model: False)
    _same(_both(HFEngine(model, tok), FastEngine(model, tok), prompts, 2, sampling)[1], reference)


@pytest.mark.parametrize("overhead", [rollout_shared_prefix.BUCKET_OVERHEAD, 0.0])
def test_shared_prompt_pass_equals_one_pass_per_sequence_with_gradients(policy, monkeypatch, overhead):
    """`completion_logits` (each prompt once, its completions behind its cached keys and values) against the generic
    path (every prompt + completion as one sequence): logits and parameter gradients agree, with the default
    attention buckets and with as many as the lengths allow (no cost per bucket)."""
    model, tok, prompts = policy
    monkeypatch.setattr(rollout_shared_prefix, "BUCKET_OVERHEAD", overhead)
    torch.manual_seed(0)
    comps = FastEngine(model, tok).generate(prompts, 3, SamplingParams(16, 1.0))
    ids, real, which = pad_prompts([c.prompt_ids for c in comps], tok.pad_token_id, torch.device("cpu"))
    assert len(ids) == len(prompts) and which.tolist() == [i // 3 for i in range(15)]
    width = max(len(c.token_ids) for c in comps)
    targets = torch.tensor([c.token_ids + [tok.pad_token_id] * (width - len(c.token_ids)) for c in comps])
    mask = torch.tensor([[1.0] * len(c.token_ids) + [0.0] * (width - len(c.token_ids)) for c in comps])
    lengths = torch.tensor([len(c.token_ids) for c in comps])
    assert len(set(lengths.tolist())) > 1  # the padding-free pass has padding to leave out
    if overhead == 0:
        assert len(rollout_shared_prefix.attention_buckets(lengths - 1, ids.shape[1])) > 1
    model.train()
    results = []
    for fast in (True, False):
        model.zero_grad(set_to_none=True)
        logits = completion_logits(
            model, ids, real, which, targets, lengths, forward="shared_prefix" if fast else "generic"
        )
        logp = torch.log_softmax(logits.float(), -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        (logp * mask).sum().backward()
        results.append((logp.detach(), [p.grad.clone() for p in model.parameters()]))
    (a, grads_a), (b, grads_b) = results
    assert ((a - b).abs() * mask).max() < 1e-5
    # per tensor, relative to its largest entry: the two paths sum the same terms in different orders, which moves
    # entries that cancel to near zero by more than an elementwise relative bound allows (both are ~1e-6 off a
    # float64 run of the generic path, measured)
    for x, y in zip(grads_a, grads_b, strict=True):
        assert (x - y).abs().max() <= 1e-5 * y.abs().max()


def _naive_bucket_cost(runs: list[int], width: int, max_buckets: int, overhead: float) -> float:
    """The least work over every split of the sorted distinct run lengths into at most `max_buckets` ranges."""
    values = sorted({r for r in runs if r > 0})
    best = float("inf")
    for count in range(1, min(max_buckets, len(values)) + 1):
        for cuts in itertools.combinations(range(1, len(values)), count - 1):
            total = 0.0
            for lo, hi in zip((0, *cuts), (*cuts, len(values)), strict=True):
                top = values[hi - 1]
                rows = sum(1 for r in runs if values[lo] <= r <= top)
                total += rows * top * (width + top) + overhead
            best = min(best, total)
    return best


def test_attention_buckets_cover_the_rows_with_the_least_padded_work():
    """Against an exhaustive search: every row with tokens to run is in exactly one bucket, each bucket is as wide
    as its longest row, and the total work is the least any split of the lengths gives."""
    gen = torch.Generator().manual_seed(0)
    for trial in range(40):
        n, width, max_buckets = int(torch.randint(1, 40, (1,), generator=gen)), trial % 13, 1 + trial % 4
        runs = torch.randint(0, 30, (n,), generator=gen)
        if trial % 5 == 0:
            runs[0] = 63  # one long completion among short ones
        buckets = rollout_shared_prefix.attention_buckets(runs, width, max_buckets)
        rows = sorted(r for b, _ in buckets for r in b.tolist())
        assert rows == [i for i in range(n) if runs[i] > 0]
        assert len(buckets) <= max_buckets
        for b, w in buckets:
            assert w == int(runs[b].max())
        cost = sum(len(b) * w * (width + w) + rollout_shared_prefix.BUCKET_OVERHEAD for b, w in buckets)
        if buckets:
            expected = _naive_bucket_cost(runs.tolist(), width, max_buckets, rollout_shared_prefix.BUCKET_OVERHEAD)
            assert cost == pytest.approx(expected)
    assert rollout_shared_prefix.attention_buckets(torch.zeros(3, dtype=torch.long), 5) == []


def test_shared_prompt_pass_of_one_token_completions(policy, monkeypatch):
    """Completions of one token each leave nothing to run behind the prompts: the first column is the prompt pass's
    prediction, the rest zeros."""
    model, tok, prompts = policy
    ids, real, which = pad_prompts(prompts[:2], tok.pad_token_id, torch.device("cpu"))
    targets = torch.tensor([[tok.eos_token_id, tok.pad_token_id]] * 2)
    with torch.no_grad():
        logits = completion_logits(model, ids, real, which, targets, torch.tensor([1, 1]), forward="shared_prefix")
        full = completion_logits(model, ids, real, which, targets, forward="shared_prefix")
    assert logits.shape == full.shape
    assert torch.allclose(logits[:, 0], full[:, 0]) and not logits[:, 1].any()
    with torch.no_grad():  # one column of targets: only the prompts run, and predict it as the generic path does
        one = completion_logits(model, ids, real, which, targets[:, :1], forward="shared_prefix")
        generic = completion_logits(model, ids, real, which, targets[:, :1], forward="generic")
    assert one.shape == generic.shape == (2, 1, logits.shape[-1])
    assert (one - generic).abs().max() < 1e-5


def test_make_engine_and_the_trainers_default(tiny_config, tmp_path):
    assert tiny_config.rollout.engine == "fast"
    trainer = Trainer(tiny_config, tmp_path / "run")
    try:
        assert isinstance(trainer.engine, FastEngine)
        assert isinstance(make_engine("hf", trainer.model, trainer.tokenizer), HFEngine)
        with pytest.raises(ValueError, match="unknown rollout engine 'sglang'; choose one of fast, hf, vllm"):
            make_engine("sglang", trainer.model, trainer.tokenizer)
    finally:
        trainer.close()


def test_a_training_step_is_the_same_with_either_engine(tiny_overrides, tmp_path):
    """Fixed seed, one step each: identical samples, hence identical rewards and lengths; the update agrees to float
    rounding."""
    results = []
    for engine in ("hf", "fast"):
        overrides = [f"rollout.engine={engine}", "rewards.functions=[format]", "rewards.weights=null"]
        cfg = load_config(None, [*tiny_overrides, *overrides])
        trainer = Trainer(cfg, tmp_path / engine)
        try:
            results.append([trainer.step() for _ in range(2)])
        finally:
            trainer.close()
    for a, b in zip(*results, strict=True):
        for key in (
            "reward/mean",
            "completion/len_mean",
            "completion/len_max",
            "completion/truncated",
            "tokens/generated",
        ):
            assert a[key] == b[key], key
        for key in ("loss", "entropy", "grad_norm", "clip/region", "ratio/mean", "advantage/abs_mean"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_other_decoder_families_with_grouped_query_attention(family, monkeypatch):
    """Tiny random Llama and Qwen3 (4 query heads, 2 key/value heads; Qwen3's per-head norms): the layer-by-layer
    decode and the shared-prompt pass give HF's samples and the plain pass's logits."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    from reasonrl.demo import arithmetic

    tok = arithmetic.build_tokenizer()
    shape = {"vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2}
    ids = {"pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id, "bos_token_id": tok.eos_token_id}
    heads = {"num_attention_heads": 4, "num_key_value_heads": 2, "initializer_range": 0.5}
    torch.manual_seed(0)
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**shape, **ids, **heads))
    else:
        model = Qwen3ForCausalLM(Qwen3Config(**shape, **ids, **heads, head_dim=8))
    assert rollout_layers.fast_forward_supported(model) and rollout_layers._layerwise_parts(model) is not None
    prompts = [prompt_ids(tok, t) for t in TEXTS]
    greedy = SamplingParams(max_new_tokens=12, temperature=0.0)
    a, b, _ = _both(HFEngine(model, tok), FastEngine(model, tok), prompts, 1, greedy)
    _same(a, b)
    a, b, same_rng = _both(HFEngine(model, tok), FastEngine(model, tok), prompts, 3, SamplingParams(12, 1.0, 0.9, 20))
    _same(a, b)
    assert same_rng
    pids, real, which = pad_prompts([c.prompt_ids for c in b], tok.pad_token_id, torch.device("cpu"))
    width = max(len(c.token_ids) for c in b)
    targets = torch.tensor([c.token_ids + [tok.pad_token_id] * (width - len(c.token_ids)) for c in b])
    with torch.no_grad():
        lengths = torch.tensor([len(c.token_ids) for c in b])
        fast = completion_logits(model, pids, real, which, targets, lengths, forward="shared_prefix")
        model.set_attn_implementation("eager")  # on a CPU the fast pass attends as eager attention does
        plain = completion_logits(model, pids, real, which, targets, forward="generic")
    for r, c in enumerate(b):
        n = len(c.token_ids)
        assert torch.allclose(fast[r, :n], plain[r, :n], rtol=1e-5, atol=1e-5)


# ---- rollout.workers: one chunk sampled by several processes ---------------------------------------------------


@pytest.mark.parametrize("workers", [2, 3])
def test_worker_processes_sample_what_one_process_samples(policy, workers):
    """The rows of each chunk split between `workers` processes: the same tokens and texts, log-probs and entropies
    to float rounding, and the RNG left where one process leaves it, whichever share ran the most steps; sampled,
    filtered, greedy, and in chunks (`batch_size`)."""
    model, tok, prompts = policy
    longest = set()  # which share ran the most steps, over the sampled runs
    cases = [(SamplingParams(32, 1.0), 4, 0), (SamplingParams(32, 0.8, 0.9, 20), 3, 7), (SamplingParams(16, 0.0), 2, 0)]
    for (sampling, n, size), order in itertools.product(cases, (prompts, prompts[::-1])):
        for seed in range(3):
            split = FastEngine(model, tok, batch_size=size, workers=workers)
            try:
                a, b, same_rng = _both(FastEngine(model, tok, batch_size=size), split, order, n, sampling, seed)
            finally:
                split.close()
            _same(a, b)
            assert same_rng
            for x, y in zip(a, b, strict=True):
                assert max(abs(u - v) for u, v in zip(x.entropies, y.entropies, strict=True)) < 1e-5
            chunk = size or len(order) * n
            assert len(split.trace) == sum(min(workers, len(range(lo, min(lo + chunk, len(b))))) for lo in
                                           range(0, len(b), chunk))  # fmt: skip
            steps = [len(rows) for _, rows in split.trace[:workers]]  # the first chunk's shares
            if sampling.temperature > 0 and len(set(steps)) > 1:
                longest.add(steps.index(max(steps)) == 0)
    assert longest == {True, False}  # both this process's share and a worker's share ran longest at some point


def test_worker_processes_sample_from_the_current_weights(policy):
    """The workers share the policy's tensors: an in-place update (as the optimiser makes) is what they sample from
    next."""
    model, tok, prompts = policy
    original = [p.detach().clone() for p in model.parameters()]
    split = FastEngine(model, tok, workers=2)
    sampling = SamplingParams(24, 1.0)
    try:
        split.generate(prompts, 2, sampling)  # starts the workers
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(0.9)
        a, b, same_rng = _both(FastEngine(model, tok), split, prompts, 2, sampling)
        _same(a, b)
        assert same_rng
    finally:
        split.close()
        with torch.no_grad():
            for p, o in zip(model.parameters(), original, strict=True):
                p.copy_(o)


def test_a_dead_worker_is_reported_and_close_stops_the_workers(policy):
    import os
    import signal

    model, tok, prompts = policy
    engine = FastEngine(model, tok, workers=2)
    sampling = SamplingParams(8, 1.0)
    engine.generate(prompts, 2, sampling)
    (proc,) = engine.pool.procs
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    with pytest.raises(RuntimeError, match=f"rollout worker: process {proc.pid} died"):
        engine.generate(prompts, 2, sampling)
    a, b, same_rng = _both(FastEngine(model, tok), engine, prompts, 2, sampling)  # the next call starts new workers
    _same(a, b)
    assert same_rng
    (new,) = engine.pool.procs
    assert new.pid != proc.pid
    engine.close()
    assert engine.pool is None and not new.is_alive()


def test_worker_count(policy, monkeypatch):
    """0 = one process per torch thread; 1 = none; none on a model off the CPU or without fork; auto falls back to
    this process alone, and an explicit count is refused with one line, when shared memory is too small."""
    model, tok, prompts = policy
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert FastEngine(model, tok, workers=0).workers_pool() is None
        torch.set_num_threads(2)
        auto = FastEngine(model, tok, workers=0)
        assert auto.workers_pool().count == 2
        auto.close()
        assert FastEngine(model, tok, workers=1).workers_pool() is None
        monkeypatch.setattr(rollout_engine, "shared_memory_shortfall", lambda model: "no room")
        assert FastEngine(model, tok, workers=0).workers_pool() is None  # auto: this process alone
        with pytest.raises(UserError, match="rollout.workers=2: no room; set rollout.workers=1"):
            FastEngine(model, tok, workers=2).workers_pool()
        monkeypatch.setattr(rollout_engine, "fork_available", lambda: False)
        assert FastEngine(model, tok, workers=2).workers_pool() is None
    finally:
        torch.set_num_threads(threads)


def test_decode_attention_equals_a_naive_loop():
    """`_decode_attention` (grouped query heads, additive mask) against a loop over rows and heads."""
    torch.manual_seed(0)
    B, heads, kv_heads, L, d = 3, 4, 2, 6, 8
    q, k, v = torch.randn(B, heads, 1, d), torch.randn(B, kv_heads, L, d), torch.randn(B, kv_heads, L, d)
    allowed = torch.rand(B, 1, 1, L) > 0.3
    allowed[..., -1] = True  # the new token itself
    bias = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    out = rollout_decode._decode_attention(q, k, v, bias, d**-0.5)
    assert out.shape == (B, 1, heads * d)
    for b in range(B):
        for h in range(heads):
            kv = h // (heads // kv_heads)
            scores = [float(q[b, h, 0] @ k[b, kv, j]) * d**-0.5 for j in range(L) if allowed[b, 0, 0, j]]
            weights = torch.tensor(scores).softmax(0)
            keys = [j for j in range(L) if allowed[b, 0, 0, j]]
            expected = sum(w * v[b, kv, j] for w, j in zip(weights, keys, strict=True))
            assert torch.allclose(out[b, 0, h * d : (h + 1) * d], expected, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_rolled_rope_is_the_families_rotary_embedding_bit_for_bit(family):
    """`_rolled_rope` with `signed_sin` against each family's own `apply_rotary_pos_emb`, and against the formula
    written out per element (x_j cos_j - x_{j+d/2} sin_j in the first half, x_{j-d/2} sin_j + x_j cos_j in the
    second); gradients too."""
    import importlib

    apply = importlib.import_module(f"transformers.models.{family}.modeling_{family}").apply_rotary_pos_emb
    torch.manual_seed(0)
    M, heads, d = 5, 3, 8
    q, k = torch.randn(M, heads, d, requires_grad=True), torch.randn(M, 2, d, requires_grad=True)
    cos, sin = torch.randn(M, d), torch.randn(M, d)
    theirs = apply(q, k, cos, sin, unsqueeze_dim=1)
    ours = rollout_layers._rolled_rope(q, k, cos, rollout_layers.signed_sin(sin), unsqueeze_dim=1)
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a, b)
    for x, out in zip((q, k), ours, strict=True):
        for m, h, j in itertools.product(range(M), range(x.shape[1]), range(d)):
            other = x[m, h, j + d // 2] if j < d // 2 else x[m, h, j - d // 2]
            sign = -1.0 if j < d // 2 else 1.0
            assert float(out[m, h, j]) == pytest.approx(float(x[m, h, j] * cos[m, j] + sign * other * sin[m, j]))
    g = [torch.randn_like(o) for o in ours]
    grads_ours = torch.autograd.grad(ours, (q, k), g)
    grads_theirs = torch.autograd.grad(theirs, (q, k), g)
    for a, b in zip(grads_ours, grads_theirs, strict=True):
        assert torch.equal(a, b)


def test_shared_memory_shortfall(monkeypatch, tmp_path):
    import shutil
    from collections import namedtuple

    from reasonrl.rollout.cpu.workers import shared_memory_shortfall

    model = torch.nn.Linear(1024, 1024, bias=False)  # 4 MiB of float32
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda root: usage(64 << 20, 0, 64 << 20))
    assert shared_memory_shortfall(model, str(tmp_path)) is None
    monkeypatch.setattr(shutil, "disk_usage", lambda root: usage(64 << 20, 58 << 20, 6 << 20))
    expected = f"the model needs 4 MiB of shared memory and {tmp_path} has 6 MiB free"
    assert shared_memory_shortfall(model, str(tmp_path)) == expected
    assert shared_memory_shortfall(model, str(tmp_path / "absent")) is None  # no such tmpfs: nothing to check


def test_exponential_noise_is_torchs_values_and_rng_use():
    """The vectorised noise (`_exponential_noise`) against `exponential_` itself: the same values and the same RNG
    state afterwards, over 2M draws in shapes that the sampling loop uses."""
    for seed, shape in ((0, (1000, 999)), (1, (64, 99)), (2, (3, 151_936))):
        torch.manual_seed(seed)
        expected = torch.empty(shape).exponential_()
        state = torch.get_rng_state()
        torch.manual_seed(seed)
        noise = rollout_engine._exponential_noise(shape, torch.float32, torch.device("cpu"))
        assert noise.dtype == torch.float32 and torch.equal(noise, expected)
        assert torch.equal(torch.get_rng_state(), state)
        rows = torch.tensor([0, shape[0] - 1])  # a share's live rows: only those are transformed, all are drawn
        for pick in (rows, slice(1, shape[0])):
            torch.manual_seed(seed)
            assert torch.equal(rollout_engine._exponential_noise(shape, torch.float32, torch.device("cpu"), pick),
                               expected[pick])  # fmt: skip
            assert torch.equal(torch.get_rng_state(), state)


def test_lean_decode_step_only_for_plain_layers(policy):
    """The CPU decode step (`_LeanStack`) concatenates the projections' weights, so it must not run on layers that do
    more than their weight (LoRA, quantised): those keep the module-by-module step."""
    model = policy[0]
    assert rollout_decode._LeanStack.build(model) is not None

    class Wrapped(torch.nn.Linear):  # any subclass, e.g. an adapter layer, may add to its forward
        pass

    attn = model.model.layers[0].self_attn
    plain = attn.v_proj
    wrapped = Wrapped(plain.in_features, plain.out_features, bias=plain.bias is not None)
    try:
        attn.v_proj = wrapped
        assert rollout_decode._LeanStack.build(model) is None
    finally:
        attn.v_proj = plain


def test_the_cache_goes_by_the_keyword_the_model_takes(policy):
    """transformers renamed the forward's `past_key_values` to `cache` (the old name warns at every call): the
    engine and the shared-prompt pass use whichever name the model's forward has, and sample without the warning."""
    import warnings

    class Old:
        def forward(self, input_ids=None, past_key_values=None, use_cache=None): ...

    class New:
        def forward(self, input_ids=None, cache=None, use_cache=None): ...

    assert rollout_layers._cache_keyword(Old) == "past_key_values" and rollout_layers._cache_keyword(New) == "cache"
    model, tok, prompts = policy
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        comps = FastEngine(model, tok).generate(prompts[:2], 2, SamplingParams(8, 1.0))
        ids, real, which = pad_prompts([c.prompt_ids for c in comps], tok.pad_token_id, torch.device("cpu"))
        targets = torch.tensor([c.token_ids + [tok.pad_token_id] * (8 - len(c.token_ids)) for c in comps])
        with torch.no_grad():
            completion_logits(model, ids, real, which, targets, forward="shared_prefix")
