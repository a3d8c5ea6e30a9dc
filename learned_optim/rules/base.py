"""The interface every update rule implements.

A rule is an ``nn.Module`` whose ``forward`` is a pure, batched, differentiable map
from the gradients of a flat vector of coordinates (and their per-coordinate state)
to an update and a new state. The same code runs inside ``LearnedOptimizer.step``
under ``no_grad`` and inside ``meta_fit`` with autograd through the rule's weights.
"""

from __future__ import annotations

import inspect
import json
import math
import numbers
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

RuleState = dict[str, Tensor]


@dataclass
class StepContext:
    """What a rule may know about the coordinates of one batch besides their gradients.

    Attributes:
        segment_ids: ``(n,)`` int64 tensor; coordinate ``i`` belongs to tensor
            ``segment_ids[i]`` of this batch. Rules that need per-tensor statistics
            (for instance the hierarchical RNN) reduce over it.
        num_segments: number of distinct tensors in the batch.
        segment_state: per-tensor state of the batch's tensors, each ``(num_segments, ...)``
            (rules with a :meth:`UpdateRule.segment_state_spec`).
        global_state: state shared by all tensors of the optimizer (rules with a
            :meth:`UpdateRule.global_state_spec`).
        segment_sums: filled by the rule: per-segment sums ``(num_segments, k)`` of whatever
            its :meth:`UpdateRule.finalize` needs. The caller adds them up over chunks (a
            tensor may span several) before calling ``finalize`` once per step.
        segment_counts: ``(num_segments,)`` coordinates of each segment in the batch, where
            the caller knows them (fused steps over whole tensors).
        step_scales: ``(num_segments,)`` ``log(lr / RMS of the tensor's parameters)`` of each
            tensor before the step (see :func:`step_scales`), filled by the caller for rules
            whose :attr:`UpdateRule.needs_step_scales` is true: with it a rule can tell how large
            the step it is about to take is against the parameters it moves, ``lr`` included.
        tensor_statistics: ``(num_segments, k)`` sums over *whole* tensors of what the rule's
            :meth:`UpdateRule.tensor_statistics` computes, filled by a caller that has them
            (the eager optimizer path where it splits a tensor over batches, the fused path
            always); the rule then reads these instead of its own batch's sums.
    """

    segment_ids: Tensor | None = None
    num_segments: int = 0
    segment_state: RuleState | None = None
    global_state: RuleState | None = None
    segment_sums: dict[str, Tensor] = field(default_factory=dict)
    segment_counts: Tensor | None = None
    step_scales: Tensor | None = None
    tensor_statistics: Tensor | None = None


_TINY = 1e-30  # stands in for 0 under a log
PARAM_RMS_FLOOR = 1e-3
"""The smallest parameter RMS :func:`step_scales` divides by (Adafactor's epsilon_2): a
zero-initialised tensor (a bias) reads as a small one, so its steps are not judged infinitely
large against it."""


