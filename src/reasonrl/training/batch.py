"""One step's samples as one object (`Batch`), and its split into micro-batches for the log-prob and update passes."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import Tensor

from reasonrl.data.problems import Problem
from reasonrl.lanpo.feedback import FeedbackStats, PromptPlan
from reasonrl.model.forward import pad_prompts
from reasonrl.rollout.base import Completion


@dataclass
class Round:
    """One sampling round of a step (DAPO dynamic sampling may need several): this process's share of the problems
    drawn, and per rollout (problem-major, G per group) its prompt plan, prompt ids, completion and reward."""

    problems: list[Problem]
    plans: list[PromptPlan]
    prompt_ids: list[list[int]] = field(default_factory=list)
    completions: list[Completion] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    correct: list[bool] = field(default_factory=list)
    reward_metrics: dict[str, float] | None = None


@dataclass
class Batch:
    """Everything one training step computes, stage by stage; per-sequence lists are aligned, G per group.

    Rounds add whole groups (`add`); `scored` keeps every scored rollout, including those of groups that dynamic
    sampling dropped (they go to the pool and the completions log, and count as generated tokens)."""

    step: int  # the step being taken (1-based)
    group_size: int
    problems: list[Problem] = field(default_factory=list)  # kept groups
    plans: list[PromptPlan] = field(default_factory=list)
    completions: list[Completion] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    correct: list[bool] = field(default_factory=list)
    scored: list[tuple[PromptPlan, Completion, float]] = field(default_factory=list)
    reward_metrics: list[dict[str, float]] = field(default_factory=list)  # per round
    feedback_stats: list[FeedbackStats] = field(default_factory=list)  # per round (LANPO)
    rounds: int = 0
    prompts: int = 0  # this process's rollout prompts, and those cut to data.max_prompt_length
    prompts_cut: int = 0
    kept_groups: int = 0  # over all processes
    zero_std_groups: float | None = None  # share of the first round's groups (all processes) with equal rewards
    # from the advantages stage on
    advantages: Tensor | None = None  # [N]
    diagnostics: dict[str, float] = field(default_factory=dict)
    loss_mask: list[bool] = field(default_factory=list)
    guide: list[bool] = field(default_factory=list)  # SPEC §5 `strip`: π_old is the behaviour log-prob under context
    micro_batches: list[MicroBatch] = field(default_factory=list)
    old_logp: list[Tensor | None] = field(default_factory=list)
    ref_logp: list[Tensor | None] = field(default_factory=list)
    update_metrics: dict[str, float] = field(default_factory=dict)

    def add(self, rnd: Round, keep: list[bool]) -> None:
        """Record a scored round; keep the groups flagged in `keep` (one flag per problem)."""
        G = self.group_size
        self.scored += zip(rnd.plans, rnd.completions, rnd.rewards, strict=True)
        if rnd.reward_metrics is not None:
            self.reward_metrics.append(rnd.reward_metrics)
        for i, p in enumerate(rnd.problems):
            if keep[i]:
                rows = slice(i * G, (i + 1) * G)
                self.problems.append(p)
                self.plans += rnd.plans[rows]
                self.completions += rnd.completions[rows]
                self.rewards += rnd.rewards[rows]
                self.correct += rnd.correct[rows]
        self.rounds += 1

    @property
    def empty(self) -> bool:
        return not self.completions


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


def strip_contexts(
    completions: list[Completion], modes: list[str], plain_prompt_ids: list[list[int]]
) -> tuple[list[Completion], list[bool]]:
    """SPEC §5 `context_in_loss=strip`: feedback rollouts are trained on their plain prompt, and flagged so that the
    loss takes π_old from the behaviour log-probs recorded under the context (`algorithms.guide_old_logprobs`).
    Scratch rollouts are unchanged."""
    guide = [m != "scratch" for m in modes]
    stripped = [
        dataclasses.replace(c, prompt_ids=ids) if g else c
        for c, g, ids in zip(completions, guide, plain_prompt_ids, strict=True)
    ]
    return stripped, guide


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
    size = size or max(len(completions), 1)  # an empty share (several processes) gives no micro-batch
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
