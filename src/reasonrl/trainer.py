"""The RL training loop, readable top to bottom.

One step, in data-flow order (DEVELOPERS.md):
    problems → prompts → rollout → rewards → advantages → loss → update → logs / checkpoint
Each stage is timed; everything a resumed run needs (weights, optimiser, scheduler, RNG, data cursor) is in the
checkpoint, and the metrics log is cut back to the checkpoint's step on resume, so a killed run resumes exactly.

Under a multi-process launch (`distributed.py`) every process draws the same global batch, rolls out and scores its
own share of whole groups, and the update is data-parallel; process 0 alone evaluates, logs, checkpoints and writes
the LANPO pool, from records gathered from every process.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from reasonrl import algorithms
from reasonrl.checkpoint import latest_checkpoint, load_checkpoint, rng_state, save_checkpoint
from reasonrl.config import Config, config_diff, load_config
from reasonrl.data import Problem
from reasonrl.distributed import Processes, agree, rank_from_env, runs_on_cpu
from reasonrl.errors import UserError
from reasonrl.evaluate import evaluate
from reasonrl.feedback import MODES, FeedbackBuilder, FeedbackStats, Rollout, templates_for
from reasonrl.logprobs import selected_logprobs
from reasonrl.metrics import MetricsLogger, StageTimer
from reasonrl.models import load_policy
from reasonrl.pool import ExperiencePool, PoolEntry
from reasonrl.prompts import prompt_ids
from reasonrl.rewards import Rewards
from reasonrl.rollout import Completion, SamplingParams, completion_logits, make_engine, pad_prompts

# --------------------------------------------------------------------------------------------------------------
# Problems


def load_training_data(cfg: Config) -> tuple[list[Problem], list[Problem]]:
    """(train, eval) problems: the built-in task's splits, or the user's files / datasets."""
    from reasonrl import arithmetic
    from reasonrl.data import load_problems

    d = cfg.data
    if d.source == "arithmetic":
        train = arithmetic.load_task(cfg.task, "train")[: d.limit]
    else:
        train = load_problems(d.source, split=d.split, columns=d.columns, limit=d.limit)
    if d.eval_source is None:
        test = arithmetic.load_task(cfg.task, "test") if d.source == "arithmetic" else train
    elif d.eval_source == "arithmetic":
        test = arithmetic.load_task(cfg.task, "test")
    else:
        test = load_problems(d.eval_source, split=d.eval_split, columns=d.columns)
    return train, test


def reward_spec(cfg: Config) -> tuple[list[str], list[float] | None]:
    """(functions, weights) of `rewards.*`; LamPO adds the dense ROUGE-L reward with weight λ_sem (SPEC §4)."""
    names, weights = list(cfg.rewards.functions), cfg.rewards.weights
    lam = cfg.algorithm.lampo
    if cfg.algorithm.advantage == "lampo" and lam.lambda_sem > 0 and "rouge_l" not in names:
        weights = [*(weights or [1.0] * len(names)), lam.lambda_sem]
        names.append("rouge_l")
    return names, weights


def build_rewards(cfg: Config, tokenizer: Any) -> Rewards:
    names, weights = reward_spec(cfg)
    lam = cfg.algorithm.lampo
    settings = {}
    if lam.rouge_tokens == "model":
        settings["rouge_l"] = {"tokenize": lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]}
    return Rewards(
        names, weights, timeout_s=cfg.rewards.timeout_s, num_workers=cfg.rewards.num_workers, settings=settings
    )


class ProblemStream:
    """Problems in a fresh seeded permutation each epoch; its whole state is one integer cursor."""

    def __init__(self, problems: list[Problem], seed: int, cursor: int = 0) -> None:
        self.problems, self.seed, self.cursor = problems, seed, cursor
        self._epoch, self._order = -1, torch.empty(0, dtype=torch.long)

    def take(self, n: int) -> list[Problem]:
        out = []
        for _ in range(n):
            epoch, pos = divmod(self.cursor, len(self.problems))
            if epoch != self._epoch:
                gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
                self._epoch, self._order = epoch, torch.randperm(len(self.problems), generator=gen)
            out.append(self.problems[int(self._order[pos])])
            self.cursor += 1
        return out


# --------------------------------------------------------------------------------------------------------------
# Batching for the log-prob and update passes


@dataclass
class MicroBatch:
    prompt_ids: Tensor  # [U, W] the distinct prompts of these sequences, left-padded (each runs once, `token_logprobs`)
    prompt_mask: Tensor  # [U, W] bool: real prompt tokens
    which: Tensor  # [B] the prompt (row of `prompt_ids`) of each sequence
    targets: Tensor  # [B, T] completion tokens, right-padded: column t is completion token t
    lengths: Tensor  # [B] completion tokens of each sequence
    mask: Tensor  # [B, T] 1 on completion tokens that enter the loss
    behaviour_logp: Tensor  # [B, T] log-probs recorded by the rollout engine
    advantages: Tensor  # [B]
    guide: Tensor  # [B] bool: π_old is the behaviour log-prob under a stripped LANPO context (SPEC §5 `strip`)
    rows: slice  # which sequences of the step batch these are
    behaviour_entropy: Tensor | None = None  # [B, T] entropy recorded by the rollout engine (None: not recorded)


def make_micro_batches(
    completions: list[Completion],
    advantages: Tensor,
    loss_mask: list[bool],
    size: int,
    pad_id: int,
    device: torch.device,
    guide: list[bool] | None = None,
) -> list[MicroBatch]:
    """Split the step's sequences into micro-batches. Each keeps its distinct prompts once (left-padded) and its
    completions right-padded to its own longest one, so a group's G completions share one prompt pass."""
    size = size or len(completions)
    guide_t = torch.tensor(guide if guide is not None else [False] * len(completions), dtype=torch.bool)
    out = []
    for lo in range(0, len(completions), size):
        chunk = completions[lo : lo + size]
        prompt_ids, prompt_mask, which = pad_prompts([c.prompt_ids for c in chunk], pad_id, device)
        width = max(1, max(len(c.token_ids) for c in chunk))
        targets = _right_padded([c.token_ids for c in chunk], width, pad_id, torch.long)
        mask = _right_padded([[float(loss_mask[lo + r])] * len(c.token_ids) for r, c in enumerate(chunk)], width)
        blogp = _right_padded([c.logprobs for c in chunk], width)
        entropies = [c.entropies for c in chunk]
        bent = _right_padded(entropies, width) if all(e is not None for e in entropies) else None  # type: ignore[arg-type]
        out.append(
            MicroBatch(
                prompt_ids,
                prompt_mask,
                which,
                targets.to(device),
                torch.tensor([len(c.token_ids) for c in chunk], device=device),
                mask.to(device),
                blogp.to(device),
                advantages[lo : lo + size].to(device),
                guide_t[lo : lo + size].to(device),
                slice(lo, lo + len(chunk)),
                bent.to(device) if bent is not None else None,
            )
        )
    return out


