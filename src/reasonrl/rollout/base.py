"""The rollout engine protocol (SPEC §7) and the engine registry.

The trainer talks only to `RolloutEngine.generate`: every engine returns the same `Completion` records (token ids,
temperature-scaled unfiltered behaviour log-probs, truncation flag) and accepts `load_weights` after each optimiser
step. Engines register under the name `rollout.engine` selects:

- `hf`: `transformers.generate`, the reference (`rollout/hf.py`);
- `fast` (default): a hand-written KV-cached sampling loop for CPUs (`rollout/cpu/`), the same samples as `hf`
  for the same seed;
- `vllm`: vLLM, colocated, with its own copy of the weights (`rollout/vllm.py`; imported only when chosen).

An engine also has `sleep()` (free memory while the trainer updates; a no-op for most) and the class attribute
`shares_policy_weights` (True when it samples from the policy module itself, so that evaluation may start another
one on it at its own batch size; False when it holds its own copy, which evaluation then reuses).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch


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
    shares_policy_weights: bool

    def generate(self, prompts: list[list[int]], n: int, sampling: SamplingParams) -> list[Completion]:
        """n completions per prompt, prompt-major: completions of prompt i are [i*n, (i+1)*n)."""
        ...

    def load_weights(self, model: torch.nn.Module) -> None:
        """Called after every optimiser step; engines holding their own copy of the weights sync here."""
        ...

    def close(self) -> None:
        """Release what the engine holds beyond the policy (worker processes, servers)."""
        ...

    def sleep(self) -> None:
        """Free what the engine can while the trainer updates (vLLM's sleep mode on a GPU); `generate` and
        `load_weights` wake it."""
        ...


class _PolicyEngine:
    """An engine that samples from the policy module itself (no copy of its weights), `batch_size` sequences at a
    time (0: all at once); subclasses sample one chunk in `_generate_chunk`."""

    shares_policy_weights = True  # evaluation may start another one on the same module, with its own batch size

    def __init__(self, model: Any, tokenizer: Any, batch_size: int = 0) -> None:
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.eos_ids = _eos_ids(model, tokenizer)

    @classmethod
    def from_config(cls, model: Any, tokenizer: Any, rollout: Any) -> _PolicyEngine:
        """The engine for the config's `rollout` section."""
        return cls(model, tokenizer, batch_size=rollout.batch_size)

    def load_weights(self, model: torch.nn.Module) -> None:  # same module: nothing to copy
        self.model = model

    def close(self) -> None:
        pass

    def sleep(self) -> None:
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


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    ids = model.generation_config.eos_token_id if model.generation_config is not None else None
    ids = ids if isinstance(ids, list) else [ids] if ids is not None else []
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


ENGINES: dict[str, Callable[..., RolloutEngine]] = {}


def register_engine(name: str) -> Callable[[type], type]:
    """Register an engine class under `rollout.engine=name`. The trainer builds it with
    `cls.from_config(model, tokenizer, rollout_config)`; `make_engine` as `cls(model, tokenizer, **options)`."""

    def wrap(cls: type) -> type:
        ENGINES[name] = cls
        return cls

    return wrap


# engines whose module registers them when it is imported, which happens only once they are chosen (heavy imports)
LAZY_ENGINES = {"vllm": "reasonrl.rollout.vllm"}


def engine_class(name: str) -> Any:
    """The engine class registered as `name` (`rollout.engine`), importing its module first if it is a lazy one."""
    if name not in ENGINES and name in LAZY_ENGINES:
        import importlib

        importlib.import_module(LAZY_ENGINES[name])
    if name not in ENGINES:
        raise ValueError(
            f"unknown rollout engine {name!r}; choose one of {', '.join(sorted({*ENGINES, *LAZY_ENGINES}))}"
        )
    return ENGINES[name]


def make_engine(name: str, model: Any, tokenizer: Any, **options: Any) -> RolloutEngine:
    """The rollout engine called `name` (`rollout.engine`), with its options (`batch_size`, the fast engine's
    `workers`). The built-in engines register when `reasonrl.rollout` is imported."""
    return engine_class(name)(model, tokenizer, **options)
