"""Typed run configuration: dataclasses, YAML loading, dotted command-line overrides, validation.

Every option has a default that reproduces the embedded demo, so `reasonrl train` with no arguments is a real run.
Choices that the papers leave open are `Literal` fields: the validator rejects anything else with the valid values.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from reasonrl.errors import UserError, did_you_mean


def _opt(default: Any, help: str, **bounds: float) -> Any:
    """A field with a help string and optional numeric bounds (ge, gt, le) checked by `validate`."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **bounds})
    return field(default=default, metadata={"help": help, **bounds})


@dataclass
class ModelConfig:
    name: str = _opt("tiny", "'tiny' (built-in, random init + warm-start) or a local path / hub name")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = _opt(
        "auto",
        "compute dtype; auto = float32 on CPU, bf16 on GPU. With train.master_weights=fp32 the parameters and AdamW "
        "state stay float32 and the loss passes autocast to this dtype",
    )
    device: str = _opt("auto", "auto | cpu | cuda | cuda:N")
    trust_remote_code: bool = _opt(False, "passed to from_pretrained")
    # Shape of the built-in tiny model (a Qwen2 config); ignored for pretrained models.
    hidden_size: int = _opt(128, "tiny model width", ge=8)
    num_layers: int = _opt(4, "tiny model depth", ge=1)
    num_heads: int = _opt(4, "tiny model attention heads", ge=1)
    intermediate_size: int = _opt(384, "tiny model MLP width", ge=8)


@dataclass
class DataConfig:
    source: str = _opt("arithmetic", "'arithmetic' (built-in) or a .jsonl/.parquet file or a datasets name")
    split: str = _opt("train", "split for datasets names")
    columns: dict[str, str] = _opt({}, "map Problem fields to dataset columns, e.g. {prompt: question}")
    limit: int | None = _opt(None, "use only the first N problems", ge=1)
    eval_source: str | None = _opt(None, "eval data; default: the built-in task's held-out set or data.source")
    eval_split: str = _opt("test", "split of eval_source for datasets names")
    system_prompt: str | None = _opt(None, "system message when the tokenizer has a chat template")


@dataclass
class TaskConfig:
    """The built-in synthetic task: multi-digit addition with a worked column-by-column scratchpad."""

    min_digits: int = _opt(2, "fewest digits per operand", ge=1)
    max_digits: int = _opt(3, "most digits per operand", ge=1)
    train_size: int = _opt(20000, "generated training problems", ge=1)
    eval_size: int = _opt(200, "held-out eval problems", ge=1)
    seed: int = _opt(1234, "seed of the generated problem sets")
    demo_error_rate: float = _opt(
        0.6,
        "warm-start demonstrations forget each carry with this probability (eval answers are always right)",
        ge=0,
        le=1,
    )


@dataclass
class WarmstartConfig:
    """Supervised warm-start of the tiny model on reference solutions; cached by its settings."""

    steps: int = _opt(400, "SFT optimiser steps (0 = no warm-start)", ge=0)
    batch_size: int = _opt(64, "SFT batch size", ge=1)
    lr: float = _opt(3e-3, "SFT learning rate", gt=0)
    micro_tokens: int = _opt(
        2048,
        "padded tokens per SFT forward/backward: a batch's rows sorted by length and cut into micro-batches of at "
        "most this many (the same gradient up to float rounding; 0 = the whole batch in one pass)",
        ge=0,
    )
    cache_dir: str | None = _opt(None, "default: $REASONRL_CACHE or ~/.cache/reasonrl")
    feedback_share: float = _opt(
        0.25,
        "built-in task: share of demonstrations in LANPO's reflection / lesson / abstraction formats (all algorithms "
        "share one warm-start)",
        ge=0,
        le=1,
    )


