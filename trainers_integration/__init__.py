"""Thin adapters between a trainer's model and a rollout ``LLM`` in the same process.

Each adapter yields ``(hf_name, tensor)`` pairs that ``LLM.update_weights`` understands;
``sync.update_weights_in_buckets`` feeds them in bounded chunks, and ``colocate`` runs the
wake -> update -> generate -> sleep cycle of a colocated trainer. This package imports
``rollout``; nothing in ``rollout`` imports it.
"""

from trainers_integration.colocate import begin_rollout, end_rollout, rollout_phase
from trainers_integration.deepspeed_zero3 import iter_gathered_weights
from trainers_integration.fsdp2 import iter_full_weights
from trainers_integration.hf_module import hf_name, iter_hf_weights
from trainers_integration.sync import update_weights_in_buckets

__all__ = [
    "begin_rollout", "end_rollout", "hf_name", "iter_full_weights", "iter_gathered_weights",
    "iter_hf_weights", "rollout_phase", "update_weights_in_buckets",
]