def _right_padded(rows: list[list], width: int, fill: float = 0.0, dtype: torch.dtype = torch.float32) -> Tensor:
    return torch.tensor([row + [fill] * (width - len(row)) for row in rows], dtype=dtype)


def select_rows(
    mb: MicroBatch, rows: Tensor, *per_row: Tensor | None
) -> tuple[MicroBatch, Tensor | None, Tensor | None]:
    """The sequences `rows` (bool [B]) of a micro-batch that all have a loss-mask token, cut to their own widths and
    prompts; `per_row` [B, T] tensors (π_old, π_ref log-probs) are cut alike. All rows: the micro-batch itself."""
    if bool(rows.all()):
        return (mb, *per_row)  # type: ignore[return-value]
    idx = torch.nonzero(rows).squeeze(1)
    width = int(mb.mask[idx].sum(-1).max())  # each selected row's mask covers its tokens from column 0
    used, which = torch.unique(mb.which[idx], return_inverse=True)
    prompt_mask = mb.prompt_mask[used]
    first = prompt_mask.shape[1] - int(prompt_mask.sum(-1).max())  # left-padding columns no selected prompt needs
    sub = MicroBatch(
        mb.prompt_ids[used, first:],
        prompt_mask[:, first:],
        which,
        mb.targets[idx, :width],
        mb.lengths[idx],
        mb.mask[idx, :width],
        mb.behaviour_logp[idx, :width],
        mb.advantages[idx],
        mb.guide[idx],
        mb.rows,
        mb.behaviour_entropy[idx, :width] if mb.behaviour_entropy is not None else None,
    )
    return (sub, *(x[idx, :width] if x is not None else None for x in per_row))  # type: ignore[return-value]


def strip_contexts(
    completions: list[Completion], modes: list[str], plain_prompt_ids: list[list[int]]
) -> tuple[list[Completion], list[bool]]:
    """SPEC §5 `context_in_loss=strip`: feedback rollouts are trained on their plain prompt, and flagged so that the
    loss takes π_old from the behaviour log-probs recorded under the context (the Guide-style ratio
    π_θ(o_t|q,o_<t) / π_old(o_t|q,c,o_<t)). Scratch rollouts are unchanged."""
    guide = [m != "scratch" for m in modes]
    stripped = [
        dataclasses.replace(c, prompt_ids=ids) if g else c
        for c, g, ids in zip(completions, guide, plain_prompt_ids, strict=True)
    ]
    return stripped, guide


def token_logprobs(
    model: Any, mb: MicroBatch, temperature: float, with_entropy: bool = False, chunk: int = 0
) -> tuple[Tensor, Tensor | None]:
    """log π(target token) at every target column, from logits scaled by the sampling temperature.

    Each distinct prompt of the micro-batch runs once and its completions attend to its keys and values
    (`rollout.completion_logits`): the same log-probs as one pass per prompt + completion, up to float rounding.
    `chunk` > 0 uses the memory-efficient kernel (`logprobs.py`, `train.logprob_chunk`)."""
    logits = completion_logits(model, mb.prompt_ids, mb.prompt_mask, mb.which, mb.targets, mb.lengths)
    return selected_logprobs(logits, mb.targets, temperature, chunk, with_entropy)


# --------------------------------------------------------------------------------------------------------------
# The trainer


