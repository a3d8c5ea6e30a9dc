"""The LSTM rule's weights laid out for its fused kernels (shared by the C and Triton kernels)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "PackedLSTMWeights",
    "check_agreement",
    "check_state",
    "input_count",
    "pack_lstm_weights",
    "padded_units",
]


def padded_units(n: int) -> int:
    """Units per gate in the packed layout: a power of two >= 16 (what ``tl.dot`` needs)."""
    # tl.dot needs each dimension to be a power of two >= 16.
    return max(16, 1 << (n - 1).bit_length())


def tensor_input_count(rule: torch.nn.Module) -> int:
    """Per-tensor inputs per coordinate: per momentum, one agreement cosine
    (``tensor_agreement``) and one norm ratio (``tensor_norm_ratio``); then the two step-response
    inputs (``tensor_step_response``)."""
    kinds = int(getattr(rule, "tensor_agreement", False)) + int(getattr(rule, "tensor_norm_ratio", False))
    return len(getattr(rule, "momentum_decays", ())) * kinds + 2 * int(getattr(rule, "tensor_step_response", False))


def input_count(rule: torch.nn.Module) -> int:
    """The first layer's inputs per coordinate: the gradient features, the momenta, then the
    per-tensor inputs (:func:`tensor_input_count`).

    The packed layout holds at most ``padded_units(hidden_size)`` of them.
    """
    momenta = len(getattr(rule, "momentum_decays", ()))
    return (2 if rule.preprocess else 1) + momenta + tensor_input_count(rule)


class PackedLSTMWeights:
    """The rule's weights laid out for the kernel (gate-major, zero-padded), plus what detects
    a change: a key of the weights' storage and versions, and on CPU a copy of their values."""

    def __init__(self, wx: Tensor, wh: Tensor, bias: Tensor, out: Tensor, decays: Tensor, key: tuple[Any, ...]) -> None:
        self.wx, self.wh, self.bias, self.out, self.decays, self.key = wx, wh, bias, out, decays, key
        self.source: list[Tensor] | None = None

    def matches(self, rule: torch.nn.Module, key: tuple[Any, ...]) -> bool:
        """Whether these were packed from ``rule``'s current weights.

        Edits through ``.data`` do not move a tensor's version, so on CPU the values are
        compared too (a few microseconds); on GPU that comparison would wait for the device
        every step, so there the key alone decides (rebuild the optimizer after such edits).
        """
        if key != self.key:
            return False
        if self.source is None:
            return True
        return all(torch.equal(old, new) for old, new in zip(self.source, rule.parameters(), strict=True))

    def tensors(self) -> list[Tensor]:
        """What the kernels read, in their argument order."""
        return [self.wx, self.wh, self.bias, self.out, self.decays]


def _weights_key(rule: torch.nn.Module) -> tuple[Any, ...]:
    # Tensor versions change on every in-place update (optimizer steps, load_state_dict).
    return tuple((p.data_ptr(), p._version, p.device) for p in rule.parameters())


def pack_lstm_weights(rule: torch.nn.Module, cached: PackedLSTMWeights | None = None) -> PackedLSTMWeights:
    """Pack ``rule``'s weights for the kernel; returns ``cached`` when they have not changed.

    ``wx[l, q, k, j]`` is the weight from input ``k`` of layer ``l`` to unit ``j`` of gate
    ``q`` (input, forget, output, cell); ``wh`` likewise from the layer's own hidden state.
    ``decays`` holds the rule's momentum decays (empty without momentum inputs), on the
    weights' device so that the kernels read them without a copy from the host.
    """
    if torch.compiler.is_compiling():
        # Traced into the compiled graph (a few tiny ops) instead of a host-side cache check.
        key: tuple[Any, ...] = ()
    else:
        key = _weights_key(rule)
        if cached is not None and cached.matches(rule, key):
            return cached
    hidden, layers = rule.hidden_size, rule.num_layers
    hp = padded_units(hidden)
    first = rule.output.weight
    wx = first.new_zeros(layers, 4, hp, hp, dtype=torch.float32)
    wh = torch.zeros_like(wx)
    bias = first.new_zeros(layers, 4, hp, dtype=torch.float32)
    with torch.no_grad():
        for layer in range(layers):
            weight = rule.weights[layer].detach().float()  # (4H, in + H)
            fan_in = weight.shape[1] - hidden
            gates = weight.view(4, hidden, fan_in + hidden)
            wx[layer, :, :fan_in, :hidden] = gates[:, :, :fan_in].transpose(1, 2)
            wh[layer, :, :hidden, :hidden] = gates[:, :, fan_in:].transpose(1, 2)
            bias[layer, :, :hidden] = rule.biases[layer].detach().float().view(4, hidden)
        out = first.new_zeros(hp + 1, dtype=torch.float32)
        out[:hidden] = rule.output.weight.detach().float().view(-1)
        out[hp] = rule.output.bias.detach().float().view(())  # read by the kernel: no .item() sync
        decays = device_vector(getattr(rule, "momentum_decays", ()), first)
    packed = PackedLSTMWeights(wx.contiguous(), wh.contiguous(), bias.contiguous(), out, decays, key)
    if key and first.device.type == "cpu":
        packed.source = [p.detach().clone() for p in rule.parameters()]
    return packed