def step_scales(
    params: Sequence[Tensor], lrs: Sequence[float | Tensor] | float | Tensor, log_rms: Tensor | None = None
) -> Tensor:
    """``(len(params),)`` float32 ``log(lr / max(RMS(p), PARAM_RMS_FLOOR))`` of each tensor
    (no autograd, no host sync).

    ``lrs``: one learning rate (multiplier of the rule's update) per tensor, or one for all;
    each a number or a one-element tensor (read on the device, never back to the host).
    An lr of 0 gives a large negative finite value, never ``-inf``; an all-zero tensor reads
    as one of RMS ``PARAM_RMS_FLOOR``. ``log_rms``: the tensors' floored log RMS where the
    caller has it (:func:`floored_log_rms` of sums over a sharded tensor's shards); by
    default it is computed from ``params``.
    """
    if not params:
        raise ValueError("step_scales needs at least one parameter tensor")
    single = isinstance(lrs, (numbers.Real, Tensor))
    lr_list = [lrs] * len(params) if single else list(lrs)
    if len(lr_list) != len(params):
        raise ValueError(f"step_scales: {len(lr_list)} learning rates for {len(params)} tensors")
    device = params[0].device
    with torch.no_grad():
        if log_rms is None:
            norms = torch.stack([n.float() for n in parameter_norms(params)])
            # A complex tensor steps as its real view: twice as many coordinates as elements.
            sizes = [max(p.numel() * (2 if p.is_complex() else 1), 1) for p in params]
            sizes = torch.tensor(sizes, dtype=torch.float32, device=device)
            log_rms = torch.log((norms / sizes.sqrt()).clamp_min(PARAM_RMS_FLOOR))
        if any(isinstance(v, Tensor) for v in lr_list):
            as_tensors = [torch.as_tensor(v, dtype=torch.float64, device=device).reshape(()) for v in lr_list]
            log_lr = torch.stack(as_tensors).clamp_min(_TINY).log().float()
        else:
            log_lr = [math.log(max(float(v), _TINY)) for v in lr_list]
            log_lr = torch.tensor(log_lr, dtype=torch.float32, device=device)
    return log_lr - log_rms


def parameter_norms(params: Sequence[Tensor]) -> list[Tensor]:
    """The 2-norm of each tensor, accumulated in at least float32 (no autograd): a bf16 or fp16
    tensor's norm would otherwise come back rounded to its dtype, 3 significant digits."""
    detached = [p.detach() for p in params]
    norms = list(torch._foreach_norm(detached))
    low = [i for i, p in enumerate(detached) if p.dtype in (torch.bfloat16, torch.float16)]
    if low:
        wide = torch._foreach_norm([detached[i] for i in low], 2, dtype=torch.float32)
        for i, norm in zip(low, wide, strict=True):
            norms[i] = norm
    return norms


def floored_log_rms(square_sums: Tensor, sizes: Tensor) -> Tensor:
    """float32 ``log(max(RMS, PARAM_RMS_FLOOR))`` of tensors from their sums of squares and
    sizes (as :func:`step_scales` computes it from the tensors themselves)."""
    rms = torch.sqrt(square_sums.double() / sizes.double().clamp_min(1))
    return torch.log(rms.clamp_min(PARAM_RMS_FLOOR)).float()


def config_int(name: str, value: Any, minimum: int = 1, maximum: int | None = None) -> int:
    """``value`` as a config integer: an int (not a bool, not a float) of at least ``minimum``
    and, where given, at most ``maximum``.

    Rules bound their sizes: a config.json is read before any tensor is, and a size of 10**12
    would otherwise have the constructor loop or allocate for minutes before failing.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        expected = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"{name} must be an integer {expected}, got {value!r}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be an integer in [{minimum}, {maximum}], got {value!r}")
    return int(value)


MAX_CONFIG_WIDTH = 1 << 16
"""The largest hidden size a bundled rule type accepts (per coordinate: far past any use)."""
MAX_CONFIG_DEPTH = 64
"""The largest number of layers or time scales a bundled rule type accepts."""


_FLOAT32_MAX = torch.finfo(torch.float32).max


def config_float(name: str, value: Any, positive: bool = False) -> float:
    """``value`` as a finite config number (``positive``: also > 0), finite in float32 too: the
    rules compute with these in float32, where 1e39 is inf."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if abs(value) > _FLOAT32_MAX:
        raise ValueError(f"{name} must be within float32's range (|x| <= {_FLOAT32_MAX:.3g}), got {value!r}")
    if positive and not value > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return float(value)


def config_bool(name: str, value: Any) -> bool:
    """``value`` as a config flag: only ``True`` or ``False`` (a string "false" is not False)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")
    return value


def same_config(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two rule configs are equal as ``config.json`` stores them.

    JSON has no tuples: a rule built with ``(1, 2)`` and the same rule loaded from its folder
    (``[1, 2]``) have the same config.
    """
    if a == b:
        return True
    try:
        return json.loads(json.dumps(a, sort_keys=True)) == json.loads(json.dumps(b, sort_keys=True))
    except (TypeError, ValueError):  # not JSON: only == can tell
        return False


