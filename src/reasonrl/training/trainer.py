"""The RL trainer: one step is one call per named stage over one `Batch`, in the SPEC's data-flow order:

    prompts → generate → score → filter → advantages → batching → logprobs → update → sync weights → record

Each stage is timed (`time/<stage>`); the stages add up to `time/step`. Everything a resumed run needs (weights,
optimiser, scheduler, RNG, data cursor, the LANPO pool) is in the checkpoint, so a killed run resumes exactly.

Under a multi-process launch (`distributed.py`) every process draws the same global batch, rolls out and scores its
own share of whole groups, and the update is data-parallel; the gathers live inside the stages. Process 0 alone
evaluates, logs, checkpoints and writes the LANPO pool, from records gathered from every process.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import sqlite3
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from reasonrl import algorithms
from reasonrl.config import Config, FSDPConfig
from reasonrl.data.problems import Problem, conversations, reward_columns
from reasonrl.data.prompts import PromptFormat, check_prompts, encode_prompt, prompt_ids
from reasonrl.data.sources import load_training_data
from reasonrl.data.stream import ProblemStream
from reasonrl.errors import UserError
from reasonrl.evaluate import evaluate
from reasonrl.lanpo.embedding import load_embedder
from reasonrl.lanpo.feedback import FeedbackBuilder, advantage_groups, scratch_plans, templates_for
from reasonrl.lanpo.pool import ExperiencePool, PoolEntry
from reasonrl.model.forward import resolve_forward
from reasonrl.model.loading import adopt_policy, compute_dtype, load_policy
from reasonrl.rewards.stage import build_rewards, check_rewards
from reasonrl.rollout import SamplingParams, engine_class
from reasonrl.training.batch import Batch, Round, make_micro_batches, strip_contexts
from reasonrl.training.checkpoint import (
    check_writable,
    checkpoint_problem,
    damaged_checkpoints,
    latest_checkpoint,
    load_checkpoint,
    pointer_fallback,
    rng_state,
    save_checkpoint,
)
from reasonrl.training.distributed import Processes, runs_on_cpu
from reasonrl.training.metrics import MetricsLogger, StageTimer, read_metrics, step_metrics
from reasonrl.training.trackers import open_trackers
from reasonrl.training.update import PolicyUpdate


class Trainer:
    """A training run: `step()` takes one step, `train()` the whole run (evaluate, step, log, checkpoint).

    Everything comes from `cfg` unless given as objects (the Python API, `reasonrl.training`): `model` and `tokenizer`
    (a transformers causal LM and its tokenizer), `problems` / `eval_problems` (lists of `Problem`), `reward_funcs`
    (name in `rewards.functions` -> callable)."""

    def __init__(
        self,
        cfg: Config,
        run_dir: Path,
        *,
        resume: bool = False,
        console: Any = None,
        model: Any = None,
        tokenizer: Any = None,
        problems: list[Problem] | None = None,
        eval_problems: list[Problem] | None = None,
        reward_funcs: dict[str, Any] | None = None,
        callbacks: Sequence[Callable[[int, dict[str, float]], None]] = (),
    ) -> None:
        self.cfg, self.run_dir, self.console, self.resumed = cfg, run_dir, console, resume
        self.callbacks = list(callbacks)  # fn(step, metrics) for every logged record, on process 0
        a, t = cfg.algorithm, cfg.train
        try:  # fail fast on a typo, before any model work (as the reward and output checks below)
            self.advantage_options = algorithms.advantage_options(a.advantage, a)
        except ValueError as e:
            raise UserError(str(e)) from None
        _check_sharding(cfg)
        check_rewards(cfg, reward_funcs)
        if not resume:
            check_writable(run_dir)
        self.procs = procs = Processes(mixed_precision(cfg), cpu=runs_on_cpu(cfg.model.device), sharding=t.sharding)
        if procs.world > 1 and cfg.model.device not in ("auto", "cpu", "cuda"):
            raise UserError(f"model.device={cfg.model.device} names one device; use auto under a multi-process launch")
        with procs.accelerator.main_process_first():  # process 0 builds (and caches) the warm-start, then the others
            if problems is None:
                self.problems, self.eval_problems = load_training_data(cfg)
            else:
                self.problems, self.eval_problems = problems, eval_problems or problems
            device = procs.device if procs.world > 1 else None
            if model is None:
                self.model, self.tokenizer, self.device = load_policy(cfg, self.problems, console, device)
            else:
                self.model, self.tokenizer, self.device = adopt_policy(model, tokenizer, cfg, device)
        self.prompt_format = PromptFormat.from_config(cfg.data)
        self._check_prompts()
        if t.gradient_checkpointing:
            _enable_activation_checkpointing(self.model)
        self.rewards = build_rewards(cfg, self.tokenizer, reward_funcs)
        if cfg.rollout.engine == "vllm" and procs.world > 1 and runs_on_cpu(cfg.model.device):
            raise UserError("rollout.engine=vllm under a multi-process launch needs one GPU per process; on a CPU "
                            "train with one process (or rollout.engine=fast)")  # fmt: skip
        rollout = cfg.rollout if procs.world == 1 else dataclasses.replace(cfg.rollout, workers=1)  # processes
        if rollout.vllm.dtype == "auto":  # vLLM samples in the compute dtype, not in the float32 master weights'
            vllm_dtype = str(compute_dtype(cfg, self.device)).removeprefix("torch.")
            rollout = dataclasses.replace(rollout, vllm=dataclasses.replace(rollout.vllm, dtype=vllm_dtype))
        self.engine = engine_class(cfg.rollout.engine).from_config(self.model, self.tokenizer, rollout)  # share cores
        ref_model = None
        if a.beta > 0 and not cfg.lora.enabled:  # k3 KL against the policy before RL; LoRA: the adapter-free base
            ref_model = copy.deepcopy(self.model).eval().requires_grad_(False)
            if t.ref_offload:
                ref_model.to("cpu")
        # train.sharding=fsdp: the policy and the reference model sharded alike, before the optimiser exists
        precision = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision(cfg))
        procs.shard_model(self.model, precision, t.fsdp)
        if ref_model is not None:
            procs.shard_model(ref_model, precision, t.fsdp, trained=False)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        # the fused kernel (one per parameter instead of a dozen ops) where torch has it: same update to float rounding
        fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in trainable)
        optimizer = torch.optim.AdamW(
            trainable, lr=t.lr, betas=tuple(t.adam_betas), weight_decay=t.weight_decay, fused=fused or None
        )
        # the loss runs through accelerate's DDP wrapper with several processes, else the model itself; generation,
        # evaluation and checkpoints use the bare `model`, which shares its parameters
        train_model, optimizer = procs.prepare(self.model, optimizer)
        updates = max(1, t.steps * a.num_iterations)
        warmup = t.warmup_steps or math.ceil(t.warmup_ratio * updates)  # transformers' rule: steps win over the ratio
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(t.lr_schedule, warmup, updates))
        self.updater = PolicyUpdate(
            cfg, procs, self.model, train_model, optimizer, scheduler, ref_model, self.device,
            # the hand-written shared-prefix pass reads the weights directly, which sharded weights are not
            forward="generic" if procs.sharded else resolve_forward(t.forward, self.model),
            pad_id=self.tokenizer.pad_token_id,
        )  # fmt: skip
        self.optimizer, self.scheduler = optimizer, scheduler
        self.global_step = 0
        # budget counters (train.max_seconds / max_tokens): sums of time/step and tokens/sampled, checkpointed
        self.elapsed, self.tokens_total = 0.0, 0
        self.stream = ProblemStream(self.problems, t.seed)
        self.sampling = SamplingParams(
            cfg.rollout.max_new_tokens, cfg.rollout.temperature, cfg.rollout.top_p, cfg.rollout.top_k
        )
        if not resume and procs.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            cfg.save(run_dir / "config.yaml")
        ckpt = latest_checkpoint(run_dir) if resume else None
        if resume and ckpt is None:
            if damaged := damaged_checkpoints(run_dir):
                raise UserError(
                    f"{run_dir} has no complete checkpoint to resume from ({'; '.join(damaged)}): restore one, or "
                    "delete that directory and start anew"
                )
            raise UserError(
                f"{run_dir} has no complete checkpoint to resume from (it stopped before its first one; "
                f"train.save_every={t.save_every}): delete that directory, or start anew under another train.run_name"
            )
        if ckpt is not None and procs.is_main and (named := pointer_fallback(run_dir, ckpt)) is not None:
            why = checkpoint_problem(run_dir / "checkpoints" / named)
            warnings.warn(
                f"{run_dir}/checkpoints/latest names {named} ({why}); resuming from {ckpt.name}, the newest complete "
                "checkpoint",
                stacklevel=2,
            )
        # RL starts from the same RNG state whether or not the warm-start was cached; processes sample differently
        torch.manual_seed(t.seed + procs.rank)
        if ckpt is not None:
            state = load_checkpoint(ckpt, self.model, optimizer, scheduler, procs.rank, procs.world)
            if not math.isclose(scheduler.base_lrs[0], t.lr, rel_tol=1e-9):  # a checkpoint without run_config.yaml
                raise UserError(
                    f"train.lr={t.lr:g} in {run_dir}/config.yaml, but {ckpt.name} was trained at "
                    f"{scheduler.base_lrs[0]:g} and a resumed run keeps its schedule; restore "
                    f"train.lr={scheduler.base_lrs[0]:g}, or start a new run for another rate"
                )
            self.global_step, self.stream.cursor = state["step"], state["cursor"]
            self.elapsed, self.tokens_total = state.get("elapsed_seconds", 0.0), state.get("tokens_total", 0)
            self.engine.load_weights(self.model)  # an engine with its own copy (vLLM) samples from the resumed weights
        self.pool, self.feedback = None, None
        if a.lanpo.enabled:
            self.pool, self.feedback = self._open_pool(resume)
        self.logger = None
        if procs.is_main:
            trackers = open_trackers(t.report_to, run_dir, cfg.to_dict(), resume)
            self.logger = MetricsLogger(
                run_dir, tensorboard=t.tensorboard, resume_step=self.global_step if resume else None, trackers=trackers
            )
        self.timer = StageTimer()
        self.last_samples: list[tuple[str, str, float]] = []

    def _check_prompts(self) -> None:
        """Prompts too long for the model refused, unknown characters warned about: before any rollout."""
        d, positions = self.cfg.data, getattr(self.model.config, "max_position_embeddings", None)
        sets = [(self.problems, d.source)]
        if self.eval_problems is not self.problems:
            sets.append((self.eval_problems[: self.cfg.eval.num_problems], d.eval_source or d.source))
        for problems, label in sets:
            check_prompts(
                self.tokenizer,
                problems,
                self.prompt_format,
                max_new_tokens=self.cfg.rollout.max_new_tokens,
                max_positions=positions,
                label=label,
            )

    def _open_pool(self, resume: bool) -> tuple[ExperiencePool, FeedbackBuilder]:
        """The run's experience pool (SPEC §5), rolled back to the checkpoint's step on resume so nothing written
        after it (rollouts, evictions, lessons) survives a kill; and the prompt builder that reads it."""
        lanpo, procs = self.cfg.algorithm.lanpo, self.procs
        # every process embeds its own queries; the model is loaded before the pool, so a missing one fails first
        embedder = load_embedder(lanpo.embedding_model) if lanpo.retriever == "embedding" else None
        with procs.accelerator.main_process_first():  # process 0 owns the pool; the others only read it
            path = self.run_dir / "pool.sqlite"
            try:
                pool = ExperiencePool(
                    path,
                    max_per_problem=lanpo.pool_max_per_problem,
                    max_size=lanpo.pool_max_size,
                    read_only=not procs.is_main,
                    embedder=embedder,
                )
                if resume and procs.is_main:
                    pool.rollback(self.global_step)
                elif not resume and pool.stats()["size"] > 0:
                    raise UserError(f"{path} already has entries; start a new run directory")
            except sqlite3.DatabaseError as e:  # "file is not a database", "database disk image is malformed"
                raise UserError(
                    f"cannot read the experience pool {path} ({e}); restore it from a copy, or start a new run "
                    "(the pool cannot be rebuilt from the checkpoint)"
                ) from None
        tok = self.tokenizer

        def ids(text: str) -> list[int]:
            return tok(text, add_special_tokens=False)["input_ids"]

        def truncate(text: str, budget: int) -> str:
            t = ids(text)
            return text if len(t) <= budget else tok.decode(t[:budget], skip_special_tokens=True)

        builder = FeedbackBuilder(
            pool,
            lanpo,
            templates_for(lanpo, builtin_task=self.cfg.data.source == "arithmetic"),
            count_tokens=lambda text: len(ids(text)),
            truncate=truncate,
            write_lessons=self.write_lessons,
        )
        return pool, builder

    def write_lessons(self, prompts: list[str]) -> list[tuple[str, int]]:
        """LANPO abstraction: the current policy condenses trajectories into lessons, greedily, in one batch."""
        with self.timer.stage("abstraction"):
            ids = [prompt_ids(self.tokenizer, t, self.prompt_format) for t in prompts]
            sampling = SamplingParams(self.cfg.algorithm.lanpo.lesson_max_tokens, temperature=0.0)
            return [(c.text, len(c.token_ids)) for c in self.engine.generate(ids, 1, sampling)]

    # ---- one step ---------------------------------------------------------------------------------------------

    def step(self) -> dict[str, float]:
        """One training step; returns its metrics (SPEC §6)."""
        self.timer = timer = StageTimer()
        start = time.perf_counter()
        batch = Batch(step=self.global_step + 1, group_size=self.cfg.rollout.group_size)
        wanted = self.cfg.rollout.prompts_per_step
        with self.sampling_window():
            while batch.kept_groups < wanted:  # DAPO dynamic sampling repeats rounds until the batch is full
                with timer.stage("prompts"):
                    rnd = self.build_prompts(batch, wanted - batch.kept_groups)
                with timer.stage("generation"):
                    self.generate(rnd)
                with timer.stage("reward"):
                    self.score(rnd)
                self.filter(batch, rnd)
                a = self.cfg.algorithm
                if not a.dynamic_sampling or batch.rounds > a.max_resample:
                    break
        with timer.stage("sync"):
            self.engine.sleep()  # vLLM on a GPU frees its memory for the update (`rollout.vllm.sleep`)
        if batch.kept_groups:  # dynamic sampling may find no informative group (on any process): nothing to learn
            with timer.stage("advantages"):
                self.compute_advantages(batch)
            with timer.stage("batching"):
                self.make_micro_batches(batch)
            with timer.stage("logprobs"):
                batch.old_logp, batch.ref_logp = self.updater.reference_logprobs(batch.micro_batches)
            with timer.stage("update"):
                batch.update_metrics = self.updater.step(batch.micro_batches, batch.old_logp, batch.ref_logp)
            with timer.stage("sync"):
                self.sync_weights()
        self.record(batch)
        with timer.stage("logging"):
            metrics = self.metrics(batch)
        metrics.update(timer.metrics())
        metrics["time/step"] = step_time = self.procs.max(time.perf_counter() - start)  # the slowest process's
        if "tokens/generated" in metrics:
            metrics["tokens_per_s"] = metrics["tokens/generated"] / step_time
        return metrics

    # ---- the stages, in data-flow order -----------------------------------------------------------------------

    def build_prompts(self, batch: Batch, n: int) -> Round:
        """problems → prompts: this process's share of `n` problems from the stream, each with G prompt plans
        (LANPO: scratch / reflect / abstract from the pool, SPEC §5), tokenised with the chat template."""
        problems = self.procs.shard(self.stream.take(n))
        if self.feedback is None:
            plans = scratch_plans(problems, batch.group_size)
        else:
            plans, stats = self.feedback.build(problems, batch.group_size, batch.step)
            batch.feedback_stats.append(stats)
        rnd = Round(problems, plans)
        rnd.prompt_ids = self._prompt_ids([p.text for p in plans], [p.problem.history for p in plans], batch)
        return rnd

    def generate(self, rnd: Round) -> None:
        """rollout: one completion per plan. Without LANPO a group's prompts are identical, so the engine gets each
        once with n = G and can share it."""
        G = self.cfg.rollout.group_size
        if not rnd.problems:
            return
        if self.feedback is None:
            rnd.completions = self.engine.generate(rnd.prompt_ids[::G], G, self.sampling)
        else:
            rnd.completions = self.engine.generate(rnd.prompt_ids, 1, self.sampling)

    def score(self, rnd: Round) -> None:
        """rewards: every reward function over the round's completions, with the problems' columns."""
        if not rnd.problems:
            return
        G = self.cfg.rollout.group_size
        out = self.rewards(
            [p.prompt for p in rnd.problems for _ in range(G)],
            [c.text for c in rnd.completions],
            reward_columns(rnd.problems, G),
            completion_ids=[c.token_ids for c in rnd.completions],
            conversations=conversations(rnd.problems, G),
        )
        rnd.rewards, rnd.reward_metrics = out.total, out.metrics
        rnd.correct = out.correct or [False] * len(rnd.completions)

    def filter(self, batch: Batch, rnd: Round) -> None:
        """SPEC §3 DAPO dynamic sampling: keep the groups whose rewards differ (all of them when it is off); the
        first round's share of equal-reward groups is logged either way."""
        G = self.cfg.rollout.group_size
        informative = algorithms.informative_groups(rnd.rewards, G)  # a group of one is never informative
        if batch.zero_std_groups is None:
            equal = self.procs.gather([not x for x in informative])
            batch.zero_std_groups = sum(equal) / max(len(equal), 1)
        keep = informative if self.cfg.algorithm.dynamic_sampling else [True] * len(rnd.problems)
        batch.add(rnd, keep)
        batch.kept_groups += round(self.procs.sum(sum(keep)))

    def compute_advantages(self, batch: Batch) -> None:
        """Per-sequence advantages from the registry (SPEC §3–§4); LANPO may score each mode of a group on its own
        (`lanpo.advantage_scope=mode`)."""
        a, G = self.cfg.algorithm, batch.group_size
        group_ids = torch.arange(len(batch.problems)).repeat_interleave(G)
        if self.feedback is not None:
            group_ids = advantage_groups(group_ids, [p.mode for p in batch.plans], a.lanpo.advantage_scope)
        if batch.empty:  # this process's share is empty (several processes): the update still runs with the others
            batch.advantages = torch.zeros(0)
            return
        inputs = {}
        if "seq_scores" in algorithms.get_advantage(a.advantage).inputs:  # LamPO: from the rollout's log-probs
            inputs["seq_scores"] = algorithms.sequence_scores([c.logprobs for c in batch.completions], a.lampo.score)
        batch.advantages = algorithms.compute_advantages(
            a.advantage,
            torch.tensor(batch.rewards, dtype=torch.float64),
            group_ids,
            options=self.advantage_options,
            diagnostics=batch.diagnostics,
            **inputs,
        )

    def make_micro_batches(self, batch: Batch) -> None:
        """loss inputs: the truncation mask (SPEC §3), LANPO `strip` (SPEC §5: train π_θ(o|q) against the
        behaviour π_old(o|q,c)), and the micro-batches of `train.micro_batch_size` sequences."""
        a = self.cfg.algorithm
        completions, batch.guide = batch.completions, [False] * len(batch.completions)
        if self.feedback is not None and a.lanpo.context_in_loss == "strip":
            plain = self._prompt_ids([p.problem.prompt for p in batch.plans], [p.problem.history for p in batch.plans])
            completions, batch.guide = strip_contexts(completions, [p.mode for p in batch.plans], plain)
        batch.loss_mask = algorithms.truncation_mask([c.truncated for c in completions], a.mask_truncated)
        batch.micro_batches = make_micro_batches(
            completions, batch.advantages, batch.loss_mask, self.cfg.train.micro_batch_size,
            self.tokenizer.pad_token_id, self.device, batch.guide,
        )  # fmt: skip

    def sync_weights(self) -> None:
        """weight sync: engines that hold their own copy of the weights take the updated ones."""
        self.engine.load_weights(self.model)

    def record(self, batch: Batch) -> None:
        """pool write (LANPO: this step's lessons, then every scored rollout) and the completions log, each with
        the context it was sampled under. Process 0 writes both, for every process, in rank order."""
        procs = self.procs
        if self.pool is not None:
            with self.timer.stage("pool"):
                lessons = procs.gather(self.feedback.take_new_lessons())
                entries = procs.gather(
                    [
                        PoolEntry(
                            p.problem.id,
                            p.problem.statement,
                            c.text,
                            float(w),
                            batch.step,
                            p.mode,
                            len(c.prompt_ids),
                            len(c.token_ids),
                        )
                        for p, c, w in batch.scored
                    ]
                )
                if procs.is_main:
                    for key, text, step in lessons:
                        self.pool.put_lesson(key, text, step)
                    self.pool.add(entries)
                procs.barrier()  # the next step's reads see this step's writes on every process
        if self.cfg.train.log_completions:
            with self.timer.stage("logging"):
                records = procs.gather(
                    [
                        {
                            "problem_id": p.problem.id,
                            "mode": p.mode,
                            "prompt": p.text,
                            # what the model saw: the chat template, a conversation's earlier turns, specials
                            "templated_prompt": self.tokenizer.decode(c.prompt_ids),
                            "completion": c.text,
                            "reward": w,
                        }
                        for p, c, w in batch.scored
                    ]
                )
                if self.logger is not None:
                    self.logger.log_completions(batch.step, records)

    def metrics(self, batch: Batch) -> dict[str, float]:
        """The step's metrics over the whole global batch (SPEC §6), gathered from every process."""
        procs, G = self.procs, batch.group_size
        trained: list[tuple[int, bool, float]] = []  # (length, truncated, |advantage|) of every trained sequence
        if not batch.empty:  # then a group was kept, so the advantages stage ran
            trained = [
                (len(c.token_ids), c.truncated, abs(float(x)))
                for c, x in zip(batch.completions, batch.advantages, strict=True)
            ]
        self.last_samples = [
            (p.prompt, batch.completions[i * G].text, batch.rewards[i * G]) for i, p in enumerate(batch.problems[:3])
        ]
        out = step_metrics(
            procs,
            batch,
            trained=procs.gather(trained),
            rewards=procs.gather(batch.rewards),
            correct=procs.gather(batch.correct),
            modes=procs.gather([(p.mode, p.context_tokens) for p in batch.plans]) if self.feedback else None,
            feedback_stats=procs.gather(batch.feedback_stats) if self.feedback else None,
            reward_metrics=procs.gather([batch.reward_metrics]),
            diagnostics=_mean_over_processes(procs, batch.diagnostics, weight=len(batch.problems)),
            sampled_tokens=procs.sum(
                sum(len(c.token_ids) for _, c, _ in batch.scored) + sum(s.lesson_tokens for s in batch.feedback_stats)
            ),
            pool_size=float(self.pool.stats()["size"]) if self.pool is not None else None,
            lr=self.scheduler.get_last_lr()[0],
        )
        if self.prompt_format.max_length is not None:  # TRL's max_prompt_length: cut prompts, counted
            n = procs.sum_dict({"cut": float(batch.prompts_cut), "all": float(batch.prompts)})
            out["prompt/truncated"] = n["cut"] / max(n["all"], 1.0)
            if n["cut"]:
                warnings.warn(
                    f"prompts longer than data.max_prompt_length={self.prompt_format.max_length} lose their first "
                    "tokens (share per step: prompt/truncated)",
                    stacklevel=2,
                )
        return out

    def _prompt_ids(
        self,
        texts: list[str],
        histories: list[tuple[dict[str, str], ...]] | None = None,
        batch: Batch | None = None,
    ) -> list[list[int]]:
        """Token ids of each prompt text after its conversation's earlier turns (none by default; chat template
        applied); repeated prompts are tokenised once. Prompts cut to `data.max_prompt_length` are counted in
        `batch`."""
        cache: dict[tuple[str, str], tuple[list[int], int]] = {}
        out = []
        for t, h in zip(texts, histories or [()] * len(texts), strict=True):
            key = (t, repr(h))
            if key not in cache:
                cache[key] = encode_prompt(self.tokenizer, t, self.prompt_format, h)
            ids, dropped = cache[key]
            out.append(ids)
            if batch is not None:
                batch.prompts += 1
                batch.prompts_cut += dropped > 0
        return out

    # ---- around the steps -------------------------------------------------------------------------------------

    def sampling_window(self) -> Any:
        """Sharded: every unit of the policy gathered for sampling, then sharded again, unless the engine samples
        from its own copy of the weights (vLLM, synced after each step), which then never need gathering whole."""
        if not self.engine.shares_policy_weights:
            return contextlib.nullcontext()
        return self.procs.full_weights(self.model)

    def evaluate(self) -> dict[str, float]:
        """Eval metrics (process 0 evaluates; the others wait and get its numbers)."""
        with self.sampling_window():  # sharded: every process gathers, process 0 evaluates
            if not self.procs.is_main:
                return self.procs.broadcast({})
            res = self._evaluate()
        return self.procs.broadcast(res)

    def _evaluate(self) -> dict[str, float]:
        e = self.cfg.eval
        res = evaluate(
            self.model,
            self.tokenizer,
            self.eval_problems[: e.num_problems],
            self.rewards,
            max_new_tokens=self.cfg.rollout.max_new_tokens,
            k=e.k,
            temperature=e.temperature,
            batch_size=e.batch_size,
            prompt_format=self.prompt_format,
            # LANPO runs also report feedback-augmented accuracy (a reward-agnostic second attempt, SPEC §5)
            reflect_template=self.feedback.templates.reflect if self.feedback is not None else None,
            # an engine with its own weights (vLLM) is reused; the policy's engines get a fresh one at eval's batch size
            engine=self.cfg.rollout.engine if self.engine.shares_policy_weights else self.engine,
        )
        return {f"eval/{k}": v for k, v in res.items()}

    def train(self, progress: Any = None) -> dict[str, Any]:
        """The whole run: evaluate (unless resuming), step until `train.steps` or a budget (`train.max_seconds` /
        `max_tokens`), logging and checkpointing as configured, evaluate, save `model/`, write the final checkpoint,
        close. Returns a summary (eval before / after, steps, what stopped it). `progress`: a rich `Progress`."""
        t = self.cfg.train
        summary: dict[str, Any] = {"run_dir": str(self.run_dir)}
        try:
            if not self.resumed:
                before = self.evaluate()
                self.log(0, before)
                summary["eval_before"] = before
            elif self.procs.is_main:
                summary["eval_before"] = next(  # eval/reward is absent from runs that predate it
                    (m for m in read_metrics(self.run_dir) if "eval/reward" in m or "eval/accuracy" in m), {}
                )
            task = progress.add_task("RL", total=t.steps, completed=self.global_step, status="") if progress else None
            while self.stop_reason() is None:
                metrics = self.step()
                self.global_step += 1
                # cumulative counters, so that reports can plot against wall-clock and tokens as well as steps
                self.elapsed += metrics["time/step"]
                self.tokens_total += int(metrics["tokens/sampled"])
                metrics["time/elapsed"], metrics["tokens/total"] = self.elapsed, self.tokens_total
                last = self.stop_reason() is not None  # the final eval and checkpoint follow the loop
                if t.eval_every and self.global_step % t.eval_every == 0 and not last:
                    metrics.update(self.evaluate())
                self.log(self.global_step, metrics)
                if progress is not None:
                    progress.update(
                        task,
                        advance=1,
                        status=f"reward {metrics.get('reward/mean', float('nan')):.3f} "
                        f"acc {metrics.get('accuracy', float('nan')):.3f}" + _budget_status(self),
                    )
                if t.sample_every and self.global_step % t.sample_every == 0 and self.console is not None:
                    for prompt, text, reward in self.last_samples:
                        self.console.print(
                            f"[dim]step {self.global_step} · reward {reward:.2f}[/dim] "
                            f"{prompt.strip()!r} → {text.strip()!r}",
                            highlight=False,
                        )
                if t.save_every and self.global_step % t.save_every == 0 and not last:
                    self.checkpoint()
            after = self.evaluate()
            self.log(self.global_step, after)
            summary["eval_after"] = after
            weights = self._full_state()  # collective under sharding
            if self.procs.is_main:
                final = self.run_dir / "model"
                self.model.save_pretrained(final, state_dict=weights)
                self.tokenizer.save_pretrained(final)
            self.checkpoint(finished=True)  # last: a run killed before this resumes from its previous checkpoint
            summary.update(
                step=self.global_step,
                stopped_by=self.stop_reason(),
                elapsed_seconds=self.elapsed,
                tokens_total=self.tokens_total,
            )
        finally:
            self.close()
        return summary

    def stop_reason(self) -> str | None:
        """Which limit ends training now: `steps`, `max_seconds` or `max_tokens` (first reached), or None."""
        t = self.cfg.train
        if self.global_step >= t.steps:
            return "steps"
        if t.max_seconds is not None and self.elapsed >= t.max_seconds:
            return "max_seconds"
        if t.max_tokens is not None and self.tokens_total >= t.max_tokens:
            return "max_tokens"
        return None

    def checkpoint(self, finished: bool = False) -> None:
        """`finished` marks the run's final checkpoint: that is what tells a budget-stopped run from a killed one.
        Process 0 writes it, with every process's RNG state; the others wait until it is in place."""
        rng = self.procs.gather([rng_state()])
        weights, optimizer_state = self._full_state(), None
        # train.sharding=fsdp: AdamW's state (its shards gathered) keyed by parameter name, also on one process, so
        # that any process count resumes it
        if self.cfg.train.sharding == "fsdp":
            from reasonrl.training.fsdp import optimizer_state as gather_optimizer_state

            optimizer_state = gather_optimizer_state(self.model, self.optimizer)
        if not self.procs.is_main:
            self.procs.barrier()
            return
        state: dict[str, Any] = {
            "cursor": self.stream.cursor,
            "elapsed_seconds": self.elapsed,
            "tokens_total": self.tokens_total,
        }
        if finished:
            state.update(finished=True, stopped_by=self.stop_reason())
        save_checkpoint(
            self.run_dir,
            self.global_step,
            self.model,
            self.tokenizer,
            self.optimizer,
            self.scheduler,
            state,
            keep=self.cfg.train.keep_checkpoints,
            rng=rng,
            weights=weights,
            optimizer_state=optimizer_state,
            config_yaml=self.cfg.to_yaml(),
        )
        if self.pool is not None:  # evictions up to this step can no longer be rolled back: purge them
            self.pool.checkpointed(self.global_step)
        self.procs.barrier()

    def _full_state(self) -> dict[str, torch.Tensor] | None:
        """The policy's full weights for saving (on process 0) when sharded, gathered by every process; else None
        (`save_pretrained` reads the model itself)."""
        if not self.procs.sharded:
            return None
        from reasonrl.training.fsdp import model_state

        return model_state(self.model)

    def close(self) -> None:
        self.engine.close()
        self.rewards.close()
        if self.logger is not None:
            self.logger.close()
        if self.pool is not None:
            self.pool.close()
        self.procs.close()

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if self.logger is not None:
            self.logger.log(step, metrics)
            for fn in self.callbacks:
                fn(step, dict(metrics))