def device_vector(values: Sequence[float], like: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """``values`` as a 1-D tensor on ``like``'s device, written by fills: a host-to-device copy
    from pageable memory is refused while a CUDA graph is being captured."""
    vector = like.new_empty(len(values), dtype=dtype)
    for i, value in enumerate(values):
        vector[i].fill_(value)  # a fill kernel; `vector[i] = value` copies a host scalar tensor
    return vector


def check_state(
    rule: torch.nn.Module,
    n: int,
    h: Tensor,
    c: Tensor,
    dtypes: tuple[torch.dtype, ...] = (),
    m: Tensor | None = None,
    v: Tensor | None = None,
) -> None:
    """Raise ValueError unless ``h`` and ``c`` are contiguous ``(n, num_layers, hidden_size)``
    state, and, for a rule with momentum inputs, ``m`` and ``v`` contiguous ``(n, k)`` and
    ``(n,)`` state of ``h``'s dtype."""
    momenta = len(getattr(rule, "momentum_decays", ()))
    expected = {"h": (h, (n, rule.num_layers, rule.hidden_size)), "c": (c, (n, rule.num_layers, rule.hidden_size))}
    if momenta:
        if m is None or v is None:
            raise ValueError(f"a rule with {momenta} momentum inputs needs state 'm' and 'v'")
        expected.update({"m": (m, (n, momenta)), "v": (v, (n,))})
    for name, (t, shape) in expected.items():
        if not t.is_contiguous() or t.shape != shape:
            raise ValueError(f"state {name!r} must be contiguous with shape {shape}, got {tuple(t.shape)}")
        if dtypes and t.dtype not in dtypes:
            raise ValueError(f"state {name!r} must be one of {dtypes}, got {t.dtype}")
        if t.dtype != h.dtype:
            raise ValueError(f"state {name!r} must have the dtype of 'h', {h.dtype}, got {t.dtype}")


def check_agreement(
    rule: torch.nn.Module, n: int, agreement: Tensor | None, segment_ids: Tensor | None
) -> Tensor | None:
    """The ``(num_tensors, k)`` float32 table of a rule's per-tensor inputs (``tensor_agreement``,
    ``tensor_norm_ratio``, ``tensor_step_response``), made contiguous; ``None`` for rules without
    them. Raises ValueError unless the table has one column per per-tensor input (:func:`tensor_input_count`) and
    ``segment_ids`` gives each of the ``n`` coordinates its row (int32)."""
    k = tensor_input_count(rule)
    if k == 0:
        return None
    if agreement is None or agreement.dtype != torch.float32 or agreement.dim() != 2 or agreement.shape[1] != k:
        got = None if agreement is None else (tuple(agreement.shape), agreement.dtype)
        raise ValueError(f"per-tensor inputs need a float32 (num_tensors, {k}) agreement table, got {got}")
    if segment_ids is None or segment_ids.dtype != torch.int32 or segment_ids.shape != (n,):
        raise ValueError("per-tensor inputs need int32 segment_ids, one per coordinate")
    return agreement.contiguous()