def check_state_specs(rule: UpdateRule) -> None:
    """Raise ``ValueError`` naming the hook unless the rule's state specs are well formed.

    Each of ``state_spec()``, ``segment_state_spec()`` and ``global_state_spec()`` must be a
    dict of string names to tuples of sizes. Checked when an optimizer or meta-trainer is
    built: a spec like ``{"m": 2}`` used to fail inside ``torch.zeros`` with no rule named.
    """
    name = type(rule).__name__
    for hook in ("state_spec", "segment_state_spec", "global_state_spec"):
        spec = getattr(rule, hook)()
        if not isinstance(spec, dict):
            raise ValueError(f"{name}.{hook}() must return a dict of name -> shape tuple, got {spec!r}")
        for key, shape in spec.items():
            if not isinstance(key, str):
                raise ValueError(f"{name}.{hook}(): state names must be strings, got {key!r}")
            if hook == "state_spec" and key.startswith("segment."):
                # The optimizer keeps per-tensor state under "rule.segment.<name>": such a name
                # would be read back as per-tensor state.
                raise ValueError(
                    f"{name}.{hook}(): the name {key!r} is reserved (names must not start with 'segment.')"
                )
            if not (
                isinstance(shape, (tuple, list))
                and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
            ):
                raise ValueError(
                    f"{name}.{hook}()[{key!r}] must be a tuple of sizes, got {shape!r} "
                    "(() for one number per coordinate, (k,) for k numbers)"
                )


def check_rule_output(rule: UpdateRule, grad: Tensor, state: RuleState, output: Any) -> tuple[Tensor, RuleState]:
    """``output`` of ``rule(grad, state, ...)`` as ``(update, new_state)``, checked against the contract.

    The update must be a floating-point tensor shaped like ``grad``; ``new_state`` must have
    the keys, shapes and dtypes of ``state``. Without this check a ``(1,)`` update or a
    ``(n,)`` state for a ``(n, 2)`` spec broadcast silently into the parameters or the state.
    Only shapes and dtypes are compared: no values are read (no host sync).
    """
    name = type(rule).__name__
    if not (isinstance(output, (tuple, list)) and len(output) == 2):
        raise TypeError(f"{name}.forward must return (update, new_state), got {type(output).__name__}")
    update, new_state = output
    if not (isinstance(update, Tensor) and update.shape == grad.shape and update.is_floating_point()):
        got = f"shape {tuple(update.shape)}, dtype {update.dtype}" if isinstance(update, Tensor) else repr(update)
        raise ValueError(
            f"{name}.forward returned an update of {got}; expected a real floating-point tensor of "
            f"shape {tuple(grad.shape)} (one value per coordinate, like grad)"
        )
    if not isinstance(new_state, dict) or new_state.keys() != state.keys():
        keys = sorted(new_state) if isinstance(new_state, dict) else type(new_state).__name__
        raise ValueError(f"{name}.forward: new_state has keys {keys}, expected {sorted(state)} (those of state_spec())")
    for key, old in state.items():
        new = new_state[key]
        if not (isinstance(new, Tensor) and new.shape == old.shape and new.dtype == old.dtype):
            got = f"shape {tuple(new.shape)} and dtype {new.dtype}" if isinstance(new, Tensor) else repr(new)
            raise ValueError(
                f"{name}.forward: new_state[{key!r}] has {got}, expected {tuple(old.shape)} and {old.dtype} "
                f"like state[{key!r}] (cast it back with .to(state[{key!r}].dtype))"
            )
    return update, new_state


