"""HierarchicalRNN: segmented statistics, chunked steps, checkpoints, skipping, meta-training."""

from __future__ import annotations

import copy
import io
import json
import math

import pytest
import torch
from test_meta_fit import Interrupt, _config, same_weights, weights
from tiny_tasks import TRAIN_X, TRAIN_Y, make_tiny, tiny_model
from torch import nn

from learned_optim import HierarchicalRNN, LearnedOptimizer
from learned_optim.functional import StepEntry, learned_step, plan_chunks
from learned_optim.meta_fit import EVALUATION_SEED_BASE, MetaTrainer, meta_fit, rollout
from learned_optim.rules.base import PARAM_RMS_FLOOR, StepContext, step_scales
from learned_optim.rules.triton_common import triton_usable_on
from learned_optim.tasks import get_task
from learned_optim.weights import load_rule


def noisy_rule(seed: int = 0, **config) -> HierarchicalRNN:
    """A HierarchicalRNN whose weights are all perturbed, so every level visibly matters."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        rule = HierarchicalRNN(**config)
        with torch.no_grad():
            for p in rule.parameters():
                p.add_(0.3 * torch.randn_like(p))
    return rule


def fresh_rule(seed: int = 0, **config) -> HierarchicalRNN:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return HierarchicalRNN(**config)


def segment_ids(sizes) -> torch.Tensor:
    return torch.cat([torch.full((n,), s, dtype=torch.int64) for s, n in enumerate(sizes)])


def spy_on_finalize(rule: HierarchicalRNN) -> list[dict]:
    """Record the sums and counts every ``finalize`` call receives."""
    calls: list[dict] = []
    original = rule.finalize

    def spy(segment_state, global_state, segment_sums, counts):
        calls.append({"sums": {k: v.clone() for k, v in segment_sums.items()}, "counts": counts.clone()})
        return original(segment_state, global_state, segment_sums, counts)

    rule.finalize = spy
    return calls


def gru_reference(x: torch.Tensor, h: torch.Tensor, w_ih, b_ih, w_hh, b_hh) -> torch.Tensor:
    """torch.nn.GRUCell with the given weights (an implementation independent of the rule's)."""
    with torch.random.fork_rng(devices=[]):
        cell = nn.GRUCell(w_ih.shape[1], w_hh.shape[1])
    with torch.no_grad():
        for name, value in (("weight_ih", w_ih), ("bias_ih", b_ih), ("weight_hh", w_hh), ("bias_hh", b_hh)):
            getattr(cell, name).copy_(value)
        return cell(x, h)


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-6) -> None:
    """Tight closeness (sums may come in float64: values are compared, not dtypes)."""
    torch.testing.assert_close(a.double(), b.double(), rtol=tol, atol=tol)


# ---------------------------------------------------------------------------- segmented statistics
@torch.no_grad()
def test_segment_sums_means_and_normalisation_match_a_loop_over_tensors():
    rule = noisy_rule()
    sizes = [5, 1, 17, 40]
    scales = torch.tensor([1e-3, 10.0, 1.0, 0.1])
    num, n = len(sizes), sum(sizes)
    gen = torch.Generator().manual_seed(0)
    # Interleaved membership: the segmented reductions must not assume contiguous tensors.
    ids = segment_ids(sizes)[torch.randperm(n, generator=gen)]
    state, seg, glob = rule.init_state(n), rule.init_segment_state(num), rule.init_global_state()
    for _ in range(3):  # non-trivial state at every level first
        grad = torch.randn(n, generator=gen) * scales[ids]
        _, state, seg, glob = rule.full_step(grad, state, ids, num, seg, glob)

    grad = torch.randn(n, generator=gen) * scales[ids]
    context = StepContext(ids, num, seg, glob)
    update, new_state = rule(grad, state, context)
    calls = spy_on_finalize(rule)
    update_full, _, new_seg, new_glob = rule.full_step(grad, state, ids, num, seg, glob)
    assert torch.equal(update_full, update)
    (call,) = calls
    assert call["counts"].tolist() == sizes
    mean_h, mean_log_lr = [], []
    for s, size in enumerate(sizes):
        mask = ids == s
        # What the rule reports: sums over exactly this tensor's coordinates.
        close(context.segment_sums["h"][s], new_state["h"][mask].double().sum(0))
        close(context.segment_sums["log_lr"][s], new_state["log_lr"][mask].double().sum(0))
        # What finalize receives from full_step: the same sums, and the tensor sizes.
        close(call["sums"]["h"][s], new_state["h"][mask].double().sum(0))
        close(call["sums"]["h"][s] / size, new_state["h"][mask].mean(0))
        mean_h.append(new_state["h"][mask].mean(0))
        mean_log_lr.append(new_state["log_lr"][mask].mean(0))
        # Direction normalised per tensor: update / lr has unit RMS whatever the gradient scale.
        direction = update[mask] / torch.exp(new_state["log_lr"][mask, 0])
        assert direction.pow(2).mean().sqrt().item() == pytest.approx(1.0, abs=1e-5)
    close(new_seg["mean_log_lr"], torch.stack(mean_log_lr))

    # The tensor GRU reads each tensor's mean parameter state (biased by the global state), the
    # global GRU the mean of the new tensor states; torch.nn.GRUCell as the reference.
    global_bias = rule.global_to_tensor(glob["h"])
    expected_tensor_h = torch.cat(
        [
            gru_reference(
                mean_h[s][None], seg["h"][s : s + 1], rule.tensor_in.weight, rule.tensor_in.bias + global_bias,
                rule.tensor_hh.weight, rule.tensor_hh.bias,
            )
            for s in range(num)
        ]
    )  # fmt: skip
    close(new_seg["h"], expected_tensor_h, 1e-5)
    expected_global_h = gru_reference(
        expected_tensor_h.mean(0, keepdim=True), glob["h"][None], rule.global_in.weight, rule.global_in.bias,
        rule.global_hh.weight, rule.global_hh.bias,
    )[0]  # fmt: skip
    close(new_glob["h"], expected_global_h, 1e-5)

    # Each coordinate's log-lr feature is relative to *its* tensor's mean: shifting one
    # tensor's mean_log_lr changes exactly that tensor's coordinates.
    shifted = {k: v.clone() for k, v in seg.items()}
    shifted["mean_log_lr"][2] += 1.0
    update_shifted, _ = rule(grad, state, StepContext(ids, num, shifted, glob))
    changed = update_shifted != update
    assert changed[ids == 2].any() and not changed[ids != 2].any()


@torch.no_grad()
def test_means_of_a_large_tensor_are_accurate():
    # Summed one coordinate after the other in float32, the mean of 200_000 log learning
    # rates near -7 drifted by ~1e-3 (and the chunked and unchunked steps disagreed).
    rule = noisy_rule()
    n = 200_000
    grad = torch.randn(n, generator=torch.Generator().manual_seed(0))
    _, new_state, new_seg, _ = rule.full_step(grad, rule.init_state(n), torch.zeros(n, dtype=torch.int64), 1)
    expected = new_state["log_lr"].double().mean(0, keepdim=True)
    torch.testing.assert_close(new_seg["mean_log_lr"].double(), expected, rtol=1e-7, atol=0)


@torch.no_grad()
def test_lone_batch_without_layout_is_one_tensor():
    rule = noisy_rule()
    grad = torch.randn(30)
    state = rule.init_state(30)
    update, new_state = rule(grad, state)
    update_full, state_full, _, _ = rule.full_step(grad, state, torch.zeros(30, dtype=torch.int64), 1)
    assert torch.equal(update, update_full)
    assert all(torch.equal(new_state[k], state_full[k]) for k in new_state)


