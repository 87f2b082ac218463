"""SPEC §5 LANPO: mode mix, leak-proof reflection, no siblings / no self-abstraction, options, kill and resume."""

from __future__ import annotations

import inspect
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from reasonrl.config import load_config
from reasonrl.data.problems import Problem
from reasonrl.errors import UserError
from reasonrl.lanpo import feedback
from reasonrl.lanpo.feedback import ARITHMETIC, FeedbackBuilder, check_template, mode_counts
from reasonrl.lanpo.pool import ExperiencePool, PoolEntry
from reasonrl.training.trainer import Trainer

# three problems seen every step, so that reflection has material from step 2 on; γ low enough that the built-in
# task's problems (which share little text) find neighbours for abstraction
LANPO = [
    "algorithm.lanpo.enabled=true",
    "task.train_size=3",
    "rollout.group_size=4",
    "algorithm.lanpo.gamma=0.05",
    "algorithm.lanpo.lesson_max_tokens=12",
    "rewards.functions=[math_answer, 'conftest:length_reward']",
    "rewards.weights=[1, 1]",
]


def rows(run_dir: Path, name: str = "completions.jsonl") -> list[dict]:
    return [json.loads(line) for line in (run_dir / name).read_text().splitlines()]


# ---- mode mix


@pytest.mark.parametrize(
    "mix,g,expected",
    [
        ({"scratch": 0.5, "reflect": 0.25, "abstract": 0.25}, 16, (8, 4, 4)),
        ({"scratch": 0.5, "reflect": 0.25, "abstract": 0.25}, 4, (2, 1, 1)),
        ({"scratch": 0.5, "reflect": 0.25, "abstract": 0.25}, 3, (1, 1, 1)),  # remainders .5 < .75 = .75
        ({"scratch": 1}, 5, (5, 0, 0)),
        ({"reflect": 2, "abstract": 1}, 6, (0, 4, 2)),
        ({"scratch": 1, "reflect": 1, "abstract": 1}, 1, (1, 0, 0)),
    ],
)
def test_mode_counts(mix, g, expected):
    counts = mode_counts(mix, g)
    assert (counts["scratch"], counts["reflect"], counts["abstract"]) == expected


@pytest.mark.parametrize("g", range(1, 40))
def test_mode_counts_sum_to_group_size_and_stay_near_shares(g):
    mix = {"scratch": 0.5, "reflect": 0.3, "abstract": 0.2}
    counts = mode_counts(mix, g)
    assert sum(counts.values()) == g
    assert all(abs(counts[m] - mix[m] * g) < 1 for m in mix)


def test_bad_mix_is_a_user_error():
    with pytest.raises(UserError, match="did you mean 'reflect'"):
        load_config(None, ["algorithm.lanpo.mix={reflekt: 1}"])
    with pytest.raises(UserError, match="positive share"):
        load_config(None, ["algorithm.lanpo.mix={scratch: 0}"])


# ---- leak-proof reflection by construction


def test_reflection_builder_cannot_see_rewards_or_answers():
    # the only inputs of a reflection prompt are the problem text, the attempt's text and the template ...
    assert list(inspect.signature(feedback.reflect_prompt).parameters) == ["problem", "attempt", "template"]
    # ... the pool hands out earlier attempts as plain strings ...
    assert inspect.signature(ExperiencePool.earlier_attempts).return_annotation in ("list[str]", list[str])
    # ... and a template that asks for more is refused before any run starts
    for bad in ("{problem}{attempt}{reward}", "{problem}{answer}", "{attempt}{correct}", "{problem.answer}"):
        with pytest.raises(UserError, match="may only use"):
            check_template("reflect", bad)


def test_reflection_prompt_is_template_plus_own_text_only(tmp_path):
    pool = ExperiencePool(tmp_path / "pool.sqlite")
    p = Problem("p1", "Q: 12+34\n", "46", "2+4=6\n1+3=4\n\\boxed{46}")
    pool.add([PoolEntry("p1", p.prompt, "2+4=6\n\\boxed{6}", 0.0, 1, "scratch", 10, 15)])
    pool.add([PoolEntry("p1", p.prompt, "SIBLING", 1.0, 2, "scratch", 10, 7)])
    lanpo = load_config(None, ["algorithm.lanpo.mix={reflect: 1}"]).algorithm.lanpo
    builder = FeedbackBuilder(pool, lanpo, ARITHMETIC, len, lambda t, n: t[:n], lambda ps: [("", 0)] * len(ps))
    plan, stats = builder.build([p], group_size=2, step=2)  # step 2 is being sampled: its rollouts are siblings
    assert [r.mode for r in plan] == ["reflect", "reflect"]
    for r in plan:
        assert r.text == ARITHMETIC.reflect.format(problem=p.prompt, attempt="2+4=6\n\\boxed{6}")
        assert "SIBLING" not in r.text and "reward" not in r.text.lower() and "correct" not in r.text.lower()
    pool.close()