class Trainer:
    def __init__(self, cfg: Config, run_dir: Path, *, resume: bool = False, console: Any = None) -> None:
        self.cfg, self.run_dir, self.console = cfg, run_dir, console
        algorithms.get_advantage(cfg.algorithm.advantage)  # fail fast on a typo, before any model work
        a, t = cfg.algorithm, cfg.train
        self.procs = procs = Processes(t.mixed_precision, cpu=runs_on_cpu(cfg.model.device))
        if procs.world > 1 and cfg.model.device not in ("auto", "cpu", "cuda"):
            raise UserError(f"model.device={cfg.model.device} names one device; use auto under a multi-process launch")
        with procs.accelerator.main_process_first():  # process 0 builds (and caches) the warm-start, then the others
            self.problems, self.eval_problems = load_training_data(cfg)
            device = procs.device if procs.world > 1 else None
            self.model, self.tokenizer, self.device = load_policy(cfg, self.problems, console, device)
        if t.gradient_checkpointing:
            _enable_activation_checkpointing(self.model)
        self.rewards = build_rewards(cfg, self.tokenizer)
        self.engine = make_engine(
            cfg.rollout.engine,
            self.model,
            self.tokenizer,
            batch_size=cfg.rollout.batch_size,
            workers=cfg.rollout.workers if procs.world == 1 else 1,  # launched processes already share the cores
        )
        self.ref_model = None
        if a.beta > 0 and not cfg.lora.enabled:  # k3 KL against the policy before RL; LoRA: the adapter-free base
            self.ref_model = copy.deepcopy(self.model).eval().requires_grad_(False)
            if t.ref_offload:
                self.ref_model.to("cpu")
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        # the fused kernel (one per parameter instead of a dozen ops) where torch has it: same update to float rounding
        fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in trainable)
        optimizer = torch.optim.AdamW(trainable, lr=t.lr, weight_decay=t.weight_decay, fused=fused or None)
        # `train_model` is what the loss runs through (accelerate's DDP wrapper with several processes, else the
        # model itself); generation, evaluation and checkpoints use the bare `model`, which shares its parameters.
        self.train_model, self.optimizer = procs.prepare(self.model, optimizer)
        total = max(1, t.steps * a.num_iterations)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, _lr_lambda(t.lr_schedule, t.warmup_steps, total)
        )
        self.step = 0
        # budget counters (train.max_seconds / max_tokens): sums of time/step and tokens/generated, checkpointed
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
            raise UserError(f"{run_dir} has no checkpoint to resume from; start a new run instead")
        # RL starts from the same RNG state whether or not the warm-start was cached; processes sample differently
        torch.manual_seed(t.seed + procs.rank)
        if ckpt is not None:
            state = load_checkpoint(ckpt, self.model, self.optimizer, self.scheduler, procs.rank, procs.world)
            self.step, self.stream.cursor = state["step"], state["cursor"]
            self.elapsed, self.tokens_total = state.get("elapsed_seconds", 0.0), state.get("tokens_total", 0)
        self.pool, self.feedback = None, None
        if a.lanpo.enabled:
            self.pool, self.feedback = self._open_pool(resume)
        self.logger = None
        if procs.is_main:
            self.logger = MetricsLogger(run_dir, tensorboard=t.tensorboard, resume_step=self.step if resume else None)

    def _open_pool(self, resume: bool) -> tuple[ExperiencePool, FeedbackBuilder]:
        """The run's experience pool (SPEC §5), rolled back to the checkpoint's step on resume so nothing written
        after it (rollouts, evictions, lessons) survives a kill; and the prompt builder that reads it."""
        lanpo, procs = self.cfg.algorithm.lanpo, self.procs
        with procs.accelerator.main_process_first():  # process 0 owns the pool; the others only read it
            pool = ExperiencePool(
                self.run_dir / "pool.sqlite",
                max_per_problem=lanpo.pool_max_per_problem,
                max_size=lanpo.pool_max_size,
                read_only=not procs.is_main,
            )
            if resume and procs.is_main:
                pool.rollback(self.step)
            elif not resume and pool.stats()["size"] > 0:
                raise UserError(f"{self.run_dir / 'pool.sqlite'} already has entries; start a new run directory")
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
        start = time.perf_counter()
        ids = [prompt_ids(self.tokenizer, t, self.cfg.data.system_prompt) for t in prompts]
        sampling = SamplingParams(self.cfg.algorithm.lanpo.lesson_max_tokens, temperature=0.0)
        out = [(c.text, len(c.token_ids)) for c in self.engine.generate(ids, 1, sampling)]
        self.lesson_seconds += time.perf_counter() - start
        return out

    # ---- one step -------------------------------------------------------------------------------------------

    def train_step(self) -> dict[str, float]:
        cfg, a, procs = self.cfg, self.cfg.algorithm, self.procs
        timer = StageTimer()
        step_start = time.perf_counter()
        G, P = cfg.rollout.group_size, cfg.rollout.prompts_per_step

        # problems → prompts (LANPO feedback) → rollout → rewards (repeated by DAPO dynamic sampling until full).
        # Every process draws the same global batch from the stream and rolls out its own share of whole groups.
        step_no = self.step + 1
        problems: list[Problem] = []
        rollouts: list[Rollout] = []
        completions: list[Completion] = []
        rewards, correct, reward_metrics, scored = [], [], [], []
        zero_std_first_round, rounds, kept = None, 0, 0
        self.lesson_seconds, feedback_stats = 0.0, []
        while kept < P:
            with timer.stage("prompts"):
                batch = procs.shard(self.stream.take(P - kept))
                if self.feedback is None:
                    plan = [Rollout(p, "scratch", p.prompt) for p in batch for _ in range(G)]
                else:
                    plan, stats = self.feedback.build(batch, G, step_no)
                    feedback_stats.append(stats)
                prompts = self._prompt_ids([r.text for r in plan])
            with timer.stage("generation"):
                if not batch:
                    comps = []
                elif self.feedback is None:  # identical prompts per group: let the engine share them (n = G)
                    comps = self.engine.generate(prompts[::G], G, self.sampling)
                else:
                    comps = self.engine.generate(prompts, 1, self.sampling)
            with timer.stage("reward"):
                out = self.rewards(
                    [p.prompt for p in batch for _ in range(G)], [c.text for c in comps], _columns(batch, G)
                ) if batch else None  # fmt: skip
            totals = out.total if out is not None else []
            if out is not None:
                reward_metrics.append(out.metrics)
            scored += zip(plan, comps, totals, strict=True)
            keep = [True] * len(batch)
            group_std = torch.tensor(totals).view(len(batch), G).std(-1) if G > 1 else torch.zeros(len(batch))
            if zero_std_first_round is None:
                zero_std = procs.gather((group_std == 0).tolist())
                zero_std_first_round = sum(zero_std) / max(len(zero_std), 1)
            if a.dynamic_sampling:
                keep = (group_std > 0).tolist()
            for i, p in enumerate(batch):
                if keep[i]:
                    problems.append(p)
                    rollouts += plan[i * G : (i + 1) * G]
                    completions += comps[i * G : (i + 1) * G]
                    rewards += totals[i * G : (i + 1) * G]
                    correct += ((out.correct if out else None) or [False] * len(comps))[i * G : (i + 1) * G]
            kept += round(procs.sum(sum(keep)))
            rounds += 1
            if not a.dynamic_sampling or rounds > a.max_resample:
                break
        all_rewards, all_correct = procs.gather(rewards), procs.gather(correct)  # the global batch's, for metrics
        metrics: dict[str, float] = {"dynamic_sampling/rounds": rounds, "groups": kept}
        # every token this step generated, kept or not: rollouts of dropped groups and LANPO's lessons count too,
        # so that a token budget charges each method for all the generation it did
        metrics["tokens/sampled"] = procs.sum(
            sum(len(c.token_ids) for _, c, _ in scored) + sum(s.lesson_tokens for s in feedback_stats)
        )
        if self.lesson_seconds:  # lesson writing ran inside prompt building: report it as its own stage
            timer.seconds["prompts"] -= self.lesson_seconds
            timer.seconds["abstraction"] += self.lesson_seconds
        if self.feedback is not None:
            metrics.update(
                _feedback_metrics(
                    procs.gather(feedback_stats),
                    procs.gather([(r.mode, r.context_tokens) for r in rollouts]),
                    all_rewards,
                    all_correct,
                )
            )
        if kept == 0:  # dynamic sampling found no informative group: nothing to learn from this step
            self._record(scored, step_no, timer)
            metrics["time/step"] = procs.max(time.perf_counter() - step_start)  # the budget counts this step too
            return {**metrics, **timer.metrics(), **_merge_reward_metrics(procs.gather([reward_metrics]))}

        # advantages (per sequence, from the registry); LANPO may score each mode of a group on its own
        with timer.stage("advantages"):
            reward_t = torch.tensor(rewards, dtype=torch.float64)
            group_ids = torch.arange(len(problems)).repeat_interleave(G)
            if self.feedback is not None and a.lanpo.advantage_scope == "mode":
                group_ids = group_ids * len(MODES) + torch.tensor([MODES.index(r.mode) for r in rollouts])
            diagnostics: dict[str, float] = {}  # filled by estimators that have some (LamPO's pair weights)
            advantages = torch.zeros(0, dtype=torch.float64)
            if problems:
                context = {**self.advantage_context(completions), "diagnostics": diagnostics}
                options = algorithms.advantage_options(a.advantage, context)
                advantages = algorithms.compute_advantages(a.advantage, reward_t, group_ids, **options)
            metrics.update(_mean_over_processes(procs, diagnostics, weight=len(problems)))

        # loss → update
        with timer.stage("batching"):
            # SPEC §5 `strip`: train the context-free policy, π_θ(o|q) against the behaviour π_old(o|q,c)
            guide = [False] * len(completions)
            if self.feedback is not None and a.lanpo.context_in_loss == "strip":
                plain = self._prompt_ids([r.problem.prompt for r in rollouts])
                completions, guide = strip_contexts(completions, [r.mode for r in rollouts], plain)
            truncated = [c.truncated for c in completions]
            loss_mask = [not (a.mask_truncated and t) for t in truncated]
            mbs = make_micro_batches(
                completions, advantages, loss_mask, cfg.train.micro_batch_size, self.tokenizer.pad_token_id,
                self.device, guide,
            )  # fmt: skip
        with timer.stage("logprobs"):
            old_logp, ref_logp = self.reference_logprobs(mbs)
        with timer.stage("update"):
            update_metrics = self.update(mbs, old_logp, ref_logp)
            self.engine.load_weights(self.model)
        self._record(scored, step_no, timer)

        # metrics (SPEC §6) over the whole global batch; every stage above is timed, so they add up to `time/step`
        with timer.stage("logging"):
            if self.pool is not None:
                metrics["lanpo/pool_size"] = float(self.pool.stats()["size"])
            seqs = procs.gather(  # (length, truncated, |advantage|) of every trained sequence
                [(len(c.token_ids), c.truncated, abs(float(x))) for c, x in zip(completions, advantages, strict=True)]
            )
            reward_all = torch.tensor(all_rewards, dtype=torch.float64)
            n_tokens = sum(n for n, _, _ in seqs)
            lengths = torch.tensor([n for n, _, _ in seqs], dtype=torch.float)
            metrics.update(
                {
                    "reward/mean": float(reward_all.mean()),
                    "reward/std": float(reward_all.std()) if len(reward_all) > 1 else 0.0,
                    "accuracy": sum(all_correct) / len(all_correct),
                    "zero_std_groups": zero_std_first_round,
                    "completion/len_mean": float(lengths.mean()),
                    "completion/len_max": float(lengths.max()),
                    "completion/truncated": sum(t for _, t, _ in seqs) / len(seqs),
                    "advantage/abs_mean": sum(x for _, _, x in seqs) / len(seqs),
                    "tokens/generated": n_tokens,
                    **_merge_reward_metrics(procs.gather([reward_metrics])),
                    **update_metrics,
                    "lr": self.scheduler.get_last_lr()[0],
                }
            )
        step_time = procs.max(time.perf_counter() - step_start)  # the slowest process sets the pace
        metrics.update(timer.metrics())
        metrics["time/step"] = step_time
        metrics["tokens_per_s"] = n_tokens / step_time
        self.last_samples = [(p.prompt, completions[i * G].text, rewards[i * G]) for i, p in enumerate(problems[:3])]
        return metrics

    def _prompt_ids(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each prompt text (chat template applied); repeated texts are tokenised once."""
        cache: dict[str, list[int]] = {}
        for t in texts:
            if t not in cache:
                cache[t] = prompt_ids(self.tokenizer, t, self.cfg.data.system_prompt)
        return [cache[t] for t in texts]

    def _record(self, scored: list[tuple[Rollout, Completion, float]], step_no: int, timer: StageTimer) -> None:
        """Pool write (LANPO: this step's lessons, then its rollouts) and the completions log: every scored rollout
        with the context it was sampled under. Process 0 writes both, for every process, in rank order."""
        procs = self.procs
        if self.pool is not None:
            with timer.stage("pool"):
                lessons = procs.gather(self.feedback.take_new_lessons())
                entries = procs.gather(
                    [
                        PoolEntry(
                            r.problem.id,
                            r.problem.prompt,
                            c.text,
                            float(w),
                            step_no,
                            r.mode,
                            len(c.prompt_ids),
                            len(c.token_ids),
                        )
                        for r, c, w in scored
                    ]
                )
                if procs.is_main:
                    for key, text, step in lessons:
                        self.pool.put_lesson(key, text, step)
                    self.pool.add(entries)
                procs.barrier()  # the next step's reads see this step's writes on every process
        if self.cfg.train.log_completions:
            with timer.stage("logging"):
                records = procs.gather(
                    [
                        {
                            "problem_id": r.problem.id,
                            "mode": r.mode,
                            "prompt": r.text,
                            "completion": c.text,
                            "reward": w,
                        }
                        for r, c, w in scored
                    ]
                )
                if self.logger is not None:
                    self.logger.log_completions(step_no, records)

    def advantage_context(self, completions: list[Completion]) -> dict[str, Any]:
        """Everything an advantage estimator may ask for by parameter name (see `advantage_options`)."""
        a = self.cfg.algorithm
        # LamPO's sequence scores come from the behaviour log-probs the rollout already returned: no extra pass.
        logp_sums = torch.tensor([sum(c.logprobs) for c in completions], dtype=torch.float64)
        lengths = torch.tensor([max(len(c.logprobs), 1) for c in completions], dtype=torch.float64)
        seq_scores = logp_sums / lengths if a.lampo.score == "mean" else logp_sums
        return {
            "scale_rewards": a.scale_rewards,
            "eps": a.adv_eps,
            "seq_scores": seq_scores,
            "tau": a.lampo.tau,
            "weight": a.lampo.weight,
            "normalize": a.lampo.normalize,
        }

    @torch.no_grad()
    def reference_logprobs(self, mbs: list[MicroBatch]) -> tuple[list[Tensor | None], list[Tensor | None]]:
        """π_old log-probs (only needed when the batch is reused for several passes) and π_ref (only when β > 0).

        With one pass, π_old equals the current policy, so its detached log-probs serve and no pass is spent.
        π_ref is the model before RL: a frozen copy (moved to the GPU only for this pass with `train.ref_offload`),
        or under LoRA the policy with its adapters switched off.
        """
        temp, chunk = self.cfg.rollout.temperature, self.cfg.train.logprob_chunk
        with self.procs.autocast():
            old = [
                token_logprobs(self.model, mb, temp, chunk=chunk)[0] if self.cfg.algorithm.num_iterations > 1 else None
                for mb in mbs
            ]
        ref: list[Tensor | None] = [None] * len(mbs)
        if self.cfg.algorithm.beta > 0 and mbs:
            with self._reference_model() as model, self.procs.autocast():
                ref = [token_logprobs(model, mb, temp, chunk=chunk)[0] for mb in mbs]
        return old, ref

    @contextmanager
    def _reference_model(self) -> Iterator[Any]:
        if self.ref_model is None:  # LoRA: the base model is the policy without its adapters
            with self.model.disable_adapter():
                yield self.model
            return
        offload = self.cfg.train.ref_offload
        if offload:
            self.ref_model.to(self.device)
        try:
            yield self.ref_model
        finally:
            if offload:
                self.ref_model.to("cpu")

    def update(
        self, mbs: list[MicroBatch], old_logp: list[Tensor | None], ref_logp: list[Tensor | None]
    ) -> dict[str, float]:
        """`num_iterations` optimiser steps over the batch, each accumulating gradients over its micro-batches.

        Loss normalisers are counts over the global batch (all processes), and each process's loss is scaled by
        the process count, so the data-parallel gradient equals the one-process gradient (`distributed.py`)."""
        a, t, procs = self.cfg.algorithm, self.cfg.train, self.procs
        temp = self.cfg.rollout.temperature
        num_tokens = procs.sum(float(sum(mb.mask.sum() for mb in mbs)))
        num_seqs = procs.sum(float(sum((mb.mask.sum(-1) > 0).sum() for mb in mbs)))
        max_len = a.max_len_norm or self.cfg.rollout.max_new_tokens
        keys = ["loss", "entropy", "clip_low", "clip_high", "ratio"] + (["kl"] if a.beta > 0 else [])
        sums = dict.fromkeys(keys, 0.0)
        self.model.train()
        for _ in range(a.num_iterations):
            self.optimizer.zero_grad(set_to_none=True)
            backward = False
            for whole, whole_old, whole_ref in zip(mbs, old_logp, ref_logp, strict=True):
                # A sequence whose loss is identically zero (advantage 0 and no KL term) adds nothing to the gradient:
                # it gets a forward pass without autograd, for the metrics only, or none at all when the rollout's
                # record gives them (one pass over the batch: π_θ = π_old = the behaviour policy, ratio 1, no clip;
                # entropy as the engine recorded it). Fully masked sequences get none either.
                live = whole.mask.sum(-1) > 0
                learn = live & (whole.advantages != 0) if whole_ref is None else live
                recorded = ~learn & live & ~whole.guide
                if a.num_iterations == 1 and whole.behaviour_entropy is not None and bool(recorded.any()):
                    m = whole.mask[recorded]
                    sums["entropy"] += float((whole.behaviour_entropy[recorded] * m).sum())
                    sums["ratio"] += float(m.sum())  # loss and clip indicators are zero for these rows
                else:
                    recorded = torch.zeros_like(live)
                for rows, grad in ((learn, True), (live & ~learn & ~recorded, False)):
                    if not bool(rows.any()):
                        continue
                    mb, old, ref = select_rows(whole, rows, whole_old, whole_ref)
                    with torch.set_grad_enabled(grad), procs.no_sync(self.train_model), procs.autocast():
                        logp, entropy = token_logprobs(
                            self.train_model, mb, temp, with_entropy=True, chunk=t.logprob_chunk
                        )
                        old = logp.detach() if old is None else old
                        if mb.guide.any():  # stripped LANPO contexts: π_old is the behaviour log-prob under the context
                            old = torch.where(mb.guide[:, None], mb.behaviour_logp, old)
                        per_token, info = algorithms.clipped_surrogate(
                            logp, old, mb.advantages, mb.mask, eps_low=a.eps_low, eps_high=a.eps_high,
                            ratio_level=a.ratio_level,
                        )  # fmt: skip
                        if ref is not None:
                            kl = algorithms.kl_k3(logp, ref)
                            per_token = per_token + a.beta * kl
                            info["kl"] = kl.detach()
                        loss = algorithms.aggregate_loss(
                            per_token, mb.mask, a.loss_agg, num_seqs=num_seqs, num_tokens=num_tokens, max_len=max_len
                        )
                        if grad:  # × processes: the wrapper averages gradients, the loss is a sum over them
                            procs.backward(loss * procs.world if procs.world > 1 else loss)
                            backward = True
                    # token-weighted sums → exact token means over the whole batch
                    m = mb.mask
                    for key, val in {"loss": loss.detach() * num_tokens, "entropy": entropy, **info}.items():
                        total = val if val.dim() == 0 else (val * m).sum()
                        sums[key] += float(total)
            if procs.world > 1:
                pad = torch.full((1, 1), self.tokenizer.pad_token_id, device=self.device)
                procs.sync_gradients(self.train_model, pad)
            elif not backward:  # all-zero gradient: AdamW still steps (momentum, weight decay) as after a zero backward
                for p in self.model.parameters():
                    if p.requires_grad:
                        p.grad = torch.zeros_like(p)
            grad_norm = procs.clip_grad_norm(
                [p for p in self.model.parameters() if p.requires_grad],
                t.max_grad_norm if t.max_grad_norm > 0 else math.inf,
            )
            self.optimizer.step()
            self.scheduler.step()
        sums = procs.sum_dict(sums)
        denom = max(num_tokens, 1.0) * a.num_iterations
        out = {
            f"{k}" if k in ("loss", "entropy", "kl") else f"clip/{k.removeprefix('clip_')}": v / denom
            for k, v in sums.items()
            if k != "ratio"
        }
        out["ratio/mean"] = sums["ratio"] / denom
        out["clip/region"] = out["clip/low"] + out["clip/high"]
        out["grad_norm"] = float(grad_norm)
        self.model.eval()
        return out

    # ---- the run --------------------------------------------------------------------------------------------

    def evaluate(self) -> dict[str, float]:
        """Eval metrics (process 0 evaluates; the others wait and get its numbers)."""
        if not self.procs.is_main:
            return self.procs.broadcast({})
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
            system_prompt=self.cfg.data.system_prompt,
            # LANPO runs also report feedback-augmented accuracy (a reward-agnostic second attempt, SPEC §5)
            reflect_template=self.feedback.templates.reflect if self.feedback is not None else None,
            engine=self.cfg.rollout.engine,
        )
        return self.procs.broadcast({f"eval/{k}": v for k, v in res.items()})

    def stop_reason(self) -> str | None:
        """Which limit ends training now: `steps`, `max_seconds` or `max_tokens` (first reached), or None."""
        t = self.cfg.train
        if self.step >= t.steps:
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
            self.step,
            self.model,
            self.tokenizer,
            self.optimizer,
            self.scheduler,
            state,
            keep=self.cfg.train.keep_checkpoints,
            rng=rng,
        )
        if self.pool is not None:  # evictions up to this step can no longer be rolled back: purge them
            self.pool.checkpointed(self.step)
        self.procs.barrier()

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


def _columns(problems: list[Problem], repeat: int) -> dict[str, list]:
    cols: dict[str, list] = {"answer": [], "reference": [], "problem_id": []}
    for p in problems:
        cols["answer"] += [p.answer] * repeat
        cols["reference"] += [p.reference] * repeat
        cols["problem_id"] += [p.id] * repeat
    return cols


def _feedback_metrics(
    stats: list[FeedbackStats], modes: list[tuple[str, int]], rewards: list[float], correct: list[bool]
) -> dict[str, float]:
    """SPEC §5/§6 LANPO metrics: per-mode reward and accuracy, fallbacks, context size, retrieval, lessons.
    `modes`: (mode, context tokens) of every trained rollout, aligned with `rewards` and `correct`."""
    out: dict[str, float] = {}
    for mode in MODES:
        idx = [i for i, (m, _) in enumerate(modes) if m == mode]
        out[f"lanpo/{mode}/count"] = float(len(idx))
        if idx:
            out[f"lanpo/{mode}/reward"] = sum(rewards[i] for i in idx) / len(idx)
            out[f"lanpo/{mode}/accuracy"] = sum(correct[i] for i in idx) / len(idx)
    ctx = [n for m, n in modes if m != "scratch"]
    requests = sum(s.retrieval_requests for s in stats)
    sims = [x for s in stats for x in s.similarities]
    out.update(
        {
            "lanpo/fallback/reflect": float(sum(s.fallbacks["reflect"] for s in stats)),
            "lanpo/fallback/abstract": float(sum(s.fallbacks["abstract"] for s in stats)),
            "lanpo/context_tokens": sum(ctx) / len(ctx) if ctx else 0.0,
            "lanpo/retrieval_hit_rate": sum(s.retrieval_hits for s in stats) / requests if requests else 0.0,
            "lanpo/similarity_mean": sum(sims) / len(sims) if sims else 0.0,
            "lanpo/lessons_generated": float(sum(s.lessons_generated for s in stats)),
            "lanpo/lessons_cached": float(sum(s.lessons_cached for s in stats)),
            "tokens/feedback": float(sum(s.lesson_tokens for s in stats)),
        }
    )
    return out


_REWARD_COUNTS = ("reward/verify_timeouts", "reward/unparsable", "reward/verify_errors", "reward/skipped")


def _merge_reward_metrics(per_process: list[list[dict[str, float]]]) -> dict[str, float]:
    """Reward-function metrics of every process's dynamic-sampling rounds: counts add up over rounds and processes;
    means and stds are those of the first round, averaged over processes (their shares differ by one group at most)."""
    firsts = [rounds[0] for rounds in per_process if rounds]
    if not firsts:
        return {}
    out = {k: sum(f.get(k, 0.0) for f in firsts) / len(firsts) for k in firsts[0] if k not in _REWARD_COUNTS}
    for k in _REWARD_COUNTS:
        counts = [r[k] for rounds in per_process for r in rounds if k in r]
        if counts:
            out[k] = sum(counts)
    return out


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


# --------------------------------------------------------------------------------------------------------------
# Entry points used by the CLI


def new_run_dir(cfg: Config) -> Path:
    name = cfg.train.run_name or agree(f"{cfg.algorithm.advantage}-{datetime.now():%Y%m%d-%H%M%S}", cfg.model.device)
    path = Path(cfg.train.output_dir) / name
    if (path / "config.yaml").exists() and rank_from_env() == 0:  # process 0 writes it
        raise UserError(f"run directory {path} exists; pick another train.run_name or resume with --resume {path}")
    return path  # created by the Trainer once data and model have loaded, so a failed start leaves nothing


def resume_config(run_dir: Path, path: str | None, overrides: list[str]) -> Config:
    """The run's saved config; anything the user passes on top must not change it (resuming must be exact)."""
    saved = run_dir / "config.yaml"
    if not saved.exists():
        raise UserError(f"{run_dir} is not a reasonrl run directory (no config.yaml)")
    cfg = load_config(saved)
    requested = load_config(path, overrides, base=cfg.to_dict())
    if diff := config_diff(cfg, requested):
        raise UserError(f"--resume uses the run's saved config; these keys differ: {', '.join(diff)}")
    return cfg


def finished_state(run_dir: Path) -> dict[str, Any] | None:
    """The final trainer state (step, elapsed_seconds, tokens_total, stopped_by) of a run that completed, else None.

    A run is complete once its final checkpoint, written after `model/`, is marked finished; runs from before the
    marker existed count as complete when that checkpoint reached `train.steps`.
    """
    import json

    ckpt = latest_checkpoint(run_dir)
    if ckpt is None or not (run_dir / "model").is_dir():
        return None
    state = json.loads((ckpt / "trainer_state.json").read_text())
    if state.get("finished"):
        return state
    saved = run_dir / "config.yaml"
    if "finished" not in state and saved.exists() and state["step"] >= load_config(saved).train.steps:
        return {**state, "finished": True, "stopped_by": "steps"}
    return None


def run_training(cfg: Config, run_dir: Path, *, resume: bool, console: Any, progress: Any) -> dict[str, Any]:
    """Train until `train.steps` or a `train.max_seconds` / `max_tokens` budget is reached, evaluating before and
    after; returns a summary for the CLI."""
    trainer = Trainer(cfg, run_dir, resume=resume, console=console)
    t = cfg.train
    summary: dict[str, Any] = {"run_dir": str(run_dir)}
    try:
        if not resume:
            before = trainer.evaluate()
            trainer.log(0, before)
            summary["eval_before"] = before
        elif trainer.procs.is_main:
            summary["eval_before"] = next((m for m in _read_log(run_dir) if "eval/accuracy" in m), {})
        task = progress.add_task("RL", total=t.steps, completed=trainer.step, status="")
        while trainer.stop_reason() is None:
            metrics = trainer.train_step()
            trainer.step += 1
            # cumulative counters, so that reports can plot against wall-clock and tokens as well as steps
            trainer.elapsed += metrics["time/step"]
            trainer.tokens_total += int(metrics["tokens/sampled"])
            metrics["time/elapsed"], metrics["tokens/total"] = trainer.elapsed, trainer.tokens_total
            last = trainer.stop_reason() is not None  # the final eval and checkpoint follow the loop
            if t.eval_every and trainer.step % t.eval_every == 0 and not last:
                metrics.update(trainer.evaluate())
            trainer.log(trainer.step, metrics)
            progress.update(
                task,
                advance=1,
                status=f"reward {metrics.get('reward/mean', float('nan')):.3f} "
                f"acc {metrics.get('accuracy', float('nan')):.3f}" + _budget_status(trainer),
            )
            if t.sample_every and trainer.step % t.sample_every == 0 and console is not None:
                for prompt, text, reward in getattr(trainer, "last_samples", []):
                    console.print(
                        f"[dim]step {trainer.step} · reward {reward:.2f}[/dim] {prompt.strip()!r} → {text.strip()!r}",
                        highlight=False,
                    )
            if t.save_every and trainer.step % t.save_every == 0 and not last:
                trainer.checkpoint()
        after = trainer.evaluate()
        trainer.log(trainer.step, after)
        summary["eval_after"] = after
        if trainer.procs.is_main:
            final = run_dir / "model"
            trainer.model.save_pretrained(final)
            trainer.tokenizer.save_pretrained(final)
        trainer.checkpoint(finished=True)  # last: a run killed before this resumes from its previous checkpoint
        summary.update(
            step=trainer.step,
            stopped_by=trainer.stop_reason(),
            elapsed_seconds=trainer.elapsed,
            tokens_total=trainer.tokens_total,
        )
    finally:
        trainer.close()
    return summary


def _budget_status(trainer: Trainer) -> str:
    """How much of a seconds / tokens budget is spent, for the progress line (the bar itself counts steps)."""
    t = trainer.cfg.train
    out = f" · {trainer.elapsed:.1f}/{t.max_seconds:g} s" if t.max_seconds is not None else ""
    return out + (f" · {trainer.tokens_total}/{t.max_tokens} tokens" if t.max_tokens is not None else "")


def _read_log(run_dir: Path) -> list[dict[str, Any]]:
    from reasonrl.metrics import read_metrics

    return read_metrics(run_dir)