# ---------------------------------------------------------------------------- through LearnedOptimizer
SHAPES = [(1,), (3,), (10, 100), (50, 1000)]  # 1, 3, 1000 and 50_000 coordinates
SCALES = [1e-3, 10.0, 1.0, 0.1]


def _grads(shapes, steps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [
        [torch.randn(s, generator=gen) * SCALES[i % len(SCALES)] for i, s in enumerate(shapes)] for _ in range(steps)
    ]


def _optimizer_run(rule, shapes, steps, chunk_size):
    """``steps`` optimizer steps with fixed gradients; params start at zero, so the
    parameter deltas are the rule's updates to within rounding of their own size."""
    params = [nn.Parameter(torch.zeros(s)) for s in shapes]
    opt = LearnedOptimizer(params, pretrained=rule, chunk_size=chunk_size, impl="eager")
    updates = []
    for step_grads in _grads(shapes, steps):
        for p, g in zip(params, step_grads, strict=True):
            p.grad = g.clone()
        before = torch.cat([p.detach().reshape(-1) for p in params])
        opt.step()
        updates.append(torch.cat([p.detach().reshape(-1) for p in params]) - before)
    state = {k: torch.cat([opt.state[p]["rule." + k] for p in params]) for k in rule.state_spec()}
    seg = {k: torch.cat([opt.state[p]["rule.segment." + k] for p in params]) for k in rule.segment_state_spec()}
    return [p.detach() for p in params], state, seg, opt.state_dict()["rule_global_state"], updates


@torch.no_grad()
def _reference_run(rule, shapes, steps):
    """The same steps as one ``full_step`` over the concatenation of all tensors."""
    sizes = [math.prod(s) for s in shapes]
    ids, num = segment_ids(sizes), len(sizes)
    flat = torch.zeros(sum(sizes))
    state, seg, glob = rule.init_state(flat.numel()), rule.init_segment_state(num), rule.init_global_state()
    updates, log_lrs = [], []
    for step_grads in _grads(shapes, steps):
        grad = torch.cat([g.reshape(-1) for g in step_grads])
        update, state, seg, glob = rule.full_step(grad, state, ids, num, seg, glob)
        flat = flat + update
        updates.append(update)
        log_lrs.append(state["log_lr"][:, 0])
    params = [t.view(s) for t, s in zip(flat.split(sizes), shapes, strict=True)]
    return params, state, seg, glob, updates, log_lrs


@pytest.mark.parametrize("shapes", [[(6, 5)], SHAPES], ids=["one-tensor", "1-3-1000-50000"])
def test_one_big_chunk_equals_full_step(shapes):
    rule = noisy_rule()
    params, state, seg, glob, _ = _optimizer_run(rule, shapes, steps=2, chunk_size=1 << 20)
    ref_params, ref_state, ref_seg, ref_glob, _, _ = _reference_run(rule, shapes, steps=2)
    for p, q in zip(params, ref_params, strict=True):
        assert torch.allclose(p, q, rtol=1e-6, atol=1e-9)
    for got, ref in ((state, ref_state), (seg, ref_seg), (glob, ref_glob)):
        assert got.keys() == ref.keys()
        for k in got:
            assert torch.allclose(got[k], ref[k], rtol=1e-6, atol=1e-7), k
    assert seg["h"].shape == (len(shapes), rule.t) and glob["h"].shape == (rule.g,)
    assert all(p.abs().max() > 0 for p in params)


@pytest.mark.parametrize("chunk_size", [4096, 600])
def test_chunks_that_split_tensors(chunk_size):
    """Chunking changes nothing but float summation order, even for tensors it splits.

    The per-coordinate state of a coordinate depends only on its gradient, its own state and
    its tensor's state; the tensor-level inputs of ``finalize`` are sums added up across
    chunks; and the direction of a split tensor, normalised per piece by ``forward``, is
    rescaled to the whole tensor's RMS (``rescale_split_update``) once all its pieces ran.
    So updates and every level of state equal the unchunked step's.
    """
    rule = noisy_rule()
    steps = 3
    calls = spy_on_finalize(rule)
    _, state, seg, glob, updates = _optimizer_run(rule, SHAPES, steps, chunk_size)
    assert len(calls) == steps  # finalize once per step, not once per chunk
    del rule.finalize  # the spy
    _, ref_state, ref_seg, ref_glob, ref_updates, _ = _reference_run(rule, SHAPES, steps)

    for k in state:
        close(state[k], ref_state[k])
    for k in seg:
        close(seg[k], ref_seg[k], 1e-5)
    close(glob["h"], ref_glob["h"], 1e-5)

    sizes = [math.prod(s) for s in SHAPES]
    ids = segment_ids(sizes)
    # The mean inputs of the tensor GRU: this step's per-coordinate states summed per tensor
    # over all the chunks it spans, and the true tensor sizes.
    last = calls[-1]
    assert last["counts"].tolist() == sizes
    for s in range(len(sizes)):
        for k in ("h", "log_lr"):
            torch.testing.assert_close(last["sums"][k][s].double(), state[k][ids == s].double().sum(0))

    pieces = [piece for chunk in plan_chunks(sizes, chunk_size, keep_whole=True) for piece in chunk]
    split = {i for i in range(len(sizes)) if sum(p.entry_index == i for p in pieces) > 1}
    assert split and split != set(range(len(sizes)))
    for update, ref_update in zip(updates, ref_updates, strict=True):
        torch.testing.assert_close(update, ref_update, rtol=1e-5, atol=1e-9)


def test_split_tensor_trains_as_unchunked():
    """Several steps whose gradients depend on the parameters: any chunk size, one trajectory."""

    def run(chunk_size, weight_decay):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(60, 50), nn.Tanh(), nn.Linear(50, 1))
        opt = LearnedOptimizer(
            model.parameters(), pretrained=noisy_rule(), chunk_size=chunk_size, impl="eager", weight_decay=weight_decay
        )
        x, y = torch.randn(32, 60), torch.randn(32, 1)
        for _ in range(4):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        return torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    for weight_decay in (0.0, 0.1):
        whole = run(1 << 20, weight_decay)
        for chunk_size in (1000, 777):  # the 3,000-coordinate weight spans 3-4 chunks
            torch.testing.assert_close(run(chunk_size, weight_decay), whole, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------- checkpoints
def _train(model, opt, steps, start):
    """Minibatch steps on the tiny regression; the gradients depend on the parameters."""
    dtype = next(model.parameters()).dtype
    for i in range(start, start + steps):
        rows = slice(16 * (i % 8), 16 * (i % 8) + 16)
        opt.zero_grad()
        nn.functional.mse_loss(model(TRAIN_X[rows].to(dtype)), TRAIN_Y[rows].to(dtype)).backward()
        opt.step()


def _snapshot(model, opt):
    params = [p.detach().clone() for p in model.parameters()]
    states = [{k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters()]
    return params, states, {k: v.clone() for k, v in opt.state_dict()["rule_global_state"].items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("via_file", [False, True], ids=["in-memory", "torch.save"])
def test_state_dict_round_trip_is_bit_identical(dtype, via_file):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = tiny_model().to(dtype)
    # lr 30: the rule's initial learning rate is 1e-3, and bf16 parameters must visibly move.
    # chunk_size 20 splits the 24-coordinate weight of the first layer over two chunks.
    opt = LearnedOptimizer(model.parameters(), pretrained=noisy_rule(), lr=30.0, chunk_size=20)
    _train(model, opt, 3, start=0)
    saved = copy.deepcopy(opt.state_dict())  # the live state is updated in place, as in torch
    saved_model = copy.deepcopy(model.state_dict())
    # The first parameter's saved state also holds a copy of the global state ("rule_global.*").
    assert {
        "rule.h",
        "rule.m",
        "rule.v",
        "rule.log_lr",
        "rule.segment.h",
        "rule.segment.mean_log_lr",
        "rule_global.h",
    } == set(saved["state"][0])
    assert all("rule_global.h" not in saved["state"][i] for i in range(1, len(saved["state"])))
    assert torch.equal(saved["state"][0]["rule_global.h"], saved["rule_global_state"]["h"])
    assert "rule_global.h" not in opt.state[next(model.parameters())]  # only in the saved dict
    assert saved["state"][0]["rule.segment.h"].shape == (1, 20)
    assert set(saved["rule_global_state"]) == {"h"}
    if via_file:
        buffer = io.BytesIO()
        torch.save(saved, buffer)
        buffer.seek(0)
        saved = torch.load(buffer, weights_only=True)
    _train(model, opt, 4, start=3)
    expected = _snapshot(model, opt)

    resumed_model = tiny_model().to(dtype)
    resumed_model.load_state_dict(saved_model)
    # Same rule config, different weights: the checkpoint restores them.
    resumed = LearnedOptimizer(resumed_model.parameters(), pretrained=noisy_rule(seed=5), lr=30.0, chunk_size=20)
    resumed.load_state_dict(saved)
    for p in resumed_model.parameters():
        assert p.dtype == dtype
        assert all(v.dtype == torch.float32 for v in resumed.state[p].values())  # not cast to bf16
    assert all(v.dtype == torch.float32 for v in resumed.state_dict()["rule_global_state"].values())
    _train(resumed_model, resumed, 4, start=3)
    got = _snapshot(resumed_model, resumed)

    for p, q in zip(expected[0], got[0], strict=True):
        assert torch.equal(p, q)
    for s, t in zip(expected[1], got[1], strict=True):
        assert s.keys() == t.keys()
        assert all(torch.equal(s[k], t[k]) for k in s)
    assert expected[2].keys() == got[2].keys() and all(torch.equal(expected[2][k], got[2][k]) for k in expected[2])
    # It did train: the parameters moved after the checkpoint.
    assert not all(torch.equal(p, q.to(dtype)) for p, q in zip(expected[0], saved_model.values(), strict=True))


def test_loading_a_state_dict_from_before_any_step_starts_afresh():
    def setup():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = tiny_model()
        return model, LearnedOptimizer(model.parameters(), pretrained=noisy_rule(), lr=30.0)

    model, opt = setup()
    empty = copy.deepcopy(opt.state_dict())
    start = copy.deepcopy(model.state_dict())
    _train(model, opt, 2, start=0)
    model.load_state_dict(start)
    opt.load_state_dict(empty)  # no per-parameter state, no global state: both start afresh
    _train(model, opt, 2, start=0)

    fresh_model, fresh_opt = setup()
    _train(fresh_model, fresh_opt, 2, start=0)
    expected, got = _snapshot(fresh_model, fresh_opt), _snapshot(model, opt)
    assert all(torch.equal(p, q) for p, q in zip(expected[0], got[0], strict=True))
    assert torch.equal(expected[2]["h"], got[2]["h"])


@pytest.mark.parametrize("impl", ["eager", "auto"])
def test_clearing_the_state_starts_every_level_afresh(impl):
    # opt.state.clear() is how torch.optim users reset an optimizer: the global state, kept
    # outside opt.state, must start afresh too, or the next steps differ from a new optimizer's.
    def setup():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = tiny_model()
        return model, LearnedOptimizer(model.parameters(), pretrained="hrnn-base", lr=30.0, impl=impl)

    model, opt = setup()
    start = copy.deepcopy(model.state_dict())
    _train(model, opt, 3, start=0)
    model.load_state_dict(start)
    opt.state.clear()
    # Saved before the next step, the global state is the fresh one that step starts from.
    cleared = opt.state_dict()["rule_global_state"]
    new_optimizer = setup()[1].state_dict()["rule_global_state"]
    assert cleared.keys() == new_optimizer.keys() and all(torch.equal(cleared[k], new_optimizer[k]) for k in cleared)
    _train(model, opt, 3, start=0)

    fresh_model, fresh_opt = setup()
    _train(fresh_model, fresh_opt, 3, start=0)
    expected, got = _snapshot(fresh_model, fresh_opt), _snapshot(model, opt)
    assert all(torch.equal(p, q) for p, q in zip(expected[0], got[0], strict=True))
    for s, t in zip(expected[1], got[1], strict=True):
        assert s.keys() == t.keys() and all(torch.equal(s[k], t[k]) for k in s)
    assert torch.equal(expected[2]["h"], got[2]["h"])
    # The state still round-trips after the reset.
    resumed_model, resumed = setup()
    resumed_model.load_state_dict(model.state_dict())
    resumed.load_state_dict(copy.deepcopy(opt.state_dict()))
    _train(model, opt, 2, start=3)
    _train(resumed_model, resumed, 2, start=3)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), resumed_model.parameters(), strict=True))
    assert torch.equal(opt.state_dict()["rule_global_state"]["h"], resumed.state_dict()["rule_global_state"]["h"])


