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
from learned_optim.rules.hierarchical import relative_step_cap_factor

__all__ = [
    "check_step_inputs",
    "direction_scale",
    "hrnn_kernel_available",
    "hrnn_step_cpu",
    "no_sums",
    "reported_sums",
    "supports",
]

_MAX_P = 32  # MAX_P in the C source
_MAX_K = 8  # MAX_K


def _configure(library: ctypes.CDLL) -> None:
    i64, ptr, i32, f32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_float
    step = library.hrnn_step
    step.restype = None
    # (start, stop, grad, h, m, v, log_lr, bf16, update, keep, segment, segment_gates,
    #  segment_mean_log_lr, w_in, w_hh, b_hh, w_out, b_out, w_direct, decays, initial_log_lr, P, K,
    #  agreement_feature, lr_change_scale, lr_leak, log_min_lr, log_max_lr, sums)
    step.argtypes = [i64, i64, ptr, ptr, ptr, ptr, ptr, i32] + [ptr] * 13 + [i32, i32, i32] + [f32] * 4 + [ptr]
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


def check_step_inputs(
    rule: torch.nn.Module, grad: Tensor, state: RuleState, update: Tensor, segment_ids: Tensor
) -> None:
    """Raise ValueError naming the first input of a fused hierarchical step that is not as expected."""
    n = update.numel()
    if grad.shape != (n,) or grad.dtype != torch.float32 or update.dtype != torch.float32:
        raise ValueError(
            f"grad and update must be ({n},) float32 tensors, got grad {tuple(grad.shape)} {grad.dtype} "
            f"and update {update.dtype}"
        )
    if not update.is_contiguous():
        raise ValueError("update must be contiguous (the kernel writes it in place), got a strided view")
    if segment_ids.shape != (n,) or segment_ids.dtype != torch.int32:
        raise ValueError(
            f"segment_ids must be a ({n},) int32 tensor, got {tuple(segment_ids.shape)} {segment_ids.dtype}"
        )
    widths = {"h": rule.p, "m": rule.k, "v": rule.k, "log_lr": 1}
    dtype = state["h"].dtype
    for key, width in widths.items():
        t = state[key]
        if t.shape != (n, width) or not t.is_contiguous():
            raise ValueError(f"state {key!r} must be contiguous with shape {(n, width)}, got {tuple(t.shape)}")
        if t.dtype != dtype or dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"state tensors must all be float32 or all bfloat16, got {key!r} in {t.dtype}")


def reported_sums(
    h_sums: Tensor,
    tail_sums: Tensor,
    counts: Tensor,
    segment_gain: Tensor | None,
    cap_log_scale: Tensor | None,
) -> dict[str, Tensor]:
    """A kernel's float64 per-tensor sums under the keys the eager rule reports
    (``HierarchicalRNN.forward``), so that ``rescale_split_update`` and ``finalize`` read
    either alike: ``h_sums`` ``(S, P)``; ``tail_sums`` ``(S, 3)``: log lr, direction², step²."""
    sums = {"h": h_sums, "log_lr": tail_sums[:, 0:1], "direction_sq": tail_sums[:, 1:2]}
    if cap_log_scale is not None:
        # As forward reports it: the cap's log scale with the gain's, times the coordinates.
        if segment_gain is not None:
            cap_log_scale = cap_log_scale + torch.log(segment_gain.to(torch.float64))
        sums["step_sq"] = tail_sums[:, 2:3]
        sums["cap_log_scale"] = (cap_log_scale * counts.to(torch.float64)).unsqueeze(-1)
    return sums


def no_sums(
    rule: torch.nn.Module,
    counts: Tensor,
    segment_gain: Tensor | None = None,
    cap_log_scale: Tensor | None = None,
) -> dict[str, Tensor]:
    """The per-tensor sums of a step over no coordinates."""
    num_segments, device = counts.numel(), counts.device
    zeros = torch.zeros(num_segments, rule.p + 3, dtype=torch.float64, device=device)
    return reported_sums(zeros[:, : rule.p], zeros[:, rule.p :], counts, segment_gain, cap_log_scale)


def direction_scale(
    square_sums: Tensor,
    counts: Tensor,
    segment_gain: Tensor | None = None,
    step_square_sums: Tensor | None = None,
    cap_log_scale: Tensor | None = None,
) -> Tensor:
    """What each tensor's summed step ``exp(log lr) * direction`` is multiplied by, in fp32:
    ``1 / RMS`` of its direction, as the eager rule computes it (float64), times the rule's
    per-tensor ``segment_gain`` and its ``relative_step_cap`` factor where it has them."""
    rms = torch.sqrt(square_sums / counts.to(torch.float64).clamp_min(1) + 1e-16)
    scale = 1.0 / rms
    if segment_gain is not None:
        scale = scale * segment_gain.to(torch.float64)
    if cap_log_scale is not None and step_square_sums is not None:
        scale = scale * relative_step_cap_factor(cap_log_scale + torch.log(scale), step_square_sums, counts)
    return scale.float().contiguous()


def kernel_cap_log_scale(rule: torch.nn.Module, step_scales: Tensor | None) -> Tensor | None:
    """The rule's ``(S,)`` float64 ``relative_step_cap`` log scales for a kernel, or None."""
    log_scale = rule.cap_log_scale(step_scales)
    return None if log_scale is None else log_scale.detach().contiguous()


