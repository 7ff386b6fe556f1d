"""The FP8 block-scaled Triton kernels (rollout/kernels/triton_fp8.py) against the torch
reference (rollout/kernels/fp8.py): the activation quantization bitwise (including the
e4m3 rounding's ties, carries and subnormals), the GEMM within its derived tolerance with
tails of T, N and K, bias, narrowed shard views of a fused weight and 3-D inputs.

Off GPU the kernels run in Triton's interpreter on small shapes (TRITON_INTERPRET is set
here before the kernel module is first imported, as in test_triton_moe.py); on a CUDA
machine the same tests run compiled. Real shapes and timings: ``python -m tests.gpu.check_fp8``."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton")

from rollout.kernels import fp8 as ref  # noqa: E402
from rollout.kernels.triton_fp8 import (  # noqa: E402
    Fp8Tiles, fp8_block_matmul, fp8_linear, fp8_tiles, quantize_activation_per_token_group,
)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE.type == "cpu" and not os.environ.get("TRITON_INTERPRET"):
    pytest.skip("triton kernels were compiled before TRITON_INTERPRET was set", allow_module_level=True)

# Narrow tiles: several column tiles per scale block, four K steps per scale block.
SMALL = Fp8Tiles(block_m=16, block_n=16, block_k=32, num_stages=2)
WIDE = Fp8Tiles(block_m=64, block_n=128, block_k=128, num_stages=2)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _bits(q: torch.Tensor) -> torch.Tensor:
    return q.view(torch.uint8).cpu()


def _activations(gen, t, k, dtype):
    """Rows and groups of very different ranges, a zero group, signed zeros."""
    x = torch.randn(t, k, generator=gen) * torch.rand(t, 1, generator=gen) * 10
    x[:, : min(k, 128)] *= 30
    if t > 3 and k > 128:
        x[3, 128:256] = 0.0
    x[0, :5] = -0.0
    return x.to(dtype).to(DEVICE)


def _weight(gen, n, k):
    w = torch.randn(n, k, generator=gen) * k**-0.5
    w[: min(n, 128)] *= 4  # blocks of different scales
    return ref.quantize_weight_blockwise(w.to(DEVICE))


# ---------------------------------------------------------------------------------------
# Activation quantization: bitwise
# ---------------------------------------------------------------------------------------


def _assert_quantized_like_reference(x: torch.Tensor) -> None:
    q, scale = quantize_activation_per_token_group(x)
    q_ref, scale_ref = ref.quantize_activation_per_token_group(x)
    assert q.dtype == ref.FP8_DTYPE and q.shape == x.shape and scale.shape == scale_ref.shape
    assert torch.equal(scale.cpu(), scale_ref.cpu())
    bad = (_bits(q) != _bits(q_ref)).nonzero()
    assert bad.numel() == 0, [(float(x[i, j]), float(q[i, j]), float(q_ref[i, j])) for i, j in bad[:5].tolist()]


def test_e4m3_rounding_ties_carries_subnormals():
    """Every group holds 448, so its scale is exactly 1 and the codes are x rounded to e4m3:
    every finite e4m3 value, the midpoints between neighbours (ties to even, including
    those that carry into the exponent, 124 -> 128), their fp32 neighbours, the subnormal
    range (steps of 2^-9) and values that round to a signed zero."""
    codes = torch.arange(256, dtype=torch.uint8).view(ref.FP8_DTYPE).float()
    values = codes[torch.isfinite(codes)].unique()  # sorted, -448 .. 448
    mids = (values[1:] + values[:-1]) / 2
    up, down = torch.full_like(mids, 1e9), torch.full_like(mids, -1e9)
    tiny = torch.linspace(-2.0**-6, 2.0**-6, 257)  # the subnormal range and its edges
    special = torch.tensor([0.0, -0.0, 1e-5, -1e-5, 2.0**-10, -(2.0**-10), 3 * 2.0**-11, 447.9, -447.9])
    v = torch.cat([values, mids, torch.nextafter(mids, up), torch.nextafter(mids, down), tiny, special])
    v = torch.cat([v, torch.zeros(-v.numel() % 127)]).view(-1, 127)
    x = torch.cat([v, torch.full((v.shape[0], 1), 448.0)], dim=1)  # [rows, 128], one group each
    _assert_quantized_like_reference(x.to(DEVICE))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("t,k", [(1, 300), (37, 256), (5, 1100), (3, 70)])
def test_quantize_matches_reference_bitwise(dtype, t, k):
    _assert_quantized_like_reference(_activations(_gen(k + t), t, k, dtype))


def test_quantize_strided_rows():
    wide = _activations(_gen(1), 9, 700, torch.bfloat16)
    x = wide[:, 100:400]  # a row stride of 700: read in place
    _assert_quantized_like_reference(x)
    _assert_quantized_like_reference(wide[:, ::2])  # a strided last dim: copied first


def test_quantize_scale_rules():
    """CUDA torch computes ``amax / 448`` as ``amax * fp32(1 / 448)``, CPU torch as a true
    division; the two differ in the last bit for some amaxes. Each rule of the kernel
    matches torch's on its device, checked here on this one against a torch emulation."""
    x = _activations(_gen(2), 64, 1024, torch.float32)
    amax = x.abs().view(64, 8, 128).amax(-1).clamp(min=1e-10)
    inv = torch.tensor(1.0, device=DEVICE) / torch.tensor(448.0, device=DEVICE)  # fp32(1) / fp32(448)
    for by_reciprocal, want in ((False, torch.div(amax, torch.tensor(448.0, device=DEVICE))), (True, amax * inv)):
        q, scale = quantize_activation_per_token_group(x, scale_by_reciprocal=by_reciprocal)
        assert torch.equal(scale, want)
        q_want = (x / want.repeat_interleave(128, 1)).clamp(-448, 448).to(ref.FP8_DTYPE)
        assert torch.equal(_bits(q), _bits(q_want))
    assert not torch.equal(amax / torch.tensor(448.0, device=DEVICE), amax * inv)  # the rules do differ


