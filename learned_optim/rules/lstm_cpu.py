"""Fused CPU kernel of :class:`~learned_optim.rules.lstm.CoordinateLSTM`'s step.

The kernel (``lstm_cpu.c``, beside this file) is plain C compiled on first use with the
system's C compiler (``$CC``, else ``cc``/``gcc``) into a per-user cache, and called through
``ctypes``, which releases the GIL: the coordinates are split over torch's intra-op thread
count, each range in its own thread. It must match :meth:`CoordinateLSTM.forward` (tested
against it). Where no compiler is found it is simply unavailable and the eager path runs.
"""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor

from learned_optim.rules.cpu_build import KernelLibrary, run_parallel, split_ranges
from learned_optim.rules.lstm_pack import PackedLSTMWeights, check_agreement, check_state, input_count, padded_units

__all__ = ["cpu_kernel_available", "cpu_kernel_error", "lstm_step_cpu", "supports"]

_MAX_HIDDEN = 64  # MAX_HP in the C source
_MAX_ROW = 256  # MAX_ROW in the C source: state units per coordinate (layers x hidden)


def _configure(library: ctypes.CDLL) -> None:
    fn = library.lstm_step
    fn.restype = None
    i64, ptr, i32, f32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_float
    # (start, stop, grad, h, c, bf16, update, keep, segment, wx, wh, bias, out, layers, hidden, hp,
    #  preprocess, preprocess_p, input_scale, output_scale, m, v, momenta, decays, rms_decay, rms_rest,
    #  agreement, agreements)
    fn.argtypes = (
        [i64, i64, ptr, ptr, ptr, i32] + [ptr] * 7 + [i32] * 4 + [f32] * 3 + [ptr, ptr, i32, ptr, f32, f32, ptr, i32]
    )


_KERNEL = KernelLibrary("lstm_cpu.c", _configure)


def _load() -> ctypes.CDLL | None:
    return _KERNEL.load()


def cpu_kernel_available() -> bool:
    """Whether the fused CPU kernel could be built and loaded here."""
    return _load() is not None


def cpu_kernel_error() -> str | None:
    """Why the kernel is unavailable (``None`` when it is available)."""
    _load()
    return _KERNEL.error


def supports(rule: torch.nn.Module) -> bool:
    """Whether the CPU kernel handles ``rule``'s config (hidden size up to 64, and at most 256
    state units per coordinate, ``num_layers * hidden_size``: its block scratch holds that many)."""
    return (
        rule.hidden_size <= _MAX_HIDDEN
        and rule.num_layers * rule.hidden_size <= _MAX_ROW
        and input_count(rule) <= padded_units(rule.hidden_size)
    )


