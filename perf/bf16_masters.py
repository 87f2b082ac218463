"""How close bf16 compute over float32 master weights comes to a float32 run, against the floor that gradient
error of bf16's size sets under AdamW.

Runs 10 RL steps at lr 1e-6 (no evaluation) of a tiny random Qwen2 (the embedded demo's, 32 wide) from one
warm-start, or of a recipe's model (`--config`): float32; then, on its first step's rollouts, one loss pass's
gradient error under bf16 and fp16 autocast (`pass_errors`); then, on the same rollouts (the float32 run's, replayed)
`model.dtype=bfloat16` (`train.master_weights=fp32`) and float32 runs whose gradients get unbiased Gaussian noise,
each tensor's noise as large as bf16's gradient error in that step times `--scales`. Prints each run's gradient
error and the update's relative difference from float32, ‖Δ − Δfp32‖ / ‖Δfp32‖. (tests/test_options.py pins bf16 ≤
the 1× control on the tiny model.) `--fp16` adds fp16 compute over float32 masters, patched in (`fp16_compute`).

    python perf/bf16_masters.py --fp16
    python perf/bf16_masters.py --fp16 --config recipes/smollm2-arithmetic.yaml rollout.prompts_per_step=2 \
        rollout.group_size=4 rollout.max_new_tokens=32
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

TINY = [
    "model.hidden_size=32", "model.num_layers=2", "model.num_heads=2", "model.intermediate_size=64",
    "task.train_size=200", "task.eval_size=8", "warmstart.steps=3", "warmstart.batch_size=8",
    "rollout.group_size=4", "rollout.prompts_per_step=3", "rollout.max_new_tokens=24", "eval.num_problems=8",
]  # fmt: skip
COMMON = [
    "train.tensorboard=false", "train.sample_every=0", "rewards.num_workers=1", "train.save_every=0",
    "rewards.functions=[math_answer,dense]", "rewards.weights=[1.0,1.0]", "train.lr=1e-6", "train.steps=10",
]  # fmt: skip


def dense(prompts: list[str], completions: list[str], **columns) -> list[float]:
    """Length plus a content hash: non-zero advantages even for an untrained policy."""
    return [len(c) / 10 + sum(map(ord, c)) % 7 / 7 for c in completions]


def _trainer(config: str | None, overrides: list[str], dtype: str, root: Path) -> Any:
    """A Trainer of the tiny model (or `config`'s) with COMMON and `overrides`, computing in `dtype`, in its own
    directory under `root` (the warm-start cached there once)."""
    from reasonrl.config import load_config
    from reasonrl.training.trainer import Trainer

    out = Path(tempfile.mkdtemp(dir=root))
    base = TINY if config is None else []
    cfg = load_config(config, [*base, *COMMON, *overrides, f"model.dtype={dtype}", f"train.output_dir={out}",
                               f"warmstart.cache_dir={root / 'cache'}"])  # fmt: skip
    return Trainer(cfg, out / "run", reward_funcs={"dense": dense})


class Run:
    """One 10-step run. Gradients are compared with `reference` (a float32 run's, kept per step and tensor) as they
    come, so that only the float32 run's are held (a 135M model's ten steps take 5.4 GB); `noise`: per step and
    tensor, the norm of the Gaussian noise added to that gradient before AdamW steps (drawn from `gen`)."""

    def __init__(self, config: str | None, overrides: list[str], dtype: str, root: Path, *,
                 rollouts: list | None = None, reference: list | None = None, noise: list | None = None,
                 gen: torch.Generator | None = None) -> None:  # fmt: skip
        trainer = _trainer(config, overrides, dtype, root)
        cfg, params = trainer.cfg, list(trainer.model.parameters())
        self.grads: list[list[torch.Tensor]] = []  # kept without a reference only
        self.errors: list[list[float]] = []  # per step and tensor: ‖g − g_reference‖
        self.relative: list[float] = []  # per step: ‖g − g_reference‖ / ‖g_reference‖
        self.rollouts: list = []
        generate, step = trainer.generate, trainer.optimizer.step

        def sample_or_replay(rnd):
            if rollouts is None:
                generate(rnd)
            else:
                rnd.completions = copy.deepcopy(rollouts[len(self.rollouts)])
                assert [c.prompt_ids for c in rnd.completions] == rnd.prompt_ids, "another run's prompts"
            self.rollouts.append(copy.deepcopy(rnd.completions))

        def noisy_step(*args, **kwargs):
            k = len(self.errors) if reference is not None else len(self.grads)
            if noise is not None:
                for p, norm in zip(params, noise[k], strict=True):
                    e = torch.randn(p.shape, generator=gen)
                    p.grad += e / e.norm() * norm
            grads = [p.grad.detach().float().clone() for p in params]
            if reference is None:
                self.grads.append(grads)
            else:
                diffs = [float((g - r).norm()) for g, r in zip(grads, reference[k], strict=True)]
                self.errors.append(diffs)
                total = sum(float(r.pow(2).sum()) for r in reference[k]) ** 0.5
                self.relative.append(sum(d * d for d in diffs) ** 0.5 / total)
            return step(*args, **kwargs)

        trainer.generate, trainer.optimizer.step = sample_or_replay, noisy_step
        before = [p.detach().float().clone() for p in params]
        for _ in range(cfg.train.steps):
            trainer.step()
            trainer.global_step += 1
        trainer.close()
        self.delta = [p.detach().float() - b for p, b in zip(params, before, strict=True)]


def pass_errors(config: str | None, overrides: list[str], root: Path, rollouts: list) -> dict[str, list[float]]:
    """One loss pass, no optimiser: the relative error, against float32, of the gradient of Σᵢ wᵢ · log π(completionᵢ)
    under bf16 and fp16 autocast, for each completion of the first step alone (wᵢ = 1) and for the step's whole
    batch with wᵢ = ±1 alternating within each group (advantage-like: terms cancel)."""
    trainer = _trainer(config, overrides, "float32", root)
    cfg, model = trainer.cfg, trainer.model
    params = [p for p in model.parameters() if p.requires_grad]
    device = next(model.parameters()).device.type

    def gradient(completions: list, weights: list[float], dtype: torch.dtype | None) -> torch.Tensor:
        model.zero_grad()
        for c, w in zip(completions, weights, strict=True):
            ids = torch.tensor([c.prompt_ids + c.token_ids], device=model.device)
            with torch.autocast(device, dtype=dtype or torch.float32, enabled=dtype is not None):
                logits = model(input_ids=ids, use_cache=False).logits[0, len(c.prompt_ids) - 1 : -1]
            logp = torch.log_softmax(logits.float(), -1).gather(-1, ids[0, len(c.prompt_ids) :, None]).sum()
            (w * logp).backward()
        return torch.cat([p.grad.detach().flatten().clone() for p in params])

    errors: dict[str, list[float]] = {"bf16": [], "fp16": []}
    G, batch = cfg.rollout.group_size, rollouts[0]
    cases = [([c], [1.0]) for c in batch] + [(batch, [(-1.0) ** (i % G) for i in range(len(batch))])]
    for completions, weights in cases:
        exact = gradient(completions, weights, None)
        for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
            errors[name].append(float((gradient(completions, weights, dtype) - exact).norm() / exact.norm()))
    trainer.close()
    return errors


@contextlib.contextmanager
def fp16_compute(scale: float = 2.0**12) -> Iterator[None]:
    """The loss passes under fp16 autocast with a static loss scale, over float32 weights. The trainer refuses fp16
    on a CPU (accelerate would run it in float32 without saying so), so this patches the process helper's autocast,
    backward and clipping for the measurement: the loss times `scale` before the backward, the gradients divided by
    it (and checked finite) before clipping."""
    from reasonrl.training.distributed import Processes

    saved = Processes.autocast, Processes.backward, Processes.clip_grad_norm

    def clip(self, parameters, max_norm):
        parameters = [p for p in parameters if p.grad is not None]
        for p in parameters:
            p.grad /= scale
            assert torch.isfinite(p.grad).all(), "fp16 overflow: lower the loss scale"
        return saved[2](self, parameters, max_norm)

    Processes.autocast = lambda self: torch.autocast(self.device.type, dtype=torch.float16)
    Processes.backward = lambda self, loss: saved[1](self, loss * scale)
    Processes.clip_grad_norm = clip
    try:
        yield
    finally:
        Processes.autocast, Processes.backward, Processes.clip_grad_norm = saved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scales", type=float, nargs="*", default=[1.0, 0.5, 0.25, 0.1], help="noise sizes (none: skip)")
    ap.add_argument("--seed", type=int, default=0, help="the noise's")
    ap.add_argument("--config", help="a recipe instead of the tiny model (e.g. recipes/smollm2-arithmetic.yaml)")
    ap.add_argument("--fp16", action="store_true", help="also fp16 compute (patched in: see fp16_compute)")
    ap.add_argument("overrides", nargs="*", help="key=value on top")
    a = ap.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message="Seems like `optimizer.step")  # the wrapped step
    root = Path(tempfile.mkdtemp(prefix="bf16-masters-"))
    full = Run(a.config, a.overrides, "float32", root)
    same = {"rollouts": full.rollouts, "reference": full.grads}
    for name, errors in pass_errors(a.config, a.overrides, root, full.rollouts).items():
        single = ", ".join(f"{100 * e:.2f}" for e in errors[:-1])
        print(f"one pass in {name}: gradient error {single} % (each completion alone), {100 * errors[-1]:.2f} % "
              "(the step's batch, ±1 weights)", flush=True)  # fmt: skip
    norm = sum(float(d.pow(2).sum()) for d in full.delta) ** 0.5

    def report(name: str, run: Run) -> None:
        diff = sum(float((d - f).pow(2).sum()) for d, f in zip(run.delta, full.delta, strict=True)) ** 0.5 / norm
        length = sum(float(d.pow(2).sum()) for d in run.delta) ** 0.5 / norm
        print(f"{name:<28} gradient error {100 * sum(run.relative) / len(run.relative):6.3f} %   update differs by "
              f"{100 * diff:5.2f} %   length ratio {length:.4f}", flush=True)  # fmt: skip

    mixed = Run(a.config, a.overrides, "bfloat16", root, **same)
    report("bf16 compute, fp32 masters", mixed)
    if a.fp16:
        with fp16_compute():
            report("fp16 compute, fp32 masters", Run(a.config, a.overrides, "float32", root, **same))
    gen = torch.Generator().manual_seed(a.seed)
    for scale in a.scales:
        noise = [[e * scale for e in step] for step in mixed.errors]
        report(f"fp32 + {scale:g}x bf16-size noise", Run(a.config, a.overrides, "float32", root, **same, noise=noise,
                                                         gen=gen))  # fmt: skip


if __name__ == "__main__":
    main()
