"""Triton paged attention and write_kv against their torch references.

Off GPU the kernels run in Triton's interpreter on tiny shapes. ``triton.jit`` decides
between compiling and interpreting when it decorates a kernel, so TRITON_INTERPRET is set
here, before the kernel module is first imported. On a CUDA machine the same tests run
compiled on the GPU, and the ``gpu`` class adds real shapes."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton")

from rollout.models.backends import AttentionMetadata, BackendLimits, create_attention_backend  # noqa: E402
from rollout.kernels import triton_attention  # noqa: E402
from rollout.kernels.attention import paged_attention_ref, write_kv_ref  # noqa: E402
from rollout.kernels.triton_attention import (  # noqa: E402
    Tiling, choose_num_splits, paged_attention, plan_launch, write_kv,
)
from tests.helpers.attention_steps import block_boundary_specs  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE.type == "cpu" and not os.environ.get("TRITON_INTERPRET"):
    pytest.skip("triton kernels were compiled before TRITON_INTERPRET was set", allow_module_level=True)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _mixed_specs(block_size: int) -> list[tuple[int, int]]:
    """(num_context_tokens already cached, q_len this step) for one mixed step."""
    return [
        *block_boundary_specs(block_size),
        (150, 1),  # decode over three KV tiles of 64
        (37, 70),  # prefill of several query tiles after a prefix hit
        (0, 1),  # a one-token prompt
    ]


def _decode_specs(block_size: int) -> list[tuple[int, int]]:
    bs = block_size
    return [(bs - 2, 1), (bs - 1, 1), (bs, 1), (0, 1), (300, 1), (130, 1)]


def _build_step(specs, block_size, num_heads, num_kv_heads, head_dim, dtype, seed):
    """A paged cache holding each request's context at shuffled blocks (NaN elsewhere),
    this step's new K/V, queries and metadata; the new K/V are not written yet."""
    gen = _gen(seed)
    blocks_per_req = [math.ceil((c + q) / block_size) for c, q in specs]
    num_blocks = sum(blocks_per_req) + 3
    kv_cache = torch.full((2, num_blocks, block_size, num_kv_heads, head_dim), float("nan"), dtype=dtype)
    free = torch.randperm(num_blocks, generator=gen).tolist()
    block_tables = torch.zeros(len(specs), max(blocks_per_req) + 2, dtype=torch.int32)
    queries, new_k, new_v, slots = [], [], [], []
    for i, ((num_context, q_len), n) in enumerate(zip(specs, blocks_per_req)):
        seq_len = num_context + q_len
        blocks = [free.pop() for _ in range(n)]
        block_tables[i, :n] = torch.tensor(blocks, dtype=torch.int32)
        k = torch.randn(seq_len, num_kv_heads, head_dim, generator=gen).to(dtype)
        v = torch.randn(seq_len, num_kv_heads, head_dim, generator=gen).to(dtype)
        pos = torch.arange(seq_len)
        req_slots = torch.tensor(blocks)[pos // block_size] * block_size + pos % block_size
        kv_cache[0].view(-1, num_kv_heads, head_dim)[req_slots[:num_context]] = k[:num_context]
        kv_cache[1].view(-1, num_kv_heads, head_dim)[req_slots[:num_context]] = v[:num_context]
        queries.append(torch.randn(q_len, num_heads, head_dim, generator=gen).to(dtype))
        new_k.append(k[num_context:])
        new_v.append(v[num_context:])
        slots.append(req_slots[num_context:])
    q_lens = torch.tensor([q for _, q in specs])
    return dict(
        kv_cache=kv_cache,
        block_tables=block_tables,
        query=torch.cat(queries),
        new_k=torch.cat(new_k),
        new_v=torch.cat(new_v),
        slot_mapping=torch.cat(slots).long(),
        query_start_loc=torch.cat([torch.zeros(1, dtype=torch.int64), q_lens.cumsum(0)]).int(),
        seq_lens=torch.tensor([c + q for c, q in specs], dtype=torch.int32),
    )


def _run_both(step, num_splits, block_m=None, tiling=None, split_counters=None):
    """(triton output, reference output); the cache is filled with write_kv_ref first."""
    kv_cache = step["kv_cache"]
    write_kv_ref(step["new_k"], step["new_v"], kv_cache, step["slot_mapping"])
    scale = step["query"].shape[-1] ** -0.5
    expected = paged_attention_ref(
        step["query"], kv_cache, step["block_tables"], step["query_start_loc"], step["seq_lens"], scale
    )
    dev = {k: step[k].to(DEVICE) for k in ("query", "block_tables", "query_start_loc", "seq_lens")}
    q_lens = (step["query_start_loc"][1:] - step["query_start_loc"][:-1]).tolist()
    out = paged_attention(
        dev["query"], kv_cache.to(DEVICE), dev["block_tables"], dev["query_start_loc"], dev["seq_lens"], scale,
        max_query_len=max(q_lens), max_seq_len=int(step["seq_lens"].max()), num_splits=num_splits,
        block_m=block_m, tiling=tiling, split_counters=split_counters,
    )
    return out.cpu(), expected


TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}

