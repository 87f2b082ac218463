"""Rewards: the stage that scores completions, the registry of reward functions, and the built-in ones."""

from reasonrl.rewards.math import MathVerifier, VerifyResult, extract_answer, format_reward
from reasonrl.rewards.rouge import rouge_l_f1, rouge_tokenize
from reasonrl.rewards.stage import (
    REWARD_FUNCTIONS,
    RewardFunc,
    RewardOutput,
    Rewards,
    load_reward_function,
    register_reward,
)

__all__ = [
    "REWARD_FUNCTIONS",
    "MathVerifier",
    "RewardFunc",
    "RewardOutput",
    "Rewards",
    "VerifyResult",
    "extract_answer",
    "format_reward",
    "load_reward_function",
    "register_reward",
    "rouge_l_f1",
    "rouge_tokenize",
]
