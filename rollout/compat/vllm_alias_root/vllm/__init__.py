"""Not vLLM: rollout behind vLLM's module names (``rollout.compat.install_vllm_alias``)."""

from rollout import CompletionOutput, LLM, RequestOutput, SamplingParams  # noqa: F401
from rollout.compat.vllm_alias import VLLM_ALIAS_VERSION as __version__  # noqa: F401
from rollout.entrypoints.async_llm import AsyncEngineArgs, AsyncLLM  # noqa: F401
from rollout.inputs import TextPrompt, TokensPrompt  # noqa: F401
from rollout.sampling_params import RequestOutputKind  # noqa: F401

IS_ROLLOUT_ALIAS = True

# vLLM's older name of the async engine.
AsyncLLMEngine = AsyncLLM
