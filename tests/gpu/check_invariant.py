"""GPU check of the batch-invariant Triton kernels at Qwen2.5-1.5B shapes (hidden 1536, 12
heads, 2 KV heads, head_dim 128, intermediate 8960, vocab 151936), bf16: bitwise
invariance of matmul/attention/RMSNorm/log_softmax rows across batch layouts, then
timings of matmul_invariant against cuBLAS (torch F.linear) and of the attention against
the default Triton attention; then Qwen3-30B-A3B's MoE (hidden 2048, 128 experts, top-8,
expert intermediate 768): the router's and ``fused_moe_invariant``'s rows bitwise across
batch sizes, and its timings against the default ``triton_moe.fused_moe``.

    python -m tests.gpu.check_invariant [--quick]

Exits non-zero on the first invariance failure. Not collected by pytest (a script)."""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from rollout.kernels import triton_attention, triton_moe
from rollout.kernels.attention import paged_attention_ref
from rollout.kernels.moe import fused_moe_ref, route
from rollout.kernels.triton_invariant import (
    fused_moe_invariant, log_softmax_invariant, matmul_invariant, paged_attention_invariant, rms_norm_invariant,
)

DEV = torch.device("cuda")
BF16 = torch.bfloat16
HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER, VOCAB = 1536, 12, 2, 128, 8960, 151936
WEIGHTS = {  # name: (N, K, bias)
    "qkv": ((HEADS + 2 * KV_HEADS) * HEAD_DIM, HIDDEN, True),
    "o_proj": (HIDDEN, HEADS * HEAD_DIM, False),
    "gate_up": (2 * INTER, HIDDEN, False),
    "down": (HIDDEN, INTER, False),
    "lm_head": (VOCAB, HIDDEN, False),
}


def fail(msg: str) -> None:
    print("FAIL:", msg)
    sys.exit(1)


