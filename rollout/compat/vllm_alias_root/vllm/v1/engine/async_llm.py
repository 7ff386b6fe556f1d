from rollout.entrypoints.async_llm import AsyncLLM  # noqa: F401
