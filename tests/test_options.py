"""Every algorithm option runs end to end and does what it says (one tiny training step each)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from reasonrl.config import load_config
from reasonrl.training.trainer import Trainer, _lr_lambda

DENSE = ["rewards.functions=[math_answer, 'conftest:length_reward']", "rewards.weights=[1, 1]"]


def step(tiny_overrides, tmp_path, *extra: str) -> tuple[Trainer, dict, list[torch.Tensor]]:
    trainer = Trainer(load_config(None, [*tiny_overrides, *DENSE, *extra]), tmp_path / "run")
    before = [p.detach().clone() for p in trainer.model.parameters()]
    metrics = trainer.step()
    trainer.close()
    return trainer, metrics, before


def changed(trainer: Trainer, before: list[torch.Tensor]) -> bool:
    return any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters(), strict=True))


def weights(trainer: Trainer) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in trainer.model.parameters()])


# (option, contrasting value, what must differ between them after one step from the same seed, extra overrides).
# One pass of a step has every ratio at 1, where clipping and the ratio's level cannot act: those use two passes.
TWO_PASSES = ("algorithm.num_iterations=2", "train.lr=1e-2")
CONTRASTS = [
    ("algorithm.advantage=grpo", "algorithm.advantage=rloo", "advantage/abs_mean", ()),
    ("algorithm.scale_rewards=group", "algorithm.scale_rewards=batch", "advantage/abs_mean", ()),
    ("algorithm.scale_rewards=group", "algorithm.scale_rewards=none", "advantage/abs_mean", ()),
    ("algorithm.ratio_level=token", "algorithm.ratio_level=sequence", "weights", TWO_PASSES),
    ("algorithm.loss_agg=seq-mean-token-mean", "algorithm.loss_agg=token-mean", "weights", ()),
    ("algorithm.loss_agg=seq-mean-token-mean", "algorithm.loss_agg=seq-mean-token-sum-norm", "weights", ()),
    ("algorithm.eps_high=0.28", "algorithm.eps_high=0.001", "weights", TWO_PASSES),
    ("train.max_grad_norm=0", "train.max_grad_norm=0.001", "weights", ()),
    ("train.lr_schedule=constant", "train.lr_schedule=cosine", "lr", ("train.steps=4",)),
]


@pytest.mark.parametrize("option, other, differs, extra", CONTRASTS)
def test_option_changes_what_it_should(tiny_overrides, tmp_path, option, other, differs, extra):
    """Each value trains, is recorded with the run, and changes what it should against another value."""
    runs = []
    for i, value in enumerate((option, other)):
        trainer, metrics, before = step(tiny_overrides, tmp_path / str(i), value, *extra)
        assert changed(trainer, before) and math.isfinite(metrics["loss"])
        key, val = value.split("=")
        assert f"{key.split('.')[-1]}: {val}" in (tmp_path / str(i) / "run" / "config.yaml").read_text()
        runs.append(weights(trainer) if differs == "weights" else metrics[differs])
    a, b = runs
    assert (not torch.equal(a, b)) if differs == "weights" else a != pytest.approx(b, rel=1e-6, abs=1e-9)


def test_kl_only_with_beta(tiny_overrides, tmp_path):
    trainer, metrics, _ = step(tiny_overrides, tmp_path, "algorithm.beta=0")
    assert trainer.updater.ref_model is None and "kl" not in metrics
    trainer, metrics, _ = step(tiny_overrides, tmp_path / "b", "algorithm.beta=0.1")
    assert trainer.updater.ref_model is not None and metrics["kl"] == pytest.approx(
        0.0, abs=1e-6
    )  # first step: π = π_ref


def test_several_passes_use_kept_old_logprobs(tiny_overrides, tmp_path):
    _, metrics, _ = step(tiny_overrides, tmp_path, "algorithm.num_iterations=3", "train.lr=1e-2")
    # the 2nd and 3rd passes see a changed policy against the kept π_old: ratios move away from 1
    assert metrics["ratio/mean"] != pytest.approx(1.0, abs=1e-7)
    _, metrics, _ = step(tiny_overrides, tmp_path / "one", "algorithm.num_iterations=1")
    assert metrics["ratio/mean"] == pytest.approx(1.0, abs=1e-7)


def test_mask_truncated_removes_them_from_the_loss(tiny_overrides, tmp_path):
    trainer, metrics, before = step(
        tiny_overrides, tmp_path, "rollout.max_new_tokens=2", "algorithm.mask_truncated=true"
    )
    assert metrics["completion/truncated"] == 1.0 and not changed(trainer, before)
    trainer, metrics, before = step(
        tiny_overrides, tmp_path / "keep", "rollout.max_new_tokens=2", "algorithm.mask_truncated=false"
    )
    assert changed(trainer, before)


def test_dynamic_sampling_drops_equal_reward_groups(tiny_overrides, tmp_path):
    # an untrained policy never answers: every group has equal (zero) rewards, so every group is dropped
    trainer = Trainer(
        load_config(
            None,
            [
                *tiny_overrides,
                "rewards.functions=[math_answer]",
                "rewards.weights=null",
                "algorithm.dynamic_sampling=true",
                "algorithm.max_resample=2",
            ],
        ),
        tmp_path / "run",
    )
    metrics = trainer.step()
    trainer.close()
    assert metrics["groups"] == 0 and metrics["dynamic_sampling/rounds"] == 3
    assert trainer.stream.cursor == 3 * 3  # three rounds of three prompts were consumed
    _, metrics, _ = step(tiny_overrides, tmp_path / "dense", "algorithm.dynamic_sampling=true")
    assert metrics["groups"] == 3 and metrics["dynamic_sampling/rounds"] == 1


@pytest.mark.parametrize(
    "schedule,values", [("constant", [1, 1, 1, 1]), ("linear", [0.5, 1, 0.5, 0]), ("cosine", [0.5, 1, 0.5, 0])]
)
def test_lr_schedules(schedule, values):
    f = _lr_lambda(schedule, warmup=2, total=6)
    got = [f(0), f(1), f(4), f(6)]
    assert got == pytest.approx(values, abs=1e-9) if schedule != "constant" else got[2:] == [1, 1]


# ---- LamPO (SPEC §4): every option value trains, is saved with the run, and the LamPO metrics are logged

LAMPO = ["algorithm.advantage=lampo"]


@pytest.mark.parametrize(
    "option",
    [
        "algorithm.lampo.weight=confidence",
        "algorithm.lampo.weight=preference",
        "algorithm.lampo.weight=lambdarank",
        "algorithm.lampo.normalize=weights",
        "algorithm.lampo.normalize=pairs",
        "algorithm.lampo.normalize=none",
        "algorithm.lampo.score=mean",
        "algorithm.lampo.score=sum",
        "algorithm.lampo.rouge_tokens=words",
        "algorithm.lampo.rouge_tokens=model",
        "algorithm.lampo.tau=0.25",
    ],
)
def test_lampo_option_trains(tiny_overrides, tmp_path, option):
    trainer, metrics, before = step(tiny_overrides, tmp_path, *LAMPO, option)
    assert changed(trainer, before) and math.isfinite(metrics["loss"])
    assert 0 < metrics["lampo/weight_mean"] < 1 and 0 <= metrics["lampo/pairs_with_gap"] <= 1
    key, value = option.split("=")
    assert f"{key.split('.')[-1]}: {value}" in (tmp_path / "run" / "config.yaml").read_text()


def test_lampo_seq_scores_are_behaviour_logprob_means_or_sums():
    from reasonrl.algorithms import sequence_scores

    logprobs = [[-1.0, -2.0, -3.0], [-0.5], []]
    assert sequence_scores(logprobs, "mean").tolist() == [-2.0, -0.5, 0.0]
    assert sequence_scores(logprobs, "sum").tolist() == [-6.0, -0.5, 0.0]


def test_lampo_dense_reward_is_added_with_lambda_sem(tiny_overrides, tmp_path):
    overrides = [*tiny_overrides, *LAMPO, "rewards.functions=[math_answer]", "rewards.weights=null"]
    trainer = Trainer(load_config(None, [*overrides, "algorithm.lampo.lambda_sem=0.1"]), tmp_path / "on")
    metrics = trainer.step()
    trainer.close()
    assert trainer.rewards.names == ["math_answer", "rouge_l"] and trainer.rewards.weights == [1.0, 0.1]
    # every built-in problem has a reference, and any completion shares some word with it: a dense, non-zero share
    assert metrics["reward/rouge_l/mean"] > 0 and 0 < metrics["reward/rouge_l/share"] <= 1
    trainer = Trainer(load_config(None, [*overrides, "algorithm.lampo.lambda_sem=0"]), tmp_path / "off")
    trainer.close()
    assert trainer.rewards.names == ["math_answer"]
    # GRPO never gets the dense reward implicitly
    trainer = Trainer(load_config(None, [*tiny_overrides, "algorithm.lampo.lambda_sem=0.1"]), tmp_path / "grpo")
    trainer.close()
    assert "rouge_l" not in trainer.rewards.names


def test_lampo_rouge_l_listed_twice_is_refused():
    from reasonrl.errors import UserError
    from reasonrl.rewards.stage import reward_spec

    both = ["algorithm.advantage=lampo", "rewards.functions=[math_answer,rouge_l]", "rewards.weights=[1.0,0.5]"]
    with pytest.raises(UserError, match="lambda_sem=0"):
        reward_spec(load_config(None, both))
    assert reward_spec(load_config(None, [*both, "algorithm.lampo.lambda_sem=0"])) == (
        ["math_answer", "rouge_l"],
        [1.0, 0.5],
    )


def stage_sum(metrics: dict) -> float:
    return sum(v for k, v in metrics.items() if k.startswith("time/") and k != "time/step")


def test_stage_times_add_up_to_the_step_time(tiny_overrides, tmp_path):
    # SPEC §6 per-stage wall time: every part of a step is in some stage, so a breakdown plot is the whole step
    _, metrics, _ = step(tiny_overrides, tmp_path)
    assert stage_sum(metrics) == pytest.approx(metrics["time/step"], rel=0.05)


# ---- GPU-path options (docs/scale-out.md): each value trains on the CPU, and says what it changed


def test_fsdp_on_one_process_trains_unsharded(tiny_overrides, tmp_path):
    """`train.sharding=fsdp` without a launch: nothing to shard, the same step as `none` (docs/scale-out.md), bf16
    autocast over float32 master weights included."""
    bf16 = "model.dtype=bfloat16"
    trainer, metrics, before = step(tiny_overrides, tmp_path, "train.sharding=fsdp", bf16)
    plain, reference, _ = step(tiny_overrides, tmp_path / "plain", bf16)
    assert trainer.procs.accelerator.mixed_precision == "bf16"
    assert not trainer.procs.sharded and changed(trainer, before)
    assert torch.equal(weights(trainer), weights(plain))
    assert metrics["loss"] == reference["loss"]


@pytest.mark.parametrize("chunk", ["train.logprob_chunk=0", "train.logprob_chunk=16"])
def test_logprob_chunk_gives_the_same_step(tiny_overrides, tmp_path, chunk):
    trainer, metrics, before = step(tiny_overrides, tmp_path, chunk)
    plain, reference, _ = step(tiny_overrides, tmp_path / "plain", "train.logprob_chunk=0")
    assert changed(trainer, before)
    for key in ("loss", "entropy", "grad_norm"):
        assert metrics[key] == pytest.approx(reference[key], rel=1e-5, abs=1e-7), key


@pytest.mark.parametrize("value", [False, True])
def test_gradient_checkpointing_gives_the_same_step(tiny_overrides, tmp_path, value):
    trainer, metrics, before = step(tiny_overrides, tmp_path, f"train.gradient_checkpointing={value}")
    assert changed(trainer, before)
    assert trainer.model.is_activation_checkpointing is value
    _, reference, _ = step(tiny_overrides, tmp_path / "plain", "train.gradient_checkpointing=false")
    assert metrics["loss"] == pytest.approx(reference["loss"], rel=1e-5, abs=1e-7)
    assert metrics["grad_norm"] == pytest.approx(reference["grad_norm"], rel=1e-4)


@pytest.mark.parametrize("value", [False, True])
def test_ref_offload_keeps_the_reference_on_the_cpu(tiny_overrides, tmp_path, value):
    trainer, metrics, _ = step(tiny_overrides, tmp_path, "algorithm.beta=0.1", f"train.ref_offload={value}")
    assert next(trainer.updater.ref_model.parameters()).device.type == "cpu"  # (on a GPU only offload keeps it there)
    assert metrics["kl"] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("precision", ["bf16"])
def test_mixed_precision_trains(tiny_overrides, tmp_path, precision):
    trainer, metrics, before = step(tiny_overrides, tmp_path, f"train.mixed_precision={precision}")
    _, reference, _ = step(tiny_overrides, tmp_path / "fp32", "train.mixed_precision=none")
    assert changed(trainer, before) and math.isfinite(metrics["loss"])
    assert next(trainer.model.parameters()).dtype == torch.float32  # autocast: the weights keep model.dtype
    assert metrics["entropy"] == pytest.approx(reference["entropy"], rel=0.05)  # half-precision rounding only
    assert metrics["entropy"] != reference["entropy"]  # the loss passes did run in half precision


def test_mixed_precision_fp16_on_the_cpu_is_a_one_line_error(tiny_overrides, capsys):
    from reasonrl.cli import main

    assert main(["train", *tiny_overrides, "train.mixed_precision=fp16"]) == 2
    err = capsys.readouterr().err
    assert "fp16" in err and "GPU" in err and "Traceback" not in err


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_rollout_workers_give_the_same_step(tiny_overrides, tmp_path, workers):
    """rollout.workers: 0 = one sampling process per torch thread, 1 = this process only, 2 = two. The samples and
    the update are those of one process (log-probs to float rounding); the value is saved with the run, and closing
    the trainer stops the workers."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        trainer = Trainer(load_config(None, [*tiny_overrides, *DENSE, f"rollout.workers={workers}"]), tmp_path / "run")
        metrics = trainer.step()
        pool = trainer.engine.pool
        assert (pool.count if pool else 1) == (workers or 2)
        procs = list(pool.procs) if pool else []
        assert all(p.is_alive() for p in procs)
        trainer.close()
        assert not any(p.is_alive() for p in procs)
        assert f"workers: {workers}" in (tmp_path / "run" / "config.yaml").read_text()
        _, reference, _ = step(tiny_overrides, tmp_path / "one", "rollout.workers=1")
    finally:
        torch.set_num_threads(threads)
    for key in ("reward/mean", "completion/len_mean", "tokens/generated"):
        assert metrics[key] == reference[key], key
    for key in ("loss", "entropy", "grad_norm"):
        assert metrics[key] == pytest.approx(reference[key], rel=1e-4, abs=1e-6), key