def lstm_step_cpu(
    rule: torch.nn.Module,
    packed: PackedLSTMWeights,
    grad: Tensor,
    h: Tensor,
    c: Tensor,
    update: Tensor,
    keep: Tensor | None = None,
    segment_ids: Tensor | None = None,
    m: Tensor | None = None,
    v: Tensor | None = None,
    agreement: Tensor | None = None,
) -> None:
    """One fused LSTM step over ``n`` CPU coordinates; same contract as ``lstm_step_triton``.

    ``grad`` and ``update`` are fp32; ``h``/``c`` are contiguous ``(n, num_layers, hidden_size)``
    in fp32 or bf16, and so are a momentum rule's ``m`` ``(n, k)`` and ``v`` ``(n,)``.
    ``agreement``: with per-tensor inputs, the fp32 ``(num_tensors, k)`` table of them,
    read through the int32 ``segment_ids``.
    """
    # (Under torch.compile the build check is left to the op itself: its lock would break the graph.)
    if not torch.compiler.is_compiling() and _load() is None:
        raise RuntimeError(f"the fused CPU LSTM kernel is unavailable: {_KERNEL.error}")
    n = grad.numel()
    if n == 0:
        return
    if grad.dtype != torch.float32 or update.dtype != torch.float32:
        raise ValueError("grad and update must be float32")
    if update.shape != (n,) or not update.is_contiguous():
        raise ValueError(f"update must be a contiguous ({n},) tensor, got {tuple(update.shape)}")
    if not supports(rule):
        raise ValueError(
            f"the fused CPU kernel handles hidden_size <= {_MAX_HIDDEN}, num_layers * hidden_size <= {_MAX_ROW} "
            f"and at most {padded_units(rule.hidden_size)} first-layer inputs; got hidden_size {rule.hidden_size}, "
            f"num_layers {rule.num_layers}, {input_count(rule)} inputs"
        )
    check_state(rule, n, h, c, dtypes=(torch.float32, torch.bfloat16), m=m, v=v)
    if keep is not None:
        if segment_ids is None or segment_ids.dtype != torch.int32:
            raise ValueError("keep needs int32 segment_ids")
        keep = keep.to(torch.uint8).contiguous()
    agreement = check_agreement(rule, n, agreement, segment_ids)
    torch.ops.learned_optim.lstm_step_cpu(
        None if grad is update else grad.contiguous(),
        h,
        c,
        update,
        keep,
        segment_ids if keep is not None or agreement is not None else None,
        packed.tensors(),
        rule.num_layers,
        rule.hidden_size,
        bool(rule.preprocess),
        float(rule.preprocess_p),
        float(rule.input_scale),
        float(rule.output_scale),
        m if rule.momentum_decays else None,
        v if rule.momentum_decays else None,
        float(rule.rms_decay),
        agreement,
    )


# A registered op (with declared mutations) so that torch.compile keeps the step in one graph
# instead of breaking at the ctypes call.
@torch.library.custom_op(
    "learned_optim::lstm_step_cpu", mutates_args=("h", "c", "update", "m", "v"), device_types="cpu"
)
def _lstm_step_cpu_op(
    grad: Tensor | None,
    h: Tensor,
    c: Tensor,
    update: Tensor,
    keep: Tensor | None,
    segment_ids: Tensor | None,
    packed: list[Tensor],
    num_layers: int,
    hidden_size: int,
    preprocess: bool,
    preprocess_p: float,
    input_scale: float,
    output_scale: float,
    m: Tensor | None,
    v: Tensor | None,
    rms_decay: float,
    agreement: Tensor | None,
) -> None:
    """The kernel over ``update.numel()`` coordinates; ``grad=None`` reads the gradient from ``update``."""
    library = _load()
    if library is None:
        raise RuntimeError(f"the fused CPU LSTM kernel is unavailable: {_KERNEL.error}")
    n = update.numel()
    wx, wh, bias, out, decays = packed
    momenta = decays.numel() if m is not None else 0
    args = (
        (update if grad is None else grad).data_ptr(),
        h.data_ptr(),
        c.data_ptr(),
        int(h.dtype == torch.bfloat16),
        update.data_ptr(),
        keep.data_ptr() if keep is not None else None,
        segment_ids.data_ptr() if segment_ids is not None else None,
        wx.data_ptr(),
        wh.data_ptr(),
        bias.data_ptr(),
        out.data_ptr(),
        num_layers,
        hidden_size,
        wx.shape[-1],
        int(preprocess),
        preprocess_p,
        input_scale,
        output_scale,
        m.data_ptr() if momenta else None,
        v.data_ptr() if momenta else None,
        momenta,
        decays.data_ptr() if momenta else None,
        rms_decay,
        1.0 - rms_decay,  # in double, then rounded: as the eager rule computes it
        agreement.data_ptr() if agreement is not None else None,
        agreement.shape[1] if agreement is not None else 0,
    )
    # Ranges are multiples of the kernel's 32-coordinate block; ctypes drops the GIL per call.
    run_parallel(library.lstm_step, [(lo, hi, *args) for lo, hi in split_ranges(n)])


@_lstm_step_cpu_op.register_fake
def _lstm_step_cpu_fake(*args: object) -> None:
    return None
