"""Channels a broken or malicious peer cannot turn against the rank (#15): CUDA IPC handles
and bucket metadata are refused with ``WeightSyncError`` before anything is opened or
allocated; a broadcast aborts on both sides whichever side finds the problem, and leaves the
receiving engine's weights unchanged; a Ray rank runs only allowed methods on plain data.

Run as a script (``python tests/test_channels_untrusted.py RANK PORT JOB_DIR``) it is one
rank of the two-process broadcast-abort job.
"""

from __future__ import annotations

import base64
import contextlib
import json
import re
import sys

import pytest
import torch

from rollout.errors import InvalidRequestError, WeightSyncError
from rollout.weight_sync import MAX_JSON_BYTES, MAX_TENSORS_PER_BUCKET, metas_from_json, open_shared, parse_handle
from rollout.weight_sync.protocol import BUCKET, MAGIC
from tests.helpers.two_ranks import rank_job, run_job

# --------------------------------------------------------------------------- CUDA IPC handles


def _meta(name="w", dtype="float32", shape=(2, 3), offset=0, nbytes=24) -> dict:
    shape = list(shape) if isinstance(shape, tuple) else shape  # anything else as given
    return {"name": name, "dtype": dtype, "shape": shape, "offset": offset, "nbytes": nbytes}


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def _handle(**overrides) -> dict:
    """What ``share`` makes for a 24-byte bucket (fields as torch's _share_cuda_ gives them)."""
    handle = {
        "metas": json.dumps([_meta()]), "device": 0, "handle": _b64(b"\x01\x00" + bytes(64)),
        "storage_size_bytes": 2 << 20, "storage_offset_bytes": 512,
        "ref_counter_handle": _b64(b"/torch_4242_123456789_0"), "ref_counter_offset": 7,
        "event_handle": _b64(bytes(64)), "event_sync_required": True, "offset": 256, "nbytes": 24,
    }
    handle.update(overrides)
    return handle


def _without(key: str) -> dict:
    handle = _handle()
    del handle[key]
    return handle


EMPTY = dict(metas="[]", handle=None, storage_size_bytes=0, storage_offset_bytes=0, ref_counter_handle=None,
             ref_counter_offset=0, event_handle=None, event_sync_required=False, offset=0, nbytes=0)

BAD_HANDLES = {
    "not a dict": ([("device", 0)], "must be a dict"),
    "missing key": (_without("event_handle"), r"keys must be exactly.*missing \['event_handle'\]"),
    "extra key": (_handle(pid=1), "keys must be exactly.*unexpected"),
    "device bool": (_handle(device=True), "device must be an int"),
    "device negative": (_handle(device=-1), "device must be an int"),
    "device absent here": (_handle(device=1), r"device 1 outside \[0, 1\)"),
    "nbytes str": (_handle(nbytes="24"), "nbytes must be an int"),
    "offset huge": (_handle(offset=2**60), "offset must be an int in"),
    "storage offset float": (_handle(storage_offset_bytes=1.5), "storage_offset_bytes must be an int"),
    "storage past the bound": (_handle(storage_offset_bytes=2**48), "beyond"),
    "bucket outside storage": (_handle(storage_size_bytes=200), r"bytes \[256, 280\) outside a storage of 200"),
    "ref counter slot past file": (_handle(ref_counter_offset=10000), "ref_counter_offset 10000 outside"),
    "ref counter slot negative": (_handle(ref_counter_offset=-1), "ref_counter_offset must be an int"),
    "ref counter other file": (_handle(ref_counter_handle=_b64(b"/torch_1_2_3/../x")), "ref_counter_handle must name"),
    "ref counter missing": (_handle(ref_counter_handle=None), "ref_counter_handle must name"),
    "ref counter too long": (_handle(ref_counter_handle=_b64(b"/torch_" + b"1" * 80)), "at most 64 bytes"),
    "handle not base64": (_handle(handle="!!not base64!!"), "handle is not base64"),
    "handle not text": (_handle(handle=123), "handle must be base64 text"),
    "handle huge": (_handle(handle="A" * (2 << 20)), "handle must be base64 text of at most"),
    "handle missing": (_handle(handle=None), "needs a memory handle"),
    "event handle short": (_handle(event_handle=_b64(bytes(63))), "event_handle must be 64 bytes"),
    "event sync not bool": (_handle(event_sync_required=1), "event_sync_required must be a bool"),
    "metas not str": (_handle(metas=[_meta()]), "metas must be a JSON string"),
    "metas bad dtype": (_handle(metas=json.dumps([_meta(dtype="float33")])), "unknown dtype"),
    "metas shorter than nbytes": (_handle(nbytes=48), "tensors end at byte 24 but the buffer has 48"),
    "metas past nbytes": (_handle(nbytes=16), "out of range of a 16-byte buffer"),
    "metas deep": (_handle(metas="[" * 5000 + "]" * 5000), "nested 5000 deep"),
    "empty with a handle": (_handle(**{**EMPTY, "handle": _b64(bytes(66))}), "carries no memory"),
    "empty with sizes": (_handle(**{**EMPTY, "storage_size_bytes": 4096}), "zero sizes"),
}


