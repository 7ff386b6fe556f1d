"""vllm_peer: nano-bench and decode-step through vLLM's offline ``vllm.LLM`` and through
rollout, in one process run (``rollout-bench peer --peer-engine vllm``): vLLM first, then
freed, then ours; the ratios are rollout over vLLM, > 1 where rollout is faster.

Runs wherever ``import vllm`` works (on the GPU machine: benchmarks/vllm_wheels.sh brings
vLLM 0.22.0 there). The version imported is recorded in every result (``vllm_version``).
rollout's own ``vllm`` alias (rollout.compat.install_vllm_alias) answers ``import vllm``
too, with the version ``0.22.0+rollout``: it is refused, since the comparison would be
rollout against itself, unless ``--allow-vllm-alias`` (CPU tests of this code path); then
the result says ``vllm_is_rollout_alias: true`` and the printed table says it is not vLLM.

vLLM's engine (every option recorded under ``vllm.options``, what vLLM resolved from them
under ``vllm.resolved``): the config.json-only directory ours is built from (configs.py),
``load_format="dummy"`` (random weights on both sides; with ignore_eos the values do not
change the work), ``skip_tokenizer_init=True`` (the directory has no tokenizer: prompts are
token ids), the same ``dtype``, ``seed``, ``enforce_eager`` (False unless --enforce-eager:
vLLM compiles and captures CUDA graphs, ours captures decode graphs), ``max_model_len``,
``max_num_seqs`` and ``max_num_batched_tokens`` (ours, 8192; vLLM's own defaults for
``LLM`` on an 80 GB GPU would be 1024 and 16384), prefix caching on, and the KV cache sized
as ours: ``gpu_memory_utilization`` ours (0.9), or ``kv_cache_memory_bytes`` when
``--kv-cache-gb`` is given. Block size, async scheduling, compilation and attention backend
are vLLM's defaults. Sampling: ``SamplingParams(temperature=1.0, ignore_eos=True,
max_tokens=n, detokenize=False)``, top-k/top-p/min-p at vLLM's defaults (off). With no
top-k/top-p vLLM samples through its PyTorch path whether or not FlashInfer is installed
(``TopKTopPSampler.forward_cuda``), so running with ``VLLM_USE_FLASHINFER_SAMPLER=0`` (as
vllm_wheels.sh does: FlashInfer is not carried) changes nothing measured; recorded under
``vllm.env``.

nano-bench: nano_bench.workload's prompts and output lengths (the same seed), one
``generate`` call of all of them after a warm-up request; tok/s of output tokens (checked:
exactly the workload's). Ours: nano_bench.run_on on the same prompts.

decode-step: ms per decode step of B requests at context 2048, from whole ``generate``
calls: T(m + k) - T(m), over k, where T(n) is one call of B fresh random 2047-token prompts
with ``max_tokens=n`` (fresh prompts each call: no prefix-cache hit) and m exceeds the steps
the prefills take (``lead_tokens``). Why not ``llm.llm_engine.add_request``/``step`` (what
ours is timed with): in vLLM 0.22 ``LLMEngine.step`` is one engine step only with an
in-process engine core (VLLM_ENABLE_V1_MULTIPROCESSING=0); the default engine core is
another process that steps on its own while ``step`` collects what it sent, and the in-
process one does not give its GPU memory back when deleted (vllm#21073), which this run
needs for ours. Why not T(1 + k) - T(1), as the HF peer does: with chunked prefill the first
requests decode while later ones still prefill, so most of the k extra tokens of a large
batch would ride along in prefill steps (at B=256 the prefills take ~65 steps) and the
difference would not be k decode steps. With m past the last prefill, both calls run the
same schedule until the first request reaches m tokens; from there the longer call has every
request decoding for k more steps, then both drain alike (k tokens later: the longer call's
drain attends over k more positions, which slightly disfavours vLLM). So the difference is k
full-batch decode steps, host and scheduling overheads included, as ours' wall-clock
``step_ms`` is. The timed contexts run from 2048 up to 2047 + m + k (reported; ours'
``mean_context`` beside it). Each length is timed ``ROUNDS`` times, alternating, fastest
kept. ``vllm_kv_fits``: the B sequences fit vLLM's KV blocks (no preemption).

Freeing vLLM: vLLM 0.22's ``LLM`` has no ``shutdown`` (vllm PR #36283 was closed; #46023,
still open, adds one), so the engine core client's is called
(``llm.llm_engine.engine_core.shutdown()``: the engine core process ends and its GPU memory
with it), then ``del``, ``gc.collect()``, ``torch.cuda.empty_cache()``. The device's free
memory is compared with what it was before vLLM started; if vLLM held on to more than
``MAX_UNRELEASED_BYTES`` after ``RELEASE_WAIT_S``, the run stops before ours starts (ours
would get a smaller KV cache). Engines without ``engine_core`` (the alias) get
``shutdown()``.
"""

