"""The fused MoE Triton kernels (rollout/kernels/triton_moe.py) against the torch reference:
the alignment's invariants, the result (fp32 and bf16), edge cases of the routing, and
bitwise repeatability.

Off GPU the kernels run in Triton's interpreter on small shapes (TRITON_INTERPRET is set
here before the kernel module is first imported, as in test_triton_invariant.py); on a CUDA
machine the same tests run compiled. Real shapes and timings: ``python -m tests.gpu.check_moe``."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton")

from rollout.kernels.activation import silu_and_mul_ref  # noqa: E402
from rollout.kernels.moe import fused_moe_ref  # noqa: E402
from rollout.kernels.triton_moe import MoeTiles, fused_moe, max_padded_pairs, moe_align, moe_tiles  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE.type == "cpu" and not os.environ.get("TRITON_INTERPRET"):
    pytest.skip("triton kernels were compiled before TRITON_INTERPRET was set", allow_module_level=True)

E, K, H, I = 8, 2, 48, 40  # H, I not multiples of the K steps: the ragged-K paths
# Small tiles: several column tiles and K steps per program, both K paths (16 | 48, 16 | 40 not).
SMALL = MoeTiles(block_m=16, block_n1=16, block_k1=16, block_n2=16, block_k2=16, num_stages=1)
TALL = MoeTiles(block_m=32, block_n1=16, block_k1=32, block_n2=32, block_k2=16, num_stages=1)

def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _weights(gen, dtype, e=E, h=H, i=I):
    w13 = (torch.randn(e, 2 * i, h, generator=gen) * h**-0.5).to(dtype).to(DEVICE)
    w2 = (torch.randn(e, h, i, generator=gen) * i**-0.5).to(dtype).to(DEVICE)
    return w13, w2


def _routing(gen, t, k=K, e=E):
    """Router-like: k distinct experts per token, softmax weights over them."""
    vals, ids = torch.randn(t, e, generator=gen).topk(k, dim=-1)
    return torch.softmax(vals, dim=-1).to(DEVICE), ids.to(DEVICE)


def _magnitude(x, w13, w2, topk_weights, topk_ids):
    """sum_j w_j * (|h_j| @ |W2|^T) per output element, fp64 from the rounded inputs: the
    size of the terms each output is summed from."""
    xd, w13d, w2d = x.double().cpu(), w13.double().cpu(), w2.double().cpu()
    mag = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(topk_ids.shape[1]):
            e = int(topk_ids[t, j])
            gate, up = (w13d[e] @ xd[t]).chunk(2)
            h = torch.nn.functional.silu(gate) * up
            mag[t] += float(topk_weights[t, j]) * (h.abs() @ w2d[e].abs().T)
    return mag


def _assert_close(got, want, x, w13, w2, topk_weights, topk_ids):
    """The kernel rounds where the reference does (module docstring of triton_moe) and sums
    the k slots in its order; only the GEMMs' fp32 accumulation order (and, on a GPU, the
    fast exp) differ. fp32: each output is then within (H + I) * 2^-24 relative of the
    terms it is summed from (``_magnitude``); 1e-5 covers it with margin. bf16: a different
    accumulation order can tip a rounding of gate, up or silu (h then moves by at most ~4
    ulps, 2^-6 relative, so y by 2^-6 of the terms it sums), of y, of a weighted product and
    of each of the k partial sums (one ulp each, at most 2^-7 of ``_magnitude``):
    ``|err| <= (2^-6 + (k + 2) * 2^-7) * magnitude``. A tip needs a sum within the
    accumulation error of a rounding boundary, about H * 2^-24 / 2^-8 ~ 1% of roundings at
    these sizes, so at least 90% of the outputs are bitwise the reference's (all of them in
    the interpreter, whose fp32 dot happens to sum as torch's CPU matmul does here)."""
    assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, got.dtype, want.dtype)
    mag = _magnitude(x, w13, w2, topk_weights, topk_ids)
    err = (got.double().cpu() - want.double().cpu()).abs()
    if got.dtype == torch.float32:
        assert bool((err <= 1e-5 * mag + 1e-30).all()), float((err / mag).max())
        return
    bound = (2.0**-6 + (topk_ids.shape[1] + 2) * 2.0**-7) * mag
    assert bool((err <= bound).all()), float((err - bound).max())
    assert float((err == 0).double().mean()) >= 0.9, float((err == 0).double().mean())