CASES = [  # (num_heads, num_kv_heads, head_dim, block_size, dtype)
    pytest.param(8, 2, 32, 16, torch.float32, id="gqa4-d32-bs16-fp32"),
    pytest.param(8, 2, 16, 4, torch.float32, id="gqa4-d16-bs4-fp32"),
    pytest.param(4, 4, 64, 4, torch.float32, id="mha-d64-bs4-fp32"),
    pytest.param(6, 2, 32, 16, torch.float32, id="gqa3-d32-bs16-fp32"),  # group not a power of two
    pytest.param(8, 2, 64, 16, torch.bfloat16, id="gqa4-d64-bs16-bf16"),
    pytest.param(2, 2, 16, 4, torch.bfloat16, id="mha-d16-bs4-bf16"),
]


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,block_size,dtype", CASES)
def test_mixed_step_matches_reference(num_heads, num_kv_heads, head_dim, block_size, dtype, num_splits):
    step = _build_step(_mixed_specs(block_size), block_size, num_heads, num_kv_heads, head_dim, dtype, seed=head_dim)
    out, expected = _run_both(step, num_splits)
    assert out.dtype == dtype and out.shape == expected.shape
    torch.testing.assert_close(out, expected, **TOL[dtype])


@pytest.mark.parametrize("num_splits", [2, None])
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,block_size,dtype", [CASES[0], CASES[4]])
def test_mixed_step_other_splits(num_heads, num_kv_heads, head_dim, block_size, dtype, num_splits):
    test_mixed_step_matches_reference(num_heads, num_kv_heads, head_dim, block_size, dtype, num_splits)


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize(
    "num_heads,num_kv_heads,dtype", [(8, 2, torch.float32), (32, 1, torch.float32), (4, 4, torch.bfloat16)],
    ids=["gqa4-fp32", "mqa32-fp32", "mha-bf16"],
)
def test_decode_only_step_matches_reference(num_heads, num_kv_heads, dtype, num_splits):
    """max_query_len == 1 takes the 16-row tiles (32 rows for a group of 32)."""
    step = _build_step(_decode_specs(16), 16, num_heads, num_kv_heads, 32, dtype, seed=num_heads)
    out, expected = _run_both(step, num_splits)
    torch.testing.assert_close(out, expected, **TOL[dtype])


@pytest.mark.parametrize("num_splits", [1, 3])
def test_fixed_num_splits_and_block_m_are_batch_invariant(num_splits):
    """With num_splits and block_m fixed, a request's output is bitwise the same in a full
    mixed batch and in a small one, decode-only ([7, 4]) or not."""
    specs = _mixed_specs(4)
    step = _build_step(specs, 4, 8, 2, 32, torch.float32, seed=11)
    full, _ = _run_both(step, num_splits, block_m=64)
    starts = step["query_start_loc"].tolist()
    for pick in ([7, 4], [8, 2]):  # two decodes / a multi-tile chunk and a prefill
        sub = _build_step([specs[i] for i in pick], 4, 8, 2, 32, torch.float32, seed=0)
        # Same data as in the full batch: its cache (new K/V already written) and queries.
        sub["kv_cache"] = step["kv_cache"].clone()
        sub["block_tables"] = step["block_tables"][pick]
        sub["query"] = torch.cat([step["query"][starts[i] : starts[i + 1]] for i in pick])
        sub["new_k"] = sub["new_v"] = torch.empty(0, 2, 32)
        sub["slot_mapping"] = torch.empty(0, dtype=torch.long)
        alone, expected = _run_both(sub, num_splits, block_m=64)
        torch.testing.assert_close(alone, expected, **TOL[torch.float32])
        sub_starts = sub["query_start_loc"].tolist()
        for j, i in enumerate(pick):
            assert torch.equal(alone[sub_starts[j] : sub_starts[j + 1]], full[starts[i] : starts[i + 1]])


