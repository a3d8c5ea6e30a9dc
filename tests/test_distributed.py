"""LearnedOptimizer with torch.distributed's checkpoint helpers and ZeroRedundancyOptimizer.

The checkpoint helpers (get/set_optimizer_state_dict) also serve plain models, so they run in
this process; ZeroRedundancyOptimizer and DTensors need a process group: two CPU processes
over gloo, started by torch.multiprocessing.
"""

from __future__ import annotations

import copy
import io
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from learned_optim import CoordinateLSTM, HierarchicalRNN, LearnedOptimizer

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")

RULES = [None, "hrnn-base"]  # the default LSTM rule, and a rule with global state


def make_model(hidden: int = 16, outputs: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, hidden), nn.Tanh(), nn.Linear(hidden, outputs))


def train(model: nn.Module, optimizer: torch.optim.Optimizer, start: int, stop: int, outputs: int = 4) -> None:
    for step in range(start, stop):
        generator = torch.Generator().manual_seed(step)
        inputs, targets = torch.randn(32, 8, generator=generator), torch.randn(32, outputs, generator=generator)
        optimizer.zero_grad()
        nn.functional.mse_loss(model(inputs), targets).backward()
        optimizer.step()


def same_parameters(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))


# ---------------------------------------------------------------------- distributed checkpoint
@pytest.mark.parametrize("pretrained", RULES)
@pytest.mark.parametrize("impl", ["auto", "eager"])
def test_dcp_get_and_set_optimizer_state_dict_resume_exactly(pretrained: str | None, impl: str) -> None:
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    model = make_model()
    optimizer = LearnedOptimizer(model.parameters(), pretrained=pretrained, impl=impl)
    train(model, optimizer, 0, 3)
    # get_optimizer_state_dict keeps only "state" and "param_groups" (keyed by parameter name):
    # the rule is named by its fingerprint in the groups, a global state by its copy in the state.
    saved = copy.deepcopy(get_optimizer_state_dict(model, optimizer))
    assert set(saved) == {"state", "param_groups"}
    saved_model = copy.deepcopy(model.state_dict())
    train(model, optimizer, 3, 7)

    resumed = make_model()
    resumed.load_state_dict(saved_model)
    resumed_optimizer = LearnedOptimizer(resumed.parameters(), pretrained=pretrained, impl=impl)
    set_optimizer_state_dict(resumed, resumed_optimizer, saved)
    train(resumed, resumed_optimizer, 3, 7)
    assert same_parameters(model, resumed)


@pytest.mark.parametrize("pretrained", [None, "lstm-mnist-gain"])
def test_dcp_flattened_state_dicts_resume_exactly(pretrained: str | None) -> None:
    # flatten_optimizer_state_dict=True (torchtitan's choice) restores only the group keys the
    # live groups have: the fingerprint is one of them.
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    flat = StateDictOptions(flatten_optimizer_state_dict=True)
    model = make_model()
    optimizer = LearnedOptimizer(model.parameters(), pretrained=pretrained)
    train(model, optimizer, 0, 3)
    saved = copy.deepcopy(get_optimizer_state_dict(model, optimizer, options=flat))
    assert "param_groups.0.weight.rule_sha256" in saved
    saved_model = copy.deepcopy(model.state_dict())
    train(model, optimizer, 3, 7)

    resumed = make_model()
    resumed.load_state_dict(saved_model)
    resumed_optimizer = LearnedOptimizer(resumed.parameters(), pretrained=pretrained)
    set_optimizer_state_dict(resumed, resumed_optimizer, saved, options=flat)
    train(resumed, resumed_optimizer, 3, 7)
    assert same_parameters(model, resumed)

    torch.manual_seed(1)  # same type and config, other weights: refused by the fingerprint
    other_model = make_model()
    other = LearnedOptimizer(other_model.parameters(), pretrained=CoordinateLSTM(**optimizer.rule.config))
    with pytest.raises(ValueError, match="different update rule"):
        set_optimizer_state_dict(other_model, other, saved, options=flat)