# ---------------------------------------------------------------------------- skipping
def _step_three(grads, with_none: bool, nonfinite="skip"):
    """Params a, b, c (and d, whose grad is None, if ``with_none``) after steps with ``grads``."""
    gen = torch.Generator().manual_seed(0)
    params = [nn.Parameter(torch.randn(s, generator=gen)) for s in [(4, 3), (5,), (7,), (2, 2)]]
    if not with_none:
        params = params[:3]
    opt = LearnedOptimizer(params, pretrained=noisy_rule(), lr=10.0, weight_decay=0.1, nonfinite=nonfinite)
    for step_grads in grads:
        for p, g in zip(params, step_grads, strict=False):
            p.grad = None if g is None else g.clone()
        opt.step()
    return params, opt


def test_params_without_grad_are_left_out_of_every_level():
    gen = torch.Generator().manual_seed(1)
    grads = [[torch.randn(s, generator=gen) for s in [(4, 3), (5,), (7,)]] + [None] for _ in range(3)]
    params, opt = _step_three(grads, with_none=True)
    d = params[3]
    assert d not in opt.state or not opt.state[d]
    # The same as an optimizer that never had d: d is no tensor of the step at any level
    # (its absence changes neither the global state nor the other tensors' states).
    ref_params, ref_opt = _step_three([g[:3] for g in grads], with_none=False)
    for p, q in zip(params, ref_params, strict=False):
        assert torch.equal(p.detach(), q.detach())
        assert all(torch.equal(opt.state[p][k], ref_opt.state[q][k]) for k in ref_opt.state[q])
    assert torch.equal(opt.state_dict()["rule_global_state"]["h"], ref_opt.state_dict()["rule_global_state"]["h"])