def test_good_handles_parse():
    parsed = parse_handle(_handle(), device_count=1)
    assert (parsed.nbytes, parsed.offset, parsed.ref_counter_offset, len(parsed.event_handle)) == (24, 256, 7, 64)
    assert [m.name for m in parsed.metas] == ["w"] and parsed.ref_counter_handle == b"/torch_4242_123456789_0"
    empty = parse_handle(_handle(**EMPTY), device_count=1)
    assert empty.handle is None and empty.metas == []


@pytest.mark.parametrize("case", list(BAD_HANDLES))
def test_bad_handle_is_refused_before_any_cuda_call(case, monkeypatch):
    raw, match = BAD_HANDLES[case]
    with pytest.raises(WeightSyncError, match=match):
        parse_handle(raw, device_count=1)
    calls = []
    monkeypatch.setattr(torch.cuda, "_lazy_init", lambda: calls.append("lazy_init"))
    monkeypatch.setattr(torch.UntypedStorage, "_new_shared_cuda", lambda *a: calls.append("open"), raising=False)
    with pytest.raises(WeightSyncError):  # on a GPU machine the same; here device 0 is also absent
        open_shared(raw)
    assert calls == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU refusal")
def test_open_shared_without_a_gpu_refuses_the_device():
    with pytest.raises(WeightSyncError, match=r"device 0 outside \[0, 0\)"):
        open_shared(_handle())


# --------------------------------------------------------------------------- bucket metadata


def _json(entries) -> str:
    return json.dumps(entries)


BAD_METAS = {
    "over the size cap": (b"[" + b" " * MAX_JSON_BYTES + b"]", None, "more than MAX_JSON_BYTES"),
    "deep nesting": ("[" * 200_000 + "]" * 200_000, None, "nested 200000 deep"),
    "deep inside an entry": (_json([_meta(shape=[[[2]]])]), None, "nested 5 deep"),
    "not utf-8": (b"[\xff]", None, "not valid JSON"),
    "huge int literal": ('[{"name":"w","dtype":"float32","shape":[],"offset":' + "9" * 5000 + ',"nbytes":4}]',
                         None, "not valid JSON"),
    "top level dict": (_json({"name": "w"}), None, "JSON list"),
    "entry a list": (_json([["w"]]), None, "keys"),
    "name not str": (_json([_meta(name=5)]), None, "name must be a printable string"),
    "name empty": (_json([_meta(name="")]), None, "name must be"),
    "name too long": (_json([_meta(name="w" * 600)]), None, "1 to 512 characters"),
    "name control chars": (_json([_meta(name="w\n\x1b[2J")]), None, "printable"),
    "dtype not str": (_json([_meta(dtype=["float32"])]), None, "unknown dtype"),
    "dtype not allowed": (_json([_meta(dtype="complex64", nbytes=48)]), None, "unknown dtype 'complex64'"),
    "shape not list": (_json([_meta(shape="2,3")]), None, "shape must be a list"),
    "shape bool": (_json([_meta(shape=[True, 3], nbytes=12)]), None, "shape must be a list"),
    "shape float": (_json([_meta(shape=[2.0, 3])]), None, "shape must be a list"),
    "shape negative": (_json([_meta(shape=[-2, -3])]), None, "shape must be a list"),
    "too many dims": (_json([_meta(shape=[1] * 17, nbytes=4)]), None, "at most 16 ints"),
    "dim too large": (_json([_meta(shape=[0, 2**41], nbytes=0)]), None, "shape must be"),
    "offset NaN": ('[{"name":"w","dtype":"float32","shape":[1],"offset":NaN,"nbytes":4}]', None, "offset must be"),
    "nbytes huge": (_json([_meta(nbytes=10**30)]), None, "nbytes=1000000000000000000000000000000"),
    "out of the buffer": (_json([_meta(offset=256)]), 256, "out of range of a 256-byte buffer"),
    "out of order": (_json([_meta(name="a"), _meta(name="b", offset=256), _meta(name="c")]), 280,
                     "'c'.*inside or before 'b'"),
    "gap": (_json([_meta(name="a"), _meta(name="b", offset=512)]), 536, "first multiple of 256"),
    "overlap": (_json([_meta(name="a"), _meta(name="b", offset=8)]), 32, "inside or before 'a'"),
    "duplicate names": (_json([_meta(), _meta(offset=256)]), 280, "duplicate"),
    "buffer longer than tensors": (_json([_meta()]), 1 << 30, "buffer has 1073741824 bytes"),
    "too many tensors": (_json([_meta(name=f"t{i}", shape=[0], nbytes=0) for i in range(MAX_TENSORS_PER_BUCKET + 1)]),
                         0, "more than 65536"),
}