def test_dcp_flattened_state_dict_of_a_hierarchical_rule_is_refused_before_anything_changes() -> None:
    # Unflattening keeps only the state keys live parameters have: the global state's copy is lost.
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    flat = StateDictOptions(flatten_optimizer_state_dict=True)
    model = make_model()
    optimizer = LearnedOptimizer(model.parameters(), pretrained="hrnn-base")
    train(model, optimizer, 0, 2)
    saved = copy.deepcopy(get_optimizer_state_dict(model, optimizer, options=flat))
    resumed = make_model()
    resumed_optimizer = LearnedOptimizer(resumed.parameters(), pretrained="hrnn-base")
    train(resumed, resumed_optimizer, 0, 1)
    before = copy.deepcopy(resumed_optimizer.state_dict())
    with pytest.raises(ValueError, match="flatten_optimizer_state_dict=True drops it"):
        set_optimizer_state_dict(resumed, resumed_optimizer, saved, options=flat)
    after = resumed_optimizer.state_dict()
    assert all(torch.equal(after["state"][i][k], v) for i, values in before["state"].items() for k, v in values.items())


@pytest.mark.parametrize("pretrained", RULES)
def test_dcp_creating_state_before_the_first_step_leaves_the_run_unchanged(pretrained: str | None) -> None:
    # The helpers create missing state with a step at lr 0 on all-zero gradients; that step must
    # only create the state, not advance it.
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    reference = make_model()
    reference_optimizer = LearnedOptimizer(reference.parameters(), pretrained=pretrained)
    train(reference, reference_optimizer, 0, 5)

    model = make_model()
    optimizer = LearnedOptimizer(model.parameters(), pretrained=pretrained)
    before = [p.detach().clone() for p in model.parameters()]
    get_optimizer_state_dict(model, optimizer)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    assert all(p.grad is None for p in model.parameters())
    train(model, optimizer, 0, 5)
    assert same_parameters(model, reference)


def test_dcp_creating_state_before_a_compiled_first_step_leaves_the_run_unchanged() -> None:
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    reference = make_model()
    reference_optimizer = LearnedOptimizer(reference.parameters())
    train(reference, reference_optimizer, 0, 3)

    model = make_model()
    optimizer = LearnedOptimizer(model.parameters())
    optimizer.step = torch.compile(optimizer.step)  # the helpers' step runs compiled too
    get_optimizer_state_dict(model, optimizer)
    train(model, optimizer, 0, 3)
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)  # compiled vs eager: rounding only


