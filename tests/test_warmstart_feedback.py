"""Warm-start in LANPO's feedback formats: share 0 keeps the old warm-start exactly, share 1 teaches all three
formats in the tiny tokenizer's alphabet, and reflection examples never carry a reward."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch

from reasonrl.config import load_config
from reasonrl.demo import arithmetic, warmstart
from reasonrl.demo.tiny_model import build_tiny_model
from reasonrl.errors import UserError
from reasonrl.rewards.math import extract_answer


def _problems(cfg):
    return arithmetic.load_task(cfg.task, "train")


def _fresh_model(cfg, tok):
    torch.manual_seed(cfg.train.seed)
    return build_tiny_model(cfg.model, len(tok), tok.pad_token_id, tok.eos_token_id)


def _old_stream(cfg, problems) -> list[list[warmstart.Example]]:
    """The warm-start's examples as drawn before the feedback formats existed (one RNG: picks, then demos)."""
    rng = random.Random(cfg.train.seed)
    out = []
    for _ in range(cfg.warmstart.steps):
        batch = [problems[rng.randrange(len(problems))] for _ in range(cfg.warmstart.batch_size)]
        out.append(
            [
                warmstart.Example("plain", p.prompt, arithmetic.demonstration(p, cfg.task.demo_error_rate, rng))
                for p in batch
            ]
        )
    return out


def test_share_zero_is_the_old_warmstart(tiny_overrides):
    torch.set_num_threads(1)
    cfg = load_config(None, [*tiny_overrides, "warmstart.feedback_share=0"])
    problems = _problems(cfg)
    assert list(warmstart.example_batches(cfg, problems)) == _old_stream(cfg, problems)

    tok = arithmetic.build_tokenizer()
    a, b = _fresh_model(cfg, tok), _fresh_model(cfg, tok)
    warmstart.supervised_finetune(a, tok, problems, cfg)
    warmstart.train_on(b, tok, iter(_old_stream(cfg, problems)), cfg)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), name


def test_share_one_teaches_all_formats_in_the_tokenizers_alphabet(tiny_overrides):
    cfg = load_config(None, [*tiny_overrides, "warmstart.feedback_share=1", "warmstart.steps=6"])
    problems = _problems(cfg)
    by_prompt = {p.prompt: p for p in problems}
    tok = arithmetic.build_tokenizer()
    examples = [e for batch in warmstart.example_batches(cfg, problems) for e in batch]
    kinds = Counter(e.kind for e in examples)
    assert set(kinds) == set(warmstart.FORMATS), kinds
    for e in examples:
        for text in (e.prompt, e.completion):
            assert tok.unk_token_id not in tok(text, add_special_tokens=False)["input_ids"], text
            assert set(text) <= set(arithmetic.CHARS)
        if e.kind == "reflect":  # the template has no reward field, and nothing else adds one
            problem = e.prompt.split("Earlier attempt:")[0]
            assert problem in by_prompt and e.prompt.startswith(problem)
            assert "reward" not in e.prompt.lower() and "correct" not in e.prompt.lower()
            assert extract_answer(e.completion) is not None  # a plain (flawed) demonstration, not a better one
        elif e.kind == "lesson":
            lesson = e.completion.strip()
            assert lesson in arithmetic.LESSONS and len(lesson) < 64
            shown = e.prompt.split("reward ")
            assert len(shown) == 3  # two other problems' trajectories, each with its reward
        else:
            lesson, problem = e.prompt.removeprefix("Lesson: ").split("\n", 1)
            assert lesson in arithmetic.LESSONS and problem in by_prompt
            assert extract_answer(e.completion) is not None


def test_lesson_rewards_and_rule_follow_the_shown_trajectories(tiny_overrides):
    cfg = load_config(None, [*tiny_overrides, "warmstart.feedback_share=1", "warmstart.steps=10"])
    problems = _problems(cfg)
    by_prompt = {p.prompt: p for p in problems}
    lessons = [e for batch in warmstart.example_batches(cfg, problems) for e in batch if e.kind == "lesson"]
    assert {e.completion.strip() for e in lessons} == set(arithmetic.LESSONS)
    for e in lessons:
        parts = [t for t in e.prompt.removesuffix("Lesson:").split("\nreward ") if t]
        rewards = [int(t[0]) for t in parts[1:]]
        trajectories = [parts[0]] + [t[2:] for t in parts[1:-1]]
        shown = []
        for t, r in zip(trajectories, rewards, strict=True):
            prompt = t[: t.index("\n") + 1]
            q, response = by_prompt[prompt], t[len(prompt) :]
            assert r == (extract_answer(response) == q.answer)
            shown.append(dropped := arithmetic.dropped_carry(q, response))
            assert dropped == (r == 0)  # a forgotten carry is the demonstrator's only slip, and it is always wrong
        assert (e.completion.strip() == arithmetic.LESSON_CARRY) == any(shown)


def test_default_share_mixes_formats_in(tiny_overrides):
    cfg = load_config(None, [*tiny_overrides, "warmstart.steps=20", "warmstart.batch_size=50"])
    kinds = Counter(e.kind for b in warmstart.example_batches(cfg, _problems(cfg)) for e in b)
    assert 0.18 < 1 - kinds["plain"] / 1000 < 0.32, kinds


def test_cache_key_separates_shares_and_templates(tiny_overrides, tmp_path):
    def key(*extra):
        cfg = load_config(None, [*tiny_overrides, *extra])
        return warmstart.warmstart_key(cfg, _problems(cfg))

    template = "algorithm.lanpo.reflect_template={problem}Try again:\n{attempt}\n"
    assert len({key(), key("warmstart.feedback_share=0"), key("warmstart.feedback_share=0.5")}) == 3
    assert key(template) != key()
    assert key(template, "warmstart.feedback_share=0") == key("warmstart.feedback_share=0")  # unused: same weights


def test_template_outside_the_alphabet_is_a_user_error(tiny_overrides):
    cfg = load_config(None, [*tiny_overrides, "algorithm.lanpo.reflect_template={problem}Versuch: {attempt}\n→"])
    with pytest.raises(UserError, match="reflect_template has characters"):
        warmstart.example_batches(cfg, _problems(cfg))


def test_tiny_policy_caches_the_feedback_warmstart(tiny_overrides):
    torch.set_num_threads(1)
    cfg = load_config(None, [*tiny_overrides, "warmstart.feedback_share=1"])
    problems = _problems(cfg)
    _, _, path = warmstart.tiny_policy(cfg, problems, torch.device("cpu"))
    assert path is not None and (path / "model.safetensors").exists()
    assert path.name == warmstart.warmstart_key(cfg, problems)