def _check_sharding(cfg: Config) -> None:
    """What `train.sharding=fsdp` does not combine with, refused before any model work."""
    if cfg.train.sharding != "fsdp":
        changed = [k for k, v in dataclasses.asdict(cfg.train.fsdp).items() if v != getattr(FSDPConfig(), k)]
        if changed:
            raise UserError(f"train.fsdp.{changed[0]} applies only with train.sharding=fsdp: set that, or drop it")
        return
    for bad, why in (
        (cfg.lora.enabled, "lora.enabled=true (LoRA trains few parameters: use DDP)"),
        (
            cfg.train.ref_offload,
            "train.ref_offload=true (the reference model is sharded instead; "
            "train.fsdp.cpu_offload=true keeps its shards on the CPU)",
        ),
        (
            cfg.train.gradient_checkpointing and cfg.train.fsdp.activation_checkpointing,
            "both train.gradient_checkpointing and train.fsdp.activation_checkpointing (each recomputes every decoder "
            "layer: keep train.fsdp.activation_checkpointing)",
        ),
        (mixed_precision(cfg) == "fp16", "fp16 compute (no loss scaling for sharded gradients: use bfloat16)"),
    ):
        if bad:
            raise UserError(f"train.sharding=fsdp does not combine with {why}")


def mixed_precision(cfg: Config) -> str:
    """The loss passes' autocast: `train.mixed_precision` when set; else, with float32 master weights
    (`train.master_weights=fp32`), `model.dtype` when that is bf16 or fp16 (so `model.dtype=bfloat16` means bf16
    compute over float32 parameters, as mixed-precision training does)."""
    t = cfg.train
    if t.mixed_precision != "none" or t.master_weights != "fp32":
        return t.mixed_precision
    device = torch.device("cpu" if runs_on_cpu(cfg.model.device) else "cuda")
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(compute_dtype(cfg, device), "none")


def _mean_over_processes(procs: Processes, values: dict[str, float], weight: float) -> dict[str, float]:
    """Weighted mean of per-process diagnostics (weight: e.g. the process's group count); identity for one."""
    if procs.world == 1:
        return values
    parts = [(w, v) for w, v in procs.gather([(weight, values)]) if w > 0 and v]
    total = sum(w for w, _ in parts)
    return {k: sum(w * v[k] for w, v in parts) / total for k in parts[0][1]} if parts else {}


def _enable_activation_checkpointing(model: Any) -> None:
    """`train.gradient_checkpointing`, non-reentrant (works with frozen inputs and LoRA); renamed in transformers 5."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _lr_lambda(schedule: str, warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        if schedule == "linear":
            return max(0.0, 1 - progress)
        if schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return f


def _budget_status(trainer: Trainer) -> str:
    """How much of a seconds / tokens budget is spent, for the progress line (the bar itself counts steps)."""
    t = trainer.cfg.train
    out = f" · {trainer.elapsed:.1f}/{t.max_seconds:g} s" if t.max_seconds is not None else ""
    return out + (f" · {trainer.tokens_total}/{t.max_tokens} tokens" if t.max_tokens is not None else "")
