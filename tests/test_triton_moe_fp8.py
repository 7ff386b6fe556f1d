"""The FP8 fused MoE Triton kernels (rollout/kernels/triton_moe_fp8.py) against the torch
reference ``fused_moe_fp8_ref``: fp32 and bf16, block tails and several tiles, routing edge
cases, bitwise repeatability, refused inputs.

Off GPU the kernels run in Triton's interpreter on small shapes (TRITON_INTERPRET is set
here before the kernel modules are first imported, as in test_triton_moe.py)."""

from __future__ import annotations

import os

import pytest
import torch
import transformers

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton")

from rollout.distributed.parallel_state import ParallelState  # noqa: E402
from rollout.kernels.fp8 import quantize_weight_blockwise  # noqa: E402
from rollout.kernels.moe import fused_moe_fp8_ref, route  # noqa: E402
from rollout.kernels.triton_moe import MoeTiles  # noqa: E402
from rollout.kernels.triton_moe_fp8 import fused_moe_fp8  # noqa: E402
from rollout.models.backends import TORCH_OPS, create_attention_backend, get_ops  # noqa: E402
from rollout.models.forward_context import ForwardContext, set_forward_context  # noqa: E402
from rollout.models.layers.moe import SparseMoeBlock  # noqa: E402
from rollout.models.loader import init_dummy_weights  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE.type == "cpu" and not os.environ.get("TRITON_INTERPRET"):
    pytest.skip("triton kernels were compiled before TRITON_INTERPRET was set", allow_module_level=True)

E, K = 4, 2
# H, I with 128-block tails (200 = 128 + 72, 160 = 128 + 32) and not multiples of the K steps.
H, I = 200, 160
SMALL = MoeTiles(block_m=16, block_n1=32, block_k1=32, block_n2=32, block_k2=64, num_stages=1)
WIDE = MoeTiles(block_m=32, block_n1=64, block_k1=128, block_n2=128, block_k2=128, num_stages=1)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _quantized_experts(gen: torch.Generator, e: int = E, h: int = H, i: int = I):
    """Random experts quantized as the engine keeps them: gate and up each their own blocks."""
    w13 = torch.randn(e, 2 * i, h, generator=gen) * h**-0.5
    w2 = torch.randn(e, h, i, generator=gen) * i**-0.5
    q13, s13 = zip(*[
        (torch.cat([g[0], u[0]]), torch.cat([g[1], u[1]]))
        for g, u in ((quantize_weight_blockwise(w[:i]), quantize_weight_blockwise(w[i:])) for w in w13)
    ])
    q2, s2 = zip(*[quantize_weight_blockwise(w) for w in w2])
    return tuple(torch.stack(t).to(DEVICE) for t in (q13, s13, q2, s2))


def _routing(gen: torch.Generator, t: int, k: int = K, e: int = E):
    vals, ids = torch.randn(t, e, generator=gen).topk(k, dim=-1)
    return torch.softmax(vals, dim=-1).to(DEVICE), ids.to(DEVICE)


def _magnitude(x, weights, topk_weights, topk_ids) -> torch.Tensor:
    """sum_j w_j * (|h_j| @ |W2|^T) per output element, fp64 from the dequantized weights:
    the size of the terms each output is summed from."""
    q13, s13, q2, s2 = (w.cpu() for w in weights)
    nb = s13.shape[1] // 2
    inter = q2.shape[2]

    def deq(q, s):
        return q.double() * s.double().repeat_interleave(128, 0)[: q.shape[0]].repeat_interleave(128, 1)[:, : q.shape[1]]

    mag = torch.zeros(x.shape, dtype=torch.float64)
    xd = x.double().cpu()
    for t in range(x.shape[0]):
        for j in range(topk_ids.shape[1]):
            e = int(topk_ids[t, j])
            gate = deq(q13[e, :inter], s13[e, :nb]) @ xd[t]
            up = deq(q13[e, inter:], s13[e, nb:]) @ xd[t]
            h = torch.nn.functional.silu(gate) * up
            mag[t] += float(topk_weights[t, j]) * (h.abs() @ deq(q2[e], s2[e]).abs().T)
    return mag


def _assert_close(got, want, x, weights, topk_weights, topk_ids):
    """Both sides multiply the same fp8 operands with the same scales; the kernels sum each
    128-block's exact products, then scale and add (the reference: one fp32 matmul of the
    dequantized operands), so a GEMM output moves within ~(K + 3) * 2^-24 of its magnitude
    (triton_fp8's argument). fp32: gate, up, h and y then differ by that much, except where
    h's drift tips an e4m3 rounding of the down GEMM's quantized input: that element jumps by
    up to 2^-4 of itself, so the output by up to 2^-4 of ``_magnitude``. Asserted: every
    output within 2^-4 of its magnitude, and at least 95% within 1e-5 (measured in the
    interpreter over three seeds and these tiles: all, at most 3e-7). bf16: the drift can
    also tip a bf16 rounding of gate, up, silu, h, y, a weighted product and each of the k
    partial sums (test_triton_moe.py's bound, ``(2^-6 + (k + 2) * 2^-7) * magnitude``), plus
    the e4m3 step: every output within 2^-4 + that bound, at least 90% bitwise the
    reference's (measured: 99.95% and more)."""
    assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, got.dtype, want.dtype)
    mag = _magnitude(x, weights, topk_weights, topk_ids)
    err = (got.double().cpu() - want.double().cpu()).abs()
    if got.dtype == torch.float32:
        assert bool((err <= 2.0**-4 * mag + 1e-30).all()), float((err / mag).max())
        assert float((err <= 1e-5 * mag + 1e-30).double().mean()) >= 0.95, float((err / mag).max())
        return
    bound = (2.0**-4 + 2.0**-6 + (topk_ids.shape[1] + 2) * 2.0**-7) * mag
    assert bool((err <= bound).all()), float((err - bound).max())
    assert float((err == 0).double().mean()) >= 0.9, float((err == 0).double().mean())


