"""Tokens per second of the rollout engines on the same prompts, in one run.

`hf` (`transformers.generate`, the reference), the CPU `fast` engine and `vllm` (when vLLM is installed: run this
in the vLLM virtualenv of docs/vllm.md) sample `--n` completions for each of `--prompts` prompts of the embedded task
(temperature 1, `--max-new-tokens`, EOS stops a completion) from the same policy: the demo's warm-started tiny model
(its head size, 32, is one vLLM's CPU kernels support). Each engine gets one untimed call, then `--repeats` timed
ones; the median tokens/s (generated tokens, EOS included, over wall time) and the ratio to `hf` are printed.

    OMP_NUM_THREADS=2 python perf/bench_engines.py --threads 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--engines", nargs="+", default=["hf", "fast", "vllm"])
    a = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(a.threads))  # vLLM reads it when it starts
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    import importlib.util

    import torch

    import reasonrl  # noqa: F401  (registers the demo)
    from reasonrl.config import load_config
    from reasonrl.data.prompts import PromptFormat, prompt_ids
    from reasonrl.data.sources import load_training_data
    from reasonrl.model.loading import load_policy
    from reasonrl.rollout import SamplingParams, engine_class

    torch.set_num_threads(a.threads)
    engines = [e for e in a.engines if e != "vllm" or importlib.util.find_spec("vllm") is not None]
    if "vllm" in a.engines and "vllm" not in engines:
        print("vllm is not installed here: measuring the other engines (docs/vllm.md installs it)", file=sys.stderr)
    cfg = load_config(None, [f"rollout.max_new_tokens={a.max_new_tokens}"])
    problems, _ = load_training_data(cfg)
    model, tokenizer, _ = load_policy(cfg, problems)
    model.eval()
    prompts = [prompt_ids(tokenizer, p.prompt, PromptFormat.from_config(cfg.data)) for p in problems[: a.prompts]]
    sampling = SamplingParams(a.max_new_tokens, 1.0)
    import transformers

    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, {a.threads} threads; "
        f"{a.prompts} prompts x {a.n} completions, up to {a.max_new_tokens} new tokens"
    )
    results: dict[str, float] = {}
    for name in engines:  # vLLM last: once started, it pins the process's threads
        engine = engine_class(name).from_config(model, tokenizer, cfg.rollout)
        try:
            engine.generate(prompts, a.n, sampling)  # untimed: start-up, first compilation
            rates = []
            for r in range(a.repeats):
                torch.manual_seed(r)
                start = time.perf_counter()
                comps = engine.generate(prompts, a.n, sampling)
                seconds = time.perf_counter() - start
                rates.append(sum(len(c.token_ids) for c in comps) / seconds)
        finally:
            engine.close()
        results[name] = statistics.median(rates)
        print(f"{name:5} {results[name]:10.0f} tokens/s  (runs: {', '.join(f'{x:.0f}' for x in rates)})", flush=True)
    if "hf" in results:
        print("ratio to hf: " + ", ".join(f"{k} {v / results['hf']:.2f}" for k, v in results.items()))


if __name__ == "__main__":
    main()