def test_padding_rows_are_not_written():
    """Tokens past query_start_loc[-1] (graph padding) are left as they were: no NaN leak
    into real rows, and the kernel reads no request for them."""
    step = _build_step([(5, 1), (0, 3)], 4, 8, 2, 16, torch.float32, seed=3)
    step["query"] = torch.cat([step["query"], torch.randn(3, 8, 16, generator=_gen(1))])
    for num_splits in (1, 2):
        out, expected = _run_both(step, num_splits)
        torch.testing.assert_close(out[:4], expected[:4], **TOL[torch.float32])


@pytest.mark.parametrize("tiling", [
    Tiling(block_m=32, block_n=32, num_warps=2, num_stages=3),
    Tiling(block_m=128, block_n=16, num_warps=8, num_stages=1),
], ids=["m32n32", "m128n16"])
def test_tiling_override_matches_reference(tiling):
    """The launch shapes the tuning script sweeps compute the same attention."""
    step = _build_step(_mixed_specs(16), 16, 8, 2, 32, torch.float32, seed=3)
    for num_splits in (1, 2):
        out, expected = _run_both(step, num_splits, tiling=tiling)
        torch.testing.assert_close(out, expected, **TOL[torch.float32])


def test_choose_num_splits_policy():
    # Two programs per SM or more: no split.
    assert choose_num_splits(num_programs=640, max_seq_len=32768, num_sms=132, block_n=64) == 1
    assert choose_num_splits(num_programs=264, max_seq_len=32768, num_sms=132, block_n=64) == 1
    # One program per SM is too few (a decode of 64 requests x 2 KV heads): about four.
    assert choose_num_splits(num_programs=128, max_seq_len=2400, num_sms=132, block_n=64) == 4
    assert choose_num_splits(num_programs=200, max_seq_len=2400, num_sms=132, block_n=64) == 2
    # Few programs, long context: split toward four programs per SM, capped.
    assert choose_num_splits(num_programs=40, max_seq_len=32768, num_sms=132, block_n=64) == 13
    assert choose_num_splits(num_programs=1, max_seq_len=1 << 20, num_sms=132, block_n=64) == 32
    # Short contexts: every split keeps at least four KV tiles.
    assert choose_num_splits(num_programs=8, max_seq_len=600, num_sms=132, block_n=64) == 2
    assert choose_num_splits(num_programs=8, max_seq_len=100, num_sms=132, block_n=64) == 1


def test_rejects_bad_arguments():
    step = _build_step([(0, 2)], 4, 8, 2, 16, torch.float32, seed=0)
    args = (step["query"], step["kv_cache"], step["block_tables"], step["query_start_loc"], step["seq_lens"], 1.0)
    for bad in (dict(num_splits=0), dict(block_m=24), dict(block_m=8)):
        with pytest.raises(ValueError):
            paged_attention(*args, max_query_len=2, max_seq_len=2, **bad)


def _plan(step, num_splits):
    """The launch paged_attention makes for ``step``."""
    q_lens = step["query_start_loc"][1:] - step["query_start_loc"][:-1]
    num_tokens, num_heads, head_dim = step["query"].shape
    return plan_launch(
        num_tokens, num_heads, step["kv_cache"].shape[3], head_dim, len(q_lens), max_query_len=int(q_lens.max()),
        max_seq_len=int(step["seq_lens"].max()), device=DEVICE, num_splits=num_splits,
    )


def _split_counters(step, num_splits):
    """Zeroed counters, exactly as many as the step's launch needs."""
    num_counters = _plan(step, num_splits).num_q_tiles * step["kv_cache"].shape[3]
    return torch.zeros(num_counters, dtype=torch.int32, device=DEVICE)


