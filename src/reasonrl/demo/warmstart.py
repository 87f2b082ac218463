"""Supervised warm-start of the built-in tiny model, cached by everything that determines its weights.

RL needs a policy that already succeeds sometimes. For pretrained models that is the user's checkpoint; for the
random-init tiny model it is a short SFT on the task's reference solutions. It is cached so that every run of the
demo after the first starts RL at once.

On the built-in task a share of the examples (`warmstart.feedback_share`) teaches LANPO's prompt formats, since a
character-level model that never saw them cannot read a reflection or write a lesson. Those examples use the same
flawed demonstrator as the rest: they teach the format, not a better solver, so LANPO gets no head start.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import torch

from reasonrl.config import Config
from reasonrl.data.problems import Problem
from reasonrl.data.prompts import prompt_ids
from reasonrl.demo import arithmetic
from reasonrl.demo.tiny_model import build_tiny_model
from reasonrl.errors import UserError
from reasonrl.lanpo.feedback import FIELDS, Templates, abstract_prompt, lesson_prompt, reflect_prompt, templates_for
from reasonrl.model import packaged
from reasonrl.rewards.math import extract_answer

CACHE_VERSION = 2
FORMATS = ("reflect", "lesson", "abstract")  # the LANPO formats, chosen uniformly for a feedback example


class Example(NamedTuple):
    kind: str  # "plain" or one of FORMATS
    prompt: str
    completion: str


def cache_root(cfg: Config) -> Path:
    return packaged.cache_root(cfg.warmstart.cache_dir) / "warmstart"


def feedback_templates(cfg: Config) -> Templates | None:
    """The LANPO templates the warm-start teaches; None when it teaches none (another task, or a share of 0)."""
    if cfg.data.source != "arithmetic" or cfg.warmstart.feedback_share == 0:
        return None
    templates = templates_for(cfg.algorithm.lanpo, builtin_task=True)
    for name in FIELDS:
        bad = sorted(set(getattr(templates, name)) - set(arithmetic.CHARS))
        if bad:
            raise UserError(
                f"algorithm.lanpo.{name}_template has characters the built-in task's tokenizer lacks: {bad!r}"
            )
    return templates


def warmstart_key(cfg: Config, problems: list[Problem]) -> str:
    spec = {
        "version": CACHE_VERSION,
        "vocab": arithmetic.CHARS,
        "model": {k: v for k, v in dataclasses.asdict(cfg.model).items() if k not in ("device", "dtype")},
        "warmstart": {k: v for k, v in dataclasses.asdict(cfg.warmstart).items() if k != "cache_dir"},
        "seed": cfg.train.seed,
        "task": dataclasses.asdict(cfg.task) if cfg.data.source == "arithmetic" else None,
        "feedback_templates": dataclasses.asdict(t) if (t := feedback_templates(cfg)) else None,
        "data": hashlib.sha256("\n".join(p.prompt + (p.reference or "") for p in problems).encode()).hexdigest(),
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def tiny_policy(
    cfg: Config,
    problems: list[Problem],
    device: torch.device,
    progress: Callable[[int, int, float], None] | None = None,
) -> tuple[Any, Any, Path | None]:
    """(model, tokenizer, cache path): the warm-started tiny model, from the cache when it is there."""
    from transformers import AutoModelForCausalLM

    tokenizer = arithmetic.build_tokenizer()
    if cfg.warmstart.steps == 0:
        torch.manual_seed(cfg.train.seed)
        model = build_tiny_model(cfg.model, len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id)
        return model.to(device), tokenizer, None
    path = cache_root(cfg) / warmstart_key(cfg, problems)
    if not (path / "model.safetensors").exists():
        torch.manual_seed(cfg.train.seed)
        model = build_tiny_model(cfg.model, len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id)
        supervised_finetune(model.to(device), tokenizer, problems, cfg, progress)
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, path)
        except OSError:  # another process finished the same warm-start first: theirs is identical
            shutil.rmtree(tmp, ignore_errors=True)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)
    return model, tokenizer, path


def example_batches(cfg: Config, problems: list[Problem]) -> Iterator[list[Example]]:
    """`warmstart.steps` batches of (kind, prompt, completion), all drawn from one RNG seeded by `train.seed`.

    With `feedback_share` 0 (or another task) the RNG is consumed exactly as before the feedback formats existed,
    so such warm-starts keep their weights.
    """
    rng = random.Random(cfg.train.seed)
    builtin = cfg.data.source == "arithmetic"
    if not builtin:
        problems = [p for p in problems if p.reference]
    if not problems:
        raise UserError("warm-start needs problems with a reference solution; set warmstart.steps=0 to skip it")
    templates = feedback_templates(cfg)
    share = cfg.warmstart.feedback_share if templates is not None else 0.0

    def demo(p: Problem) -> str:
        """The built-in task's flawed demonstrator, drawn afresh every time; a dataset's reference solution."""
        return arithmetic.demonstration(p, cfg.task.demo_error_rate, rng) if builtin else p.reference or ""

    def example(i: int) -> Example:
        p = problems[i]
        if not (share and rng.random() < share):
            return Example("plain", p.prompt, demo(p))
        assert templates is not None
        kind = FORMATS[rng.randrange(len(FORMATS))]
        if kind == "reflect":  # reward-agnostic like training: the prompt shows the earlier text only
            return Example(kind, reflect_prompt(p.prompt, demo(p), templates.reflect), demo(p))
        if kind == "abstract":
            return Example(kind, abstract_prompt(p.prompt, rng.choice(arithmetic.LESSONS), templates.abstract), demo(p))
        n = len(problems)  # lesson: two *other* problems' trajectories, with their rewards, as in training
        others = [problems[j + (j >= i)] for j in rng.sample(range(n - 1), min(2, n - 1))] if n > 1 else [p]
        shown = [(q, demo(q)) for q in others]
        trajectories = [(q.prompt, r, 1.0 if extract_answer(r) == q.answer else 0.0) for q, r in shown]
        prompt = lesson_prompt(trajectories, templates)
        sep = "" if prompt[-1:].isspace() else " "  # "Lesson:" → " carry ...", as the abstract template reads it
        return Example(kind, prompt, sep + arithmetic.lesson_for(shown))

    def batches() -> Iterator[list[Example]]:
        for _ in range(cfg.warmstart.steps):
            picks = [rng.randrange(len(problems)) for _ in range(cfg.warmstart.batch_size)]
            yield [example(i) for i in picks]

    return batches()


def length_groups(lengths: list[int], budget: int) -> list[list[int]]:
    """The rows of `lengths`, shortest first, cut into groups whose padded size (rows x longest row) is at most
    `budget` tokens; a row longer than `budget` is a group of its own."""
    groups: list[list[int]] = []
    for r in sorted(range(len(lengths)), key=lengths.__getitem__):
        if groups and (len(groups[-1]) + 1) * lengths[r] <= budget:  # ascending: row r is the group's longest
            groups[-1].append(r)
        else:
            groups.append([r])
    return groups


def supervised_finetune(
    model: Any,
    tokenizer: Any,
    problems: list[Problem],
    cfg: Config,
    progress: Callable[[int, int, float], None] | None = None,
) -> None:
    """Next-token loss on demonstrations (completion tokens only), AdamW with warmup and linear decay.

    Demonstrations are the problems' reference solutions; on the built-in task they come from its flawed
    demonstrator (`task.demo_error_rate`), drawn afresh for every example, some in LANPO's formats.
    """
    train_on(model, tokenizer, example_batches(cfg, problems), cfg, progress)


def train_on(
    model: Any,
    tokenizer: Any,
    batches: Iterator[list[Example]],
    cfg: Config,
    progress: Callable[[int, int, float], None] | None = None,
) -> None:
    """The SFT loop over given batches (separate from drawing them, so a test can feed a known stream).

    The loss is the mean next-token loss over a batch's completion tokens. With `warmstart.micro_tokens` > 0 the
    batch runs as micro-batches of rows of similar length (`length_groups`), each adding its summed loss over the
    batch's token count to the gradient: the same gradient up to float rounding, without padding every row to the
    longest one (a lesson-format prompt is about four times a plain example's length)."""
    ws = cfg.warmstart
    device = next(model.parameters()).device
    opt = torch.optim.AdamW(model.parameters(), lr=ws.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * (1 - s / ws.steps))
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    model.train()
    for step, batch in enumerate(batches):
        pairs = [
            (prompt_ids(tokenizer, e.prompt), tokenizer(e.completion, add_special_tokens=False)["input_ids"] + [eos])
            for e in batch
        ]
        lengths = [len(a) + len(b) for a, b in pairs]
        groups = length_groups(lengths, ws.micro_tokens) if ws.micro_tokens else [list(range(len(pairs)))]
        # one pass: the model's mean; micro-batches: each one's sum over the whole batch's completion tokens
        count = {"num_items_in_batch": sum(len(b) for _, b in pairs)} if len(groups) > 1 else {}
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for rows in groups:
            width = max(lengths[r] for r in rows)
            ids = torch.full((len(rows), width), pad)
            labels = torch.full((len(rows), width), -100)
            for i, r in enumerate(rows):
                prompt, completion = pairs[r]
                ids[i, : lengths[r]] = torch.tensor(prompt + completion)
                labels[i, len(prompt) : lengths[r]] = torch.tensor(completion)
            loss = model(
                input_ids=ids.to(device), attention_mask=(ids != pad).long().to(device), labels=labels.to(device),
                **count,
            ).loss  # fmt: skip
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if progress is not None:
            progress(step + 1, ws.steps, total)
    model.eval()
