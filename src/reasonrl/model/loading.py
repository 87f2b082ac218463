"""Policy loading: any Hugging Face causal LM by path or hub name, or a registered built-in model (`tiny`)."""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from reasonrl.config import Config, LoraConfig, ModelConfig
from reasonrl.errors import UserError
from reasonrl.model.builtin import BUILTIN_MODELS
from reasonrl.model.packaged import resolve_model_path


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"model.device '{name}' is not a device (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"model.device is '{name}' but no CUDA GPU is available; use model.device=cpu")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def _load_tokenizer(path: str, trust_remote_code: bool) -> Any:
    """AutoTokenizer, except for a plain `tokenizers` tokenizer saved with the model (reasonrl's character tokenizer):
    transformers maps some model types (e.g. qwen2) to their own tokenizer class, which would ignore the saved
    pre-tokenizer and drop spaces and newlines, so such a directory is loaded as the fast tokenizer it is."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    config = Path(path) / "tokenizer_config.json"
    if config.is_file() and json.loads(config.read_text()).get("tokenizer_class") == "TokenizersBackend":
        return PreTrainedTokenizerFast.from_pretrained(path)
    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)


def load_pretrained(
    path: str, cfg: ModelConfig, device: torch.device, dtype: torch.dtype, quantization: Any = None
) -> tuple[Any, Any]:
    """(model, tokenizer) from a local directory or hub name; errors become one-line user errors. A directory of
    LoRA adapters (a LoRA run's `model/` or checkpoint) loads its base model with the adapters merged in; a
    packaged model's name or a `gguf:` path loads its cached conversion (`model.packaged`).
    `quantization`: bitsandbytes settings (QLoRA), under which the weights are placed on `device` while loading."""
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(path)
    if Path(path).is_dir() and not any((Path(path) / f).is_file() for f in ("config.json", "adapter_config.json")):
        raise UserError(
            f"'{path}' is not a model directory (no config.json): give a run directory, a saved model's directory "
            "or a hub name"
        )
    if (Path(path) / "adapter_config.json").is_file():
        model, tokenizer = merged_lora_model(path, cfg, dtype)
        return model.to(device), tokenizer
    options = {} if quantization is None else {"quantization_config": quantization, "device_map": {"": device}}
    if cfg.attn_implementation is not None:
        options["attn_implementation"] = cfg.attn_implementation
    try:
        tokenizer = _load_tokenizer(path, cfg.trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, trust_remote_code=cfg.trust_remote_code, **options
        )
    except OSError as e:
        where = "local directory" if Path(path).exists() else "model name (offline? pass a local directory)"
        raise UserError(f"cannot load model '{path}' as a {where}: {str(e).splitlines()[0]}") from None
    except ValueError as e:  # e.g. an attention implementation the model or this install does not support
        if cfg.attn_implementation is None:
            raise
        raise UserError(f"model.attn_implementation={cfg.attn_implementation}: {str(e).splitlines()[0]}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return (model if quantization is not None else model.to(device)), tokenizer


def apply_lora(model: Any, lora: LoraConfig, base_path: str) -> Any:
    """Wrap `model` in peft LoRA adapters (only they train); `base_path` is recorded so the adapters can be merged
    back into their base later (`reasonrl export`)."""
    try:
        import peft
    except ImportError:
        raise UserError("lora.enabled needs peft: pip install 'reasonrl[lora]'") from None

    config = peft.LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_path,
    )
    try:
        with _quiet_peft():
            return peft.get_peft_model(model, config)
    except ValueError as e:  # e.g. no module matches target_modules
        raise UserError(f"lora: {str(e).splitlines()[0]} (set lora.target_modules)") from None


@contextmanager
def _quiet_peft() -> Iterator[None]:
    """peft reads transformers' deprecated `is_gradient_checkpointing` when it wraps a model: not the user's doing."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def quantization_config(lora: LoraConfig, device: torch.device) -> Any:
    """bitsandbytes settings of a QLoRA base model (`lora.quantize`), or None."""
    if not lora.enabled or lora.quantize == "none":
        return None
    if device.type != "cuda":
        raise UserError(f"lora.quantize={lora.quantize} (QLoRA) needs a CUDA GPU; use lora.quantize=none on {device}")
    from transformers import BitsAndBytesConfig

    if lora.quantize == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_use_double_quant=True,
    )


