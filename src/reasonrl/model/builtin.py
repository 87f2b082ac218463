"""Registry of built-in policies that are not a path or hub name (kept free of heavy imports)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

# name -> builder(cfg, problems, device, console) -> (model, tokenizer, base path or None). The demo registers `tiny`
# (`reasonrl.demo`), so the core never imports it.
BUILTIN_MODELS: dict[str, Callable[..., tuple[Any, Any, Path | None]]] = {}


def register_model(name: str, builder: Callable[..., tuple[Any, Any, Path | None]]) -> None:
    BUILTIN_MODELS[name] = builder
