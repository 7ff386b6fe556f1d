"""rollout.weight_sync on CPU: the bucket format, the gloo broadcast transport, IPC errors.

Run as a script (``python tests/test_weight_sync.py RANK PORT OUT``) it is one rank of the
two-process broadcast test.
"""

from __future__ import annotations

import json
import sys
from datetime import timedelta

import pytest

from tests.helpers.two_ranks import run_two_ranks
import torch

from rollout.errors import WeightSyncError, WeightUpdateError
from rollout.weight_sync import (
    ALIGN,
    TensorMeta,
    metas_from_json,
    metas_to_json,
    pack,
    recv_all,
    recv_weights,
    send_weights,
    share,
    unpack,
)


def _weights(seed: int = 0) -> dict[str, torch.Tensor]:
    """Mixed dtypes, a non-contiguous view, a 0-dim and an empty tensor; deterministic."""
    g = torch.Generator().manual_seed(seed)
    return {
        "model.embed_tokens.weight": torch.randn(33, 16, generator=g),
        "model.layers.0.mlp.gate_proj.weight": torch.randn(8, 16, generator=g).bfloat16(),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(16, 24, generator=g).half().t(),
        "model.layers.0.counter": torch.randint(-(2**40), 2**40, (5,), generator=g),
        "model.layers.0.mask": torch.rand(7, generator=g) > 0.5,
        "model.norm.eps": torch.tensor(1e-5, dtype=torch.float64),
        "model.empty": torch.empty(0, 3),
        "lm_head.weight": torch.randn(33, 16, generator=g)[:, ::2],
    }


def _assert_bitwise_equal(got: list[tuple[str, torch.Tensor]], want: dict[str, torch.Tensor]):
    assert [name for name, _ in got] == list(want)
    for name, tensor in got:
        ref = want[name]
        assert tensor.dtype == ref.dtype and tensor.shape == ref.shape, name
        assert torch.equal(tensor.contiguous().view(-1).view(torch.uint8),
                           ref.contiguous().view(-1).view(torch.uint8)), name


# --------------------------------------------------------------------------- bucket format


def test_pack_unpack_round_trip_one_bucket():
    weights = _weights()
    (bucket,) = pack(weights.items())
    assert bucket.buffer.dtype == torch.uint8 and bucket.buffer.dim() == 1
    assert all(m.offset % ALIGN == 0 for m in bucket.metas)
    assert bucket.metas[-1].offset + bucket.metas[-1].nbytes == bucket.buffer.numel()
    _assert_bitwise_equal(list(unpack(bucket)), weights)


def test_unpack_is_zero_copy():
    (bucket,) = pack([("a", torch.zeros(4)), ("b", torch.zeros(2, dtype=torch.int32))])
    views = dict(unpack(bucket))
    bucket.buffer[ALIGN : ALIGN + 4] = 1  # first bytes of "b"
    assert views["b"][0].item() == 0x01010101
    assert views["a"].untyped_storage().data_ptr() == bucket.buffer.data_ptr()


def test_pack_splits_into_buckets_in_order():
    weights = {f"w{i}": torch.full((100,), float(i)) for i in range(10)}  # 400 bytes each
    buckets = list(pack(weights.items(), bucket_bytes=1024))  # 400 + pad + 400 = 656 fits
    assert [len(b.metas) for b in buckets] == [2, 2, 2, 2, 2]
    assert all(b.buffer.numel() <= 1024 for b in buckets)
    _assert_bitwise_equal([nt for b in buckets for nt in unpack(b)], weights)


def test_pack_oversized_tensor_gets_own_bucket():
    weights = {"small": torch.ones(4), "big": torch.arange(1000.0), "tail": torch.ones(2)}
    buckets = list(pack(weights.items(), bucket_bytes=512))
    assert [[m.name for m in b.metas] for b in buckets] == [["small"], ["big"], ["tail"]]
    assert buckets[1].buffer.numel() == 4000
    _assert_bitwise_equal([nt for b in buckets for nt in unpack(b)], weights)


def test_pack_empty_and_device_and_bad_input():
    assert list(pack([])) == []
    assert list(pack(iter(()))) == []
    (bucket,) = pack([("x", torch.ones(3, requires_grad=True))], device="cpu")
    assert not bucket.buffer.requires_grad
    with pytest.raises(WeightUpdateError, match="bucket_bytes"):
        list(pack([("x", torch.ones(1))], bucket_bytes=0))
    with pytest.raises(WeightUpdateError, match="entry 1"):
        list(pack([("x", torch.ones(1)), ("y", [1.0])]))
    with pytest.raises(WeightUpdateError, match="complex"):
        list(pack([("z", torch.ones(2, dtype=torch.complex64))]))