from __future__ import annotations

import gc
import importlib.metadata
import random
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from rollout.bench import decode_step as ours_decode_step
from rollout.bench import nano_bench, roofline
from rollout.bench.common import Options, build_llm, dispose, now, scaled
from rollout.bench.configs import hf_config, write_model_dir
from rollout.config import DEFAULT_MAX_NUM_BATCHED_TOKENS, CacheConfig, SchedulerConfig

WORKLOADS = ("nano-bench", "decode-step")
ROUNDS = 2  # decode-step: each generate length timed this many times, fastest kept
MAX_UNRELEASED_BYTES = 1 << 30
RELEASE_WAIT_S = 30.0
# vLLM environment knobs that change what runs, recorded with the result (read from vllm.envs).
VLLM_ENV = ("VLLM_USE_FLASHINFER_SAMPLER", "VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_USE_V2_MODEL_RUNNER")


def run(opts: Options, hw: roofline.Hardware) -> dict[str, Any]:
    if opts.peer_workload not in WORKLOADS:
        raise ValueError(f"--peer-engine vllm runs {WORKLOADS}, not {opts.peer_workload!r}")
    vllm, info = import_vllm(opts.allow_vllm_alias)  # before any work
    if opts.peer_workload == "nano-bench":
        return _nano_bench(opts, hw, vllm, info)
    return _decode_step(opts, hw, vllm, info)


def import_vllm(allow_alias: bool) -> tuple[ModuleType, dict[str, Any]]:
    """The ``vllm`` module and what it is: ``vllm_version``, ``vllm_is_rollout_alias``,
    ``vllm_path``. Raises RuntimeError when vLLM is not importable, or is rollout's alias
    and ``allow_alias`` is False."""
    try:
        import vllm
    except ImportError as e:
        raise RuntimeError(
            f"--peer-engine vllm needs vLLM importable ({e}); on the GPU machine benchmarks/vllm_wheels.sh "
            "brings vLLM 0.22.0 and what it needs"
        ) from e
    is_alias = bool(getattr(vllm, "IS_ROLLOUT_ALIAS", False))
    version = getattr(vllm, "__version__", None) or importlib.metadata.version("vllm")
    if is_alias and not allow_alias:
        raise RuntimeError(
            f"the imported vllm ({version}, {vllm.__file__}) is rollout's own alias, not vLLM: the comparison "
            "would be rollout against itself. Run where vLLM is installed (and the alias not installed), or pass "
            "--allow-vllm-alias to run this code path on rollout (the result then says vllm_is_rollout_alias: true)"
        )
    return vllm, {"vllm_version": version, "vllm_is_rollout_alias": is_alias, "vllm_path": vllm.__file__}


def engine_options(opts: Options, model_dir: Path, *, max_model_len: int, max_num_seqs: int) -> dict[str, Any]:
    """``vllm.LLM``'s keyword arguments: ours wherever they mean the same (module docstring)."""
    return dict(
        model=str(model_dir), load_format="dummy", skip_tokenizer_init=True, dtype=opts.dtype, seed=opts.seed,
        enforce_eager=opts.enforce_eager, gpu_memory_utilization=CacheConfig.gpu_memory_utilization,
        kv_cache_memory_bytes=opts.kv_cache_bytes, max_model_len=max_model_len, max_num_seqs=max_num_seqs,
        max_num_batched_tokens=DEFAULT_MAX_NUM_BATCHED_TOKENS, enable_prefix_caching=True,
    )


