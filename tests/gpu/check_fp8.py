"""GPU check of the FP8 block-scaled Triton GEMM (``triton_fp8.fp8_linear``) at Qwen3-8B's
linear shapes (hidden 4096; qkv 4096 + 2 * 1024 rows, o 4096, gate_up 2 * 12288, down
K = 12288), bf16 activations, T = 1, 16, 64, 256, 2048: the activation quantization
bitwise against the reference's on this GPU; the GEMM against the torch reference
(``fp8.fp8_linear_ref``) and an fp64 product of the same quantized operands, in bf16 and
in fp32 (how far the fp8 tensor cores' accumulation is from fp32's); the end-to-end
error against bf16 ``F.linear`` of the dequantized weight (the price of quantizing the
activations, reported only); a CUDA-graph capture; then timings against bf16
``F.linear`` of the same shapes with the H100's rooflines (3.35 TB/s; 1979 TFLOP/s fp8,
989 bf16, dense).

    python -m tests.gpu.check_fp8 [--quick] [--sweep]

``--sweep`` also times a few tile shapes per shape and T (for ``triton_fp8.fp8_tiles``).
Exits non-zero on the first failure. Not collected by pytest (a script)."""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from rollout.kernels import fp8 as ref
from rollout.kernels.triton_fp8 import (
    Fp8Tiles, fp8_block_matmul, fp8_linear, fp8_tiles, quantize_activation_per_token_group,
)
from tests.gpu.check_moe import fail, graphed, timed

DEV = torch.device("cuda")
BF16 = torch.bfloat16
SHAPES = {"qkv": (4096 + 2 * 1024, 4096), "o": (4096, 4096), "gate_up": (2 * 12288, 4096), "down": (4096, 12288)}
TOKENS = (1, 16, 64, 256, 2048)
PEAK_BYTES_PER_S = 3.35e12  # H100 SXM HBM3
PEAK_FP8_FLOP_PER_S = 1979e12  # H100 SXM dense fp8
PEAK_BF16_FLOP_PER_S = 989e12  # H100 SXM dense bf16
SWEEP = (  # block_m, block_n, block_k, warps, stages
    Fp8Tiles(16, 32, 128, 4, 4), Fp8Tiles(16, 64, 128, 4, 4), Fp8Tiles(16, 128, 128, 4, 5),
    Fp8Tiles(16, 32, 64, 4, 6), Fp8Tiles(32, 64, 128, 4, 4), Fp8Tiles(64, 64, 128, 4, 4),
    Fp8Tiles(64, 128, 128, 4, 3), Fp8Tiles(64, 128, 128, 8, 4), Fp8Tiles(128, 128, 128, 8, 3),
    Fp8Tiles(128, 128, 64, 8, 4), Fp8Tiles(128, 64, 128, 4, 4),
)


def make_weight(n: int, k: int, gen: torch.Generator):
    """(w_q, w_scale, the dequantized weight in bf16) of a random [n, k] weight."""
    w = (torch.randn(n, k, generator=gen, device=DEV) * k**-0.5).to(BF16)
    w_q, w_scale = ref.quantize_weight_blockwise(w)
    return w_q, w_scale, ref.dequantize_blockwise(w_q, w_scale).to(BF16)


def _dequantized_f64(q: torch.Tensor, scale: torch.Tensor, block_n: int) -> torch.Tensor:
    """q * scale in fp64 (exact: an e4m3 value times an fp32 scale fits in fp64)."""
    n, k = q.shape
    return q.double() * scale.double().repeat_interleave(block_n, 0)[:n].repeat_interleave(128, 1)[:, :k]


def _rms(t: torch.Tensor) -> float:
    return t.double().pow(2).mean().sqrt().item()


