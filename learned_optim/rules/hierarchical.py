"""The hierarchical RNN optimizer of Wichrowska et al. 2017, "Learned Optimizers that Scale and
Generalize".

Three levels of GRUs. A small *parameter* GRU runs per coordinate on scale-free gradient
features; a *tensor* GRU per parameter tensor reads the mean of its coordinates' hidden
states; a *global* GRU reads the mean of the states of the tensors that have coordinates.
Each level biases the one below (the tensor GRU the parameter GRU's gates, the global GRU the
tensor GRU's gates), and all initial states are learned.

Per coordinate the parameter GRU sees
- gradient averages at ``timescales`` time scales (each twice as long as the one before),
  each divided by the root of a running mean square at the same time scale,
- the log gradient magnitude at each time scale relative to their mean,
- the coordinate's log learning rate relative to its tensor's mean,

and outputs a direction (normalised to unit RMS per tensor) and a change of its own log
learning rate. The step is ``exp(log_lr) * direction``. A linear path from the features to
the direction starts the rule out as normalised momentum (Adam-like) at ``init_lr``, which
meta-training then improves.

Tensor membership arrives as segment ids (``StepContext``), so per-tensor means are one
segmented reduction over the flat batch, never a loop over tensors.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from learned_optim.rules.base import (
    MAX_CONFIG_DEPTH,
    MAX_CONFIG_WIDTH,
    RuleState,
    StepContext,
    UpdateRule,
    config_bool,
    config_float,
    config_int,
)
from learned_optim.rules.segments import segment_sum

_EPS = 1e-24
GRAD_LIMIT = 1e18
"""Gradients are clipped to this magnitude before the rule's features: a running mean square of
a larger one overflows float32 (|g| above ~1.8e19) and would turn the update into NaN. The
features are scale-free, so the clip changes nothing below it."""


def gru_cell(x_gates: Tensor, h: Tensor, w_hh: Tensor, b_hh: Tensor) -> Tensor:
    """GRU cell given the input's gate pre-activations ``x_gates`` ``(n, 3H)`` (reset, update, new)."""
    if not torch.is_grad_enabled():  # an optimizer step: no graph to keep
        return _gru_cell_no_grad(x_gates, h, w_hh, b_hh)
    h_gates = torch.addmm(b_hh, h, w_hh.t())
    hidden = h.shape[-1]
    rz = torch.sigmoid(x_gates[:, : 2 * hidden] + h_gates[:, : 2 * hidden])
    r, z = rz[:, :hidden], rz[:, hidden:]
    candidate = torch.tanh(x_gates[:, 2 * hidden :] + r * h_gates[:, 2 * hidden :])
    return candidate + z * (h - candidate)


def _gru_cell_no_grad(x_gates: Tensor, h: Tensor, w_hh: Tensor, b_hh: Tensor) -> Tensor:
    """``gru_cell`` with grad mode off, in place on its own temporaries, with ``tanh(z) = 2
    sigmoid(2z) - 1``: on CPU torch's tanh is about 4x slower than its sigmoid, and so is a
    sigmoid over a column slice against one over a contiguous tensor."""
    hidden = h.shape[-1]
    h_gates = torch.addmm(b_hh, h, w_hh.t())
    rz = torch.add(x_gates[:, : 2 * hidden], h_gates[:, : 2 * hidden]).sigmoid_()
    r, z = rz[:, :hidden], rz[:, hidden:]
    candidate = torch.mul(h_gates[:, 2 * hidden :], r).add_(x_gates[:, 2 * hidden :]).mul_(2.0)
    candidate.sigmoid_().mul_(2.0).sub_(1.0)
    return torch.sub(h, candidate).mul_(z).add_(candidate)


MAX_LR = 1e30  # exp(log lr) and the steps it scales stay finite in float32
_GAIN_LIMIT = math.log(100.0)  # step_gain stays within [1/100, 100]


def _rms(square_sum: Tensor, counts: Tensor) -> Tensor:
    """Root mean square per segment from its sum of squares (zero-size segments stay finite)."""
    return torch.sqrt(square_sum / counts.to(square_sum.dtype).clamp_min(1) + 1e-16)