def test_modes_without_material_fall_back_to_scratch_and_are_counted(tmp_path):
    pool = ExperiencePool(tmp_path / "pool.sqlite")
    lanpo = load_config(None, []).algorithm.lanpo
    builder = FeedbackBuilder(pool, lanpo, ARITHMETIC, len, lambda t, n: t[:n], lambda ps: [("", 0)] * len(ps))
    p = Problem("p1", "Q: 12+34\n", "46")
    plan, stats = builder.build([p], group_size=8, step=1)
    assert [r.mode for r in plan] == ["scratch"] * 8 and all(r.text == p.prompt for r in plan)
    assert stats.fallbacks == {"reflect": 2, "abstract": 2} and stats.retrieval_hits == 0
    pool.close()


def test_abstraction_uses_other_problems_only_and_caches_lessons(tmp_path):
    pool = ExperiencePool(tmp_path / "pool.sqlite")
    same = "Q: 12+34\n"
    pool.add([PoolEntry("p1", same, "MINE", 1.0, 1, "scratch", 5, 5)])
    pool.add([PoolEntry("p2", "Q: 12+35\n", "OTHER", 0.0, 1, "scratch", 5, 5)])
    pool.add([PoolEntry("p3", same, "TWIN", 1.0, 1, "scratch", 5, 5)])  # same text, another id: may be used
    lanpo = load_config(None, ["algorithm.lanpo.mix={abstract: 1}", "algorithm.lanpo.gamma=0.01"]).algorithm.lanpo
    seen: list[str] = []

    def write(prompts: list[str]) -> list[tuple[str, int]]:
        seen.extend(prompts)
        return [("carry the 1.", 4)] * len(prompts)

    builder = FeedbackBuilder(pool, lanpo, ARITHMETIC, len, lambda t, n: t[:n], write)
    plan, stats = builder.build([Problem("p1", same, "46")], group_size=2, step=2)
    assert len(seen) == 1 and "MINE" not in seen[0] and "OTHER" in seen[0] and "TWIN" in seen[0]
    assert [r.mode for r in plan] == ["abstract", "abstract"]
    assert plan[0].text == ARITHMETIC.abstract.format(problem=same, lessons="carry the 1.")
    assert "OTHER" not in plan[0].text  # lessons, not raw solutions, go into the prompt
    assert stats.lessons_generated == 1 and stats.retrieval_hits == 1
    _, stats = builder.build([Problem("p1", same, "46")], group_size=2, step=3)
    assert len(seen) == 1 and stats.lessons_cached == 1  # same neighbour set: from the cache
    pool.close()


# ---- in a run


def run_lanpo(tiny_overrides, tmp_path, *extra: str, steps: int = 3) -> tuple[Trainer, list[dict]]:
    trainer = Trainer(load_config(None, [*tiny_overrides, *LANPO, *extra]), tmp_path / "run")
    metrics = []
    for _ in range(steps):
        metrics.append(trainer.step())
        trainer.global_step += 1
        trainer.logger.log(trainer.global_step, metrics[-1])
    trainer.close()
    return trainer, metrics