def merged_lora_model(adapter_dir: str | Path, cfg: ModelConfig, dtype: torch.dtype) -> tuple[Any, Any]:
    """(base model with the adapters of `adapter_dir` merged in, tokenizer): a plain transformers model."""
    import peft

    base = json.loads((Path(adapter_dir) / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base:
        raise UserError(f"{adapter_dir}: adapter_config.json names no base model (base_model_name_or_path)")
    model, tokenizer = load_pretrained(base, cfg, torch.device("cpu"), dtype)
    with _quiet_peft():
        model = peft.PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    return model, tokenizer


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def compute_dtype(cfg: Config, device: torch.device) -> torch.dtype:
    """The dtype the loss passes compute in: `model.dtype` (auto: bf16 on a GPU, float32 on a CPU)."""
    return resolve_dtype(cfg.model.dtype, device)


def parameter_dtype(cfg: Config, device: torch.device) -> torch.dtype:
    """The dtype the policy's weights are loaded in. `train.master_weights=fp32` (default): float32, so that AdamW
    updates the parameters and keeps its state in float32 (an RL step at lr 1e-6 is below bf16's resolution) while
    `model.dtype` is the compute dtype; under LoRA the frozen base stays in `model.dtype` and peft keeps the
    adapters in float32. `model`: `model.dtype` itself."""
    if cfg.train.master_weights == "fp32" and not cfg.lora.enabled:
        return torch.float32
    return compute_dtype(cfg, device)


def adopt_policy(model: Any, tokenizer: Any, cfg: Config, device: torch.device | None = None) -> tuple[Any, Any, Any]:
    """(model, tokenizer, device) for a policy given as an object (the Python API): its tokenizer loaded from the
    model's own directory when not given, padded on the left; the parameters moved to `model.device` (or `device`)
    in the master-weights dtype (`parameter_dtype`)."""
    if tokenizer is None:
        path = getattr(getattr(model, "config", None), "_name_or_path", "") or getattr(model, "name_or_path", "")
        if not path:
            raise UserError("a model given as an object needs its tokenizer: pass tokenizer=...")
        tokenizer = _load_tokenizer(path, cfg.model.trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    device = device or resolve_device(cfg.model.device)
    if not cfg.lora.enabled:
        model = model.to(device=device, dtype=parameter_dtype(cfg, device))
    return model, tokenizer, device


def load_policy(
    cfg: Config, problems: list, console: Any = None, device: torch.device | None = None
) -> tuple[Any, Any, torch.device]:
    """(model, tokenizer, device) for training: the warm-started tiny model or a pretrained one, with LoRA adapters
    when `lora.enabled`. `device`: the process's device under a multi-process launch (default: `model.device`)."""
    device = device or resolve_device(cfg.model.device)
    dtype = parameter_dtype(cfg, device)
    if cfg.model.name not in BUILTIN_MODELS:
        model, tokenizer = _load_base(cfg, device, dtype)
        if cfg.lora.enabled:
            model = apply_lora(model, cfg.lora, cfg.model.name)
        return model, tokenizer, device
    model, tokenizer, path = BUILTIN_MODELS[cfg.model.name](cfg, problems, device, console)
    model = model.to(dtype)
    if cfg.lora.enabled:
        if path is None:
            raise UserError("lora with the tiny model needs its cached warm-start as the base: set warmstart.steps > 0")
        model = apply_lora(model, cfg.lora, str(path.resolve()))
    return model, tokenizer, device


def _load_base(cfg: Config, device: torch.device, dtype: torch.dtype) -> tuple[Any, Any]:
    """A pretrained policy; a QLoRA base is quantised while it loads and prepared for adapter training."""
    quant = quantization_config(cfg.lora, device)
    model, tokenizer = load_pretrained(cfg.model.name, cfg.model, device, dtype, quantization=quant)
    if quant is not None:
        import peft

        checkpointing = cfg.train.gradient_checkpointing
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing)
    return model, tokenizer