def kernel_segment_gain(rule: torch.nn.Module, segment_state: RuleState, step_scales: Tensor | None) -> Tensor | None:
    """The rule's ``(S,)`` step gains for a kernel (see ``HierarchicalRNN.step_gain``), or None."""
    gain = rule.segment_gain(segment_state, step_scales)
    return None if gain is None else gain.detach().float().contiguous()


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
    step_scales: Tensor | None = None,
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
        step_scales: ``(S,)`` per-tensor step scales, for a rule with ``step_size_feature``,
            ``step_gain`` or ``relative_step_cap`` (see :class:`~learned_optim.rules.base.StepContext`).

    Returns:
        The per-tensor sums the eager rule reports, float64: ``h`` ``(S, P)`` and ``log_lr``
        ``(S, 1)`` (what :meth:`HierarchicalRNN.finalize` reads), ``direction_sq`` ``(S, 1)`` and,
        with a ``relative_step_cap``, ``step_sq`` and ``cap_log_scale`` (see :func:`reported_sums`).
    """
    # (Under torch.compile the build check is left to the op itself: its lock would break the graph.)
    if not torch.compiler.is_compiling() and _KERNEL.load() is None:
        raise RuntimeError(f"the fused CPU kernel of the hierarchical RNN is unavailable: {_KERNEL.error}")
    if not supports(rule):
        raise ValueError(f"the fused CPU kernel handles param_hidden <= {_MAX_P} and timescales <= {_MAX_K}")
    check_step_inputs(rule, grad, state, update, segment_ids)
    n = update.numel()
    num_segments = counts.numel()
    p = rule.p
    segment_gain = kernel_segment_gain(rule, segment_state, step_scales)
    cap_log_scale = kernel_cap_log_scale(rule, step_scales)
    if n == 0:
        return no_sums(rule, counts, segment_gain, cap_log_scale)
    grad, segment_ids = grad.contiguous(), segment_ids.contiguous()
    weights = [
        (rule.tensor_gates(segment_state, step_scales) + rule.param_in.bias).float().contiguous(),
        segment_state["mean_log_lr"].float().reshape(num_segments).contiguous(),
        rule.param_in.weight.detach().float().contiguous(),
        rule.param_hh.weight.detach().float().contiguous(),
        rule.param_hh.bias.detach().float().contiguous(),
        rule.param_out.weight.detach().float().contiguous(),
        rule.param_out.bias.detach().float().contiguous(),
        rule.direct.weight.detach().float().reshape(-1).contiguous(),
        rule.decays.float().contiguous(),
        rule.log_lr0.detach().float().reshape(1).contiguous(),
    ]
    keep_flags = keep.to(torch.uint8).contiguous() if keep is not None else None
    sums = torch.ops.learned_optim.hrnn_step_cpu(
        None if grad is update else grad,
        state["h"],
        state["m"],
        state["v"],
        state["log_lr"],
        update,
        keep_flags,
        segment_ids,
        counts.contiguous(),
        weights,
        p,
        rule.k,
        int(rule.agreement_feature),
        segment_gain,
        cap_log_scale,
        float(rule.lr_change_scale),
        float(rule.lr_leak),
        float(rule.log_min_lr),
        float(rule.log_max_lr),
    )
    return reported_sums(sums[:, :p], sums[:, p : p + 3], counts, segment_gain, cap_log_scale)


# A registered op (declaring what it writes) so that torch.compile keeps the step in one graph
# instead of breaking at the ctypes calls.
@torch.library.custom_op(
    "learned_optim::hrnn_step_cpu", mutates_args=("h", "m", "v", "log_lr", "update"), device_types="cpu"
)
def _hrnn_step_cpu_op(
    grad: Tensor | None,
    h: Tensor,
    m: Tensor,
    v: Tensor,
    log_lr: Tensor,
    update: Tensor,
    keep: Tensor | None,
    segment_ids: Tensor,
    counts: Tensor,
    weights: list[Tensor],
    param_hidden: int,
    timescales: int,
    agreement_feature: int,
    segment_gain: Tensor | None,
    cap_log_scale: Tensor | None,
    lr_change_scale: float,
    lr_leak: float,
    log_min_lr: float,
    log_max_lr: float,
) -> Tensor:
    """Both kernel passes; returns the per-tensor float64 sums ``(S, P + 3)`` (h, log lr,
    direction², step²)."""
    library = _KERNEL.load()
    if library is None:
        raise RuntimeError(f"the fused CPU kernel of the hierarchical RNN is unavailable: {_KERNEL.error}")
    n, p = update.numel(), param_hidden
    ranges = split_ranges(n, align=8)
    partial_sums = torch.zeros(len(ranges), counts.numel(), p + 3, dtype=torch.float64)
    common = (
        (update if grad is None else grad).data_ptr(),
        h.data_ptr(),
        m.data_ptr(),
        v.data_ptr(),
        log_lr.data_ptr(),
        int(h.dtype == torch.bfloat16),
        update.data_ptr(),
        keep.data_ptr() if keep is not None else None,
        segment_ids.data_ptr(),
        *(w.data_ptr() for w in weights),
        p,
        timescales,
        agreement_feature,
        lr_change_scale,
        lr_leak,
        log_min_lr,
        log_max_lr,
    )
    run_parallel(
        library.hrnn_step, [(lo, hi, *common, partial_sums[i].data_ptr()) for i, (lo, hi) in enumerate(ranges)]
    )
    sums = partial_sums.sum(0)
    scale = direction_scale(sums[:, p + 1], counts, segment_gain, sums[:, p + 2], cap_log_scale)
    run_parallel(
        library.hrnn_scale, [(lo, hi, update.data_ptr(), segment_ids.data_ptr(), scale.data_ptr()) for lo, hi in ranges]
    )
    return sums


@_hrnn_step_cpu_op.register_fake
def _hrnn_step_cpu_fake(grad, h, m, v, log_lr, update, keep, segment_ids, counts, weights, param_hidden, *rest):
    return counts.new_empty((counts.shape[0], param_hidden + 3), dtype=torch.float64)