def test_rollout_workers_need_the_fast_engine(tiny_overrides):
    from conftest import user_error

    msg = user_error(["rollout.workers=2", "rollout.engine=fast"], load_config, None,
                     [*tiny_overrides, "rollout.engine=hf", "rollout.workers=2"])  # fmt: skip
    assert "Traceback" not in msg
    assert load_config(None, [*tiny_overrides, "rollout.engine=hf", "rollout.workers=0"]).rollout.workers == 0


def test_dynamic_sampling_drops_an_equal_non_dyadic_group_in_a_one_prompt_round(tiny_overrides, tmp_path):
    overrides = [
        "rewards.functions=[tests.conftest:constant_reward]", "rewards.weights=[1.0]", "rollout.prompts_per_step=1",
        "algorithm.dynamic_sampling=true", "algorithm.max_resample=1",
    ]  # fmt: skip
    trainer = Trainer(load_config(None, [*tiny_overrides, *overrides]), tmp_path / "run")
    try:
        before = [p.detach().clone() for p in trainer.model.parameters()]
        metrics = trainer.step()
    finally:
        trainer.close()
    assert metrics["groups"] == 0 and metrics["dynamic_sampling/rounds"] == 2  # every round's one group dropped
    assert not changed(trainer, before) and "loss" not in metrics


