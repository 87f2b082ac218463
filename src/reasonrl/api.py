"""The Python API: `reasonrl.train(...)`, what a TRL user writes in a dozen lines (docs/api.md).

    import reasonrl

    def brevity(completions, **kwargs):
        return [-len(c) / 100 for c in completions]

    result = reasonrl.train(
        model="path/to/model",                       # or a transformers model object (+ tokenizer=...)
        train_dataset=[{"prompt": "2+2?", "answer": "4"}, ...],   # or a datasets.Dataset
        reward_funcs=["math_answer", brevity],       # built-in names, "module:function" paths or callables
        config={"algorithm.advantage": "lampo", "train.steps": 50},
    )
    result.run_dir, result.metrics["eval/accuracy"]

It builds the same `Config` and `Trainer` the CLI does and runs `Trainer.train()`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reasonrl.config import Config, load_config
from reasonrl.data.problems import problems_from_rows
from reasonrl.errors import UserError
from reasonrl.rewards.stage import reward_name
from reasonrl.training.run import new_run_dir
from reasonrl.training.trainer import Trainer


@dataclass
class Result:
    run_dir: Path
    metrics: dict[str, float]  # the final evaluation (`eval/...`) and the run's totals
    summary: dict[str, Any]  # everything `Trainer.train()` returned (eval before and after, steps, what stopped it)


def train(
    model: Any = "tiny",
    train_dataset: Any = None,
    reward_funcs: list[Any] | None = None,
    config: dict[str, Any] | Config | None = None,
    eval_dataset: Any = None,
    *,
    tokenizer: Any = None,
    run_dir: str | Path | None = None,
    callbacks: Sequence[Callable[[int, dict[str, float]], None]] = (),
) -> Result:
    """Train a policy and return where the run went and its final metrics.

    - `model`: a path or hub name (`model.name`), `"tiny"` (the embedded demo's model), or a transformers model
      object, with `tokenizer` (or loadable from the model's own directory).
    - `train_dataset` / `eval_dataset`: lists of dicts or `datasets.Dataset`s with `prompt` and `answer` columns
      (and optionally `id`, `reference`; other names through `data.columns`). Without `train_dataset`, the data
      come from `data.source` (the embedded task by default). Without `eval_dataset`, evaluation uses the
      training problems and says so in a warning.
    - `reward_funcs`: built-in names (`math_answer`, `format`, `rouge_l`), `"module:function"` paths, or callables;
      each is called with keyword arguments as TRL calls reward functions. Default: `rewards.functions`.
    - `config`: a `Config`, or a dict of overrides, dotted (`{"train.steps": 50}`) or nested (`{"train": {...}}`).
    - `run_dir`: where the run goes (default: `train.output_dir` / `train.run_name` or a timestamped name).
    - `callbacks`: functions called as `fn(step, metrics)` with every record the run logs (steps and evaluations).
    """
    cfg = _config(config)
    updates: dict[str, Any] = {}
    callables: dict[str, Any] = {}
    if reward_funcs is not None:
        names = [reward_name(fn) for fn in reward_funcs]
        callables = {n: fn for n, fn in zip(names, reward_funcs, strict=True) if not isinstance(fn, str)}
        weights = cfg.rewards.weights if cfg.rewards.weights and len(cfg.rewards.weights) == len(names) else None
        updates["rewards"] = dataclasses.replace(cfg.rewards, functions=names, weights=weights)
    obj_model = None
    if isinstance(model, (str, Path)):
        updates["model"] = dataclasses.replace(cfg.model, name=str(model))
    else:
        obj_model = model
        updates["model"] = dataclasses.replace(cfg.model, name=getattr(model, "name_or_path", "") or "object")
    cfg = dataclasses.replace(cfg, **updates)
    problems = eval_problems = None
    if train_dataset is not None:
        columns = cfg.data.columns or None
        problems = problems_from_rows(train_dataset, label="train_dataset", columns=columns)
        # not the embedded task (its warm-start demonstrations and LANPO templates are for its own problems)
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, source="train_dataset"))
        if eval_dataset is not None:
            eval_problems = problems_from_rows(eval_dataset, label="eval_dataset", columns=columns)
        else:
            import warnings

            warnings.warn(
                "reasonrl.train: no eval_dataset, so 'eval/accuracy' is measured on the training problems",
                stacklevel=2,
            )
    elif eval_dataset is not None:
        raise UserError("eval_dataset without train_dataset: pass both, or neither (data.source and data.eval_source)")
    path = Path(run_dir) if run_dir is not None else new_run_dir(cfg)
    trainer = Trainer(
        cfg, path, model=obj_model, tokenizer=tokenizer, problems=problems, eval_problems=eval_problems,
        reward_funcs=callables or None, callbacks=callbacks,
    )  # fmt: skip
    summary = trainer.train()
    metrics = {**summary.get("eval_after", {}), "step": summary.get("step", 0)}
    return Result(run_dir=path, metrics=metrics, summary=summary)


def _config(config: dict[str, Any] | Config | None) -> Config:
    if isinstance(config, Config):
        return config
    if config is None:
        return load_config()
    if not isinstance(config, dict):
        raise UserError(f"config must be a reasonrl Config or a dict of overrides, got {type(config).__name__}")
    nested = {k: v for k, v in config.items() if "." not in k}
    overrides = [_override(k, v) for k, v in config.items() if "." in k]  # applied over the nested ones
    return load_config(None, overrides, base=nested)


def _override(key: str, value: Any) -> str:
    import json

    return f"{key}={json.dumps(value) if not isinstance(value, str) else value}"
