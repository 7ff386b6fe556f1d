from rollout.entrypoints.async_llm import AsyncEngineArgs  # noqa: F401

# vLLM's synchronous twin takes the same keywords.
EngineArgs = AsyncEngineArgs