def _update_after_steps(
    tiny_overrides, tmp_path, *extra: str, steps: int = 10, noise: list[torch.Tensor] | None = None
) -> tuple[torch.Tensor, Trainer, dict]:
    """The weights' change over `steps` steps at lr 1e-6 of a whole run (`Trainer.train`: evaluations, `model/`),
    with every step's sampled tokens and the gradient AdamW stepped with (after adding `noise[step]`, flat, to it)."""
    dense = ["rewards.functions=[math_answer,tests.conftest:length_reward]", "rewards.weights=[1.0,1.0]"]
    cfg = load_config(None, [*tiny_overrides, *dense, "train.lr=1e-6", f"train.steps={steps}", *extra])
    trainer = Trainer(cfg, tmp_path / "run")
    seen: dict = {"tokens": [], "grads": []}
    generate, optimizer_step = trainer.generate, trainer.optimizer.step

    def record_tokens(rnd):
        generate(rnd)
        seen["tokens"].append([c.token_ids for c in rnd.completions])

    def record_gradient(*args, **kwargs):
        if noise is not None:
            params = list(trainer.model.parameters())
            for p, part in zip(params, noise[len(seen["grads"])].split([p.numel() for p in params]), strict=True):
                p.grad += part.view_as(p.grad)
        seen["grads"].append(torch.cat([p.grad.float().flatten() for p in trainer.model.parameters()]))
        return optimizer_step(*args, **kwargs)

    trainer.generate, trainer.optimizer.step = record_tokens, record_gradient
    before = torch.cat([p.detach().float().flatten() for p in trainer.model.parameters()])
    trainer.train()
    after = torch.cat([p.detach().float().flatten() for p in trainer.model.parameters()])
    return after - before, trainer, seen