def test_run_reflects_only_on_earlier_steps_and_abstracts_from_other_problems(tiny_overrides, tmp_path):
    _, metrics = run_lanpo(tiny_overrides, tmp_path, steps=3)
    log = rows(tmp_path / "run")
    by_problem: dict[str, list[dict]] = {}
    for r in log:
        by_problem.setdefault(r["problem_id"], []).append(r)
    reflected = abstracted = 0
    problems = {r["problem_id"]: r for r in log if r["mode"] == "scratch"}
    for r in log:
        plain = problems[r["problem_id"]]["prompt"]
        if r["mode"] == "reflect":
            reflected += 1
            earlier = {e["completion"] for e in by_problem[r["problem_id"]] if e["step"] < r["step"]}
            siblings = {e["completion"] for e in by_problem[r["problem_id"]] if e["step"] == r["step"]}
            attempts = [a for a in earlier if r["prompt"] == ARITHMETIC.reflect.format(problem=plain, attempt=a)]
            assert attempts, "a reflection prompt is the template filled with an earlier attempt and nothing else"
            assert not [s for s in siblings - earlier if s and s in r["prompt"]]
        elif r["mode"] == "abstract":
            abstracted += 1
            assert r["prompt"].endswith(plain) and r["step"] > 1
    assert reflected > 0 and abstracted > 0
    assert metrics[0]["lanpo/fallback/reflect"] > 0  # empty pool at step 1: everything is scratch
    assert metrics[0]["lanpo/scratch/count"] == 3 * 4
    assert metrics[-1]["lanpo/reflect/count"] > 0 and "lanpo/reflect/reward" in metrics[-1]
    for key in ("lanpo/context_tokens", "lanpo/retrieval_hit_rate", "lanpo/pool_size", "time/pool", "tokens/feedback"):
        assert key in metrics[-1]
    assert metrics[-1]["lanpo/pool_size"] == 3 * 8  # 36 rollouts, the newest 8 per problem kept


@pytest.mark.parametrize(
    "option, other, differs",
    [
        ("algorithm.lanpo.context_in_loss=keep", "algorithm.lanpo.context_in_loss=strip", "ratio/mean"),
        ("algorithm.lanpo.advantage_scope=group", "algorithm.lanpo.advantage_scope=mode", "advantage/abs_mean"),
        ("algorithm.advantage=grpo", "algorithm.advantage=lampo", "advantage/abs_mean"),
    ],
)
def test_lanpo_option_changes_what_it_should(tiny_overrides, tmp_path, option, other, differs):
    """Each value trains with feedback rollouts, is recorded with the run, and changes what it should at step 2
    (step 1 has an empty pool: every rollout is scratch, so the samples of both runs are the same until then)."""
    seen = []
    for i, value in enumerate((option, other)):
        _, metrics = run_lanpo(tiny_overrides, tmp_path / str(i), value, steps=2)
        assert math.isfinite(metrics[-1]["loss"]) and metrics[-1]["lanpo/reflect/count"] > 0
        key, val = value.split("=")
        assert f"{key.split('.')[-1]}: {val}" in (tmp_path / str(i) / "run" / "config.yaml").read_text()
        seen.append(metrics[-1][differs])
    assert seen[0] != pytest.approx(seen[1], rel=1e-6, abs=1e-9)


def test_strip_uses_the_guide_ratio_against_behaviour_logprobs(tiny_overrides, tmp_path):
    # keep: one pass, π_old = π_θ, every ratio is exactly 1; strip: feedback rollouts compare π_θ(o|q) with the
    # behaviour π_old(o|q,c), so ratios move away from 1 (and get clipped)
    _, keep = run_lanpo(tiny_overrides, tmp_path / "keep", "algorithm.lanpo.context_in_loss=keep", steps=2)
    _, strip = run_lanpo(tiny_overrides, tmp_path / "strip", "algorithm.lanpo.context_in_loss=strip", steps=2)
    assert keep[-1]["ratio/mean"] == pytest.approx(1.0, abs=1e-7)
    assert strip[-1]["ratio/mean"] != pytest.approx(1.0, abs=1e-4)


def test_advantage_scope_mode_groups_by_mode(tiny_overrides, tmp_path, monkeypatch):
    from reasonrl import algorithms

    seen = []
    real = algorithms.compute_advantages
    monkeypatch.setattr(
        algorithms, "compute_advantages", lambda n, r, g, **o: seen.append(g.clone()) or real(n, r, g, **o)
    )
    run_lanpo(tiny_overrides, tmp_path, "algorithm.lanpo.advantage_scope=mode", steps=2)
    assert len(torch.unique(seen[0])) == 3  # step 1: all scratch, one group per problem
    assert len(torch.unique(seen[1])) > 3  # step 2: reflect / abstract rollouts form groups of their own


