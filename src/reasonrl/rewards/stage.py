"""The reward stage: turn completions into scalar rewards, and the registry of reward functions.

Reward functions follow TRL's convention: they are called with keyword arguments ``prompts``, ``completions``,
``completion_ids`` and the dataset columns (``answer``, ``reference``, ``problem_id``) by name, and return one
``float | None`` per completion (``None``: no opinion on that one). ``async def`` functions are awaited."""

from __future__ import annotations

import asyncio
import importlib
import inspect
import math
import numbers
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from reasonrl.errors import UserError, did_you_mean
from reasonrl.rewards.math import MathAnswerReward, format_reward
from reasonrl.rewards.reasoning_gym import ReasoningGymReward
from reasonrl.rewards.rouge import RougeLReward

RewardFunc = Callable[..., list[float | None]]
"""``fn(*, prompts, completions, completion_ids, **columns) -> list[float | None]`` (one entry per completion),
called with keyword arguments; ``async def`` functions are awaited."""

RewardFactory = Callable[..., RewardFunc]
"""Built-in reward factory: ``factory(timeout_s=..., num_workers=...)`` returns a reward function, optionally with
``close()``. Factories (not plain functions) so that resources such as worker pools belong to whoever made them."""

REWARD_FUNCTIONS: dict[str, RewardFactory] = {}

#: the functions whose full score marks a completion correct (accuracy), the first one listed in this order;
#: `reasoning_gym` judges alone when `math_answer` is not used (both use reasoning-gym's scorer for its problems)
JUDGES = ("math_answer", "reasoning_gym")


# ----------------------------------------------------------------------------------------------- built-in rewards


def register_reward(name: str) -> Callable[[RewardFactory], RewardFactory]:
    """Register a reward factory under ``name``; called with ``timeout_s=`` and ``num_workers=`` keywords."""

    def deco(factory: RewardFactory) -> RewardFactory:
        old = REWARD_FUNCTIONS.get(name)
        if old is not None and (old.__module__, old.__qualname__) != (factory.__module__, factory.__qualname__):
            raise ValueError(f"reward function {name!r} is already registered")
        REWARD_FUNCTIONS[name] = factory
        return factory

    return deco


@register_reward("math_answer")
def _math_answer(**settings: Any) -> RewardFunc:
    return MathAnswerReward(**settings)


@register_reward("format")
def _format(**_: Any) -> RewardFunc:
    return format_reward


@register_reward("reasoning_gym")
def _reasoning_gym(**settings: Any) -> RewardFunc:
    return ReasoningGymReward(**settings)


@register_reward("rouge_l")
def _rouge_l(**settings: Any) -> RewardFunc:
    return RougeLReward(**settings)


# ----------------------------------------------------------------------------------------------- loading


def load_reward_function(name: str, *, timeout_s: float = 5.0, num_workers: int = 2, **settings: Any) -> RewardFunc:
    """A registered name, or a user function by import path ``package.module:function`` (or ``package.module.fn``).

    ``timeout_s``/``num_workers`` go to built-in factories (verifier settings). Errors are UserErrors because the
    name comes from the user's config.
    """
    if name in REWARD_FUNCTIONS:
        return REWARD_FUNCTIONS[name](timeout_s=timeout_s, num_workers=num_workers, **settings)
    if ":" in name:
        module_name, _, attr_path = name.partition(":")
    elif "." in name:
        module_name, _, attr_path = name.rpartition(".")
    else:
        known = ", ".join(sorted(REWARD_FUNCTIONS))
        raise UserError(
            f"unknown reward function '{name}'{did_you_mean(name, REWARD_FUNCTIONS)}; built-ins are "
            f"{known}, or give an import path 'package.module:function'"
        )
    if not module_name or not attr_path:
        raise UserError(f"reward function '{name}': expected an import path 'package.module:function'")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as e:  # any failure while importing user code is the user's to fix
        raise UserError(
            f"reward function '{name}': cannot import module '{module_name}' ({type(e).__name__}: {e})"
        ) from e
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as e:
            public = [a for a in dir(obj) if not a.startswith("_")]
            raise UserError(
                f"reward function '{name}': '{module_name}' has no attribute '{attr_path}'{did_you_mean(part, public)}"
            ) from e
    if not callable(obj):
        raise UserError(f"reward function '{name}': {attr_path} is a {type(obj).__name__}, not a function")
    return obj