def test_bf16_compute_keeps_float32_master_weights(tiny_overrides, tmp_path):
    """`model.dtype=bfloat16` with `train.master_weights=fp32` (default): parameters and AdamW state stay float32,
    the loss passes autocast to bf16, and 10 steps at lr 1e-6 move the weights as far as a float32 run does, and as
    close to its direction as bf16's precision allows; `model/` holds the float32 master weights. With
    `master_weights=model` the parameters are bf16 and most updates round away.

    Both runs sample in float32 (the master weights), so they train on the same batches (checked token for token)
    and differ only by the bf16 loss passes: each step's gradient by bf16 rounding (0.3-0.4 %). AdamW divides each
    entry's step by that entry's own gradient scale, so entries whose gradient is below that noise move by about the
    learning rate either way: the update differs by 3.0 %. The control: a float32 run whose gradients get unbiased
    random noise of the same size (per tensor and step) differs by 3.8 %, so bf16 compute loses nothing beyond its
    rounding. (An update within 1 % needs gradients ~7x more precise than bf16 rounding: docs/scale-out.md.)"""
    from transformers import AutoModelForCausalLM

    full, plain, fp32 = _update_after_steps(tiny_overrides, tmp_path / "fp32", "model.dtype=float32")
    mixed, trainer, bf16 = _update_after_steps(tiny_overrides, tmp_path / "bf16", "model.dtype=bfloat16")
    assert bf16["tokens"] == fp32["tokens"] and len(bf16["tokens"]) == 10  # the same rollouts: the same batches
    assert trainer.model.dtype == torch.float32 and trainer.procs.accelerator.mixed_precision == "bf16"
    state = trainer.optimizer.state[next(iter(trainer.model.parameters()))]
    assert state["exp_avg"].dtype == torch.float32
    for g32, g16 in zip(fp32["grads"], bf16["grads"], strict=True):
        assert 0 < float((g16 - g32).norm() / g32.norm()) < 0.01  # bf16 rounding, no larger loss of precision
    assert float(mixed.norm() / full.norm()) == pytest.approx(1.0, abs=0.01)  # as far as float32
    assert float((mixed != 0).float().mean()) > 0.99
    relative = float((mixed - full).norm() / full.norm())
    sizes = [p.numel() for p in plain.model.parameters()]
    gen = torch.Generator().manual_seed(0)
    noise = []
    for g32, g16 in zip(fp32["grads"], bf16["grads"], strict=True):
        parts = [torch.randn(n, generator=gen) for n in sizes]
        sized = [e / e.norm() * d.norm() for e, d in zip(parts, (g16 - g32).split(sizes), strict=True)]
        noise.append(torch.cat(sized))
    noisy, _, control = _update_after_steps(tiny_overrides, tmp_path / "noise", "model.dtype=float32", noise=noise)
    assert control["tokens"] == fp32["tokens"]
    assert 0 < relative < float((noisy - full).norm() / full.norm())  # measured 3.0 % against 3.8 %
    # the saved model is the master weights: float32 (so transformers loads it as float32), bit for bit
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16" / "run" / "model")
    assert saved.dtype == torch.float32
    masters = dict(trainer.model.named_parameters())
    assert dict(saved.named_parameters()).keys() == masters.keys()
    for name, p in saved.named_parameters():
        assert torch.equal(p, masters[name]), name
    lossy, trainer, _ = _update_after_steps(tiny_overrides, tmp_path / "bf16only", "model.dtype=bfloat16",
                                            "train.master_weights=model")  # fmt: skip
    assert trainer.model.dtype == torch.bfloat16
    assert float((lossy != 0).float().mean()) < 0.5 and float(lossy.norm() / full.norm()) < 0.5