@dataclass
class VLLMConfig:
    """Options of `rollout.engine=vllm` (one colocated vLLM instance per training process; docs/vllm.md)."""

    gpu_memory_utilization: float = _opt(
        0.3, "GPU: share of the GPU's memory vLLM may take (weights + KV cache)", gt=0, le=1
    )
    kv_cache_gb: float = _opt(1.0, "CPU: KV cache size in GiB (VLLM_CPU_KVCACHE_SPACE)", gt=0)
    max_model_len: int = _opt(
        0, "longest prompt + completion vLLM accepts, in tokens (0 = the model's own limit)", ge=0
    )
    tensor_parallel_size: int = _opt(1, "GPUs one vLLM instance spans (1 in colocated mode on a CPU)", ge=1)
    enforce_eager: bool = _opt(True, "no CUDA graphs (faster start, slower decode); CPU builds need true")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = _opt(
        "auto", "vLLM's compute dtype; auto = the policy's dtype"
    )
    sleep: bool = _opt(False, "GPU: free vLLM's memory while the trainer updates (sleep mode); no effect on a CPU")


@dataclass
class RolloutConfig:
    engine: Literal["fast", "hf", "vllm"] = _opt(
        "fast",
        "generation backend: fast (KV-cached sampling loop, same samples as hf), hf (transformers.generate) or vllm",
    )
    group_size: int = _opt(8, "G: completions per prompt", ge=1)
    prompts_per_step: int = _opt(16, "prompts (groups) per training step", ge=1)
    max_new_tokens: int = _opt(64, "completion length limit", ge=1)
    temperature: float = _opt(1.0, "sampling temperature (also used to scale training log-probs)", gt=0)
    top_p: float = _opt(1.0, "nucleus sampling", gt=0, le=1)
    top_k: int = _opt(0, "top-k sampling (0 = off)", ge=0)
    batch_size: int = _opt(0, "max sequences per generate call (0 = all at once)", ge=0)
    workers: int = _opt(
        0,
        "fast engine on a CPU: processes sharing each generate call, one thread each (0 = one per torch thread, "
        "1 = off)",
        ge=0,
    )
    is_correction: Literal["auto", "none", "tis", "mask"] = _opt(
        "auto",
        "train-inference mismatch (SPEC §7): tis weighs each token's loss by min(π_old/π_behaviour, is_cap), mask "
        "drops tokens whose ratio is outside [1/is_cap, is_cap]; auto = tis for vllm, none for fast and hf",
    )
    is_cap: float = _opt(2.0, "C of is_correction: the weight cap (tis) or the ratio band (mask)", gt=1)
    vllm: VLLMConfig = field(default_factory=VLLMConfig)

    def __post_init__(self) -> None:
        if self.engine == "vllm" and (self.top_p < 1 or self.top_k > 0):
            raise UserError(
                "rollout.engine=vllm returns log-probs renormalised over the top-p / top-k tokens, not the behaviour "
                "policy's; set rollout.top_p=1 and rollout.top_k=0, or use rollout.engine=fast or hf"
            )
        if self.workers > 1 and self.engine != "fast":
            raise UserError(
                f"config 'rollout.workers={self.workers}' needs rollout.engine=fast (transformers.generate cannot "
                "split a batch between processes); set rollout.workers=1 or rollout.engine=fast"
            )


@dataclass
class RewardConfig:
    functions: list[str] = _opt(["math_answer", "format"], "built-in names or 'module:function'")
    weights: list[float] | None = _opt([1.0, 0.1], "one weight per function (default all 1.0)")
    timeout_s: float = _opt(5.0, "wall-clock limit per verified item; a timeout scores 0", gt=0)
    num_workers: int = _opt(2, "verifier worker processes", ge=1)


@dataclass
class LampoConfig:
    """SPEC §4 options of the LamPO pairwise advantage (used when algorithm.advantage=lampo)."""

    tau: float = _opt(1.0, "temperature of the confidence weight sigmoid", gt=0)
    weight: Literal["confidence", "preference", "lambdarank"] = _opt("confidence", "pair weight reading (SPEC §4)")
    normalize: Literal["weights", "pairs", "none"] = _opt("weights", "Z_i: sum of weights | G-1 | 1")
    score: Literal["mean", "sum"] = _opt("mean", "sequence score: mean or sum of behaviour token log-probs")
    lambda_sem: float = _opt(0.1, "λ_sem: weight of the dense ROUGE-L reward vs the reference (0 = off)", ge=0)
    rouge_tokens: Literal["words", "model"] = _opt("words", "ROUGE-L LCS over word tokens or the model's tokens")


