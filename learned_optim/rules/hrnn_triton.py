"""Fused Triton kernel of :class:`~learned_optim.rules.hierarchical.HierarchicalRNN`'s
parameter level (GPU; the same contract as :mod:`learned_optim.rules.hrnn_cpu`).

One program handles ``BLOCK`` coordinates: gradient averages and mean squares at ``K`` time
scales, the features, the ``P``-unit GRU (gate products as ``tl.dot`` tiles, weights
zero-padded to 16 and read from cache), the read-out and the new log learning rates; it
writes the state in place and ``exp(log lr) * direction`` into ``update``. The per-tensor
sums the tensor level needs (new hidden states, log learning rates, squared directions and
steps) go to a float64 buffer with atomics: one per block for the block's first tensor (almost
always all of it) and one per coordinate only for the rows of other tensors. A second kernel
scales every coordinate's update by its tensor's factor (1 / direction RMS, times the rule's
gain and step cap). No host synchronisation.
Tested against the eager rule through Triton's interpreter (``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor

from learned_optim.rules.base import RuleState
from learned_optim.rules.hrnn_cpu import (
    check_step_inputs,
    direction_scale,
    kernel_cap_log_scale,
    kernel_segment_gain,
    no_sums,
    reported_sums,
)
from learned_optim.rules.triton_common import launch_ranges, tl, triton
from learned_optim.rules.triton_common import sigmoid as _sigmoid
from learned_optim.rules.triton_common import tanh as _tanh

__all__ = ["hrnn_step_triton", "pack_hrnn_weights"]

BLOCK = 64
MAX_STATE_ELEMENTS = 2**31 - 1
"""The most elements of one state tensor a launch indexes (the kernel's offsets are 32-bit)."""


def _padded(n: int) -> int:
    # tl.dot needs every dimension to be a power of two >= 16.
    return max(16, 1 << (n - 1).bit_length())


class PackedHRNNWeights:
    """The parameter level's weights, gate-major and zero-padded, plus a key to detect changes."""

    def __init__(self, tensors: dict[str, Tensor], key: tuple[Any, ...]) -> None:
        self.tensors, self.key = tensors, key


def pack_hrnn_weights(rule: torch.nn.Module, cached: PackedHRNNWeights | None = None) -> PackedHRNNWeights:
    """Pack ``rule``'s parameter-level weights; returns ``cached`` when they have not changed."""
    if torch.compiler.is_compiling():
        key: tuple[Any, ...] = ()
    else:
        key = tuple((p.data_ptr(), p._version, p.device) for p in rule.parameters())
        if cached is not None and cached.key == key:
            return cached
    p, k, agree = rule.p, rule.k, int(getattr(rule, "agreement_feature", False))
    pp, kp = _padded(p), _padded(k)
    w_in = rule.param_in.weight.detach().float().view(3, p, 2 * k + 1 + agree)  # (gate, unit, feature)
    first = rule.param_in.weight
    with torch.no_grad():
        wm = first.new_zeros(3, kp, pp, dtype=torch.float32)
        wr = torch.zeros_like(wm)
        wm[:, :k, :p] = w_in[:, :, :k].transpose(1, 2)
        wr[:, :k, :p] = w_in[:, :, k : 2 * k].transpose(1, 2)
        wl = first.new_zeros(3, pp, dtype=torch.float32)
        wl[:, :p] = w_in[:, :, 2 * k]
        wa = torch.zeros_like(wl)  # the agreement feature's (zero without it)
        if agree:
            wa[:, :p] = w_in[:, :, 2 * k + 1]
        wh = first.new_zeros(3, pp, pp, dtype=torch.float32)
        wh[:, :p, :p] = rule.param_hh.weight.detach().float().view(3, p, p).transpose(1, 2)
        bh = first.new_zeros(3, pp, dtype=torch.float32)
        bh[:, :p] = rule.param_hh.bias.detach().float().view(3, p)
        wout = first.new_zeros(2, pp, dtype=torch.float32)
        wout[:, :p] = rule.param_out.weight.detach().float()
        direct = rule.direct.weight.detach().float().view(-1)
        wdir = first.new_zeros(2, kp, dtype=torch.float32)
        wdir[0, :k] = direct[:k]
        wdir[1, :k] = direct[k : 2 * k]
        # Read by the kernel (no .item() syncs): output biases, the direct path's log-lr and
        # agreement weights, the learned initial log lr (the leak's target).
        direct_tail = torch.cat((direct[2 * k :], direct.new_zeros(1 - agree)))
        initial_log_lr = rule.log_lr0.detach().float().reshape(1)
        scalars = torch.cat((rule.param_out.bias.detach().float(), direct_tail, initial_log_lr)).contiguous()
        decays = first.new_zeros(kp, dtype=torch.float32)
        decays[:k] = rule.decays.float()
    tensors = {"wm": wm, "wr": wr, "wl": wl, "wh": wh, "bh": bh, "wout": wout, "wdir": wdir, "scalars": scalars}
    tensors["decays"] = decays
    tensors["wa"] = wa
    return PackedHRNNWeights({name: t.contiguous() for name, t in tensors.items()}, key)


if triton is not None:

    @triton.jit
    def _hrnn_kernel(
        grad_ptr, h_ptr, m_ptr, v_ptr, lr_ptr, update_ptr, keep_ptr, seg_ptr, seg_gates_ptr, seg_mean_ptr,
        wm_ptr, wr_ptr, wl_ptr, wh_ptr, bh_ptr, wout_ptr, wdir_ptr, scalars_ptr, decays_ptr, wa_ptr, sums_ptr,
        n, lr_change_scale, lr_leak, log_min_lr, log_max_lr,
        P: tl.constexpr, K: tl.constexpr, PP: tl.constexpr, KP: tl.constexpr, AGREE: tl.constexpr,
        MASKED: tl.constexpr, BLOCK_SIZE: tl.constexpr, PRECISION: tl.constexpr,
    ):  # fmt: skip
        pid = tl.program_id(0)
        rows = pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        in_range = rows < n
        seg = tl.load(seg_ptr + rows, mask=in_range, other=0)
        write = in_range
        if MASKED:
            write = in_range & (tl.load(keep_ptr + seg, mask=in_range, other=0) != 0)
        g = tl.load(grad_ptr + rows, mask=write, other=0.0).to(tl.float32)
        g = tl.minimum(tl.maximum(g, -1e18), 1e18)  # GRAD_LIMIT of the eager rule: g * g stays finite

        kk = tl.arange(0, KP)
        kmask = kk < K
        state_mask = in_range[:, None] & kmask[None, :]
        m_old = tl.load(m_ptr + rows[:, None] * K + kk[None, :], mask=state_mask, other=0.0).to(tl.float32)
        v_old = tl.load(v_ptr + rows[:, None] * K + kk[None, :], mask=state_mask, other=0.0).to(tl.float32)
        d = tl.load(decays_ptr + kk)[None, :]
        m = d * m_old + (1.0 - d) * g[:, None]
        v = d * v_old + (1.0 - d) * (g * g)[:, None]
        log_rms = 0.5 * tl.log(v + 1e-24)
        scaled_m = tl.where(kmask[None, :], m * tl.exp(-log_rms), 0.0)
        mean_log_rms = tl.sum(tl.where(kmask[None, :], log_rms, 0.0), axis=1) / K
        rel = log_rms - mean_log_rms[:, None]
        rel = tl.minimum(tl.maximum(rel, -10.0), 10.0) / 10.0
        rel = tl.where(kmask[None, :], rel, 0.0)
        log_lr = tl.load(lr_ptr + rows, mask=in_range, other=0.0).to(tl.float32)
        rel_lr = log_lr - tl.load(seg_mean_ptr + seg, mask=in_range, other=0.0)
        if AGREE:
            # (g / rms) * (m before this step / rms) at the longest time scale, clipped to [-1, 1].
            last = (kk == K - 1)[None, :]
            m_last = tl.sum(tl.where(last, m_old, 0.0), axis=1)
            log_rms_last = tl.sum(tl.where(last, log_rms, 0.0), axis=1)
            agree = tl.minimum(tl.maximum(g * m_last * tl.exp(-2.0 * log_rms_last), -1.0), 1.0)

        pp = tl.arange(0, PP)
        pmask = pp < P
        h = tl.load(h_ptr + rows[:, None] * P + pp[None, :], mask=in_range[:, None] & pmask[None, :], other=0.0)
        h = h.to(tl.float32)
        ki = tl.arange(0, KP)[:, None] * PP + pp[None, :]
        pi = tl.arange(0, PP)[:, None] * PP + pp[None, :]
        gates_row = seg_gates_ptr + seg[:, None] * (3 * PP) + pp[None, :]
        xr = tl.load(gates_row, mask=in_range[:, None], other=0.0)
        xr += tl.dot(scaled_m, tl.load(wm_ptr + ki), input_precision=PRECISION)
        xr += tl.dot(rel, tl.load(wr_ptr + ki), input_precision=PRECISION)
        xr += rel_lr[:, None] * tl.load(wl_ptr + pp)[None, :]
        if AGREE:
            xr += agree[:, None] * tl.load(wa_ptr + pp)[None, :]
        xz = tl.load(gates_row + PP, mask=in_range[:, None], other=0.0)
        xz += tl.dot(scaled_m, tl.load(wm_ptr + KP * PP + ki), input_precision=PRECISION)
        xz += tl.dot(rel, tl.load(wr_ptr + KP * PP + ki), input_precision=PRECISION)
        xz += rel_lr[:, None] * tl.load(wl_ptr + PP + pp)[None, :]
        if AGREE:
            xz += agree[:, None] * tl.load(wa_ptr + PP + pp)[None, :]
        xn = tl.load(gates_row + 2 * PP, mask=in_range[:, None], other=0.0)
        xn += tl.dot(scaled_m, tl.load(wm_ptr + 2 * KP * PP + ki), input_precision=PRECISION)
        xn += tl.dot(rel, tl.load(wr_ptr + 2 * KP * PP + ki), input_precision=PRECISION)
        xn += rel_lr[:, None] * tl.load(wl_ptr + 2 * PP + pp)[None, :]
        if AGREE:
            xn += agree[:, None] * tl.load(wa_ptr + 2 * PP + pp)[None, :]
        hr = tl.dot(h, tl.load(wh_ptr + pi), input_precision=PRECISION) + tl.load(bh_ptr + pp)[None, :]
        hz = tl.dot(h, tl.load(wh_ptr + PP * PP + pi), input_precision=PRECISION) + tl.load(bh_ptr + PP + pp)[None, :]
        hn = tl.dot(h, tl.load(wh_ptr + 2 * PP * PP + pi), input_precision=PRECISION)
        hn += tl.load(bh_ptr + 2 * PP + pp)[None, :]
        r = _sigmoid(xr + hr)
        z = _sigmoid(xz + hz)
        cand = _tanh(xn + r * hn)
        h_new = tl.where(pmask[None, :], cand + z * (h - cand), 0.0)

        out0 = tl.sum(h_new * tl.load(wout_ptr + pp)[None, :], axis=1) + tl.load(scalars_ptr)
        out1 = tl.sum(h_new * tl.load(wout_ptr + PP + pp)[None, :], axis=1) + tl.load(scalars_ptr + 1)
        direction = out0 + tl.sum(scaled_m * tl.load(wdir_ptr + kk)[None, :], axis=1)
        direction += tl.sum(rel * tl.load(wdir_ptr + KP + kk)[None, :], axis=1)
        direction += rel_lr * tl.load(scalars_ptr + 2)
        if AGREE:
            direction += agree * tl.load(scalars_ptr + 3)
        leaked_lr = log_lr - lr_leak * (log_lr - tl.load(scalars_ptr + 4))
        new_lr = tl.minimum(tl.maximum(leaked_lr + lr_change_scale * out1, log_min_lr), log_max_lr)
        step = tl.exp(new_lr) * direction

        write_k = write[:, None] & kmask[None, :]
        tl.store(m_ptr + rows[:, None] * K + kk[None, :], m.to(m_ptr.dtype.element_ty), mask=write_k)
        tl.store(v_ptr + rows[:, None] * K + kk[None, :], v.to(v_ptr.dtype.element_ty), mask=write_k)
        write_p = write[:, None] & pmask[None, :]
        tl.store(h_ptr + rows[:, None] * P + pp[None, :], h_new.to(h_ptr.dtype.element_ty), mask=write_p)
        tl.store(lr_ptr + rows, new_lr.to(lr_ptr.dtype.element_ty), mask=write)
        tl.store(update_ptr + rows, tl.where(write, step, 0.0), mask=in_range)

        # Per-tensor sums (width PP + 3 per tensor, float64): the block's first tensor with one
        # atomic per value, rows of any other tensor (blocks that straddle tensors) one by one.
        width = PP + 3
        first = tl.load(seg_ptr + pid * BLOCK_SIZE)
        same = in_range & (seg == first)
        other = in_range & (seg != first)
        h64 = h_new.to(tl.float64)
        lr64 = new_lr.to(tl.float64)
        sq64 = (direction * direction).to(tl.float64)
        step64 = (step * step).to(tl.float64)
        tl.atomic_add(sums_ptr + first * width + pp, tl.sum(tl.where(same[:, None], h64, 0.0), axis=0), mask=pmask)
        tl.atomic_add(sums_ptr + first * width + PP, tl.sum(tl.where(same, lr64, 0.0), axis=0))
        tl.atomic_add(sums_ptr + first * width + PP + 1, tl.sum(tl.where(same, sq64, 0.0), axis=0))
        tl.atomic_add(sums_ptr + first * width + PP + 2, tl.sum(tl.where(same, step64, 0.0), axis=0))
        tl.atomic_add(sums_ptr + seg[:, None] * width + pp[None, :], h64, mask=other[:, None] & pmask[None, :])
        tl.atomic_add(sums_ptr + seg * width + PP, lr64, mask=other)
        tl.atomic_add(sums_ptr + seg * width + PP + 1, sq64, mask=other)
        tl.atomic_add(sums_ptr + seg * width + PP + 2, step64, mask=other)

    @triton.jit
    def _scale_kernel(update_ptr, seg_ptr, scale_ptr, n, BLOCK_SIZE: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        in_range = rows < n
        seg = tl.load(seg_ptr + rows, mask=in_range, other=0)
        u = tl.load(update_ptr + rows, mask=in_range, other=0.0)
        tl.store(update_ptr + rows, u * tl.load(scale_ptr + seg, mask=in_range, other=1.0), mask=in_range)


def hrnn_step_triton(
    rule: torch.nn.Module,
    packed: PackedHRNNWeights,
    grad: Tensor,
    state: RuleState,
    update: Tensor,
    segment_ids: Tensor,
    counts: Tensor,
    segment_state: RuleState,
    keep: Tensor | None = None,
    step_scales: Tensor | None = None,
    precision: str = "tf32x3",
) -> dict[str, Tensor]:
    """:func:`~learned_optim.rules.hrnn_cpu.hrnn_step_cpu` on CUDA (or under the interpreter).

    ``packed`` is :func:`pack_hrnn_weights` of ``rule``; ``precision`` is the ``tl.dot``
    input precision on GPU (``"tf32x3"``: fp32 accuracy on the matrix units).
    """
    if triton is None:
        raise RuntimeError("the Triton kernel needs the `triton` package (pip install triton)")
    check_step_inputs(rule, grad, state, update, segment_ids)
    n, num_segments, p = update.numel(), counts.numel(), rule.p
    pp = _padded(p)
    segment_gain = kernel_segment_gain(rule, segment_state, step_scales)
    cap_log_scale = kernel_cap_log_scale(rule, step_scales)
    if n == 0:
        return no_sums(rule, counts, segment_gain, cap_log_scale)
    segment_gates = update.new_zeros(num_segments, 3, pp)
    segment_gates[:, :, :p] = (rule.tensor_gates(segment_state, step_scales) + rule.param_in.bias).view(
        num_segments, 3, p
    )
    if os.environ.get("TRITON_INTERPRET") == "1":
        precision = "ieee"  # the interpreter computes dots in numpy fp32
    sums = torch.ops.learned_optim.hrnn_step_triton(
        None if grad is update else grad,
        state["h"],
        state["m"],
        state["v"],
        state["log_lr"],
        update,
        keep.to(torch.uint8).contiguous() if keep is not None else None,
        segment_ids.contiguous(),
        counts.contiguous(),
        segment_gates.detach().contiguous(),
        segment_state["mean_log_lr"].detach().float().reshape(num_segments).contiguous(),
        [packed.tensors[name] for name in ("wm", "wr", "wl", "wh", "bh", "wout", "wdir", "scalars", "decays", "wa")],
        p,
        rule.k,
        bool(getattr(rule, "agreement_feature", False)),
        segment_gain,
        cap_log_scale,
        float(rule.lr_change_scale),
        float(rule.lr_leak),
        float(rule.log_min_lr),
        float(rule.log_max_lr),
        precision,
    )
    return reported_sums(sums[:, :p], sums[:, pp : pp + 3], counts, segment_gain, cap_log_scale)


@torch.library.custom_op("learned_optim::hrnn_step_triton", mutates_args=("h", "m", "v", "log_lr", "update"))
def _hrnn_step_triton_op(
    grad: Tensor | None,
    h: Tensor,
    m: Tensor,
    v: Tensor,
    log_lr: Tensor,
    update: Tensor,
    keep: Tensor | None,
    segment_ids: Tensor,
    counts: Tensor,
    segment_gates: Tensor,
    segment_mean_log_lr: Tensor,
    weights: list[Tensor],
    param_hidden: int,
    timescales: int,
    agreement_feature: bool,
    segment_gain: Tensor | None,
    cap_log_scale: Tensor | None,
    lr_change_scale: float,
    lr_leak: float,
    log_min_lr: float,
    log_max_lr: float,
    precision: str,
) -> Tensor:
    """Both kernels; returns the per-tensor float64 sums ``(S, PP + 3)`` (h, log lr, direction², step²)."""
    n = update.numel()
    pp, kp = _padded(param_hidden), _padded(timescales)
    sums = torch.zeros(counts.numel(), pp + 3, dtype=torch.float64, device=update.device)
    source = update if grad is None else grad
    # The per-tensor sums accumulate across launches.
    for start, end in launch_ranges(n, BLOCK, max(param_hidden, timescales), MAX_STATE_ELEMENTS):
        _hrnn_kernel[(triton.cdiv(end - start, BLOCK),)](
            source[start:end], h[start:end], m[start:end], v[start:end], log_lr[start:end], update[start:end],
            keep if keep is not None else segment_ids, segment_ids[start:end], segment_gates,
            segment_mean_log_lr, *weights, sums, end - start, lr_change_scale, lr_leak, log_min_lr, log_max_lr,
            P=param_hidden, K=timescales, PP=pp, KP=kp, AGREE=agreement_feature, MASKED=keep is not None,
            BLOCK_SIZE=BLOCK, PRECISION=precision,
            num_warps=4,
        )  # fmt: skip
    scale = direction_scale(sums[:, pp + 1], counts, segment_gain, sums[:, pp + 2], cap_log_scale)
    _scale_kernel[(triton.cdiv(n, 1024),)](update, segment_ids, scale, n, BLOCK_SIZE=1024)
    return sums


@_hrnn_step_triton_op.register_fake
def _hrnn_step_triton_fake(grad, h, m, v, log_lr, update, keep, segment_ids, counts, *rest):
    param_hidden = rest[3]
    return counts.new_empty((counts.shape[0], _padded(param_hidden) + 3), dtype=torch.float64)