def test_adam_betas_and_warmup_ratio_reach_the_optimiser(tiny_overrides, tmp_path):
    """train.adam_betas sets AdamW's betas (and so the step); train.warmup_ratio lays the warm-up over that share of
    the optimiser steps, and train.warmup_steps wins when both are set (transformers' rule)."""
    cfg = ["train.steps=10", "train.lr=1e-2"]
    default, _, _ = step(tiny_overrides, tmp_path / "a", *cfg)
    betas, _, _ = step(tiny_overrides, tmp_path / "b", *cfg, "train.adam_betas=[0.5, 0.9]")
    assert default.optimizer.param_groups[0]["betas"] == (0.9, 0.999)
    assert betas.optimizer.param_groups[0]["betas"] == (0.5, 0.9)
    assert not torch.equal(weights(default), weights(betas))
    ratio, _, _ = step(tiny_overrides, tmp_path / "c", *cfg, "train.warmup_ratio=0.3")
    assert ratio.scheduler.get_last_lr()[0] == pytest.approx(1e-2 * 2 / 3)  # warm-up of ceil(0.3 * 10) = 3 steps
    both, _, _ = step(tiny_overrides, tmp_path / "d", *cfg, "train.warmup_ratio=0.3", "train.warmup_steps=5")
    assert both.scheduler.get_last_lr()[0] == pytest.approx(1e-2 * 2 / 5)


