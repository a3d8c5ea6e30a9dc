"""LearnedOptimizer with torch.distributed's checkpoint helpers and ZeroRedundancyOptimizer.

The checkpoint helpers (get/set_optimizer_state_dict) also serve plain models, so they run in
this process; ZeroRedundancyOptimizer and DTensors need a process group: two CPU processes
over gloo, started by torch.multiprocessing.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from learned_optim import CoordinateLSTM, LearnedOptimizer

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")

RULES = [None, "hrnn-base"]  # the default LSTM rule, and a rule with global state


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))


def train(model: nn.Module, optimizer: torch.optim.Optimizer, start: int, stop: int) -> None:
    for step in range(start, stop):
        generator = torch.Generator().manual_seed(step)
        inputs, targets = torch.randn(32, 8, generator=generator), torch.randn(32, 4, generator=generator)
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
def _zero_worker(rank: int, world_size: int, init_file: str) -> None:
    """One rank: ZeroRedundancyOptimizer resumes exactly; DTensor parameters are refused clearly."""
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

        from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

        mesh = init_device_mesh("cpu", (world_size,))
        param = nn.Parameter(distribute_tensor(torch.randn(4, 3), mesh, [Shard(0)]))
        param.grad = distribute_tensor(torch.randn(4, 3), mesh, [Shard(0)])
        try:
            LearnedOptimizer([param]).step()
        except TypeError as err:
            assert "DTensor" in str(err), err
        else:
            raise AssertionError("a DTensor parameter was stepped")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(sys.platform == "win32", reason="gloo file store")
def test_zero_redundancy_optimizer_resumes_exactly_and_dtensors_are_refused(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    mp.spawn(_zero_worker, args=(2, str(tmp_path / "init")), nprocs=2, join=True)
