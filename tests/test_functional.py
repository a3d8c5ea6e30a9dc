"""learned_optim.functional used directly: malformed entries and arguments are refused with a
clear error before anything is modified, and the functional step equals the optimizer's."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import learned_optim.functional as F
from learned_optim import CoordinateLSTM, HierarchicalRNN, LearnedOptimizer
from learned_optim.functional import FlatState, StepEntry, fused_learned_step, learned_step


def entry(rule, n, grad=None, state=None, **kw):
    torch.manual_seed(n)
    return StepEntry(
        param=torch.randn(n),
        grad=torch.randn(n) if grad is None else grad,
        state=rule.init_state(n) if state is None else state,
        lr=0.1,
        weight_decay=0.0,
        maximize=False,
        **kw,
    )


def snapshot(entries):
    return [(e.param.clone(), {k: v.clone() for k, v in e.state.items()}) for e in entries]


def unchanged(entries, before):
    return all(
        torch.equal(e.param, p) and all(torch.equal(e.state[k], v) for k, v in s.items())
        for e, (p, s) in zip(entries, before, strict=True)
    )


def malformed_cases(rule):
    """(label, entries, error pattern): the second entry is the malformed one."""
    missing = entry(rule, 10)
    del missing.state["c"]
    extra = entry(rule, 10)
    extra.state["extra"] = torch.zeros(10)
    return [
        ("missing state key", [entry(rule, 10), missing], r"entry 1.*state keys"),
        ("extra state key", [entry(rule, 10), extra], r"entry 1.*state keys"),
        ("short state", [entry(rule, 10), entry(rule, 10, state=rule.init_state(5))], r"entry 1.*state\['h'\]"),
        ("short grad", [entry(rule, 10), entry(rule, 10, grad=torch.randn(5))], r"entry 1.*grad"),
        ("long grad", [entry(rule, 10), entry(rule, 10, grad=torch.randn(20))], r"entry 1.*grad"),
        ("meta grad", [entry(rule, 10), entry(rule, 10, grad=torch.randn(10, device="meta"))], r"entry 1.*device"),
        (
            "integer param",
            [
                entry(rule, 10),
                StepEntry(torch.zeros(3, dtype=torch.long), torch.ones(3), rule.init_state(3), 0.1, 0.0, False),
            ],
            r"entry 1.*floating",
        ),
    ]


@pytest.mark.parametrize("case", range(7))
def test_malformed_entries_raise_before_anything_changes(case):
    rule = CoordinateLSTM()
    label, entries, pattern = malformed_cases(rule)[case]
    before = snapshot(entries)
    # chunk_size 8: the first entry's first chunk used to be stepped before the error.
    with pytest.raises(ValueError, match=pattern):
        learned_step(rule, entries, chunk_size=8)
    assert unchanged(entries, before), label


@pytest.mark.parametrize("chunk_size", [0, -1, 2.5])
def test_bad_chunk_size_is_refused(chunk_size):
    # chunk_size=0 used to loop for ever in plan_chunks (allocating as it went).
    rule = CoordinateLSTM()
    with pytest.raises(ValueError, match="chunk_size"):
        learned_step(rule, [entry(rule, 3)], chunk_size=chunk_size)
    with pytest.raises(ValueError, match="chunk_size"):
        list(F.plan_chunks([3], chunk_size))


def test_numpy_integer_chunk_size_is_accepted():
    # LearnedOptimizer took np.int64 chunk sizes while learned_step and plan_chunks refused them.
    np = pytest.importorskip("numpy")
    rule = CoordinateLSTM()
    got, want = [entry(rule, 5), entry(rule, 3)], [entry(rule, 5), entry(rule, 3)]
    learned_step(rule, got, chunk_size=np.int64(4))
    learned_step(rule, want, chunk_size=4)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a.param, b.param, rtol=0, atol=0)
    assert [[(p.start, p.stop) for p in c] for c in F.plan_chunks([5], np.int32(2))] == [[(0, 2)], [(2, 4)], [(4, 5)]]


def test_unknown_nonfinite_mode_is_refused():
    rule = CoordinateLSTM()
    with pytest.raises(ValueError, match="nonfinite"):
        learned_step(rule, [entry(rule, 3)], nonfinite="raise")


def flat_entries(rule, sizes, **kw):
    entries = [entry(rule, n, **kw) for n in sizes]
    flat = FlatState.gather([e.state for e in entries], sizes)
    for i, e in enumerate(entries):
        e.state = flat.views(i)
    return entries, flat


needs_cpu_kernel = pytest.mark.skipif("cpu" not in CoordinateLSTM().fused_impls(), reason="no C compiler")


@needs_cpu_kernel
def test_fused_step_refuses_state_that_is_not_the_flat_views():
    # The kernel updated flat's buffers while the entries' own state stayed as it was.
    rule = CoordinateLSTM()
    entries = [entry(rule, 5), entry(rule, 3)]
    flat = FlatState.gather([e.state for e in entries], [5, 3])
    before = snapshot(entries)
    with pytest.raises(ValueError, match="views"):
        fused_learned_step(rule, "cpu", entries, flat)
    assert unchanged(entries, before)


@pytest.mark.skipif("cpu" not in HierarchicalRNN().fused_impls(), reason="no C compiler")
def test_fused_hierarchical_step_without_segment_state_raises_clearly():
    rule = HierarchicalRNN()
    entries, flat = flat_entries(rule, [5, 3])
    with pytest.raises(ValueError, match=r"entries \[0, 1\] have no segment_state"):
        fused_learned_step(rule, "cpu", entries, flat, global_state=rule.init_global_state())


@pytest.mark.parametrize("impl", ["eager", "cpu"])
def test_functional_step_equals_the_optimizer_step(impl):
    rule = CoordinateLSTM()
    if impl not in ("eager", *rule.fused_impls()):
        pytest.skip("no C compiler")
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(7))]
    grads = [torch.randn_like(p) for p in params]
    opt = LearnedOptimizer(params, pretrained=rule, lr=0.5, weight_decay=0.1, impl=impl, chunk_size=5)
    entries = [
        StepEntry(p.detach().clone(), g, rule.init_state(p.numel()), 0.5, 0.1, False)
        for p, g in zip(params, grads, strict=True)
    ]
    flat = FlatState.gather([e.state for e in entries], [e.param.numel() for e in entries])
    if impl != "eager":
        for i, e in enumerate(entries):
            e.state = flat.views(i)
    for _ in range(2):
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        opt.step()
        if impl == "eager":
            learned_step(opt.rule, entries, chunk_size=5)
        else:
            fused_learned_step(opt.rule, "cpu", entries, flat)
    for p, e in zip(params, entries, strict=True):
        torch.testing.assert_close(p.detach(), e.param, rtol=0, atol=0)


def test_public_api_is_declared():
    assert set(F.__all__) >= {"StepEntry", "FlatState", "learned_step", "fused_learned_step", "plan_chunks"}
    assert all(hasattr(F, name) for name in F.__all__)


# ---------------------------------------------------------------------- shards
class ThreadReduce:
    """``reduce_shards`` for ranks that are threads of this process: each rank's sums are
    added up over all ranks, in rank order (the same on every rank), as an all-reduce would."""

    def __init__(self, ranks: int) -> None:
        import threading

        self.barrier = threading.Barrier(ranks, timeout=60)
        self.posted: list[dict[int, torch.Tensor]] = [{} for _ in range(ranks)]

    def for_rank(self, rank: int):
        def reduce(sums: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
            self.posted[rank] = sums
            self.barrier.wait()
            total = {i: sum(posted[i] for posted in self.posted[1:]) + self.posted[0][i] for i in sums}
            self.barrier.wait()  # nobody posts the next reduce before everyone has read this one
            return total

        return reduce


def hierarchical_rule_with_every_tensor_input() -> HierarchicalRNN:
    torch.manual_seed(3)
    rule = HierarchicalRNN(
        agreement_feature=True, step_gain=True, step_size_feature=True, relative_step_cap=0.02, lr_leak=0.01
    )
    with torch.no_grad():  # zero at init: give them something to do
        rule.gain_out.weight.normal_(0, 0.3)
        rule.step_size_in.weight.normal_(0, 0.3)
    return rule


@pytest.mark.parametrize("impl", ["eager", "eager-split", "cpu"])
def test_shards_of_a_tensor_step_as_the_whole_tensor_with_a_hierarchical_rule(impl):
    import threading

    if impl == "cpu" and "cpu" not in HierarchicalRNN().fused_impls():
        pytest.skip("no C compiler for the fused kernel")
    rule = hierarchical_rule_with_every_tensor_input()
    torch.manual_seed(0)
    shapes = [(7, 5), (3,), (2, 2)]
    cuts = [4, 3, 1]  # rank 0 holds the rows before the cut, rank 1 the rest (none of the bias)
    weights = [torch.randn(shape) for shape in shapes]
    grads = [[torch.randn(shape) for shape in shapes] for _ in range(4)]

    def shard(tensors, rank):
        return [t[:cut] if rank == 0 else t[cut:] for t, cut in zip(tensors, cuts, strict=True)]

    def run(tensors, step_grads, is_shard=False, reduce_shards=None):
        params = [t.clone() for t in tensors]
        states = [rule.init_state(p.numel()) for p in params]
        flat = None
        if impl == "cpu":
            flat = FlatState.gather(states, [p.numel() for p in params])
            states = [flat.views(i) for i in range(len(params))]
        segments = [rule.init_segment_state(1) for _ in params]
        global_state = rule.init_global_state()
        for grads_now in step_grads:
            entries = [
                StepEntry(p, g, s, lr=0.5, weight_decay=0.0, maximize=False, segment_state=seg, shard=is_shard)
                for p, g, s, seg in zip(params, grads_now, states, segments, strict=True)
            ]
            if impl == "cpu":
                fused_learned_step(rule, "cpu", entries, flat, global_state=global_state, reduce_shards=reduce_shards)
            else:
                size = 3 if impl == "eager-split" else 1 << 16  # chunks of 3: shards split over chunks too
                learned_step(rule, entries, chunk_size=size, global_state=global_state, reduce_shards=reduce_shards)
        return params, segments, global_state

    whole_params, whole_segments, whole_global = run(weights, grads)
    reducer = ThreadReduce(2)
    results = [None, None]

    def rank_run(rank):
        local_grads = [shard(step_grads, rank) for step_grads in grads]
        results[rank] = run(shard(weights, rank), local_grads, True, reducer.for_rank(rank))

    threads = [threading.Thread(target=rank_run, args=(rank,)) for rank in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results[0] is not None and results[1] is not None, "a rank failed"
    for i, expected in enumerate(whole_params):
        joined = torch.cat([results[0][0][i], results[1][0][i]])
        torch.testing.assert_close(joined, expected, rtol=0, atol=1e-6)
    for rank in (0, 1):  # tensor and global levels: the same on every rank, and as one process's
        _, segments, global_state = results[rank]
        for seg, expected in zip(segments, whole_segments, strict=True):
            for k in expected:
                torch.testing.assert_close(seg[k], expected[k], rtol=0, atol=1e-6)
        torch.testing.assert_close(global_state["h"], whole_global["h"], rtol=0, atol=1e-6)

    # Each shard's own sums instead: visibly another step (what the reduce is for).
    alone, _, _ = run(shard(weights, 0), [shard(g, 0) for g in grads], True, lambda sums: sums)
    moved = (whole_params[0][: cuts[0]] - weights[0][: cuts[0]]).abs().max()
    assert (alone[0] - whole_params[0][: cuts[0]]).abs().max() > 0.01 * moved


def test_shard_entries_of_a_hierarchical_rule_need_reduce_shards():
    rule = HierarchicalRNN()
    e = entry(rule, 4, segment_state=rule.init_segment_state(1), shard=True)
    before = snapshot([e])
    with pytest.raises(ValueError, match="reduce_shards"):
        learned_step(rule, [e], global_state=rule.init_global_state())
    assert unchanged([e], before)