# ---------------------------------------------------------------------------------------
# GEMM
# ---------------------------------------------------------------------------------------


def _magnitude(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """|x_deq| @ |w_deq|^T in fp64 from the reference's quantized operands, exactly
    dequantized: the size of the terms each output is summed from."""
    k = x.shape[-1]
    x_q, x_scale = ref.quantize_activation_per_token_group(x.reshape(-1, k))
    xd = x_q.double().cpu() * x_scale.double().cpu().repeat_interleave(128, 1)[:, :k]
    wd = w_q.double().cpu() * w_scale.double().cpu().repeat_interleave(128, 0)[: w_q.shape[0]].repeat_interleave(
        128, 1)[:, :k]
    return (xd.abs() @ wd.abs().T).view(*x.shape[:-1], w_q.shape[0])


def _assert_close(got, x, w_q, w_scale, bias=None):
    """Both results are sums of the same exact fp8 products times the same scales. The
    reference rounds each dequantized operand (2 roundings), each product (1) and sums K
    terms in fp32 (K - 1); the kernel's products are exact, it sums at most 128 per block
    (127), rounds the scale product and the scaled block sum (2) and adds ceil(K/128)
    blocks: each is within (K + 3) * 2^-24 of the magnitudes ``|x| @ |w|^T`` (``_magnitude``)
    from the exact value, so they are within twice that of each other. On a GPU, Hopper's
    fp8 tensor cores accumulate a block with about 13 mantissa bits, truncating, once per
    32 products (4 per block): 2^-10 of the magnitudes covers it. Both then round to the
    output dtype (half an ulp each: 2^-8 of |out| for bf16, 2^-11 for fp16), and again
    after the bias add, so the bound adds an ulp of the result before and after the bias.
    The rounding of two sums this close tips only when one lies within ~K * 2^-24 of a
    rounding boundary, rare at these K: in the interpreter >= 90% of the outputs are
    bitwise the reference's."""
    want = ref.fp8_linear_ref(x, w_q, w_scale, bias)
    want_mm = want if bias is None else ref.fp8_linear_ref(x, w_q, w_scale)
    assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, want.shape, got.dtype, want.dtype)
    k = x.shape[-1]
    mag = _magnitude(x, w_q, w_scale)
    accum = 2 * (k + 3) * 2.0**-24 + (2.0**-10 if DEVICE.type == "cuda" else 0.0)
    ulp = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}[x.dtype]
    want_d, want_mm_d = want.double().cpu(), want_mm.double().cpu()
    bound = accum * mag + 1.01 * ulp * (want_mm_d.abs() + want_d.abs()) + 2.0**-24
    err = (got.double().cpu() - want_d).abs()
    assert bool((err <= bound).all()), float((err - bound).max())
    if DEVICE.type == "cpu" and x.dtype != torch.float32:
        assert float((err == 0).double().mean()) >= 0.9, float((err == 0).double().mean())