# ----------------------------------------------------------------------------------------------- the stage


async def _awaited(awaitable: Any) -> Any:
    return await awaitable


def _call(name: str, fn: RewardFunc, kwargs: dict[str, Any], timeout_s: float) -> Any:
    """`fn(**kwargs)` (awaited when async) in a daemon thread, waited for at most `timeout_s`; `_TIMED_OUT` when it
    ran past it. A thread cannot be killed, so a call past its limit is abandoned, not stopped; training goes on."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            out = fn(**kwargs)
            box["out"] = asyncio.run(_awaited(out)) if inspect.isawaitable(out) else out
        except BaseException as e:  # noqa: BLE001 (user code; SystemExit included)
            box["error"] = e

    thread = threading.Thread(target=target, name=f"reward-{name}", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        return _TIMED_OUT
    if "error" in box:
        e = box["error"]
        if isinstance(e, UserError):
            raise e
        what = "called sys.exit" if isinstance(e, SystemExit) else f"raised {type(e).__name__}: {e}"
        raise UserError(f"reward function '{name}' {what}") from e
    return box["out"]


_TIMED_OUT = object()


@dataclass
class RewardOutput:
    """Rewards for one batch of completions."""

    total: list[float]  # weighted sum per completion (None entries skipped; all None -> 0.0)
    per_function: dict[str, list[float | None]]
    correct: list[bool] | None  # the judge's score >= 1.0 (JUDGES: math_answer, else reasoning_gym); None: no judge
    metrics: dict[str, float] = field(default_factory=dict)


def _check_output(name: str, out: Any, n: int) -> list[float | None]:
    """Validate a reward function's return value; NaN counts as None (TRL stores skipped rewards as NaN)."""
    if hasattr(out, "tolist") and not isinstance(out, (list, tuple)):
        out = out.tolist()  # numpy arrays / tensors
    if not isinstance(out, (list, tuple)):
        raise UserError(f"reward function '{name}' returned {type(out).__name__}, expected a list of floats")
    if len(out) != n:
        raise UserError(f"reward function '{name}' returned {len(out)} values for {n} completions")
    values: list[float | None] = []
    for i, v in enumerate(out):
        if v is None:
            values.append(None)
            continue
        if not isinstance(v, numbers.Real):
            raise UserError(
                f"reward function '{name}' returned a non-number at index {i}: {type(v).__name__} {v!r:.60}"
            )
        f = float(v)
        if math.isinf(f):
            raise UserError(f"reward function '{name}' returned {f} at index {i}")
        values.append(None if math.isnan(f) else f)
    return values


def _checked_weights(names: list[str], weights: list[float] | None) -> list[float]:
    """One finite weight per distinct function name (all 1.0 when None), else a UserError."""
    if not names:
        raise UserError("rewards: at least one reward function is needed")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise UserError(f"rewards: function listed twice: {', '.join(dupes)}")
    weights = [1.0] * len(names) if weights is None else list(weights)
    if len(weights) != len(names):
        raise UserError(
            f"rewards: {len(names)} functions but {len(weights)} weights (rewards.weights); give one weight each"
        )
    for n, w in zip(names, weights, strict=True):
        if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w):
            raise UserError(f"rewards: weight of '{n}' must be a finite number, got {w!r}")
    return weights