def _write_state_directly(optimizer: LearnedOptimizer, saved: dict) -> None:
    """Load per-parameter state as ZeroRedundancyOptimizer does: straight into ``optimizer.state``."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, values in saved["state"].items():
        optimizer.state[params[index]] = copy.deepcopy(values)


def test_a_global_state_copy_written_into_parameter_state_is_taken_up_at_once() -> None:
    model = make_model()
    optimizer = LearnedOptimizer(model.parameters(), pretrained="hrnn-base")
    train(model, optimizer, 0, 3)
    saved = copy.deepcopy(optimizer.state_dict())

    def resumed_pair(direct: bool) -> tuple[nn.Module, LearnedOptimizer]:
        resumed = make_model()
        resumed.load_state_dict(model.state_dict())
        resumed_optimizer = LearnedOptimizer(resumed.parameters(), pretrained="hrnn-base")
        if direct:
            _write_state_directly(resumed_optimizer, saved)
        else:
            resumed_optimizer.load_state_dict(saved)
        return resumed, resumed_optimizer

    # Saved again before any step: the re-saved global state is the loaded one.
    _, direct = resumed_pair(direct=True)
    assert torch.equal(direct.state_dict()["rule_global_state"]["h"], saved["rule_global_state"]["h"])

    # A step in which the parameter holding the copy has no gradient still uses it.
    results = []
    for is_direct in (True, False):
        resumed, resumed_optimizer = resumed_pair(is_direct)
        first_of_resumed = next(resumed.parameters())
        for step in range(3, 6):
            generator = torch.Generator().manual_seed(step)
            inputs, targets = torch.randn(32, 8, generator=generator), torch.randn(32, 4, generator=generator)
            resumed_optimizer.zero_grad()
            nn.functional.mse_loss(resumed(inputs), targets).backward()
            if step == 3:
                first_of_resumed.grad = None
            resumed_optimizer.step()
        results.append(resumed)
    assert same_parameters(*results)


def test_state_dict_keeps_non_parameter_keys_of_the_state() -> None:
    # torch.optim allows other keys in optimizer.state and saves them as they are.
    model = make_model()
    optimizer = LearnedOptimizer(model.parameters(), pretrained="hrnn-base")
    train(model, optimizer, 0, 1)
    optimizer.state["my_counter"] = {"count": 3}
    saved = optimizer.state_dict()
    assert saved["state"]["my_counter"] == {"count": 3}
    assert "rule_global.h" in saved["state"][0]


def test_a_zero_gradient_step_at_lr_0_advances_state_that_exists() -> None:
    # Only the first, state-creating step is special: later ones are ordinary steps.
    model = make_model()
    optimizer = LearnedOptimizer(model.parameters())
    train(model, optimizer, 0, 1)
    h = optimizer.state[model[0].weight]["rule.h"].clone()
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    assert not torch.equal(optimizer.state[model[0].weight]["rule.h"], h)


def test_dcp_state_dict_of_another_rule_is_refused() -> None:
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    model = make_model()
    optimizer = LearnedOptimizer(model.parameters(), pretrained="lstm-mnist")
    train(model, optimizer, 0, 2)
    saved = copy.deepcopy(get_optimizer_state_dict(model, optimizer))

    other = make_model()
    # Same type and config (the state fits), other weights: only the fingerprint tells them apart.
    torch.manual_seed(1)
    rule = CoordinateLSTM(**optimizer.rule.config)
    other_optimizer = LearnedOptimizer(other.parameters(), pretrained=rule)
    with pytest.raises(ValueError, match="different update rule"):
        set_optimizer_state_dict(other, other_optimizer, saved)


def test_dcp_state_dict_of_a_hierarchical_rule_without_its_global_state_is_refused() -> None:
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    model = make_model()
    optimizer = LearnedOptimizer(model.parameters(), pretrained="hrnn-base")
    train(model, optimizer, 0, 2)
    saved = copy.deepcopy(get_optimizer_state_dict(model, optimizer))
    for values in saved["state"].values():
        for key in [k for k in values if k.startswith("rule_global.")]:
            del values[key]
    saved["state"] = {i: saved["state"][name] for i, name in enumerate(saved["param_groups"][0]["params"])}
    saved["param_groups"][0]["params"] = list(range(len(saved["state"])))
    with pytest.raises(ValueError, match="without its global state"):
        optimizer.load_state_dict(saved)


# ---------------------------------------------------------------------- process groups
def spawn(worker: Callable[..., None], world_size: int, tmp_path: Path, *args: object) -> None:
    """Run ``worker(rank, world_size, init_file, *args)`` on ``world_size`` processes.

    Once in a few dozen runs on a loaded 2-core machine, a gloo process dies of SIGABRT
    ("terminate called without an active exception", from a native thread, with no Python
    frame on any thread): that run is started again once, from scratch. A worker's failed
    assertion or error is a Python exception and fails the test at once.
    """
    import torch.multiprocessing as mp

    for attempt in range(2):
        init_file = str(tmp_path / f"init-{worker.__name__}-{attempt}")
        try:
            mp.spawn(worker, args=(world_size, init_file, *args), nprocs=world_size, join=True)
            return
        except mp.ProcessExitedException as err:
            if err.signal_name != "SIGABRT" or attempt == 1:
                raise
            # Shown in pytest's warnings summary, so a retry is never silent.
            warnings.warn(
                f"{worker.__name__}: a gloo process died of SIGABRT ({err}); started again once", stacklevel=2
            )


def _zero_worker(rank: int, world_size: int, init_file: str) -> None:
    """One rank: ZeroRedundancyOptimizer resumes exactly."""
    import torch.distributed as dist
    from torch.distributed.optim import ZeroRedundancyOptimizer

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        torch.set_num_threads(1)
        for pretrained in RULES:
            # Every rank sees the same batch, so a ZeRO step equals an unsharded one for a
            # coordinatewise rule. A hierarchical rule's global state sees only its rank's tensors.
            uninterrupted = make_model()
            zero = ZeroRedundancyOptimizer(
                uninterrupted.parameters(), optimizer_class=LearnedOptimizer, pretrained=pretrained
            )
            train(uninterrupted, zero, 0, 6)
            if pretrained is None:
                single = make_model()
                train(single, LearnedOptimizer(single.parameters()), 0, 6)
                assert same_parameters(uninterrupted, single), "ZeRO differs from one process"

            interrupted = make_model()
            zero = ZeroRedundancyOptimizer(
                interrupted.parameters(), optimizer_class=LearnedOptimizer, pretrained=pretrained
            )
            train(interrupted, zero, 0, 3)
            zero.consolidate_state_dict(to=0)
            saved = [copy.deepcopy(zero.state_dict()) if rank == 0 else None]
            dist.broadcast_object_list(saved, src=0)
            saved_model = copy.deepcopy(interrupted.state_dict())

            resumed = make_model()
            resumed.load_state_dict(saved_model)
            zero = ZeroRedundancyOptimizer(
                resumed.parameters(), optimizer_class=LearnedOptimizer, pretrained=pretrained
            )
            zero.load_state_dict(saved[0])
            # Saved again before the next step (a checkpoint at the top of an epoch): the
            # loaded state, global state included, must be what is saved.
            zero.consolidate_state_dict(to=0)
            saved_again = [copy.deepcopy(zero.state_dict()) if rank == 0 else None]
            dist.broadcast_object_list(saved_again, src=0)
            train(resumed, zero, 3, 6)
            assert same_parameters(resumed, uninterrupted), f"ZeRO resume differs ({pretrained})"

            again = make_model()
            again.load_state_dict(saved_model)
            zero = ZeroRedundancyOptimizer(again.parameters(), optimizer_class=LearnedOptimizer, pretrained=pretrained)
            zero.load_state_dict(saved_again[0])
            train(again, zero, 3, 6)
            assert same_parameters(again, uninterrupted), (
                f"ZeRO resume from a re-saved checkpoint differs ({pretrained})"
            )

        # ZeRO writes a checkpoint's state in directly, past LearnedOptimizer.load_state_dict: the
        # fingerprint it copies into the live groups refuses another rule with the same state layout.
        model = make_model()
        zero = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=LearnedOptimizer, pretrained="lstm-mnist")
        train(model, zero, 0, 2)
        zero.consolidate_state_dict(to=0)
        saved = [copy.deepcopy(zero.state_dict()) if rank == 0 else None]
        dist.broadcast_object_list(saved, src=0)
        other = make_model()
        zero = ZeroRedundancyOptimizer(
            other.parameters(), optimizer_class=LearnedOptimizer, pretrained="lstm-mnist-mixed"
        )
        zero.load_state_dict(saved[0])
        before = copy.deepcopy(other.state_dict())
        with pytest.raises(RuntimeError, match="names another update rule"):
            train(other, zero, 2, 3)
        assert all(torch.equal(v, other.state_dict()[k]) for k, v in before.items())

        dist.barrier()  # no rank tears its group down while another still talks to it
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(sys.platform == "win32", reason="gloo file store")
def test_zero_redundancy_optimizer_resumes_exactly(tmp_path: Path) -> None:
    spawn(_zero_worker, 2, tmp_path)


# ---------------------------------------------------------------------- DTensor parameters
def make_sharded_model(model: nn.Module | None = None) -> nn.Module:
    """``model`` (default ``make_model()``) under FSDP2, each Linear its own unit."""
    from torch.distributed.fsdp import fully_shard

    model = make_model() if model is None else model
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    return fully_shard(model)


def gathered(model: nn.Module) -> list[torch.Tensor]:
    return [(p.full_tensor() if hasattr(p, "full_tensor") else p).detach() for p in model.parameters()]


def max_difference(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


# FSDP2 runs checkpointed and resumed in every way: the default LSTM and a rule with
# tensor-level and global state, each through the fused kernel and eagerly.
CHECKPOINT_RUNS = [(None, "auto"), (None, "eager"), ("hrnn-base", "auto"), ("hrnn-base", "eager")]


def checkpoint_tolerance(pretrained: str | None, impl: str) -> float:
    """How far FSDP2 training may end from one process's: the LSTM's fused kernel is the same
    arithmetic on any rows; eager matmuls over other row counts can differ in the last bit, and
    the hierarchical RNN's per-tensor sums add up in another order."""
    return 0.0 if pretrained is None and impl == "auto" else 1e-6