LANPO_MODES = ("scratch", "reflect", "abstract")  # SPEC §5 context modes, in the order metrics and mixes list them


@dataclass
class LanpoConfig:
    """SPEC §5 options of LANPO: experience pool, feedback contexts, and how they enter the loss."""

    enabled: bool = _opt(False, "put pool feedback into some prompts of each group (composes with any advantage)")
    mix: dict[str, float] = _opt(
        {"scratch": 0.5, "reflect": 0.25, "abstract": 0.25}, "share of each context mode per group (largest remainder)"
    )
    gamma: float = _opt(0.9, "γ: least similarity in [0, 1] of another problem used for abstraction", ge=0, le=1)
    top_k: int = _opt(4, "most neighbour problems per abstraction", ge=1)
    retriever: Literal["lexical"] = _opt("lexical", "problem similarity: TF-IDF cosine over FTS5 candidates")
    trajectories_per_problem: int = _opt(2, "newest trajectories of each neighbour shown to the lesson writer", ge=1)
    max_context_tokens: int = _opt(256, "token budget of an attempt or a lesson in a prompt (head kept)", ge=1)
    lesson_max_tokens: int = _opt(64, "tokens the policy may write per lesson (greedy)", ge=1)
    context_in_loss: Literal["keep", "strip"] = _opt(
        "keep", "keep: loss on π(o|q,c); strip: π(o|q) with Guide-style ratio vs π_old(o|q,c)"
    )
    advantage_scope: Literal["group", "mode"] = _opt("group", "advantages over the whole group, or per mode")
    pool_max_per_problem: int = _opt(8, "pool keeps the newest N attempts per problem", ge=1)
    pool_max_size: int = _opt(1_000_000, "pool keeps at most N attempts (oldest steps evicted first)", ge=1)
    reflect_template: str | None = _opt(None, "fields {problem} {attempt}; None = the task's default")
    abstract_template: str | None = _opt(None, "fields {problem} {lessons}; None = the task's default")
    lesson_template: str | None = _opt(None, "fields {trajectories}; None = the task's default")
    trajectory_template: str | None = _opt(None, "fields {problem} {response} {reward}; None = the task's default")

    def __post_init__(self) -> None:
        for k, v in self.mix.items():
            if k not in LANPO_MODES:
                raise UserError(f"config 'algorithm.lanpo.mix' has unknown mode '{k}'{did_you_mean(k, LANPO_MODES)}")
            if not v >= 0:
                raise UserError(f"config 'algorithm.lanpo.mix.{k}' must be >= 0, got {v}")
        if sum(self.mix.values()) <= 0:
            raise UserError("config 'algorithm.lanpo.mix' needs a positive share for at least one mode")


@dataclass
class AlgorithmConfig:
    advantage: str = _opt("grpo", "advantage estimator from the registry: grpo | rloo | lampo")
    scale_rewards: Literal["group", "batch", "none"] = _opt("group", "GRPO std scaling; none = Dr.GRPO")
    adv_eps: float = _opt(1e-4, "added to the std in GRPO scaling", ge=0)
    eps_low: float = _opt(0.2, "lower clip range", ge=0)
    eps_high: float = _opt(0.2, "upper clip range (DAPO clip-higher: e.g. 0.28)", ge=0)
    ratio_level: Literal["token", "sequence"] = _opt("token", "importance ratio per token, or GSPO sequence")
    beta: float = _opt(0.0, "KL (k3) coefficient; 0 loads no reference model", ge=0)
    loss_agg: Literal["seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm"] = _opt(
        "seq-mean-token-mean", "loss aggregation: GRPO | DAPO | Dr.GRPO"
    )
    max_len_norm: int | None = _opt(None, "divisor of seq-mean-token-sum-norm (default rollout.max_new_tokens)", ge=1)
    num_iterations: int = _opt(1, "optimisation passes per batch (old log-probs kept)", ge=1)
    mask_truncated: bool = _opt(False, "drop completions that hit max_new_tokens from the loss")
    dynamic_sampling: bool = _opt(False, "DAPO: drop groups with equal rewards and sample more prompts")
    max_resample: int = _opt(4, "dynamic sampling: extra generation rounds per step at most", ge=0)
    lampo: LampoConfig = field(default_factory=LampoConfig)
    lanpo: LanpoConfig = field(default_factory=LanpoConfig)


