"""The built-in task: multi-digit addition with a worked column-by-column scratchpad and a `\\boxed{}` answer.

Small enough for a CPU to learn in minutes, yet a real reasoning trace: every column's sum depends on the carry of
the previous one, and the answer must be assembled from the column digits in reverse order. Like nanoGPT's
shakespeare_char, it exists to show the whole pipeline learning, with a character-level tokenizer built here.

    prompt:    "Q: 347+589\n"
    reference: "7+9=16\n4+8+1=13\n3+5+1=9\n\\boxed{936}"
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable

from reasonrl.data.problems import Problem

# Character-level vocabulary: enough for the task's notation and for plain English instructions.
SPECIAL_TOKENS = ["<pad>", "<unk>", "<eos>"]
CHARS = string.digits + string.ascii_letters + " \n+-*/=?:.,;!'\"()[]{}<>\\^_#%&|~@$`"


def build_tokenizer():  # -> transformers.PreTrainedTokenizerFast
    """A character-level tokenizer saved and reloaded like any Hugging Face tokenizer (no hub download)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + list(CHARS))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>", padding_side="left"
    )


def solve(a: int, b: int, forget_carry: Callable[[], bool] | None = None) -> str:
    """The worked scratchpad for a+b: one line per column, right to left, carrying into the next.

    `forget_carry` turns this into a flawed demonstrator: when it returns True at a carry, the carry is dropped
    (the line omits "+1" and the final answer is wrong accordingly), as a careless student would.
    """
    da, db = str(a)[::-1], str(b)[::-1]
    lines, digits, carry = [], [], 0
    for i in range(max(len(da), len(db))):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        if carry and forget_carry is not None and forget_carry():
            carry = 0
        total = x + y + carry
        lines.append(f"{x}+{y}" + ("+1" if carry else "") + f"={total}")
        digits.append(str(total % 10))
        carry = total // 10
    if carry:
        digits.append("1")
    lines.append("\\boxed{" + "".join(reversed(digits)) + "}")
    return "\n".join(lines)


def demonstration(problem: Problem, error_rate: float, rng: random.Random) -> str:
    """A warm-start demonstration of a built-in problem by a demonstrator that forgets each carry w.p. error_rate.

    Imitation copies the flaw; only a reward that checks the answer can remove it. That is the point of the demo:
    the warm-started model is fluent but often wrong, and RL with a verifier fixes what SFT taught.
    """
    a, b = problem.metadata["a"], problem.metadata["b"]
    return solve(a, b, lambda: rng.random() < error_rate)


# Rule-based lessons for the warm-start's LANPO formats: plain words, in the tokenizer's alphabet, under 64 chars.
LESSON_CARRY = "carry the 1 into the next column when a sum is 10 or more."
LESSON_COLUMNS = "add the columns from the right, one line per column."
LESSONS = (LESSON_CARRY, LESSON_COLUMNS)


def dropped_carry(problem: Problem, response: str) -> bool:
    """Whether a demonstration of `problem` slipped: the flawed demonstrator's only slip is a forgotten carry."""
    return response != solve(problem.metadata["a"], problem.metadata["b"])


def lesson_for(shown: list[tuple[Problem, str]]) -> str:
    """The lesson a careful reader draws from (problem, demonstration) pairs: name the slip if one is visible."""
    return LESSON_CARRY if any(dropped_carry(p, r) for p, r in shown) else LESSON_COLUMNS


def make_problem(a: int, b: int, pid: str) -> Problem:
    return Problem(id=pid, prompt=f"Q: {a}+{b}\n", answer=str(a + b), reference=solve(a, b), metadata={"a": a, "b": b})


def generate(n: int, *, min_digits: int, max_digits: int, seed: int, prefix: str, exclude: set[str] = frozenset()):
    """n distinct problems (operand digit counts uniform in [min_digits, max_digits]), skipping `exclude` prompts."""
    if min_digits > max_digits:
        from reasonrl.errors import UserError

        raise UserError(f"task.min_digits ({min_digits}) must be <= task.max_digits ({max_digits})")
    rng = random.Random(seed)
    seen, out = set(exclude), []
    capacity = sum(9 * 10 ** (d - 1) for d in range(min_digits, max_digits + 1)) ** 2
    n = min(n, capacity - len(seen))
    while len(out) < n:
        a, b = (rng.randint(10 ** (d - 1), 10**d - 1) for d in (rng.randint(min_digits, max_digits) for _ in "ab"))
        p = make_problem(a, b, f"{prefix}-{len(out)}")
        if p.prompt not in seen:
            seen.add(p.prompt)
            out.append(p)
    return out


def load_task(task, split: str) -> list[Problem]:
    """The train or test split of the built-in task; test problems never occur in train."""
    test = generate(
        task.eval_size,
        min_digits=task.min_digits,
        max_digits=task.max_digits,
        seed=task.seed,
        prefix="add-test",
    )
    if split == "test":
        return test
    return generate(
        task.train_size,
        min_digits=task.min_digits,
        max_digits=task.max_digits,
        seed=task.seed + 1,
        prefix="add-train",
        exclude={p.prompt for p in test},
    )