def _no_combine_launch(monkeypatch):
    """Fail the test if the separate combine kernel is launched."""
    monkeypatch.setattr(triton_attention, "_combine_splits_kernel", None)  # None[grid]: TypeError


FUSED_CASES = [  # (specs, num_heads, num_kv_heads, head_dim, block_size, dtype, num_splits)
    # Mixed: prefill chunks, block-boundary lengths, decodes; (0, 1) leaves splits empty.
    pytest.param(_mixed_specs(16), 8, 2, 32, 16, torch.float32, 3, id="mixed-gqa4-fp32-s3"),
    pytest.param(_mixed_specs(4), 6, 2, 16, 4, torch.float32, 4, id="mixed-gqa3-fp32-s4"),
    pytest.param(_mixed_specs(16)[4:], 4, 4, 32, 16, torch.bfloat16, 4, id="mixed-mha-bf16-s4"),
    pytest.param(_decode_specs(16), 8, 2, 32, 16, torch.bfloat16, 3, id="decode-gqa4-bf16-s3"),
]


@pytest.mark.parametrize("specs,num_heads,num_kv_heads,head_dim,block_size,dtype,num_splits", FUSED_CASES)
def test_fused_combine_is_bitwise_the_separate_combine(
    monkeypatch, specs, num_heads, num_kv_heads, head_dim, block_size, dtype, num_splits
):
    """With split_counters the last split merges in the attention launch: the same bits as
    the combine launch, and the counters are zero again after each launch (two in a row
    on one buffer). The interpreter runs splits in order, so split S-1 merges here."""
    step = _build_step(specs, block_size, num_heads, num_kv_heads, head_dim, dtype, seed=num_splits)
    separate, expected = _run_both(step, num_splits)
    torch.testing.assert_close(separate, expected, **TOL[dtype])
    counters = _split_counters(step, num_splits)
    _no_combine_launch(monkeypatch)
    for _ in range(2):
        fused, _ = _run_both(step, num_splits, split_counters=counters)
        assert torch.equal(fused, separate)
        assert not counters.any()


def test_split_counters_unused_without_split():
    """num_splits=1 writes the output directly: counters change nothing and stay zero."""
    step = _build_step(_mixed_specs(4)[:5], 4, 8, 2, 16, torch.float32, seed=4)
    plain, _ = _run_both(step, 1)
    counters = _split_counters(step, 1)
    with_counters, _ = _run_both(step, 1, split_counters=counters)
    assert torch.equal(with_counters, plain) and not counters.any()


def test_rejects_bad_split_counters():
    step = _build_step([(0, 2), (40, 1)], 4, 8, 2, 16, torch.float32, seed=0)
    good = _split_counters(step, 2)
    for bad in (good[1:], good.long(), torch.zeros(2 * good.numel(), dtype=torch.int32, device=DEVICE)[::2],
                torch.zeros(good.numel(), dtype=torch.int32, device="meta")):
        with pytest.raises(ValueError, match="split_counters"):
            _run_both(step, 2, split_counters=bad)


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
def test_write_kv_matches_reference_and_skips_negative_slots(cache_dtype):
    gen = _gen(7)
    num_blocks, block_size, num_kv_heads, head_dim = 8, 4, 3, 24  # odd sizes: masked tiles
    kv_cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(cache_dtype)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:11]
    slots[[2, 7]] = -1  # padding tokens
    # fp32 K/V into a bf16 cache; key is a strided view as from a fused QKV projection.
    qkv = torch.randn(11, 3 * num_kv_heads * head_dim, generator=gen)
    key = qkv[:, : num_kv_heads * head_dim].view(11, num_kv_heads, head_dim)
    value = torch.randn(11, num_kv_heads, head_dim, generator=gen)

    expected = kv_cache.clone()
    real = slots >= 0
    write_kv_ref(key[real], value[real], expected, slots[real])
    got = kv_cache.to(DEVICE)
    write_kv(key.to(DEVICE), value.to(DEVICE), got, slots.to(DEVICE))
    got = got.cpu()

    written = torch.zeros(num_blocks * block_size, dtype=torch.bool)
    written[slots[real]] = True
    flat = lambda t: t.view(2, -1, num_kv_heads, head_dim)  # noqa: E731
    assert torch.equal(flat(got)[:, ~written], flat(kv_cache)[:, ~written])  # nothing else touched
    if DEVICE.type == "cuda" or cache_dtype == torch.float32:
        assert torch.equal(got, expected)
    else:  # the interpreter truncates fp32 -> bf16 where the GPU rounds to nearest even
        torch.testing.assert_close(got, expected, atol=0, rtol=2**-7)