@dataclass
class TrainConfig:
    steps: int = _opt(60, "RL steps", ge=0)
    max_seconds: float | None = _opt(
        None, "also stop once RL steps took this many seconds in all (sum of time/step; None = no limit)", gt=0
    )
    max_tokens: int | None = _opt(
        None,
        "also stop once this many completion tokens were generated (sum of tokens/sampled: every generated token)",
        ge=1,
    )
    lr: float = _opt(3e-5, "learning rate", gt=0)
    lr_schedule: Literal["constant", "linear", "cosine"] = _opt("constant", "after warmup")
    warmup_steps: int = _opt(0, "linear warmup steps", ge=0)
    weight_decay: float = _opt(0.0, "AdamW weight decay", ge=0)
    max_grad_norm: float = _opt(1.0, "gradient clipping (0 = off)", ge=0)
    micro_batch_size: int = _opt(0, "sequences per forward/backward (0 = whole batch)", ge=0)
    seed: int = _opt(0, "seed of sampling, data order and init")
    output_dir: str = _opt("runs", "parent directory of run directories")
    run_name: str | None = _opt(None, "default: <advantage>-<timestamp>")
    save_every: int = _opt(20, "checkpoint interval in steps (0 = only at the end)", ge=0)
    keep_checkpoints: int = _opt(2, "checkpoints kept on disk", ge=1)
    sample_every: int = _opt(20, "print sample completions every N steps (0 = never)", ge=0)
    eval_every: int = _opt(0, "eval interval in steps (0 = before and after training only)", ge=0)
    tensorboard: bool = _opt(True, "also log to TensorBoard")
    log_completions: bool = _opt(
        True, "write every sampled completion, its context mode and prompt to completions.jsonl"
    )
    # GPU path (docs/scale-out.md); the defaults are exact float32 on the CPU.
    master_weights: Literal["fp32", "model"] = _opt(
        "fp32",
        "fp32: trainable parameters and AdamW state in float32 whatever model.dtype (the loss passes autocast to "
        "model.dtype); model: parameters in model.dtype (bf16-only training: small updates round away)",
    )
    mixed_precision: Literal["none", "bf16", "fp16"] = _opt(
        "none", "autocast of the loss passes through accelerate (fp16 adds loss scaling); weights keep model.dtype"
    )
    logprob_chunk: int = _opt(
        0, "tokens per chunk of the memory-efficient log-prob kernel (no float32 copy of all logits); 0 = plain", ge=0
    )
    forward: Literal["auto", "generic", "shared_prefix"] = _opt(
        "auto",
        "log-prob pass of the loss: generic (the model's own forward) | shared_prefix (hand-written Llama/Qwen pass, "
        "each prompt once; CPU speed path) | auto (shared_prefix on a CPU for the families it is tested on, else "
        "generic)",
    )
    gradient_checkpointing: bool = _opt(False, "recompute activations in the backward pass (less memory, ~30% slower)")
    ref_offload: bool = _opt(False, "keep the reference model (beta > 0) on the CPU between its passes")


@dataclass
class LoraConfig:
    """LoRA / QLoRA adapters through peft: only the adapters train, checkpoints hold only them."""

    enabled: bool = _opt(False, "train LoRA adapters instead of all weights")
    r: int = _opt(16, "adapter rank", ge=1)
    alpha: float = _opt(32.0, "adapter scale numerator (scale = alpha / r)", gt=0)
    dropout: float = _opt(0.0, "dropout on the adapter input", ge=0, le=1)
    target_modules: list[str] = _opt(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], "module names that get adapters"
    )
    quantize: Literal["none", "4bit", "8bit"] = _opt(
        "none", "QLoRA: base weights quantised by bitsandbytes (CUDA only); none = full-precision base"
    )


