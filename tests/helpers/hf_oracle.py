"""HF transformers as the oracle for end-to-end tests: greedy continuations, fp32 logits and
the reference of the sampling filters.

One ``HFOracle`` per model directory, loaded once per session. Greedy continuations are
cached per prompt; a shorter request is served as a prefix of a longer run.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import transformers


class HFOracle:
    def __init__(self, model_dir: Path, dtype: torch.dtype = torch.float32) -> None:
        self.model_dir = model_dir
        self.model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
        self._greedy: dict[tuple[int, ...], list[int]] = {}

    def greedy(self, prompt: list[int], num_tokens: int) -> list[int]:
        """HF greedy decoding with its KV cache, one prompt, no padding, exactly ``num_tokens``.

        A plain argmax loop rather than ``generate``: ``ignore_eos`` keeps going after an
        EOS argmax, while ``generate`` either stops there or (``min_new_tokens``) suppresses
        EOS logits; and it falls back to the model config's EOS when told there is none.
        """
        key = tuple(prompt)
        cached = self._greedy.get(key, [])
        if len(cached) < num_tokens:
            cached = []
            ids = torch.tensor([prompt])
            # Filled in place; positional because transformers renamed the argument
            # (``past_key_values`` -> ``cache``).
            kv = transformers.DynamicCache()
            with torch.no_grad():
                for _ in range(num_tokens):
                    out = self.model(ids, None, None, kv, use_cache=True)
                    cached.append(int(out.logits[0, -1].argmax()))
                    ids = torch.tensor([[cached[-1]]])
            self._greedy[key] = cached
        return cached[:num_tokens]

    def logprobs(self, token_ids: list[int]) -> torch.Tensor:
        """fp32 log-softmax of one forward over ``token_ids``: row j predicts token j + 1. [len, vocab]"""
        return self.logits(token_ids).log_softmax(-1)

    def logits(self, token_ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return self.model(torch.tensor([token_ids])).logits[0].float()  # [len, vocab]


def random_prompt(length: int, seed: int, vocab: int = 384) -> list[int]:
    """Token ids in [3, vocab): never the tokenizer's special tokens (0, 1, 2)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (length,), generator=gen).tolist()


def processed_logprobs(
    logits: torch.Tensor, temperature: float, min_p: float = 0.0, top_k: int = 0, top_p: float = 1.0,
    tol: float = 1e-6,
) -> tuple[torch.Tensor, bool]:
    """Reference of the sampled-from distribution of one position, in float64.

    Temperature (0: untempered), then min-p, top-k, top-p, as ``SamplingParams`` says.
    Returns (log-probs [vocab] with ``-inf`` outside the allowed set, ambiguous): ambiguous
    when some token lies within ``tol`` of a threshold, so fp32 rounding could decide it.
    """
    x = logits.double() / (temperature if temperature > 0 else 1.0)  # [vocab]
    keep = torch.ones_like(x, dtype=torch.bool)
    ambiguous = False
    if min_p > 0:
        p = x.softmax(-1)
        threshold = min_p * p.max()
        keep &= p >= threshold
        ambiguous |= bool(((p - threshold).abs() < tol).any())
    if 0 < top_k < int(keep.sum()):
        vals = x[keep].sort(descending=True).values
        keep &= x >= vals[top_k - 1]
        ambiguous |= bool(vals[top_k - 1] - vals[top_k] < tol)
    if top_p < 1:
        p = x.masked_fill(~keep, -math.inf).softmax(-1)
        p_sorted, order = p.sort(descending=True)
        mass_before = p_sorted.cumsum(-1) - p_sorted  # mass of strictly more likely tokens
        nucleus = torch.zeros_like(keep)
        nucleus[order[mass_before < top_p]] = True
        keep &= nucleus
        ambiguous |= bool(((mass_before[p_sorted > 0] - top_p).abs() < tol).any())
    return x.masked_fill(~keep, -math.inf).log_softmax(-1), ambiguous