def test_triton_backend_runs_on_attention_metadata(monkeypatch):
    """The backend reads device tensors only and owns its split counters: a 600-token decode
    of few programs splits by the default policy, merged in the launch."""
    step = _build_step([*_mixed_specs(4)[:5], (600, 1)], 4, 8, 2, 16, torch.float32, seed=5)
    qsl, seq_lens = step["query_start_loc"], step["seq_lens"]
    num_tokens = int(qsl[-1])
    num_kv_heads = step["kv_cache"].shape[3]
    backend = create_attention_backend("triton", BackendLimits(num_kv_heads, num_tokens, len(seq_lens), DEVICE))
    assert backend.name == "triton" and backend.write_kv is write_kv
    assert backend.split_counters is not None and not backend.split_counters.any()
    assert _plan(step, None).num_splits > 1
    _no_combine_launch(monkeypatch)
    kv_cache = step["kv_cache"].to(DEVICE)
    md = AttentionMetadata(
        slot_mapping=step["slot_mapping"].to(DEVICE), block_tables=step["block_tables"].to(DEVICE),
        query_start_loc=qsl.to(DEVICE), seq_lens=seq_lens.to(DEVICE),
        query_start_loc_cpu=None, seq_lens_cpu=None,  # the backend reads device tensors only
        max_query_len=int((qsl[1:] - qsl[:-1]).max()), max_seq_len=int(seq_lens.max()),
    )
    backend.write_kv(step["new_k"].to(DEVICE), step["new_v"].to(DEVICE), kv_cache, md.slot_mapping)
    out = backend.attention(step["query"].to(DEVICE), kv_cache, md, 0.25)
    expected = paged_attention_ref(step["query"], kv_cache.cpu(), step["block_tables"], qsl, seq_lens, 0.25)
    torch.testing.assert_close(out.cpu(), expected, **TOL[torch.float32])
    assert not backend.split_counters.any()