@pytest.mark.parametrize("betas", ["[0.9]", "[0.9, 1.0]", "[-0.1, 0.9]"])
def test_adam_betas_out_of_range_are_refused(betas):
    from reasonrl.errors import UserError

    with pytest.raises(UserError, match="train.adam_betas"):
        load_config(None, [f"train.adam_betas={betas}"])


def test_max_prompt_length_cuts_prompts_and_counts_them(tiny_overrides, tmp_path):
    """data.max_prompt_length keeps each rollout prompt's last tokens and logs the share cut (prompt/truncated): every
    prompt of the built-in task is longer than 3 characters, none is longer than 400; without the option, no metric."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        short, m_short, _ = step(tiny_overrides, tmp_path / "a", "data.max_prompt_length=3")
    _, m_long, _ = step(tiny_overrides, tmp_path / "b", "data.max_prompt_length=400")
    _, m_none, _ = step(tiny_overrides, tmp_path / "c")
    assert m_short["prompt/truncated"] == 1.0 and m_long["prompt/truncated"] == 0.0
    assert "prompt/truncated" not in m_none
    logged = [json.loads(line) for line in (short.run_dir / "completions.jsonl").read_text().splitlines()]
    assert logged and {len(r["templated_prompt"]) for r in logged} == {3}  # one character per token
    assert all(r["prompt"].endswith(r["templated_prompt"]) for r in logged)  # the last ones
