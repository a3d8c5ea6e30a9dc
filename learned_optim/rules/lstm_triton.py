"""Fused Triton kernel of :class:`~learned_optim.rules.lstm.CoordinateLSTM`'s step.

One program handles ``BLOCK`` coordinates end to end: it reads their gradients and
LSTM state, applies the log/sign preprocessing, runs every LSTM layer (the shared
weights, zero-padded to ``HP`` units, are read from cache; the gate products are
``tl.dot`` tiles so they run on matrix units), writes the new state in place and the
update. It must match :meth:`CoordinateLSTM.forward` (tested against it; on CPU through
Triton's interpreter, ``TRITON_INTERPRET=1``).

Nothing here reads device values back to the host, so a step can be captured in a CUDA
graph. Triton is optional: :func:`triton_available` says whether this module can run.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from learned_optim.rules.lstm_pack import PackedLSTMWeights, check_agreement, check_state, padded_units
from learned_optim.rules.triton_common import launch_ranges, tl, triton, triton_available, triton_usable_on
from learned_optim.rules.triton_common import sigmoid as _sigmoid
from learned_optim.rules.triton_common import tanh as _tanh

__all__ = ["lstm_step_triton", "triton_available", "triton_usable_on"]

MAX_STATE_ELEMENTS = 2**31 - 1
"""The most state elements one launch indexes (the kernel's offsets are 32-bit)."""

LAUNCH = {"block": 64, "num_warps": 4}
"""Launch settings of the kernel on GPU (coordinates per program, warps): the fastest measured
on an H100 (``benchmarks/triton_tuning.py``; docs/performance.md)."""


if triton is not None:

    @triton.jit
    def _gate(
        inp, h, wx_ptr, wh_ptr, b_ptr, layer: tl.constexpr, q: tl.constexpr, HP: tl.constexpr, PRECISION: tl.constexpr
    ):
        k = tl.arange(0, HP)
        j = tl.arange(0, HP)
        tile = ((layer * 4 + q) * HP + k[:, None]) * HP + j[None, :]
        acc = tl.dot(inp, tl.load(wx_ptr + tile), input_precision=PRECISION)
        acc = tl.dot(h, tl.load(wh_ptr + tile), acc, input_precision=PRECISION)
        return acc + tl.load(b_ptr + (layer * 4 + q) * HP + j)[None, :]

    @triton.jit
    def _gate_first(x0, x1, h, wx_ptr, wh_ptr, b_ptr, q: tl.constexpr, HP: tl.constexpr, PRECISION: tl.constexpr):
        # Layer 0 has one or two input features: outer products instead of a padded matmul.
        k = tl.arange(0, HP)
        j = tl.arange(0, HP)
        acc = tl.dot(h, tl.load(wh_ptr + (q * HP + k[:, None]) * HP + j[None, :]), input_precision=PRECISION)
        acc += x0[:, None] * tl.load(wx_ptr + q * HP * HP + j)[None, :]
        acc += x1[:, None] * tl.load(wx_ptr + (q * HP + 1) * HP + j)[None, :]
        return acc + tl.load(b_ptr + q * HP + j)[None, :]

    @triton.jit
    def _lstm_kernel(
        grad_ptr,
        h_ptr,
        c_ptr,
        update_ptr,
        keep_ptr,
        segment_ptr,
        wx_ptr,
        wh_ptr,
        b_ptr,
        out_ptr,
        m_ptr,
        v_ptr,
        decay_ptr,
        agreement_ptr,
        n,
        preprocess_p,
        input_scale,
        output_scale,
        rms_decay,
        rms_rest,
        MOMENTA: tl.constexpr,
        AGREEMENTS: tl.constexpr,
        L: tl.constexpr,
        H: tl.constexpr,
        HP: tl.constexpr,
        PREPROCESS: tl.constexpr,
        MASKED: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        pid = tl.program_id(0)
        rows = pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        in_range = rows < n
        g = tl.load(grad_ptr + rows, mask=in_range, other=0.0).to(tl.float32)
        write = in_range
        if MASKED or AGREEMENTS > 0:
            segment = tl.load(segment_ptr + rows, mask=in_range, other=0)  # each coordinate's tensor index
        if MASKED:
            # Per-tensor keep flags, looked up through each coordinate's tensor index.
            keep = tl.load(keep_ptr + segment, mask=in_range, other=0) != 0
            write = in_range & keep
            g = tl.where(keep, g, 0.0)
        if PREPROCESS:
            floor = tl.exp(-preprocess_p)
            magnitude = tl.abs(g)
            large = magnitude >= floor
            x0 = tl.where(large, tl.log(tl.maximum(magnitude, floor)) / preprocess_p, -1.0)
            sign = tl.where(g > 0, 1.0, tl.where(g < 0, -1.0, 0.0))
            x1 = tl.where(large, sign, g * tl.exp(preprocess_p))
        else:
            x0 = g * input_scale
            x1 = tl.zeros_like(g)
        j = tl.arange(0, HP)
        unit_ok = j < H
        tile_mask = in_range[:, None] & unit_ok[None, :]
        store_mask = write[:, None] & unit_ok[None, :]
        inp = tl.zeros((BLOCK_SIZE, HP), dtype=tl.float32)
        if MOMENTA + AGREEMENTS > 0:
            # Layer 0 takes the whole input tile through tl.dot: the gradient features, then the
            # scale-free momenta, then the per-tensor inputs.
            first = 2 if PREPROCESS else 1
            slot = j - first
            column = j[None, :]
            inp = tl.where(column == 0, x0[:, None], 0.0)
            if PREPROCESS:
                inp = tl.where(column == 1, x1[:, None], inp)
        if MOMENTA > 0:
            # Scale-free momenta (CoordinateLSTM.momentum_features).
            is_momentum = (slot >= 0) & (slot < MOMENTA)
            decay = tl.load(decay_ptr + slot, mask=is_momentum, other=0.0)[None, :]
            m_offsets = rows[:, None] * MOMENTA + slot[None, :]
            m_mask = in_range[:, None] & is_momentum[None, :]
            m = tl.load(m_ptr + m_offsets, mask=m_mask, other=0.0).to(tl.float32)
            v = tl.load(v_ptr + rows, mask=in_range, other=0.0).to(tl.float32)
            # Clipped as in CoordinateLSTM.momentum_features (MOMENTUM_GRAD_LIMIT): v stays finite.
            g_clipped = tl.minimum(tl.maximum(g, -1e15), 1e15)
            squared = g_clipped * g_clipped
            # Both averages start at the first gradient, where v is still 0.
            fresh = v == 0.0
            v_new = tl.where(fresh, squared, rms_decay * v + rms_rest * squared)
            m_new = tl.where(fresh[:, None], g_clipped[:, None], decay * m + (1.0 - decay) * g_clipped[:, None])
            tl.store(m_ptr + m_offsets, m_new.to(m_ptr.dtype.element_ty), mask=write[:, None] & is_momentum[None, :])
            tl.store(v_ptr + rows, v_new.to(v_ptr.dtype.element_ty), mask=write)
            # 1e-30 keeps 0 / 0 at 0 for coordinates whose gradients are all zero.
            scaled = m_new / tl.sqrt(v_new + 1e-30)[:, None]
            inp = tl.where(is_momentum[None, :], scaled, inp)
        if AGREEMENTS > 0:
            # Per-tensor inputs (agreement cosines, norm ratios, step responses) after the
            # momenta: a row of the (num_tensors, AGREEMENTS) table, looked up through each
            # coordinate's tensor index.
            entry = slot - MOMENTA
            is_agreement = (entry >= 0) & (entry < AGREEMENTS)
            shared = tl.load(
                agreement_ptr + segment[:, None] * AGREEMENTS + entry[None, :],
                mask=in_range[:, None] & is_agreement[None, :],
                other=0.0,
            )
            inp = tl.where(is_agreement[None, :], shared, inp)
        for layer in tl.static_range(L):
            offsets = rows[:, None] * (L * H) + layer * H + j[None, :]
            h = tl.load(h_ptr + offsets, mask=tile_mask, other=0.0).to(tl.float32)
            c = tl.load(c_ptr + offsets, mask=tile_mask, other=0.0).to(tl.float32)
            if layer == 0 and MOMENTA + AGREEMENTS == 0:
                gi = _gate_first(x0, x1, h, wx_ptr, wh_ptr, b_ptr, 0, HP, PRECISION)
                gf = _gate_first(x0, x1, h, wx_ptr, wh_ptr, b_ptr, 1, HP, PRECISION)
                go = _gate_first(x0, x1, h, wx_ptr, wh_ptr, b_ptr, 2, HP, PRECISION)
                gg = _gate_first(x0, x1, h, wx_ptr, wh_ptr, b_ptr, 3, HP, PRECISION)
            else:
                gi = _gate(inp, h, wx_ptr, wh_ptr, b_ptr, layer, 0, HP, PRECISION)
                gf = _gate(inp, h, wx_ptr, wh_ptr, b_ptr, layer, 1, HP, PRECISION)
                go = _gate(inp, h, wx_ptr, wh_ptr, b_ptr, layer, 2, HP, PRECISION)
                gg = _gate(inp, h, wx_ptr, wh_ptr, b_ptr, layer, 3, HP, PRECISION)
            c = _sigmoid(gf) * c + _sigmoid(gi) * _tanh(gg)
            h = _sigmoid(go) * _tanh(c)
            # Padded units stay exactly zero (zero weights, zero state), so they never leak.
            h = tl.where(unit_ok[None, :], h, 0.0)
            tl.store(h_ptr + offsets, h.to(h_ptr.dtype.element_ty), mask=store_mask)
            tl.store(c_ptr + offsets, c.to(c_ptr.dtype.element_ty), mask=store_mask)
            inp = h
        w_out = tl.load(out_ptr + j)
        b_out = tl.load(out_ptr + HP)
        update = (tl.sum(inp * w_out[None, :], axis=1) + b_out) * output_scale
        update = tl.where(write, update, 0.0)
        tl.store(update_ptr + rows, update, mask=in_range)


def lstm_step_triton(
    rule: torch.nn.Module,
    packed: PackedLSTMWeights,
    grad: Tensor,
    h: Tensor,
    c: Tensor,
    update: Tensor,
    keep: Tensor | None = None,
    segment_ids: Tensor | None = None,
    precision: str = "tf32x3",
    m: Tensor | None = None,
    v: Tensor | None = None,
    agreement: Tensor | None = None,
) -> None:
    """One fused LSTM step over ``n`` coordinates; writes ``h``/``c`` in place and ``update``.

    Args:
        rule: the :class:`CoordinateLSTM` (its config; weights come from ``packed``).
        packed: :func:`~learned_optim.rules.lstm_pack.pack_lstm_weights` of ``rule``.
        grad: ``(n,)`` gradients (any float dtype; computed in fp32).
        h, c: ``(n, num_layers, hidden_size)`` contiguous state (fp32 or bf16/fp16 storage).
        update: ``(n,)`` fp32 output, the rule's update before ``lr``.
        keep: optional per-tensor flags (``uint8``/``bool``); coordinates of a tensor whose
            flag is 0 keep their state and get a zero update.
        segment_ids: ``(n,)`` int32 tensor index of each coordinate (with ``keep`` or ``agreement``).
        precision: ``tl.dot`` input precision on GPU: ``"tf32x3"`` (fp32 accuracy on matrix
            units), ``"ieee"`` (plain fp32) or ``"tf32"`` (fastest, ~1e-3 relative error).
        m, v: a momentum rule's averages, ``(n, k)`` and ``(n,)`` contiguous, ``h``'s dtype;
            updated in place.
        agreement: with per-tensor inputs, the fp32 ``(num_tensors, k)`` table of them,
            read through ``segment_ids``.
    """
    if triton is None:
        raise RuntimeError("the Triton LSTM kernel needs the `triton` package (pip install triton)")
    n = grad.numel()
    if n == 0:
        return
    check_state(rule, n, h, c, m=m, v=v)
    masked = keep is not None
    if masked and segment_ids is None:
        raise ValueError("keep needs segment_ids")
    if update.shape != (n,) or not update.is_contiguous():
        raise ValueError(f"update must be a contiguous ({n},) tensor, got {tuple(update.shape)}")
    if masked and keep.dtype == torch.bool:
        keep = keep.view(torch.uint8)
    agreement = check_agreement(rule, n, agreement, segment_ids)
    torch.ops.learned_optim.lstm_step_triton(
        None if grad is update else grad,
        h,
        c,
        update,
        keep,
        segment_ids if masked or agreement is not None else None,
        packed.tensors(),
        rule.num_layers,
        rule.hidden_size,
        bool(rule.preprocess),
        float(rule.preprocess_p),
        float(rule.input_scale),
        float(rule.output_scale),
        precision,
        m if rule.momentum_decays else None,
        v if rule.momentum_decays else None,
        float(rule.rms_decay),
        agreement,
    )


# A registered op (with declared mutations): torch.compile keeps the step in one graph and
# CUDA graphs capture the launch like any other op.
@torch.library.custom_op("learned_optim::lstm_step_triton", mutates_args=("h", "c", "update", "m", "v"))
def _lstm_step_triton_op(
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
    precision: str,
    m: Tensor | None,
    v: Tensor | None,
    rms_decay: float,
    agreement: Tensor | None,
) -> None:
    """The kernel over ``update.numel()`` coordinates; ``grad=None`` reads the gradient from ``update``."""
    n = update.numel()
    if os.environ.get("TRITON_INTERPRET") == "1":
        precision = "ieee"  # the interpreter computes dots in numpy fp32
    masked = keep is not None
    source = update if grad is None else grad
    wx, wh, bias, out, decays = packed
    momenta = decays.numel() if m is not None else 0
    block = LAUNCH["block"]
    for start, end in launch_ranges(n, block, max(num_layers * hidden_size, momenta), MAX_STATE_ELEMENTS):
        count = end - start
        _lstm_kernel[(triton.cdiv(count, block),)](
            source[start:end],
            h[start:end],
            c[start:end],
            update[start:end],
            keep if masked else source,
            segment_ids[start:end] if segment_ids is not None else source,
            wx,
            wh,
            bias,
            out,
            m[start:end] if momenta else source,
            v[start:end] if momenta else source,
            decays if momenta else source,
            agreement if agreement is not None else source,
            count,
            preprocess_p,
            input_scale,
            output_scale,
            rms_decay,
            1.0 - rms_decay,
            MOMENTA=momenta,
            AGREEMENTS=agreement.shape[1] if agreement is not None else 0,
            L=num_layers,
            H=hidden_size,
            HP=padded_units(hidden_size),
            PREPROCESS=preprocess,
            MASKED=masked,
            BLOCK_SIZE=block,
            PRECISION=precision,
            num_warps=LAUNCH["num_warps"],
        )


@_lstm_step_triton_op.register_fake
def _lstm_step_triton_fake(*args: object) -> None:
    return None