def test_backends_import_without_triton():
    """The backend registry imports, and names 'triton' as unavailable, where triton is not."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "from rollout.models.backends import create_attention_backend as get_attention_backend\n"
        "from rollout.errors import PlatformError\n"
        "assert get_attention_backend('torch').name == 'torch'\n"
        "try:\n    get_attention_backend('triton')\nexcept PlatformError as e:\n    print(e)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "needs triton" in done.stdout


def test_module_is_interpreted_off_gpu():
    if DEVICE.type == "cpu":
        assert type(triton_attention._paged_attention_kernel).__name__ == "InterpretedFunction"


# ---------------------------------------------------------------------------------------
# Real shapes, compiled, on CUDA
# ---------------------------------------------------------------------------------------


def _real_step(num_reqs, ctx, q_len, num_heads, num_kv_heads, head_dim, block_size, seed):
    """Random cache of (num_reqs, ctx + q_len) tokens built on the GPU directly."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    seq_len = ctx + q_len
    blocks_per_req = -(-seq_len // block_size)
    num_blocks = num_reqs * blocks_per_req + 7
    kv_cache = torch.randn(
        2, num_blocks, block_size, num_kv_heads, head_dim, generator=gen, device="cuda", dtype=torch.bfloat16
    )
    perm = torch.randperm(num_blocks, generator=gen, device="cuda")[: num_reqs * blocks_per_req]
    block_tables = perm.view(num_reqs, blocks_per_req).int()
    query = torch.randn(num_reqs * q_len, num_heads, head_dim, generator=gen, device="cuda", dtype=torch.bfloat16)
    qsl = torch.arange(num_reqs + 1, dtype=torch.int32, device="cuda") * q_len
    seq_lens = torch.full((num_reqs,), seq_len, dtype=torch.int32, device="cuda")
    return query, kv_cache, block_tables, qsl, seq_lens


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
class TestRealShapesOnGpu:
    @pytest.mark.parametrize("num_splits", [1, 4, None])
    @pytest.mark.parametrize("q_len", [1, 16], ids=["decode", "chunk16"])
    def test_matches_reference(self, q_len, num_splits):
        query, kv_cache, block_tables, qsl, seq_lens = _real_step(64, 2048, q_len, 32, 8, 128, 16, seed=q_len)
        scale = 128**-0.5
        torch.cuda.set_sync_debug_mode("error")  # the launcher must not sync with the host
        try:
            out = paged_attention(
                query, kv_cache, block_tables, qsl, seq_lens, scale,
                max_query_len=q_len, max_seq_len=2048 + q_len, num_splits=num_splits,
            )
        finally:
            torch.cuda.set_sync_debug_mode(0)
        expected = paged_attention_ref(query, kv_cache, block_tables, qsl.cpu(), seq_lens.cpu(), scale)
        torch.testing.assert_close(out, expected, atol=2e-2, rtol=2e-2)

    def test_long_prefill_and_decodes_in_one_step(self):
        """A 1000-token chunk after a 3000-token prefix next to 4 decodes of 8k context."""
        gen = torch.Generator(device="cuda").manual_seed(0)
        block_size, nkv, d = 16, 8, 128
        specs = [(3000, 1000), (8191, 1), (8000, 1), (17, 1), (0, 1)]
        blocks = [-(-(c + q) // block_size) for c, q in specs]
        kv_cache = torch.randn(2, sum(blocks) + 1, block_size, nkv, d, generator=gen, device="cuda").bfloat16()
        perm = torch.randperm(sum(blocks) + 1, generator=gen, device="cuda").int()
        block_tables = torch.zeros(len(specs), max(blocks), dtype=torch.int32, device="cuda")
        offset = 0
        for i, n in enumerate(blocks):
            block_tables[i, :n] = perm[offset : offset + n]
            offset += n
        q_lens = torch.tensor([q for _, q in specs])
        qsl = torch.cat([torch.zeros(1, dtype=torch.int64), q_lens.cumsum(0)]).int()
        seq_lens = torch.tensor([c + q for c, q in specs], dtype=torch.int32)
        query = torch.randn(int(q_lens.sum()), 32, d, generator=gen, device="cuda").bfloat16()
        expected = paged_attention_ref(query, kv_cache, block_tables, qsl, seq_lens, d**-0.5)
        for num_splits in (1, 5, None):
            out = paged_attention(
                query, kv_cache, block_tables, qsl.cuda(), seq_lens.cuda(), d**-0.5,
                max_query_len=1000, max_seq_len=8192, num_splits=num_splits,
            )
            torch.testing.assert_close(out, expected, atol=2e-2, rtol=2e-2)

    @pytest.mark.parametrize("num_splits", [1, 3, 8])
    def test_decode_rows_batch_invariant_with_fixed_block_m(self, num_splits):
        """Decode rows next to decodes only and next to a prefill chunk: bitwise equal with
        num_splits and block_m fixed (left to the default, the 16- and 64-row tiles may
        differ by an ulp)."""
        gen = torch.Generator(device="cuda").manual_seed(2)
        kv_cache = torch.randn(2, 2000, 16, 8, 128, generator=gen, device="cuda").bfloat16()
        block_tables = torch.randperm(2000, generator=gen, device="cuda").int()[:1800].view(9, 200)
        seq_lens = torch.tensor([3000, 1, 17, 2048, 999, 100, 3199, 64, 2500], dtype=torch.int32, device="cuda")
        query = torch.randn(8 + 300, 32, 128, generator=gen, device="cuda").bfloat16()
        fixed = dict(max_seq_len=3199, num_splits=num_splits, block_m=64)
        decode_only = paged_attention(
            query[:8], kv_cache, block_tables[:8], torch.arange(9, dtype=torch.int32, device="cuda"),
            seq_lens[:8], 0.1, max_query_len=1, **fixed,
        )
        qsl = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 308], dtype=torch.int32, device="cuda")
        mixed = paged_attention(query, kv_cache, block_tables, qsl, seq_lens, 0.1, max_query_len=300, **fixed)
        assert torch.equal(decode_only, mixed[:8])

    @pytest.mark.parametrize("num_reqs,q_len,num_splits", [(64, 1, 4), (64, 1, None), (1, 1, 8), (1, 1, 16), (8, 16, 5)])
    def test_fused_combine_bitwise_the_separate_combine(self, num_reqs, q_len, num_splits):
        """Qwen2.5-1.5B shapes (12 heads, 2 KV heads, head_dim 128), contexts up to 2048 of
        mixed lengths (some splits empty): merging in the launch gives the combine launch's
        bits (one merge routine, same order) and leaves the counters zero; three rounds on
        one buffer, to catch a merge that reads a split before its stores are visible."""
        query, kv_cache, block_tables, qsl, seq_lens = _real_step(num_reqs, 2048, q_len, 12, 2, 128, 16, seed=num_reqs)
        gen = torch.Generator(device="cuda").manual_seed(num_reqs)
        seq_lens = torch.randint(q_len, 2048 + q_len + 1, (num_reqs,), generator=gen, device="cuda").int()
        seq_lens[0] = 2048 + q_len
        scale = 128**-0.5
        kw = dict(max_query_len=q_len, max_seq_len=2048 + q_len, num_splits=num_splits)
        plan = plan_launch(num_reqs * q_len, 12, 2, 128, num_reqs, device=query.device, **kw)
        counters = torch.zeros(plan.num_q_tiles * 2, dtype=torch.int32, device="cuda")
        separate = paged_attention(query, kv_cache, block_tables, qsl, seq_lens, scale, **kw)
        expected = paged_attention_ref(query, kv_cache, block_tables, qsl.cpu(), seq_lens.cpu(), scale)
        torch.testing.assert_close(separate, expected, atol=2e-2, rtol=2e-2)
        for _ in range(3):
            fused = paged_attention(query, kv_cache, block_tables, qsl, seq_lens, scale, split_counters=counters, **kw)
            torch.testing.assert_close(fused, expected, atol=2e-2, rtol=2e-2)  # a race: far off
            assert torch.equal(fused, separate)  # only this off (ulps): the merges compiled apart
            assert int(counters.count_nonzero()) == 0

    def test_fused_combine_in_a_cuda_graph(self):
        """Captured with its counters and replayed on new queries and lengths: the combine
        launch's bits after each replay, and the counters zero again."""
        query, kv_cache, block_tables, qsl, seq_lens = _real_step(64, 2048, 1, 12, 2, 128, 16, seed=5)
        scale = 128**-0.5
        kw = dict(max_query_len=1, max_seq_len=2049, num_splits=4)
        counters = torch.zeros(2 * (64 + 64), dtype=torch.int32, device="cuda")  # >= num_q_tiles * KV heads

        def fused():
            return paged_attention(query, kv_cache, block_tables, qsl, seq_lens, scale, split_counters=counters, **kw)

        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fused()  # compiles outside the capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fused()
        gen = torch.Generator(device="cuda").manual_seed(6)
        for _ in range(5):
            query.copy_(torch.randn(query.shape, generator=gen, device="cuda"))
            seq_lens.copy_(torch.randint(1, 2050, seq_lens.shape, generator=gen, device="cuda"))
            graph.replay()
            assert torch.equal(out, paged_attention(query, kv_cache, block_tables, qsl, seq_lens, scale, **kw))
            assert int(counters.count_nonzero()) == 0

    def test_write_kv_real_shape(self):
        gen = torch.Generator(device="cuda").manual_seed(1)
        kv_cache = torch.zeros(2, 4096, 16, 8, 128, device="cuda", dtype=torch.bfloat16)
        slots = torch.randperm(4096 * 16, generator=gen, device="cuda")[:8192]
        slots[::97] = -1
        key = torch.randn(8192, 8, 128, generator=gen, device="cuda")
        value = torch.randn(8192, 8, 128, generator=gen, device="cuda")
        expected = kv_cache.clone()
        real = slots >= 0
        write_kv_ref(key[real], value[real], expected, slots[real])
        write_kv(key, value, kv_cache, slots)
        assert torch.equal(kv_cache, expected)