def check(quick: bool) -> None:
    gen = torch.Generator(device=DEV).manual_seed(1)
    for name, (n, k) in SHAPES.items():
        w_q, w_scale, w_deq = make_weight(n, k, gen)
        wd = _dequantized_f64(w_q, w_scale, 128)
        for t in (1, 256, 2048) if quick else TOKENS:
            x = torch.randn(t, k, generator=gen, device=DEV).to(BF16)
            q, s = quantize_activation_per_token_group(x)
            q_ref, s_ref = ref.quantize_activation_per_token_group(x)
            if not torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)) or not torch.equal(s, s_ref):
                fail(f"{name} T={t}: the activation quantization differs from the reference's")
            got = fp8_linear(x, w_q, w_scale)
            if not torch.equal(fp8_linear(x, w_q, w_scale), got):
                fail(f"{name} T={t}: two calls differ")
            want = ref.fp8_linear_ref(x, w_q, w_scale)
            xd = _dequantized_f64(q_ref, s_ref, 1)
            exact = xd @ wd.T  # [t, n] fp64: the quantized operands' exact product
            mag = xd.abs() @ wd.abs().T  # what each output is summed from
            # fp32 output: the accumulation alone (the test file's bound on a GPU).
            got32 = fp8_block_matmul(q, s, w_q, w_scale)
            acc_err = ((got32.double() - exact).abs() / mag.clamp(min=1e-30)).max().item()
            acc_bound = 2.0**-10 + 2 * (k + 3) * 2.0**-24
            scale = _rms(exact)
            err_kernel, err_ref = _rms(got.double() - exact) / scale, _rms(want.double() - exact) / scale
            max_diff = (got.double() - want.double()).abs().max().item() / exact.abs().max().item()
            same = (got == want).double().mean().item()
            e2e = _rms(got.double() - F.linear(x, w_deq).double()) / _rms(F.linear(x, w_deq))
            print(f"{name:7} [N={n:5}, K={k:5}] T={t:4}: quantization bitwise; rms err vs exact {err_kernel:.2e} "
                  f"(reference {err_ref:.2e}); bitwise the reference's {same:.2%}, max |diff| {max_diff:.1e} of "
                  f"max |out|\n{'':34}fp32 accumulation: max err {acc_err:.1e} of the magnitudes (bound "
                  f"{acc_bound:.1e}); vs bf16 F.linear: {e2e:.1e} rms")
            # The kernel rounds as the reference does: it may not be less accurate than it
            # (rms error within 1.25x) nor stray far from it.
            if err_kernel > 1.25 * err_ref + 1e-6 or max_diff > 0.05:
                fail(f"{name} T={t}: kernel error {err_kernel:.3g} vs reference {err_ref:.3g}, max diff {max_diff:.3g}")
            if acc_err > acc_bound:
                fail(f"{name} T={t}: fp32 accumulation error {acc_err:.3g} of the magnitudes > {acc_bound:.3g} "
                     "(tests/test_triton_fp8.py's GPU bound)")
            if e2e > 0.1:
                fail(f"{name} T={t}: {e2e:.3g} rms from bf16 F.linear (activation quantization alone costs a few %)")
    # No host sync: a decode step's linear captures in a CUDA graph and replays new inputs.
    n, k = SHAPES["qkv"]
    w_q, w_scale, _ = make_weight(n, k, gen)
    x = torch.randn(16, k, generator=gen, device=DEV).to(BF16)
    graph, out = graphed(lambda: fp8_linear(x, w_q, w_scale))
    x.copy_(torch.randn(16, k, generator=gen, device=DEV).to(BF16))
    graph.replay()
    if not torch.equal(out, fp8_linear(x, w_q, w_scale)):
        fail("CUDA graph replay differs from the eager call")
    print("CUDA graph: captured at T=16, replay of a new input equals the eager call bitwise")


