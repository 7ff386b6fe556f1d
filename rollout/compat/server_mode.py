"""Names of vLLM's server-mode machinery (a separate vLLM server fed by NCCL) that RL
frameworks import at module level even when they run vLLM in their own process (TRL's
``vllm_client`` does). rollout runs in the trainer's process only: using them raises
``UnsupportedFeatureError``; importing them works."""

from __future__ import annotations

import socket
from typing import Any

from rollout.errors import UnsupportedFeatureError


def get_ip() -> str:
    """This host's address, as vLLM's ``get_ip`` (the first non-loopback one, else loopback)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 80))  # TEST-NET: no packet is sent for a UDP connect
            return s.getsockname()[0]
        except OSError:
            return "127.0.0.1"


class _ServerOnly:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise UnsupportedFeatureError(
            f"{type(self).__name__}: vLLM's server mode is not served by rollout, which runs in the trainer's "
            "process (use colocate mode; weights go through LLM.update_weights or rollout.weight_sync)"
        )


class NCCLTrainerSendWeightsArgs(_ServerOnly):
    pass


class NCCLWeightTransferEngine(_ServerOnly):
    pass
