"""The coordinatewise LSTM optimizer of Andrychowicz et al. 2016.

Two stacked LSTM layers are shared by every coordinate; each coordinate keeps its own
hidden and cell state. The input is the (optionally log/sign preprocessed) gradient, the
output a linear read-out of the top layer times ``output_scale``. Optionally the input also
holds gradient averages at several time scales, each divided by the root of a running mean
square (scale-free momenta, as the hierarchical RNN of Wichrowska et al. 2017 gets), and
for each momentum the cosine over the whole tensor between the gradient and that momentum
(a per-tensor cue of whether the steps overshoot, in the spirit of that paper's tensor level)
and the log ratio of the gradient's norm over the tensor to that momentum's (a cue that the
gradient grew after a step, which follows a step that was too large).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
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
    same_config,
)
from learned_optim.rules.lstm_pack import device_vector, input_count, tensor_input_count
from learned_optim.rules.preprocess import log_sign_preprocess
from learned_optim.rules.segments import segment_sum

# The gain's log is this times its linear map: a meta-optimizer step the size that suits the
# LSTM weights then moves the per-tensor gain ten times as far (it starts at 1 and must be able
# to reach e.g. 0.3 within a short meta-training run).
_GAIN_PARAM_SCALE = 10.0

# The momentum step's weights are this times their parameters: the weights that matter are
# about 1e-3, which a meta-optimizer step sized for the LSTM weights reaches within a few
# meta-iterations only through such a factor.
_MOMENTUM_STEP_PARAM_SCALE = 0.3

# Mean squares at or below this feed the momentum inputs without a gradient (see momentum_features).
_TINY_MEAN_SQUARE = 1e-20


def _tanh(x: Tensor) -> Tensor:
    # tanh(x) = 2 sigmoid(2x) - 1: the same function, about 3x faster than torch.tanh on CPU.
    return 2.0 * torch.sigmoid(2.0 * x) - 1.0


def lstm_cell(x_and_h: Tensor, c: Tensor, weight: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
    """One LSTM cell on ``[x, h]`` concatenated: one matmul for the gates, ordered (input, forget, output, cell)."""
    if not torch.is_grad_enabled():  # an optimizer step: no graph to keep
        return _lstm_cell_no_grad(x_and_h, c, weight, bias)
    gates = torch.addmm(bias, x_and_h, weight.t())
    hidden = c.shape[-1]
    ifo = torch.sigmoid(gates[:, : 3 * hidden])
    i, f, o = ifo.chunk(3, dim=-1)
    g = _tanh(gates[:, 3 * hidden :])
    c_new = f * c + i * g
    h_new = o * _tanh(c_new)
    return h_new, c_new


def _lstm_cell_no_grad(x_and_h: Tensor, c: Tensor, weight: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
    """``lstm_cell`` with grad mode off (an optimizer step), in place on its own
    temporaries: about 1.7x faster on CPU. With the cell gate's rows doubled,
    ``tanh(z) = 2 sigmoid(2z) - 1`` lets one sigmoid run over all the gates as one contiguous
    tensor (a sigmoid over a column slice is much slower); doubling is exact in floating point."""
    hidden = c.shape[-1]
    doubled = torch.ones(4 * hidden, 1, dtype=weight.dtype, device=weight.device)
    doubled[3 * hidden :] = 2.0
    gates = torch.addmm(bias * doubled.view(-1), x_and_h, (weight * doubled).t()).sigmoid_()
    i, f, o, g = gates.split(hidden, dim=-1)
    c_new = torch.mul(f, c).addcmul_(i, g.mul_(2.0).sub_(1.0))
    h_new = torch.mul(c_new, 2.0).sigmoid_().mul_(2.0).sub_(1.0).mul_(o)
    return h_new, c_new


MOMENTUM_GRAD_LIMIT = 1e15
"""The momentum inputs and per-tensor statistics read the gradient clipped to this magnitude:
the running mean square of a larger one overflows float32 (|g| above ~1.8e19) and would stay
inf, and per-tensor sums of squares overflow sooner. Those inputs are scale-free, so the clip
changes nothing below it; the log/sign preprocessing still reads the gradient as it is."""

# What the fused kernels compute inside themselves; a subclass that overrides any of these
# steps eagerly (the per-tensor statistics and gains they read are computed by the methods).
_KERNEL_MATH = ("forward", "features", "momentum_features")


class CoordinateLSTM(UpdateRule):
    """Coordinatewise 2-layer LSTM update rule ("learning to learn by gradient descent by
    gradient descent", Andrychowicz et al. 2016).

    Args:
        hidden_size: units per LSTM layer (paper: 20).
        num_layers: stacked LSTM layers (paper: 2).
        preprocess: use the log/sign gradient preprocessing (else the raw gradient
            times ``input_scale`` is the single input).
        preprocess_p: the exponent ``p`` of the preprocessing (paper: 10), in [0.01, 80].
        input_scale: multiplies the raw gradient when ``preprocess`` is off.
        output_scale: multiplies the linear read-out (paper: 0.1).
        momentum_decays: decay rates in [0, 1) of extra inputs (default none, the paper's
            rule): for each, an exponential average of the gradient divided by the root of
            a running mean square of it (decay ``rms_decay``). Both averages start at the
            first nonzero gradient a coordinate sees. Adds ``len(momentum_decays) + 1`` floats of
            state per coordinate. The fused kernels compute them too, up to
            ``padded_units(hidden_size)`` first-layer inputs in all (32 for 20 units: up to 30
            momenta beside the two gradient features).
        rms_decay: decay in [0, 1) of the running mean square that scales the momenta.
        tensor_agreement: with ``momentum_decays``, one more input per momentum: the cosine,
            over all coordinates of the coordinate's tensor, between the gradient and that
            momentum before this step. Negative when successive gradients point against each
            other (steps that overshoot), positive while the tensor keeps descending one way.
            It is the same for every coordinate of a tensor, so the rule can tell networks
            that need different step sizes apart, which per-coordinate scale-free inputs
            cannot. Each tensor's sums are taken over all of it (the optimizer adds them up
            over the batches of a tensor it splits). Both fused kernels read these inputs.
        tensor_norm_ratio: with ``momentum_decays``, one more input per momentum (after the
            agreement inputs, if any): ``log(||g|| / ||m||)`` over the coordinate's tensor, the
            gradient's norm against that momentum's before this step, clipped to [-5, 5] (0
            before the first step). A gradient that grew after a step (the step overshot)
            reads high at once, while the cosines need several noisy steps to say so. Summed
            over whole tensors like the agreement inputs; both fused kernels read it.
        tensor_step_response: two more per-tensor inputs (after the others) from how much of
            the gradient along the tensor's last update ``u`` is left after it,
            ``r = (g_t . u) / (g_{t-1} . u)`` over the tensor: ``clip(r, -1, 1)`` and the
            overshoot past -1, ``clip(-1 - r, 0, 4)`` (both 0 before the second step). On a
            quadratic, ``r`` = 1 means the step was far too short, 0 that it reached the minimum
            along its direction, -1 that it went twice too far (the loss along it did not
            drop), and below -1 that it raised the loss: the second input is nonzero only for
            such steps. It reads an overshoot from the second step on (where the agreement
            cosines stay small and noisy). Adds two floats of state per coordinate (the last
            update and its product with the gradient); both fused kernels read it.
        tensor_step_gain: with per-tensor inputs, scale every update of a tensor by
            ``exp(4 tanh(10 (a . t + b) / 4))`` (so within [e^-4, e^4]), ``t`` that tensor's
            per-tensor inputs and ``a``, ``b`` learned (zero at the start: a gain of 1). It lets meta-training
            set a step size per tensor from the per-tensor cues directly, rather than through
            the LSTM's per-coordinate state.
        momentum_step: with ``tensor_norm_ratio`` or ``tensor_agreement``, add
            ``sum_k w_k m_k / RMS(m_k)`` to every update (before the step gain), ``m_k`` the
            coordinate's momenta after this step, ``RMS`` over its tensor and ``w`` learned (zero
            at the start). A momentum-SGD direction normalised per tensor, not per coordinate:
            it keeps the relative sizes of a tensor's gradients, which the LSTM's bounded,
            per-coordinate scale-free output does not, and it needs no ``lr`` tuning to be in
            scale. Adds no state (the RMS comes from the per-tensor sums the other inputs take).
        step_on_zero_grad: also move a coordinate whose gradient is exactly zero this step.
            Off (the default), such a coordinate keeps its value for the step (weight decay
            aside) while its state advances, as with a sparse gradient. On, it moves by what the
            network outputs for a zero input: for a rule meta-trained where zero gradients are
            rare that is a bias, the same small step every time, so a coordinate whose gradient
            stays zero (a dense embedding's unused rows, a layer whose gradients are zeroed)
            drifts without bound (docs/optimizer.md).
    """

    rule_type = "CoordinateLSTM"
    # Its per-chunk temporaries shrink 4x (the gates: 5 MB instead of 21 MB): on 2 CPU cores a 1M
    # parameter step takes 230-250 ms against 320-440 ms with 2**16 (docs/performance.md).
    eager_cpu_chunk_size = 1 << 14
    # Options added after rules were shipped: their configs load with the defaults.
    added_config_keys = frozenset(
        {
            "momentum_decays",
            "rms_decay",
            "tensor_agreement",
            "tensor_norm_ratio",
            "tensor_step_gain",
            "tensor_step_response",
            "momentum_step",
            "step_on_zero_grad",
        }
    )
    # Rules saved before step_on_zero_grad existed moved on zero gradients.
    legacy_config_values: ClassVar[dict[str, Any]] = {"step_on_zero_grad": True}
    # No global state: several problems can step in one call (meta_fit).
    forward_reads_global_state = False

    def __init__(
        self,
        hidden_size: int = 20,
        num_layers: int = 2,
        preprocess: bool = True,
        preprocess_p: float = 10.0,
        input_scale: float = 1.0,
        output_scale: float = 0.1,
        momentum_decays: tuple[float, ...] | list[float] = (),
        rms_decay: float = 0.99,
        tensor_agreement: bool = False,
        tensor_norm_ratio: bool = False,
        tensor_step_gain: bool = False,
        tensor_step_response: bool = False,
        momentum_step: bool = False,
        step_on_zero_grad: bool = False,
    ) -> None:
        super().__init__()
        # Checked strictly: these come from config.json files too (a "false" string, a NaN
        # scale or a fractional size must fail at load time, not corrupt a training run).
        self.config = {
            "hidden_size": config_int("hidden_size", hidden_size, maximum=MAX_CONFIG_WIDTH),
            "num_layers": config_int("num_layers", num_layers, maximum=MAX_CONFIG_DEPTH),
            "preprocess": config_bool("preprocess", preprocess),
            "preprocess_p": config_float("preprocess_p", preprocess_p, positive=True),
            "input_scale": config_float("input_scale", input_scale),
            "output_scale": config_float("output_scale", output_scale),
            "momentum_decays": _decays("momentum_decays", momentum_decays),
            "rms_decay": _decay("rms_decay", rms_decay),
            "tensor_agreement": config_bool("tensor_agreement", tensor_agreement),
            "tensor_norm_ratio": config_bool("tensor_norm_ratio", tensor_norm_ratio),
            "tensor_step_gain": config_bool("tensor_step_gain", tensor_step_gain),
            "tensor_step_response": config_bool("tensor_step_response", tensor_step_response),
            "momentum_step": config_bool("momentum_step", momentum_step),
            "step_on_zero_grad": config_bool("step_on_zero_grad", step_on_zero_grad),
        }
        if not PREPROCESS_P_RANGE[0] <= self.config["preprocess_p"] <= PREPROCESS_P_RANGE[1]:
            # exp(p) and exp(-p) must stay normal float32 numbers (paper: p = 10).
            raise ValueError(
                f"preprocess_p must be in [{PREPROCESS_P_RANGE[0]:g}, {PREPROCESS_P_RANGE[1]:g}] (the "
                f"preprocessing computes exp(p) and exp(-p) in float32), got {preprocess_p!r}"
            )
        for flag in ("tensor_agreement", "tensor_norm_ratio"):
            if self.config[flag] and not self.config["momentum_decays"]:
                raise ValueError(f"{flag} needs momentum_decays (it compares the gradient with each momentum)")
        per_tensor_inputs = (
            self.config["tensor_agreement"] or self.config["tensor_norm_ratio"] or self.config["tensor_step_response"]
        )
        if self.config["tensor_step_gain"] and not per_tensor_inputs:
            raise ValueError(
                "tensor_step_gain needs per-tensor inputs: tensor_agreement, tensor_norm_ratio or tensor_step_response"
            )
        if self.config["momentum_step"] and not (self.config["tensor_agreement"] or self.config["tensor_norm_ratio"]):
            raise ValueError(
                "momentum_step needs tensor_norm_ratio or tensor_agreement (it reads their per-tensor momentum sums)"
            )
        self.hidden_size = self.config["hidden_size"]
        self.num_layers = self.config["num_layers"]
        self.preprocess = self.config["preprocess"]
        self.preprocess_p = self.config["preprocess_p"]
        self.input_scale = self.config["input_scale"]
        self.output_scale = self.config["output_scale"]
        self.momentum_decays = self.config["momentum_decays"]
        self.rms_decay = self.config["rms_decay"]
        self.tensor_agreement = self.config["tensor_agreement"]
        self.tensor_norm_ratio = self.config["tensor_norm_ratio"]
        self.tensor_step_gain = self.config["tensor_step_gain"]
        self.tensor_step_response = self.config["tensor_step_response"]
        self.momentum_step = self.config["momentum_step"]
        self.step_on_zero_grad = self.config["step_on_zero_grad"]
        input_size = input_count(self)
        h = self.hidden_size
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for layer in range(self.num_layers):
            fan_in = (input_size if layer == 0 else h) + h
            bound = 1.0 / math.sqrt(h)
            w = torch.empty(4 * h, fan_in).uniform_(-bound, bound)
            b = torch.zeros(4 * h)
            b[h : 2 * h] = 1.0  # forget-gate bias 1: state persists from the start
            self.weights.append(nn.Parameter(w))
            self.biases.append(nn.Parameter(b))
        self.output = nn.Linear(h, 1)
        with torch.no_grad():
            self.output.weight.uniform_(-0.01, 0.01)
            self.output.bias.zero_()
        if self.tensor_step_gain:
            self.gain = nn.Linear(tensor_input_count(self), 1)
            with torch.no_grad():
                self.gain.weight.zero_()
                self.gain.bias.zero_()
        if self.momentum_step:
            self.momentum_step_weight = nn.Parameter(torch.zeros(len(self.momentum_decays)))

    def fused_impls(self) -> tuple[str, ...]:
        from learned_optim.rules import lstm_cpu
        from learned_optim.rules.lstm_pack import padded_units
        from learned_optim.rules.lstm_triton import triton_available

        if any(getattr(type(self), name) is not getattr(CoordinateLSTM, name) for name in _KERNEL_MATH):
            return ()  # a subclass that changes the math must not get this class's kernels
        if input_count(self) > padded_units(self.hidden_size):
            return ()  # the packed layout has room for at most that many first-layer inputs

        impls = ("triton",) if triton_available() else ()
        if lstm_cpu.supports(self) and lstm_cpu.cpu_kernel_available():
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
        from learned_optim.rules.lstm_cpu import lstm_step_cpu
        from learned_optim.rules.lstm_pack import pack_lstm_weights
        from learned_optim.rules.lstm_triton import lstm_step_triton

        kernels = {"triton": lstm_step_triton, "cpu": lstm_step_cpu}
        if impl not in kernels:
            raise NotImplementedError(f"CoordinateLSTM has no fused kernel {impl!r}; it has {self.fused_impls()}")
        if torch.compiler.is_compiling():
            packed = pack_lstm_weights(self)
        else:
            # Packed once and reused until the weights change (their version counters move).
            packed = self._packed = pack_lstm_weights(self, getattr(self, "_packed", None))
        table = None
        # The caller may hand one buffer as both grad and update: keep the gradient for after the kernel.
        aliased = self.tensor_step_response and update.data_ptr() == grad.data_ptr()
        grad_seen = grad.clone() if aliased else grad
        # Read before the kernel, which may write the update over the gradient.
        zero_grad = None if self.step_on_zero_grad else grad == 0
        if self.needs_segments:
            if segment_ids is None or context is None:
                raise ValueError("CoordinateLSTM with per-tensor inputs: fused_step needs segment_ids and a context")
            # Read before the kernel moves the momenta.
            sums = self._statistics_or_given(grad, state, segment_ids, context.num_segments, context)
            table = self.tensor_inputs(sums).float()
        kernels[impl](
            self,
            packed,
            grad,
            state["h"],
            state["c"],
            update,
            keep,
            segment_ids,
            m=state.get("m"),
            v=state.get("v"),
            **({"agreement": table} if table is not None else {}),
        )
        if self.momentum_step:
            # Outside the kernel: it reads the momenta the kernel has just written.
            weights = self.momentum_step_weights(sums).float()
            if keep is not None:
                weights = weights * (keep != 0).unsqueeze(-1)  # a skipped tensor's update stays zero
            momenta = state["m"]
            for j in range(momenta.shape[-1]):  # one momentum at a time: one coordinate-sized temporary
                update.addcmul_(weights[:, j][segment_ids], momenta[:, j].float())
        if self.tensor_step_gain:
            update.mul_(self.step_gains(table).to(update.dtype)[segment_ids])
        if self.momentum_decays:
            update.masked_fill_(state["v"] == 0, 0.0)  # never a nonzero gradient: no step (as forward)
        if zero_grad is not None:
            update.masked_fill_(zero_grad, 0.0)
        if self.tensor_step_response:
            # Outside the kernel: the last update and its product with the gradient.
            last_update, along = update, grad_seen * update
            if keep is not None:
                stepped = keep[segment_ids.long()] != 0
                last_update = torch.where(stepped, last_update, state["u"].to(update.dtype))
                along = torch.where(stepped, along, state["q"].to(update.dtype))
            state["u"].copy_(last_update)
            state["q"].copy_(along)

    @property
    def needs_segments(self) -> bool:  # type: ignore[override]
        """Whether each batch must come with its tensors' layout (per-tensor inputs)."""
        return self.tensor_agreement or self.tensor_norm_ratio or self.tensor_step_response

    @property
    def _momentum_cues(self) -> bool:
        # The per-tensor inputs that compare the gradient with the momenta.
        return self.tensor_agreement or self.tensor_norm_ratio

    def state_spec(self) -> dict[str, tuple[int, ...]]:
        spec = {"h": (self.num_layers, self.hidden_size), "c": (self.num_layers, self.hidden_size)}
        if self.momentum_decays:
            spec["m"] = (len(self.momentum_decays),)
            spec["v"] = ()
        if self.tensor_step_response:
            spec["u"] = ()  # the last update
            spec["q"] = ()  # the last gradient times the last update
        return spec

    def init_from(self, other: UpdateRule) -> None:
        """Start from ``other``'s weights; also from a rule with fewer momentum inputs or units,
        without the per-tensor inputs, or with another ``step_on_zero_grad``.

        New inputs get zero weights. New hidden units keep this rule's random initial
        weights, but every weight from a new unit into an old unit or the read-out is zero.
        Either way the rule computes exactly what ``other`` did until meta-training teaches it
        to use what was added (the new units already run and get meta-gradients).
        """
        if not isinstance(other, CoordinateLSTM) or other.rule_type != self.rule_type:
            super().init_from(other)
            return
        growable = (
            "momentum_decays",
            "rms_decay",
            "hidden_size",
            "tensor_agreement",
            "tensor_norm_ratio",
            "tensor_step_gain",
            "tensor_step_response",
            "momentum_step",
            "step_on_zero_grad",  # a setting, not a weight: either way
        )
        ours = {k: v for k, v in self.config.items() if k not in growable}
        theirs = {k: v for k, v in other.config.items() if k not in growable}
        kept = list(other.momentum_decays)
        extends = (
            same_config(ours, theirs)
            and list(self.momentum_decays[: len(kept)]) == kept
            and (not kept or self.rms_decay == other.rms_decay)  # rms_decay matters only with momenta
            and other.hidden_size <= self.hidden_size
            and (self.tensor_agreement or not other.tensor_agreement)
            and (self.tensor_norm_ratio or not other.tensor_norm_ratio)
            # The per-tensor inputs follow the momenta, the ratios after the cosines: the old
            # inputs must stay a prefix.
            and (not other.needs_segments or self.momentum_decays == other.momentum_decays)
            and (not other.tensor_norm_ratio or self.tensor_agreement == other.tensor_agreement)
            and (self.tensor_step_response or not other.tensor_step_response)
            and (
                not other.tensor_step_response
                or (self.tensor_agreement, self.tensor_norm_ratio) == (other.tensor_agreement, other.tensor_norm_ratio)
            )
            and (self.tensor_step_gain or not other.tensor_step_gain)
            and (self.momentum_step or not other.momentum_step)
        )
        if not extends:
            super().init_from(other)  # raises, naming both configs
            return
        old_units, new_units = other.hidden_size, self.hidden_size
        old_inputs, new_inputs = input_count(other), input_count(self)
        # Rows of the old units in each of the four gate blocks of the wider layout.
        rows = torch.tensor([gate * new_units + j for gate in range(4) for j in range(old_units)])
        with torch.no_grad():
            for layer in range(self.num_layers):
                below_old, below_new = (old_inputs, new_inputs) if layer == 0 else (old_units, new_units)
                # Columns [inputs from below, own hidden state]: where the old ones sit now.
                cols = torch.cat((torch.arange(below_old), below_new + torch.arange(old_units)))
                weight = self.weights[layer]
                weight[rows] = 0.0
                weight[rows.unsqueeze(1), cols] = other.weights[layer].to(weight.dtype)
                self.biases[layer][rows] = other.biases[layer].to(weight.dtype)
            self.output.weight.zero_()
            self.output.weight[:, :old_units] = other.output.weight
            self.output.bias.copy_(other.output.bias)
            if other.tensor_step_gain:  # its per-tensor inputs are a prefix of ours
                self.gain.weight.zero_()
                self.gain.weight[:, : other.gain.weight.shape[1]] = other.gain.weight
                self.gain.bias.copy_(other.gain.bias)
            if other.momentum_step:  # same momenta (per-tensor inputs need them unchanged)
                self.momentum_step_weight.copy_(other.momentum_step_weight)

    def features(self, grad: Tensor) -> Tensor:
        """The network's input for each coordinate, ``(n, 2)`` or ``(n, 1)``."""
        if self.preprocess:
            return log_sign_preprocess(grad, self.preprocess_p)
        return (grad * self.input_scale).unsqueeze(-1)

    def momentum_features(self, grad: Tensor, state: RuleState) -> tuple[Tensor, Tensor, Tensor]:
        """The scale-free momenta ``(n, k)`` and the new averages ``m`` ``(n, k)`` and ``v`` ``(n,)``."""
        m = state["m"].to(grad.dtype)
        v = state["v"].to(grad.dtype)
        decays = device_vector(self.momentum_decays, grad, grad.dtype)  # no host copy: capturable
        grad = grad.clamp(-MOMENTUM_GRAD_LIMIT, MOMENTUM_GRAD_LIMIT)
        squared = grad * grad
        # v == 0: no gradient seen yet; starting the averages at the gradient avoids zero-start
        # bias without a step counter (which bf16 state could not hold past 256).
        fresh = v == 0
        m_new = torch.where(fresh.unsqueeze(-1), grad.unsqueeze(-1), decays * m + (1 - decays) * grad.unsqueeze(-1))
        v_new = torch.where(fresh, squared, self.rms_decay * v + (1 - self.rms_decay) * squared)
        # 1e-30 keeps 0 / 0 at 0 for coordinates whose gradients are all zero. There m / sqrt(v)
        # is a step from -1 to 1 whose derivative (and rsqrt's, ~1e45) overflows fp32: NaN or
        # inf in second-order meta-gradients. At or below _TINY_MEAN_SQUARE the feature keeps
        # its value and carries no gradient.
        tiny = v_new <= _TINY_MEAN_SQUARE
        safe_v = torch.where(tiny, 1.0, v_new)
        scaled = torch.where(
            tiny.unsqueeze(-1),
            (m_new * torch.rsqrt(v_new + 1e-30).unsqueeze(-1)).detach(),
            m_new * torch.rsqrt(safe_v + 1e-30).unsqueeze(-1),
        )
        return scaled, m_new, v_new

    def tensor_statistics(
        self, grad: Tensor, state: RuleState, segment_ids: Tensor, num_segments: int
    ) -> Tensor | None:
        """With per-tensor inputs: per tensor, the sums of ``grad * m`` ``(k)``, ``grad ** 2``
        and ``m ** 2`` ``(k)`` (momenta ``m`` before the step; with ``tensor_agreement`` or
        ``tensor_norm_ratio``), then the tensor's coordinate count (``momentum_step``), then of
        ``grad * u`` and ``q`` (``tensor_step_response``: the last update ``u`` and the last
        gradient times it)."""
        if not self.needs_segments:
            return None
        grad = grad.clamp(-MOMENTUM_GRAD_LIMIT, MOMENTUM_GRAD_LIMIT)
        parts = []
        if self._momentum_cues:
            m = state["m"].to(grad.dtype)
            g = grad.unsqueeze(-1)
            parts += [g * m, g * g, m * m]
        # Summed part by part: concatenating the products first would copy all of them once more.
        sums = [segment_sum(x, segment_ids, num_segments) for x in parts]
        if self.momentum_step:  # each tensor's coordinate count, for the RMS of its momenta
            # index_add, not bincount: bincount's size depends on the data (a host sync on GPU).
            one = torch.ones((), dtype=sums[0].dtype, device=grad.device).expand(grad.shape[0], 1)
            sums.append(segment_sum(one, segment_ids, num_segments))
        if self.tensor_step_response:
            parts = [(grad * state["u"].to(grad.dtype)).unsqueeze(-1), state["q"].to(grad.dtype).unsqueeze(-1)]
            sums += [segment_sum(x, segment_ids, num_segments) for x in parts]
        return torch.cat(sums, dim=-1)

    def tensor_features(self, grad: Tensor, state: RuleState, context: StepContext | None) -> Tensor:
        """``(n, k)`` per kind of per-tensor input: the row of :meth:`tensor_inputs` of each
        coordinate's tensor (without a layout in ``context``, all of ``grad`` is one tensor).

        For inspection: the steps read the same through :meth:`tensor_statistics` and
        :meth:`tensor_inputs`, which are what a subclass overrides to change these inputs."""
        table, ids, _ = self._tensor_table(grad, state, context)
        return table[ids]

    def _tensor_table(
        self, grad: Tensor, state: RuleState, context: StepContext | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        # The per-tensor inputs (num_tensors, k), each coordinate's tensor index and the sums.
        if context is None or context.segment_ids is None:
            ids, num = torch.zeros(grad.shape[0], dtype=torch.int64, device=grad.device), 1  # one tensor
        else:
            ids, num = context.segment_ids, context.num_segments
        sums = self._statistics_or_given(grad, state, ids, num, context)
        return self.tensor_inputs(sums).to(grad.dtype), ids, sums

    def _statistics_or_given(
        self, grad: Tensor, state: RuleState, ids: Tensor, num: int, context: StepContext | None
    ) -> Tensor:
        # The caller's whole-tensor sums where it has them (split tensors, the fused path), else this batch's.
        if context is not None and context.tensor_statistics is not None:
            return context.tensor_statistics
        return self.tensor_statistics(grad, state, ids, num)

    def step_gains(self, tensor_inputs: Tensor) -> Tensor:
        """With ``tensor_step_gain``: per tensor, the factor on its updates, from its row of
        :meth:`tensor_inputs`; smoothly bounded to [e^-4, e^4]."""
        log_gain = _GAIN_PARAM_SCALE * self.gain(tensor_inputs.to(self.gain.weight.dtype)).squeeze(-1)
        return torch.exp(4.0 * torch.tanh(log_gain / 4.0))

    def momentum_step_weights(self, sums: Tensor) -> Tensor:
        """With ``momentum_step``: per tensor, ``(num_tensors, k)`` ``w_k / RMS(m_k)``, the RMS of
        each momentum after this step over the tensor, from :meth:`tensor_statistics`' sums
        (before the first step the momenta start at the gradient); 0 where that RMS is 0."""
        k = len(self.momentum_decays)
        dot, grad_sq, mom_sq = sums[:, :k], sums[:, k : k + 1], sums[:, k + 1 : 2 * k + 1]
        counts = sums[:, 2 * k + 1 : 2 * k + 2]
        beta = device_vector(self.momentum_decays, sums, sums.dtype)
        # sum of (beta m + (1 - beta) g)^2 over the tensor; a tensor without momenta yet starts them at g
        new_sq = beta * beta * mom_sq + 2 * beta * (1 - beta) * dot + (1 - beta) ** 2 * grad_sq
        new_sq = torch.where(mom_sq > 0, new_sq, grad_sq)
        defined = (new_sq > 1e-60) & (counts > 0)
        inv_rms = torch.where(defined, torch.rsqrt(torch.where(defined, new_sq, 1.0) / counts.clamp_min(1.0)), 0.0)
        weight = _MOMENTUM_STEP_PARAM_SCALE * self.momentum_step_weight.to(sums.dtype)
        return weight * inv_rms

    def tensor_inputs(self, sums: Tensor) -> Tensor:
        """Per tensor, the rule's per-tensor inputs from :meth:`tensor_statistics`' sums: the
        agreement cosines, then the norm ratios, then the step responses, as configured."""
        parts = []
        if self.tensor_agreement:
            parts.append(self.agreement_cosines(sums))
        if self.tensor_norm_ratio:
            parts.append(self.norm_ratios(sums))
        if self.tensor_step_response:
            parts.append(self.step_responses(sums))
        return torch.cat(parts, dim=-1)

    def step_responses(self, sums: Tensor) -> Tensor:
        """Per tensor, ``(num_tensors, 2)``: ``r = (g_t . u) / (g_{t-1} . u)`` from
        :meth:`tensor_statistics`' sums clipped to [-1, 1], and ``-1 - r`` clipped to [0, 4];
        both 0 where the last update did not move along the last gradient (before the second
        step, an all-zero gradient)."""
        ratio = self.step_response_ratios(sums)
        # -1 is where a step along a quadratic stops lowering the loss: the overshoot input starts there.
        return torch.cat((ratio.clamp(-1.0, 1.0), (-1.0 - ratio).clamp(0.0, 4.0)), dim=-1)

    def step_response_ratios(self, sums: Tensor) -> Tensor:
        """Per tensor, the unclipped ``(num_tensors, 1)`` ``(g_t . u) / (g_{t-1} . u)`` from
        :meth:`tensor_statistics`' sums (0 where the last update did not move along the last gradient)."""
        along_now, along_before = sums[:, -2:-1], sums[:, -1:]
        defined = along_before.abs() > 1e-60
        return torch.where(defined, along_now / torch.where(defined, along_before, 1.0), 0.0)

    def agreement_cosines(self, sums: Tensor) -> Tensor:
        """Per tensor, the ``(num_tensors, k)`` cosines from :meth:`tensor_statistics`' sums."""
        k = len(self.momentum_decays)
        dot, grad_sq, mom_sq = sums[:, :k], sums[:, k : k + 1], sums[:, k + 1 : 2 * k + 1]
        product = grad_sq * mom_sq
        # A zero product (first step, an all-zero gradient) reads 0 and carries no gradient.
        defined = product > 1e-60
        cosine = torch.where(defined, dot * torch.rsqrt(torch.where(defined, product, 1.0)), 0.0)
        return cosine.clamp(-1.0, 1.0)

    def norm_ratios(self, sums: Tensor) -> Tensor:
        """Per tensor, the ``(num_tensors, k)`` ``log(||g|| / ||m||)`` from :meth:`tensor_statistics`'
        sums, clipped to [-5, 5]; 0 where either norm is zero (first step, an all-zero gradient)."""
        k = len(self.momentum_decays)
        grad_sq, mom_sq = sums[:, k : k + 1], sums[:, k + 1 : 2 * k + 1]
        defined = (grad_sq > 1e-60) & (mom_sq > 1e-60)
        ratio = torch.where(defined, grad_sq, 1.0) / torch.where(defined, mom_sq, 1.0)
        return torch.where(defined, 0.5 * torch.log(ratio), 0.0).clamp(-5.0, 5.0)

    def forward(self, grad: Tensor, state: RuleState, context: StepContext | None = None) -> tuple[Tensor, RuleState]:
        compute_dtype = self.output.weight.dtype
        x = self.features(grad.to(compute_dtype))
        if self.momentum_decays:
            momenta, m_new, v_new = self.momentum_features(grad.to(compute_dtype), state)
            x = torch.cat((x, momenta), dim=-1)
        if self.needs_segments:
            table, ids, sums = self._tensor_table(grad.to(compute_dtype), state, context)
            x = torch.cat((x, table[ids]), dim=-1)
        h_all = state["h"].to(compute_dtype)
        c_all = state["c"].to(compute_dtype)
        new_h, new_c = [], []
        for layer in range(self.num_layers):
            h, c = lstm_cell(
                torch.cat((x, h_all[:, layer]), dim=-1),
                c_all[:, layer],
                self.weights[layer],
                self.biases[layer],
            )
            new_h.append(h)
            new_c.append(c)
            x = h
        update = self.output(x).squeeze(-1) * self.output_scale
        if self.momentum_step:
            # The momenta as stored (rounded to a bf16 state's dtype), as the fused step reads them.
            stored = m_new.to(state["m"].dtype).to(compute_dtype)
            update = update + (self.momentum_step_weights(sums).to(compute_dtype)[ids] * stored).sum(-1)
        if self.tensor_step_gain:
            update = update * self.step_gains(table)[ids]
        if self.momentum_decays:
            # A coordinate that has never had a nonzero gradient (v still 0, as stored) stays put,
            # as with Adam: unused parameters and embedding padding rows do not drift.
            update = torch.where(v_new.to(state["v"].dtype) == 0, 0.0, update)
        if not self.step_on_zero_grad:
            update = torch.where(grad == 0, 0.0, update)  # no drift where the gradient is zero
        new_state = {
            "h": torch.stack(new_h, dim=1).to(state["h"].dtype),
            "c": torch.stack(new_c, dim=1).to(state["c"].dtype),
        }
        if self.momentum_decays:
            new_state["m"] = m_new.to(state["m"].dtype)
            new_state["v"] = v_new.to(state["v"].dtype)
        if self.tensor_step_response:
            new_state["u"] = update.to(state["u"].dtype)
            new_state["q"] = (grad.to(compute_dtype) * update).to(state["q"].dtype)
        return update, new_state


PREPROCESS_P_RANGE = (0.01, 80.0)


def _decay(name: str, value: object) -> float:
    decay = config_float(name, value)
    if not 0 <= decay < 1:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    return decay


def _decays(name: str, values: object) -> list[float]:
    if isinstance(values, (str, bytes)) or not isinstance(values, (tuple, list)):
        raise ValueError(f"{name} must be a list of decay rates in [0, 1), got {values!r}")
    return [_decay(f"{name}[{i}]", value) for i, value in enumerate(values)]
