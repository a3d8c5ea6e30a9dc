"""What the Triton kernels share: the optional import, where they can run, and their
sigmoid/tanh (the eager rules' formulas)."""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # Triton is an optional dependency (GPU installs of torch bring it).
    triton = None
    tl = None

__all__ = ["launch_ranges", "sigmoid", "tanh", "tl", "triton", "triton_available", "triton_usable_on"]


def triton_available() -> bool:
    """Whether Triton is installed."""
    return triton is not None


def triton_usable_on(device: torch.device) -> bool:
    """Whether a Triton kernel can run on ``device``: CUDA, or any device under ``TRITON_INTERPRET=1``."""
    if triton is None:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def launch_ranges(n: int, block: int, row_elements: int, max_elements: int) -> list[tuple[int, int]]:
    """``(start, end)`` row ranges of whole blocks, each indexing at most ``max_elements`` state
    elements of ``row_elements`` per row (at least one block): the kernels' offsets are 32-bit."""
    rows = max(block, max_elements // max(row_elements, 1) // block * block)
    return [(start, min(n, start + rows)) for start in range(0, n, rows)]


if triton is not None:

    @triton.jit
    def sigmoid(x):
        # exp of -|x| never overflows (1 / (1 + exp(-x)) reaches inf for x < -88, which gives
        # the right 0 but makes the interpreter warn).
        z = tl.exp(-tl.abs(x))
        r = 1.0 / (1.0 + z)
        return tl.where(x >= 0, r, z * r)

    @triton.jit
    def tanh(x):
        # 2 sigmoid(2x) - 1, as the LSTM's eager rule computes it.
        return 2.0 * sigmoid(2.0 * x) - 1.0

else:
    sigmoid = tanh = None