@pytest.mark.parametrize("case", list(BAD_METAS))
def test_bad_metadata_is_refused(case):
    text, buffer_nbytes, match = BAD_METAS[case]
    with pytest.raises(WeightSyncError, match=match):
        metas_from_json(text, buffer_nbytes)


def test_brackets_inside_names_are_not_nesting():
    tricky = 'w["\\"[[[["]'  # quotes, backslashes and brackets inside a string
    metas = metas_from_json(_json([_meta(name=tricky)]), 24)
    assert metas[0].name == tricky


# --------------------------------------------------------------------------- broadcast abort

# Each case is one transfer, sender (rank 0) -> an engine on rank 1. (kind, sender's, receiver's)
SENDER_CASES = {
    # A sender breaking the protocol: headers, metadata (after a good bucket, so the receiver
    # holds data it must not apply)
    "huge buffer": ("header", [MAGIC, BUCKET, 20, 2**62], "buffer length"),
    "negative metadata length": ("header", [MAGIC, BUCKET, -5, 24], "metadata length -5"),
    "huge metadata length": ("header", [MAGIC, BUCKET, 2**40, 24], "metadata length"),
    "wrong magic": ("header", [0xDEAD, BUCKET, 20, 24], "magic"),
    "unknown kind": ("header", [MAGIC, 7, 0, 0], "unknown header kind 7"),
    "bad dtype after a good bucket": ("metas", ([_meta(dtype="float33")], 24), "unknown dtype"),
    "names not str": ("metas", ([_meta(name=3)], 24), "name must be"),
    "shape a dict": ("metas", ([_meta(shape={"a": 1})], 24), "shape must be"),
    "outside the buffer": ("metas", ([_meta(offset=256)], 24), "out of range"),
    "overlapping": ("metas", ([_meta(name="a"), _meta(name="b", offset=8)], 32), "inside or before"),
    "deeply nested": ("raw", "[" * 5000 + "]" * 5000, "nested 5000 deep"),
    "buffer longer than its tensors": ("raw_buffer", 1 << 20, "buffer has 1048576 bytes"),
}


def test_broadcast_aborts_on_both_sides_and_weights_stay(tmp_path, a_dir, b_dir):
    job = {"a_dir": str(a_dir), "b_dir": str(b_dir), "sender_cases": list(SENDER_CASES)}
    sender, receiver = run_job(__file__, job, tmp_path, timeout=120)  # a hang fails here
    for case, (_, _, match) in SENDER_CASES.items():
        assert sender[case] == "refused by rank 1", (case, sender[case])
        got = receiver[case]
        assert got["error"] == "WeightSyncError" and match in got["message"], (case, got)
        assert got["unchanged"], case
    # A sender that fails part-way aborts the receivers too
    for case in ("sender raises", "sender cannot pack"):
        assert sender[case]["error"] == "WeightSyncError", sender[case]
        assert receiver[case]["error"] == "WeightSyncError" and "sender aborted" in receiver[case]["message"]
        assert receiver[case]["unchanged"], case
    assert "RuntimeError: trainer crashed" in sender["sender raises"]["message"]
    assert "complex" in sender["sender cannot pack"]["message"]
    # A receiver that refuses (bucket over its cap) or stops reading aborts the sender
    assert "rank 1 refused the header" in sender["receiver cap"]["message"]
    assert "max_bucket_bytes=1024" in receiver["receiver cap"]["message"] and receiver["receiver cap"]["unchanged"]
    assert "rank 1 stopped reading the stream" in sender["receiver stops"]["message"]
    assert receiver["receiver stops"]["error"] == "ValueError" and receiver["receiver stops"]["unchanged"]
    # ... and the same ranks then move the weights
    assert sender["good"] == receiver["good"]["loaded"] > 0
    assert receiver["good"]["equals_b"] and receiver["good"]["version"] == 1


def _outcome(fn) -> dict:
    try:
        return {"ok": fn()}
    except Exception as e:  # noqa: BLE001 - the pytest side checks which
        return {"error": type(e).__name__, "message": str(e)}


