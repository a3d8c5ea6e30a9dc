"""DTensor parameters (FSDP2's ``fully_shard``, tensor parallelism) for ``LearnedOptimizer``.

Each rank steps its local shard: a coordinate's update reads only that coordinate's gradient
and state, and whatever a rule reads of the whole tensor (an LSTM's per-tensor inputs; the
hierarchical RNN's parameter RMS, the sums that normalise its step and feed its tensor and
global levels) is summed over the shards by all-reduces (:func:`shard_sum_reducer`). So the
shards together take the unsharded step, and the tensor-level and global state, computed
from the same sums on every rank, stay the same everywhere. The state of a shard is kept as
an ordinary ``(local numel, ...)`` tensor;
``state_dict`` hands it out as a DTensor shaped ``(*param.shape, ...)`` with the parameter's
mesh and placements, which is what ``torch.distributed.checkpoint`` saves and reshards.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence

import torch
from torch import Tensor


def is_dtensor(t: object) -> bool:
    """Whether ``t`` is a DTensor (without importing torch.distributed.tensor, 0.5 s)."""
    # No DTensor exists before its module is imported.
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def local_part(t: Tensor) -> Tensor:
    """This rank's shard of a DTensor (a view: writing it writes the DTensor), else ``t``."""
    return t.to_local() if is_dtensor(t) else t


def local_coordinates(p: Tensor) -> Tensor:
    """The real tensor a step updates for ``p``: its local shard, complex viewed as real pairs."""
    local = local_part(p)
    return torch.view_as_real(local) if local.is_complex() else local


def gradient_like(p: Tensor, grad: Tensor, which: str) -> Tensor:
    """``grad`` laid out as the DTensor parameter ``p`` is (a partial or replicated gradient
    is reduced or sliced: a collective every rank of the mesh makes for the same parameter)."""
    if not is_dtensor(grad):
        raise TypeError(
            f"LearnedOptimizer: {which} (shape {tuple(p.shape)}) is a DTensor but its gradient is an "
            "ordinary tensor; both must be DTensors on the same device mesh"
        )
    if grad.device_mesh != p.device_mesh:
        raise ValueError(
            f"LearnedOptimizer: {which} (shape {tuple(p.shape)}) and its gradient live on different "
            f"device meshes ({p.device_mesh} and {grad.device_mesh})"
        )
    if tuple(grad.placements) != tuple(p.placements):
        grad = grad.redistribute(p.device_mesh, p.placements)
    return grad


