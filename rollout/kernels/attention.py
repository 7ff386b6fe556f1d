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


def gather_kv(
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    block_table: torch.Tensor,  # [max_blocks_per_req] int: one request's
    seq_len: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One request's cached K and V, [seq_len, num_kv_heads, head_dim] each, in position order."""
    block_size, num_kv_heads, head_dim = kv_cache.shape[2], kv_cache.shape[3], kv_cache.shape[4]
    blocks = block_table[: -(-seq_len // block_size)].long()
    k = kv_cache[0, blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len]
    v = kv_cache[1, blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len]
    return k, v


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
    group = query.shape[1] // kv_cache.shape[3]  # q heads per kv head
    out = torch.empty_like(query)
    starts = query_start_loc_cpu.tolist()
    for i, seq_len in enumerate(seq_lens_cpu.tolist()):
        q = query[starts[i] : starts[i + 1]]
        q_len = q.shape[0]
        k, v = gather_kv(kv_cache, block_tables[i], seq_len)
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
    """Same result as ``paged_attention_ref``, faster on CPU: the single-token requests
    (decodes) go through one batched SDPA call, the multi-token ones through one call per
    (q_len, seq_len) shape (a batch of fresh prompts of one length is one call).

    K/V are gathered slot by slot with one ``index_select``; a decode's positions past its
    end read its last slot again and are masked, so no slot outside a request's sequence is
    read (unwritten slots may hold anything, NaN too) and nothing needs zeroing."""
    num_reqs = seq_lens_cpu.shape[0]
    if query.shape[0] == num_reqs:  # every request brings one token: a pure decode step
        return _decode_sdpa(query, kv_cache, block_tables, seq_lens_cpu.tolist(), scale)
    device, num_heads, head_dim = query.device, query.shape[1], query.shape[2]
    out = torch.empty_like(query)
    starts = query_start_loc_cpu.tolist()
    seq_lens = seq_lens_cpu.tolist()
    decodes: list[int] = []
    shapes: dict[tuple[int, int], list[int]] = {}  # (q_len, seq_len) -> request indices
    for i, seq_len in enumerate(seq_lens):
        q_len = starts[i + 1] - starts[i]
        if q_len == 1:
            decodes.append(i)
        else:
            shapes.setdefault((q_len, seq_len), []).append(i)
    if decodes:
        rows = torch.tensor([starts[i] for i in decodes], dtype=torch.long, device=device)  # [d]
        tables = block_tables[torch.tensor(decodes, dtype=torch.long, device=block_tables.device)]
        out[rows] = _decode_sdpa(query[rows], kv_cache, tables, [seq_lens[i] for i in decodes], scale)
    for (q_len, seq_len), reqs in shapes.items():
        n = len(reqs)
        if reqs[-1] - reqs[0] == n - 1:  # consecutive requests: their tokens are one slice
            tokens = slice(starts[reqs[0]], starts[reqs[0]] + n * q_len)
            tables = block_tables[reqs[0] : reqs[-1] + 1]
        else:
            first = torch.tensor([starts[i] for i in reqs], dtype=torch.long)[:, None]  # [n, 1]
            tokens = (first + torch.arange(q_len)).view(-1).to(device)  # [n * q_len]
            tables = block_tables[torch.tensor(reqs, dtype=torch.long, device=block_tables.device)]
        q = query[tokens].unflatten(0, (n, q_len)).transpose(1, 2)  # [n, heads, q_len, head_dim]
        positions = torch.arange(seq_len, device=device).expand(n, seq_len)
        k, v = _gather_kv(kv_cache, _slots(tables, positions, kv_cache.shape[2]))
        if q_len == seq_len:
            mask, causal = None, True
        else:  # query j sits at position seq_len - q_len + j
            q_pos = torch.arange(seq_len - q_len, seq_len, device=device)
            mask, causal = torch.arange(seq_len, device=device)[None, :] <= q_pos[:, None], False
        o = F.scaled_dot_product_attention(
            q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=True
        )  # [n, heads, q_len, head_dim]
        out[tokens] = o.transpose(1, 2).reshape(n * q_len, num_heads, head_dim)
    return out


def _decode_sdpa(
    query: torch.Tensor,  # [num_reqs, num_heads, head_dim]: each request's one new token
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_reqs, >= blocks of the longest] int
    seq_lens: list[int],  # [num_reqs]
    scale: float,
) -> torch.Tensor:  # [num_reqs, num_heads, head_dim]
    device, max_len = query.device, max(seq_lens)
    positions = torch.arange(max_len, device=device)  # [max_len]
    if min(seq_lens) == max_len:  # one length (one prompt's samples, equal prompts): no mask
        mask = None
        positions = positions.expand(len(seq_lens), max_len)
    else:
        lens = torch.tensor(seq_lens, dtype=torch.long, device=device)[:, None]  # [num_reqs, 1]
        mask = (positions < lens)[:, None, None, :]  # [num_reqs, 1, 1, max_len]
        positions = torch.minimum(positions, lens - 1)  # past the end: the last slot, masked
    k, v = _gather_kv(kv_cache, _slots(block_tables, positions, kv_cache.shape[2]))
    o = F.scaled_dot_product_attention(
        query.unsqueeze(2), k.to(query.dtype), v.to(query.dtype), attn_mask=mask, scale=scale, enable_gqa=True
    )  # [num_reqs, heads, 1, head_dim]
    return o.squeeze(2)


def _slots(
    block_tables: torch.Tensor,  # [n, >= max(positions) // block_size + 1] int
    positions: torch.Tensor,  # [n, length] int64
    block_size: int,
) -> torch.Tensor:  # [n, length] int64: the cache slot of each position
    blocks = block_tables.gather(1, positions // block_size).long()
    return blocks * block_size + positions % block_size


def _gather_kv(kv_cache: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V at ``slots`` [n, length], each [n, num_kv_heads, length, head_dim] (a view of
    one gathered copy)."""
    n, length = slots.shape
    kv = kv_cache.flatten(1, 2).index_select(1, slots.reshape(-1))  # [2, n * length, kv_heads, head_dim]
    kv = kv.unflatten(1, (n, length)).transpose(2, 3)  # [2, n, kv_heads, length, head_dim]
    return kv[0], kv[1]


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
