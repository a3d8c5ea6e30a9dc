"""Reductions over the tensors (segments) of a flat batch of coordinates."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["segment_sum"]


def segment_sum(values: Tensor, segment_ids: Tensor, num_segments: int) -> Tensor:
    """Sum of ``values`` ``(n, k)`` per segment: ``(num_segments, k)``, in float64.

    ``index_add`` accumulates one value after the other: in float32 a sum over a large tensor
    drifts by up to ~n * 2^-24 relative (0.1 added a million times gives 100958), so the mean
    of a big tensor's states would be off by a percent and differ between chunkings. Sums are
    kept in float64 (where the device has it) and added up across chunks that way.
    """
    acc_dtype = values.dtype if values.device.type == "mps" else torch.float64
    if num_segments == 1:
        # One segment (a whole tensor, or a piece of one): a plain reduction. It accumulates in
        # float64 without a float64 copy of ``values`` and, on GPU, without atomics.
        return values.sum(0, keepdim=True, dtype=acc_dtype)
    out = torch.zeros((num_segments, values.shape[-1]), dtype=acc_dtype, device=values.device)
    return out.index_add(0, segment_ids, values.to(acc_dtype))
