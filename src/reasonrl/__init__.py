"""reasonrl: reinforcement learning with verifiable rewards for language models (GRPO family, LamPO, LANPO).

The public surface, imported lazily so that `import reasonrl` (and `reasonrl --help`) stays instant:

- `train(model, train_dataset, reward_funcs, config, eval_dataset)`: a whole run in one call (`docs/api.md`);
- `Config`, `load_config`: the configuration (`docs/configuration.md`);
- `Trainer` (one `step()` per call), `run_training` (a whole run), `evaluate`;
- the registries: `register_advantage` (advantage estimators), `register_reward` (reward functions),
  `register_engine` (rollout engines), `register_source` (problem sources), `register_model` (built-in policies).
"""

from __future__ import annotations

import importlib
from typing import Any

from reasonrl import demo as _demo  # noqa: F401  (registers the embedded demo's task and model)

__version__ = "0.1.0"

_EXPORTS = {
    "train": "reasonrl.api",
    "Result": "reasonrl.api",
    "Config": "reasonrl.config",
    "load_config": "reasonrl.config",
    "Trainer": "reasonrl.training.trainer",
    "run_training": "reasonrl.training.run",
    "evaluate": "reasonrl.evaluate",
    "register_advantage": "reasonrl.algorithms",
    "compute_advantages": "reasonrl.algorithms",
    "register_reward": "reasonrl.rewards",
    "register_engine": "reasonrl.rollout",
    "register_source": "reasonrl.data.sources",
    "register_model": "reasonrl.model.builtin",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'reasonrl' has no attribute {name!r}")