def checked_initial_state(rule: UpdateRule, method: str, state: Any, rows: int | None, dtype: torch.dtype) -> RuleState:
    """``state`` from ``rule.<method>(...)`` (``init_state``, ``init_segment_state`` or
    ``init_global_state``), refused with a ``ValueError`` naming the method unless it has the
    spec's keys, ``(rows, *shape)`` shapes (``shape`` for the global state, ``rows=None``) and
    ``dtype`` (the dtype asked for: an override that ignores it would store float32 state
    where bf16 was asked for)."""
    name = type(rule).__name__
    spec = {
        "init_state": rule.state_spec,
        "init_segment_state": rule.segment_state_spec,
        "init_global_state": rule.global_state_spec,
    }[method]()
    if not isinstance(state, dict) or set(state) != set(spec):
        keys = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{name}.{method} returned keys {keys}, expected {sorted(spec)} (those of its spec)")
    for key, shape in spec.items():
        expected = tuple(shape) if rows is None else (rows, *shape)
        value = state[key]
        if not (isinstance(value, Tensor) and tuple(value.shape) == expected and value.dtype == dtype):
            got = f"shape {tuple(value.shape)} and dtype {value.dtype}" if isinstance(value, Tensor) else repr(value)
            raise ValueError(
                f"{name}.{method} returned [{key!r}] of {got}, expected shape {expected} and dtype {dtype} "
                "(the dtype argument it was called with)"
            )
    return state


def check_finalize_output(
    rule: UpdateRule, segment_state: RuleState, global_state: RuleState, output: Any, method: str = "finalize"
) -> tuple[RuleState, RuleState]:
    """``output`` of ``rule.finalize(segment_state, global_state, ...)`` as ``(new_segment,
    new_global)``, each with the keys, shapes and dtypes of the state it replaces (shapes and
    dtypes only: no values are read). Without this check a wrong shape broadcasts silently into
    the stored state, or surfaces later as an error inside the rule's own forward."""
    name = type(rule).__name__
    if not (isinstance(output, (tuple, list)) and len(output) == 2):
        raise TypeError(
            f"{name}.{method} must return (new_segment_state, new_global_state), got {type(output).__name__}"
        )
    for label, old_state, new_state in (
        ("segment state", segment_state, output[0]),
        ("global state", global_state, output[1]),
    ):
        if not isinstance(new_state, dict) or new_state.keys() != old_state.keys():
            keys = sorted(new_state) if isinstance(new_state, dict) else type(new_state).__name__
            raise ValueError(
                f"{name}.{method}: the new {label} has keys {keys}, expected {sorted(old_state)} "
                f"(those of {'segment' if label == 'segment state' else 'global'}_state_spec())"
            )
        for key, old in old_state.items():
            new = new_state[key]
            if not (isinstance(new, Tensor) and new.shape == old.shape and new.dtype == old.dtype):
                got = f"shape {tuple(new.shape)} and dtype {new.dtype}" if isinstance(new, Tensor) else repr(new)
                raise ValueError(
                    f"{name}.{method}: the new {label} [{key!r}] has {got}, expected {tuple(old.shape)} and "
                    f"{old.dtype} like the one passed in"
                )
    return output[0], output[1]