def test_sigkill_and_resume_restores_pool_lessons_and_metrics(tiny_overrides, tmp_path):
    # a subprocess cannot import the test's conftest reward: the built-in ones
    builtin = ["rewards.functions=[math_answer, format]", "rewards.weights=[1, 0.1]"]
    args = [*tiny_overrides, *LANPO, *builtin, "train.steps=30", "train.save_every=3", "train.keep_checkpoints=1"]
    cmd = [sys.executable, "-m", "reasonrl", "train", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([*cmd, "train.run_name=straight"], check=True, capture_output=True, env=env, timeout=300)

    proc = subprocess.Popen(
        [*cmd, "train.run_name=killed"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env
    )
    killed = tmp_path / "runs" / "killed"
    latest = killed / "checkpoints" / "latest"
    deadline = time.monotonic() + 300
    # kill after a checkpoint, while later steps have already written to the pool
    while not (latest.exists() and latest.read_text().strip() >= "step-000006") and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(0.1)  # let a step or so write to the pool after the checkpoint: the resume must roll it back
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"

    res = subprocess.run([*cmd[:4], "--resume", str(killed)], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr

    straight = tmp_path / "runs" / "straight"
    pools = [ExperiencePool(d / "pool.sqlite") for d in (killed, straight)]
    assert pools[0].fingerprint() == pools[1].fingerprint()
    assert pools[0].stats()["lessons"] > 0
    for p in pools:
        p.close()

    def comparable(d: Path) -> list[dict]:
        return [
            {k: v for k, v in r.items() if not k.startswith("time/") and k != "tokens_per_s"}
            for r in rows(d, "metrics.jsonl")
        ]

    assert comparable(killed) == comparable(straight)
    assert rows(killed) == rows(straight)


@pytest.mark.parametrize("context_in_loss", ["keep", "strip"])
def test_context_in_loss_against_a_hand_built_example(tiny_overrides, tmp_path, context_in_loss):
    """One feedback rollout and one scratch rollout; the loss the trainer reports equals a plain per-token loop over
    log-probs taken by hand: keep → π_θ(o|q,c) with π_old = π_θ (one pass); strip → π_θ(o|q) over the behaviour
    log-probs recorded under the context, clipped."""
    from reasonrl.rollout.base import Completion
    from reasonrl.training.batch import make_micro_batches, strip_contexts

    cfg = load_config(None, [*tiny_overrides, *LANPO, f"algorithm.lanpo.context_in_loss={context_in_loss}"])
    trainer = Trainer(cfg, tmp_path / "run")
    tok, model = trainer.tokenizer, trainer.model
    plain = tok("Q: 12+34\n", add_special_tokens=False)["input_ids"]
    context = tok("Q: 12+34\nEarlier attempt:\n\\boxed{45}\nCheck it and solve again.\n", add_special_tokens=False)[
        "input_ids"
    ]
    out = tok("2+4=6\n\\boxed{46}", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    behaviour = [-0.5 - 0.1 * t for t in range(len(out))]  # as if recorded while sampling under the context
    comps = [Completion(context, out, behaviour, False, ""), Completion(plain, out, behaviour, False, "")]
    modes, adv = ["reflect", "scratch"], torch.tensor([1.5, -0.5])

    def logps(prompt: list[int]) -> list[float]:  # log π_θ(o_t | prompt, o_<t), one token at a time
        values = []
        with torch.no_grad():
            for t in range(len(out)):
                logits = model(input_ids=torch.tensor([prompt + out[:t]])).logits[0, -1].float()
                values.append(float(torch.log_softmax(logits, -1)[out[t]]))
        return values

    expected = []
    for c, m, a in zip(comps, modes, adv.tolist(), strict=True):
        stripped = context_in_loss == "strip" and m != "scratch"
        new = logps(plain if stripped else c.prompt_ids)
        old = behaviour if stripped else new
        terms = []
        for lp, lo in zip(new, old, strict=True):
            ratio = math.exp(lp - lo)
            terms.append(-min(ratio * a, min(max(ratio, 0.8), 1.2) * a))
        expected.append(sum(terms) / len(terms))
    if context_in_loss == "strip":
        comps, guide = strip_contexts(comps, modes, [plain, plain])
        assert comps[0].prompt_ids == plain and guide == [True, False]
    else:
        guide = [False, False]
    mbs = make_micro_batches(comps, adv, [True, True], 0, tok.pad_token_id, trainer.device, guide)
    metrics = trainer.updater.step(mbs, [None], [None])
    trainer.close()
    assert metrics["loss"] == pytest.approx(sum(expected) / 2, rel=1e-4, abs=1e-5)


def test_lanpo_stage_times_add_up_to_the_step_time(tiny_overrides, tmp_path):
    _, metrics = run_lanpo(tiny_overrides, tmp_path, steps=2)
    stages = {k: v for k, v in metrics[-1].items() if k.startswith("time/") and k != "time/step"}
    assert {"time/prompts", "time/abstraction", "time/pool", "time/generation"} <= stages.keys()
    assert sum(stages.values()) == pytest.approx(metrics[-1]["time/step"], rel=0.05)