def test_metas_json_round_trip():
    (bucket,) = pack(_weights().items())
    text = metas_to_json(bucket.metas)
    assert metas_from_json(text, bucket.buffer.numel()) == bucket.metas
    assert metas_from_json(text.encode()) == bucket.metas
    assert json.loads(text)[1]["dtype"] == "bfloat16"


def _entry(**overrides) -> dict:
    entry = {"name": "w", "dtype": "float32", "shape": [2, 3], "offset": 0, "nbytes": 24}
    entry.update(overrides)
    return entry


@pytest.mark.parametrize(
    "entries, match",
    [
        ("not json", "not valid JSON"),
        ({"name": "w"}, "JSON list"),
        ([_entry(dtype="float33")], r"entry 0 \('w'\): unknown dtype"),
        ([_entry(shape=[2, -3])], "shape"),
        ([_entry(offset=-256)], "offset"),
        ([_entry(nbytes=-1)], "nbytes"),
        ([_entry(nbytes=20)], "nbytes=20"),
        ([_entry(offset=2)], "first multiple of 256"),
        ([_entry(offset=True)], "offset"),
        ([_entry(extra=1)], "keys"),
        ([{"name": "w"}], "keys"),
        ([_entry(), _entry(name="v", offset=16)], r"'v'.*inside or before 'w'"),
        ([_entry(), _entry()], "duplicate"),
        ([_entry(name="v", offset=256)], r"'v'.*out of range"),
    ],
)
def test_metas_from_json_rejects_malformed(entries, match):
    text = entries if isinstance(entries, str) else json.dumps(entries)
    with pytest.raises(WeightUpdateError, match=match):
        metas_from_json(text, buffer_nbytes=256)


def test_metas_allow_zero_size_at_same_offset():
    metas = [TensorMeta("e", "float32", [0], 0, 0), TensorMeta("w", "float32", [2, 3], 0, 24)]
    assert metas_from_json(metas_to_json(metas), 24) == metas


# --------------------------------------------------------------------------- cuda ipc on cpu


def test_share_cpu_bucket_raises_clear_error():
    (bucket,) = pack([("x", torch.ones(3))])
    with pytest.raises(WeightUpdateError, match="CUDA device, got one on cpu"):
        share(bucket)


# --------------------------------------------------------------------------- gloo broadcast

TIMEOUT_S = 90


def test_gloo_broadcast_between_two_processes(tmp_path):
    out = tmp_path / "result.json"
    run_two_ranks(__file__, str(out), timeout=TIMEOUT_S)
    assert json.loads(out.read_text()) == {"streamed": 8, "closed_early": True, "all": 8,
                                           "empty": 0, "sent": [8, "stopped", 8, 0, 8]}


def _rank_main(rank: int, port: int, out: str) -> None:
    import contextlib

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2, timeout=timedelta(seconds=60))
    weights = _weights(seed=1)
    small = 1024  # several buckets
    try:
        if rank == 0:
            sent = [send_weights(weights.items(), src=0, bucket_bytes=small)]
            with pytest.raises(WeightSyncError, match="rank 1 stopped reading the stream"):
                send_weights(weights.items(), src=0, bucket_bytes=small)
            sent.append("stopped")
            sent.append(send_weights(weights.items(), src=0, bucket_bytes=small))
            sent.append(send_weights([], src=0))
            sent.append(send_weights(weights.items(), src=0, bucket_bytes=small))
            dist.all_gather_object(result := [None, None], sent)
            return
        # 1. streaming: copy each view before advancing
        streamed = [(n, t.clone()) for n, t in recv_weights(src=0, device="cpu")]
        _assert_bitwise_equal(streamed, weights)
        # 2. stop after the first tensor: closing refuses the next header, so the sender
        # raises instead of waiting, and the next transfer is in step
        with contextlib.closing(recv_weights(src=0, device="cpu")) as stream:
            name, _ = next(stream)
        # 3. materialised
        everything = recv_all(src=0, device="cpu")
        _assert_bitwise_equal(everything, weights)
        empty = recv_all(src=0, device="cpu")
        # 4. views held past their bucket (update_weights lists a stream to validate it all
        # before the first copy) keep their values: every bucket has its own buffer
        _assert_bitwise_equal(list(recv_weights(src=0, device="cpu")), weights)
        dist.all_gather_object(result := [None, None], None)
        with open(out, "w") as f:
            json.dump({"streamed": len(streamed), "closed_early": name in weights,
                       "all": len(everything), "empty": len(empty), "sent": result[0]}, f)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    _rank_main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