class UpdateRule(nn.Module):
    """Base class of learned update rules.

    Subclasses set ``rule_type`` (the name written to ``config.json``), keep every
    constructor argument in ``self.config`` (so the rule can be rebuilt from its config),
    and implement :meth:`state_spec` and :meth:`forward`.

    The per-coordinate state is a ``dict[str, Tensor]`` whose tensors all have the
    number of coordinates as their first dimension; ``LearnedOptimizer`` slices it per
    parameter and concatenates it across parameters, so rules never see tensors.
    """

    rule_type: ClassVar[str] = ""

    def __init__(self) -> None:
        super().__init__()
        self.config: dict[str, Any] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # Only a class that names itself registers: a subclass inheriting its parent's
        # rule_type must not silently replace the parent in the registry.
        if cls.__dict__.get("rule_type"):
            from learned_optim.rules.registry import register_rule

            register_rule(cls)

    @classmethod
    def config_keys(cls) -> list[str]:
        """Constructor arguments that make up this rule's config."""
        sig = inspect.signature(cls.__init__)
        return [name for name in sig.parameters if name != "self"]

    def state_spec(self) -> dict[str, tuple[int, ...]]:
        """Per-coordinate state: name -> trailing shape (the leading dim is the coordinate)."""
        raise NotImplementedError(f"{type(self).__name__} must implement state_spec()")

    needs_segments: ClassVar[bool] = False

    eager_cpu_chunk_size: ClassVar[int] = 1 << 16
    """Coordinates per ``forward`` call of the optimizer's eager step on CPU when it is given no
    ``chunk_size``: large enough to amortise each call, small enough to keep the rule's
    temporaries small (and, for rules with per-tensor statistics, to split few tensors)."""

    @property
    def needs_step_scales(self) -> bool:
        """Whether the rule reads ``StepContext.step_scales`` (its callers then fill it)."""
        return False

    # Constructor arguments added after configs were first saved: a config.json without them
    # loads with their old behaviour, which is their default unless legacy_config_values gives
    # it (a default changed for new rules). Every other key is required.
    added_config_keys: ClassVar[frozenset[str]] = frozenset()
    legacy_config_values: ClassVar[dict[str, Any]] = {}

    def segment_state_spec(self) -> dict[str, tuple[int, ...]]:
        """Per-tensor state: name -> trailing shape (none by default)."""
        return {}

    def global_state_spec(self) -> dict[str, tuple[int, ...]]:
        """State shared by all tensors: name -> shape (none by default)."""
        return {}

    def init_segment_state(
        self, num_segments: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
    ) -> RuleState:
        """Fresh per-tensor state for ``num_segments`` tensors."""
        return {
            name: torch.zeros((num_segments, *shape), device=device, dtype=dtype)
            for name, shape in self.segment_state_spec().items()
        }

    def init_global_state(
        self, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
    ) -> RuleState:
        """Fresh global state."""
        return {
            name: torch.zeros(shape, device=device, dtype=dtype) for name, shape in self.global_state_spec().items()
        }

    def finalize(
        self,
        segment_state: RuleState,
        global_state: RuleState,
        segment_sums: dict[str, Tensor],
        counts: Tensor,
    ) -> tuple[RuleState, RuleState]:
        """Advance the per-tensor and global state once all coordinates of a step are done.

        Args:
            segment_state: state of every tensor of the step, ``(num_tensors, ...)``.
            global_state: the global state.
            segment_sums: the sums the rule wrote in ``StepContext.segment_sums``, added up
                per tensor over all chunks, ``(num_tensors, k)``.
            counts: coordinates per tensor, ``(num_tensors,)``.
        """
        return segment_state, global_state

    forward_reads_global_state: ClassVar[bool] = True
    """Whether :meth:`forward` reads ``StepContext.global_state``. A rule that does not (its
    global state acts through :meth:`finalize` only) can step several problems in one call
    (:meth:`full_step` with ``groups``), each problem keeping its own global state."""

    def finalize_groups(
        self,
        segment_state: RuleState,
        global_state: RuleState,
        segment_sums: dict[str, Tensor],
        counts: Tensor,
        groups: Tensor,
        num_groups: int,
    ) -> tuple[RuleState, RuleState]:
        """:meth:`finalize` for several problems side by side.

        Tensor ``i`` belongs to problem ``groups[i]`` (``groups`` nondecreasing, int64), and
        ``global_state`` holds one row per problem (each tensor ``(num_groups, ...)``). This
        default finalizes the problems one after the other; a rule may do all in one go.
        """
        sizes = torch.bincount(groups, minlength=num_groups).tolist()
        segment_parts: list[RuleState] = []
        global_parts: list[RuleState] = []
        start = 0
        for index, size in enumerate(sizes):
            rows = slice(start, start + size)
            part_segment = {k: v[rows] for k, v in segment_state.items()}
            part_global = {k: v[index] for k, v in global_state.items()}
            new_segment, new_global = check_finalize_output(
                self,
                part_segment,
                part_global,
                self.finalize(part_segment, part_global, {k: v[rows] for k, v in segment_sums.items()}, counts[rows]),
            )
            segment_parts.append(new_segment)
            global_parts.append(new_global)
            start += size
        return (
            {k: torch.cat([part[k] for part in segment_parts]) for k in segment_state},
            {k: torch.stack([part[k] for part in global_parts]) for k in global_state},
        )

    def full_step(
        self,
        grad: Tensor,
        state: RuleState,
        segment_ids: Tensor,
        num_segments: int,
        segment_state: RuleState | None = None,
        global_state: RuleState | None = None,
        step_scales: Tensor | None = None,
        *,
        groups: Tensor | None = None,
        num_groups: int = 1,
    ) -> tuple[Tensor, RuleState, RuleState, RuleState]:
        """One step over *all* coordinates of a problem at once (forward, then :meth:`finalize`).

        Used where everything fits in one batch (meta-training, tests). ``step_scales``: see
        :class:`StepContext` (rules that need them). Returns
        ``(update, new_state, new_segment_state, new_global_state)``.

        ``groups``: several problems in one call, for a rule whose forward does not read the
        global state (:attr:`forward_reads_global_state`): tensor ``i`` belongs to problem
        ``groups[i]`` (nondecreasing), and ``global_state`` (required then) holds one row per
        problem, as does the new one returned (see :meth:`finalize_groups`).
        """
        if groups is not None:
            if self.forward_reads_global_state:
                raise ValueError(
                    f"{type(self).__name__} reads its global state in forward: it cannot step several "
                    "problems in one call (full_step with groups); step them one by one"
                )
            if global_state is None:
                raise ValueError("full_step with groups needs the global state of every problem (one row each)")
        if segment_state is None:
            segment_state = self.init_segment_state(num_segments, grad.device)
        if global_state is None:
            global_state = self.init_global_state(grad.device)
        context = StepContext(
            segment_ids,
            num_segments,
            segment_state,
            None if groups is not None else global_state,
            step_scales=step_scales,
        )
        update, new_state = check_rule_output(self, grad, state, self(grad, state, context))
        if not self.segment_state_spec() and not self.global_state_spec():
            return update, new_state, segment_state, global_state
        counts = torch.bincount(segment_ids, minlength=num_segments).to(grad.dtype)
        if groups is not None:
            output = self.finalize_groups(segment_state, global_state, context.segment_sums, counts, groups, num_groups)
            method = "finalize_groups"
        else:
            output = self.finalize(segment_state, global_state, context.segment_sums, counts)
            method = "finalize"
        new_segment, new_global = check_finalize_output(self, segment_state, global_state, output, method)
        return update, new_state, new_segment, new_global

    def tensor_statistics(
        self, grad: Tensor, state: RuleState, segment_ids: Tensor, num_segments: int
    ) -> Tensor | None:
        """Per-tensor sums ``(num_segments, k)`` that :meth:`forward` reads over whole tensors.

        ``None`` (the default) for rules without such inputs. The sums must add up over the
        pieces of a tensor: where the optimizer splits a tensor over batches (and before every
        fused step) it calls this on every piece first and passes the totals in
        :attr:`StepContext.tensor_statistics`.
        """
        return None

    def init_from(self, other: UpdateRule) -> None:
        """Start from ``other``'s weights (``meta-fit --init``).

        By default ``other`` must be the same rule type with the same config. A rule type may
        also accept configs it can extend without changing what the rule computes (see
        ``HierarchicalRNN``). Raises ValueError naming both configs otherwise.
        """
        if other.rule_type != self.rule_type or not same_config(other.config, self.config):
            raise ValueError(
                f"its rule is {other.rule_type} {other.config}, not the {self.rule_type} {self.config} asked for"
            )
        self.load_state_dict(other.state_dict())

    def rescale_split_update(
        self,
        update: Tensor,
        piece_sums: dict[str, Tensor],
        piece_count: int | Tensor,
        tensor_sums: dict[str, Tensor],
        tensor_count: int | Tensor,
    ) -> Tensor:
        """Correct the update of one piece of a tensor that the step computed piece by piece.

        A rule whose update depends on statistics of the whole tensor (a per-tensor
        normalisation) computes them over the piece it was given: a chunk of a tensor the
        eager path split over batches, or one rank's shard of a sharded tensor. The caller
        keeps the pieces' updates until the whole tensor has run and calls this with the sums
        the rule reported for the piece (``(k,)`` each) and for the whole tensor, and the
        coordinate counts of both (ints, or one-element tensors summed over shards). The
        default leaves the update as it is (rules without per-tensor statistics in their update).
        """
        return update

    def init_state(
        self, n: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
    ) -> RuleState:
        """Fresh state for ``n`` coordinates (zeros unless a subclass overrides)."""
        return {name: torch.zeros((n, *shape), device=device, dtype=dtype) for name, shape in self.state_spec().items()}

    def forward(self, grad: Tensor, state: RuleState, context: StepContext | None = None) -> tuple[Tensor, RuleState]:
        """Return ``(update, new_state)`` for a flat batch of coordinates.

        Args:
            grad: ``(n,)`` gradients (already negated for ``maximize``).
            state: per-coordinate state, each tensor ``(n, ...)``.
            context: optional batch layout (tensor membership of each coordinate).

        Returns:
            ``update``, ``(n,)``, to be *added* to the parameters (before ``lr``), and the
            new state with the same keys and shapes as ``state``.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement forward()")

    def fused_impls(self) -> tuple[str, ...]:
        """Names of the fused kernels this rule has besides its eager ``forward`` (none by default)."""
        return ()

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
        """The step of :meth:`forward` as one fused kernel, writing ``state`` in place.

        Args:
            impl: one of :meth:`fused_impls`.
            grad: ``(n,)`` gradients.
            state: contiguous per-coordinate state, updated in place.
            update: ``(n,)`` fp32 output buffer for the update (before ``lr``).
            keep: optional per-tensor flags; coordinates of a tensor whose flag is false keep
                their state and get a zero update.
            segment_ids: ``(n,)`` int32 tensor index of each coordinate (needed with ``keep``,
                and by rules with tensor-level state).
            context: for rules with tensor-level state: the batch's tensors (whole tensors,
                with ``segment_counts``), their state and the global state; the rule fills
                ``context.segment_sums`` for :meth:`finalize`, as :meth:`forward` does.
        """
        raise NotImplementedError(f"{type(self).__name__} has no fused kernel {impl!r}")

    def state_bytes_per_coordinate(self, dtype: torch.dtype = torch.float32) -> int:
        """Bytes of optimizer state this rule keeps per parameter coordinate."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        total = 0
        for shape in self.state_spec().values():
            count = 1
            for d in shape:
                count *= d
            total += count
        return total * itemsize

    # Saving and loading live in learned_optim.weights; these are thin conveniences.
    def save_pretrained(
        self,
        save_directory: str | os.PathLike[str],
        model_card: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> Path:
        """Write ``config.json`` and ``model.safetensors`` (and optionally README.md) and return
        the folder; see :func:`learned_optim.weights.save_pretrained`."""
        from learned_optim.weights import save_pretrained

        return save_pretrained(self, save_directory, model_card=model_card, metadata=metadata)

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike[str], **kwargs: Any) -> UpdateRule:
        """Load a rule from a bundled name, a local directory or a Hub repo id."""
        from learned_optim.weights import load_rule

        rule = load_rule(name_or_path, **kwargs)
        if cls is not UpdateRule and not isinstance(rule, cls):
            raise TypeError(f"{name_or_path!r} holds a {type(rule).__name__}, not a {cls.__name__}")
        return rule

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> str:
        """Publish this rule to the Hugging Face Hub; returns the commit URL."""
        from learned_optim.hub import push_to_hub

        return push_to_hub(self, repo_id, **kwargs)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.config.items())
