"""Compute kernels: each op has a plain torch reference here; Triton versions sit beside them.

This package imports only torch (and triton for the GPU kernels)."""