def test_nonfinite_gradient_skips_the_parameter_and_keeps_its_tensor_state():
    gen = torch.Generator().manual_seed(1)
    grads = [[torch.randn(s, generator=gen) for s in [(4, 3), (5,), (7,)]] for _ in range(2)]
    params, opt = _step_three(grads[:1], with_none=False)
    a, b, _ = params
    before = [p.detach().clone() for p in params]
    states = [{k: v.clone() for k, v in opt.state[p].items()} for p in params]
    global_h = opt.state_dict()["rule_global_state"]["h"]

    bad = grads[1][1].clone()
    bad[2] = float("nan")
    for p, g in zip(params, [grads[1][0], bad, grads[1][2]], strict=True):
        p.grad = g
    with pytest.warns(RuntimeWarning, match="non-finite"):
        opt.step()
    assert torch.equal(b.detach(), before[1])  # not even weight decay
    assert opt.state[b].keys() == states[1].keys()
    assert all(torch.equal(opt.state[b][k], v) for k, v in states[1].items())  # rule.* and rule.segment.*
    for i in (0, 2):
        assert not torch.equal(params[i].detach(), before[i])
        assert not torch.equal(opt.state[params[i]]["rule.segment.h"], states[i]["rule.segment.h"])
    assert not torch.equal(opt.state_dict()["rule_global_state"]["h"], global_h)
    assert all(torch.isfinite(v).all() for p in params for v in opt.state[p].values())

    # A step in which every gradient is non-finite is a no-op, global state included.
    snapshot = ([p.detach().clone() for p in params], {k: v.clone() for k, v in opt.state[a].items()})
    global_h = opt.state_dict()["rule_global_state"]["h"]
    for p in params:
        p.grad = torch.full_like(p, float("inf"))
    with pytest.warns(RuntimeWarning, match="non-finite"):
        opt.step()
    assert all(torch.equal(p.detach(), q) for p, q in zip(params, snapshot[0], strict=True))
    assert all(torch.equal(opt.state[a][k], v) for k, v in snapshot[1].items())
    assert torch.equal(opt.state_dict()["rule_global_state"]["h"], global_h)


# ---------------------------------------------------------------------------- saving the rule
def test_save_pretrained_and_load_rule_round_trip(tmp_path):
    config = dict(param_hidden=6, tensor_hidden=5, global_hidden=4, timescales=3, init_lr=3e-3, lr_change_scale=0.2)
    rule = noisy_rule(**config)
    rule.save_pretrained(str(tmp_path))
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["rule_type"] == "HierarchicalRNN"
    assert written["config"] == rule.config
    assert (tmp_path / "model.safetensors").is_file()

    for loaded in (load_rule(str(tmp_path)), HierarchicalRNN.from_pretrained(str(tmp_path))):
        assert type(loaded) is HierarchicalRNN and loaded.config == rule.config
        assert same_weights(weights(loaded), weights(rule))
        sizes = [3, 1, 20]
        ids, n = segment_ids(sizes), sum(sizes)
        gen = torch.Generator().manual_seed(0)
        outs = []
        for r in (rule, loaded):
            with torch.no_grad():
                state, seg, glob = r.init_state(n), r.init_segment_state(3), r.init_global_state()
                for _ in range(3):
                    update, state, seg, glob = r.full_step(
                        torch.randn(n, generator=gen.manual_seed(0)), state, ids, 3, seg, glob
                    )
            outs.append((update, state, seg, glob))
        for x, y in zip(*outs, strict=True):
            if isinstance(x, dict):
                assert all(torch.equal(x[k], y[k]) for k in x)
            else:
                assert torch.equal(x, y)


# ---------------------------------------------------------------------------- meta-training
def _held_out_score(rule, family, steps=30, n=3):
    """Mean over held-out instances of (mean loss over the run) / (initial loss)."""
    scores = []
    for i in range(n):
        losses = rollout(rule, family.sample(EVALUATION_SEED_BASE + i), steps)
        scores.append(sum(losses[1:]) / steps / losses[0])
    return sum(scores) / n


def test_meta_fit_trains_the_rule_on_quadratics():
    family = get_task("quadratic")
    rule = fresh_rule()
    before = _held_out_score(rule, family)
    meta_fit(
        rule, "quadratic", steps=30, unroll=10, meta_iterations=36, instances=2, meta_lr=1e-2,
        validate_every=12, validation_instances=2, progress=False,
    )  # fmt: skip
    history = rule.meta_fit_history
    assert history.iteration == 36 and history.skipped_updates == 0
    # Every 3 iterations is one whole instance pair (3 truncations of 10 steps): compare whole ones.
    early, late = sum(history.meta_losses[:6]) / 6, sum(history.meta_losses[-6:]) / 6
    assert late < early - 0.2, (early, late)
    assert [it for it, _ in history.validation] == [0, 12, 24, 36]
    assert history.validation[-1][1] < history.validation[1][1] < history.validation[0][1]
    after = _held_out_score(rule, family)
    assert after < before - 0.1, (before, after)


def test_meta_fit_resume_equals_straight_run(tmp_path):
    """Interrupted at iteration 6 (last checkpoint: 4, mid-instance), resumed, run to 12."""
    total = 12
    straight = fresh_rule()
    straight_trainer = MetaTrainer(straight, make_tiny(), _config(total), progress=False)
    straight_trainer.run()

    def crash(history):
        if history.iteration == 6:
            raise Interrupt

    with pytest.raises(Interrupt):
        MetaTrainer(fresh_rule(), make_tiny(), _config(total), tmp_path, progress=False, callback=crash).run()

    resumed = fresh_rule()
    trainer = MetaTrainer(resumed, make_tiny(), _config(total), tmp_path, progress=False)
    trainer.load_checkpoint(tmp_path)
    assert trainer.history.iteration == 4
    assert len(trainer.runs) == 2 and all(0 < run.steps_done < run.horizon for run in trainer.runs)
    initial = fresh_rule()
    for run in trainer.runs:
        # Tensor-level and global state were carried through the checkpoint (not re-initialised).
        assert run.segment_state["h"].shape == (4, initial.t) and run.global_state["h"].shape == (initial.g,)
        assert not torch.equal(run.segment_state["h"], initial.init_segment_state(4)["h"].detach())
        assert not torch.equal(run.global_state["h"], initial.init_global_state()["h"].detach())
    trainer.run()

    assert trainer.history.meta_losses == straight_trainer.history.meta_losses
    assert trainer.history.validation == straight_trainer.history.validation
    assert same_weights(weights(resumed), weights(straight))
    assert not same_weights(weights(resumed), weights(initial))


def _two_problems(rule, seed=0):
    """Two problems of different layouts: gradients, states and segment ids, each on its own."""
    gen = torch.Generator().manual_seed(seed)
    problems = []
    for sizes in ((12, 3, 5), (7, 1)):
        n = sum(sizes)
        params = [torch.randn(size, generator=gen) for size in sizes]
        state = rule.init_state(n)
        state["h"] = torch.randn(n, rule.p, generator=gen) * 0.5
        segment = rule.init_segment_state(len(sizes))
        segment["h"] = torch.randn(len(sizes), rule.t, generator=gen) * 0.5
        glob = {"h": torch.randn(rule.g, generator=gen) * 0.5}
        problems.append((torch.randn(n, generator=gen), state, segment_ids(sizes), len(sizes), segment, glob, params))
    return problems


class _ShiftedGlobal(HierarchicalRNN):
    """A subclass with a finalize of its own (no rule_type: not registered)."""

    def finalize(self, *args):
        segment, glob = super().finalize(*args)
        return segment, {"h": glob["h"] + 0.25}


