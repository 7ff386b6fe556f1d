"""CUDA IPC between two fresh processes on cuda:0: the receiver sees the sender's memory.

The test process only orchestrates (it never touches CUDA). The sender packs buckets on
cuda:0, writes ``share(bucket)`` for each as JSON to a file, and waits for "done" on stdin;
the receiver first offers tampered copies of every handle (each must be refused with
``WeightSyncError`` and nothing mapped: CUDA maps an allocation once per process, so a
tampered copy that got as far as opening would make the real one fail), then opens them,
checks bitwise equality, writes into one view, and exits; the sender then checks it sees
that write (same memory, no copy) before exiting.
Run as a script: ``python tests/gpu/test_cuda_ipc.py send|recv HANDLES_JSON``.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from rollout.errors import WeightSyncError
from rollout.weight_sync import open_shared, pack, parse_handle, share, unpack

TIMEOUT_S = 120


def _weights() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "embed.weight": torch.randn(64, 32, generator=g),
        "q_proj.weight": torch.randn(32, 48, generator=g).bfloat16().t(),
        "o_proj.weight": torch.randn(32, 32, generator=g).half(),
        "counter": torch.arange(10),
        "scale": torch.tensor(0.5),
    }


def _send(path: str) -> None:
    buckets = list(pack(_weights().items(), bucket_bytes=8192, device="cuda:0"))
    buckets += list(pack([("empty", torch.empty(0, 4))], device="cuda:0"))
    handles = [share(b) for b in buckets]
    torch.cuda.synchronize()
    with open(path + ".tmp", "w") as f:
        json.dump(handles, f)
    os.replace(path + ".tmp", path)  # the receiver never sees a half-written file
    assert sys.stdin.readline().strip() == "done"
    counter = dict(nt for b in buckets for nt in unpack(b))["counter"]
    assert torch.equal(counter.cpu(), torch.arange(10) + 1), counter  # the receiver's write


def _tampered(handle: dict) -> list[dict]:
    """Copies of a real handle that a broken or malicious sender could send."""
    meta = json.loads(handle["metas"])
    return [
        {**handle, "offset": handle["storage_size_bytes"]},  # the bucket past its storage
        {**handle, "nbytes": handle["nbytes"] + 1},  # longer than its tensors
        {**handle, "ref_counter_offset": 10_000},  # a slot past the ref-counter file
        {**handle, "ref_counter_handle": base64.b64encode(b"/dev/shm/other").decode()},
        {**handle, "device": torch.cuda.device_count()},
        {**handle, "storage_offset_bytes": -1},
        {**handle, "metas": json.dumps([{**meta[0], "dtype": "float33"}, *meta[1:]])},
        {**handle, "event_handle": base64.b64encode(bytes(8)).decode()},
        {k: v for k, v in handle.items() if k != "event_sync_required"},
    ]


def _recv(path: str) -> None:
    with open(path) as f:
        handles = json.load(f)
    for handle in handles:
        if handle["nbytes"] == 0:
            continue
        parsed = parse_handle(handle, torch.cuda.device_count())  # what torch really sends passes
        print(f"handle: {len(parsed.handle)} bytes, ref counter {parsed.ref_counter_handle!r} "
              f"slot {parsed.ref_counter_offset}, event {len(parsed.event_handle)} bytes", file=sys.stderr)
        for bad in _tampered(handle):
            try:
                open_shared(bad)
            except WeightSyncError:
                continue
            raise AssertionError(f"a tampered handle was opened: {bad}")
    buckets = [open_shared(h) for h in handles]
    assert len(buckets) > 2  # several buckets, plus the empty one
    got = [nt for b in buckets for nt in unpack(b)]
    want = {**_weights(), "empty": torch.empty(0, 4)}
    assert [n for n, _ in got] == list(want)
    for name, tensor in got:
        assert tensor.device == torch.device("cuda", 0), name
        ref = want[name].contiguous()
        assert tensor.dtype == ref.dtype and tensor.shape == ref.shape, name
        assert torch.equal(tensor.cpu().view(-1).view(torch.uint8), ref.view(-1).view(torch.uint8))
    dict(got)["counter"].add_(1)
    torch.cuda.synchronize()
    print("ok")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_ipc_between_processes(tmp_path):
    path = str(tmp_path / "handles.json")
    cmd = [sys.executable, __file__]
    sender = subprocess.Popen(cmd + ["send", path], stdin=subprocess.PIPE, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while not os.path.exists(path):
            assert sender.poll() is None, sender.communicate()[0]
            assert time.monotonic() < deadline, "sender never wrote its handles"
            time.sleep(0.05)
        recv = subprocess.run(cmd + ["recv", path], capture_output=True, text=True,
                              timeout=TIMEOUT_S)
        assert recv.returncode == 0 and recv.stdout.strip() == "ok", recv.stdout + recv.stderr
        out, _ = sender.communicate("done\n", timeout=TIMEOUT_S)
        assert sender.returncode == 0, out
    finally:
        if sender.poll() is None:
            sender.kill()
            sender.wait()


if __name__ == "__main__":
    {"send": _send, "recv": _recv}[sys.argv[1]](sys.argv[2])
