"""A weight sender that dies or hangs mid-broadcast (#15): two real processes on a gloo group
with a 10 s timeout. The surviving receiver, an engine taking ``update_weights(recv_weights())``,
raises ``PeerFailureError`` (at once when the sender dies between buckets, at the group's
timeout when it dies inside a bucket's broadcast or stops answering), and its weights and
version are unchanged, bit for bit; it still generates what it did before.

Run as a script (``python tests/test_fault_broadcast.py RANK PORT JOB_DIR``) it is one rank.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest

from tests.helpers.two_ranks import ROOT, free_port

GROUP_TIMEOUT_S = 10
CASES = {
    # the sender's process is SIGKILLed ...
    "killed between buckets": "after its first buckets, while packing the next",
    "killed mid-bucket": "with a 32 MiB bucket's broadcast under way",
    # ... or stops answering (a stuck trainer): only the group's timeout can tell
    "hung": "after its first buckets, for longer than the group's timeout",
}


@pytest.mark.parametrize("case", list(CASES))
def test_receiver_survives_a_sender_failing_mid_broadcast(case, tmp_path, a_dir, b_dir):
    (tmp_path / "job.json").write_text(json.dumps({"case": case, "a_dir": str(a_dir), "b_dir": str(b_dir)}))
    sender_rc, receiver_log = _run_pair(tmp_path, limit_s=90)
    res = json.loads((tmp_path / "rank1.json").read_text())
    assert res["error"] == "PeerFailureError", (res, receiver_log)
    assert "did not answer" in res["message"] and "rank 1" in res["message"]
    # where the receiver was: waiting for the next header, or inside the bucket's own broadcast
    assert ("a bucket failed" if case == "killed mid-bucket" else "a header failed") in res["message"], res
    if case != "hung":
        assert sender_rc == -signal.SIGKILL, sender_rc
    if case == "killed between buckets":
        assert res["elapsed_s"] < GROUP_TIMEOUT_S, res  # the closed connection is seen at once
    else:
        # gloo does not wake a receive already waiting on a peer that died mid-message (nor
        # one waiting on a silent peer): the group's timeout ends it
        assert res["elapsed_s"] < GROUP_TIMEOUT_S + 15, res
    assert res["received_tensors"] >= 1, res  # it failed part-way, holding what it had received
    assert res["unchanged"] and res["same_tokens"], res


def _run_pair(job_dir: Path, limit_s: float) -> tuple[int, str]:
    """Both ranks as processes; wait for the receiver only, then stop the sender if it is
    still there (the hung case). Returns (the sender's exit code, the receiver's log)."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    if sys.platform == "linux":
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    port = free_port()
    procs = [subprocess.Popen([sys.executable, __file__, str(rank), str(port), str(job_dir)], env=env, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    try:
        try:
            log = procs[1].communicate(timeout=limit_s)[0]
        except subprocess.TimeoutExpired:
            procs[1].kill()
            pytest.fail(f"the receiver hung past {limit_s}s:\n{procs[1].communicate()[0]}")
        assert procs[1].returncode == 0, log
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.communicate()
    return procs[0].returncode, log


# ---- the ranks ------------------------------------------------------------------------------
def _sender(case: str, weights: dict, group) -> None:
    import torch
    import torch.distributed as dist

    from rollout.weight_sync import send_weights
    from rollout.weight_sync.protocol import Link

    items = list(weights.items())

    def stream():
        for i, item in enumerate(items):
            if i == 6:  # several buckets of 16 KiB are out by now
                if case == "hung":
                    time.sleep(300)
                os.kill(os.getpid(), signal.SIGKILL)
            yield item

    if case != "killed mid-bucket":
        send_weights(stream(), src=0, group=group, bucket_bytes=1 << 14)
        return
    real_broadcast = Link.broadcast

    def dying_broadcast(link, tensor, what):
        if what == "a bucket" and tensor.numel() >= 32 << 20:  # start it, then die with it in flight
            dist.broadcast(tensor, link.src, group=link.group, async_op=True)
            os.kill(os.getpid(), signal.SIGKILL)
        real_broadcast(link, tensor, what)

    Link.broadcast = dying_broadcast  # this process is the broken sender: nothing else runs here
    big = ("model.extra.weight", torch.zeros(8 << 20))  # 32 MiB, more than the sockets buffer
    send_weights([*items[:2], big, *items[2:]], src=0, group=group, bucket_bytes=1 << 16)


def _receiver(llm, group) -> dict:
    from rollout.weight_sync import recv_weights
    from tests.helpers.engine_state import changed, greedy, snapshot

    before, version, tokens = snapshot(llm), llm.weight_version, greedy(llm)
    received = []

    def counted():
        for name, tensor in recv_weights(src=0, group=group, device="cpu"):
            received.append(name)
            yield name, tensor

    t0 = time.monotonic()
    try:
        llm.update_weights(counted())
        res = {"error": None}
    except Exception as e:  # noqa: BLE001 - the pytest side checks which
        res = {"error": type(e).__name__, "message": str(e)}
    res["elapsed_s"] = time.monotonic() - t0
    res["received_tensors"] = len(received)
    res["unchanged"] = not changed(before, snapshot(llm)) and llm.weight_version == version
    res["same_tokens"] = greedy(llm) == tokens
    return res


def _rank_main(rank: int, port: int, job_dir: str) -> None:
    import torch.distributed as dist

    job = json.loads((Path(job_dir) / "job.json").read_text())
    if rank == 1:  # the engine first, alone: it never joins the world
        from tests.helpers.engine_state import make_llm

        llm = make_llm(job["a_dir"])
    # A generous timeout to meet (imports take a while on a busy machine), a short one to transfer.
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))
    group = dist.new_group([0, 1], timeout=timedelta(seconds=GROUP_TIMEOUT_S))
    if rank == 0:
        from safetensors.torch import load_file

        _sender(job["case"], load_file(f"{job['b_dir']}/model.safetensors"), group)
        return  # not reached: the sender dies
    res = _receiver(llm, group)
    (Path(job_dir) / "rank1.json").write_text(json.dumps(res))
    print(json.dumps(res), flush=True)
    os._exit(0)  # the group is broken (its peer is gone): skip destroying it at exit


if __name__ == "__main__":
    _rank_main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
