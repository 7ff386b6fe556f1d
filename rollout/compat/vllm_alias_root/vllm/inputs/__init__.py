from rollout.inputs import PromptType, TextPrompt, TokensPrompt  # noqa: F401
