"""The learned step as a function over many tensors: flatten, chunk, run the rule, scatter.

This is the eager multi-tensor path. Every coordinate of every parameter goes through
the rule as one flat batch, cut into chunks of at most ``chunk_size`` coordinates (a
chunk may span several small tensors; a large tensor spans several chunks), so there is
one rule call per chunk and never one per tensor. Nothing here reads values back to the
host: the non-finite check is a device-side mask.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from learned_optim.rules.base import (
    RuleState,
    StepContext,
    UpdateRule,
    check_finalize_output,
    check_rule_output,
    floored_log_rms,
    parameter_norms,
    step_scales,
)

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "FUSED_CHUNK_SIZE",
    "FlatState",
    "StepEntry",
    "default_chunk_size",
    "fused_learned_step",
    "learned_step",
    "nonfinite_mask",
    "plan_chunks",
]

DEFAULT_CHUNK_SIZE = 1 << 16
NONFINITE_MODES = ("skip", "error")


ShardReduce = Callable[[dict[int, Tensor]], dict[int, Tensor]]
"""Takes per-tensor sums of some entries' shards (by entry index), returns the sums over all
shards of each tensor; every rank holding a shard of those tensors calls it in the same order."""


def default_chunk_size(rule: UpdateRule, device: torch.device) -> int:
    """Coordinates per rule call of the eager step when none is given: the rule's own choice on
    CPU (``UpdateRule.eager_cpu_chunk_size``, where the size of temporaries matters), ``DEFAULT_CHUNK_SIZE``
    on accelerators, where each call costs kernel launches."""
    return int(rule.eager_cpu_chunk_size) if device.type == "cpu" else DEFAULT_CHUNK_SIZE


@dataclass
class StepEntry:
    """One parameter tensor's view of a step: its data, gradient, rule state and group options.

    ``param`` is a floating-point tensor, updated in place; ``grad`` has its number of elements
    (any floating dtype: it is cast to fp32); ``state`` holds, for every key of
    ``rule.state_spec()``, a tensor of shape ``(param.numel(), *spec)``; ``segment_state``
    (rules with tensor-level state) holds a ``(1, *spec)`` row per key of
    ``rule.segment_state_spec()``. Everything lives on the param's device.
    """

    param: Tensor
    grad: Tensor
    state: RuleState
    lr: float | Tensor  # a one-element tensor lr (torch.compile with a scheduler) is never read back
    weight_decay: float
    maximize: bool
    segment_state: RuleState | None = None  # per-tensor rule state, each ``(1, ...)``
    # A bool scalar tensor: whether the whole tensor's gradient holds inf/NaN, when ``grad`` is
    # one shard of it (screened over all shards, so that every shard skips together); None:
    # screen ``grad`` here.
    nonfinite_flag: Tensor | None = None
    # ``param`` and ``grad`` are one shard of a larger tensor (a DTensor's local part): a rule's
    # whole-tensor statistics are summed over all shards by the step's ``reduce_shards``.
    shard: bool = False


@dataclass
class _Piece:
    entry_index: int
    start: int
    stop: int


def plan_chunks(numels: Sequence[int], chunk_size: int, keep_whole: bool = False) -> Iterator[list[_Piece]]:
    """Cut the concatenation of tensors of sizes ``numels`` into chunks of ``chunk_size``.

    With ``keep_whole``, a tensor that fits in one chunk never straddles two (it opens a new
    chunk instead), so rules with per-tensor statistics see it whole, as in meta-training;
    only tensors larger than a chunk are split.
    """
    chunk_size = chunk_size_option(chunk_size)
    chunk: list[_Piece] = []
    room = chunk_size
    for index, numel in enumerate(numels):
        if keep_whole and chunk and numel <= chunk_size and numel > room:
            yield chunk
            chunk, room = [], chunk_size
        start = 0
        while start < numel:
            take = min(room, numel - start)
            chunk.append(_Piece(index, start, start + take))
            start += take
            room -= take
            if room == 0:
                yield chunk
                chunk, room = [], chunk_size
    if chunk:
        yield chunk


def nonfinite_mask(grads: Sequence[Tensor]) -> Tensor:
    """Bool tensor, one entry per gradient: True where that gradient holds inf or NaN."""
    # The inf-norm of an empty tensor is undefined (_foreach_norm raises); an empty one is finite.
    flat = [g.detach().reshape(-1) if g.numel() else g.new_zeros(1) for g in grads]
    maxima = torch._foreach_norm(flat, float("inf"))
    return ~torch.isfinite(torch.stack([m.float() for m in maxima]))


def chunk_size_option(value: object, allowed: str = "an int >= 1") -> int:
    """``value`` as an int >= 1 (any integer type, numpy's too), or a ValueError naming it.

    ``allowed`` is what the error says was expected (a caller that also takes ``None`` says so).
    """
    # 0 used to loop for ever in plan_chunks (a chunk with no room never fills).
    try:
        if isinstance(value, bool):
            raise TypeError
        size = operator.index(value)
    except TypeError:
        raise ValueError(f"chunk_size must be {allowed}, got {value!r}") from None
    if size < 1:
        raise ValueError(f"chunk_size must be {allowed}, got {value!r}")
    return size


def _check_step(
    rule: UpdateRule, entries: Sequence[StepEntry], nonfinite: str, global_state: RuleState | None, caller: str
) -> None:
    """Raise ``ValueError`` unless ``entries`` fit ``rule`` and each other.

    Only metadata is read (shapes, dtypes, devices, keys: no host sync), and all of it before
    anything is modified: a mismatch used to surface in a later chunk, after earlier chunks had
    been stepped, or not at all (a longer gradient was silently cut to the param's size).
    """
    if nonfinite not in NONFINITE_MODES:
        raise ValueError(f"nonfinite must be one of {NONFINITE_MODES}, got {nonfinite!r}")
    name = type(rule).__name__
    spec = {k: tuple(v) for k, v in rule.state_spec().items()}
    segment_spec = {k: tuple(v) for k, v in rule.segment_state_spec().items()}
    hierarchical = bool(segment_spec or rule.global_state_spec())
    if hierarchical:
        if global_state is None:
            raise ValueError(f"{name} keeps global state: pass global_state to {caller}")
        global_spec = {k: tuple(v) for k, v in rule.global_state_spec().items()}
        if not isinstance(global_state, dict) or set(global_state) != set(global_spec):
            keys = sorted(global_state) if isinstance(global_state, dict) else type(global_state).__name__
            raise ValueError(
                f"{caller}: global_state has keys {keys}, expected {sorted(global_spec)} "
                f"({name}.global_state_spec(); rule.init_global_state() for a fresh one)"
            )
        for k, shape in global_spec.items():
            if tuple(global_state[k].shape) != shape:
                raise ValueError(
                    f"{caller}: global_state[{k!r}] has shape {tuple(global_state[k].shape)}, expected {shape}"
                )
        missing = [i for i, e in enumerate(entries) if e.segment_state is None]
        if missing:
            raise ValueError(
                f"{name} keeps per-tensor state: entries {missing} have no segment_state "
                "(rule.init_segment_state(1) for a fresh tensor)"
            )
    device = entries[0].param.device
    for i, e in enumerate(entries):
        where = f"{caller}: entry {i}"
        if not e.param.is_floating_point():
            raise ValueError(f"{where}: param must be a floating-point tensor, got {e.param.dtype}")
        if not e.grad.is_floating_point() or e.grad.numel() != e.param.numel():
            raise ValueError(
                f"{where}: grad ({tuple(e.grad.shape)}, {e.grad.dtype}) must be floating point with the "
                f"param's {e.param.numel()} elements"
            )
        if set(e.state) != set(spec):
            raise ValueError(f"{where} has state keys {sorted(e.state)}, expected {sorted(spec)} ({name}.state_spec())")
        tensors = [("param", e.param), ("grad", e.grad)]
        for k, trailing in spec.items():
            if tuple(e.state[k].shape) != (e.param.numel(), *trailing):
                raise ValueError(
                    f"{where}: state[{k!r}] has shape {tuple(e.state[k].shape)}, expected "
                    f"{(e.param.numel(), *trailing)} (one row per element of the param)"
                )
            tensors.append((f"state[{k!r}]", e.state[k]))
        if hierarchical:
            if set(e.segment_state) != set(segment_spec):
                raise ValueError(
                    f"{where} has segment_state keys {sorted(e.segment_state)}, expected {sorted(segment_spec)}"
                )
            for k, trailing in segment_spec.items():
                if tuple(e.segment_state[k].shape) != (1, *trailing):
                    raise ValueError(
                        f"{where}: segment_state[{k!r}] has shape {tuple(e.segment_state[k].shape)}, "
                        f"expected {(1, *trailing)}"
                    )
                tensors.append((f"segment_state[{k!r}]", e.segment_state[k]))
        for label, t in tensors:
            if t.device != device:
                raise ValueError(
                    f"{where}: {label} is on {t.device}, entry 0's param on {device} (one device per step)"
                )


def _check_shards(
    rule: UpdateRule, entries: Sequence[StepEntry], reduce_shards: ShardReduce | None, caller: str
) -> None:
    """``ValueError`` for shard entries the step cannot give whole-tensor statistics."""
    if not any(e.shard for e in entries):
        return
    hierarchical = bool(rule.segment_state_spec() or rule.global_state_spec())
    if (hierarchical or getattr(rule, "needs_segments", False)) and reduce_shards is None:
        raise ValueError(
            f"{caller}: entries marked shard need reduce_shards for {type(rule).__name__}'s per-tensor statistics"
        )


def _screen_gradients(entries: Sequence[StepEntry], nonfinite: str, host_check: bool) -> tuple[Tensor, bool]:
    """Flags of the entries with non-finite gradients, and whether the step must mask per coordinate.

    Raises ``FloatingPointError`` (before anything is modified) when ``nonfinite="error"``.
    """
    flags = [e.nonfinite_flag for e in entries]
    if all(f is not None for f in flags):
        skipped = torch.stack([f.reshape(()) for f in flags])
    else:
        skipped = nonfinite_mask([e.grad for e in entries])
        if any(f is not None for f in flags):
            elsewhere = [torch.zeros_like(skipped[0]) if f is None else f.reshape(()) for f in flags]
            skipped = skipped | torch.stack(elsewhere)
    if nonfinite == "error" and bool(skipped.any()):
        bad = [i for i, s in enumerate(skipped.tolist()) if s]
        raise FloatingPointError(
            f"non-finite gradient in parameter tensor(s) {bad} of this step"
            + nonfinite_params_note([entries[i].param for i in bad])
        )
    return skipped, not host_check or bool(skipped.any())


def nonfinite_params_note(params: Sequence[Tensor]) -> str:
    """A sentence for a non-finite-gradient message when some of ``params`` hold inf/NaN, else "".

    Called only once a gradient was found non-finite (it reads the flags back to the host).
    """
    # Then the gradient is a symptom: skipping the step will never recover the parameter.
    bad = [i for i, s in enumerate(nonfinite_mask(params).tolist()) if s] if params else []
    if not bad:
        return ""
    return (
        f"; {len(bad)} of these parameter tensors hold inf/NaN values themselves (written by an "
        "earlier update or edit), so skipping steps cannot recover them"
    )


@torch.no_grad()
def learned_step(
    rule: UpdateRule,
    entries: Sequence[StepEntry],
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    nonfinite: str = "skip",
    global_state: RuleState | None = None,
    host_check: bool = False,
    reduce_shards: ShardReduce | None = None,
) -> Tensor | None:
    """Update ``entries`` in place with one step of ``rule``.

    Args:
        rule: the update rule (on the entries' device).
        entries: parameters with their gradients and rule state (all on one device).
        chunk_size: coordinates per rule call.
        nonfinite: ``"skip"`` leaves a parameter with a non-finite gradient and its state
            unchanged; ``"error"`` raises before anything is modified.
        global_state: the rule's global state, updated in place (rules with tensor-level state).
        host_check: read the non-finite flags back once per step and, when every gradient is
            finite (the usual case), skip the per-coordinate masking; without it the step is
            free of host synchronisation (for CUDA graphs) and always masks.
        reduce_shards: for entries marked ``shard`` and a rule with per-tensor inputs: sums
            their statistics over all shards of each tensor (see :data:`ShardReduce`).

    Returns:
        A bool tensor marking the entries that were skipped (``None`` if no entries).

    Raises:
        ValueError: before anything is modified, for a bad ``chunk_size`` or ``nonfinite``, a
            missing ``global_state`` or ``segment_state``, or entries that do not fit the rule
            (state keys or shapes, gradient size, non-float param, tensors on other devices).
        FloatingPointError: with ``nonfinite="error"``, before anything is modified.
    """
    if not entries:
        return None
    chunk_size = chunk_size_option(chunk_size)
    _check_step(rule, entries, nonfinite, global_state, "learned_step")
    _check_shards(rule, entries, reduce_shards, "learned_step")
    device = entries[0].param.device
    skipped, masked = _screen_gradients(entries, nonfinite, host_check)
    keep = ~skipped

    factors = [_decay_factor(e, keep[i]) for i, e in enumerate(entries)]

    # Non-contiguous parameters (e.g. channels_last) are updated through a contiguous copy.
    flat_params = [e.param.view(-1) if e.param.is_contiguous() else e.param.contiguous().view(-1) for e in entries]
    flat_grads = [e.grad.reshape(-1) for e in entries]
    compute_dtype = torch.float32
    needs_segments = getattr(rule, "needs_segments", False)
    hierarchical = bool(rule.segment_state_spec() or rule.global_state_spec())
    keys = list(entries[0].state)
    # Per-tensor sums the rule reports, added up over the chunks a tensor spans.
    sums: list[dict[str, Tensor]] = [{} for _ in entries]
    # A tensor split over chunks, for a rule whose update depends on whole-tensor statistics:
    # its pieces' updates wait until all of it has run (see UpdateRule.rescale_split_update).
    rescales = type(rule).rescale_split_update is not UpdateRule.rescale_split_update
    pending: dict[int, list[tuple[_Piece, Tensor, dict[str, Tensor]]]] = {}
    scales = _step_scales(rule, entries, reduce_shards)
    shards = [i for i, e in enumerate(entries) if e.shard]
    whole_sums = (
        _tensor_statistics(
            rule, entries, flat_grads, chunk_size, keep if masked else None, only_split=True, include=shards
        )
        if needs_segments
        else {}
    )
    if shards and whole_sums:
        whole_sums.update(reduce_shards({i: whole_sums[i] for i in shards}))

    for chunk in plan_chunks([p.numel() for p in flat_params], chunk_size, keep_whole=needs_segments or hierarchical):
        lengths = [piece.stop - piece.start for piece in chunk]
        grad_parts = []
        for piece in chunk:
            e = entries[piece.entry_index]
            g = flat_grads[piece.entry_index][piece.start : piece.stop].to(compute_dtype)
            grad_parts.append(-g if e.maximize else g)
        grad = torch.cat(grad_parts) if len(grad_parts) > 1 else grad_parts[0]
        if len(chunk) == 1:  # one slice of one tensor: a view, no copy
            state = {k: entries[chunk[0].entry_index].state[k][chunk[0].start : chunk[0].stop] for k in keys}
        else:
            state = {k: torch.cat([entries[p.entry_index].state[k][p.start : p.stop] for p in chunk]) for k in keys}
        # Built from views and fills: repeat_interleave with device repeats would read their
        # sum back to the host (a sync per chunk on GPU).
        keep_coord = None
        if masked:
            keep_coord = torch.cat([keep[p.entry_index].expand(n) for p, n in zip(chunk, lengths, strict=True)])
            grad = torch.where(keep_coord, grad, 0.0)
        context = None
        if needs_segments or hierarchical:
            segment_state = None
            if hierarchical:
                segment_state = {
                    k: torch.cat([entries[p.entry_index].segment_state[k] for p in chunk])
                    for k in entries[0].segment_state
                }
            context = StepContext(
                segment_ids=torch.cat(
                    [torch.full((n,), j, dtype=torch.int64, device=device) for j, n in enumerate(lengths)]
                ),
                num_segments=len(chunk),
                segment_state=segment_state,
                global_state=global_state,
                step_scales=None if scales is None else scales[[p.entry_index for p in chunk]],
            )
            if any(p.entry_index in whole_sums for p in chunk):
                # A piece of a split tensor: the rule reads the sums over all of it.
                sums_here = rule.tensor_statistics(grad, state, context.segment_ids, len(chunk))
                rows = [j for j, p in enumerate(chunk) if p.entry_index in whole_sums]
                sums_here[rows] = torch.stack([whole_sums[chunk[j].entry_index] for j in rows])
                context.tensor_statistics = sums_here
        update, new_state = check_rule_output(rule, grad, state, rule(grad, state, context))
        if context is not None:
            for j, piece in enumerate(chunk):
                acc = sums[piece.entry_index]
                for k, v in context.segment_sums.items():
                    acc[k] = v[j] if k not in acc else acc[k] + v[j]
        if keep_coord is not None:
            update = torch.where(keep_coord, update, 0.0)

        offset = 0
        for j, (piece, length) in enumerate(zip(chunk, lengths, strict=True)):
            e = entries[piece.entry_index]
            sl = slice(offset, offset + length)
            offset += length
            for k in keys:
                old = e.state[k][piece.start : piece.stop]
                if keep_coord is None:
                    old.copy_(new_state[k][sl])
                else:
                    mask = keep_coord[sl].view(-1, *([1] * (old.dim() - 1)))
                    old.copy_(torch.where(mask, new_state[k][sl], old))
            if rescales and context is not None and (length < e.param.numel() or e.shard):
                piece_sums = {k: v[j] for k, v in context.segment_sums.items()}
                pending.setdefault(piece.entry_index, []).append((piece, update[sl], piece_sums))
                continue
            target = flat_params[piece.entry_index][piece.start : piece.stop]
            _apply_update(target, update[sl], e.lr, factors[piece.entry_index])
    counts = None
    if shards and (hierarchical or rescales):
        # A shard's sums are its own: the whole tensor's add up over all of its shards.
        template = _sum_template(rule, entries, sums, global_state, scales)
        sums, counts = _sums_over_shards(entries, sums, template, reduce_shards)
    for index, pieces in pending.items():
        numel = entries[index].param.numel() if counts is None else counts[index]
        for piece, piece_update, piece_sums in pieces:
            piece_update = rule.rescale_split_update(
                piece_update, piece_sums, piece.stop - piece.start, sums[index], numel
            )
            target = flat_params[index][piece.start : piece.stop]
            _apply_update(target, piece_update, entries[index].lr, factors[index])
    for e, flat in zip(entries, flat_params, strict=True):
        if not e.param.is_contiguous():
            e.param.copy_(flat.view(e.param.shape))
    if hierarchical:
        _finalize(rule, entries, sums, keep, global_state, counts)
    return skipped


def _sum_template(
    rule: UpdateRule,
    entries: Sequence[StepEntry],
    sums: Sequence[dict[str, Tensor]],
    global_state: RuleState | None,
    scales: Tensor | None,
) -> dict[str, Tensor]:
    """Zeros shaped as one tensor's per-tensor sums of this step (``StepContext.segment_sums``
    rows): what a shard without coordinates on this rank contributes."""
    for tensor_sums in sums:
        if tensor_sums:
            return {k: torch.zeros_like(v) for k, v in tensor_sums.items()}
    # No coordinate stepped here (every local shard is empty): the rule's sums over none.
    device = entries[0].param.device
    context = StepContext(
        segment_ids=torch.zeros(0, dtype=torch.int64, device=device),
        num_segments=1,
        segment_state=entries[0].segment_state,
        global_state=global_state,
        step_scales=None if scales is None else scales[:1],
    )
    rule(torch.zeros(0, device=device), rule.init_state(0, device), context)
    return {k: torch.zeros_like(v[0]) for k, v in context.segment_sums.items()}


def _sums_over_shards(
    entries: Sequence[StepEntry],
    sums: Sequence[dict[str, Tensor]],
    template: dict[str, Tensor],
    reduce_shards: ShardReduce,
) -> tuple[list[dict[str, Tensor]], Tensor]:
    """Every entry's per-tensor sums and float64 coordinate count over its whole tensor: a
    shard's added up over all shards of its tensor (in one ``reduce_shards`` call, the count
    with them), the others' as they are."""
    device = entries[0].param.device
    keys = sorted(template)  # the same order on every rank
    counts = torch.tensor([float(e.param.numel()) for e in entries], dtype=torch.float64, device=device)
    packed = {
        i: torch.cat([*(sums[i].get(k, template[k]).reshape(-1).to(torch.float64) for k in keys), counts[i : i + 1]])
        for i, e in enumerate(entries)
        if e.shard
    }
    whole = list(sums)
    sizes = [template[k].numel() for k in keys]
    for i, values in reduce_shards(packed).items():
        *parts, count = values.split([*sizes, 1])
        whole[i] = {k: part.view(template[k].shape).to(template[k].dtype) for k, part in zip(keys, parts, strict=True)}
        counts[i] = count[0]
    return whole, counts


def _tensor_statistics(
    rule: UpdateRule,
    entries: Sequence[StepEntry],
    flat_grads: Sequence[Tensor],
    chunk_size: int,
    keep: Tensor | None,
    only_split: bool,
    include: Sequence[int] = (),
) -> dict[int, Tensor]:
    """:meth:`UpdateRule.tensor_statistics` over the whole of each tensor (``only_split``: of
    each tensor larger than a chunk, which the eager step splits), added up slice by slice;
    ``{}`` for rules without them. ``keep``: where given, a skipped tensor's gradient counts as
    zero, as in the step."""
    totals: dict[int, Tensor] = {}
    for index, e in enumerate(entries):
        numel = e.param.numel()
        if only_split and numel <= chunk_size and index not in include:
            continue
        for start in range(0, max(numel, 1), chunk_size):  # an empty tensor: one empty slice, zero sums
            stop = min(start + chunk_size, numel)
            g = flat_grads[index][start:stop].to(torch.float32)
            if keep is not None:
                g = torch.where(keep[index], g, 0.0)
            ids = torch.zeros((), dtype=torch.int64, device=g.device).expand(stop - start)  # one segment
            piece_state = {k: v[start:stop] for k, v in e.state.items()}
            piece = rule.tensor_statistics(-g if e.maximize else g, piece_state, ids, 1)
            if piece is None:
                return {}
            totals[index] = piece[0] if index not in totals else totals[index] + piece[0]
    return totals


def _step_scales(
    rule: UpdateRule, entries: Sequence[StepEntry], reduce_shards: ShardReduce | None = None
) -> Tensor | None:
    """Each entry's ``log(lr / RMS(param))`` before the step, for a rule that reads it; a
    shard's RMS is its whole tensor's (sums of squares and sizes added up over the shards)."""
    if not rule.needs_step_scales:
        return None
    params, lrs = [e.param for e in entries], [e.lr for e in entries]
    shards = [i for i, e in enumerate(entries) if e.shard]
    if not shards or reduce_shards is None:
        return step_scales(params, lrs)
    device = params[0].device
    square_sums = torch.stack([n.to(torch.float64) for n in parameter_norms(params)]).square()
    sizes = torch.tensor([float(p.numel()) for p in params], dtype=torch.float64, device=device)
    for i, values in reduce_shards({i: torch.stack([square_sums[i], sizes[i]]) for i in shards}).items():
        square_sums[i], sizes[i] = values[0], values[1]
    return step_scales(params, lrs, log_rms=floored_log_rms(square_sums, sizes))


def _decay_factor(entry: StepEntry, keep: Tensor) -> Tensor | None:
    """The entry's decoupled weight decay factor ``1 - lr * wd`` (1 where ``keep`` is False;
    None without decay). At least fp32: rounded to bf16 first, 1 - lr * wd would be off by up
    to 2^-9 (0.9 -> 0.898, 1 - 1e-4 -> 1); fp64 params get an fp64 factor."""
    if entry.weight_decay == 0.0:
        return None
    factor_dtype = torch.promote_types(entry.param.dtype, torch.float32)
    if isinstance(entry.lr, Tensor):
        decayed = 1.0 - entry.lr.to(device=keep.device, dtype=factor_dtype).reshape(()) * entry.weight_decay
    else:
        decayed = torch.full((), 1.0 - entry.lr * entry.weight_decay, dtype=factor_dtype, device=keep.device)
    return torch.where(keep, decayed, 1.0)


def _scaled(update: Tensor, lr: float | Tensor) -> tuple[Tensor, float]:
    """``(update, alpha)`` with ``update * alpha == lr * update``: a tensor lr is multiplied in
    (``alpha`` must be a Python number, and reading the tensor back would sync the device)."""
    if isinstance(lr, Tensor):
        return update * lr.to(device=update.device, dtype=update.dtype).reshape(()), 1.0
    return update, lr


def _apply_update(target: Tensor, update: Tensor, lr: float | Tensor, factor: Tensor | None) -> None:
    """``target = target * factor + lr * update`` in place (``factor``: decoupled weight decay)."""
    update, alpha = _scaled(update, lr)
    if factor is None:
        target.add_(update, alpha=alpha)
    else:
        # Decay and update in the factor's dtype, rounded to the param dtype once: a bf16
        # param times an fp32 device tensor would round the factor to bf16 on GPU.
        target.copy_(torch.add(target.to(factor.dtype) * factor, update, alpha=alpha))


def _finalize(
    rule: UpdateRule,
    entries: Sequence[StepEntry],
    sums: list[dict[str, Tensor]],
    keep: Tensor,
    global_state: RuleState | None,
    counts: Tensor | None = None,
) -> None:
    """Advance tensor-level and global state once per step; skipped tensors keep theirs.

    The global state advances when at least one tensor stepped; it reads what the rule's
    ``finalize`` makes of all tensors of the step, a skipped one included (its sums come from a
    zero gradient and its own new state is discarded). A step that skipped every tensor
    changes nothing, global state included.
    """
    assert global_state is not None, "_check_step refuses a hierarchical step without global state"
    if all(e.param.numel() == 0 and not e.shard for e in entries):
        # Only empty tensors: no coordinate ran through the rule (no sums), nothing to advance.
        # (A shard empty here may not be empty elsewhere: its sums came from the other ranks.)
        return
    seg_keys = list(entries[0].segment_state or {})
    segment_state = {k: torch.cat([e.segment_state[k] for e in entries]) for k in seg_keys}
    stacked = {}
    for k in {k for s in sums for k in s}:
        template = next(s[k] for s in sums if k in s)
        # A zero-size tensor contributes no chunk piece, hence no sums.
        stacked[k] = torch.stack([s.get(k, torch.zeros_like(template)) for s in sums])
    if counts is None:
        counts = torch.tensor([float(e.param.numel()) for e in entries], device=keep.device)
    new_segment, new_global = check_finalize_output(
        rule, segment_state, global_state, rule.finalize(segment_state, global_state, stacked, counts)
    )
    for i, e in enumerate(entries):
        for k in seg_keys:
            e.segment_state[k].copy_(torch.where(keep[i], new_segment[k][i : i + 1], e.segment_state[k]))
    any_kept = keep.any()  # a device-side flag: no read back to the host
    for k, v in new_global.items():
        global_state[k].copy_(torch.where(any_kept, v, global_state[k]))


# ---------------------------------------------------------------------- fused path

FUSED_CHUNK_SIZE = 1 << 22


class FlatState:
    """The per-coordinate rule state of many parameter tensors in one buffer per key.

    A fused kernel then runs over all tensors of a step at once; each tensor's state is a
    view into the buffers (``views(i)``), which is what the optimizer keeps per parameter.
    """

    def __init__(self, buffers: RuleState, numels: Sequence[int]) -> None:
        self.buffers = buffers
        self.numels = list(numels)
        self.offsets = [0]
        for n in self.numels:
            self.offsets.append(self.offsets[-1] + n)
        self._segment_ids: Tensor | None = None
        self._segment_counts: Tensor | None = None
        self._views: list[RuleState] | None = None

    @classmethod
    def gather(
        cls,
        states: Sequence[RuleState],
        numels: Sequence[int],
        release: Callable[[int, str, Tensor], None] | None = None,
        dtype: torch.dtype | None = None,
    ) -> FlatState:
        """Copy ``states`` (one per tensor, same keys) into fresh contiguous buffers, one key
        at a time. ``release(i, key, view)`` is called once tensor ``i``'s ``key`` is copied, so
        that the caller can drop the old tensor: the peak is then the state plus one key's
        buffer, not twice the state (the first step of a large model would not fit otherwise).

        ``dtype``: the buffers' dtype (the optimizer's ``state_dtype``, whatever dtype outside
        code cast the tensors to); ``None``: per key, the widest of the tensors' dtypes."""
        cut = [0]
        for n in numels:
            cut.append(cut[-1] + n)
        buffers = {}
        for key in states[0]:
            first = states[0][key]
            # One dtype per buffer: the widest of the tensors', so that none loses precision.
            key_dtype = dtype or functools.reduce(torch.promote_types, (state[key].dtype for state in states))
            buffer = first.new_empty((cut[-1], *first.shape[1:]), dtype=key_dtype)
            del first
            for i, state in enumerate(states):
                view = buffer[cut[i] : cut[i + 1]]
                view.copy_(state[key])
                if release is not None:
                    release(i, key, view)
            buffers[key] = buffer
        return cls(buffers, numels)

    def views(self, index: int) -> RuleState:
        """Tensor ``index``'s state as views into the buffers (the same view objects every call)."""
        if self._views is None:
            self._views = [
                {k: v[start:stop] for k, v in self.buffers.items()}
                for start, stop in zip(self.offsets[:-1], self.offsets[1:], strict=True)
            ]
        return dict(self._views[index])

    def holds(self, states: Sequence[RuleState]) -> bool:
        """Whether ``states`` are exactly the views this arena handed out.

        An identity check, not a comparison of data pointers: ``torch.compile`` traces it
        without a graph break, and state replaced by ``load_state_dict`` (new tensors) fails it.
        """
        if self._views is None or len(states) != len(self._views):
            return False
        for state, views in zip(states, self._views, strict=True):
            if state.keys() != views.keys() or any(state[k] is not v for k, v in views.items()):
                return False
        return True

    def segment_counts(self) -> Tensor:
        """``(S,)`` coordinates of every tensor, on the buffers' device (built once: no copy from
        the host in later steps, which a CUDA graph capture would not allow)."""
        if self._segment_counts is None:
            device = next(iter(self.buffers.values())).device
            self._segment_counts = torch.tensor(self.numels, device=device)
        return self._segment_counts

    def segment_ids(self) -> Tensor:
        """``(N,)`` int32: the tensor index of every coordinate (built once, on first use)."""
        if self._segment_ids is None:
            device = next(iter(self.buffers.values())).device
            self._segment_ids = torch.cat(
                [torch.full((n,), i, dtype=torch.int32, device=device) for i, n in enumerate(self.numels)]
            )
        return self._segment_ids


@torch.no_grad()
def fused_learned_step(
    rule: UpdateRule,
    impl: str,
    entries: Sequence[StepEntry],
    flat: FlatState,
    chunk_size: int = FUSED_CHUNK_SIZE,
    nonfinite: str = "skip",
    host_check: bool = False,
    global_state: RuleState | None = None,
    reduce_shards: ShardReduce | None = None,
) -> Tensor | None:
    """:func:`learned_step` through the rule's fused kernel ``impl``.

    The entries' state must be ``flat``'s views (see :class:`FlatState`). Gradients are
    flattened once per chunk of ``chunk_size`` coordinates (the only temporaries: that
    copy and the update), the kernel runs once per chunk over every tensor in it, and the
    updates are applied with foreach ops, one per learning rate. Same semantics as the
    eager path: weight decay, ``maximize``, non-finite skipping.

    For a rule with tensor-level state (``global_state`` given, updated in place) the kernel
    runs once over all coordinates: each tensor's update is normalised over the whole tensor,
    then the tensor and global levels advance (:meth:`UpdateRule.finalize`), as in
    :func:`learned_step`. Raises as :func:`learned_step` does, and ``ValueError`` when the
    entries' state is not ``flat``'s views; all before anything is modified.
    """
    if not entries:
        return None
    device = entries[0].param.device
    hierarchical = bool(rule.segment_state_spec() or rule.global_state_spec())
    chunk_size = chunk_size_option(chunk_size)
    _check_step(rule, entries, nonfinite, global_state, "fused_learned_step")
    _check_shards(rule, entries, reduce_shards, "fused_learned_step")
    if not flat.holds([e.state for e in entries]):
        # The kernel writes flat's buffers: state of the entries' own would silently not advance.
        raise ValueError(
            "fused_learned_step: the entries' state must be flat's views (entry.state = flat.views(i)), "
            "one entry per tensor of flat, in order"
        )
    skipped, masked = _screen_gradients(entries, nonfinite, host_check)
    keep = ~skipped
    keep_flags = keep.to(torch.uint8) if masked else None
    segment_ids = flat.segment_ids() if masked or hierarchical else None

    flat_params = [e.param.view(-1) if e.param.is_contiguous() else e.param.contiguous().view(-1) for e in entries]
    flat_grads = [e.grad.reshape(-1) for e in entries]

    # Weight decay is applied with the update, after the kernel: nothing changes if a kernel raises.

    total = flat.offsets[-1]
    context = None
    if getattr(rule, "needs_segments", False) and not hierarchical:
        # Per-tensor inputs: each tensor's sums over all of it, before the kernels move the state.
        segment_ids = flat.segment_ids()
        totals = _tensor_statistics(rule, entries, flat_grads, chunk_size, keep if masked else None, only_split=False)
        shards = [i for i, e in enumerate(entries) if e.shard]
        if shards and totals:
            totals.update(reduce_shards({i: totals[i] for i in shards}))
        context = StepContext(
            segment_ids=segment_ids,
            num_segments=len(entries),
            segment_counts=flat.segment_counts(),
            tensor_statistics=torch.stack([totals[i] for i in range(len(entries))]) if totals else None,
        )
    if hierarchical:
        chunk_size = max(total, 1)  # one pass: a tensor's update is normalised over all of it
        context = StepContext(
            segment_ids=segment_ids,
            num_segments=len(entries),
            segment_state={k: torch.cat([e.segment_state[k] for e in entries]) for k in entries[0].segment_state},
            global_state=global_state,
            segment_counts=flat.segment_counts(),
            step_scales=_step_scales(rule, entries, reduce_shards),
        )
    shards = [i for i, e in enumerate(entries) if e.shard] if hierarchical else []
    rescales = type(rule).rescale_split_update is not UpdateRule.rescale_split_update
    sums: list[dict[str, Tensor]] = []
    counts = flat.segment_counts()
    for chunk_start in range(0, total, chunk_size):
        chunk_stop = min(chunk_start + chunk_size, total)
        pieces = _pieces_between(flat.offsets, chunk_start, chunk_stop)
        grad_parts = []
        own_copy = len(pieces) > 1  # torch.cat makes a copy
        for index, start, stop in pieces:
            g = flat_grads[index][start:stop]
            if g.dtype != torch.float32 or entries[index].maximize:
                own_copy = True
                g = g.float()
            grad_parts.append(-g if entries[index].maximize else g)
        grad = torch.cat(grad_parts) if len(grad_parts) > 1 else grad_parts[0].contiguous()
        # The kernels read a coordinate's gradient before writing its update, so a gradient
        # buffer of our own doubles as the update buffer (4 bytes of temporaries per coordinate).
        update = grad if own_copy else torch.empty(chunk_stop - chunk_start, dtype=torch.float32, device=device)
        state = {k: v[chunk_start:chunk_stop] for k, v in flat.buffers.items()}
        rule.fused_step(
            impl,
            grad,
            state,
            update,
            keep=keep_flags,
            segment_ids=segment_ids[chunk_start:chunk_stop] if segment_ids is not None else None,
            context=context,
        )
        if hierarchical:  # one chunk: all coordinates
            sums = [{k: v[i] for k, v in context.segment_sums.items()} for i in range(len(entries))]
            if shards:
                # Each shard was normalised over itself: rescaled to its whole tensor's sums.
                shard_sums = sums
                sums, counts = _sums_over_shards(
                    entries, sums, _sum_template(rule, entries, sums, None, None), reduce_shards
                )
                for i in shards if rescales else ():
                    start, stop = flat.offsets[i], flat.offsets[i + 1]
                    if stop > start:
                        piece = update[start:stop]
                        piece.copy_(rule.rescale_split_update(piece, shard_sums[i], stop - start, sums[i], counts[i]))
        offset = 0
        # Foreach ops per (lr, decay factor); fp32 updates for every dtype, so a bf16 param gets
        # one rounding, as on the eager path. Decay in a low-precision param dtype (or masked)
        # goes tensor by tensor, decay and update rounded together.
        groups: dict[tuple[object, float], tuple[float | Tensor, list[Tensor], list[Tensor]]] = {}
        for index, start, stop in pieces:
            e = entries[index]
            target, piece_update = flat_params[index][start:stop], update[offset : offset + stop - start]
            offset += stop - start
            if e.weight_decay != 0.0 and (masked or target.dtype not in (torch.float32, torch.float64)):
                _apply_update(target, piece_update, e.lr, _decay_factor(e, keep[index]))
                continue
            # A tensor lr groups by identity: comparing its value would read it back.
            key = (id(e.lr) if isinstance(e.lr, Tensor) else e.lr, e.weight_decay)
            _, targets, updates = groups.setdefault(key, (e.lr, [], []))
            targets.append(target)
            updates.append(piece_update)
        for (_, weight_decay), (lr, targets, updates) in groups.items():
            if weight_decay != 0.0:
                torch._foreach_mul_(targets, _plain_decay_factor(lr, weight_decay, targets[0]))
            if isinstance(lr, Tensor):
                # The update buffer is scratch: scale it in place rather than allocate.
                torch._foreach_mul_(updates, lr.to(device=device, dtype=torch.float32).reshape(()))
                torch._foreach_add_(targets, updates)
            else:
                torch._foreach_add_(targets, updates, alpha=lr)
    for e, flat_param in zip(entries, flat_params, strict=True):
        if not e.param.is_contiguous():
            e.param.copy_(flat_param.view(e.param.shape))
    if hierarchical and total == 0 and shards:
        # No coordinates here, but the shards' sums are added up on every rank.
        sums = [{} for _ in entries]
        template = _sum_template(rule, entries, sums, global_state, context.step_scales)
        sums, counts = _sums_over_shards(entries, sums, template, reduce_shards)
    if hierarchical and sums:
        _finalize(rule, entries, sums, keep, global_state, counts)
    return skipped


def _plain_decay_factor(lr: float | Tensor, weight_decay: float, like: Tensor) -> float | Tensor:
    """``1 - lr * weight_decay`` for an unmasked fp32/fp64 group (a device tensor for a tensor lr)."""
    if isinstance(lr, Tensor):
        return 1.0 - lr.to(device=like.device, dtype=like.dtype).reshape(()) * weight_decay
    return 1.0 - lr * weight_decay


def _pieces_between(offsets: Sequence[int], start: int, stop: int) -> list[tuple[int, int, int]]:
    """``(tensor index, local start, local stop)`` of every tensor overlapping ``[start, stop)``."""
    pieces = []
    for index in range(len(offsets) - 1):
        lo, hi = max(offsets[index], start), min(offsets[index + 1], stop)
        if lo < hi:
            pieces.append((index, lo - offsets[index], hi - offsets[index]))
    return pieces