@pytest.mark.parametrize("variant", ["vectorised", "default", "subclass"])
def test_full_step_of_several_problems_equals_one_by_one(variant):
    """Problems stepped in one call (meta_fit's instances) keep their own tensor and global state."""
    from learned_optim.rules.base import UpdateRule

    rule = noisy_rule(3, step_size_feature=True, agreement_feature=True)
    if variant == "default":  # the base class's loop over problems, for rules without their own
        rule.finalize_groups = lambda *args: UpdateRule.finalize_groups(rule, *args)
    elif variant == "subclass":  # its own finalize must be used for every problem
        shifted = _ShiftedGlobal(step_size_feature=True, agreement_feature=True)
        shifted.load_state_dict(rule.state_dict())
        rule = shifted
    problems = _two_problems(rule)
    with torch.no_grad():
        alone = [
            rule.full_step(grad, state, ids, num, segment, glob, step_scales(params, lr))
            for (grad, state, ids, num, segment, glob, params), lr in zip(problems, (1.0, 10.0), strict=True)
        ]
        offset, ids_all, groups = 0, [], []
        for index, (_, _, ids, num, *_rest) in enumerate(problems):
            ids_all.append(ids + offset)
            groups.append(torch.full((num,), index))
            offset += num
        update, state, segment, glob = rule.full_step(
            torch.cat([p[0] for p in problems]),
            {k: torch.cat([p[1][k] for p in problems]) for k in problems[0][1]},
            torch.cat(ids_all),
            offset,
            {k: torch.cat([p[4][k] for p in problems]) for k in problems[0][4]},
            {k: torch.stack([p[5][k] for p in problems]) for k in problems[0][5]},
            torch.cat([step_scales(problems[0][6], 1.0), step_scales(problems[1][6], 10.0)]),
            groups=torch.cat(groups),
            num_groups=2,
        )
    close = dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(update, torch.cat([a[0] for a in alone]), **close)
    for k in state:
        torch.testing.assert_close(state[k], torch.cat([a[1][k] for a in alone]), **close)
    for k in segment:
        torch.testing.assert_close(segment[k], torch.cat([a[2][k] for a in alone]), **close)
    torch.testing.assert_close(glob["h"], torch.stack([a[3]["h"] for a in alone]), **close)
    # The global states differ, so a mix-up between the problems would show.
    assert not torch.allclose(glob["h"][0], glob["h"][1])


def test_full_step_of_several_problems_refuses_a_rule_reading_global_state_in_forward():
    rule = noisy_rule()
    rule.forward_reads_global_state = True
    (grad, state, ids, num, segment, glob, _), _ = _two_problems(rule)
    with pytest.raises(ValueError, match="reads its global state in forward"):
        groups = torch.zeros(num, dtype=torch.int64)
        rule.full_step(grad, state, ids, num, segment, {"h": glob["h"][None]}, groups=groups)


@pytest.mark.parametrize("checkpoint", [0, 2], ids=["plain", "grad-checkpoint"])
def test_meta_fit_steps_instances_in_one_call_as_one_by_one(checkpoint):
    """meta_fit steps all instances of a meta-iteration in one rule call: same training as one by one."""
    histories, trained = [], []
    for batched in (True, False):
        rule = fresh_rule(step_size_feature=True)
        if not batched:
            rule.forward_reads_global_state = True  # makes meta_fit step the instances one by one
        trainer = MetaTrainer(
            rule, "problem-set", _config(4, lr_scale_range=10.0, grad_checkpoint_steps=checkpoint, validate_every=0),
            progress=False,
        )  # fmt: skip
        trainer.run()
        histories.append(trainer.history.meta_losses)
        trained.append(weights(rule))
    assert histories[0] == pytest.approx(histories[1], rel=1e-4)
    for name in trained[0]:
        torch.testing.assert_close(trained[0][name], trained[1][name], rtol=1e-4, atol=1e-6)
    assert not same_weights(trained[0], weights(fresh_rule(step_size_feature=True)))


def test_empty_tensors():
    empty, full = nn.Parameter(torch.empty(0, 3)), nn.Parameter(torch.randn(3))
    opt = LearnedOptimizer([empty, full], pretrained=noisy_rule())
    empty.grad = torch.empty(0, 3)
    opt.step()  # a step with nothing but an empty tensor changes nothing (and does not crash)
    fresh = opt.rule.init_segment_state(1)
    assert all(torch.equal(opt.state[empty]["rule.segment." + k], v.detach()) for k, v in fresh.items())
    assert torch.equal(opt.state_dict()["rule_global_state"]["h"], opt.rule.init_global_state()["h"].detach())
    full.grad = torch.ones(3)
    before = full.detach().clone()
    opt.step()
    assert opt.state[empty]["rule.segment.h"].shape == (1, opt.rule.t)
    assert not torch.equal(full.detach(), before) and torch.isfinite(full.detach()).all()


@pytest.mark.parametrize("impl", ["eager", "auto"])
def test_empty_tensor_does_not_shift_the_other_tensors_updates(impl):
    finals = []
    for with_empty in (False, True):
        torch.manual_seed(0)
        a, b = nn.Parameter(torch.randn(4)), nn.Parameter(torch.randn(6))
        params = [a, nn.Parameter(torch.randn(0)), b] if with_empty else [a, b]
        opt = LearnedOptimizer(params, pretrained="hrnn-base", impl=impl)
        generator = torch.Generator().manual_seed(1)
        for _ in range(5):
            for p in params:
                p.grad = torch.randn(p.shape, generator=generator)
            opt.step()
        finals.append(torch.cat([a.detach(), b.detach()]))
    # Before, the empty tensor counted in the global GRU's mean: a 3.6e-4 shift after 5 steps.
    torch.testing.assert_close(finals[1], finals[0], rtol=0, atol=1e-6)


def test_finalize_groups_skips_empty_tensors_in_each_problems_mean():
    rule = noisy_rule()
    torch.manual_seed(2)
    segment = {k: torch.randn(3, *shape) for k, shape in rule.segment_state_spec().items()}
    global_h = torch.randn(2, rule.global_hh.weight.shape[1])
    sums = {"h": torch.randn(3, rule.tensor_in.in_features), "log_lr": torch.randn(3, 1)}
    groups = torch.tensor([0, 0, 1])
    _, with_empty = rule.finalize_groups(segment, {"h": global_h}, sums, torch.tensor([5.0, 0.0, 7.0]), groups, 2)
    rows = [0, 2]
    _, without = rule.finalize_groups(
        {k: v[rows] for k, v in segment.items()}, {"h": global_h},
        {k: v[rows] for k, v in sums.items()}, torch.tensor([5.0, 7.0]), torch.tensor([0, 1]), 2,
    )  # fmt: skip
    torch.testing.assert_close(with_empty["h"], without["h"])


def _cpu_kernels(rule: HierarchicalRNN) -> list[str]:
    """The rule's fused kernels that run on CPU tensors here (Triton only through its interpreter)."""
    return [impl for impl in rule.fused_impls() if impl != "triton" or triton_usable_on(torch.device("cpu"))]


def test_learned_step_without_tensor_or_global_state_raises_before_changing_anything():
    rule = noisy_rule()
    param, state = torch.randn(5), rule.init_state(5)
    before = param.clone(), {k: v.clone() for k, v in state.items()}
    grad = torch.randn(5)
    no_global = StepEntry(param, grad, state, 1.0, 0.0, False, segment_state=rule.init_segment_state(1))
    with pytest.raises(ValueError, match="pass global_state"):
        learned_step(rule, [no_global])
    with pytest.raises(ValueError, match=r"entries \[0\] have no segment_state"):
        learned_step(rule, [StepEntry(param, grad, state, 1.0, 0.0, False)], global_state=rule.init_global_state())
    assert torch.equal(param, before[0])
    assert all(torch.equal(state[k], v) for k, v in before[1].items())


