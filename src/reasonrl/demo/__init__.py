"""The embedded demo: a multi-digit addition task, a ~1M-parameter character-level Qwen2, and its cached
supervised warm-start. Importing this package registers `data.source=arithmetic` and `model.name=tiny`; the
entry points (`import reasonrl`, the CLI) import it, the core never does."""

from __future__ import annotations

from typing import Any

from reasonrl.data.sources import register_source
from reasonrl.model.builtin import register_model


def _arithmetic(task: Any, split: str) -> list:
    from reasonrl.demo import arithmetic

    return arithmetic.load_task(task, split)


def _tiny(cfg: Any, problems: list, device: Any, console: Any = None) -> tuple[Any, Any, Any]:
    """The warm-started tiny model (`demo/warmstart.py`), printing the warm-start's progress to `console`."""
    from reasonrl.demo.warmstart import tiny_policy

    progress = None
    if console is not None:

        def progress(step: int, total: int, loss: float) -> None:
            if step == 1:
                console.print(f"warm-start: supervised training of the tiny model ({total} steps, cached after)")
            if step % max(1, total // 5) == 0 or step == total:
                console.print(f"  warm-start step {step}/{total}  loss {loss:.3f}")

    return tiny_policy(cfg, problems, device, progress)


register_source("arithmetic", _arithmetic)
register_model("tiny", _tiny)