def rooflines(t: int, n: int, k: int) -> tuple[float, float, float]:
    """(fp8 bytes, fp8 roofline ms, bf16 roofline ms). fp8: the weight (1 byte an element,
    scales), x read in bf16, its codes and scales written and read, the output in bf16.
    bf16: weight, x and output at 2 bytes. The larger of bytes and FLOPs at the peaks."""
    kb = -(-k // 128)
    fp8_bytes = n * k + 4 * (-(-n // 128)) * kb + 2 * t * k + 2 * (t * k + 4 * t * kb) + 2 * t * n
    bf16_bytes = 2 * (n * k + t * k + t * n)
    flops = 2 * t * n * k
    fp8_ms = 1e3 * max(fp8_bytes / PEAK_BYTES_PER_S, flops / PEAK_FP8_FLOP_PER_S)
    bf16_ms = 1e3 * max(bf16_bytes / PEAK_BYTES_PER_S, flops / PEAK_BF16_FLOP_PER_S)
    return fp8_bytes, fp8_ms, bf16_ms


def _best(eager: float, graph: float) -> float:
    return min(eager, graph) if graph == graph else eager


def time_all(quick: bool, sweep: bool) -> None:
    iters = 10 if quick else 30
    gen = torch.Generator(device=DEV).manual_seed(2)
    print("\nfp8_linear (quantize + GEMM) vs bf16 F.linear (cuBLAS), median ms; g: replayed from a CUDA graph "
          "(T <= 256); quant: the activation quantization alone; speedup: best bf16 / best fp8; roof: the fp8 "
          "path's roofline")
    print(f"{'shape':7} {'T':>5} {'tiles (m,n,k,w,s)':>19} {'fp8':>7} {'fp8 g':>7} {'quant':>7} {'bf16':>7} "
          f"{'bf16 g':>7} {'speedup':>7} {'roof':>7} {'of roof':>7} {'GB/s':>6} {'TFLOP/s':>7}")
    for name, (n, k) in SHAPES.items():
        w_q, w_scale, w_deq = make_weight(n, k, gen)
        for t in TOKENS:
            x = torch.randn(t, k, generator=gen, device=DEV).to(BF16)
            nbytes, roof, _ = rooflines(t, n, k)
            t_quant = timed(lambda: quantize_activation_per_token_group(x), iters)
            t_bf16 = timed(lambda: F.linear(x, w_deq), iters)
            g_bf16 = float("nan")
            if t <= 256:
                graph, _ = graphed(lambda: F.linear(x, w_deq))
                g_bf16 = timed(graph.replay, iters)
            for tiles in [None, *SWEEP] if sweep else [None]:
                tl_ = tiles or fp8_tiles(t, n)
                try:
                    ms = timed(lambda: fp8_linear(x, w_q, w_scale, tiles=tiles), iters)
                    g_ms = float("nan")
                    if t <= 256:
                        graph, _ = graphed(lambda: fp8_linear(x, w_q, w_scale, tiles=tiles))
                        g_ms = timed(graph.replay, iters)
                except Exception as exc:  # e.g. out of shared memory for a sweep shape
                    print(f"{name:7} {t:5} {_fmt(tl_):>19} failed: {type(exc).__name__}: {str(exc)[:80]}")
                    continue
                best = _best(ms, g_ms)
                mark = "*" if tiles is None else " "
                print(f"{name:7} {t:5} {_fmt(tl_) + mark:>19} {ms:7.3f} {g_ms:7.3f} {t_quant:7.3f} {t_bf16:7.3f} "
                      f"{g_bf16:7.3f} {_best(t_bf16, g_bf16) / best:6.2f}x {roof:7.3f} {roof / best:7.1%} "
                      f"{nbytes / best / 1e6:6.0f} {2 * t * n * k / best / 1e9:7.1f}")


def _fmt(t: Fp8Tiles) -> str:
    return f"{t.block_m},{t.block_n},{t.block_k},{t.num_warps},{t.num_stages}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer token counts and iterations")
    parser.add_argument("--sweep", action="store_true", help="also time a few tile shapes per shape and T")
    args = parser.parse_args()
    print(f"device: {torch.cuda.get_device_name()}, capability {torch.cuda.get_device_capability()}")
    if torch.cuda.get_device_capability() < (8, 9):
        fail("fp8 tl.dot needs compute capability 8.9 or newer (Ada, Hopper)")
    check(args.quick)
    time_all(args.quick, args.sweep)
    print("OK")


if __name__ == "__main__":
    main()
