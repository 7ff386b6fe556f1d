"""The verifiable task of the RL examples: short additions a 135M model can get better at
in minutes. A completion earns 1.0 when the right sum appears among its numbers."""

from __future__ import annotations

import random
import re


def make_problems(rng: random.Random, count: int, max_operand: int) -> list[tuple[str, int]]:
    """``count`` (question, answer) pairs with operands in [0, max_operand]."""
    out = []
    for _ in range(count):
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        out.append((f"What is {a}+{b}? Answer with the number only.", a + b))
    return out


def reward(text: str, answer: int) -> float:
    return 1.0 if str(answer) in re.findall(r"-?\d+", text) else 0.0


def chat_prompts(tokenizer, problems: list[tuple[str, int]]) -> list[str]:
    """The questions in the model's chat template, ready for generation."""
    return [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
        for q, _ in problems
    ]
