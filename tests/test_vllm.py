"""`rollout.engine=vllm` on this CPU through the `vllm-cpu` build. Skipped where vLLM is not installed: CI runs this
file in its own virtualenv (`.ci/run`, the vLLM step), since vLLM pins its own transformers."""

from __future__ import annotations

import os

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # one process: the engine shares the trainer's tensors
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

vllm = pytest.importorskip("vllm")

from reasonrl.config import load_config  # noqa: E402
from reasonrl.errors import UserError  # noqa: E402
from reasonrl.rollout.base import SamplingParams, make_engine  # noqa: E402
from reasonrl.rollout.vllm import VLLMEngine  # noqa: E402
from reasonrl.training.batch import make_micro_batches  # noqa: E402
from reasonrl.training.trainer import Trainer  # noqa: E402
from reasonrl.training.update import token_logprobs  # noqa: E402

# vLLM's CPU attention needs a head size it has kernels for (32 here: width 64, 2 heads)
VLLM = ["rollout.engine=vllm", "model.hidden_size=64", "model.num_heads=2", "model.intermediate_size=128"]
DENSE = [
    "rewards.functions=[math_answer,tests.conftest:length_reward]",
    "rewards.weights=[1.0,1.0]",
]  # non-zero advantages


def vllm_logprobs(engine: VLLMEngine, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """vLLM's log-probs of `completion` after `prompt` (teacher-forced: prompt log-probs of prompt + completion)."""
    params = vllm.SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0, detokenize=False)
    out = engine.llm.generate([{"prompt_token_ids": prompt + completion}], params, use_tqdm=False)[0]
    steps = out.prompt_logprobs[len(prompt) :]
    return torch.tensor([step[t].logprob for t, step in zip(completion, steps, strict=True)], dtype=torch.float64)


def trainer_logprobs(model, prompt: list[int], completion: list[int], pad_id: int) -> torch.Tensor:
    from reasonrl.rollout.base import Completion

    comp = Completion(prompt, completion, [0.0] * len(completion), False, "")
    mb = make_micro_batches([comp], torch.zeros(1), [True], 0, pad_id, torch.device("cpu"))[0]
    with torch.no_grad():
        return token_logprobs(model, mb, 1.0, forward="generic")[0][0].double()


def test_three_grpo_steps_with_vllm_log_the_mismatch_and_stay_in_sync(tiny_overrides, tmp_path):
    trainer = Trainer(load_config(None, [*tiny_overrides, *VLLM, *DENSE]), tmp_path / "run")
    try:
        assert isinstance(trainer.engine, VLLMEngine) and trainer.updater.is_correction == "tis"  # auto: on for vLLM
        prompt = trainer._prompt_ids([trainer.problems[0].prompt])[0]
        completion = trainer.tokenizer("12+34=46 \\boxed{46}", add_special_tokens=False)["input_ids"]
        before = [p.detach().clone() for p in trainer.model.parameters()]
        for _ in range(3):
            metrics = trainer.step()
            trainer.global_step += 1
            for key in ("rollout/logprob_diff/mean", "rollout/logprob_diff/max", "rollout/is_weight/mean"):
                assert key in metrics, key
            assert metrics["rollout/logprob_diff/max"] < 1e-3 and metrics["rollout/is_weight/mean"] == pytest.approx(
                1.0, abs=1e-3
            )
            # after each step's weight sync, vLLM scores a fixed completion as the trainer's model does
            got = vllm_logprobs(trainer.engine, prompt, completion)
            want = trainer_logprobs(trainer.model, prompt, completion, trainer.tokenizer.pad_token_id)
            assert (got - want).abs().max() < 1e-4
        assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters(), strict=True))
        evaluated = trainer.evaluate()  # the same vLLM instance serves evaluation
        assert 0 <= evaluated["eval/accuracy"] <= 1
    finally:
        trainer.close()


def test_a_weight_change_is_visible_to_the_next_generate_even_for_cached_prefixes(tiny_overrides, tmp_path):
    """A prompt longer than vLLM's KV block (prefix caching applies to whole blocks) is generated, the weights
    change, and the same prompt again must follow the new weights: no stale cached keys and values."""
    trainer = Trainer(load_config(None, [*tiny_overrides, *VLLM, "warmstart.steps=0"]), tmp_path / "run")
    try:
        engine, model, pad = trainer.engine, trainer.model, trainer.tokenizer.pad_token_id
        gen = torch.Generator().manual_seed(0)
        prompt = torch.randint(3, len(trainer.tokenizer), (300,), generator=gen).tolist()
        greedy = SamplingParams(max_new_tokens=8, temperature=0.0)
        first = engine.generate([prompt], 1, greedy)[0]
        old = trainer_logprobs(model, prompt, first.token_ids, pad)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.5)
        engine.load_weights(model)
        second = engine.generate([prompt], 1, SamplingParams(max_new_tokens=8, temperature=1.0))[0]
        got = vllm_logprobs(engine, prompt, second.token_ids)
        want = trainer_logprobs(model, prompt, second.token_ids, pad)
        assert (got - want).abs().max() < 1e-4
        assert (vllm_logprobs(engine, prompt, first.token_ids) - old).abs().max() > 1e-2  # the weights did change
    finally:
        trainer.close()