def lead_tokens(batch: int, context: int, max_num_batched_tokens: int) -> int:
    """decode-step's m: more output tokens than there are engine steps before every one of
    ``batch`` prompts of ``context - 1`` tokens has been prefilled, when each step's token
    budget also carries one decode token of each request already prefilled; plus
    decode_step's warm-up steps."""
    if batch >= max_num_batched_tokens:
        raise ValueError(f"decode-step through vLLM needs batch < max_num_batched_tokens "
                         f"({max_num_batched_tokens}), got {batch}")
    prefill_steps = -(-batch * (context - 1) // (max_num_batched_tokens - batch))
    return prefill_steps + ours_decode_step.WARMUP_STEPS + 1


def _nano_bench(opts: Options, hw: roofline.Hardware, vllm: ModuleType, info: dict[str, Any]) -> dict[str, Any]:
    model = opts.model or nano_bench.DEFAULT_MODEL
    prompts, output_lens = nano_bench.workload(opts.scale, opts.seed, hf_config(model).vocab_size)
    max_len = nano_bench.max_model_len(opts.scale)
    with _VllmEngine(vllm, opts, model, max_model_len=max_len, max_num_seqs=SchedulerConfig.max_num_seqs) as peer:
        peer.warm_up()
        vllm_s, vllm_tokens = peer.generate_timed(prompts, output_lens)
    if vllm_tokens != sum(output_lens):
        raise RuntimeError(f"vLLM generated {vllm_tokens} tokens, the workload asks for {sum(output_lens)}")
    llm = build_llm(opts, model, max_model_len=max_len)
    res = nano_bench.run_on(llm, hw, prompts, output_lens)
    dispose(llm)
    vllm_tok_s = vllm_tokens / vllm_s
    row = {"rollout_tok_s": res["tok_s"], "vllm_tok_s": vllm_tok_s, "ratio": res["tok_s"] / vllm_tok_s,
           "rollout_s": res["seconds"], "vllm_s": vllm_s, "vllm_output_tokens": vllm_tokens}
    return {"model": model, "peer_workload": "nano-bench", "peer_engine": "vllm", **info, "vllm": peer.record(),
            "num_seqs": len(prompts), "rows": [row], "ratio": row["ratio"],
            "roofline_fraction": res["roofline_fraction"], "detail": res}


def _decode_step(opts: Options, hw: roofline.Hardware, vllm: ModuleType, info: dict[str, Any]) -> dict[str, Any]:
    model = opts.model or ours_decode_step.DEFAULT_MODEL
    batches = opts.decode_batches()  # raises before any work if --scale merges batches
    context = scaled(ours_decode_step.CONTEXT, opts.scale, minimum=8)
    steps = scaled(ours_decode_step.STEPS, opts.scale, minimum=3)
    lead = {b: lead_tokens(b, context, DEFAULT_MAX_NUM_BATCHED_TOKENS) for b in batches}
    vocab = hf_config(model).vocab_size
    max_len = context - 1 + max(lead.values()) + steps
    with _VllmEngine(vllm, opts, model, max_model_len=max_len, max_num_seqs=max(batches)) as peer:
        peer.warm_up()
        theirs = {b: _vllm_decode(peer, b, context, steps, lead[b], vocab, random.Random(opts.seed + b))
                  for b in batches}
    res = ours_decode_step.run(opts, hw)
    rows = []
    for r in res["rows"]:
        v = theirs[r["batch"]]
        ratio = v["vllm_step_ms"] / r["step_ms"] if v["vllm_step_ms"] > 0 else None
        rows.append({"batch": r["batch"], "rollout_step_ms": r["step_ms"], "vllm_step_ms": v["vllm_step_ms"],
                     "ratio": ratio, "rollout_mean_context": r["mean_context"], "rollout_steady": r["steady"], **v})
    return {"model": model, "peer_workload": "decode-step", "peer_engine": "vllm", **info, "vllm": peer.record(),
            "context": context, "steps": steps, "rows": rows,
            "ratio": {f"B={r['batch']}": r["ratio"] for r in rows}, "roofline_fraction": res["roofline_fraction"],
            "detail": res}


def _vllm_decode(peer: _VllmEngine, batch: int, context: int, steps: int, lead: int, vocab: int,
                 rng: random.Random) -> dict[str, Any]:
    """T(lead + steps) - T(lead) over steps (module docstring), each the fastest of ROUNDS."""
    times: dict[int, list[float]] = {lead: [], lead + steps: []}
    for _ in range(ROUNDS):
        for n in times:
            prompts = [[rng.randrange(vocab) for _ in range(context - 1)] for _ in range(batch)]
            seconds, num_tokens = peer.generate_timed(prompts, [n] * batch)
            if num_tokens != batch * n:
                raise RuntimeError(f"vLLM generated {num_tokens} tokens for B={batch} x {n}")
            times[n].append(seconds)
    short, long = min(times[lead]), min(times[lead + steps])
    block_size, num_blocks = peer.resolved.get("block_size"), peer.resolved.get("num_gpu_blocks")
    fits = None
    if block_size and num_blocks:
        fits = batch * -(-(context - 1 + lead + steps) // block_size) <= num_blocks
    return {"vllm_step_ms": (long - short) / steps * 1e3, "vllm_lead_tokens": lead,
            "vllm_context_max": context - 1 + lead + steps, "vllm_kv_fits": fits,
            "vllm_short_s_all": times[lead], "vllm_long_s_all": times[lead + steps]}


class _VllmEngine:
    """One ``vllm.LLM`` of a benchmark model (random weights, a config.json-only directory
    kept while it lives), timed generate calls, and its release on exit (module docstring)."""

    def __init__(self, vllm: ModuleType, opts: Options, model: str, *, max_model_len: int, max_num_seqs: int) -> None:
        self._vllm = vllm
        self.device = opts.torch_device
        self._tmp = tempfile.TemporaryDirectory()
        self.options = engine_options(opts, write_model_dir(model, Path(self._tmp.name)),
                                      max_model_len=max_model_len, max_num_seqs=max_num_seqs)
        gc.collect()
        if self.device.type == "cuda":  # vLLM refuses to start in less than gpu_memory_utilization free
            torch.cuda.empty_cache()
        self._release: dict[str, Any] = {"free_bytes_before": _free_device_bytes(self.device)}
        t0 = time.perf_counter()
        try:
            self.llm: Any = vllm.LLM(**self.options)
        except BaseException:
            self._tmp.cleanup()
            raise
        self.startup_s = time.perf_counter() - t0
        self.resolved = _resolved(self.llm)

    def __enter__(self) -> _VllmEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def sampling_params(self, max_tokens: int) -> Any:
        return self._vllm.SamplingParams(temperature=1.0, ignore_eos=True, max_tokens=max_tokens, detokenize=False)

    def warm_up(self) -> None:
        """One short request first, as throughput.warm_up does for ours."""
        self.generate_timed([[1, 2, 3, 4]], [8])

    def generate_timed(self, prompts: list[list[int]], max_tokens: list[int]) -> tuple[float, int]:
        """(seconds, output tokens) of one ``generate`` call over all ``prompts``."""
        batch = [{"prompt_token_ids": p} for p in prompts]
        params = [self.sampling_params(n) for n in max_tokens]
        t0 = now(self.device)
        outs = self.llm.generate(batch, params, use_tqdm=False)
        seconds = now(self.device) - t0
        return seconds, sum(len(c.token_ids) for o in outs for c in o.outputs)

    def close(self) -> None:
        """Shut the engine down, drop it, and check the device memory came back."""
        if self.llm is None:
            return
        core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
            how = f"llm.llm_engine.engine_core.shutdown() ({type(core).__name__})"
            if type(core).__name__ == "InprocClient":  # vLLM's distributed state lives in this process
                _destroy_vllm_distributed()
        elif hasattr(self.llm, "shutdown"):
            self.llm.shutdown()
            how = "llm.shutdown()"
        else:
            how = "del only"
        self.llm = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self._tmp.cleanup()
        before = self._release["free_bytes_before"]
        after, waited = _free_device_bytes(self.device), 0.0
        while before is not None and before - after > MAX_UNRELEASED_BYTES and waited < RELEASE_WAIT_S:
            time.sleep(0.5)  # the engine core process may still be exiting
            waited += 0.5
            after = _free_device_bytes(self.device)
        self._release.update(how=how, free_bytes_after=after, waited_s=waited)
        if before is not None and before - after > MAX_UNRELEASED_BYTES:
            raise RuntimeError(
                f"vLLM still holds {(before - after) / 2**30:.1f} GiB of {self.device} after {how} and "
                f"{waited:.0f} s: rollout would run in less memory than vLLM had. An in-process engine core "
                "(VLLM_ENABLE_V1_MULTIPROCESSING=0) does not release its memory (vllm#21073); run with the default"
            )

    def record(self) -> dict[str, Any]:
        """What the result records of the vLLM side."""
        return {"options": self.options, "resolved": self.resolved, "sampling": _params_json(self.sampling_params(1)),
                "env": _vllm_env(), "startup_s": self.startup_s, "release": self._release}


def _free_device_bytes(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    return torch.cuda.mem_get_info(device)[0]


def _resolved(llm: Any) -> dict[str, Any]:
    """What vLLM made of the options (None where this vLLM, or the alias, has no such field)."""
    engine = getattr(llm, "llm_engine", None)
    cfg = getattr(engine, "vllm_config", None)

    def get(*path: str) -> Any:
        obj = cfg
        for name in path:
            obj = getattr(obj, name, None)
        return obj if obj is None or isinstance(obj, (bool, int, float, str, list, tuple)) else str(obj)

    core = getattr(engine, "engine_core", None)
    return {
        "engine_core_client": None if core is None else type(core).__name__,
        "block_size": get("cache_config", "block_size"),
        "num_gpu_blocks": get("cache_config", "num_gpu_blocks"),
        "enable_prefix_caching": get("cache_config", "enable_prefix_caching"),
        "gpu_memory_utilization": get("cache_config", "gpu_memory_utilization"),
        "kv_cache_memory_bytes": get("cache_config", "kv_cache_memory_bytes"),
        "max_num_seqs": get("scheduler_config", "max_num_seqs"),
        "max_num_batched_tokens": get("scheduler_config", "max_num_batched_tokens"),
        "enable_chunked_prefill": get("scheduler_config", "enable_chunked_prefill"),
        "async_scheduling": get("scheduler_config", "async_scheduling"),
        "dtype": get("model_config", "dtype"),
        "max_model_len": get("model_config", "max_model_len"),
        "enforce_eager": get("model_config", "enforce_eager"),
        "compilation_mode": get("compilation_config", "mode"),
        "cudagraph_mode": get("compilation_config", "cudagraph_mode"),
        "cudagraph_capture_sizes": get("compilation_config", "cudagraph_capture_sizes"),
        "attention_backend_option": get("attention_config", "backend"),  # None: vLLM's choice, in its worker
    }


def _params_json(params: Any) -> dict[str, Any]:
    names = ("temperature", "top_k", "top_p", "min_p", "ignore_eos", "max_tokens", "detokenize", "seed")
    return {n: getattr(params, n, None) for n in names}


def _vllm_env() -> dict[str, Any]:
    """vLLM's environment knobs (VLLM_ENV) as vLLM read them; {} for the alias."""
    try:
        import vllm.envs as vllm_envs
    except ImportError:
        return {}
    return {name: getattr(vllm_envs, name, None) for name in VLLM_ENV}


def _destroy_vllm_distributed() -> None:
    """An in-process engine core initialised vLLM's model-parallel groups in this process."""
    try:
        from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel
    except ImportError:
        return
    destroy_model_parallel()
    destroy_distributed_environment()