def _send_case(link, kind: str, payload, good) -> str:
    """One transfer by hand, as a broken or malicious sender: a good bucket, then the bad
    one; returns what the receivers said."""
    from rollout.weight_sync import metas_to_json

    cpu = torch.device("cpu")
    buckets = [(metas_to_json(good.metas).encode(), good.buffer)]
    if kind == "header":
        buckets.append((None, payload))
    elif kind == "metas":
        metas, buffer_nbytes = payload
        buckets.append((json.dumps(metas).encode(), torch.zeros(buffer_nbytes, dtype=torch.uint8)))
    elif kind == "raw":
        buckets.append((payload.encode(), torch.zeros(24, dtype=torch.uint8)))
    else:  # raw_buffer: metadata for 24 bytes, a buffer announced far longer
        buckets.append((json.dumps([_meta()]).encode(), torch.zeros(payload, dtype=torch.uint8)))
    for meta_bytes, buffer in buckets:
        if meta_bytes is None:  # a header of its own making
            link.broadcast(torch.tensor(buffer, dtype=torch.int64), "a header")
            refused = link.vote(0, cpu)
        else:
            link.send_header(BUCKET, len(meta_bytes), buffer.numel(), cpu)
            refused = link.vote(0, cpu)
            if not refused:
                link.broadcast(torch.frombuffer(bytearray(meta_bytes), dtype=torch.uint8), "metadata")
                refused = link.vote(0, cpu)
            if not refused:
                link.broadcast(buffer, "a bucket")
        if refused:
            return f"refused by rank {refused[0]}"
    return "accepted"


def _rank_main(rank: int, port: int, job_dir: str) -> None:
    from safetensors.torch import load_file

    from rollout.weight_sync import pack, recv_weights, send_weights
    from rollout.weight_sync.protocol import Link
    from tests.helpers.engine_state import changed, make_llm, snapshot

    with rank_job(rank, port, job_dir) as (job, res):
        if rank == 0:
            weights = load_file(f"{job['b_dir']}/model.safetensors")
            good = next(pack(list(weights.items())[:2]))
            link = Link.open(0, None, torch.device("cpu"))
            for case in job["sender_cases"]:
                kind, payload, _ = SENDER_CASES[case]
                res[case] = _send_case(link, kind, payload, good)

            def failing():
                yield from list(weights.items())[:3]
                raise RuntimeError("trainer crashed")

            res["sender raises"] = _outcome(lambda: send_weights(failing(), src=0, bucket_bytes=1 << 14))
            bad = [*list(weights.items())[:3], ("x", torch.zeros(2, dtype=torch.complex64))]
            res["sender cannot pack"] = _outcome(lambda: send_weights(bad, src=0, bucket_bytes=1 << 14))
            for case in ("receiver cap", "receiver stops"):
                res[case] = _outcome(lambda: send_weights(weights.items(), src=0, bucket_bytes=1 << 16))
            res["good"] = send_weights(weights.items(), src=0, bucket_bytes=1 << 16)
            return
        llm = make_llm(job["a_dir"])
        before, version = snapshot(llm), llm.weight_version

        def attempt(case: str, fn) -> None:
            res[case] = _outcome(fn)
            res[case]["unchanged"] = not changed(before, snapshot(llm)) and llm.weight_version == version

        for case in [*job["sender_cases"], "sender raises", "sender cannot pack"]:
            attempt(case, lambda: llm.update_weights(recv_weights(src=0, device="cpu")))
        attempt("receiver cap", lambda: llm.update_weights(recv_weights(src=0, device="cpu", max_bucket_bytes=1024)))

        def stop_early():
            with contextlib.closing(recv_weights(src=0, device="cpu")) as stream:
                for _ in stream:
                    raise ValueError("the consumer gave up")

        attempt("receiver stops", stop_early)
        loaded = llm.update_weights(recv_weights(src=0, device="cpu"))
        reference = snapshot(make_llm(job["b_dir"]))
        res["good"] = {"loaded": loaded, "equals_b": not changed(reference, snapshot(llm)),
                       "version": llm.weight_version}


# --------------------------------------------------------------------------- Ray rank (no Ray)


class _Base:
    def inherited(self) -> str:
        return "inherited"


class _Worker(_Base):
    """A stand-in worker: what a rank may call on it, and what not."""

    label = "attribute"

    def __init__(self) -> None:
        self.runs = 0
        self.llm = object()

    def step(self, n: int, extra: dict | None = None) -> dict:
        self.runs += 1
        return {"n": n, "extra": extra}

    def leak(self) -> object:
        self.runs += 1
        return object()

    @staticmethod
    def helper() -> int:
        return 1

    @classmethod
    def build(cls) -> str:
        return "built"

    @property
    def size(self) -> int:
        return 1

    def _private(self) -> None:
        self.runs += 1