def _dtensor_worker(rank: int, world_size: int, init_file: str, checkpoint_dir: str) -> None:
    """One rank: FSDP2 and tensor-parallel parameters step as one process would; their state
    round-trips through torch.distributed.checkpoint, sharded and gathered."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor, init_device_mesh
    from torch.distributed.tensor.placement_types import _StridedShard

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        torch.set_num_threads(1)
        for pretrained, impl in CHECKPOINT_RUNS:
            name = f"{pretrained}-{impl}"
            # Every rank sees the same batch, so FSDP2's averaged gradient is one process's.
            single = make_model()
            train(single, LearnedOptimizer(single.parameters(), pretrained=pretrained, impl=impl), 0, 6)
            sharded = make_sharded_model()
            optimizer = LearnedOptimizer(sharded.parameters(), pretrained=pretrained, impl=impl)
            train(sharded, optimizer, 0, 6)
            tolerance = checkpoint_tolerance(pretrained, impl)
            assert max_difference(gathered(sharded), gathered(single)) <= tolerance, name

            # Sharded checkpoint: state saved as DTensors laid out as their parameters.
            interrupted = make_sharded_model()
            optimizer = LearnedOptimizer(interrupted.parameters(), pretrained=pretrained, impl=impl)
            train(interrupted, optimizer, 0, 3)
            saved = {
                "model": get_model_state_dict(interrupted),
                "optim": get_optimizer_state_dict(interrupted, optimizer),
            }
            first = saved["optim"]["state"]["0.weight"]["rule.h"]
            assert isinstance(first, DTensor) and first.shape == (16, 8, *optimizer.rule.state_spec()["h"])
            dcp.save(saved, checkpoint_id=f"{checkpoint_dir}/{name}")
            uninterrupted = gathered(sharded)
            if rank == 0:  # for _resharding_worker
                torch.save(uninterrupted, f"{checkpoint_dir}/{name}-uninterrupted.pt")

            resumed = make_sharded_model()
            resumed_optimizer = LearnedOptimizer(resumed.parameters(), pretrained=pretrained, impl=impl)
            loaded = {
                "model": get_model_state_dict(resumed),
                "optim": get_optimizer_state_dict(resumed, resumed_optimizer),
            }
            dcp.load(loaded, checkpoint_id=f"{checkpoint_dir}/{name}")
            set_model_state_dict(resumed, loaded["model"])
            set_optimizer_state_dict(resumed, resumed_optimizer, loaded["optim"])
            train(resumed, resumed_optimizer, 3, 6)
            assert max_difference(gathered(resumed), uninterrupted) == 0, f"sharded checkpoint resume differs ({name})"
            if pretrained is None:  # flattened (torchtitan's layout): the same, for a rule without global state
                flat = StateDictOptions(flatten_optimizer_state_dict=True)
                dcp.save(
                    {"optim": get_optimizer_state_dict(interrupted, optimizer, options=flat)},
                    checkpoint_id=f"{checkpoint_dir}/{name}-flat",
                )
                resumed = make_sharded_model()
                resumed.load_state_dict(get_model_state_dict(interrupted))
                resumed_optimizer = LearnedOptimizer(resumed.parameters(), impl=impl)
                loaded = {"optim": get_optimizer_state_dict(resumed, resumed_optimizer, options=flat)}
                dcp.load(loaded, checkpoint_id=f"{checkpoint_dir}/{name}-flat")
                set_optimizer_state_dict(resumed, resumed_optimizer, loaded["optim"], options=flat)
                train(resumed, resumed_optimizer, 3, 6)
                assert max_difference(gathered(resumed), uninterrupted) == 0, f"flattened resume differs ({name})"

            # Gathered whole (full_state_dict) and resumed in one process, and the other way round.
            whole = StateDictOptions(full_state_dict=True)
            gathered_state = get_optimizer_state_dict(interrupted, optimizer, options=whole)
            one_process = make_model()
            one_process.load_state_dict(get_model_state_dict(interrupted, options=whole))
            one_optimizer = LearnedOptimizer(one_process.parameters(), pretrained=pretrained, impl=impl)
            set_optimizer_state_dict(one_process, one_optimizer, gathered_state)
            plain = copy.deepcopy(one_optimizer.state_dict())
            train(one_process, one_optimizer, 3, 6)
            assert max_difference(gathered(one_process), uninterrupted) <= tolerance, (
                f"gathered resume differs ({name})"
            )

            model = make_model()
            model.load_state_dict(get_model_state_dict(interrupted, options=whole))
            resharded = make_sharded_model(model)
            resharded_optimizer = LearnedOptimizer(resharded.parameters(), pretrained=pretrained, impl=impl)
            resharded_optimizer.load_state_dict(plain)  # each rank takes its rows of the whole state
            train(resharded, resharded_optimizer, 3, 6)
            assert max_difference(gathered(resharded), uninterrupted) <= tolerance, (
                f"one-process state into FSDP2 differs ({name})"
            )

            # Per-rank checkpoints: torch.save and deepcopy take the DTensor state (a DTensor over
            # a view into the fused kernels' flat buffer could not be pickled).
            buffer = io.BytesIO()
            torch.save(optimizer.state_dict(), buffer)
            buffer.seek(0)
            per_rank = torch.load(buffer, weights_only=False)
            copied = copy.deepcopy(optimizer.state_dict())
            for saved_state in (per_rank, copied):
                again = LearnedOptimizer(interrupted.parameters(), pretrained=pretrained, impl=impl)
                again.load_state_dict(saved_state)
                for p in interrupted.parameters():
                    assert all(torch.equal(again.state[p][k], optimizer.state[p][k]) for k in optimizer.state[p])

            # A sharded state_dict does not load into ordinary tensors.
            try:
                LearnedOptimizer(make_model().parameters(), pretrained=pretrained).load_state_dict(
                    optimizer.state_dict()
                )
            except ValueError as err:
                assert "DTensor" in str(err), err
            else:
                raise AssertionError("DTensor state loaded into an ordinary parameter")

        # A non-finite gradient in one rank's shard skips the whole tensor on every rank.
        model = make_sharded_model()
        optimizer = LearnedOptimizer(model.parameters())
        train(model, optimizer, 0, 2)
        before = gathered(model)
        optimizer.zero_grad()
        nn.functional.mse_loss(model(torch.randn(4, 8)), torch.randn(4, 4)).backward()
        if rank == 1:
            next(model.parameters()).grad.to_local()[0, 0] = float("nan")
        with pytest.warns(RuntimeWarning, match="non-finite"):
            optimizer.step()
        after = gathered(model)
        assert torch.equal(after[0], before[0]), "a shard stepped while another had a NaN gradient"
        assert not torch.equal(after[1], before[1])

        # Tensor parallelism: a column-sharded weight, and a replicated one whose gradient is a
        # partial sum (reduced before the step).
        mesh = init_device_mesh("cpu", (world_size,))
        torch.manual_seed(1)
        weights = [torch.randn(3, 6), torch.randn(5)]
        grads = [torch.randn(4, 3, 6), torch.randn(4, world_size, 5)]  # per step (and per rank)
        reference = [nn.Parameter(w.clone()) for w in weights]
        reference_optimizer = LearnedOptimizer(reference)
        distributed = [
            nn.Parameter(distribute_tensor(weights[0], mesh, [Shard(1)])),
            nn.Parameter(distribute_tensor(weights[1], mesh, [Replicate()])),
        ]
        distributed_optimizer = LearnedOptimizer(distributed)
        for step in range(4):
            reference[0].grad, reference[1].grad = grads[0][step], grads[1][step].sum(0)
            reference_optimizer.step()
            distributed[0].grad = distribute_tensor(grads[0][step], mesh, [Shard(1)])
            distributed[1].grad = DTensor.from_local(grads[1][step][rank], mesh, [Partial()])
            distributed_optimizer.step()
        assert max_difference([p.full_tensor() for p in distributed], [p.detach() for p in reference]) <= 1e-6

        # A 0-D and a complex parameter: stepped as one process would, their state saved and loaded.
        torch.manual_seed(2)
        weights = [torch.tensor(0.5), torch.randn(4, 3, dtype=torch.complex64)]
        reference = [nn.Parameter(w.clone()) for w in weights]
        reference_optimizer = LearnedOptimizer(reference)
        distributed = [
            nn.Parameter(distribute_tensor(weights[0], mesh, [Replicate()])),
            nn.Parameter(distribute_tensor(weights[1], mesh, [Shard(0)])),
        ]
        distributed_optimizer = LearnedOptimizer(distributed)
        for step in range(3):
            step_grads = [
                torch.randn(w.shape, dtype=w.dtype, generator=torch.Generator().manual_seed(step)) for w in weights
            ]
            for p, g in zip(reference, step_grads, strict=True):
                p.grad = g
            reference_optimizer.step()
            for p, g in zip(distributed, step_grads, strict=True):
                p.grad = distribute_tensor(g, mesh, p.placements)
            distributed_optimizer.step()
        assert max_difference([p.full_tensor() for p in distributed], [p.detach() for p in reference]) == 0
        reloaded = LearnedOptimizer(distributed)
        reloaded.load_state_dict(distributed_optimizer.state_dict())
        for p in distributed:
            assert all(torch.equal(reloaded.state[p][k], distributed_optimizer.state[p][k]) for k in reloaded.state[p])

        # FSDP over a tensor-parallel dimension places _StridedShard, which is no Shard (torch
        # 2.13): whole-tensor sums must still add up over it (they were 0.05 off when not).
        strided = [_StridedShard(0, split_factor=2)]

        def strided_tensors(seed: int) -> list[torch.Tensor]:
            torch.manual_seed(100 * seed + rank)
            shapes = [(8, 5), (8,)]
            return [
                DTensor.from_local(
                    torch.randn(shape[0] // world_size, *shape[1:]),
                    mesh,
                    strided,
                    run_check=False,
                    shape=torch.Size(shape),
                    stride=torch.empty(shape).stride(),
                )
                for shape in shapes
            ]

        for pretrained in ("lstm-mnist-gain", "hrnn-base"):
            distributed = [nn.Parameter(t) for t in strided_tensors(0)]
            reference = [nn.Parameter(t.full_tensor()) for t in distributed]
            reference_optimizer = LearnedOptimizer(reference, pretrained=pretrained)
            distributed_optimizer = LearnedOptimizer(distributed, pretrained=pretrained)
            for step in range(1, 5):
                step_grads = strided_tensors(step)
                for p, g in zip(reference, step_grads, strict=True):
                    p.grad = g.full_tensor()
                reference_optimizer.step()
                for p, g in zip(distributed, step_grads, strict=True):
                    p.grad = g
                distributed_optimizer.step()
            difference = max_difference([p.full_tensor() for p in distributed], [p.detach() for p in reference])
            assert difference <= 1e-6, (pretrained, difference)

        # torch.compile(optimizer.step): Dynamo cannot trace a step over shards, so the compiled
        # step runs eagerly (a graph break) and equals the plain one.
        plain, compiled = make_sharded_model(), make_sharded_model()
        train(plain, LearnedOptimizer(plain.parameters()), 0, 3)
        compiled_optimizer = LearnedOptimizer(compiled.parameters())
        compiled_optimizer.step = torch.compile(compiled_optimizer.step)
        train(compiled, compiled_optimizer, 0, 3)
        assert max_difference(gathered(compiled), gathered(plain)) == 0

        # Per-tensor inputs read sums over the whole tensor: added up over the shards.
        for impl in ("auto", "eager"):
            single = make_model()
            train(single, LearnedOptimizer(single.parameters(), pretrained="lstm-mnist-gain", impl=impl), 0, 6)
            sharded = make_sharded_model()
            train(sharded, LearnedOptimizer(sharded.parameters(), pretrained="lstm-mnist-gain", impl=impl), 0, 6)
            # Equal but for rounding (2e-6 eagerly); with each shard's own sums it was 0.17 off.
            assert max_difference(gathered(sharded), gathered(single)) <= 1e-5, impl

        # A hierarchical RNN with every per-tensor option (gain, step-size input, step cap):
        # whole-tensor RMS and sums come from all shards, so its tensor and global levels see
        # what one process sees. (An odd layer width leaves rank 1 with empty shards.)
        for impl in ("auto", "eager"):
            torch.manual_seed(5)
            rule = HierarchicalRNN(
                agreement_feature=True, step_gain=True, step_size_feature=True, relative_step_cap=0.02, lr_leak=0.01
            )
            with torch.no_grad():  # the new weights start at zero: give them something to do
                rule.gain_out.weight.normal_(0, 0.3)
                rule.step_size_in.weight.normal_(0, 0.3)
            single = make_model(hidden=3, outputs=1)
            single_optimizer = LearnedOptimizer(single.parameters(), pretrained=copy.deepcopy(rule), impl=impl)
            train(single, single_optimizer, 0, 6, outputs=1)
            sharded = make_sharded_model(make_model(hidden=3, outputs=1))
            sharded_optimizer = LearnedOptimizer(sharded.parameters(), pretrained=copy.deepcopy(rule), impl=impl)
            train(sharded, sharded_optimizer, 0, 6, outputs=1)
            # Rounding only: with each shard's own sums it was 1e-4 off (hrnn-base: 0.017).
            assert max_difference(gathered(sharded), gathered(single)) <= 1e-6, impl
            global_h = sharded_optimizer.state_dict()["rule_global_state"]["h"]
            assert torch.allclose(global_h, single_optimizer.state_dict()["rule_global_state"]["h"], atol=1e-6)

        # A gradient that is None on some ranks only: every rank raises before changing anything,
        # where the shards' sums would have paired the wrong tensors (or the ranks hung).
        for pretrained in (None, "hrnn-base"):
            model = make_sharded_model()
            optimizer = LearnedOptimizer(model.parameters(), pretrained=pretrained)
            train(model, optimizer, 0, 2)
            before = gathered(model)
            saved = copy.deepcopy(optimizer.state_dict())
            params = list(model.parameters())
            missing_by_rank = {
                "one rank misses one": {1: [2]},
                "each misses another": {0: [0], 1: [2]},
                "one misses all": {0: [0, 1, 2, 3]},
            }
            for case, missing in missing_by_rank.items():
                optimizer.zero_grad()
                nn.functional.mse_loss(model(torch.ones(5, 8)), torch.zeros(5, 4)).backward()
                for index in missing.get(rank, []):
                    params[index].grad = None
                with pytest.raises(RuntimeError, match="None on the others") as raised:
                    optimizer.step()
                expected = sorted({i for indices in missing.values() for i in indices})
                assert all(f"parameter {i} " in str(raised.value) for i in expected), (case, str(raised.value))
                assert max_difference(gathered(model), before) == 0, case
                assert torch.equal(
                    optimizer.state_dict()["state"][0]["rule.h"].full_tensor(),
                    saved["state"][0]["rule.h"].full_tensor(),
                )
                if pretrained is not None:
                    global_h = optimizer.state_dict()["rule_global_state"]["h"]
                    assert torch.equal(global_h, saved["rule_global_state"]["h"])
            # The same gradients on every rank step as before.
            optimizer.zero_grad()
            nn.functional.mse_loss(model(torch.ones(5, 8)), torch.zeros(5, 4)).backward()
            optimizer.step()
            assert max_difference(gathered(model), before) > 0
        dist.barrier()  # no rank tears its group down while another still talks to it
    finally:
        dist.destroy_process_group()


def _resume_and_train(
    model: nn.Module,
    checkpoint: str,
    *,
    pretrained: str | None,
    impl: str,
    expected: list[torch.Tensor],
    tolerance: float,
    save_as: str | None = None,
) -> None:
    """Load ``model`` and a new optimizer from the DCP ``checkpoint`` (then save them again
    to ``save_as``), train on as the uninterrupted run did, and compare with its ``expected``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    optimizer = LearnedOptimizer(model.parameters(), pretrained=pretrained, impl=impl)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=checkpoint)
    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)
    if save_as is not None:
        dcp.save(dict(zip(("model", "optim"), get_state_dict(model, optimizer), strict=True)), checkpoint_id=save_as)
    train(model, optimizer, 3, 6)
    assert max_difference(gathered(model), expected) <= tolerance, checkpoint