@pytest.mark.parametrize(
    "t,k,n,dtype,with_bias",
    [
        (1, 300, 272, torch.bfloat16, False),  # decode; N and K tails
        (37, 300, 272, torch.bfloat16, True),  # T > 16: several row tiles
        (20, 256, 256, torch.float32, True),  # whole blocks (the unmasked K path)
        (5, 200, 160, torch.float16, False),
    ],
    ids=["t1_bf16", "t37_bf16_bias", "t20_fp32_bias", "t5_fp16"],
)
def test_fp8_linear_matches_reference(t, k, n, dtype, with_bias):
    gen = _gen(t * 1000 + k)
    x = _activations(gen, t, k, dtype)
    w_q, w_scale = _weight(gen, n, k)
    bias = (torch.randn(n, generator=gen)).to(dtype).to(DEVICE) if with_bias else None
    first = fp8_linear(x, w_q, w_scale, bias)
    _assert_close(first, x, w_q, w_scale, bias)
    for tiles in (SMALL, WIDE):
        _assert_close(fp8_linear(x, w_q, w_scale, bias, tiles=tiles), x, w_q, w_scale, bias)
    assert torch.equal(fp8_linear(x, w_q, w_scale, bias), first)  # repeatable


def test_fp8_block_matmul_fp32_matches_reference():
    gen = _gen(3)
    x = _activations(gen, 19, 300, torch.float32)
    w_q, w_scale = _weight(gen, 200, 300)
    x_q, x_scale = ref.quantize_activation_per_token_group(x)
    got = fp8_block_matmul(x_q, x_scale, w_q, w_scale)
    want = ref.fp8_block_matmul_ref(x_q, x_scale, w_q, w_scale)
    assert got.dtype == torch.float32
    bound = (2 * 303 * 2.0**-24 + (2.0**-10 if DEVICE.type == "cuda" else 0.0)) * _magnitude(x, w_q, w_scale)
    assert bool(((got - want).abs().cpu().double() <= bound + 1e-30).all())


def test_fp8_linear_narrowed_shard_views():
    """A fused q/k/v weight whose shards quantize on their own (each starts a block row;
    k and v are 96 rows, not whole blocks), used per shard through ``narrow`` views as
    ``LinearBase._matmul`` does: no copy, the same bits as on a contiguous copy."""
    gen = _gen(4)
    k = 300
    shards = [_weight(gen, rows, k) for rows in (256, 96, 96)]
    w_q = torch.cat([q for q, _ in shards])  # [448, K]
    w_scale = torch.cat([s for _, s in shards])  # [2 + 1 + 1, ceil(K/128)]
    x = _activations(gen, 21, k, torch.bfloat16)
    for r0, rows, b0, nb in ((0, 256, 0, 2), (256, 96, 2, 1), (352, 96, 3, 1)):
        wv, sv = w_q.narrow(0, r0, rows), w_scale.narrow(0, b0, nb)
        assert wv.data_ptr() != w_q.data_ptr() or r0 == 0  # a view into the fused weight
        got = fp8_linear(x, wv, sv)
        _assert_close(got, x, wv, sv)
        assert torch.equal(got, fp8_linear(x, wv.contiguous(), sv.contiguous()))


