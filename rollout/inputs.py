"""Prompt forms, with vLLM's names: ``LLM.generate`` takes these dicts (or plain str / token-id lists)."""

from __future__ import annotations

from typing import TypedDict, Union


class TokensPrompt(TypedDict, total=False):
    """A prompt given as token ids (``prompt`` optionally carries its text)."""

    prompt_token_ids: list[int]
    prompt: str


class TextPrompt(TypedDict):
    """A prompt given as text, tokenized by the engine's tokenizer."""

    prompt: str


PromptType = Union[str, list[int], TokensPrompt, TextPrompt]