def _resharding_worker(rank: int, world_size: int, init_file: str, checkpoint_dir: str) -> None:
    """One rank of a smaller group: the two-rank sharded checkpoints resume exactly here."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        torch.set_num_threads(1)
        for pretrained, impl in CHECKPOINT_RUNS:
            name = f"{pretrained}-{impl}"
            uninterrupted = torch.load(f"{checkpoint_dir}/{name}-uninterrupted.pt")
            tolerance = checkpoint_tolerance(pretrained, impl)
            run = {"pretrained": pretrained, "impl": impl, "expected": uninterrupted, "tolerance": tolerance}
            _resume_and_train(make_sharded_model(), f"{checkpoint_dir}/{name}", **run)
            # Across layouts, as with torch.optim: the sharded checkpoint resumes a plain model,
            # and a plain model's checkpoint resumes under FSDP2.
            plain = f"{checkpoint_dir}/{name}-plain"
            _resume_and_train(make_model(), f"{checkpoint_dir}/{name}", **run, save_as=plain)
            _resume_and_train(make_sharded_model(), plain, **run)
        dist.barrier()  # no rank tears its group down while another still talks to it
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(sys.platform == "win32", reason="gloo file store")
def test_dtensor_parameters_step_and_checkpoint_as_one_process(tmp_path: Path) -> None:
    spawn(_dtensor_worker, 2, tmp_path, str(tmp_path))
    # The checkpoints saved by two ranks, loaded by one (torch.distributed.checkpoint reshards).
    spawn(_resharding_worker, 1, tmp_path, str(tmp_path))