def test_fp8_linear_3d_input():
    gen = _gen(5)
    x = _activations(gen, 10, 200, torch.bfloat16).view(2, 5, 200)
    w_q, w_scale = _weight(gen, 144, 200)
    bias = torch.randn(144, generator=gen).to(torch.bfloat16).to(DEVICE)
    got = fp8_linear(x, w_q, w_scale, bias)
    assert got.shape == (2, 5, 144)
    _assert_close(got, x, w_q, w_scale, bias)
    assert torch.equal(got.view(10, 144), fp8_linear(x.reshape(10, 200), w_q, w_scale, bias))


def test_default_tiles_and_validation():
    assert fp8_tiles(1, 4096).block_m == 16 and fp8_tiles(1, 4096).block_n == 32
    assert fp8_tiles(16, 24576).block_n == 64
    assert fp8_tiles(64, 4096).block_m == 32
    assert fp8_tiles(2048, 4096).block_m == 64
    for bad in (dict(block_m=16, block_n=256), dict(block_m=16, block_n=48), dict(block_m=8, block_n=32),
                dict(block_m=16, block_n=32, block_k=256), dict(block_m=16, block_n=32, block_k=16)):
        with pytest.raises(ValueError):
            Fp8Tiles(**bad)


def test_empty_and_refusals():
    gen = _gen(6)
    w_q, w_scale = _weight(gen, 130, 200)
    x = _activations(gen, 4, 200, torch.bfloat16)
    assert fp8_linear(x[:0], w_q, w_scale).shape == (0, 130)
    with pytest.raises(ValueError, match="weight must be"):
        fp8_linear(x[:, :100], w_q, w_scale)  # K differs
    with pytest.raises(ValueError, match="weight must be"):
        fp8_linear(x, w_q.float(), w_scale)
    with pytest.raises(ValueError, match="scale must be"):
        fp8_linear(x, w_q, w_scale[:1])
    with pytest.raises(ValueError, match="bias must be"):
        fp8_linear(x, w_q, w_scale, torch.zeros(130, device=DEVICE))  # fp32 bias, bf16 x
    with pytest.raises(ValueError, match="expected x"):
        fp8_linear(x.long(), w_q, w_scale)
    with pytest.raises(ValueError, match="contiguous"):
        fp8_linear(x[:, :128], w_q.t().contiguous().t()[:, :128], w_scale[:, :1])


def test_the_triton_op_set_runs_it_for_fp8_linears():
    """A fused q/k/v layer built with quantization="fp8" (shards of 192/64/64 rows: the
    second and third start mid-block, so each runs on a narrowed view) gives under the
    Triton op set what the reference gives under the torch one, within the bound above;
    "triton_no_fp8" (GPUs before sm_89: no fp8 tl.dot) keeps the references."""
    from rollout.models.backends import TORCH_OPS, create_attention_backend, get_ops
    from rollout.models.forward_context import ForwardContext, set_forward_context
    from rollout.models.layers.linear import ColumnLinear
    from rollout.models.loader import init_dummy_weights

    ops = get_ops("triton")
    assert ops.fp8_linear is fp8_linear
    no_dot = get_ops("triton_no_fp8")
    assert no_dot.fp8_linear is ref.fp8_linear_ref and no_dot.fused_moe_fp8 is TORCH_OPS.fused_moe_fp8
    with torch.device(DEVICE):
        layer = ColumnLinear(160, [192, 64, 64], True, torch.float32, shard_ids=["q", "k", "v"], quantization="fp8")
    init_dummy_weights(layer, seed=0, std=0.1)
    x = torch.randn(5, 160, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    out = {}
    for name, op_set in (("torch", TORCH_OPS), ("triton", ops)):
        with torch.no_grad(), set_forward_context(ForwardContext(None, [], create_attention_backend("torch"), op_set)):
            out[name] = layer(x)
    w, s, b = layer.weight, layer.weight_scale_inv, layer.bias
    for r0, rows, b0, blocks in ((0, 192, 0, 2), (192, 64, 2, 1), (256, 64, 3, 1)):  # each shard starts a block row
        shard = (w.narrow(0, r0, rows), s.narrow(0, b0, blocks), b.narrow(0, r0, rows))
        _assert_close(out["triton"][:, r0 : r0 + rows], x, *shard)
        assert torch.equal(out["torch"][:, r0 : r0 + rows], ref.fp8_linear_ref(x, *shard))
