"""Paged attention, torch reference: mixed prefill chunks and decodes in one call."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def write_kv_ref(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int64, block_id * block_size + offset
) -> None:
    """Scatter this step's K/V into their slots."""
    k_flat = kv_cache[0].view(-1, *kv_cache.shape[-2:])
    v_flat = kv_cache[1].view(-1, *kv_cache.shape[-2:])
    k_flat.index_copy_(0, slot_mapping, key.to(kv_cache.dtype))
    v_flat.index_copy_(0, slot_mapping, value.to(kv_cache.dtype))


def paged_attention_ref(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_reqs, max_blocks_per_req] int
    query_start_loc_cpu: torch.Tensor,  # [num_reqs + 1] int, host
    seq_lens_cpu: torch.Tensor,  # [num_reqs] int, host: context + this step's tokens
    scale: float,
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    """Causal attention of each request's new tokens over its whole cached sequence.

    Request i owns query rows ``query_start_loc[i]:query_start_loc[i+1]``; they are the
    last ``q_len`` positions of its ``seq_len`` tokens, so a decode (q_len 1), a fresh
    prompt (q_len == seq_len) and a chunk after a prefix hit are the same computation.
    """
    block_size = kv_cache.shape[2]
    num_heads, head_dim = query.shape[1], query.shape[2]
    num_kv_heads = kv_cache.shape[3]
    group = num_heads // num_kv_heads
    out = torch.empty_like(query)
    starts = query_start_loc_cpu.tolist()
    for i, seq_len in enumerate(seq_lens_cpu.tolist()):
        q = query[starts[i] : starts[i + 1]]
        q_len = q.shape[0]
        num_blocks = -(-seq_len // block_size)
        blocks = block_tables[i, :num_blocks].long()
        k = kv_cache[0, blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len]
        v = kv_cache[1, blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len]
        # [heads, q_len, seq_len]: query j sits at position seq_len - q_len + j.
        qh = q.transpose(0, 1).float()
        kh = k.transpose(0, 1).float().repeat_interleave(group, dim=0)
        vh = v.transpose(0, 1).float().repeat_interleave(group, dim=0)
        scores = torch.matmul(qh, kh.transpose(1, 2)) * scale
        q_pos = torch.arange(seq_len - q_len, seq_len, device=query.device)
        k_pos = torch.arange(seq_len, device=query.device)
        scores.masked_fill_(k_pos[None, :] > q_pos[:, None], float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[starts[i] : starts[i + 1]] = torch.matmul(probs, vh).transpose(0, 1).to(query.dtype)
    return out


def paged_attention_sdpa(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_reqs, max_blocks_per_req] int
    query_start_loc_cpu: torch.Tensor,  # [num_reqs + 1] int, host
    seq_lens_cpu: torch.Tensor,  # [num_reqs] int, host
    scale: float,
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    """Same result as ``paged_attention_ref``, faster on CPU: every single-token request
    (decode) goes through one batched SDPA call over its padded gathered context, and each
    multi-token request through one SDPA call with GQA handled by the kernel."""
    block_size, num_kv_heads, head_dim = kv_cache.shape[2], kv_cache.shape[3], kv_cache.shape[4]
    out = torch.empty_like(query)
    starts = query_start_loc_cpu.tolist()
    q_lens = [starts[i + 1] - starts[i] for i in range(len(starts) - 1)]
    seq_lens = seq_lens_cpu.tolist()
    decodes = [i for i, n in enumerate(q_lens) if n == 1]
    if decodes:
        idx = torch.tensor(decodes, dtype=torch.long)
        lens = seq_lens_cpu[idx].to(query.device)
        num_blocks = -(-max(seq_lens[i] for i in decodes) // block_size)
        blocks = block_tables[idx.to(block_tables.device), :num_blocks].long()  # [d, num_blocks]
        k = kv_cache[0, blocks].flatten(1, 2).transpose(1, 2)  # [d, kv_heads, ctx, head_dim]
        v = kv_cache[1, blocks].flatten(1, 2).transpose(1, 2)
        rows = torch.tensor([starts[i] for i in decodes], dtype=torch.long, device=query.device)
        q = query[rows].unsqueeze(2)  # [d, heads, 1, head_dim]
        valid = torch.arange(k.shape[2], device=query.device)[None, :] < lens[:, None]  # [d, ctx]
        k, v = _zero_invalid(k, v, valid)
        o = F.scaled_dot_product_attention(
            q, k.to(q.dtype), v.to(q.dtype), attn_mask=valid[:, None, None, :], scale=scale, enable_gqa=True
        )
        out[rows] = o.squeeze(2)
    for i, q_len in enumerate(q_lens):
        if q_len == 1:
            continue
        seq_len = seq_lens[i]
        blocks = block_tables[i, : -(-seq_len // block_size)].long()
        k = kv_cache[0, blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len].transpose(0, 1)
        v = kv_cache[1, blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len].transpose(0, 1)
        q = query[starts[i] : starts[i + 1]].transpose(0, 1)  # [heads, q_len, head_dim]
        if q_len == seq_len:
            mask, causal = None, True
        else:  # query j sits at position seq_len - q_len + j
            q_pos = torch.arange(seq_len - q_len, seq_len, device=query.device)
            mask, causal = torch.arange(seq_len, device=query.device)[None, :] <= q_pos[:, None], False
        o = F.scaled_dot_product_attention(
            q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=True
        )
        out[starts[i] : starts[i + 1]] = o.transpose(0, 1)
    return out


def paged_decode_sdpa(
    query: torch.Tensor,  # [num_reqs, num_heads, head_dim]: one new token per request
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_reqs, max_blocks] int: every column is gathered
    seq_lens: torch.Tensor,  # [num_reqs] int, device
    scale: float,
) -> torch.Tensor:
    """Decode-only attention from device tensors alone (no host reads), so it can be
    captured in a CUDA graph. It gathers the whole block table, so it reads more than
    needed: the fallback when no paged kernel is available."""
    blocks = block_tables.long()
    k = kv_cache[0, blocks].flatten(1, 2).transpose(1, 2)  # [reqs, kv_heads, ctx, head_dim]
    v = kv_cache[1, blocks].flatten(1, 2).transpose(1, 2)
    valid = torch.arange(k.shape[2], device=query.device)[None, :] < seq_lens[:, None].long()
    k, v = _zero_invalid(k, v, valid)
    o = F.scaled_dot_product_attention(
        query.unsqueeze(2), k.to(query.dtype), v.to(query.dtype), attn_mask=valid[:, None, None, :],
        scale=scale, enable_gqa=True,
    )
    return o.squeeze(2)


def _zero_invalid(k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero K/V slots past each sequence's end: they are gathered with whole blocks and may
    hold anything (a freed request's values, bytes left by sleep); a masked score times a
    non-finite V would still be NaN."""
    keep = valid[:, None, :, None]  # [reqs, 1, ctx, 1]
    return torch.where(keep, k, 0), torch.where(keep, v, 0)
