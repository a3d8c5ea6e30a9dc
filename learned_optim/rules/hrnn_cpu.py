"""Fused CPU kernel of :class:`~learned_optim.rules.hierarchical.HierarchicalRNN`'s
per-coordinate step (``hrnn_cpu.c``, built on first use like the LSTM's, see
:mod:`learned_optim.rules.cpu_build`).

One pass over the coordinates computes the parameter level of every tensor and the
per-tensor sums the tensor level needs (in float64, one block per thread); a second, light
pass divides each tensor's update by the RMS of its direction. The tensor and global GRUs
(a few rows) stay in PyTorch (:meth:`HierarchicalRNN.finalize`). It must match
:meth:`HierarchicalRNN.forward` (tested against it).
"""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor

from learned_optim.rules.base import RuleState
from learned_optim.rules.cpu_build import KernelLibrary, run_parallel, split_ranges

__all__ = ["hrnn_kernel_available", "hrnn_step_cpu", "supports"]

_MAX_P = 32  # MAX_P in the C source
_MAX_K = 8  # MAX_K


def _configure(library: ctypes.CDLL) -> None:
    i64, ptr, i32, f32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_float
    step = library.hrnn_step
    step.restype = None
    # (start, stop, grad, h, m, v, log_lr, bf16, update, keep, segment, segment_gates,
    #  segment_mean_log_lr, w_in, w_hh, b_hh, w_out, b_out, w_direct, decays, P, K,
    #  lr_change_scale, log_min_lr, log_max_lr, sums)
    step.argtypes = [i64, i64, ptr, ptr, ptr, ptr, ptr, i32] + [ptr] * 12 + [i32, i32, f32, f32, f32, ptr]
    scale = library.hrnn_scale
    scale.restype = None
    scale.argtypes = [i64, i64, ptr, ptr, ptr]


_KERNEL = KernelLibrary("hrnn_cpu.c", _configure)


def hrnn_kernel_available() -> bool:
    """Whether the fused CPU kernel of the hierarchical RNN could be built and loaded here."""
    return _KERNEL.load() is not None


def supports(rule: torch.nn.Module) -> bool:
    """Whether the kernel handles ``rule``'s sizes (parameter GRU up to 32 units, 8 time scales)."""
    return rule.p <= _MAX_P and rule.k <= _MAX_K


def _check_state(rule: torch.nn.Module, n: int, state: RuleState) -> torch.dtype:
    widths = {"h": rule.p, "m": rule.k, "v": rule.k, "log_lr": 1}
    dtype = state["h"].dtype
    for key, width in widths.items():
        t = state[key]
        if t.shape != (n, width) or not t.is_contiguous():
            raise ValueError(f"state {key!r} must be contiguous with shape {(n, width)}, got {tuple(t.shape)}")
        if t.dtype != dtype or dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"state tensors must all be float32 or all bfloat16, got {key!r} in {t.dtype}")
    return dtype


@torch.no_grad()
def hrnn_step_cpu(
    rule: torch.nn.Module,
    grad: Tensor,
    state: RuleState,
    update: Tensor,
    segment_ids: Tensor,
    counts: Tensor,
    segment_state: RuleState,
    keep: Tensor | None = None,
) -> dict[str, Tensor]:
    """One step of the parameter level over ``n`` CPU coordinates of whole tensors.

    Args:
        rule: the :class:`HierarchicalRNN`.
        grad: ``(n,)`` fp32 gradients (may be ``update`` itself: each gradient is read
            before its update is written).
        state: ``h``/``m``/``v``/``log_lr`` of the coordinates, contiguous fp32 or bf16,
            updated in place.
        update: ``(n,)`` fp32 output: the rule's update before ``lr``.
        segment_ids: ``(n,)`` int32 tensor index of every coordinate (whole tensors).
        counts: ``(S,)`` coordinates per tensor.
        segment_state: the tensors' ``h`` ``(S, tensor_hidden)`` and ``mean_log_lr`` ``(S, 1)``.
        keep: optional ``(S,)`` flags; a tensor whose flag is false keeps its state and gets a
            zero update (its sums are still computed, from a zero gradient).

    Returns:
        The per-tensor sums :meth:`HierarchicalRNN.finalize` reads: ``h`` ``(S, P)`` and
        ``log_lr`` ``(S, 1)``, float64.
    """
    library = _KERNEL.load()
    if library is None:
        raise RuntimeError(f"the fused CPU kernel of the hierarchical RNN is unavailable: {_KERNEL.error}")
    if not supports(rule):
        raise ValueError(f"the fused CPU kernel handles param_hidden <= {_MAX_P} and timescales <= {_MAX_K}")
    n = update.numel()
    num_segments = counts.numel()
    p = rule.p
    if grad.shape != (n,) or grad.dtype != torch.float32 or update.dtype != torch.float32:
        raise ValueError("grad and update must be (n,) float32 tensors")
    if segment_ids.shape != (n,) or segment_ids.dtype != torch.int32:
        raise ValueError("segment_ids must be an (n,) int32 tensor")
    dtype = _check_state(rule, n, state)
    if n == 0:
        return {
            "h": torch.zeros(num_segments, p, dtype=torch.float64),
            "log_lr": torch.zeros(num_segments, 1, dtype=torch.float64),
        }
    grad, update, segment_ids = grad.contiguous(), update.contiguous(), segment_ids.contiguous()
    weights = [
        (rule.tensor_to_param(segment_state["h"].float()) + rule.param_in.bias).float().contiguous(),
        segment_state["mean_log_lr"].float().reshape(num_segments).contiguous(),
        rule.param_in.weight.detach().float().contiguous(),
        rule.param_hh.weight.detach().float().contiguous(),
        rule.param_hh.bias.detach().float().contiguous(),
        rule.param_out.weight.detach().float().contiguous(),
        rule.param_out.bias.detach().float().contiguous(),
        rule.direct.weight.detach().float().reshape(-1).contiguous(),
        rule.decays.float().contiguous(),
    ]
    keep_flags = keep.to(torch.uint8).contiguous() if keep is not None else None
    ranges = split_ranges(n, align=8)
    partial_sums = torch.zeros(len(ranges), num_segments, p + 2, dtype=torch.float64)
    common = (
        grad.data_ptr(),
        state["h"].data_ptr(),
        state["m"].data_ptr(),
        state["v"].data_ptr(),
        state["log_lr"].data_ptr(),
        int(dtype == torch.bfloat16),
        update.data_ptr(),
        keep_flags.data_ptr() if keep_flags is not None else None,
        segment_ids.data_ptr(),
        *(w.data_ptr() for w in weights),
        p,
        rule.k,
        rule.lr_change_scale,
        rule.log_min_lr,
        rule.log_max_lr,
    )
    run_parallel(
        library.hrnn_step, [(lo, hi, *common, partial_sums[i].data_ptr()) for i, (lo, hi) in enumerate(ranges)]
    )
    sums = partial_sums.sum(0)
    # Unit RMS per tensor: the eager rule's sqrt(mean square + 1e-16), in float64.
    rms = torch.sqrt(sums[:, p + 1] / counts.to(torch.float64).clamp_min(1) + 1e-16)
    scale = (1.0 / rms).float().contiguous()
    run_parallel(
        library.hrnn_scale, [(lo, hi, update.data_ptr(), segment_ids.data_ptr(), scale.data_ptr()) for lo, hi in ranges]
    )
    return {"h": sums[:, :p], "log_lr": sums[:, p : p + 1]}
