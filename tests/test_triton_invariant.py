"""The batch-invariant Triton kernels (rollout/kernels/triton_invariant.py): each token's
result bitwise the same whatever else is in the call, close to the torch references, and
differentiable for the trainer.

Off GPU the kernels run in Triton's interpreter on small shapes (TRITON_INTERPRET is set
here before the kernel modules are first imported, as in test_triton_attention.py); on a
CUDA machine the same tests run compiled. Real shapes and timings:
``python -m tests.gpu.check_invariant`` on a GPU."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton")

from rollout.kernels import triton_invariant  # noqa: E402
from rollout.kernels.activation import silu_and_mul_ref  # noqa: E402
from rollout.kernels.attention import paged_attention_ref, write_kv_ref  # noqa: E402
from rollout.kernels.layernorm import rms_norm_ref  # noqa: E402
from rollout.kernels.rotary import rotary_ref  # noqa: E402
from rollout.kernels.triton_invariant import (  # noqa: E402
    linear_invariant, matmul_invariant, paged_attention_invariant, rms_norm_invariant, rotary_invariant,
    silu_and_mul_invariant,
)
from rollout.models.backends import (  # noqa: E402
    AttentionMetadata, BackendLimits, create_attention_backend, get_ops,
)
from rollout.models.layers.rotary import RotaryEmbedding  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE.type == "cpu" and not os.environ.get("TRITON_INTERPRET"):
    pytest.skip("triton kernels were compiled before TRITON_INTERPRET was set", allow_module_level=True)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(gen, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=gen).to(dtype).to(DEVICE)


# ---------------------------------------------------------------------------------------
# matmul_invariant
# ---------------------------------------------------------------------------------------


def _assert_close_to_exact(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> None:
    """|y - exact| within the output's rounding (half an ulp of the output dtype, fp32:
    none) plus fp32 accumulation error: K * 2^-24 * sum_k |x_k w_k| bounds any order of
    fp32 sums. The exact value is the fp64 product of the (already rounded) inputs."""
    xd, wd = x.double().cpu(), w.double().cpu()
    exact = xd @ wd.T + (0 if b is None else b.double().cpu())
    accum = x.shape[1] * 2.0**-24 * (xd.abs() @ wd.abs().T)
    if y.dtype == torch.float32:
        rounding = exact.abs() * 2.0**-24
    else:  # one ulp: the output rounded once, maybe tipped by the accumulation error
        mant = {torch.bfloat16: 7, torch.float16: 10}[y.dtype]
        rounding = torch.exp2(torch.floor(torch.log2(exact.abs().clamp_min(1e-30))) - mant)
    err = (y.double().cpu() - exact).abs()
    assert bool((err <= accum + rounding + 1e-30).all()), float((err - accum - rounding).max())


@pytest.mark.parametrize("k,n,bias", [(80, 96, True), (128, 72, False)], ids=["k80-bias", "k128"])
def test_matmul_rows_are_batch_invariant_fp32(k, n, bias):
    """Every row of an M-row call is bitwise the row computed alone, for M from 1 to past
    two row tiles, at any row and at any offset of the batch in x (K ragged and even)."""
    gen = _gen(0)
    x = _randn(gen, 140, k)
    w = _randn(gen, n, k)
    b = _randn(gen, n) if bias else None
    full = matmul_invariant(x, w, b)
    _assert_close_to_exact(full, x, w, b)
    for i in (0, 1, 63, 64, 65, 129, 139):
        assert torch.equal(matmul_invariant(x[i : i + 1], w, b), full[i : i + 1]), i
    for m in (1, 3, 16, 17, 64, 130):
        for start in {0, 7, 140 - m}:
            y = matmul_invariant(x[start : start + m], w, b)
            assert torch.equal(y, full[start : start + m]), (m, start)


@pytest.mark.parametrize("wide", [False, True], ids=["64-wide", "128-wide"])
def test_matmul_rows_are_batch_invariant_bf16(wide, monkeypatch):
    """bf16 rows as in fp32, with both column-tile widths (the 128-wide one, for weights of
    _MM_WIDE_N rows or more, forced on a small weight here)."""
    if wide:
        monkeypatch.setattr(triton_invariant, "_MM_WIDE_N", 96)
        assert triton_invariant._matmul_tiles(96, torch.bfloat16)[1] == 128
    gen = _gen(1)
    k, n = 80, 200
    x = _randn(gen, 70, k, dtype=torch.bfloat16)
    w = _randn(gen, n, k, dtype=torch.bfloat16)
    b = _randn(gen, n, dtype=torch.bfloat16)
    full = matmul_invariant(x, w, b)
    assert full.dtype == torch.bfloat16
    _assert_close_to_exact(full, x, w, b)
    for m, start in ((1, 0), (1, 69), (3, 5), (17, 40), (64, 6)):
        assert torch.equal(matmul_invariant(x[start : start + m], w, b), full[start : start + m]), (m, start)


def test_matmul_strided_rows_empty_and_refusals():
    gen = _gen(2)
    x = _randn(gen, 9, 96)
    w = _randn(gen, 40, 48)
    view = x[:, ::2]  # strided last dim: made contiguous first
    assert torch.equal(matmul_invariant(view, w), matmul_invariant(view.contiguous(), w))
    assert torch.equal(matmul_invariant(x[2:5, :48], w)[1], matmul_invariant(x[3:4, :48], w)[0])
    assert matmul_invariant(x[:0, :48], w).shape == (0, 40)
    with pytest.raises(ValueError, match="do not fit"):
        matmul_invariant(x, w)
    with pytest.raises(ValueError, match="dtypes"):
        matmul_invariant(x[:, :48], w.double())


def test_linear_invariant_gradients_match_torch():
    """Forward bits are the kernel's with and without autograd; gradients are torch's
    (the backward is plain torch matmuls, same maths): fp32 to 1e-5."""
    gen = _gen(3)
    x0, w0, b0 = _randn(gen, 2, 5, 48), _randn(gen, 24, 48), _randn(gen, 24)
    g = _randn(gen, 2, 5, 24)
    x, w, b = (t.clone().requires_grad_() for t in (x0, w0, b0))
    y = linear_invariant(x, w, b)
    assert y.shape == (2, 5, 24) and torch.equal(y.detach(), matmul_invariant(x0.view(10, 48), w0, b0).view(2, 5, 24))
    (y * g).sum().backward()
    xr, wr, br = (t.clone().requires_grad_() for t in (x0, w0, b0))
    (torch.nn.functional.linear(xr, wr, br) * g).sum().backward()
    for got, want in ((x.grad, xr.grad), (w.grad, wr.grad), (b.grad, br.grad)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # Only the weight trainable, no bias: the others get no gradient.
    w2 = w0.clone().requires_grad_()
    linear_invariant(x0, w2).sum().backward()
    torch.testing.assert_close(w2.grad, g.new_ones(10, 24).T @ x0.view(10, 48), atol=1e-4, rtol=1e-5)


# ---------------------------------------------------------------------------------------
# paged_attention_invariant
# ---------------------------------------------------------------------------------------

SEQ_LENS = [150, 37, 70, 1, 16]


class _Sequences:
    """Whole sequences' queries, keys and values, each request's blocks shuffled in one
    cache pool. ``step(chunks)`` builds a step of (req, start, q_len) chunks: the cache
    holds each request's positions < start + q_len, NaN everywhere else."""

    def __init__(self, num_heads, num_kv_heads, head_dim, block_size, dtype, seed):
        gen = _gen(seed)
        self.bs, self.dtype, self.shape = block_size, dtype, (num_kv_heads, head_dim)
        self.q = [torch.randn(n, num_heads, head_dim, generator=gen).to(dtype) for n in SEQ_LENS]
        self.k = [torch.randn(n, num_kv_heads, head_dim, generator=gen).to(dtype) for n in SEQ_LENS]
        self.v = [torch.randn(n, num_kv_heads, head_dim, generator=gen).to(dtype) for n in SEQ_LENS]
        nblocks = [-(-n // block_size) for n in SEQ_LENS]
        self.num_blocks = sum(nblocks) + 3
        perm = torch.randperm(self.num_blocks, generator=gen).tolist()
        self.blocks = [[perm.pop() for _ in range(nb)] for nb in nblocks]

    def slots(self, req, n):
        pos = torch.arange(n)
        return torch.tensor(self.blocks[req])[pos // self.bs] * self.bs + pos % self.bs

    def step(self, chunks):
        cache = torch.full((2, self.num_blocks, self.bs, *self.shape), float("nan"), dtype=self.dtype)
        width = max(len(self.blocks[r]) for r, _, _ in chunks) + 1
        tables = torch.zeros(len(chunks), width, dtype=torch.int32)
        for i, (r, start, q_len) in enumerate(chunks):
            s = self.slots(r, start + q_len)
            cache[0].view(-1, *self.shape)[s] = self.k[r][: start + q_len]
            cache[1].view(-1, *self.shape)[s] = self.v[r][: start + q_len]
            tables[i, : len(self.blocks[r])] = torch.tensor(self.blocks[r], dtype=torch.int32)
        q_lens = torch.tensor([q for _, _, q in chunks])
        qsl = torch.cat([torch.zeros(1, dtype=torch.int64), q_lens.cumsum(0)]).int()
        seq_lens = torch.tensor([s + q for _, s, q in chunks], dtype=torch.int32)
        query = torch.cat([self.q[r][s : s + q] for r, s, q in chunks])
        return query, cache, tables, qsl, seq_lens

    def run(self, chunks):
        """{(req, position): output row [num_heads, head_dim]} of one step, on the device."""
        query, cache, tables, qsl, seq_lens = self.step(chunks)
        out = paged_attention_invariant(
            query.to(DEVICE), cache.to(DEVICE), tables.to(DEVICE), qsl.to(DEVICE), seq_lens.to(DEVICE),
            self.q[0].shape[-1] ** -0.5, int((qsl[1:] - qsl[:-1]).max()), int(seq_lens.max()),
        ).cpu()
        rows, i = {}, 0
        for r, s, q in chunks:
            for p in range(s, s + q):
                rows[(r, p)] = out[i]
                i += 1
        return rows


ATTN_CASES = [  # (num_heads, num_kv_heads, head_dim, block_size, dtype)
    pytest.param(8, 2, 32, 16, torch.float32, id="gqa4-d32-bs16-fp32"),
    pytest.param(6, 2, 64, 4, torch.float32, id="gqa3-d64-bs4-fp32"),  # group not a power of two
    pytest.param(4, 2, 64, 16, torch.bfloat16, id="gqa2-d64-bs16-bf16"),
]


def _chunked(req, chunk, offset):
    """Request ``req`` cut into chunks: [0, offset) first, then ``chunk`` tokens at a time."""
    n = SEQ_LENS[req]
    cuts = sorted({0, min(offset, n), *range(min(offset, n), n, chunk), n})
    return [(req, a, b - a) for a, b in zip(cuts, cuts[1:]) if b > a]


@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,block_size,dtype", ATTN_CASES)
def test_attention_rows_are_layout_invariant(num_heads, num_kv_heads, head_dim, block_size, dtype):
    """Each query token's output is bitwise the same as (b) in its whole-prompt prefill
    alone, (a) as a decode, (c) in chunks of several sizes at several offsets, (d) in steps
    mixing requests of other lengths, chunks and decodes; (b) is close to the reference."""
    seqs = _Sequences(num_heads, num_kv_heads, head_dim, block_size, dtype, seed=4)
    golden = {}
    for r, n in enumerate(SEQ_LENS):
        golden.update(seqs.run([(r, 0, n)]))
        query, cache, tables, qsl, seq_lens = seqs.step([(r, 0, n)])
        ref = paged_attention_ref(query, cache, tables, qsl, seq_lens, head_dim**-0.5)
        got = torch.stack([golden[(r, p)] for p in range(n)])
        tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(got, ref, **tol)

    def check(rows, what):
        for key, row in rows.items():
            assert torch.equal(row, golden[key]), (what, key, float((row.float() - golden[key].float()).abs().max()))

    # (a) decodes around block and key-tile boundaries, one per request per step.
    points = [sorted({0, 1, block_size - 1, block_size, 63, 64, 65, n - 1} & set(range(n))) for n in SEQ_LENS]
    for j in range(max(map(len, points))):
        check(seqs.run([(r, p[j], 1) for r, p in enumerate(points) if j < len(p)]), f"decodes {j}")
    check(seqs.run([(0, 70, 1)]), "one decode alone")
    # (c) chunks of several sizes at several offsets: step i holds chunk i of requests 0,
    # 1 and 2 (each after its earlier chunks).
    for chunk, offset in ((9, 0), (16, 3), (37, 64), (100, 20)):
        cuts = [_chunked(r, chunk, offset) for r in (0, 1, 2)]
        for i in range(max(map(len, cuts))):
            check(seqs.run([c[i] for c in cuts if i < len(c)]), f"chunks {chunk}+{offset} step {i}")
    # (d) mixed steps: chunks, decodes and whole prompts of other requests together.
    check(seqs.run([(1, 0, 37), (0, 149, 1), (2, 40, 30), (3, 0, 1), (4, 15, 1)]), "mixed 1")
    check(seqs.run([(4, 0, 16), (2, 69, 1), (0, 20, 100), (1, 36, 1)]), "mixed 2")
    check(seqs.run([(0, 64, 1), (2, 64, 1), (4, 3, 1), (1, 12, 1)]), "decodes")


def test_attention_backend_on_device_metadata_and_registry():
    """The registered backend reads device tensors only (host mirrors None) and matches the
    kernel; the op set is registered with the invariant kernels."""
    seqs = _Sequences(8, 2, 32, 16, torch.float32, seed=5)
    chunks = [(0, 100, 50), (3, 0, 1), (2, 69, 1)]
    query, cache, tables, qsl, seq_lens = seqs.step(chunks)
    backend = create_attention_backend("triton_invariant", BackendLimits(2, 64, 4, DEVICE))
    assert backend.name == "triton_invariant" and backend.rotary_write_kv is None
    md = AttentionMetadata(
        slot_mapping=torch.zeros(0, dtype=torch.int64, device=DEVICE), block_tables=tables.to(DEVICE),
        query_start_loc=qsl.to(DEVICE), seq_lens=seq_lens.to(DEVICE), query_start_loc_cpu=None, seq_lens_cpu=None,
        max_query_len=50, max_seq_len=150,
    )
    out = backend.attention(query.to(DEVICE), cache.to(DEVICE), md, 32**-0.5).cpu()
    want = seqs.run(chunks)
    assert torch.equal(out, torch.stack(list(want.values())))
    ops = get_ops("triton_invariant")
    assert ops.name == "triton_invariant" and ops.batch_invariant
    assert ops.linear is linear_invariant and ops.rms_norm is rms_norm_invariant
    assert ops.sample_tokens is None  # the sampler's torch path


def test_cuda_platform_names_the_triton_invariant_kernels():
    from rollout.platforms.cuda import CudaPlatform

    assert CudaPlatform().invariant_backends() == ("triton_invariant", "triton_invariant")


# ---------------------------------------------------------------------------------------
# Autograd: the trainer's path
# ---------------------------------------------------------------------------------------


def test_attention_gradients_match_torch_through_a_written_cache():
    """As the trainer runs it: K/V written into a non-leaf cache (differentiable write),
    then attention. Forward bits are the no-grad kernel's; gradients of q, k, v match the
    torch reference's (fp32; the backward recomputes with it, so 1e-5)."""
    h, hkv, d, bs = 4, 2, 16, 4
    lens = [9, 5]
    gen = _gen(6)
    n = sum(lens)
    q0, k0, v0 = _randn(gen, n, h, d), _randn(gen, n, hkv, d), _randn(gen, n, hkv, d)
    g = _randn(gen, n, h, d)
    tables = torch.tensor([[0, 1, 2], [3, 4, 0]], dtype=torch.int32, device=DEVICE)
    slots = torch.cat([torch.arange(9), torch.arange(5) + 12]).to(DEVICE)
    qsl = torch.tensor([0, 9, 14], dtype=torch.int32, device=DEVICE)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    md = AttentionMetadata(slots, tables, qsl, seq_lens, qsl.cpu(), seq_lens.cpu(), 9, 9)
    backend = create_attention_backend("triton_invariant")

    def forward(attend, write):
        q, k, v = (t.clone().requires_grad_() for t in (q0, k0, v0))
        cache = torch.zeros(2, 5, bs, hkv, d, device=DEVICE, requires_grad=True).clone()
        write(k, v, cache, slots)
        out = attend(q, cache)
        (out * g).sum().backward()
        return out.detach(), (q.grad, k.grad, v.grad)

    out, grads = forward(lambda q, c: backend.attention(q, c, md, d**-0.5), backend.write_kv)
    ref_out, ref_grads = forward(lambda q, c: paged_attention_ref(q, c, tables, qsl.cpu(), seq_lens.cpu(), d**-0.5),
                                 write_kv_ref)
    cache = torch.zeros(2, 5, bs, hkv, d, device=DEVICE)
    backend.write_kv(k0, v0, cache, slots)
    assert torch.equal(out, backend.attention(q0, cache, md, d**-0.5))
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def _grads(fn, inputs, g):
    leaves = [t.clone().requires_grad_() for t in inputs]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    sum((o.float() * gi).sum() for o, gi in zip(outs, g)).backward()
    return [o.detach() for o in outs], [t.grad for t in leaves]


def test_elementwise_and_norm_ops_keep_triton_bits_and_torch_gradients():
    """RMSNorm (with residual), rotary (with Qwen3's q/k norm) and SiLU-and-mul: under
    autograd the forward is the Triton kernel's, bit for bit; gradients match the torch
    references' (fp32: the backward recomputes with them)."""
    from rollout.kernels.triton_activation import silu_and_mul
    from rollout.kernels.triton_layernorm import rms_norm
    from rollout.kernels.triton_rotary import rotary

    gen = _gen(7)
    x, res, w = _randn(gen, 6, 40), _randn(gen, 6, 40), _randn(gen, 40)
    cases = [
        (lambda a, r, ww: rms_norm_invariant(a, ww, 1e-6, r), lambda a, r, ww: rms_norm_ref(a, ww, 1e-6, r),
         lambda a, r, ww: rms_norm(a, ww, 1e-6, r), (x, res, w)),
        (silu_and_mul_invariant, silu_and_mul_ref, silu_and_mul, (_randn(gen, 5, 24),)),
    ]
    cos_sin = RotaryEmbedding(16, 64, {"rope_theta": 10000.0, "rope_type": "default"}).cos_sin_cache.to(DEVICE)
    pos = torch.tensor([0, 3, 9, 63, 1], device=DEVICE)
    qk = (_randn(gen, 5, 4, 16), _randn(gen, 5, 2, 16), _randn(gen, 16), _randn(gen, 16))
    cases.append((lambda q, k, qw, kw: rotary_invariant(pos, q, k, cos_sin, qw, kw, 1e-6),
                  lambda q, k, qw, kw: rotary_ref(pos, q, k, cos_sin, qw, kw, 1e-6),
                  lambda q, k, qw, kw: rotary(pos, q, k, cos_sin, qw, kw, 1e-6), qk))
    for inv, ref, kernel, inputs in cases:
        with torch.no_grad():
            bits = kernel(*inputs)
        bits = bits if isinstance(bits, tuple) else (bits,)
        g = [_randn(gen, *b.shape) for b in bits]
        outs, grads = _grads(inv, inputs, g)
        _, ref_grads = _grads(ref, inputs, g)
        for o, b in zip(outs, bits):
            assert torch.equal(o, b)
        for got, want in zip(grads, ref_grads):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_module_is_interpreted_off_gpu():
    if DEVICE.type == "cpu":
        assert type(triton_invariant._matmul_kernel).__name__ == "InterpretedFunction"