# ---------------------------------------------------------------------------------------
# Alignment
# ---------------------------------------------------------------------------------------


def _check_alignment(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> None:
    """Both ways (one Triton program, torch ops) give the same layout, which has the
    invariants below."""
    one = moe_align(topk_ids, num_experts, block_m, one_program=True)
    sorted_ids, block_experts, num_padded = moe_align(topk_ids, num_experts, block_m, one_program=False)
    for a, b in zip(one, (sorted_ids, block_experts, num_padded), strict=True):
        assert a.dtype == b.dtype == torch.int32 and torch.equal(a, b), (a, b)
    flat = topk_ids.reshape(-1).cpu()
    num_pairs = flat.numel()
    sorted_ids, block_experts, n = sorted_ids.cpu().long(), block_experts.cpu().long(), int(num_padded)
    assert sorted_ids.numel() == max_padded_pairs(num_pairs, num_experts, block_m)
    assert block_experts.numel() * block_m == sorted_ids.numel()
    counts = torch.bincount(flat, minlength=num_experts)
    assert n == int(((counts + block_m - 1) // block_m * block_m).sum()) <= sorted_ids.numel()
    used = sorted_ids[:n]
    valid = used < num_pairs
    # Every (token, slot) pair exactly once; everything else is the sentinel (masked).
    assert torch.equal(used[valid].sort().values, torch.arange(num_pairs))
    assert bool((used[~valid] == num_pairs).all()) and bool((sorted_ids[n:] == num_pairs).all())
    # Blocks hold one expert: their valid pairs are routed to the block's expert, in order.
    for b in range(n // block_m):
        pairs = used[b * block_m : (b + 1) * block_m]
        pairs = pairs[pairs < num_pairs]
        assert pairs.numel() > 0, b  # no block of padding only
        assert bool((flat[pairs] == block_experts[b]).all()), b
        assert bool((pairs.diff() > 0).all()), b  # stable: pairs keep their order
    assert bool(((block_experts >= 0) & (block_experts < num_experts)).all())


@pytest.mark.parametrize("block_m", [16, 32])
def test_alignment_invariants(block_m):
    gen = _gen(0)
    for t, k, e in ((1, 2, E), (5, 2, E), (33, 2, E), (33, 1, E), (40, 8, 16), (40, 8, 128)):
        _, ids = _routing(gen, t, k=k, e=e)
        _check_alignment(ids, e, block_m)  # 128 experts: the Triton path walks 64-pair chunks
    # Skewed: experts with no pairs, one expert with most of them, runs of exact multiples.
    _check_alignment(torch.full((33, 1), 5, device=DEVICE), E, block_m)
    _check_alignment(torch.tensor([[0, 7]] * 16, device=DEVICE), E, block_m)
    _check_alignment(torch.tensor([[3, 3]], device=DEVICE), E, block_m)  # both slots, one expert
    _check_alignment(torch.zeros((0, 2), dtype=torch.int64, device=DEVICE), E, block_m)


def test_default_tiles_follow_pairs_per_expert():
    assert moe_tiles(8, 128, torch.bfloat16).block_m == 16  # Qwen3-30B-A3B T=1
    assert moe_tiles(256 * 8, 128, torch.bfloat16).block_m == 16  # T=256: 16 per expert
    assert moe_tiles(512 * 8, 128, torch.bfloat16).block_m == 32
    assert moe_tiles(4096 * 8, 128, torch.bfloat16).block_m == 128
    assert moe_tiles(4096 * 8, 128, torch.float32).block_m == 16


# ---------------------------------------------------------------------------------------
# fused_moe
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("t", [1, 5, 33])
def test_fused_moe_matches_reference(dtype, t):
    gen = _gen(t)
    x = torch.randn(t, H, generator=gen).to(dtype).to(DEVICE)
    w13, w2 = _weights(gen, dtype)
    weights, ids = _routing(gen, t)
    want = fused_moe_ref(x, w13, w2, weights, ids)
    for tiles in (None, SMALL, TALL):
        _assert_close(fused_moe(x, w13, w2, weights, ids, tiles=tiles), want, x, w13, w2, weights, ids)


@pytest.mark.parametrize("case", ["empty_expert", "one_expert", "k1", "k3", "t1", "repeated_expert"])
def test_fused_moe_routing_edge_cases(case):
    gen = _gen(10)
    dtype = torch.bfloat16
    t, k = {"empty_expert": (33, 2), "one_expert": (33, 2), "k1": (33, 1), "k3": (5, 3), "t1": (1, 2),
            "repeated_expert": (5, 2)}[case]
    x = torch.randn(t, H, generator=gen).to(dtype).to(DEVICE)
    w13, w2 = _weights(gen, dtype)
    weights, ids = _routing(gen, t, k=k)
    if case == "empty_expert":  # experts 2 and 6 get nothing
        ids = torch.where((ids == 2) | (ids == 6), (ids + 1) % E, ids)
        ids[:, 1] = torch.where(ids[:, 1] == ids[:, 0], (ids[:, 0] + 3) % E, ids[:, 1])
        assert not bool(((ids == 2) | (ids == 6)).any())
    elif case == "one_expert":  # every token's first slot on expert 4: 33 pairs, three blocks
        other = torch.arange(t, device=DEVICE) % (E - 1)
        ids[:, 0], ids[:, 1] = 4, other + (other >= 4).long()  # the second slot: any other expert
    elif case == "repeated_expert":  # not what a router gives, still a valid input
        ids[:, 1] = ids[:, 0]
    want = fused_moe_ref(x, w13, w2, weights, ids)
    for tiles in (None, SMALL):
        _assert_close(fused_moe(x, w13, w2, weights, ids, tiles=tiles), want, x, w13, w2, weights, ids)


def test_fused_moe_all_tokens_on_one_expert_k1():
    gen = _gen(11)
    x = torch.randn(33, H, generator=gen).to(DEVICE)
    w13, w2 = _weights(gen, torch.float32)
    weights = torch.rand(33, 1, generator=gen).to(DEVICE)
    ids = torch.full((33, 1), 7, device=DEVICE)
    got = fused_moe(x, w13, w2, weights, ids, tiles=SMALL)
    want = weights * (silu_and_mul_ref(x @ w13[7].T) @ w2[7].T)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_fused_moe_is_deterministic():
    gen = _gen(12)
    x = torch.randn(33, H, generator=gen).to(torch.bfloat16).to(DEVICE)
    w13, w2 = _weights(gen, torch.bfloat16)
    weights, ids = _routing(gen, 33)
    first = fused_moe(x, w13, w2, weights, ids)
    assert torch.equal(fused_moe(x, w13, w2, weights, ids), first)
    # int32 ids and a strided x are the same call.
    wide = torch.zeros(33, 2 * H, dtype=x.dtype, device=DEVICE)
    wide[:, ::2] = x
    assert torch.equal(fused_moe(wide[:, ::2], w13, w2, weights, ids.int()), first)


def test_fused_moe_empty_and_refusals():
    gen = _gen(13)
    w13, w2 = _weights(gen, torch.float32)
    x = torch.randn(4, H, generator=gen).to(DEVICE)
    weights, ids = _routing(gen, 4)
    assert fused_moe(x[:0], w13, w2, weights[:0], ids[:0]).shape == (0, H)
    with pytest.raises(ValueError, match="shapes"):
        fused_moe(x, w13, w2[:, :, :-1], weights, ids)
    with pytest.raises(ValueError, match="shapes"):
        fused_moe(x, w13, w2, weights[:3], ids[:3])
    with pytest.raises(ValueError, match="dtypes"):
        fused_moe(x, w13, w2, weights, ids.float())
    with pytest.raises(ValueError, match="dtypes"):
        fused_moe(x.bfloat16(), w13, w2, weights, ids)
    with pytest.raises(ValueError, match="contiguous"):
        fused_moe(x, w13.transpose(1, 2).contiguous().transpose(1, 2), w2, weights, ids)


def test_triton_op_set_runs_this_kernel():
    from rollout.models.backends import get_ops

    assert get_ops("triton").fused_moe is fused_moe
