"""The warm-start's SFT step: rows of similar length in micro-batches (`warmstart.micro_tokens`) give the gradient of
the whole batch's mean next-token loss, as a plain per-row, per-token loop computes it."""

from __future__ import annotations

import random

import pytest
import torch

from reasonrl.config import load_config
from reasonrl.data.prompts import prompt_ids
from reasonrl.demo import arithmetic, warmstart
from reasonrl.demo.tiny_model import build_tiny_model


@pytest.mark.parametrize("seed", range(20))
def test_length_groups_cover_every_row_once_within_the_budget(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(1, 200) for _ in range(rng.randint(1, 80))]
    budget = rng.choice([1, 50, 256, 2048, 100_000])
    groups = warmstart.length_groups(lengths, budget)
    assert sorted(r for g in groups for r in g) == list(range(len(lengths)))
    flat = [lengths[r] for g in groups for r in g]
    assert flat == sorted(lengths)  # shortest first, each group a run of the sorted rows
    for g, nxt in zip(groups, [*groups[1:], None], strict=True):
        longest = max(lengths[r] for r in g)
        assert len(g) == 1 or len(g) * longest <= budget
        if nxt is not None:  # greedy: the next group's first row did not fit in this one
            assert (len(g) + 1) * lengths[nxt[0]] > budget


def _reference_gradient(model, tok, batch) -> list[torch.Tensor]:
    """d/dθ of the mean over all completion tokens of -log p(token | prefix): each row alone (no padding), one
    token at a time, then clipped to norm 1 as the warm-start clips."""
    model.zero_grad(set_to_none=True)
    terms, count = [], 0
    for e in batch:
        prompt = prompt_ids(tok, e.prompt)
        completion = tok(e.completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids = torch.tensor([prompt + completion])
        logits = model(input_ids=ids).logits[0]
        for t in range(len(prompt), ids.shape[1]):
            terms.append(-torch.log_softmax(logits[t - 1], dim=-1)[ids[0, t]])
            count += 1
    (sum(terms) / count).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads))
    scale = min(1.0, 1.0 / (float(norm) + 1e-6))
    return [g * scale for g in grads]


@pytest.mark.parametrize("micro_tokens", [0, 1, 200, 2048])
def test_the_sft_gradient_is_the_batch_mean_whatever_the_micro_batches(tiny_overrides, monkeypatch, micro_tokens):
    torch.set_num_threads(1)
    cfg = load_config(None, [*tiny_overrides, "warmstart.steps=1", "warmstart.batch_size=12",
                             "warmstart.feedback_share=0.5", f"warmstart.micro_tokens={micro_tokens}"])  # fmt: skip
    problems = arithmetic.load_task(cfg.task, "train")
    batch = next(warmstart.example_batches(cfg, problems))
    lengths = [len(e.prompt) + len(e.completion) for e in batch]
    assert max(lengths) > 2 * min(lengths)  # feedback formats make the rows' lengths differ
    tok = arithmetic.build_tokenizer()
    torch.manual_seed(0)
    model = build_tiny_model(cfg.model, len(tok), tok.pad_token_id, tok.eos_token_id)
    expected = _reference_gradient(model, tok, batch)

    seen: list[list[torch.Tensor]] = []

    class Capture(torch.optim.SGD):  # records the gradient the step would apply, then applies nothing
        def __init__(self, params, lr, weight_decay):
            super().__init__(params, lr=lr)

        def step(self, closure=None):
            seen.append([p.grad.clone() for g in self.param_groups for p in g["params"]])

    monkeypatch.setattr(torch.optim, "AdamW", Capture)
    warmstart.train_on(model, tok, iter([batch]), cfg)
    (got,) = seen
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-7)


def test_micro_tokens_is_part_of_the_cache_key(tiny_overrides):
    a = load_config(None, tiny_overrides)
    b = load_config(None, [*tiny_overrides, "warmstart.micro_tokens=0"])
    problems = arithmetic.load_task(a.task, "train")
    assert warmstart.warmstart_key(a, problems) != warmstart.warmstart_key(b, problems)
