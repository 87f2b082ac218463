"""Where a training step's time goes, and how much of it is the model's own compute.

For `--steps` steps (after `--warmup` untimed ones) of a real `Trainer.step()`, this reports the trainer's own
stage timers (`time/*`: prompts, generation, reward, advantages, batching, logprobs, update, sync, logging, and with
LANPO pool and abstraction) and, right after each step, the model compute that step contained, timed on its own:

- generation compute: the fast engine's model calls replayed with the step's shapes (the same prompts, prefilled
  once each; one decode step per token with the batch rows the engine ran, the sampled tokens fed back), only the
  prefill forward and the decode steps timed: no sampling, no cache copies, no row dropping;
- forward/backward compute: every log-prob pass the step ran (`token_logprobs` calls: the update's pieces with
  autograd, the no-grad ones), replayed as the model's forward to logits plus, for the autograd ones, backward from
  a unit gradient on the logits: no loss, no metrics, no optimiser.

The ratio step time / (generation compute + forward/backward compute) is what the issue's "no overhead beyond the
model's own compute" target bounds (<= 1.15 on the ~30M model). Everything else in the step (sampling, rewards,
advantages, batching, the loss and its metrics, the optimiser step, logging) is overhead by this definition.

Sizes: `--size embedded` is the embedded default (tiny 4-layer Qwen2, warm-started and cached); `--size 30m` is the
same trainer with an 8-layer, width-512 Qwen2 (30.4M parameters) from random init (a warm-start of it would take
long on a CPU), scored by the default rewards plus a dense one (`dense_reward` below) so that advantages are not all
zero and the update does its backward pass. `--lanpo` turns on LANPO to time its stages.

    python perf/profile_step.py --size embedded --threads 1
    python perf/profile_step.py --size 30m --threads 1 --steps 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

SIZES = {
    "embedded": [],
    "30m": [
        "model.hidden_size=512",
        "model.num_layers=8",
        "model.num_heads=8",
        "model.intermediate_size=1792",
        "warmstart.steps=0",
    ],
}


def dense_reward(prompts: list[str], completions: list[str], **_: Any) -> list[float]:
    """A dense score of the text (length and a hash of its characters), so that random-init completions differ."""
    return [len(c) / 64 + sum(map(ord, c)) % 7 / 7 for c in completions]


DENSE = f"{__name__}:{dense_reward.__name__}"


class ForwardClock:
    """Accumulates the wall time of `model(...)` calls (the model's forward) while on."""

    def __init__(self, model: Any, device: torch.device) -> None:
        self.model, self.device, self.seconds, self.on = model, device, 0.0, False
        self.inner = model.forward

        def timed(*args: Any, **kwargs: Any) -> Any:
            if not self.on:
                return self.inner(*args, **kwargs)
            sync(self.device)
            start = time.perf_counter()
            out = self.inner(*args, **kwargs)
            sync(self.device)
            self.seconds += time.perf_counter() - start
            return out

        model.forward = timed

    def remove(self) -> None:
        del self.model.forward  # back to the class's forward


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def generation_compute(trainer: Any, completions: list[Any]) -> float:
    """Seconds of the model forwards the fast engine ran in its last `generate` call, replayed alone."""
    from reasonrl.model.forward import pad_prompts
    from reasonrl.model.layers import fast_forward_supported
    from reasonrl.rollout.cpu.decode import _BufferedDecoder

    engine, model = trainer.engine, trainer.model
    if not fast_forward_supported(model) or not getattr(engine, "trace", None):
        return float("nan")
    clock = ForwardClock(model, trainer.device)  # the prefill: the model's forward
    decode_seconds = 0.0
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            done = 0
            for prompts, rows_per_step in engine.trace:
                comps = completions[done : done + len(prompts)]
                done += len(prompts)
                ids, real, which = pad_prompts(prompts, trainer.tokenizer.pad_token_id, trainer.device)
                decoder = _BufferedDecoder(model, ids, real, which, trainer.sampling.max_new_tokens)
                clock.on = True
                decoder.prefill()
                clock.on = False
                positions = real.sum(-1)[which]
                rows = len(prompts)
                for t, n in enumerate(rows_per_step):
                    keep = torch.arange(n, device=trainer.device) if n < rows else None
                    if keep is not None:  # the engine dropped finished rows here: same batch, untimed
                        decoder.select(keep)
                        positions, rows = positions[keep], n
                    tokens = torch.tensor(
                        [c.token_ids[t] if t < len(c.token_ids) else 0 for c in comps[:n]], device=trainer.device
                    )
                    sync(trainer.device)
                    start = time.perf_counter()
                    decoder.decode(tokens, positions, None)  # the model's layers (or its forward) on one token
                    sync(trainer.device)
                    decode_seconds += time.perf_counter() - start
                    positions = positions + 1
    finally:
        model.train(was_training)
        clock.remove()
    return clock.seconds + decode_seconds


def logprob_compute(trainer: Any, passes: list[tuple[Any, bool]]) -> float:
    """Seconds of the model's forward (and backward, for autograd passes) over the step's log-prob passes."""
    from reasonrl.model.forward import completion_logits

    model, device = trainer.model, trainer.device
    model.train()
    seconds = 0.0
    for mb, grad in passes:
        model.zero_grad(set_to_none=True)
        sync(device)
        start = time.perf_counter()
        with torch.set_grad_enabled(grad):
            logits = completion_logits(
                model, mb.prompt_ids, mb.prompt_mask, mb.which, mb.targets, mb.lengths, forward=trainer.updater.forward
            )
            if grad:
                logits.backward(torch.ones_like(logits))
        sync(device)
        seconds += time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    model.eval()
    return seconds


def profile(args: argparse.Namespace) -> None:
    from reasonrl.config import load_config
    from reasonrl.model.loading import count_parameters
    from reasonrl.training import trainer as trainer_module_trainer
    from reasonrl.training import update as trainer_module_update

    overrides = [
        "train.tensorboard=false",
        f"model.device={args.device}",
        f"rollout.engine={args.engine}",
        "rollout.workers=1",  # one process: the replay below cannot attribute compute that ran in parallel
        *SIZES[args.size],
    ]
    if args.size == "30m":
        overrides += [f"rewards.functions=[math_answer, format, '{DENSE}']", "rewards.weights=[1, 0.1, 1]"]
    if args.lanpo:
        overrides.append("algorithm.lanpo.enabled=true")
    overrides += args.overrides
    with tempfile.TemporaryDirectory(prefix="profile-step-") as tmp:
        cfg = load_config(None, [*overrides, f"train.output_dir={tmp}"])
        trainer = trainer_module_trainer.Trainer(cfg, Path(tmp) / "run")
        if args.threads:
            torch.set_num_threads(args.threads)
        passes: list[tuple[Any, bool]] = []
        real_token_logprobs = trainer_module_update.token_logprobs

        def recording(
            model: Any,
            mb: Any,
            temperature: float,
            with_entropy: bool = False,
            chunk: int = 0,
            forward: str = "generic",
        ) -> Any:
            passes.append((mb, torch.is_grad_enabled()))
            return real_token_logprobs(model, mb, temperature, with_entropy, chunk, forward)

        trainer_module_update.token_logprobs = recording
        rows = []
        try:
            r = cfg.rollout
            print(
                f"size {args.size}: {count_parameters(trainer.model) / 1e6:.2f}M parameters; engine {r.engine}; "
                f"G={r.group_size} P={r.prompts_per_step} max_new_tokens={r.max_new_tokens}; "
                f"{torch.get_num_threads()} torch threads; device {trainer.device}; "
                f"LANPO {'on' if args.lanpo else 'off'}"
            )
            for i in range(args.warmup + args.steps):
                passes.clear()
                completions: list[Any] = []
                real_generate = trainer.engine.generate

                def keep(
                    prompts: Any, n: int, sampling: Any, real_generate: Any = real_generate, into: list = completions
                ) -> Any:
                    out = real_generate(prompts, n, sampling)
                    into[:] = out  # the last generate call: what the trace describes
                    return out

                trainer.engine.generate = keep
                sync(trainer.device)
                cpu0, wall0 = time.process_time(), time.perf_counter()
                metrics = trainer.step()
                sync(trainer.device)
                wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
                trainer.global_step += 1
                del trainer.engine.generate
                if i < args.warmup:
                    continue
                gen = generation_compute(trainer, completions)
                fwd_bwd = logprob_compute(trainer, list(passes))
                stages = {k.removeprefix("time/"): v for k, v in metrics.items() if k.startswith("time/")}
                rows.append({"wall": wall, "cpu": cpu, "gen": gen, "fwd_bwd": fwd_bwd, **stages})
                print(
                    f"  step {len(rows)}: {wall * 1000:.0f} ms (cpu {cpu * 1000:.0f} ms), model compute: generation "
                    f"{gen * 1000:.0f} ms + forward/backward {fwd_bwd * 1000:.0f} ms; "
                    f"len {metrics.get('completion/len_mean', 0):.1f}, "
                    f"{len([p for p in passes if p[1]])} autograd + {len([p for p in passes if not p[1]])} no-grad "
                    "log-prob passes",
                    flush=True,
                )
        finally:
            trainer_module_update.token_logprobs = real_token_logprobs
            trainer.close()

    med = {k: statistics.median(r.get(k, 0.0) for r in rows) for k in rows[0]}
    step = med["step"]
    print(f"\nmedian of {len(rows)} steps; stage timers of the trainer (they add up to time/step):")
    for k in ("prompts", "abstraction", "generation", "reward", "advantages", "batching", "logprobs", "update", "pool"):
        if k in med or args.lanpo:
            print(f"  {k:12s} {med.get(k, 0.0) * 1000:9.1f} ms  {100 * med.get(k, 0.0) / step:5.1f} %")
    print(f"  {'logging':12s} {med.get('logging', 0.0) * 1000:9.1f} ms  {100 * med.get('logging', 0.0) / step:5.1f} %")
    print(f"  {'step':12s} {step * 1000:9.1f} ms  (process CPU time {med['cpu'] * 1000:.1f} ms)")
    compute = med["gen"] + med["fwd_bwd"]
    print("model compute, replayed alone:")
    print(
        f"  generation forwards     {med['gen'] * 1000:9.1f} ms  (generation stage {med['generation'] * 1000:.1f} ms: "
        f"{(med['generation'] - med['gen']) * 1000:.1f} ms of sampling and bookkeeping)"
    )
    print(
        f"  forward/backward        {med['fwd_bwd'] * 1000:9.1f} ms  (logprobs + update stages "
        f"{(med.get('logprobs', 0.0) + med['update']) * 1000:.1f} ms: "
        f"{(med.get('logprobs', 0.0) + med['update'] - med['fwd_bwd']) * 1000:.1f} ms of loss, metrics, optimiser)"
    )
    print(f"  sum                     {compute * 1000:9.1f} ms")
    print(f"step time / model compute: {step / compute:.3f}  (target <= 1.15 on the ~30M model)")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"1-min load average {load:.2f} at end")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="embedded")
    ap.add_argument("--steps", type=int, default=5, help="profiled steps")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--engine", choices=["fast", "hf"], default="fast", help="rollout.engine")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--lanpo", action="store_true", help="algorithm.lanpo.enabled=true")
    ap.add_argument("--malloc", choices=["keep", "default"], default="keep", help="glibc keeps freed memory")
    ap.add_argument("overrides", nargs="*", help="more dotted config overrides")
    args = ap.parse_args()
    if args.malloc == "keep":  # as the CLI does (reasonrl.rollout.cpu.workers.keep_freed_memory)
        from reasonrl.rollout.cpu.workers import keep_freed_memory

        keep_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    profile(args)


if __name__ == "__main__":
    main()