def test_greedy_vllm_equals_the_hf_engine(tiny_overrides, tmp_path):
    trainer = Trainer(load_config(None, [*tiny_overrides, *VLLM]), tmp_path / "run")
    try:
        prompts = trainer._prompt_ids([p.prompt for p in trainer.problems[:6]])
        greedy = SamplingParams(max_new_tokens=24, temperature=0.0)
        ours = trainer.engine.generate(prompts, 1, greedy)
        ref = make_engine("hf", trainer.model, trainer.tokenizer).generate(prompts, 1, greedy)
    finally:
        trainer.close()
    assert [c.token_ids for c in ours] == [c.token_ids for c in ref]
    assert [c.truncated for c in ours] == [c.truncated for c in ref]


def test_an_unsupported_head_size_is_refused_naming_the_sizes(tiny_overrides, tmp_path):
    cfg = load_config(None, [*tiny_overrides, "rollout.engine=vllm"])  # width 32, 2 heads: head size 16
    with pytest.raises(UserError, match=r"supports attention head sizes 32, 64, .*; this model's is 16"):
        Trainer(cfg, tmp_path / "run")


def test_identical_prompts_in_one_call_get_independent_samples(tiny_overrides, tmp_path):
    """LANPO sends a group's scratch prompts one by one (n = 1 each): each request has its own seed."""
    trainer = Trainer(load_config(None, [*tiny_overrides, *VLLM, "warmstart.steps=0"]), tmp_path / "run")
    try:
        prompt = trainer._prompt_ids([trainer.problems[0].prompt])[0]
        comps = trainer.engine.generate([prompt] * 6, 1, SamplingParams(max_new_tokens=16, temperature=1.0))
    finally:
        trainer.close()
    assert len({tuple(c.token_ids) for c in comps}) > 1


def test_resume_syncs_the_checkpoint_weights_and_eval_by_name_closes_its_engine(tiny_overrides, tmp_path):
    from reasonrl.evaluate import evaluate

    cfg = load_config(None, [*tiny_overrides, *VLLM, *DENSE, "train.run_name=r", "train.steps=3"])
    run = tmp_path / "runs" / "r"
    trainer = Trainer(cfg, run)
    trainer.step()
    trainer.global_step += 1
    trainer.checkpoint()
    trainer.close()
    resumed = Trainer(cfg, run, resume=True)
    try:
        prompt = resumed._prompt_ids([resumed.problems[0].prompt])[0]
        completion = resumed.tokenizer("7+8=15 \\boxed{15}", add_special_tokens=False)["input_ids"]
        got = vllm_logprobs(resumed.engine, prompt, completion)
        want = trainer_logprobs(resumed.model, prompt, completion, resumed.tokenizer.pad_token_id)
        assert (got - want).abs().max() < 1e-4  # vLLM samples from the resumed weights, not the warm-start's
        res = evaluate(resumed.model, resumed.tokenizer, resumed.eval_problems[:4], resumed.rewards,
                       max_new_tokens=8, engine="vllm")  # fmt: skip
        assert 0 <= res["accuracy"] <= 1
    finally:
        resumed.close()


@pytest.mark.parametrize(("options", "dtype"), [
    ([], torch.float32),  # model.dtype=auto: float32 on a CPU
    (["model.dtype=bfloat16"], torch.bfloat16),  # bf16 compute: vLLM in bf16, not in the float32 master weights'
    (["model.dtype=bfloat16", "rollout.vllm.dtype=float32"], torch.float32),
])  # fmt: skip
def test_vllm_samples_in_the_compute_dtype_and_syncs_weights_in_it(tiny_overrides, tmp_path, options, dtype):
    """`rollout.vllm.dtype=auto` is `model.dtype` (the loss passes' compute dtype), whatever the parameters' dtype; the
    weight sync hands vLLM the float32 master weights cast to its dtype: its log-probs follow them to that precision
    (perturbed weights, whose log-probs vLLM misses by up to 15 before the sync)."""
    trainer = Trainer(load_config(None, [*tiny_overrides, *VLLM, *options, "warmstart.steps=0"]), tmp_path / "run")
    try:
        assert trainer.model.dtype == torch.float32  # train.master_weights=fp32
        assert trainer.engine.dtype == dtype and trainer.engine.llm.llm_engine.model_config.dtype == dtype
        engine, model, pad = trainer.engine, trainer.model, trainer.tokenizer.pad_token_id
        gen = torch.Generator().manual_seed(0)
        prompt = torch.randint(3, len(trainer.tokenizer), (20,), generator=gen).tolist()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.5)
        completion = engine.generate([prompt], 1, SamplingParams(max_new_tokens=8, temperature=1.0))[0].token_ids
        stale = (vllm_logprobs(engine, prompt, completion) - trainer_logprobs(model, prompt, completion, pad)).abs()
        trainer.sync_weights()
        synced = (vllm_logprobs(engine, prompt, completion) - trainer_logprobs(model, prompt, completion, pad)).abs()
        assert float(stale.max()) > 1.0  # the perturbation moved the log-probs by more than 1 (measured: 15)
        # float32: exact to kernel rounding; bf16 (vLLM's kernels on bf16 weights): measured 0.3 against 15
        assert float(synced.max()) < (1e-4 if dtype == torch.float32 else float(stale.max()) / 20)
    finally:
        trainer.close()