def timed(fn, iters: int = 20) -> float:
    """Median milliseconds of ``fn()`` over ``iters`` runs after warm-up."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def check_matmul(quick: bool) -> None:
    gen = torch.Generator(device=DEV).manual_seed(0)
    for name, (n, k, has_bias) in WEIGHTS.items():
        rows = 1024 if name == "lm_head" else 4096
        x = torch.randn(rows, k, generator=gen, device=DEV).to(BF16)
        w = (torch.randn(n, k, generator=gen, device=DEV) * k**-0.5).to(BF16)
        b = torch.randn(n, generator=gen, device=DEV).to(BF16) if has_bias else None
        full = matmul_invariant(x, w, b)
        ref = F.linear(x.float(), w.float(), None if b is None else b.float())
        err = (full.float() - ref).abs().max().item()
        if err > 0.05 * ref.abs().max().item():
            fail(f"matmul {name}: max error {err} against fp32")
        for m in (1, 7, 64, 256, 1000) if quick else (1, 2, 7, 16, 63, 64, 65, 200, 256, 1000, rows):
            for start in {0, 13, rows - m}:
                if not torch.equal(matmul_invariant(x[start : start + m], w, b), full[start : start + m]):
                    fail(f"matmul {name}: rows {start}:{start + m} differ from the {rows}-row call")
        print(f"matmul {name} [N={n}, K={k}]: rows bitwise across M and offsets; max |err| vs fp32 {err:.3g}")


def time_matmul() -> None:
    print("\nmatmul_invariant vs cuBLAS (F.linear), bf16, median ms:")
    print(f"{'weight':8} {'M':>5} {'invariant':>10} {'cuBLAS':>8} {'ratio':>6} {'inv TFLOP/s':>11} {'inv GB/s':>9}")
    gen = torch.Generator(device=DEV).manual_seed(1)
    for name, (n, k, has_bias) in WEIGHTS.items():
        w = torch.randn(n, k, generator=gen, device=DEV).to(BF16)
        b = torch.randn(n, generator=gen, device=DEV).to(BF16) if has_bias else None
        for m in (1, 64, 256, 4096):
            x = torch.randn(m, k, generator=gen, device=DEV).to(BF16)
            t_inv = timed(lambda: matmul_invariant(x, w, b))
            t_ref = timed(lambda: F.linear(x, w, b))
            flops = 2 * m * n * k / t_inv / 1e9
            gbs = 2 * (n * k + m * k + m * n) / t_inv / 1e6
            print(f"{name:8} {m:5} {t_inv:10.4f} {t_ref:8.4f} {t_inv / t_ref:6.2f} {flops:11.1f} {gbs:9.0f}")


def _cache_for(seqs, block_size=16):
    """Each sequence's K/V in shuffled blocks of one cache; (cache, block tables)."""
    gen = torch.Generator(device=DEV).manual_seed(2)
    nblocks = [-(-len(k) // block_size) for k, _ in seqs]
    total = sum(nblocks) + 4
    cache = torch.full((2, total, block_size, KV_HEADS, HEAD_DIM), float("nan"), device=DEV, dtype=BF16)
    perm = torch.randperm(total, generator=gen, device=DEV)
    tables = torch.zeros(len(seqs), max(nblocks), dtype=torch.int32, device=DEV)
    at = 0
    for i, ((k, v), nb) in enumerate(zip(seqs, nblocks)):
        blocks = perm[at : at + nb]
        at += nb
        tables[i, :nb] = blocks.int()
        pos = torch.arange(len(k), device=DEV)
        slots = blocks[pos // block_size] * block_size + pos % block_size
        cache[0].view(-1, KV_HEADS, HEAD_DIM)[slots] = k
        cache[1].view(-1, KV_HEADS, HEAD_DIM)[slots] = v
    return cache, tables


def check_attention(quick: bool) -> None:
    """Golden: each sequence's whole prefill. Positions past a step's seq_len hold real
    future K/V here (never read: the kernel masks by seq_len)."""
    gen = torch.Generator(device=DEV).manual_seed(3)
    lens = [1000, 3000, 517, 64, 1]
    qs = [torch.randn(n, HEADS, HEAD_DIM, generator=gen, device=DEV).to(BF16) for n in lens]
    kvs = [tuple(torch.randn(n, KV_HEADS, HEAD_DIM, generator=gen, device=DEV).to(BF16) for _ in "kv") for n in lens]
    cache, tables = _cache_for(kvs)
    scale = HEAD_DIM**-0.5

    def run(chunks):  # [(req, start, q_len)] -> {(req, pos): row}
        qsl = [0]
        for _, _, q in chunks:
            qsl.append(qsl[-1] + q)
        query = torch.cat([qs[r][s : s + q] for r, s, q in chunks])
        idx = torch.tensor([r for r, _, _ in chunks], device=DEV)
        seq_lens = torch.tensor([s + q for _, s, q in chunks], dtype=torch.int32, device=DEV)
        out = paged_attention_invariant(query, cache, tables[idx], torch.tensor(qsl, dtype=torch.int32, device=DEV),
                                        seq_lens, scale, max(q for _, _, q in chunks), int(seq_lens.max()))
        rows, i = {}, 0
        for r, s, q in chunks:
            for p in range(s, s + q):
                rows[(r, p)] = out[i]
                i += 1
        return rows, out, query, seq_lens, qsl, idx

    golden = {}
    for r, n in enumerate(lens):
        rows, out, query, seq_lens, qsl, idx = run([(r, 0, n)])
        golden.update(rows)
        ref = paged_attention_ref(query, cache, tables[idx], torch.tensor(qsl), seq_lens.cpu(), scale)
        err = (out.float() - ref.float()).abs().max().item()
        if err > 2e-2:
            fail(f"attention request {r}: max error {err} against the reference")

    def check(chunks, what):
        rows = run(chunks)[0]
        for key, row in rows.items():
            if not torch.equal(row, golden[key]):
                fail(f"attention {what}: row {key} differs from its whole-prompt prefill")

    step = 97 if quick else 13
    for p in range(0, 3000, step):
        check([(r, min(p, n - 1), 1) for r, n in enumerate(lens)], f"decodes at {p}")
    for chunk, offset in ((512, 0), (333, 100), (2048, 7), (64, 63)):
        for r in (0, 1, 2):
            n = lens[r]
            cuts = sorted({0, min(offset, n), *range(min(offset, n), n, chunk), n})
            for a, b in zip(cuts, cuts[1:]):
                check([(r, a, b - a)], f"chunk {chunk}+{offset}")
    check([(1, 1500, 700), (0, 999, 1), (2, 0, 517), (4, 0, 1), (3, 10, 30)], "mixed")
    print(f"attention [12 heads, 2 KV, d128, bs16]: rows bitwise across decodes, chunks, mixed steps; "
          f"whole prefills within 2e-2 of the reference")


def check_rows_ops() -> None:
    gen = torch.Generator(device=DEV).manual_seed(4)
    x = torch.randn(4096, HIDDEN, generator=gen, device=DEV).to(BF16)
    res = torch.randn(4096, HIDDEN, generator=gen, device=DEV).to(BF16)
    w = torch.randn(HIDDEN, generator=gen, device=DEV).to(BF16)
    full, full_res = rms_norm_invariant(x, w, 1e-6, res)
    logits = torch.randn(512, VOCAB, generator=gen, device=DEV).to(BF16)
    lp = log_softmax_invariant(logits)
    for m, s in ((1, 0), (1, 4095), (7, 100), (256, 3000)):
        out, r = rms_norm_invariant(x[s : s + m], w, 1e-6, res[s : s + m])
        if not (torch.equal(out, full[s : s + m]) and torch.equal(r, full_res[s : s + m])):
            fail(f"rms_norm rows {s}:{s + m}")
        t = min(s, 511 - m + 1)
        if not torch.equal(log_softmax_invariant(logits[t : t + m]), lp[t : t + m]):
            fail(f"log_softmax rows {t}:{t + m}")
    print("rms_norm (with residual) and log_softmax: rows bitwise across batch sizes")


def time_attention() -> None:
    print("\nattention, bf16, median ms (default Triton: split-KV chosen by the batch):")
    gen = torch.Generator(device=DEV).manual_seed(5)
    scale = HEAD_DIM**-0.5
    for num_reqs, ctx, q_len in ((64, 2048, 1), (8, 4096, 1), (256, 1024, 1), (1, 0, 4096), (4, 2048, 512)):
        seq_len = ctx + q_len
        bs = 16
        nb = -(-seq_len // bs)
        cache = torch.randn(2, num_reqs * nb + 1, bs, KV_HEADS, HEAD_DIM, generator=gen, device=DEV).to(BF16)
        tables = torch.randperm(num_reqs * nb, generator=gen, device=DEV).view(num_reqs, nb).int()
        query = torch.randn(num_reqs * q_len, HEADS, HEAD_DIM, generator=gen, device=DEV).to(BF16)
        qsl = torch.arange(num_reqs + 1, dtype=torch.int32, device=DEV) * q_len
        seq_lens = torch.full((num_reqs,), seq_len, dtype=torch.int32, device=DEV)
        t_inv = timed(lambda: paged_attention_invariant(query, cache, tables, qsl, seq_lens, scale, q_len, seq_len))
        t_ref = timed(lambda: triton_attention.paged_attention(query, cache, tables, qsl, seq_lens, scale,
                                                               max_query_len=q_len, max_seq_len=seq_len))
        print(f"reqs {num_reqs:4} ctx {ctx:5} q_len {q_len:5}: invariant {t_inv:8.4f}  default {t_ref:8.4f}  "
              f"ratio {t_inv / t_ref:5.2f}")


MOE_HIDDEN, MOE_EXPERTS, MOE_TOP_K, MOE_INTER = 2048, 128, 8, 768


def _moe_inputs(num_tokens: int, seed: int):
    gen = torch.Generator(device=DEV).manual_seed(seed)
    x = torch.randn(num_tokens, MOE_HIDDEN, generator=gen, device=DEV).to(BF16)
    w13 = (torch.randn(MOE_EXPERTS, 2 * MOE_INTER, MOE_HIDDEN, generator=gen, device=DEV) * MOE_HIDDEN**-0.5).to(BF16)
    w2 = (torch.randn(MOE_EXPERTS, MOE_HIDDEN, MOE_INTER, generator=gen, device=DEV) * MOE_INTER**-0.5).to(BF16)
    logits = torch.randn(num_tokens, MOE_EXPERTS, generator=gen, device=DEV).to(BF16)
    return x, w13, w2, logits


def check_moe(quick: bool) -> None:
    rows = 4096
    x, w13, w2, logits = _moe_inputs(rows, 6)
    weights, ids = route(logits, MOE_TOP_K, True)
    full = fused_moe_invariant(x, w13, w2, weights, ids)
    ref = fused_moe_ref(x, w13, w2, weights, ids)
    err = (full.float() - ref.float()).abs().max().item()
    if err > 0.05 * ref.float().abs().max().item():
        fail(f"fused_moe_invariant: max error {err} against the reference")
    for m in (1, 7, 256, 1000) if quick else (1, 2, 7, 16, 63, 64, 65, 256, 1000, rows):
        for start in {0, 13, rows - m}:
            sl = slice(start, start + m)
            w, i = route(logits[sl], MOE_TOP_K, True)
            if not (torch.equal(w, weights[sl]) and torch.equal(i, ids[sl])):
                fail(f"route: rows {start}:{start + m} differ from the {rows}-row call")
            if not torch.equal(fused_moe_invariant(x[sl], w13, w2, w, i), full[sl]):
                fail(f"fused_moe_invariant: rows {start}:{start + m} differ from the {rows}-row call")
    print(f"route and fused_moe_invariant [E={MOE_EXPERTS}, k={MOE_TOP_K}, H={MOE_HIDDEN}, I={MOE_INTER}]: rows "
          f"bitwise across T and offsets; max |err| vs the reference {err:.3g}")


def time_moe() -> None:
    print("\nfused_moe_invariant vs the default triton_moe.fused_moe, bf16, median ms:")
    for m in (1, 64, 256, 4096):
        x, w13, w2, logits = _moe_inputs(m, 7)
        weights, ids = route(logits, MOE_TOP_K, True)
        t_inv = timed(lambda: fused_moe_invariant(x, w13, w2, weights, ids))
        t_ref = timed(lambda: triton_moe.fused_moe(x, w13, w2, weights, ids))
        print(f"T {m:5}: invariant {t_inv:8.4f}  default {t_ref:8.4f}  ratio {t_inv / t_ref:5.2f}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer layouts")
    args = parser.parse_args()
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    check_matmul(args.quick)
    check_rows_ops()
    check_attention(args.quick)
    check_moe(args.quick)
    time_matmul()
    time_attention()
    time_moe()
    print("\nOK")


if __name__ == "__main__":
    main()
