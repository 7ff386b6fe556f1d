"""Engine configuration: one frozen ``EngineConfig`` of small frozen dataclasses.

``LLM``'s arguments are validated and resolved against the model once (``EngineConfig.create``)
and the whole config is handed to each part, which reads what it needs under the public
names (``max_num_seqs``, ``max_model_len``, ``max_num_batched_tokens``, ...). Every default
lives here, once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from rollout.errors import InvalidRequestError

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_MAX_NUM_BATCHED_TOKENS = 8192
# A config that records no max_position_embeddings.
DEFAULT_MAX_MODEL_LEN = 2048
# "safetensors" is vLLM's name for what "auto" does here (safetensors is the only format read).
LOAD_FORMATS = ("auto", "safetensors", "dummy")
# vLLM's LLM(logprobs_mode=...) values -> SamplingParams.logprobs_mode; ours pass through.
VLLM_LOGPROBS_MODES = {"processed_logprobs": "processed", "raw_logprobs": "raw"}
DEFAULT_LOGPROBS_MODE = "processed"


def resolve_dtype(dtype: str | torch.dtype, checkpoint_dtype: torch.dtype | None) -> torch.dtype:
    """``"auto"`` means the checkpoint's dtype (float32 when it records none)."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise InvalidRequestError("dtype", dtype, f"one of {list(_DTYPES)} or 'auto'")
        return dtype
    if dtype == "auto":
        return checkpoint_dtype if checkpoint_dtype in _DTYPES.values() else torch.float32
    if not isinstance(dtype, str) or dtype not in _DTYPES:
        raise InvalidRequestError("dtype", dtype, f"one of {list(_DTYPES)}, 'auto' or a torch.dtype")
    return _DTYPES[dtype]


@dataclass(frozen=True)
class ModelConfig:
    """The model as the engine runs it."""

    hf_config: Any
    architectures: tuple[str, ...] | None
    dtype: torch.dtype
    max_model_len: int
    load_format: str = "auto"  # "dummy": random weights from ``seed``, no checkpoint read
    seed: int = 0  # the engine's RNG (unseeded requests) and dummy weights

    def __post_init__(self) -> None:
        if self.load_format not in LOAD_FORMATS:
            raise InvalidRequestError(
                "load_format", self.load_format, "'auto' or 'safetensors' (load the checkpoint) or 'dummy' (random weights, no checkpoint read)"
            )
        if not _is_int(self.seed):
            raise InvalidRequestError("seed", self.seed, "an int")

    @property
    def vocab_size(self) -> int:
        return self.hf_config.vocab_size

    @property
    def quantization(self) -> str | None:
        """"fp8" or None, as ``hf_config.quantization_config`` records it (the checkpoint's,
        or what ``EngineConfig.create`` wrote for ``quantization="fp8"``): what build_model reads."""
        from rollout.models.quantization import quantization_of

        return quantization_of(self.hf_config)


@dataclass(frozen=True)
class CacheConfig:
    """The paged KV cache: ``num_kv_blocks`` (or ``kv_cache_memory_bytes``) sizes it;
    otherwise the platform decides (``gpu_memory_utilization`` of the device on GPU)."""

    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_memory_bytes: int | None = None
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        if not _is_int(self.block_size) or self.block_size < 1:
            raise InvalidRequestError("block_size", self.block_size, "an int >= 1")
        if self.num_kv_blocks is not None and (not _is_int(self.num_kv_blocks) or self.num_kv_blocks < 1):
            raise InvalidRequestError("num_kv_blocks", self.num_kv_blocks, "None or an int >= 1")
        if self.kv_cache_memory_bytes is not None and (
            not _is_int(self.kv_cache_memory_bytes) or self.kv_cache_memory_bytes < 1
        ):
            raise InvalidRequestError("kv_cache_memory_bytes", self.kv_cache_memory_bytes, "None or an int >= 1")
        if not _is_real(self.gpu_memory_utilization) or not 0 < self.gpu_memory_utilization <= 1:
            raise InvalidRequestError("gpu_memory_utilization", self.gpu_memory_utilization, "a float in (0, 1]")
        if not isinstance(self.enable_prefix_caching, bool):
            raise InvalidRequestError("enable_prefix_caching", self.enable_prefix_caching, "a bool")


@dataclass(frozen=True)
class SchedulerConfig:
    """One step's budget: at most ``max_num_seqs`` requests and ``max_num_batched_tokens``
    tokens; a sequence holds at most ``max_model_len`` tokens."""

    max_num_seqs: int = 256
    max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS
    max_model_len: int = DEFAULT_MAX_MODEL_LEN
    enable_chunked_prefill: bool = True

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            v = getattr(self, name)
            if not _is_int(v) or v < 1:
                raise InvalidRequestError(name, v, "an int >= 1")
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise InvalidRequestError(
                "max_num_batched_tokens", self.max_num_batched_tokens,
                f"an int >= max_model_len={self.max_model_len} when chunked prefill is off",
            )