class Rewards:
    """The reward stage: several reward functions combined with weights.

    Owns the functions it loads (and so the math verifier's workers): call ``close()`` or use ``with``.
    """

    def __init__(
        self,
        names: list[str],
        weights: list[float] | None = None,
        *,
        timeout_s: float = 5.0,
        num_workers: int = 2,
        settings: dict[str, dict[str, Any]] | None = None,
        callables: dict[str, RewardFunc] | None = None,
        function_timeout_s: float = 60.0,
        completion_format: str = "auto",
    ) -> None:
        """``settings``: extra keyword arguments for built-in factories by name (e.g. ``rouge_l``'s ``tokenize``);
        ``callables``: functions given as objects (the Python API), used for their names instead of loading them;
        ``function_timeout_s``: the limit of one call of a function on a batch (`rewards.function_timeout_s`);
        ``completion_format``: `messages` gives functions that are not built in TRL's conversational form, `auto`
        does so when the call has conversational prompts, `text` never."""
        self.function_timeout_s = function_timeout_s
        self._warned: set[str] = set()
        self.completion_format = completion_format
        names = list(names)
        weights = _checked_weights(names, weights)
        self.names = names
        self.weights = [float(w) for w in weights]
        self.functions: dict[str, RewardFunc] = {}
        try:
            for n in names:
                if callables and n in callables:
                    self.functions[n] = callables[n]
                    continue
                extra = (settings or {}).get(n, {})
                self.functions[n] = load_reward_function(n, timeout_s=timeout_s, num_workers=num_workers, **extra)
        except BaseException:
            self.close()
            raise

    def __call__(
        self,
        prompts: list[str],
        completions: list[str],
        columns: dict[str, list],
        completion_ids: list[list[int]] | None = None,
        conversations: list[list[dict[str, str]]] | None = None,
    ) -> RewardOutput:
        """Every function called with keyword arguments, in TRL's convention: ``prompts``, ``completions``,
        ``completion_ids`` (when known) and every column by name. An ``async def`` function is awaited.
        ``conversations``: the prompts as messages, when the dataset's prompts are conversational."""
        n = len(completions)
        if len(prompts) != n:
            raise ValueError(f"rewards: {len(prompts)} prompts but {n} completions")
        for key, col in columns.items():
            if len(col) != n:
                raise ValueError(f"rewards: column '{key}' has {len(col)} rows for {n} completions")
        per_function: dict[str, list[float | None]] = {}
        kwargs: dict[str, Any] = {"prompts": list(prompts), "completions": list(completions), **columns}
        if completion_ids is not None:
            kwargs["completion_ids"] = completion_ids
        as_messages = kwargs
        chat = self.completion_format == "messages" or (self.completion_format == "auto" and conversations is not None)
        if chat:  # TRL's conversational form, built only when used
            as_messages = {
                **kwargs,
                "prompts": conversations or [[{"role": "user", "content": p}] for p in prompts],
                "completions": [[{"role": "assistant", "content": c}] for c in completions],
            }
        timed_out: list[str] = []
        for name, fn in self.functions.items():
            messages = chat and name not in REWARD_FUNCTIONS
            out = _call(name, fn, as_messages if messages else kwargs, self.function_timeout_s)
            if out is _TIMED_OUT:
                warnings.warn(
                    f"reward function '{name}' took longer than rewards.function_timeout_s={self.function_timeout_s:g} "
                    f"s on a batch of {n}; its rewards for that batch are skipped",
                    stacklevel=2,
                )
                timed_out.append(name)
                out = [None] * n
            per_function[name] = _check_output(name, out, n)
            if n and name not in timed_out and all(v is None for v in per_function[name]):
                self._warn_no_values(name, n)

        total: list[float] = []
        skipped = 0
        for i in range(n):
            vals = [(w, per_function[f][i]) for f, w in zip(self.names, self.weights, strict=True)]
            parts = [w * v for w, v in vals if v is not None]
            skipped += not parts
            total.append(float(sum(parts)))

        metrics: dict[str, float] = {}
        # share: this function's part of the total reward mass Σ|w·v|, e.g. how much of R the dense reward is
        mass = {
            f: sum(abs(w * v) for v in per_function[f] if v is not None)
            for f, w in zip(self.names, self.weights, strict=True)
        }
        all_mass = sum(mass.values())
        for name, vals in per_function.items():
            present = [v for v in vals if v is not None]
            if present:
                mean = sum(present) / len(present)
                metrics[f"reward/{name}/mean"] = mean
                metrics[f"reward/{name}/std"] = math.sqrt(sum((v - mean) ** 2 for v in present) / len(present))
            metrics[f"reward/{name}/share"] = mass[name] / all_mass if all_mass > 0 else 0.0
            metrics[f"reward/{name}/missing"] = float(len(vals) - len(present))  # None or NaN: no opinion
        statuses = [r.status for fn in self.functions.values() for r in getattr(fn, "last_results", [])]
        metrics["reward/verify_timeouts"] = float(statuses.count("timeout"))
        metrics["reward/unparsable"] = float(statuses.count("unparsable"))
        metrics["reward/verify_errors"] = float(statuses.count("error"))
        metrics["reward/skipped"] = float(skipped)
        metrics["reward/function_timeouts"] = float(len(timed_out))

        correct = None
        judge = next((f for f in JUDGES if f in per_function), None)
        if judge is not None:
            correct = [v is not None and v >= 1.0 for v in per_function[judge]]
        return RewardOutput(total=total, per_function=per_function, correct=correct, metrics=metrics)

    def _warn_no_values(self, name: str, n: int) -> None:
        """A function with no opinion on a whole batch is most likely broken (a wrong column, an exception it
        swallows): said once per function, then counted in `reward/<name>/missing`."""
        if name in self._warned:
            return
        self._warned.add(name)
        warnings.warn(
            f"reward function '{name}' returned None or NaN for all {n} completions of a batch, so it adds nothing "
            f"to their rewards (counted in metrics as reward/{name}/missing; warned once)",
            stacklevel=3,
        )

    def close(self) -> None:
        """Stop worker processes owned by the functions (the math verifier's pool)."""
        for fn in getattr(self, "functions", {}).values():
            close = getattr(fn, "close", None)
            if callable(close):
                close()

    def __enter__(self) -> Rewards:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def reward_spec(cfg: Any) -> tuple[list[str], list[float] | None]:
    """(functions, weights) of `rewards.*`; LamPO adds the dense ROUGE-L reward with weight λ_sem (SPEC §4):
    R_i = r_verify(o_i) + λ_sem · ROUGE-L-F1(o_i, reference). Listing `rouge_l` yourself as well is refused, since
    one of the two weights would be silently ignored."""
    names, weights = list(cfg.rewards.functions), cfg.rewards.weights
    lam = cfg.algorithm.lampo
    if cfg.algorithm.advantage == "lampo" and lam.lambda_sem > 0:
        if "rouge_l" in names:
            raise UserError(
                "rewards.functions lists rouge_l and algorithm.lampo.lambda_sem adds it too; set "
                "algorithm.lampo.lambda_sem=0 to weigh rouge_l with rewards.weights, or drop it from rewards.functions"
            )
        weights = [*(weights or [1.0] * len(names)), lam.lambda_sem]
        names.append("rouge_l")
    return names, weights