def _nested(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


def _cycle() -> list:
    value: list = []
    value.append(value)
    return value


def test_public_methods_and_method_names():
    from trainers_integration.ray_rank import allowed_methods, public_methods

    assert public_methods(_Worker) == {"step", "leak", "helper", "build", "inherited"}
    assert allowed_methods(_Worker, None) == public_methods(_Worker)
    assert allowed_methods(_Worker, ["step"]) == {"step"}
    for bad in (["__init__"], ["_private"], ["size"], ["label"], ["nope"], "step", [b"step"], [None]):
        with pytest.raises(InvalidRequestError, match="methods"):
            allowed_methods(_Worker, bad)


def test_worker_group_checks_methods_before_touching_ray(monkeypatch):
    from trainers_integration.ray import WorkerGroup, WorkerGroupConfig

    monkeypatch.setitem(sys.modules, "ray", None)  # reaching Ray would be an ImportError
    with pytest.raises(InvalidRequestError, match="invalid methods='__init__'"):
        WorkerGroup(WorkerGroupConfig(num_workers=1), _Worker, methods=["step", "__init__"])


GOOD_ARGS = [
    ((1,), {}), ((1,), {"extra": {"a": [1, 2.5, None, True, "s", b"b", (3, 4)]}}),
    (([[1, 2, 3]] * 100,), {}), ((_nested(28),), {}),  # 28 lists deep, in the args tuple, in (args, kwargs)
]
BAD_ARGS = {
    "tensor": (((torch.ones(2),), {}), r"arguments\[0\]\[0\]=.*torch.Tensor"),
    "object": (((object(),), {}), r"arguments\[0\]\[0\]='<builtins.object>'"),
    "set": ((({1, 2},), {}), "builtins.set"),
    "str subclass": (((type("S", (str,), {})("x"),), {}), "S>"),
    "int dict key": (((1,), {"extra": {1: 2}}), r"arguments\[1\]\['extra'\] key=1"),
    "tuple dict key": (((1,), {"extra": {(1, 2): 2}}), "key='<tuple>'"),
    "too deep": (((_nested(40),), {}), "nested 32 deep"),
    "self-containing": (((_cycle(),), {}), "nested 32 deep"),
    "function": (((print,), {}), "builtin_function_or_method"),
}


def _actor():
    from trainers_integration.ray_rank import RankActor, allowed_methods

    actor, worker = RankActor(), _Worker()
    actor._worker, actor._methods = worker, allowed_methods(_Worker, None)  # what setup installs
    return actor, worker


@pytest.mark.parametrize("args, kwargs", GOOD_ARGS)
def test_rank_runs_allowed_methods_on_plain_data(args, kwargs):
    actor, worker = _actor()
    ok, result = actor.call("step", args, kwargs)
    assert ok and result == {"n": args[0], "extra": kwargs.get("extra")} and worker.runs == 1


@pytest.mark.parametrize("method", ["__class__", "__init__", "__reduce__", "_private", "llm", "label", "size",
                                    "runs", "nope", "", 5, None, b"step"])
def test_rank_refuses_names_outside_the_allowlist(method):
    actor, worker = _actor()
    ok, err = actor.call(method, (), {})
    assert not ok and err["type"] == "InvalidRequestError" and "invalid method=" in err["message"], err
    assert worker.runs == 0


@pytest.mark.parametrize("case", list(BAD_ARGS))
def test_rank_refuses_arguments_that_are_not_plain_data(case):
    (args, kwargs), match = BAD_ARGS[case]
    actor, worker = _actor()
    ok, err = actor.call("step", args, kwargs)
    assert not ok and err["type"] == "InvalidRequestError", err
    assert re.search(match, err["message"]), err["message"]
    assert worker.runs == 0  # refused before the method ran


def test_rank_refuses_a_result_that_is_not_plain_data_and_calls_before_setup():
    from trainers_integration.ray_rank import RankActor

    actor, worker = _actor()
    ok, err = actor.call("leak", (), {})
    assert not ok and err["type"] == "InvalidRequestError" and "leak() result" in err["message"]
    ok, err = actor.call("step", "1", {})  # positional arguments not a tuple
    assert not ok and err["type"] == "InvalidRequestError"
    ok, err = RankActor().call("step", (1,), {})
    assert not ok and "once setup has built the worker" in err["message"]


if __name__ == "__main__":
    _rank_main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
