"""rollout: a rollout engine for RL post-training, embedded in every training rank."""

from rollout.entrypoints.async_llm import AsyncEngineArgs, AsyncLLM
from rollout.entrypoints.llm import LLM
from rollout.outputs import CompletionOutput, Logprob, RequestOutput, SamplingMask
from rollout.sampling_params import RequestOutputKind, SamplingParams

__all__ = [
    "LLM", "AsyncLLM", "AsyncEngineArgs", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob",
    "RequestOutputKind", "SamplingMask",
]
__version__ = "0.1.0"