@pytest.mark.parametrize("tiles", [SMALL, WIDE, None], ids=["small", "wide", "default"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_reference(dtype, tiles):
    gen = _gen(0)
    weights = _quantized_experts(gen)
    x = torch.randn(11, H, generator=gen).to(dtype).to(DEVICE)
    topk_weights, topk_ids = _routing(gen, 11)
    got = fused_moe_fp8(x, *weights, topk_weights, topk_ids, tiles=tiles)
    want = fused_moe_fp8_ref(x, *weights, topk_weights, topk_ids)
    _assert_close(got, want, x, weights, topk_weights, topk_ids)
    assert torch.equal(fused_moe_fp8(x, *weights, topk_weights, topk_ids, tiles=tiles), got)  # repeatable


def test_whole_blocks_and_routing_edges():
    """I and H whole 128-blocks (the engine's tiny model and Qwen3-30B-A3B's 768 x 2048 are);
    one token; all tokens on one expert (others idle); an expert that no token picks."""
    gen = _gen(1)
    weights = _quantized_experts(gen, e=3, h=256, i=128)
    for t, ids in ((1, None), (5, torch.tensor([[2, 0]] * 5)), (7, torch.tensor([[0, 1]] * 7))):
        x = torch.randn(t, 256, generator=gen).to(DEVICE)
        topk_weights, topk_ids = _routing(gen, t, e=3)
        if ids is not None:
            topk_ids = ids.to(DEVICE)
        got = fused_moe_fp8(x, *weights, topk_weights, topk_ids, tiles=SMALL)
        _assert_close(got, fused_moe_fp8_ref(x, *weights, topk_weights, topk_ids), x, weights, topk_weights, topk_ids)


def test_empty_and_refused():
    gen = _gen(2)
    weights = _quantized_experts(gen)
    x = torch.zeros(0, H, device=DEVICE)
    ids = torch.zeros(0, K, dtype=torch.int64, device=DEVICE)
    assert fused_moe_fp8(x, *weights, torch.zeros(0, K, device=DEVICE), ids).shape == (0, H)
    x = torch.randn(3, H, generator=gen).to(DEVICE)
    topk_weights, topk_ids = _routing(gen, 3)
    q13, s13, q2, s2 = weights
    bad = [
        (x, q13.float(), s13, q2, s2),  # weights not fp8
        (x, q13, s13[:, :1], q2, s2),  # gate/up scales of the fused rows' blocks, not each half's
        (x, q13, s13, q2, s2.double()),
        (x[:, :100], q13, s13, q2, s2),
    ]
    for args in bad:
        with pytest.raises(ValueError, match="fused_moe_fp8"):
            fused_moe_fp8(*args, topk_weights, topk_ids)
    with pytest.raises(ValueError, match="must divide 128"):
        fused_moe_fp8(x, *weights, topk_weights, topk_ids, tiles=MoeTiles(16, 32, 48, 32, 32))


def test_the_triton_op_set_runs_it_for_fp8_experts():
    """A Qwen3-MoE block built with quantization="fp8" runs this kernel under the Triton op
    set (the GPU's), and the reference under the torch one: same routing, results as above."""
    ops = get_ops("triton")
    assert ops.fused_moe_fp8 is fused_moe_fp8
    config = transformers.Qwen3MoeConfig(hidden_size=H, num_experts=E, num_experts_per_tok=K, moe_intermediate_size=I,
                                         norm_topk_prob=True)
    with torch.device(DEVICE):
        block = SparseMoeBlock(config, 0, torch.float32, ParallelState(), "fp8")
    init_dummy_weights(block, seed=0, std=0.1)
    x = torch.randn(9, H, generator=_gen(3)).to(DEVICE)
    out = {}
    for name, op_set in (("torch", TORCH_OPS), ("triton", ops)):
        ctx = ForwardContext(None, [], create_attention_backend("torch"), op_set, None)
        with torch.no_grad(), set_forward_context(ctx):
            out[name] = block(x)
    experts = block.experts
    weights = (experts.w13, experts.w13_scale_inv, experts.w2, experts.w2_scale_inv)
    with torch.no_grad():
        topk_weights, topk_ids = route(block.gate(x), K, True)
    assert torch.equal(out["torch"], fused_moe_fp8_ref(x, *weights, topk_weights, topk_ids))
    assert torch.equal(out["triton"], fused_moe_fp8(x, *weights, topk_weights, topk_ids))
    _assert_close(out["triton"], out["torch"], x, weights, topk_weights, topk_ids)
