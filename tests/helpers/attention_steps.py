"""The request shapes of one mixed attention step, shared by the reference and Triton
attention tests."""

from __future__ import annotations


def block_boundary_specs(block_size: int) -> list[tuple[int, int]]:
    """(num_context_tokens already cached, q_len this step) around block boundaries."""
    bs = block_size
    return [
        (0, bs + 3),  # fresh prefill crossing a block boundary
        (0, bs),  # fresh prefill of exactly one block
        (2 * bs, bs + 2),  # chunk after a prefix hit on two full blocks
        (bs + 1, 3),  # chunked-prefill continuation starting mid-block
        (bs - 2, 1),  # decode, seq_len == block_size - 1
        (bs - 1, 1),  # decode, seq_len == block_size
        (bs, 1),  # decode, seq_len == block_size + 1
    ]