def _coordinate_shapes(p: Tensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes of the real coordinates of DTensor ``p``: whole and this rank's shard (a complex
    parameter's real and imaginary parts are a trailing dimension of 2)."""
    pair = (2,) if p.is_complex() else ()
    return (*p.shape, *pair), (*p.to_local().shape, *pair)


def sharded_state(value: Tensor, p: Tensor) -> Tensor:
    """The DTensor ``(*p.shape, *trailing)`` (``(*p.shape, 2, *trailing)`` for a complex ``p``)
    whose shard on this rank is ``value``, the rule state ``(local rows, *trailing)`` of DTensor
    parameter ``p``."""
    from torch.distributed.tensor import DTensor

    trailing = tuple(value.shape[1:])
    whole, local = _coordinate_shapes(p)
    if value.storage_offset() != 0:
        # A view into the fused kernels' flat buffer: a DTensor over it cannot be pickled or
        # deep-copied (torch 2.13), so it gets its own copy.
        value = value.clone()
    shape = (*whole, *trailing)
    stride = tuple(math.prod(shape[i + 1 :]) for i in range(len(shape)))
    return DTensor.from_local(
        value.view((*local, *trailing)),
        p.device_mesh,
        p.placements,
        run_check=False,
        shape=torch.Size(shape),
        stride=stride,
    )


def local_state(value: Tensor, p: Tensor, trailing: tuple[int, ...], where: str) -> Tensor:
    """Saved rule state of parameter ``p`` as this rank's rows ``(local rows, *trailing)``.

    Takes a DTensor laid out as ``p`` (what ``state_dict`` saves for a DTensor parameter), or
    a whole tensor ``(rows, *trailing)`` / ``(*p.shape, *trailing)`` (saved unsharded, or
    gathered with ``full_state_dict``), of which this rank takes its shard. Anything else is
    returned as is, for the shape check that follows to name.
    """
    from torch.distributed.tensor import distribute_tensor

    whole, _ = _coordinate_shapes(p)
    full_shape = (*whole, *trailing)
    if is_dtensor(value):
        if value.device_mesh != p.device_mesh:
            raise ValueError(
                f"optimizer state_dict: {where} is a DTensor on device mesh {value.device_mesh}, "
                f"the parameter's is {p.device_mesh}; load it through torch.distributed.checkpoint to reshard it"
            )
        if tuple(value.shape) != full_shape:
            return value.to_local()  # a wrong shape: named by the caller's check
        if tuple(value.placements) != tuple(p.placements):
            value = value.redistribute(p.device_mesh, p.placements)
        local = value.to_local()
    elif isinstance(value, Tensor) and tuple(value.shape) in (full_shape, (math.prod(whole), *trailing)):
        # Every rank holds the whole tensor: each takes its own shard, no communication.
        local = distribute_tensor(value.reshape(full_shape), p.device_mesh, p.placements, src_data_rank=None)
        local = local.to_local()
    else:
        return value
    return local.reshape(-1, *trailing)


def parameter_shaped_state(value: Tensor, p: Tensor) -> Tensor:
    """The rule state ``(numel, *trailing)`` of ordinary parameter ``p`` as a view
    ``(*p.shape, *trailing)`` (``(*p.shape, 2, *trailing)`` for a complex ``p``): the layout a
    DTensor parameter's state is saved in, so that checkpoints move between the two (a
    ``torch.distributed.checkpoint`` of a plain model loads into FSDP2 and back). Rows that no
    longer match ``p`` (resized in place) are returned as they are, for the load check to name."""
    whole = (*p.shape, 2) if p.is_complex() else tuple(p.shape)
    if value.dim() == 0 or value.shape[0] != math.prod(whole):
        return value
    return value.reshape(*whole, *value.shape[1:])


def whole_tensor_state(value: Tensor, p: Tensor, trailing: tuple[int, ...], where: str) -> Tensor:
    """Saved state ``(*p.shape, *trailing)`` of an ordinary parameter (a DTensor parameter's
    state gathered whole) as the ``(numel, *trailing)`` rows kept here; else ``value`` as is."""
    if is_dtensor(value):
        raise ValueError(
            f"optimizer state_dict: {where} is a DTensor (saved from a sharded parameter) but this "
            "parameter is an ordinary tensor; gather it first (torch.distributed.checkpoint's "
            "get_optimizer_state_dict with StateDictOptions(full_state_dict=True))"
        )
    whole = (*p.shape, 2) if p.is_complex() else tuple(p.shape)
    if tuple(value.shape) == (*whole, *trailing):
        return value.reshape(math.prod(whole), *trailing)
    return value


def global_nonfinite_flags(
    params: Sequence[Tensor],
    grads: Sequence[Tensor | None],
    names: Sequence[str],
    *,
    check_consistency: bool = True,
) -> list[Tensor | None]:
    """Per DTensor parameter, whether its gradient holds inf/NaN on any rank of its mesh (one
    all-reduce per mesh), so that all shards of a tensor skip a step together; ``None`` for a
    parameter without a gradient.

    ``params`` must be all DTensor parameters of the optimizer, in its order, on every rank
    (``names`` name them in errors): the same all-reduce also counts the ranks that have each
    gradient. With
    ``check_consistency`` (a host read; left out while a CUDA graph captures the step), a
    parameter whose gradient is ``None`` on some ranks of its mesh only raises ``RuntimeError``
    on every rank, before anything is updated: the per-tensor sums would pair the wrong
    tensors' shards.
    """
    import torch.distributed as dist

    from learned_optim.functional import nonfinite_mask

    flags: list[Tensor | None] = [None] * len(params)
    by_mesh: dict[object, list[int]] = {}
    for i, p in enumerate(params):
        by_mesh.setdefault(p.device_mesh, []).append(i)
    for mesh, indices in by_mesh.items():
        rows = [row for row, i in enumerate(indices) if grads[i] is not None]
        device = params[indices[0]].to_local().device
        # [has gradient, non-finite] per parameter, summed over the mesh's ranks.
        counts = torch.zeros(2, len(indices), dtype=torch.float32, device=device)
        if rows:
            with_grad = torch.tensor(rows, device=device)
            counts[0, with_grad] = 1.0
            counts[1, with_grad] = nonfinite_mask([local_part(grads[indices[r]]) for r in rows]).to(torch.float32)
        for dim in range(mesh.ndim):
            if mesh.size(dim) > 1:
                dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=mesh.get_group(dim))
        if check_consistency:
            have = counts[0].cpu().tolist()
            uneven = [f"{names[i]} on {int(n)}" for i, n in zip(indices, have, strict=True) if 0 < n < mesh.size()]
            if uneven:
                raise RuntimeError(
                    f"LearnedOptimizer: {', '.join(uneven)} of the {mesh.size()} ranks of its device mesh "
                    "has a gradient, and None on the others. Every rank "
                    "must step the same parameters (their shards' sums are reduced together): give a "
                    "parameter that a rank did not use a zero gradient (p.grad = torch.zeros_like(p)). "
                    "Nothing was updated."
                )
        for row, i in enumerate(indices):
            if grads[i] is not None:
                flags[i] = counts[1, row] > 0
    return flags


def _sharded_mesh_dims(p: Tensor) -> tuple[int, ...]:
    """The mesh dimensions over which ``p`` is split (not those it is replicated over)."""
    # Not ``is_shard()``: FSDP over a tensor-parallel dimension places ``_StridedShard``,
    # which is no ``Shard`` and answers False to it (torch 2.13).
    return tuple(
        dim for dim, placement in enumerate(p.placements) if not (placement.is_replicate() or placement.is_partial())
    )


def shard_sum_reducer(params: dict[int, Tensor]) -> Callable[[dict[int, Tensor]], dict[int, Tensor]]:
    """For DTensor parameters by entry index: a function that turns per-shard sums into sums
    over each whole tensor, with one all-reduce per mesh and set of sharded mesh dimensions."""
    import torch.distributed as dist

    def reduce(sums: dict[int, Tensor]) -> dict[int, Tensor]:
        groups: dict[tuple[object, tuple[int, ...]], list[int]] = {}
        for index in sums:
            p = params[index]
            groups.setdefault((p.device_mesh, _sharded_mesh_dims(p)), []).append(index)
        reduced = {}
        for (mesh, dims), indices in groups.items():
            stacked = torch.stack([sums[i] for i in indices])
            for dim in dims:
                if mesh.size(dim) > 1:
                    dist.all_reduce(stacked, group=mesh.get_group(dim))
            reduced.update(zip(indices, stacked.unbind(0), strict=True))
        return reduced

    return reduce