@dataclass(frozen=True)
class ParallelConfig:
    """Tensor parallelism over the caller's process group (see ``rollout.distributed``)."""

    tensor_parallel_size: int = 1
    tp_group: Any = None  # a caller's torch.distributed group of tensor_parallel_size ranks
    debug_tp_agreement: bool = False  # check each step that the group's ranks agree

    def __post_init__(self) -> None:
        if not _is_int(self.tensor_parallel_size) or self.tensor_parallel_size < 1:
            raise InvalidRequestError("tensor_parallel_size", self.tensor_parallel_size, "an int >= 1")
        if not isinstance(self.debug_tp_agreement, bool):
            raise InvalidRequestError("debug_tp_agreement", self.debug_tp_agreement, "a bool")

    @property
    def enabled(self) -> bool:
        return self.tensor_parallel_size != 1 or self.tp_group is not None


@dataclass(frozen=True)
class VllmOptions:
    """vLLM engine keywords that RL frameworks pass to ``LLM`` (TRL, verl). Each one either
    means here what it means in vLLM or is refused with ``UnsupportedFeatureError`` naming
    the values supported; none is dropped when it would change what the engine does.

    - ``enable_sleep_mode``: any bool. Sleep is always available here (the weights and KV
      cache live in arenas that can be released), so False does not take it away. True says
      the engine will sleep: the host copy that ``sleep(level=1)`` keeps of the weights (the
      weights' bytes of host memory, pinned on a GPU; per rank) is allocated from start-up
      in a background thread, so the first sleep(1) costs what later ones do instead of
      the allocation (seconds for a few GB of pinned memory). False: nothing is allocated
      until the first sleep(1), which pays for it. ``sleep(level=2)`` drops the copy (torch
      keeps the freed pinned blocks cached for reuse). While the background allocation
      runs (seconds after start-up), a CUDA-graph capture in another thread of the process
      may fail: torch's pinned allocator queries CUDA events, which a capture in the
      default global mode forbids; the engine captures its own graphs before it starts.
    - ``distributed_executor_backend``: None, "external_launcher" or "uni": this process
      is one rank's engine, which is the only way rollout runs (tensor parallelism over the
      caller's ``torch.distributed`` world, as vLLM's external launcher does). "mp" and
      "ray" (engines in worker processes) are refused: see ``rollout.distributed`` for Ray.
    - ``model_impl``: "auto" or "vllm" (this engine's own model code); "transformers" refused.
    - ``quantization``: None (the checkpoint's own: an FP8 checkpoint runs in FP8) or "fp8":
      the decoder's linear layers hold e4m3 weights with 128x128 block scales, quantized
      from full-precision weights on load and on every update; activations are quantized
      per token and 128-group. Others ("bitsandbytes", "awq", ...) are refused.
    - ``skip_tokenizer_init``: True loads no tokenizer (prompts must be token ids, outputs
      carry no text), as in vLLM.
    - ``trust_remote_code``: any bool; no code from a model directory is ever run, and the
      supported architectures do not need it.
    - ``disable_custom_all_reduce``, ``disable_log_stats``: any bool; there is no custom
      all-reduce (collectives are ``torch.distributed``'s) and no periodic stats log.
    - ``enable_lora``: False only; ``compilation_config``: None only (CUDA graphs are
      captured for decode unless ``enforce_eager``).
    """

    enable_sleep_mode: bool = False
    distributed_executor_backend: str | None = None
    model_impl: str = "auto"
    quantization: str | None = None
    skip_tokenizer_init: bool = False
    trust_remote_code: bool = False
    disable_custom_all_reduce: bool = False
    disable_log_stats: bool = True
    enable_lora: bool = False
    compilation_config: Any = None

    def __post_init__(self) -> None:
        for name in ("enable_sleep_mode", "skip_tokenizer_init", "trust_remote_code", "disable_custom_all_reduce",
                     "disable_log_stats", "enable_lora"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidRequestError(name, getattr(self, name), "a bool")
        _only("distributed_executor_backend", self.distributed_executor_backend, (None, "external_launcher", "uni"),
              "engines in worker processes ('mp', 'ray') are not supported: every rank builds its own LLM")
        _only("model_impl", self.model_impl, ("auto", "vllm"), "rollout runs its own model implementations")
        _only("quantization", self.quantization, (None, "fp8"),
              "FP8 with 128x128 weight blocks is the only quantization built")
        _only("enable_lora", self.enable_lora, (False,), "LoRA adapters are not supported yet")
        _only("compilation_config", self.compilation_config, (None,),
              "torch.compile configs are not supported; decode runs in CUDA graphs unless enforce_eager=True")


def resolve_logprobs_mode(mode: str | None) -> str:
    """``LLM(logprobs_mode=...)``: None (ours: "processed"), a ``SamplingParams.logprobs_mode``
    or vLLM's "processed_logprobs"/"raw_logprobs"; vLLM's logits modes are refused."""
    from rollout.errors import UnsupportedFeatureError
    from rollout.sampling_params import LOGPROBS_MODES

    if mode is None:
        return DEFAULT_LOGPROBS_MODE
    if mode in LOGPROBS_MODES:
        return mode
    if mode in VLLM_LOGPROBS_MODES:
        return VLLM_LOGPROBS_MODES[mode]
    if mode in ("raw_logits", "processed_logits"):
        raise UnsupportedFeatureError(
            f"logprobs_mode={mode!r}: returning logits is not supported; use one of "
            f"{list(VLLM_LOGPROBS_MODES)} or {list(LOGPROBS_MODES)}"
        )
    raise InvalidRequestError("logprobs_mode", mode, f"None, one of {list(VLLM_LOGPROBS_MODES)} or {list(LOGPROBS_MODES)}")


@dataclass(frozen=True)
class EngineConfig:
    """Everything an engine is built from, validated once. Parts get it whole."""

    model: ModelConfig
    cache: CacheConfig
    scheduler: SchedulerConfig
    parallel: ParallelConfig
    device: torch.device
    enforce_eager: bool = False  # no CUDA graphs
    # What SamplingParams(logprobs_mode=None) reports: "processed", "scaled" or "raw".
    logprobs_mode: str = DEFAULT_LOGPROBS_MODE
    vllm: VllmOptions = field(default_factory=lambda: VllmOptions())
    # Exact on-policy mode: a token's logits and logprobs never depend on the batch.
    batch_invariant: bool = False

    def __post_init__(self) -> None:
        for name in ("enforce_eager", "batch_invariant"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidRequestError(name, getattr(self, name), "a bool")
        if self.batch_invariant and self.model.quantization is not None:
            from rollout.errors import UnsupportedFeatureError

            raise UnsupportedFeatureError(
                f"batch_invariant=True with quantization {self.model.quantization!r}: the batch-invariant "
                "kernels have no fp8 GEMM yet; use quantization=None (and a full-precision checkpoint)"
            )

    @classmethod
    def create(
        cls, *, hf_config: Any, architectures: list[str] | None, checkpoint_dtype: torch.dtype | None,
        device: torch.device, dtype: str | torch.dtype = "auto", seed: int = 0, max_model_len: int | None = None,
        max_num_seqs: int = 256, max_num_batched_tokens: int | None = None, block_size: int = 16,
        num_kv_blocks: int | None = None, kv_cache_memory_bytes: int | None = None,
        gpu_memory_utilization: float = 0.9, enable_prefix_caching: bool = True, enforce_eager: bool = False,
        load_format: str = "auto", tensor_parallel_size: int = 1, tp_group: Any = None,
        debug_tp_agreement: bool = False, enable_chunked_prefill: bool = True, logprobs_mode: str | None = None,
        vllm: VllmOptions | None = None, batch_invariant: bool = False,
    ) -> EngineConfig:
        """Validate ``LLM``'s arguments and resolve them against the model's config:
        ``dtype="auto"`` is the checkpoint's, ``max_model_len=None`` the model's
        ``max_position_embeddings``, ``quantization="fp8"`` a copy of ``hf_config`` that
        records it (``rollout.models.quantization.with_quantization``)."""
        from rollout.models.quantization import with_quantization

        vllm = vllm or VllmOptions()
        hf_config = with_quantization(hf_config, vllm.quantization)
        cache = CacheConfig(block_size, num_kv_blocks, kv_cache_memory_bytes, gpu_memory_utilization, enable_prefix_caching)
        max_pos = getattr(hf_config, "max_position_embeddings", None) or DEFAULT_MAX_MODEL_LEN
        if max_model_len is None:
            max_model_len = max_pos
        elif not _is_int(max_model_len) or not 2 <= max_model_len <= max_pos:
            raise InvalidRequestError(
                "max_model_len", max_model_len, f"an int in [2, {max_pos}] (the model's max_position_embeddings)"
            )
        model = ModelConfig(
            hf_config, tuple(architectures) if architectures else None, resolve_dtype(dtype, checkpoint_dtype),
            max_model_len, load_format, seed,
        )
        if not isinstance(enable_chunked_prefill, bool):
            raise InvalidRequestError("enable_chunked_prefill", enable_chunked_prefill, "a bool")
        if max_num_batched_tokens is None:
            # Without chunking a whole prompt must fit one step's budget.
            max_num_batched_tokens = DEFAULT_MAX_NUM_BATCHED_TOKENS
            if not enable_chunked_prefill:
                max_num_batched_tokens = max(max_num_batched_tokens, max_model_len)
        scheduler = SchedulerConfig(max_num_seqs, max_num_batched_tokens, max_model_len, enable_chunked_prefill)
        parallel = ParallelConfig(tensor_parallel_size, tp_group, debug_tp_agreement)
        return cls(model, cache, scheduler, parallel, device, enforce_eager, resolve_logprobs_mode(logprobs_mode), vllm,
                   batch_invariant)


def _only(name: str, value: Any, allowed: tuple, why: str) -> None:
    if value not in allowed:
        from rollout.errors import UnsupportedFeatureError

        raise UnsupportedFeatureError(f"{name}={value!r}: supported values are {list(allowed)} ({why})")


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
