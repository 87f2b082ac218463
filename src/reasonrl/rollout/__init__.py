"""Rollout engines (SPEC §7): one protocol, a registry, the `hf` reference and the CPU `fast` engine."""

from reasonrl.rollout import hf as _hf  # noqa: F401  (registers `hf`)
from reasonrl.rollout.base import (
    ENGINES,
    Completion,
    RolloutEngine,
    SamplingParams,
    engine_class,
    make_engine,
    register_engine,
)
from reasonrl.rollout.cpu import engine as _fast  # noqa: F401  (registers `fast`)

__all__ = ["ENGINES", "Completion", "RolloutEngine", "SamplingParams", "engine_class", "make_engine", "register_engine"]
