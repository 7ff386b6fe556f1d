"""Two steps of TRL's GRPOTrainer (``use_vllm=True, vllm_mode="colocate"``) on CPU, with
rollout answering as vLLM. Run by tests/test_trl_colocate.py in a subprocess whose
PYTHONPATH starts with the alias directory (``python -m rollout.compat --path``),
so ``import vllm`` inside TRL finds rollout and the alias never leaks into the test session.

    python -m tests.helpers.trl_colocate_run MODEL_DIR OUT_DIR [--sleep-mode]

Writes OUT_DIR/result.json: TRL's log history, the completions the reward function saw,
what object TRL built as its ``LLM``, and greedy continuations of the evaluation prompts
from rollout and from HF transformers at the same weights (after step 1, as pushed by
TRL's own sync before step 2's rollouts; and after step 2, pushed by one more
``sync_weights()``), plus how far training moved the weights.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

# Plain-text prompts that all encode to the same number of tokens (checked below): TRL
# left-pads a batch and scores it with the attention mask alone, so with uneven prompts its
# logprobs of padded rows differ from any engine's (positions shift) and the
# sampling_logp_difference the test reads would measure padding, not the weight sync.
PROMPTS = ["In mathematics", "Once upon a", "Training a model", "The quick brown"]
MAX_NEW_TOKENS = 8


def prompt_length(tokenizer) -> int:
    lengths = {p: len(tokenizer(p)["input_ids"]) for p in PROMPTS}
    if len(set(lengths.values())) != 1:
        raise SystemExit(f"the prompts must encode to one token length, got {lengths}")
    return lengths[PROMPTS[0]]


def hf_greedy(model, prompt_ids: list[list[int]]) -> list[list[int]]:
    """Greedy continuation of each prompt by the HF model (one at a time: no padding)."""
    out = []
    with torch.no_grad():
        for ids in prompt_ids:
            gen = model.generate(
                torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                do_sample=False, max_new_tokens=MAX_NEW_TOKENS, eos_token_id=model.config.eos_token_id,
                pad_token_id=model.config.pad_token_id,
            )
            out.append(gen[0, len(ids):].tolist())
    return out


def rollout_greedy(llm, prompt_ids: list[list[int]]) -> list[list[int]]:
    from vllm import SamplingParams  # the alias: rollout.SamplingParams

    outs = llm.generate(
        [{"prompt_token_ids": ids} for ids in prompt_ids],
        sampling_params=SamplingParams(temperature=0.0, max_tokens=MAX_NEW_TOKENS), use_tqdm=False,
    )
    return [list(o.outputs[0].token_ids) for o in outs]


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[n] - b[n]).abs().max().item() for n in a)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("out_dir")
    parser.add_argument("--sleep-mode", action="store_true")
    args = parser.parse_args()
    out_dir = Path(args.out_dir)
    t_start = time.perf_counter()

    import vllm  # the alias, first on PYTHONPATH
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    import rollout

    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    prompt_len = prompt_length(tokenizer)
    dataset = Dataset.from_dict({"prompt": PROMPTS * 4})

    seen_completions: list[str] = []

    def length_reward(completions, **kwargs):
        """Characters, plus a tie-breaker by position: a group of equal rewards has zero
        advantages, hence no gradient, and the weight checks would compare equal weights."""
        seen_completions.extend(completions)
        return [len(c) + i / len(completions) for i, c in enumerate(completions)]

    snapshots: dict[int, dict[str, torch.Tensor]] = {}

    class Snapshot(TrainerCallback):
        """The trainer's weights at the end of each optimizer step."""

        def on_step_end(self, _args, state, _control, model=None, **kwargs):
            snapshots[state.global_step] = {n: p.detach().clone() for n, p in model.named_parameters()}

    config = GRPOConfig(
        output_dir=str(out_dir / "trainer"),
        use_vllm=True,
        vllm_mode="colocate",
        vllm_enable_sleep_mode=args.sleep_mode,
        vllm_max_model_length=prompt_len + MAX_NEW_TOKENS + 8,
        max_steps=2,
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=MAX_NEW_TOKENS,
        # Not 1: TRL scores completions at logits / temperature and asks the engine for
        # logprobs_mode="processed_logprobs"; raw logprobs would show as a sampling difference.
        temperature=0.8,
        # Large enough that one Adam step moves every weight by ~1e-2, so a missed weight
        # sync shows in the sampling logprobs (differences of 1e-1 and more).
        learning_rate=1e-2,
        use_cpu=True,
        bf16=False,
        report_to="none",
        logging_steps=1,
        save_strategy="no",
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = GRPOTrainer(
        model=args.model_dir, reward_funcs=length_reward, args=config, train_dataset=dataset,
        processing_class=tokenizer, callbacks=[Snapshot()],
    )
    initial = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    t_train = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t_train

    llm = trainer.vllm_generation.llm
    eval_ids = [tokenizer(p)["input_ids"] for p in PROMPTS]
    model = trainer.model.eval()
    result: dict = {
        "vllm_file": vllm.__file__,
        "llm_class": f"{type(llm).__module__}.{type(llm).__qualname__}",
        "llm_is_rollout": isinstance(llm, rollout.LLM),
        "global_step": trainer.state.global_step,
        "log_history": trainer.state.log_history,
        "completions": seen_completions,
        "moved_by_step1": max_abs_diff(initial, snapshots[1]),
        "moved_by_step2": max_abs_diff(snapshots[1], snapshots[2]),
    }

    # Without sleep mode the engine still holds what TRL pushed before step 2's rollouts:
    # the weights after step 1. (With sleep mode, level 2 dropped them after generating.)
    if not args.sleep_mode:
        final = {n: p.detach().clone() for n, p in model.named_parameters()}
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(snapshots[1][n])
        result["step1_hf"] = hf_greedy(model, eval_ids)
        result["step1_rollout"] = rollout_greedy(llm, eval_ids)
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(final[n])

    # One more push through TRL's own path (wakes the weights first in sleep mode).
    trainer.vllm_generation.sync_weights()
    if args.sleep_mode:
        llm.wake_up(tags=["kv_cache"])
    result["final_hf"] = hf_greedy(model, eval_ids)
    result["final_rollout"] = rollout_greedy(llm, eval_ids)
    result["train_s"] = train_s
    result["total_s"] = time.perf_counter() - t_start
    (out_dir / "result.json").write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
