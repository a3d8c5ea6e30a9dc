"""The learned step as a function over many tensors: flatten, chunk, run the rule, scatter.

This is the eager multi-tensor path. Every coordinate of every parameter goes through
the rule as one flat batch, cut into chunks of at most ``chunk_size`` coordinates (a
chunk may span several small tensors; a large tensor spans several chunks), so there is
one rule call per chunk and never one per tensor. Nothing here reads values back to the
host: the non-finite check is a device-side mask.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from learned_optim.rules.base import RuleState, StepContext, UpdateRule

DEFAULT_CHUNK_SIZE = 1 << 16


@dataclass
class StepEntry:
    """One parameter tensor's view of a step: its data, gradient, rule state and group options."""

    param: Tensor
    grad: Tensor
    state: RuleState
    lr: float
    weight_decay: float
    maximize: bool


@dataclass
class _Piece:
    entry_index: int
    start: int
    stop: int


def plan_chunks(numels: Sequence[int], chunk_size: int) -> Iterator[list[_Piece]]:
    """Cut the concatenation of tensors of sizes ``numels`` into chunks of ``chunk_size``."""
    chunk: list[_Piece] = []
    room = chunk_size
    for index, numel in enumerate(numels):
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
    maxima = torch._foreach_norm([g.detach().reshape(-1) for g in grads], float("inf"))
    return ~torch.isfinite(torch.stack([m.float() for m in maxima]))


@torch.no_grad()
def learned_step(
    rule: UpdateRule,
    entries: Sequence[StepEntry],
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    nonfinite: str = "skip",
) -> Tensor | None:
    """Update ``entries`` in place with one step of ``rule``.

    Args:
        rule: the update rule (on the entries' device).
        entries: parameters with their gradients and rule state (all on one device).
        chunk_size: coordinates per rule call.
        nonfinite: ``"skip"`` leaves a parameter with a non-finite gradient and its state
            unchanged; ``"error"`` raises before anything is modified.

    Returns:
        A bool tensor marking the entries that were skipped (``None`` if no entries).
    """
    if not entries:
        return None
    device = entries[0].param.device
    skipped = nonfinite_mask([e.grad for e in entries])
    if nonfinite == "error" and bool(skipped.any()):
        bad = [i for i, s in enumerate(skipped.tolist()) if s]
        raise FloatingPointError(f"non-finite gradient in parameter tensor(s) {bad} of this step")
    keep = ~skipped

    # Decoupled weight decay, not applied to skipped parameters.
    for i, e in enumerate(entries):
        if e.weight_decay != 0.0:
            factor = torch.where(keep[i], 1.0 - e.lr * e.weight_decay, 1.0).to(e.param.dtype)
            e.param.mul_(factor)

    # Non-contiguous parameters (e.g. channels_last) are updated through a contiguous copy.
    flat_params = [e.param.view(-1) if e.param.is_contiguous() else e.param.contiguous().view(-1) for e in entries]
    flat_grads = [e.grad.reshape(-1) for e in entries]
    compute_dtype = torch.float32
    needs_segments = getattr(rule, "needs_segments", False)
    keys = list(entries[0].state)

    for chunk in plan_chunks([p.numel() for p in flat_params], chunk_size):
        lengths = [piece.stop - piece.start for piece in chunk]
        grad_parts = []
        for piece in chunk:
            e = entries[piece.entry_index]
            g = flat_grads[piece.entry_index][piece.start : piece.stop].to(compute_dtype)
            grad_parts.append(-g if e.maximize else g)
        grad = torch.cat(grad_parts) if len(grad_parts) > 1 else grad_parts[0]
        state = {
            k: torch.cat([entries[p.entry_index].state[k][p.start : p.stop] for p in chunk])
            for k in keys
        }
        lengths_t = torch.tensor(lengths, device=device)
        keep_coord = torch.repeat_interleave(keep[[p.entry_index for p in chunk]], lengths_t)
        grad = torch.where(keep_coord, grad, 0.0)
        context = None
        if needs_segments:
            context = StepContext(
                segment_ids=torch.repeat_interleave(torch.arange(len(chunk), device=device), lengths_t),
                num_segments=len(chunk),
            )
        update, new_state = rule(grad, state, context)
        update = torch.where(keep_coord, update, 0.0)

        offset = 0
        for piece, length in zip(chunk, lengths, strict=True):
            e = entries[piece.entry_index]
            sl = slice(offset, offset + length)
            for k in keys:
                old = e.state[k][piece.start : piece.stop]
                mask = keep_coord[sl].view(-1, *([1] * (old.dim() - 1)))
                old.copy_(torch.where(mask, new_state[k][sl], old))
            flat_params[piece.entry_index][piece.start : piece.stop].add_(update[sl], alpha=e.lr)
            offset += length
    for e, flat in zip(entries, flat_params, strict=True):
        if not e.param.is_contiguous():
            e.param.copy_(flat.view(e.param.shape))
    return skipped
