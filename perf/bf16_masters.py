"""How close bf16 compute over float32 master weights comes to a float32 run, against the floor that gradient
error of bf16's size sets under AdamW.

Runs 10 RL steps at lr 1e-6 (no evaluation) of a tiny random Qwen2 (the embedded demo's, 32 wide) from one
warm-start, or of a recipe's model (`--config`): float32, then on the same rollouts (the float32 run's, replayed)
`model.dtype=bfloat16` (`train.master_weights=fp32`) and float32 runs whose gradients get unbiased Gaussian noise,
each tensor's noise as large as bf16's gradient error in that step times `--scales`. Prints each run's gradient
error and the update's relative difference from float32, ‖Δ − Δfp32‖ / ‖Δfp32‖. (tests/test_options.py pins bf16 ≤
the 1× control on the tiny model.)

    python perf/bf16_masters.py
    python perf/bf16_masters.py --config recipes/smollm2-arithmetic.yaml rollout.prompts_per_step=2 \
        rollout.group_size=4 rollout.max_new_tokens=32
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import warnings
from pathlib import Path

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


def run(
    root: Path,
    config: str | None,
    overrides: list[str],
    dtype: str,
    *,
    rollouts: list | None = None,
    noise: list[torch.Tensor] | None = None,
) -> tuple[torch.Tensor, list, list, list]:
    """(the weights' change over the steps, each step's gradient as stepped, each step's rollouts, the parameters'
    sizes). `rollouts`: another run's, replayed instead of sampling (the prompts are checked to be the same)."""
    from reasonrl.config import load_config
    from reasonrl.training.trainer import Trainer

    out = Path(tempfile.mkdtemp(dir=root))
    base = TINY if config is None else []
    cfg = load_config(config, [*base, *COMMON, *overrides, f"model.dtype={dtype}", f"train.output_dir={out}",
                               f"warmstart.cache_dir={root / 'cache'}"])  # fmt: skip
    trainer = Trainer(cfg, out / "run", reward_funcs={"dense": dense})
    params = list(trainer.model.parameters())
    grads: list[torch.Tensor] = []
    sampled: list = []
    generate, step = trainer.generate, trainer.optimizer.step

    def sample_or_replay(rnd):
        if rollouts is None:
            generate(rnd)
        else:
            rnd.completions = copy.deepcopy(rollouts[len(sampled)])
            assert [c.prompt_ids for c in rnd.completions] == rnd.prompt_ids, "another run's prompts"
        sampled.append(copy.deepcopy(rnd.completions))

    def noisy_step(*args, **kwargs):
        if noise is not None:
            for p, part in zip(params, noise[len(grads)].split([p.numel() for p in params]), strict=True):
                p.grad += part.view_as(p.grad)
        grads.append(torch.cat([p.grad.float().flatten() for p in params]))
        return step(*args, **kwargs)

    trainer.generate, trainer.optimizer.step = sample_or_replay, noisy_step
    before = torch.cat([p.detach().float().flatten() for p in params])
    for _ in range(cfg.train.steps):
        trainer.step()
        trainer.global_step += 1
    trainer.close()
    delta = torch.cat([p.detach().float().flatten() for p in params]) - before
    return delta, grads, sampled, [p.numel() for p in params]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scales", type=float, nargs="+", default=[1.0, 0.5, 0.25, 0.1])
    ap.add_argument("--seed", type=int, default=0, help="the noise's")
    ap.add_argument("--config", help="a recipe instead of the tiny model (e.g. recipes/smollm2-arithmetic.yaml)")
    ap.add_argument("overrides", nargs="*", help="key=value on top")
    a = ap.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message="Seems like `optimizer.step")  # the wrapped step
    root = Path(tempfile.mkdtemp(prefix="bf16-masters-"))
    full, g32, rollouts, sizes = run(root, a.config, a.overrides, "float32")

    def report(name: str, delta: torch.Tensor, grads: list, *_: list) -> None:
        err = sum(float((g - h).norm() / h.norm()) for g, h in zip(grads, g32, strict=True)) / len(grads)
        diff, length = float((delta - full).norm() / full.norm()), float(delta.norm() / full.norm())
        print(f"{name:<28} gradient error {100 * err:6.3f} %   update differs by {100 * diff:5.2f} %   "
              f"length ratio {length:.4f}", flush=True)  # fmt: skip

    mixed, g16, *_ = bf16 = run(root, a.config, a.overrides, "bfloat16", rollouts=rollouts)
    report("bf16 compute, fp32 masters", *bf16)
    gen = torch.Generator().manual_seed(a.seed)
    for scale in a.scales:
        noise = []
        for h, g in zip(g32, g16, strict=True):
            parts = [torch.randn(n, generator=gen) for n in sizes]
            error = (g - h).split(sizes)
            noise.append(torch.cat([e / e.norm() * d.norm() * scale for e, d in zip(parts, error, strict=True)]))
        report(f"fp32 + {scale:g}x bf16-size noise", *run(root, a.config, a.overrides, "float32", rollouts=rollouts,
                                                          noise=noise))  # fmt: skip


if __name__ == "__main__":
    main()