@dataclass
class EvalConfig:
    num_problems: int = _opt(200, "eval problems (first N of the eval set)", ge=1)
    k: int = _opt(1, "samples per problem for mean@k / pass@k (1 = greedy only)", ge=1)
    temperature: float = _opt(1.0, "sampling temperature when k > 1", gt=0)
    batch_size: int = _opt(256, "sequences per generate call", ge=1)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    warmstart: WarmstartConfig = field(default_factory=WarmstartConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    rewards: RewardConfig = field(default_factory=RewardConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        """Every option, resolved, as YAML that `load_config` (and `reasonrl train --config`) reads back unchanged."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_yaml())


# --------------------------------------------------------------------------------------------------------------
# Loading, overriding, validating


def all_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every dotted key of the config tree, e.g. 'algorithm.eps_high'."""
    keys = []
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(hint):
            keys += all_keys(hint, f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


class _DuplicateKey(Exception):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping (plain YAML keeps the last one silently)."""

    def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise _DuplicateKey(f"key '{key}' is given twice (line {key_node.start_mark.line + 1}); keep one")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, base: dict[str, Any] | None = None
) -> Config:
    """Defaults, then `base` (e.g. a run's saved config), then the YAML file, then `key=value` overrides."""
    data: dict[str, Any] = copy.deepcopy(base) if base else {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"config file '{p}' not found")
        try:
            loaded = yaml.load(p.read_text(), Loader=_UniqueKeyLoader) or {}
        except _DuplicateKey as e:
            raise UserError(f"{p}: {e}") from None
        except yaml.YAMLError as e:
            raise UserError(f"{p}: invalid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(loaded, dict):
            raise UserError(f"{p}: expected a mapping of config sections at the top level")
        _deep_merge(data, loaded)
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UserError(f"override '{item}' is not of the form key=value (e.g. rollout.group_size=8)")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"override '{item}': '{part}' is not a section")
        node[parts[-1]] = value
    return build(Config, data, "")


def _deep_merge(into: dict[str, Any], new: dict[str, Any]) -> None:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict) and k != "columns":
            _deep_merge(into[k], v)
        else:
            into[k] = v


# TRL GRPOConfig field -> the reasonrl key (and value, where the meaning needs one) that does the same job
TRL_KEYS: dict[str, str] = {
    "num_generations": "rollout.group_size",
    "learning_rate": "train.lr",
    "max_completion_length": "rollout.max_new_tokens",
    "max_steps": "train.steps",
    "temperature": "rollout.temperature",
    "top_p": "rollout.top_p",
    "top_k": "rollout.top_k",
    "beta": "algorithm.beta",
    "epsilon": "algorithm.eps_low",
    "epsilon_high": "algorithm.eps_high",
    "loss_type": "algorithm.loss_agg",
    "scale_rewards": "algorithm.scale_rewards",
    "num_iterations": "algorithm.num_iterations",
    "importance_sampling_level": "algorithm.ratio_level",
    "mask_truncated_completions": "algorithm.mask_truncated",
    "reward_weights": "rewards.weights",
    "reward_funcs": "rewards.functions",
    "use_vllm": "rollout.engine=vllm",
    "vllm_gpu_memory_utilization": "rollout.vllm.gpu_memory_utilization",
    "vllm_tensor_parallel_size": "rollout.vllm.tensor_parallel_size",
    "per_device_train_batch_size": "train.micro_batch_size",
    "gradient_checkpointing": "train.gradient_checkpointing",
    "max_grad_norm": "train.max_grad_norm",
    "weight_decay": "train.weight_decay",
    "lr_scheduler_type": "train.lr_schedule",
    "warmup_steps": "train.warmup_steps",
    "bf16": "model.dtype=bfloat16",
    "seed": "train.seed",
    "output_dir": "train.output_dir",
    "run_name": "train.run_name",
    "save_steps": "train.save_every",
    "eval_steps": "train.eval_every",
    "report_to": "train.tensorboard",
}


def trl_markdown() -> str:
    """The "coming from TRL" table of docs/configuration.md (a test keeps the doc in sync)."""
    rows = [f"| `{field}` | `{key}` |" for field, key in TRL_KEYS.items()]
    return "\n".join(["| TRL `GRPOConfig` | reasonrl |", "| --- | --- |", *rows]) + "\n"


def _suggestion(key: str) -> str:
    """' (did you mean ...)' for an unknown key: the reasonrl key of a TRL GRPOConfig field (also under any section,
    e.g. `train.learning_rate`), else the closest key by spelling."""
    trl = TRL_KEYS.get(key.rsplit(".", 1)[-1])
    if trl is not None:
        return f" (did you mean '{trl}'? '{key.rsplit('.', 1)[-1]}' is TRL's GRPOConfig name)"
    return did_you_mean(key, all_keys())


def build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    """Construct dataclass `cls` from a nested dict, checking keys, types and bounds."""
    if not isinstance(data, dict):
        raise UserError(f"config '{prefix.rstrip('.')}' must be a section (mapping), got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise UserError(f"unknown config key '{full}'{_suggestion(full)}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = build(hint, value if value is not None else {}, f"{full}.")
        else:
            kwargs[key] = _coerce(value, hint, full)
            _check_bounds(kwargs[key], names[key].metadata, full)
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is Literal:
        if value not in args:
            raise UserError(
                f"config '{key}' must be one of {', '.join(map(str, args))}; got {value!r}"
                f"{did_you_mean(str(value), map(str, args))}"
            )
        return value
    if origin is list:
        items = value if isinstance(value, list) else [value]
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(items)]
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"config '{key}' must be a mapping, got {value!r}")
        return {str(k): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        number: float | None = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads '1e-4' (no dot) as a string
            with contextlib.suppress(ValueError):
                number = float(value)
        if number is not None:
            if not math.isfinite(number):  # NaN passes every bound check (nan < x is False): refuse it here
                raise UserError(f"config '{key}' must be a finite number, got {value!r}")
            return number
    elif hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    else:  # pragma: no cover - a new field type needs a branch here
        raise TypeError(f"unsupported config type {hint} for {key}")
    raise UserError(f"config '{key}' must be {hint.__name__}, got {value!r}")


def _check_bounds(value: Any, meta: typing.Mapping[str, Any], key: str) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    if "ge" in meta and value < meta["ge"]:
        raise UserError(f"config '{key}' must be >= {meta['ge']}, got {value}")
    if "gt" in meta and value <= meta["gt"]:
        raise UserError(f"config '{key}' must be > {meta['gt']}, got {value}")
    if "le" in meta and value > meta["le"]:
        raise UserError(f"config '{key}' must be <= {meta['le']}, got {value}")


def config_diff(a: Config, b: Config) -> list[str]:
    """Dotted keys whose values differ (used to enforce the same config on resume)."""
    fa, fb = _flatten(a.to_dict()), _flatten(b.to_dict())
    return [k for k in fa if fa[k] != fb.get(k)]


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and f"{prefix}{k}" != "data.columns":
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def describe(key: str) -> tuple[Any, str]:
    """(default, help) of a dotted key."""
    *path, name = key.split(".")
    cls: Any = Config
    for part in path:
        cls = typing.get_type_hints(cls)[part]
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    return getattr(cls(), name), f.metadata.get("help", "")


def reference_markdown() -> str:
    """The option table of docs/configuration.md, generated from the dataclasses (a test keeps the doc in sync)."""
    lines = ["| key | default | meaning |", "| --- | --- | --- |"]
    for key in all_keys():
        default, help_text = describe(key)
        cell = help_text.replace("|", "\\|")  # a bare | would end the table cell
        lines.append(f"| `{key}` | `{default!r}` | {cell} |")
    return "\n".join(lines) + "\n"
