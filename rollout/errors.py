"""Typed errors raised by rollout.

Every error is raised before any work is done for the call that caused it, names what was
wrong and what is allowed, and leaves the engine usable for the next call.
"""

from __future__ import annotations

from typing import Any


class RolloutError(Exception):
    """Base class of every error rollout raises on purpose."""


class InvalidRequestError(RolloutError, ValueError):
    """A prompt or a sampling parameter is invalid.

    ``field`` names the offending argument, ``value`` is what was given and ``allowed``
    says what would have been accepted.
    """

    def __init__(self, field: str, value: Any, allowed: str, detail: str = "") -> None:
        self.field = field
        self.value = value
        self.allowed = allowed
        shown = repr(value)
        if len(shown) > 200:
            shown = shown[:200] + "..."
        msg = f"invalid {field}={shown}: allowed {allowed}"
        if detail:
            msg += f" ({detail})"
        super().__init__(msg)


class UnsupportedModelError(RolloutError, ValueError):
    """The model's architecture has no implementation in the model registry."""


class CheckpointError(RolloutError, ValueError):
    """A checkpoint is missing, not safetensors, or has missing/extra/misshaped tensors."""


class WeightUpdateError(RolloutError, ValueError):
    """A weight update named an unknown tensor or gave a wrong shape; nothing was changed."""


class WeightSyncError(WeightUpdateError):
    """A weight transfer from another process (broadcast, CUDA IPC, a Ray call) was malformed,
    out of bounds or cut off. The data is refused before anything is written; on a broadcast
    both sides end the transfer with this error, so neither waits for the other."""


class NonFiniteError(RolloutError, ValueError):
    """A request's logits turned NaN or inf during generation: that sample ends with
    finish_reason "error" (the bad token is not kept) and the others continue.
    ``request_ids`` names the prompts affected; from ``generate``, ``outputs`` holds every
    prompt's final RequestOutput (raised once the whole batch has finished). Non-finite
    *weights* are refused by ``update_weights`` as a ``WeightUpdateError`` instead."""

    def __init__(self, msg: str, request_ids: tuple[str, ...] = (), outputs: list | None = None) -> None:
        super().__init__(msg)
        self.request_ids = request_ids
        self.outputs = outputs


class EngineStepError(RolloutError, RuntimeError):
    """A step failed inside the engine (not because of bad input, which is refused at
    submission). The step was rolled back: no request lost a token, the KV the step may
    have written is dropped, and the engine is usable; ``__cause__`` is the original error."""


class PeerFailureError(RolloutError, RuntimeError):
    """Another rank of a collective (a tensor-parallel peer, a weight sender) died or did not
    answer within the timeout. The local engine's weights are unchanged."""


class EngineSleepingError(RolloutError, RuntimeError):
    """The call needs memory that is released by ``sleep``; call ``wake_up`` first."""


class WakeOOMError(RolloutError, MemoryError):
    """``wake_up`` could not get its memory back; nothing was left half-mapped."""


class HostMemoryError(RolloutError, MemoryError):
    """``sleep(level=1)`` could not allocate the host memory that keeps the weights (pinned
    memory on a GPU: the host is out of memory or of lockable pages). Nothing was released:
    the engine is awake and unchanged (its KV cache and requests in flight included), and
    a later ``sleep`` tries the allocation again. ``__cause__`` is the allocator's error."""


class EngineStateError(RolloutError, RuntimeError):
    """The call does not fit the engine's state: ``resume()`` without ``pause()``, or a
    blocking call (``generate``, ``score``) that could never finish while paused."""


class ParallelMismatchError(RolloutError, RuntimeError):
    """Debug check (``debug_tp_agreement``): the ranks of a tensor-parallel group were given
    different prompts, or sampled different tokens at a step. Raised on every rank."""


class UnsupportedFeatureError(RolloutError, NotImplementedError):
    """A vLLM feature rollout does not implement yet (LoRA adapters, structured outputs, a
    ``collective_rpc`` method, an engine option value). A ``NotImplementedError``, which is
    what vLLM's callers catch for a backend that lacks a method."""


class PlatformError(RolloutError, RuntimeError):
    """No platform matches the requested device, or a platform plugin failed to load."""