@pytest.mark.parametrize("agreement", [False, True], ids=["paper", "agreement"])
def test_huge_finite_gradients_give_finite_updates_on_every_impl(agreement):
    """A finite gradient above ~1.8e19 overflowed the fp32 mean square (g * g) and turned the
    parameters into NaN; the rule is scale-free, so such a gradient steps like a large one."""
    impls = ["eager", *_cpu_kernels(fresh_rule(agreement_feature=agreement))]
    for impl in impls:
        results = []
        for scale in (1e20, 1e38):
            param = nn.Parameter(torch.zeros(6))
            opt = LearnedOptimizer([param], pretrained=noisy_rule(agreement_feature=agreement), impl=impl)
            for _ in range(3):
                param.grad = scale * torch.tensor([1.0, -1.0, 2.0, -2.0, 0.5, 0.0])
                opt.step()
            assert torch.isfinite(param.detach()).all(), (impl, scale)
            assert all(torch.isfinite(v).all() for v in opt.state[param].values()), (impl, scale)
            assert param.detach()[:5].abs().min() > 0, (impl, scale)  # it stepped (not skipped)
            results.append(param.detach().clone())
        # Past the clip every gradient steps as one at the clip.
        torch.testing.assert_close(results[1], results[0], rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------- agreement feature
def test_agreement_feature_reads_the_gradient_against_the_momentum():
    """The extra feature is +1 when the gradient follows the momentum, -1 against it, 0 without."""
    rule = fresh_rule(agreement_feature=True)
    assert rule.param_in.in_features == 2 * rule.k + 2
    captured = {}
    # The features also feed the direct path, a module of their own.
    rule.direct.register_forward_hook(lambda module, args, out: captured.update(features=args[0].detach()))
    state = rule.init_state(4)
    state["m"][:, -1] = torch.tensor([1.0, 1.0, 0.0, -1e-3])
    state["v"][:, -1] = torch.tensor([1.0, 1.0, 1.0, 1e-6])
    with torch.no_grad():
        rule(torch.tensor([2.0, -2.0, 5.0, -1e-3]), state)
    agreement = captured["features"][:, -1]
    assert agreement[0] > 0.5 and agreement[1] < -0.5 and agreement[2] == 0  # saturated at +-1: clipped
    assert agreement[3] > 0.5  # scale-free: tiny gradients agree just as well
    assert agreement.abs().max() <= 1


def test_a_second_stage_may_change_the_learning_rate_bounds():
    # meta-fit --init with other min_lr/max_lr: same weights, the new bounds; other sizes refused.
    base = noisy_rule(agreement_feature=True)
    bounded = HierarchicalRNN(**{**base.config, "min_lr": 1e-3, "max_lr": 1.0})
    bounded.init_from(base)
    assert same_weights(weights(bounded), weights(base))
    assert bounded.config["min_lr"] == 1e-3 and bounded.log_min_lr == pytest.approx(math.log(1e-3))
    n = 30
    ids = torch.zeros(n, dtype=torch.int64)
    with torch.no_grad():
        state, seg, glob = bounded.init_state(n), bounded.init_segment_state(1), bounded.init_global_state()
        state["log_lr"].fill_(math.log(1e-6))  # below the new floor: clamped up on the next step
        _, state, _, _ = bounded.full_step(torch.randn(n), state, ids, 1, seg, glob)
    assert state["log_lr"].min() >= math.log(1e-3) - 1e-6
    with pytest.raises(ValueError, match="asked for"):
        HierarchicalRNN(**{**base.config, "min_lr": 1e-3, "tensor_hidden": 5}).init_from(base)
    with pytest.raises(ValueError, match="asked for"):
        HierarchicalRNN(**{**base.config, "agreement_feature": False}).init_from(base)


def test_agreement_feature_with_zero_weights_is_the_paper_rule(tmp_path):
    """Extending a trained rule by the feature with zero weights keeps every update, and the
    weights round-trip through config.json (the option is in it)."""
    base = noisy_rule()
    extended = HierarchicalRNN(**{**base.config, "agreement_feature": True})
    extended.init_from(base)  # what meta-fit --init does
    with pytest.raises(ValueError, match="asked for"):  # only that one option may differ
        HierarchicalRNN(**{**base.config, "agreement_feature": True, "param_hidden": 7}).init_from(base)
    with pytest.raises(ValueError, match="asked for"):  # and only from off to on
        base.init_from(extended)
    extended.save_pretrained(str(tmp_path))
    assert json.loads((tmp_path / "config.json").read_text())["config"]["agreement_feature"] is True
    loaded = load_rule(str(tmp_path))
    assert loaded.agreement_feature and same_weights(weights(loaded), weights(extended))
    sizes = [5, 40]
    ids, n = segment_ids(sizes), sum(sizes)
    runs = []
    for rule in (base, loaded):
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            state, seg, glob = rule.init_state(n), rule.init_segment_state(2), rule.init_global_state()
            updates = []
            for _ in range(4):
                update, state, seg, glob = rule.full_step(torch.randn(n, generator=gen), state, ids, 2, seg, glob)
                updates.append(update)
        runs.append(torch.stack(updates))
    torch.testing.assert_close(runs[1], runs[0], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize(
    "config",
    [
        {"agreement_feature": True},
        {"agreement_feature": True, "lr_leak": 0.2},
        {"agreement_feature": True, "step_size_feature": True},
        {"agreement_feature": True, "step_gain": True},
        {"agreement_feature": True, "relative_step_cap": 0.02},
        {"agreement_feature": True, "step_gain": True, "relative_step_cap": 0.05},
    ],
    ids=["agreement", "leak", "step-size", "step-gain", "step-cap", "gain-and-cap"],
)
def test_options_on_every_impl_of_the_optimizer(config):
    """The fused kernels compute the agreement feature, the leak, the step-size feature and
    the step gain too: same trajectory as eager."""

    def train(impl):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
        opt = LearnedOptimizer(model.parameters(), pretrained=noisy_rule(**config), impl=impl)
        x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
        for _ in range(5):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        return torch.cat([p.detach().reshape(-1) for p in model.parameters()]), opt

    eager, _ = train("eager")
    impls = _cpu_kernels(fresh_rule(**config))
    assert "cpu" in impls or not impls  # the C kernel wherever a compiler is found
    for impl in impls:
        fused, opt = train(impl)
        assert opt.impl_for(torch.device("cpu")) == impl
        torch.testing.assert_close(fused, eager, rtol=1e-4, atol=1e-6)


def test_config_saved_before_the_option_loads_with_it_off(tmp_path):
    rule = noisy_rule()
    rule.save_pretrained(str(tmp_path))
    raw = json.loads((tmp_path / "config.json").read_text())
    del raw["config"]["agreement_feature"]
    (tmp_path / "config.json").write_text(json.dumps(raw))
    loaded = load_rule(str(tmp_path))
    assert loaded.agreement_feature is False and same_weights(weights(loaded), weights(rule))
    del raw["config"]["timescales"]  # keys that were always there stay required
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="missing config keys \\['timescales'\\]"):
        load_rule(str(tmp_path))


def _constant_lr_change(rule: HierarchicalRNN, change: float) -> HierarchicalRNN:
    """Make the parameter GRU ask for the same log-lr change every step, whatever it sees."""
    with torch.no_grad():
        rule.param_out.weight[1].zero_()
        rule.param_out.bias[1] = change
    return rule


def test_lr_leak_bounds_the_drift_of_a_constant_lr_change():
    """A small constant decrease of the log lr: without a leak it integrates down to min_lr; with
    one the log lr settles ``lr_change_scale * change / lr_leak`` below the learned initial one."""
    n, steps = 12, 600
    ids = torch.zeros(n, dtype=torch.int64)
    final = {}
    for leak in (0.0, 0.05):
        rule = _constant_lr_change(noisy_rule(agreement_feature=True, lr_leak=leak), -0.5)
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            state, seg, glob = rule.init_state(n), rule.init_segment_state(1), rule.init_global_state()
            for _ in range(steps):
                _, state, seg, glob = rule.full_step(torch.randn(n, generator=gen), state, ids, 1, seg, glob)
        final[leak] = state["log_lr"]
        log_lr0 = float(rule.log_lr0.detach())
    floor = torch.full_like(final[0.0], math.log(1e-8))
    torch.testing.assert_close(final[0.0], floor, rtol=0, atol=1e-6)  # drifted to the floor
    expected = log_lr0 - 0.1 * 0.5 / 0.05
    torch.testing.assert_close(final[0.05], torch.full_like(final[0.05], expected), rtol=0, atol=1e-4)


def test_lr_leak_is_checked_saved_and_may_change_between_stages(tmp_path):
    for bad in (-0.1, 1.0, float("nan"), "0.1"):
        with pytest.raises(ValueError, match="lr_leak"):
            HierarchicalRNN(lr_leak=bad)
    base = noisy_rule(agreement_feature=True)
    assert base.config["lr_leak"] == 0.0
    leaky = HierarchicalRNN(**{**base.config, "lr_leak": 0.01})
    leaky.init_from(base)  # meta-fit --init: same weights, the leak added
    assert same_weights(weights(leaky), weights(base))
    leaky.save_pretrained(str(tmp_path))
    loaded = load_rule(str(tmp_path))
    assert loaded.lr_leak == 0.01 and same_weights(weights(loaded), weights(leaky))
    raw = json.loads((tmp_path / "config.json").read_text())
    del raw["config"]["lr_leak"]  # a rule saved before the option: the free integrator
    (tmp_path / "config.json").write_text(json.dumps(raw))
    assert load_rule(str(tmp_path)).lr_leak == 0.0


# ---------------------------------------------------------------------------- step-size feature
def test_step_scales_are_log_lr_over_parameter_rms_and_always_finite():
    params = [torch.full((4, 25), 0.5), -2 * torch.ones(3), torch.zeros(7), torch.zeros(0)]
    scales = step_scales(params, [1.0, 0.1, 1.0, 1.0])
    assert scales.dtype == torch.float32 and scales.shape == (4,)
    close(scales[:2], torch.tensor([math.log(1 / 0.5), math.log(0.1 / 2)]))
    # zero parameters read as RMS PARAM_RMS_FLOOR (a small tensor), not as an infinite ratio
    close(scales[2:], torch.full((2,), -math.log(PARAM_RMS_FLOOR)))
    close(step_scales([torch.full((5,), 1e-5)], 1.0), torch.tensor([-math.log(PARAM_RMS_FLOOR)]))
    z = torch.randn(4, 3, dtype=torch.complex64)  # a complex tensor reads as its real view
    close(step_scales([z], 2.0), step_scales([torch.view_as_real(z)], 2.0))
    assert torch.isfinite(step_scales([torch.zeros(3)], 0.0))  # lr 0 over zeros: not NaN
    close(step_scales(params[:2], 3.0), torch.log(torch.tensor([3 / 0.5, 3 / 2])))
    with pytest.raises(ValueError, match="2 learning rates for 1 tensors"):
        step_scales(params[:1], [1.0, 1.0])


def test_step_size_feature_with_zero_weights_keeps_a_trained_rule_and_round_trips(tmp_path):
    base = noisy_rule(agreement_feature=True, lr_leak=0.01)
    extended = HierarchicalRNN(**{**base.config, "step_size_feature": True})
    extended.init_from(base)  # meta-fit --init from a rule without it: the new weights zero
    assert extended.needs_step_scales and not base.needs_step_scales
    assert extended.step_size_in.weight.abs().sum() == 0
    with pytest.raises(ValueError, match="asked for"):  # only from off to on
        base.init_from(extended)

    def trajectory(rule, lr):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
        opt = LearnedOptimizer(model.parameters(), pretrained=rule, impl="eager", lr=lr)
        x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
        for _ in range(5):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        return torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    torch.testing.assert_close(trajectory(extended, 3.0), trajectory(base, 3.0), rtol=0, atol=0)
    extended.save_pretrained(str(tmp_path))
    assert json.loads((tmp_path / "config.json").read_text())["config"]["step_size_feature"] is True
    loaded = load_rule(str(tmp_path))
    assert loaded.step_size_feature and same_weights(weights(loaded), weights(extended))


def test_with_the_step_size_feature_the_rule_sees_lr_and_the_parameter_scale():
    """Without the feature the update before ``lr`` does not depend on ``lr`` or on the size of
    the parameters; with it, both reach the parameter GRU (and only through the feature)."""
    rule = noisy_rule(agreement_feature=True, step_size_feature=True)
    plain = noisy_rule(agreement_feature=True)
    grad = torch.randn(20, generator=torch.Generator().manual_seed(3))
    ids = torch.zeros(20, dtype=torch.int64)

    def update(r, params, lr):
        with torch.no_grad():
            scales = step_scales([params], lr) if r.needs_step_scales else None
            state, seg, glob = r.init_state(20), r.init_segment_state(1), r.init_global_state()
            return r.full_step(grad, state, ids, 1, seg, glob, scales)[0]

    params = torch.randn(20)
    torch.testing.assert_close(update(plain, params, 1.0), update(plain, 100 * params, 10.0))
    at_1 = update(rule, params, 1.0)
    assert not torch.allclose(at_1, update(rule, params, 10.0))
    assert not torch.allclose(at_1, update(rule, 100 * params, 1.0))
    # What it reads is the ratio: lr and the parameters scaled alike give the same update.
    torch.testing.assert_close(update(rule, 10 * params, 10.0), at_1)
    with pytest.raises(ValueError, match="step_scales"), torch.no_grad():
        rule(grad, rule.init_state(20))  # no layout and no step scales to read


def test_meta_fit_trains_the_step_size_feature_and_validates_at_each_lr():
    """Meta-training reads the step scales (the lr multiplier of each instance included) and
    moves the feature's weights; the validation rollouts read them too."""
    rule = HierarchicalRNN(step_size_feature=True)
    trained = meta_fit(
        rule, make_tiny(), steps=6, unroll=3, meta_iterations=4, meta_lr=1e-2, instances=2,
        lr_scale_range=10.0, validate_every=2, validation_instances=1, validation_lr_scales=(0.1, 10.0),
        progress=False, seed=0,
    )  # fmt: skip
    assert trained.step_size_in.weight.abs().sum() > 0
    losses = rollout(trained, make_tiny().sample(EVALUATION_SEED_BASE), 5, lr=0.3)
    assert len(losses) == 6 and all(math.isfinite(v) for v in losses)


def test_step_gain_starts_at_one_and_scales_each_tensor_step():
    """A rule extended by the step gain computes what it did (weights zero); with a gain bias
    each tensor's update is that factor times the plain rule's, and the gain reads ``lr``."""
    base = noisy_rule(agreement_feature=True, lr_leak=0.01)
    extended = HierarchicalRNN(**{**base.config, "step_gain": True})
    extended.init_from(base)
    assert extended.needs_step_scales and extended.gain_out.weight.abs().sum() == 0
    sizes = [7, 30]
    ids, n = segment_ids(sizes), sum(sizes)
    grad = torch.randn(n, generator=torch.Generator().manual_seed(5))
    params = [torch.randn(7), torch.randn(30)]

    def update(rule, lr):
        with torch.no_grad():
            scales = step_scales(params, lr) if rule.needs_step_scales else None
            state, seg, glob = rule.init_state(n), rule.init_segment_state(2), rule.init_global_state()
            return rule.full_step(grad, state, ids, 2, seg, glob, scales)[0]

    torch.testing.assert_close(update(extended, 3.0), update(base, 3.0), rtol=0, atol=0)
    with torch.no_grad():
        extended.gain_out.bias.fill_(math.log(0.5))
    torch.testing.assert_close(update(extended, 3.0), 0.5 * update(base, 3.0))
    with torch.no_grad():
        extended.gain_out.weight[0, -1] = -1.0  # larger lr or smaller parameters: smaller gain
    limit = math.log(100.0)
    for lr in (1.0, 10.0):
        log_r = step_scales(params, lr) + extended.log_lr0.detach()
        gain = torch.exp(limit * torch.tanh((math.log(0.5) - log_r) / limit))
        torch.testing.assert_close(update(extended, lr), gain[ids] * update(base, lr))
    with torch.no_grad():
        extended.gain_out.bias.fill_(50.0)  # the gain is bounded
    assert update(extended, 1.0).abs().max() <= 100 * update(base, 1.0).abs().max() * (1 + 1e-5)


def test_meta_fit_trains_only_the_step_gain(tmp_path):
    base = noisy_rule(agreement_feature=True)
    rule = HierarchicalRNN(**{**base.config, "step_gain": True})
    rule.init_from(base)
    for name, p in rule.named_parameters():
        p.requires_grad_(name.startswith("gain_out"))
    trained = meta_fit(
        rule, make_tiny(), steps=6, unroll=3, meta_iterations=3, meta_lr=1e-2, instances=2,
        lr_scale_range=10.0, progress=False, seed=0,
    )  # fmt: skip
    assert trained.gain_out.weight.abs().sum() > 0
    for name, value in trained.state_dict().items():
        if not name.startswith("gain_out"):
            torch.testing.assert_close(value, base.state_dict()[name], rtol=0, atol=0)
    trained.save_pretrained(str(tmp_path))
    loaded = load_rule(str(tmp_path))
    assert loaded.step_gain and same_weights(weights(loaded), weights(trained))


# ---------------------------------------------------------------------------- relative step cap
def test_relative_step_cap_scales_each_tensor_step_by_its_formula():
    """With the cap, each tensor's update is the plain rule's times ``1 / sqrt(1 + (r / cap)^2)``,
    ``r`` the RMS of the tensor's step ``lr * update`` over its parameters' RMS (floored for zero
    tensors); small relative steps pass almost unchanged, and a huge ``lr`` ends just under
    ``cap`` times the parameters' RMS instead of ``lr`` times the step."""
    base = noisy_rule(agreement_feature=True, lr_leak=0.01)
    capped = HierarchicalRNN(**{**base.config, "relative_step_cap": 0.1})
    capped.init_from(base)  # a setting, not a weight: any rule takes it
    assert capped.needs_step_scales and not base.needs_step_scales
    sizes = [7, 30, 5]
    ids, n = segment_ids(sizes), sum(sizes)
    grad = torch.randn(n, generator=torch.Generator().manual_seed(5))
    params = [torch.randn(7), 0.01 * torch.randn(30), torch.zeros(5)]
    param_rms = torch.stack([p.pow(2).mean().sqrt().clamp_min(PARAM_RMS_FLOOR) for p in params])

    def update(rule, lr):
        with torch.no_grad():
            scales = step_scales(params, lr) if rule.needs_step_scales else None
            state, seg, glob = rule.init_state(n), rule.init_segment_state(3), rule.init_global_state()
            return rule.full_step(grad, state, ids, 3, seg, glob, scales)[0]

    def rms_per_tensor(values):
        return torch.stack([piece.pow(2).mean().sqrt() for piece in values.split(sizes)])

    for lr in (1e-3, 1.0, 1e4):
        ratio = rms_per_tensor(lr * update(base, lr)) / param_rms
        factor = 1 / torch.sqrt(1 + (ratio / 0.1) ** 2)
        torch.testing.assert_close(update(capped, lr), factor[ids] * update(base, lr))
    assert torch.allclose(update(capped, 1e-3), update(base, 1e-3), rtol=1e-4)  # far inside the cap
    capped_rms = rms_per_tensor(1e4 * update(capped, 1e4))
    assert (capped_rms <= 1.0001 * 0.1 * param_rms).all() and (capped_rms >= 0.99 * 0.1 * param_rms).all()


def test_relative_step_cap_of_a_tensor_split_over_chunks_is_the_whole_tensors():
    """The optimizer's eager path runs a large tensor in pieces; the cap (like the direction's
    normalisation) must come out as for the whole tensor, at any chunk size."""
    rule = noisy_rule(agreement_feature=True, relative_step_cap=0.05)

    def train(chunk_size):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(12, 40), nn.Tanh(), nn.Linear(40, 3))
        opt = LearnedOptimizer(model.parameters(), pretrained=rule, lr=30.0, impl="eager", chunk_size=chunk_size)
        x, y = torch.randn(32, 12), torch.randint(0, 3, (32,))
        for _ in range(4):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        return torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    whole = train(100_000)
    for chunk_size in (37, 200):
        torch.testing.assert_close(train(chunk_size), whole, rtol=1e-5, atol=1e-6)