def relative_step_cap_factor(log_scale: Tensor, step_square_sum: Tensor, counts: Tensor) -> Tensor:
    """``(S,)`` factor ``1 / sqrt(1 + (r / cap)**2)`` of each tensor's step (``relative_step_cap``).

    ``step_square_sum``: the sum of squares of a per-tensor step ``s``; the step the tensor
    takes is ``s * exp(log_scale_rest)`` and ``log_scale = log(lr / (RMS(params) * cap))``
    plus that ``log_scale_rest``, so ``log(r / cap) = log_scale + log RMS(s)``.
    """
    mean_square = step_square_sum / counts.to(step_square_sum.dtype).clamp_min(1)
    excess = log_scale.to(mean_square.dtype) + 0.5 * torch.log(mean_square.clamp_min(1e-30))
    # log of the factor is -softplus(2 * excess) / 2: finite for any excess.
    return torch.exp(-0.5 * F.softplus(2.0 * excess))


class HierarchicalRNN(UpdateRule):
    """Hierarchical RNN update rule (Wichrowska et al. 2017).

    Args:
        param_hidden: units of the per-coordinate GRU (paper: 10).
        tensor_hidden: units of the per-tensor GRU (paper: 20).
        global_hidden: units of the global GRU (paper: 20).
        timescales: gradient-average time scales; scale ``i`` uses decay ``1 - 0.5**(i+1)``.
        init_lr: initial learning rate of every coordinate (``exp`` of the learned initial log lr).
        lr_change_scale: multiplies the GRU's log-learning-rate change per step.
        min_lr: lower bound of each coordinate's learning rate.
        max_lr: upper bound of each coordinate's learning rate.
        agreement_feature: add a feature to the paper's: the agreement of the gradient with the
            longest time scale's momentum before this step, ``g * m / v`` clipped to [-1, 1]
            (positive while they point the same way, negative after an overshoot, zero on
            average under pure gradient noise), a direct signal for the learning rate. Off
            by default (the paper's features); the fused kernels compute it too.
        lr_leak: pull of each log learning rate back towards the learned initial one per step,
            ``log_lr += lr_change_scale * change - lr_leak * (log_lr - log_lr0)``. 0 (default)
            is the paper's free integrator, where a small average decrease of the log learning
            rate adds up over thousands of steps; with a leak, a sustained change still moves the
            learning rate as far as it likes, but a small bias moves it only by
            ``lr_change_scale * bias / lr_leak``.
        step_size_feature: give every tensor's parameter GRU one more input: the size of the
            step the tensor is about to take against the size of its parameters,
            ``log(r / (1 + r))`` with ``r = lr * exp(mean log learning rate) / RMS(params)``,
            ``lr`` being the optimizer's multiplier (LARS / Adafactor's relative step size, as
            a signal). With it a rule can see an oversized ``lr`` before the first step
            overshoots, which the gradient features only show after the damage. Off by default;
            its weights start at zero, so turning it on keeps what a trained rule computes.
        step_gain: multiply each tensor's step by a gain read out from the tensor level, so
            the rule can resize a tensor's step at once instead of over many steps of its log
            learning rates: ``log gain = L * tanh(w . [tensor state, log r] / L)`` with
            ``r`` as for ``step_size_feature`` (``log r`` clipped to [-10, 10]) and ``L = log(100)``.
            Off by default; its weights start at zero (gain 1), so turning it on keeps what a
            trained rule computes.
        relative_step_cap: a soft trust region on each tensor's step: the step is multiplied by
            ``1 / sqrt(1 + (r / relative_step_cap)**2)``, ``r = RMS(lr * step) / RMS(params)``
            the tensor's relative step this iteration (the parameters' RMS floored at 1e-3), so
            a tensor whose step would be larger than ``relative_step_cap`` times its parameters'
            RMS takes about that much instead (Adafactor's update clipping, applied smoothly).
            Steps well inside the cap are left alone. It catches an oversized ``lr`` at the
            first step, before the gradient features could show it. A setting, not a weight:
            0 (default) turns it off.
        step_on_zero_grad: also move a coordinate whose gradient is exactly zero this step.
            Off (the default), such a coordinate keeps its value for the step (weight decay
            aside) while its state advances, as with a sparse gradient; it still counts in its
            tensor's sums. On, it moves in the direction the network gives a zero gradient,
            scaled up by the per-tensor normalisation: a coordinate whose gradient stays zero
            keeps drifting (docs/optimizer.md).
    """

    rule_type = "HierarchicalRNN"
    needs_segments = True
    forward_reads_global_state = False  # the global GRU biases the tensor GRU, in finalize
    added_config_keys = frozenset(
        {"agreement_feature", "lr_leak", "step_size_feature", "step_gain", "relative_step_cap", "step_on_zero_grad"}
    )
    # Rules saved before step_on_zero_grad existed moved on zero gradients.
    legacy_config_values: ClassVar[dict[str, Any]] = {"step_on_zero_grad": True}

    def __init__(
        self,
        param_hidden: int = 10,
        tensor_hidden: int = 20,
        global_hidden: int = 20,
        timescales: int = 4,
        init_lr: float = 1e-3,
        lr_change_scale: float = 0.1,
        min_lr: float = 1e-8,
        max_lr: float = 10.0,
        agreement_feature: bool = False,
        lr_leak: float = 0.0,
        step_size_feature: bool = False,
        step_gain: bool = False,
        relative_step_cap: float = 0.0,
        step_on_zero_grad: bool = False,
    ) -> None:
        super().__init__()
        # Checked strictly: these come from config.json files too.
        self.config = {
            "param_hidden": config_int("param_hidden", param_hidden, maximum=MAX_CONFIG_WIDTH),
            "tensor_hidden": config_int("tensor_hidden", tensor_hidden, maximum=MAX_CONFIG_WIDTH),
            "global_hidden": config_int("global_hidden", global_hidden, maximum=MAX_CONFIG_WIDTH),
            "timescales": config_int("timescales", timescales, maximum=MAX_CONFIG_DEPTH),
            "init_lr": config_float("init_lr", init_lr, positive=True),
            "lr_change_scale": config_float("lr_change_scale", lr_change_scale),
            "min_lr": config_float("min_lr", min_lr, positive=True),
            "max_lr": config_float("max_lr", max_lr, positive=True),
            "agreement_feature": config_bool("agreement_feature", agreement_feature),
            "lr_leak": config_float("lr_leak", lr_leak),
            "step_size_feature": config_bool("step_size_feature", step_size_feature),
            "step_gain": config_bool("step_gain", step_gain),
            "relative_step_cap": config_float("relative_step_cap", relative_step_cap),
            "step_on_zero_grad": config_bool("step_on_zero_grad", step_on_zero_grad),
        }
        # From here on the checked values (plain ints and floats, whatever type was passed in).
        c = self.config
        min_lr, init_lr, max_lr = c["min_lr"], c["init_lr"], c["max_lr"]
        if not 0.0 <= c["lr_leak"] < 1.0:
            raise ValueError(f"lr_leak must be in [0, 1), got {lr_leak}")
        if c["relative_step_cap"] < 0.0:
            raise ValueError(f"relative_step_cap must be >= 0 (0 turns it off), got {relative_step_cap}")
        if not min_lr <= init_lr <= max_lr:
            raise ValueError(f"need 0 < min_lr <= init_lr <= max_lr, got {min_lr}, {init_lr}, {max_lr}")
        if max_lr > MAX_LR:
            raise ValueError(
                f"max_lr must be at most {MAX_LR:g} (the rule computes exp(log lr) in float32), got {max_lr}"
            )
        self.agreement_feature = c["agreement_feature"]
        self.step_size_feature = c["step_size_feature"]
        self.step_gain = c["step_gain"]
        self.step_on_zero_grad = c["step_on_zero_grad"]
        self.relative_step_cap = c["relative_step_cap"]
        p, t, g, k = c["param_hidden"], c["tensor_hidden"], c["global_hidden"], c["timescales"]
        self.p, self.t, self.g, self.k = p, t, g, k
        self.lr_change_scale = c["lr_change_scale"]
        self.lr_leak = c["lr_leak"]
        self.log_min_lr, self.log_max_lr = math.log(min_lr), math.log(max_lr)
        self.register_buffer("decays", torch.tensor([1.0 - 0.5 ** (i + 1) for i in range(k)]), persistent=False)
        n_features = 2 * k + 1 + int(self.agreement_feature)
        self.param_in = nn.Linear(n_features, 3 * p)
        self.param_hh = nn.Linear(p, 3 * p)
        self.param_out = nn.Linear(p, 2)  # direction, change of log lr
        self.direct = nn.Linear(n_features, 1, bias=False)  # features -> direction skip path
        self.tensor_in = nn.Linear(p, 3 * t)
        self.tensor_hh = nn.Linear(t, 3 * t)
        self.tensor_to_param = nn.Linear(t, 3 * p, bias=False)
        self.global_in = nn.Linear(t, 3 * g)
        self.global_hh = nn.Linear(g, 3 * g)
        self.global_to_tensor = nn.Linear(g, 3 * t, bias=False)
        if self.step_size_feature:
            # Per tensor, so it enters the parameter GRU's gates beside the tensor level's bias.
            self.step_size_in = nn.Linear(1, 3 * p, bias=False)
        if self.step_gain:
            self.gain_out = nn.Linear(t + 1, 1)  # [tensor state, log relative step] -> log gain
        self.param_h0 = nn.Parameter(torch.zeros(p))
        self.tensor_h0 = nn.Parameter(torch.zeros(t))
        self.global_h0 = nn.Parameter(torch.zeros(g))
        self.log_lr0 = nn.Parameter(torch.tensor(math.log(init_lr)))
        with torch.no_grad():
            for layer in (self.param_out, self.tensor_to_param, self.global_to_tensor):
                layer.weight.mul_(0.1)
            self.param_out.bias.zero_()
            # Start as normalised momentum at the longest time scale: m_K / rms_K.
            self.direct.weight.zero_()
            self.direct.weight[0, k - 1] = -1.0
            if self.step_size_feature:
                self.step_size_in.weight.zero_()
            if self.step_gain:
                self.gain_out.weight.zero_()
                self.gain_out.bias.zero_()

    @property
    def needs_step_scales(self) -> bool:
        """Whether a step reads each tensor's ``log(lr / RMS(params))`` (``StepContext.step_scales``):
        with ``step_size_feature``, ``step_gain`` or a ``relative_step_cap``."""
        return self.step_size_feature or self.step_gain or self.relative_step_cap > 0.0

    @staticmethod
    def _require_step_scales(step_scales: Tensor | None, options: str) -> Tensor:
        if step_scales is None:
            raise ValueError(
                f"HierarchicalRNN with {options} needs each tensor's step scale "
                "(StepContext.step_scales, from learned_optim.rules.base.step_scales(params, lr))"
            )
        return step_scales

    def _log_relative_step(self, segment_state: RuleState, step_scales: Tensor | None) -> Tensor:
        """``(S, 1)`` ``log r``, ``r = lr * exp(mean log lr) / RMS(params)`` of each tensor."""
        step_scales = self._require_step_scales(step_scales, "step_size_feature or step_gain")
        dtype = self.param_in.weight.dtype
        return step_scales.to(dtype).reshape(-1, 1) + segment_state["mean_log_lr"].to(dtype)

    def segment_gain(self, segment_state: RuleState, step_scales: Tensor | None = None) -> Tensor | None:
        """``(S,)`` factor on each tensor's step from ``step_gain`` (None without it)."""
        if not self.step_gain:
            return None
        dtype = self.param_in.weight.dtype
        log_ratio = self._log_relative_step(segment_state, step_scales)
        features = torch.cat([segment_state["h"].to(dtype), log_ratio.clamp(-10.0, 10.0)], dim=-1)
        raw = self.gain_out(features).squeeze(-1)
        return torch.exp(_GAIN_LIMIT * torch.tanh(raw / _GAIN_LIMIT))

    def cap_log_scale(self, step_scales: Tensor | None) -> Tensor | None:
        """``(S,)`` float64 ``log(lr / (RMS(params) * relative_step_cap))`` of each tensor (None
        without a cap): what :func:`relative_step_cap_factor` adds to the log RMS of a step."""
        if self.relative_step_cap <= 0.0:
            return None
        step_scales = self._require_step_scales(step_scales, "relative_step_cap")
        return step_scales.to(torch.float64).reshape(-1) - math.log(self.relative_step_cap)

    def tensor_gates(self, segment_state: RuleState, step_scales: Tensor | None = None) -> Tensor:
        """``(S, 3 * param_hidden)``: what each tensor adds to its coordinates' GRU input gates
        (the tensor level's bias and, with ``step_size_feature``, the relative step size)."""
        dtype = self.param_in.weight.dtype
        gates = self.tensor_to_param(segment_state["h"].to(dtype))
        if not self.step_size_feature:
            return gates
        log_ratio = self._log_relative_step(segment_state, step_scales)
        # log(r / (1 + r)): about 0 for a step that dwarfs the parameters, log r for a small one.
        feature = -F.softplus(-log_ratio.clamp(-30.0, 30.0)).clamp_min(-10.0)
        return gates + self.step_size_in(feature)

    def fused_impls(self) -> tuple[str, ...]:
        from learned_optim.rules import hrnn_cpu
        from learned_optim.rules.lstm_triton import triton_available

        if any(getattr(type(self), name) is not getattr(HierarchicalRNN, name) for name in ("forward", "finalize")):
            return ()  # a subclass that changes the math must not get this class's kernels
        impls = ("triton",) if triton_available() else ()
        if hrnn_cpu.supports(self) and hrnn_cpu.hrnn_kernel_available():
            impls += ("cpu",)
        return impls

    def fused_step(
        self,
        impl: str,
        grad: Tensor,
        state: RuleState,
        update: Tensor,
        keep: Tensor | None = None,
        segment_ids: Tensor | None = None,
        context: StepContext | None = None,
    ) -> None:
        from learned_optim.rules.hrnn_cpu import hrnn_step_cpu
        from learned_optim.rules.hrnn_triton import hrnn_step_triton, pack_hrnn_weights

        if impl not in ("cpu", "triton"):
            raise NotImplementedError(f"HierarchicalRNN has no fused kernel {impl!r}; it has {self.fused_impls()}")
        if context is None or segment_ids is None or context.segment_state is None:
            raise ValueError("HierarchicalRNN.fused_step needs segment_ids and a context with the tensors' state")
        counts = context.segment_counts
        if counts is None:
            counts = torch.bincount(segment_ids.long(), minlength=context.num_segments)
        # Read before the kernel, which may write the update over the gradient.
        zero_grad = None if self.step_on_zero_grad else grad == 0
        if impl == "cpu":
            context.segment_sums = hrnn_step_cpu(
                self, grad, state, update, segment_ids, counts, context.segment_state, keep, context.step_scales
            )
        else:
            if torch.compiler.is_compiling():
                packed = pack_hrnn_weights(self)
            else:
                # Packed once and reused until the weights change (their version counters move).
                packed = self._packed = pack_hrnn_weights(self, getattr(self, "_packed", None))
            context.segment_sums = hrnn_step_triton(
                self, packed, grad, state, update, segment_ids, counts, context.segment_state, keep, context.step_scales
            )
        update.masked_fill_(state["v"][:, -1] == 0, 0.0)  # never a nonzero gradient: no step (as forward)
        if zero_grad is not None:
            update.masked_fill_(zero_grad, 0.0)

    def state_spec(self) -> dict[str, tuple[int, ...]]:
        return {"h": (self.p,), "m": (self.k,), "v": (self.k,), "log_lr": (1,)}

    def segment_state_spec(self) -> dict[str, tuple[int, ...]]:
        return {"h": (self.t,), "mean_log_lr": (1,)}

    def global_state_spec(self) -> dict[str, tuple[int, ...]]:
        return {"h": (self.g,)}

    def init_state(
        self, n: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
    ) -> RuleState:
        state = super().init_state(n, device, dtype)
        state["h"] = self.param_h0.to(device=device, dtype=dtype).expand(n, self.p).clone()
        state["log_lr"] = self.log_lr0.to(device=device, dtype=dtype).expand(n, 1).clone()
        return state

    def init_segment_state(
        self, num_segments: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
    ) -> RuleState:
        return {
            "h": self.tensor_h0.to(device=device, dtype=dtype).expand(num_segments, self.t).clone(),
            "mean_log_lr": self.log_lr0.to(device=device, dtype=dtype).expand(num_segments, 1).clone(),
        }

    def init_global_state(
        self, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
    ) -> RuleState:
        return {"h": self.global_h0.to(device=device, dtype=dtype).clone()}

    def forward(self, grad: Tensor, state: RuleState, context: StepContext | None = None) -> tuple[Tensor, RuleState]:
        dtype = self.param_in.weight.dtype
        n = grad.shape[0]
        if context is None or context.segment_ids is None:
            # A lone batch without layout is one tensor with fresh tensor/global state.
            context = StepContext(
                torch.zeros(n, dtype=torch.int64, device=grad.device), 1, self.init_segment_state(1, grad.device)
            )
        ids, num = context.segment_ids, context.num_segments
        segment_state = context.segment_state or self.init_segment_state(num, grad.device)
        g = grad.to(dtype).clamp(-GRAD_LIMIT, GRAD_LIMIT).unsqueeze(-1)
        decays = self.decays.to(dtype)
        m = decays * state["m"].to(dtype) + (1 - decays) * g
        v = decays * state["v"].to(dtype) + (1 - decays) * g * g
        log_rms = 0.5 * torch.log(v + _EPS)
        scaled_m = m * torch.exp(-log_rms)
        relative_log_rms = log_rms - log_rms.mean(-1, keepdim=True)
        log_lr = state["log_lr"].to(dtype)
        relative_log_lr = log_lr - segment_state["mean_log_lr"].to(dtype)[ids]
        parts = [scaled_m, relative_log_rms.clamp(-10, 10) / 10, relative_log_lr]
        if self.agreement_feature:
            # (g / rms) * (m_before / rms) at the longest time scale.
            m_before = state["m"][:, -1:].to(dtype)
            parts.append((g * m_before * torch.exp(-2 * log_rms[:, -1:])).clamp(-1, 1))
        features = torch.cat(parts, dim=-1)

        tensor_gates = self.tensor_gates(segment_state, context.step_scales) + self.param_in.bias
        if torch.is_grad_enabled():
            x_gates = torch.addmm(tensor_gates[ids], features, self.param_in.weight.t())
        else:  # the same, added into the gathered biases in place (a step's largest temporary)
            x_gates = tensor_gates[ids].addmm_(features, self.param_in.weight.t())
        h = gru_cell(x_gates, state["h"].to(dtype), self.param_hh.weight, self.param_hh.bias)
        out = self.param_out(h)
        direction = out[:, 0] + self.direct(features).squeeze(-1)
        if self.lr_leak:
            log_lr = log_lr - self.lr_leak * (log_lr - self.log_lr0.to(dtype))
        log_lr = (log_lr + self.lr_change_scale * out[:, 1:2]).clamp(self.log_min_lr, self.log_max_lr)
        # Unit RMS per tensor: the step size lives in the learning rate, not the direction.
        # Per segment of this batch; where the eager optimizer path splits a tensor over
        # batches, rescale_split_update makes each piece's update exact for the whole tensor.
        square_sum = segment_sum(direction.unsqueeze(-1) ** 2, ids, num)
        counts = segment_sum(torch.ones_like(direction).unsqueeze(-1), ids, num).squeeze(-1)
        rms64 = _rms(square_sum.squeeze(-1), counts)
        step = torch.exp(log_lr.squeeze(-1)) * direction
        update = step / rms64.to(dtype)[ids]
        gain = self.segment_gain(segment_state, context.step_scales)
        if gain is not None:
            update = update * gain[ids]
        context.segment_sums = {
            "h": segment_sum(h, ids, num),
            "log_lr": segment_sum(log_lr, ids, num),
            "direction_sq": square_sum,
        }
        cap_log_scale = self.cap_log_scale(context.step_scales)
        if cap_log_scale is not None:
            if gain is not None:
                cap_log_scale = cap_log_scale + torch.log(gain.to(torch.float64))
            step_sq = segment_sum(step.unsqueeze(-1) ** 2, ids, num)
            factor = relative_step_cap_factor(cap_log_scale - torch.log(rms64), step_sq.squeeze(-1), counts)
            update = update * factor.to(dtype)[ids]
            # For rescale_split_update: the step's squares, and the log scale weighted by the
            # coordinates so that it too adds up over the pieces of a split tensor.
            context.segment_sums["step_sq"] = step_sq
            context.segment_sums["cap_log_scale"] = (cap_log_scale * counts).unsqueeze(-1)
        # A coordinate that has never had a nonzero gradient (v still 0, as stored) stays put:
        # its direction comes from the network's biases alone, and the per-tensor normalisation
        # would scale it up to a full step. It still counts in the tensor's sums above.
        update = torch.where(v[:, -1].to(state["v"].dtype) == 0, 0.0, update)
        if not self.step_on_zero_grad:
            update = torch.where(grad == 0, 0.0, update)  # no drift where the gradient is zero
        new_state = {
            "h": h.to(state["h"].dtype),
            "m": m.to(state["m"].dtype),
            "v": v.to(state["v"].dtype),
            "log_lr": log_lr.to(state["log_lr"].dtype),
        }
        return update, new_state

    def init_from(self, other: UpdateRule) -> None:
        """As :meth:`UpdateRule.init_from`, with two extensions for later stages:

        - the learning-rate bounds ``min_lr`` and ``max_lr``, the leak ``lr_leak``, the
          ``relative_step_cap`` and ``step_on_zero_grad`` may differ (they shape the step, they
          are not weights), so a stage can continue a rule under other bounds, with a leak or
          with a cap;
        - a rule without the agreement feature, the step-size feature or the step gain extends
          to one with it, the new weights zero, so the rule starts out computing the same.
        """
        if not isinstance(other, HierarchicalRNN):
            super().init_from(other)
            return
        settings = ("min_lr", "max_lr", "lr_leak", "relative_step_cap", "step_on_zero_grad")
        bounds = {key: self.config[key] for key in settings}
        features = ("agreement_feature", "step_size_feature", "step_gain")
        added = [key for key in features if self.config[key] and not other.config[key]]
        if {**other.config, **bounds, **dict.fromkeys(added, True)} != self.config:
            super().init_from(other)  # raises, naming both configs
        state_dict = other.state_dict()
        if "agreement_feature" in added:
            for name in ("param_in.weight", "direct.weight"):
                weight = state_dict[name]
                state_dict[name] = torch.cat([weight, weight.new_zeros(weight.shape[0], 1)], dim=1)
        if "step_size_feature" in added:
            state_dict["step_size_in.weight"] = torch.zeros_like(self.step_size_in.weight)
        if "step_gain" in added:
            state_dict["gain_out.weight"] = torch.zeros_like(self.gain_out.weight)
            state_dict["gain_out.bias"] = torch.zeros_like(self.gain_out.bias)
        self.load_state_dict(state_dict)

    def rescale_split_update(
        self,
        update: Tensor,
        piece_sums: dict[str, Tensor],
        piece_count: int | Tensor,
        tensor_sums: dict[str, Tensor],
        tensor_count: int | Tensor,
    ) -> Tensor:
        # The piece was normalised (and capped) by its own sums; the tensor's are what forward means.
        device = piece_sums["direction_sq"].device
        counts = torch.stack(
            [torch.as_tensor(c, dtype=torch.float64, device=device).reshape(()) for c in (piece_count, tensor_count)]
        )
        direction_sq = torch.stack([piece_sums["direction_sq"], tensor_sums["direction_sq"]]).reshape(2)
        rms = _rms(direction_sq.to(torch.float64), counts)
        factor = rms[0] / rms[1]
        if "step_sq" in piece_sums:
            step_sq = torch.stack([piece_sums["step_sq"], tensor_sums["step_sq"]]).reshape(2).to(torch.float64)
            log_scale = torch.stack([piece_sums["cap_log_scale"], tensor_sums["cap_log_scale"]]).reshape(2)
            caps = relative_step_cap_factor(log_scale.to(torch.float64) / counts - torch.log(rms), step_sq, counts)
            factor = factor * caps[1] / caps[0]
        return update * factor.to(update.dtype)

    def finalize(
        self,
        segment_state: RuleState,
        global_state: RuleState,
        segment_sums: dict[str, Tensor],
        counts: Tensor,
    ) -> tuple[RuleState, RuleState]:
        new_segment, new_global_h = self._advance_levels(
            segment_state, global_state["h"].unsqueeze(0), segment_sums, counts, None, 1
        )
        return new_segment, {"h": new_global_h.squeeze(0).to(global_state["h"].dtype)}

    def finalize_groups(
        self,
        segment_state: RuleState,
        global_state: RuleState,
        segment_sums: dict[str, Tensor],
        counts: Tensor,
        groups: Tensor,
        num_groups: int,
    ) -> tuple[RuleState, RuleState]:
        if type(self).finalize is not HierarchicalRNN.finalize:
            # A subclass with its own finalize: run that one, problem by problem.
            return super().finalize_groups(segment_state, global_state, segment_sums, counts, groups, num_groups)
        new_segment, new_global_h = self._advance_levels(
            segment_state, global_state["h"], segment_sums, counts, groups, num_groups
        )
        return new_segment, {"h": new_global_h.to(global_state["h"].dtype)}

    def _advance_levels(
        self,
        segment_state: RuleState,
        global_h: Tensor,
        segment_sums: dict[str, Tensor],
        counts: Tensor,
        groups: Tensor | None,
        num_groups: int,
    ) -> tuple[RuleState, Tensor]:
        """The tensor and global GRUs' step: ``global_h`` ``(num_groups, global_hidden)``, tensor
        ``i`` in problem ``groups[i]`` (all in one problem when ``groups`` is None)."""
        dtype = self.tensor_in.weight.dtype
        denom = counts.to(dtype).clamp_min(1).unsqueeze(-1)
        mean_param_h = segment_sums["h"].to(dtype) / denom
        tensor_h = segment_state["h"].to(dtype)
        global_h = global_h.to(dtype)
        global_bias = self.global_to_tensor(global_h)
        gates = self.tensor_in(mean_param_h) + (global_bias if groups is None else global_bias[groups])
        new_tensor_h = gru_cell(gates, tensor_h, self.tensor_hh.weight, self.tensor_hh.bias)
        # The global GRU reads the mean over tensors that have coordinates: a zero-size
        # parameter must not shift every other tensor's updates.
        present = (counts > 0).to(dtype).unsqueeze(-1)
        if groups is None:
            mean_tensor_h = (new_tensor_h * present).sum(0, keepdim=True) / present.sum().clamp_min(1)
        else:
            tensors_per_group = present.new_zeros(num_groups, 1).index_add(0, groups, present).clamp_min(1)
            summed = new_tensor_h.new_zeros(num_groups, self.t).index_add(0, groups, new_tensor_h * present)
            mean_tensor_h = summed / tensors_per_group
        new_global_h = gru_cell(self.global_in(mean_tensor_h), global_h, self.global_hh.weight, self.global_hh.bias)
        new_segment = {
            "h": new_tensor_h.to(segment_state["h"].dtype),
            "mean_log_lr": (segment_sums["log_lr"].to(dtype) / denom).to(segment_state["mean_log_lr"].dtype),
        }
        return new_segment, new_global_h