def reward_name(fn: Any) -> str:
    """The name a reward function object is recorded under in `rewards.functions`: its import path
    ``module:qualname`` (so a saved config names it), or its bare name when it has no importable path."""
    if isinstance(fn, str):
        return fn
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
    if module and qualname and "<" not in qualname and module != "__main__":
        return f"{module}:{qualname}"
    return getattr(fn, "__name__", type(fn).__name__)


def check_rewards(cfg: Any, callables: dict[str, RewardFunc] | None = None) -> None:
    """The `rewards.*` errors a run can have, found before any model work: names, weights, and that every user
    function imports (importing is all: built-in factories, which may start worker processes, are not called)."""
    names, weights = reward_spec(cfg)
    _checked_weights(names, weights)
    for n in names:
        if n not in REWARD_FUNCTIONS and not (callables and n in callables):
            load_reward_function(n)


def build_rewards(cfg: Any, tokenizer: Any, callables: dict[str, RewardFunc] | None = None) -> Rewards:
    names, weights = reward_spec(cfg)
    lam = cfg.algorithm.lampo
    settings = {}
    if lam.rouge_tokens == "model":
        settings["rouge_l"] = {"tokenize": lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]}
    return Rewards(
        names,
        weights,
        timeout_s=cfg.rewards.timeout_s,
        num_workers=cfg.rewards.num_workers,
        settings=settings,
        callables=callables,
        function_timeout_s=cfg.rewards.function_timeout_s,
        completion_format=cfg.rewards.completion_format,
    )