def test_relative_step_cap_is_checked_and_saved(tmp_path):
    with pytest.raises(ValueError, match="relative_step_cap"):
        HierarchicalRNN(relative_step_cap=-0.1)
    with pytest.raises(ValueError, match="relative_step_cap"):
        HierarchicalRNN(relative_step_cap=float("nan"))
    rule = noisy_rule(relative_step_cap=0.5)
    rule.save_pretrained(str(tmp_path))
    loaded = load_rule(str(tmp_path))
    assert loaded.relative_step_cap == 0.5 and same_weights(weights(loaded), weights(rule))
    raw = json.loads((tmp_path / "config.json").read_text())
    del raw["config"]["relative_step_cap"]  # a rule saved before the option: no cap
    (tmp_path / "config.json").write_text(json.dumps(raw))
    assert load_rule(str(tmp_path)).relative_step_cap == 0.0


def test_the_no_grad_gru_cell_matches_the_differentiable_one_and_leaves_its_inputs():
    from learned_optim.rules.hierarchical import gru_cell

    gen = torch.Generator().manual_seed(0)
    x_gates, h = torch.randn(50, 12, generator=gen) * 3, torch.randn(50, 4, generator=gen)
    w_hh, b_hh = torch.randn(12, 4, generator=gen), torch.randn(12, generator=gen)
    inputs = [t.clone() for t in (x_gates, h, w_hh, b_hh)]
    expected = gru_cell(x_gates, h, w_hh, b_hh)
    with torch.no_grad():
        fast = gru_cell(x_gates, h, w_hh, b_hh)
    torch.testing.assert_close(fast, expected, rtol=1e-6, atol=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(inputs, (x_gates, h, w_hh, b_hh), strict=True))
    reference = gru_cell(*(t.double() for t in inputs)).float()  # and as accurate as it
    assert (fast - reference).abs().max() <= 2 * (expected - reference).abs().max() + 1e-7


def test_numpy_sizes_build_a_rule_the_optimizer_takes():
    # Sweeps over np.arange pass numpy integers; the rule keeps the checked plain values.
    np = pytest.importorskip("numpy")
    rule = HierarchicalRNN(param_hidden=np.int64(5), timescales=np.int64(3), init_lr=np.float32(0.01))
    assert type(rule.p) is int and type(rule.k) is int
    p = nn.Parameter(torch.randn(4))
    p.grad = torch.randn(4)
    LearnedOptimizer([p], pretrained=rule, impl="eager").step()
    assert torch.isfinite(p).all()


def test_a_max_lr_past_float32_is_refused():
    with pytest.raises(ValueError, match=r"max_lr must be at most 1e\+30 .*float32.*got 1e\+31"):
        HierarchicalRNN(init_lr=1e31, max_lr=1e31)
    with pytest.raises(ValueError, match=r"init_lr must be within float32's range .*got 1e\+39"):
        HierarchicalRNN(init_lr=1e39, max_lr=1e39)
