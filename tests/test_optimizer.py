"""LearnedOptimizer as a drop-in torch.optim optimizer: mechanics, checkpoints, edge cases."""

from __future__ import annotations

import copy
import fractions
import io
import itertools
import json
import warnings

import pytest
import torch
from torch import nn

import learned_optim
from learned_optim import CoordinateLSTM, LearnedOptimizer, StepContext, UpdateRule
from learned_optim.weights import DEFAULT_RULE, PretrainedError


class NegGrad(UpdateRule):
    """Plain gradient descent: update = -grad, no state (so results are predictable)."""

    rule_type = "_test_opt_neg_grad"

    def state_spec(self):
        return {}

    def forward(self, grad, state, context=None):
        return -grad, state


class Momentum(UpdateRule):
    """Heavy ball with one float of state per coordinate: m = beta * m + g, update = -m."""

    rule_type = "_test_opt_momentum"

    def __init__(self, beta: float = 0.5) -> None:
        super().__init__()
        self.config = {"beta": float(beta)}
        self.beta = float(beta)

    def state_spec(self):
        return {"m": ()}

    def forward(self, grad, state, context=None):
        m = self.beta * state["m"].float() + grad
        return -m, {"m": m.to(state["m"].dtype)}


class SegmentIds(UpdateRule):
    """update = index of the tensor each coordinate belongs to (checks StepContext)."""

    rule_type = "_test_opt_segment_ids"
    needs_segments = True

    def state_spec(self):
        return {}

    def forward(self, grad, state, context=None):
        assert isinstance(context, StepContext)
        assert context.segment_ids.shape == grad.shape
        assert int(context.segment_ids.max()) == context.num_segments - 1
        return context.segment_ids.to(grad.dtype), state


def _lstm(seed: int = 0, **kwargs) -> CoordinateLSTM:
    torch.manual_seed(seed)
    rule = CoordinateLSTM(**kwargs)
    with torch.no_grad():  # a livelier read-out than the init so steps move the params visibly
        rule.output.weight.normal_(0.0, 1.0)
    return rule


def _params(shapes, dtype=torch.float32, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]


def _set_grads(params, seed):
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)


def _rule_state(opt, p):
    return {k: v.clone() for k, v in opt.state[p].items()}


# ---------------------------------------------------------------------------- mechanics


def test_zero_grad_and_closure_loss():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = LearnedOptimizer(model.parameters(), pretrained=_lstm())
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    calls = []

    def closure():
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        calls.append(loss)
        return loss

    before = [p.detach().clone() for p in model.parameters()]
    loss = opt.step(closure)
    assert len(calls) == 1 and loss is calls[0]
    assert loss.requires_grad  # the closure ran with grad enabled despite step's no_grad
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))
    assert opt.step() is None
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    after = [p.detach().clone() for p in model.parameters()]
    opt.step()  # no gradients: nothing moves
    assert all(torch.equal(a, p) for a, p in zip(after, model.parameters(), strict=True))


def test_param_groups_lr_and_decoupled_weight_decay_exact():
    a, b, c = _params([(3, 4), (5,), (2,)])
    start = [p.detach().clone() for p in (a, b, c)]
    opt = LearnedOptimizer(
        [{"params": [a], "lr": 0.1, "weight_decay": 0.5}, {"params": [b, c], "lr": 0.02}],
        pretrained=NegGrad(),
        lr=0.3,
        weight_decay=0.01,
    )
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.02]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.5, 0.01]
    _set_grads([a, b, c], seed=2)
    grads = [p.grad.clone() for p in (a, b, c)]
    opt.step()
    for p, p0, g, lr, wd in zip((a, b, c), start, grads, (0.1, 0.02, 0.02), (0.5, 0.01, 0.01), strict=True):
        expected = p0 * (1 - lr * wd) + lr * (-g)
        torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-7)


def test_any_real_number_works_as_lr_and_weight_decay():
    # The checks accept any numbers.Real; the step must too (foreach ops take only Python numbers).
    (p,) = _params([(4,)])
    p0 = p.detach().clone()
    half, quarter = fractions.Fraction(1, 2), fractions.Fraction(1, 4)
    opt = LearnedOptimizer([p], pretrained=NegGrad(), lr=half, weight_decay=quarter)
    _set_grads([p], seed=5)
    g = p.grad.clone()
    opt.step()
    torch.testing.assert_close(p.detach(), p0 * (1 - 0.125) - 0.5 * g, rtol=0, atol=1e-7)
    assert opt.param_groups[0]["lr"] == fractions.Fraction(1, 2)  # the group keeps what the user set


def test_momentum_rule_state_evolves_per_coordinate():
    (p,) = _params([(6,)])
    p0 = p.detach().clone()
    opt = LearnedOptimizer([p], pretrained=Momentum(beta=0.5), lr=0.1, weight_decay=0.0)
    g1, g2 = torch.randn(6), torch.randn(6)
    p.grad = g1.clone()
    opt.step()
    torch.testing.assert_close(opt.state[p]["rule.m"], g1, rtol=0, atol=0)
    p.grad = g2.clone()
    opt.step()
    m2 = 0.5 * g1 + g2
    torch.testing.assert_close(opt.state[p]["rule.m"], m2, rtol=0, atol=1e-7)
    torch.testing.assert_close(p.detach(), p0 - 0.1 * g1 - 0.1 * m2, rtol=0, atol=1e-6)
    assert opt.state[p]["rule.m"].dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_weight_decay_factor_is_not_rounded(dtype):
    # 1 - lr * wd = 0.9 is 0.8984375 in bf16: decay and update are taken in fp32, then rounded once.
    (p,) = _params([(256,)], dtype=dtype)
    p0 = p.detach().clone()
    opt = LearnedOptimizer([p], pretrained=NegGrad(), lr=0.5, weight_decay=0.2)
    p.grad = torch.zeros_like(p)
    opt.step()
    assert torch.equal(p.detach(), (p0.float() * 0.9).to(dtype))
    p1 = p.detach().clone()
    _set_grads([p], seed=3)
    g = p.grad.float()
    opt.step()
    assert torch.equal(p.detach(), (p1.float() * 0.9 - 0.5 * g).to(dtype))


def test_an_adam_style_lr_warns_that_lr_is_a_multiplier():
    with pytest.warns(UserWarning, match=r"lr=0\.001 multiplies the learned update"):
        LearnedOptimizer([nn.Parameter(torch.ones(3))], pretrained=NegGrad(), lr=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for lr in (0.0, 0.1, 1.0, 3.0):  # lr=0 freezes on purpose
            LearnedOptimizer([nn.Parameter(torch.ones(3))], pretrained=NegGrad(), lr=lr)


def test_a_checkpoint_with_a_decayed_lr_loads_without_the_small_lr_warning():
    # An lr a scheduler decayed below 1e-2 during training, saved and resumed.
    (p,) = _params([(3,)])
    opt = LearnedOptimizer([p], pretrained=NegGrad())
    opt.param_groups[0]["lr"] = 1e-3
    saved = opt.state_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LearnedOptimizer([p], pretrained=NegGrad()).load_state_dict(saved)
    with pytest.raises(ValueError, match="lr must be a finite number"):  # still checked
        saved["param_groups"][0]["lr"] = float("nan")
        LearnedOptimizer([p], pretrained=NegGrad()).load_state_dict(saved)


def test_an_optimizer_rebuilds_from_its_defaults():
    # As code that swaps an optimizer's parameters does: type(opt)(params, **opt.defaults).
    (p,) = _params([(3,)])
    opt = LearnedOptimizer([p], pretrained=NegGrad(), lr=0.5, weight_decay=0.1)
    rebuilt = type(opt)([p], pretrained=NegGrad(), **opt.defaults)
    assert rebuilt.defaults == opt.defaults
    assert {k: v for k, v in rebuilt.param_groups[0].items() if k != "params"} == {
        k: v for k, v in opt.param_groups[0].items() if k != "params"
    }
    with pytest.raises(ValueError, match="momentum must be a finite number >= 0"):
        LearnedOptimizer([p], pretrained=NegGrad(), momentum=-1.0)


def test_param_group_options_are_checked_like_the_defaults():
    # Per-group lrs copied from an Adam setup (backbone 1e-5, head 1e-3) shrink the steps as much.
    a, b, c, d = _params([(2,), (2,), (2,), (2,)])
    with pytest.warns(UserWarning, match=r"lr=0\.001 multiplies the learned update") as caught:
        opt = LearnedOptimizer([{"params": [a], "lr": 1e-3}, {"params": [b]}], pretrained=NegGrad())
    assert [w.filename for w in caught] == [__file__]  # points at the caller's line
    with pytest.warns(UserWarning, match=r"lr=1e-05 multiplies") as caught:
        opt.add_param_group({"params": [c], "lr": 1e-5})
    assert [w.filename for w in caught] == [__file__]
    for bad in (
        {"lr": -0.1},
        {"lr": float("nan")},
        {"lr": float("inf")},
        {"weight_decay": -1.0},
        {"weight_decay": float("inf")},
    ):
        with pytest.raises(ValueError, match=f"{next(iter(bad))} must be a finite number >= 0, got"):
            opt.add_param_group({"params": [d], **bad})
    for bad in ({"lr": "1"}, {"weight_decay": None}, {"lr": torch.ones(2)}):
        with pytest.raises(TypeError, match=f"{next(iter(bad))} must be a number"):
            opt.add_param_group({"params": [d], **bad})
    for bad in ("yes", 1, None):  # a truthy string would silently flip the sign of every step
        with pytest.raises(TypeError, match=f"maximize must be True or False, got {type(bad).__name__}"):
            opt.add_param_group({"params": [d], "maximize": bad})
        with pytest.raises(TypeError, match="maximize must be True or False"):
            LearnedOptimizer([d], pretrained=NegGrad(), maximize=bad)
    assert len(opt.param_groups) == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.add_param_group({"params": [d], "lr": 0.5, "weight_decay": 0.1})


def test_float64_params_get_float64_weight_decay():
    p = nn.Parameter(torch.ones(3, dtype=torch.float64))
    with pytest.warns(UserWarning, match="multiplies the learned update"):
        opt = LearnedOptimizer([p], pretrained=NegGrad(), lr=1e-3, weight_decay=1e-4)
    p.grad = torch.zeros_like(p)
    opt.step()
    assert torch.equal(p.detach(), torch.full((3,), 1.0 - 1e-3 * 1e-4, dtype=torch.float64))


def test_lr_scheduler_scales_the_step():
    (p,) = _params([(4,)])
    opt = LearnedOptimizer([p], pretrained=NegGrad(), lr=0.4)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.25)
    g = torch.randn(4)
    deltas = []
    for _ in range(3):
        before = p.detach().clone()
        p.grad = g.clone()
        opt.step()
        sched.step()
        deltas.append(p.detach() - before)
    for delta, lr in zip(deltas, (0.4, 0.1, 0.025), strict=True):
        torch.testing.assert_close(delta, -lr * g, rtol=1e-5, atol=1e-7)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.4 * 0.25**3)


def test_step_context_segment_ids():
    params = _params([(3,), (2, 2), (1,)])
    start = [p.detach().clone() for p in params]
    opt = LearnedOptimizer(params, pretrained=SegmentIds(), lr=0.5)
    _set_grads(params, seed=0)
    opt.step()
    for i, (p, p0) in enumerate(zip(params, start, strict=True)):
        torch.testing.assert_close(p.detach(), p0 + 0.5 * i, rtol=0, atol=1e-7)


# ---------------------------------------------------------------------------- checkpoints


def _quadratic_grads(params, step):
    # Gradients that depend on the parameters, so any divergence after resume shows.
    loss = sum(((p.float() - 0.1 * step) ** 2 * (i + 1)).sum() for i, p in enumerate(params))
    grads = torch.autograd.grad(loss, params)
    for p, g in zip(params, grads, strict=True):
        p.grad = g


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_state_dict_resume_is_bit_identical(dtype):
    shapes = [(4, 3), (7,), (2, 2, 2)]
    params = _params(shapes, dtype=dtype)
    opt = LearnedOptimizer(params, pretrained=_lstm(), lr=0.05, weight_decay=0.01, chunk_size=10)
    for step in range(3):
        _quadratic_grads(params, step)
        opt.step()
    # torch.save/torch.load(weights_only=True) is how checkpoints travel; it must accept ours.
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    saved_params = [p.detach().clone() for p in params]
    for step in range(3, 6):
        _quadratic_grads(params, step)
        opt.step()

    resumed = [nn.Parameter(p.clone()) for p in saved_params]
    # A differently initialised rule of the same config: the checkpoint restores its weights.
    opt2 = LearnedOptimizer(resumed, pretrained=_lstm(seed=123), lr=0.05, weight_decay=0.01, chunk_size=10)
    buffer.seek(0)
    opt2.load_state_dict(torch.load(buffer, weights_only=True))
    for p in resumed:
        for key, value in opt2.state[p].items():
            assert value.dtype == torch.float32, key  # not cast to the parameter dtype
    for step in range(3, 6):
        _quadratic_grads(resumed, step)
        opt2.step()

    for p, q in zip(params, resumed, strict=True):
        assert p.dtype == q.dtype == dtype
        assert torch.equal(p.detach(), q.detach())
        assert opt.state[p].keys() == opt2.state[q].keys() == {"rule.h", "rule.c"}
        for key in opt.state[p]:
            assert opt2.state[q][key].dtype == torch.float32
            assert torch.equal(opt.state[p][key], opt2.state[q][key]), key
    for key, value in opt.rule.state_dict().items():
        assert torch.equal(value, opt2.rule.state_dict()[key])


def test_load_state_dict_does_not_alias_the_checkpoint():
    params = _params([(5,)])
    opt = LearnedOptimizer(params, pretrained=_lstm())
    _set_grads(params, 0)
    opt.step()
    sd = copy.deepcopy(opt.state_dict())
    snapshot = copy.deepcopy(sd)
    opt.load_state_dict(sd)
    _set_grads(params, 1)
    opt.step()
    for key, value in sd["state"][0].items():
        assert torch.equal(value, snapshot["state"][0][key])


def test_load_state_dict_with_a_different_rule_raises():
    params = _params([(5,)])
    opt = LearnedOptimizer(params, pretrained=_lstm(hidden_size=20))
    _set_grads(params, 0)
    opt.step()
    sd = opt.state_dict()
    other = LearnedOptimizer(_params([(5,)]), pretrained=_lstm(hidden_size=8))
    with pytest.raises(ValueError, match="different update rule"):
        other.load_state_dict(sd)
    other_type = LearnedOptimizer(_params([(5,)]), pretrained=Momentum())
    with pytest.raises(ValueError, match="different update rule"):
        other_type.load_state_dict(sd)


def _stepped(impl: str = "eager", pretrained=None, shapes=((6,), (2, 3)), steps: int = 2):
    params = _params(shapes)
    opt = LearnedOptimizer(params, pretrained=pretrained if pretrained is not None else _lstm(), impl=impl)
    for seed in range(steps):
        _set_grads(params, seed)
        opt.step()
    return params, opt


def _impls():
    return ["eager", *(["cpu"] if "cpu" in CoordinateLSTM().fused_impls() else [])]


@pytest.mark.parametrize("impl", _impls())
@pytest.mark.parametrize("rule", ["lstm", "hrnn"])
def test_deepcopy_and_pickle_give_an_optimizer_that_steps_the_same(impl, rule):
    pretrained = _lstm() if rule == "lstm" else learned_optim.HierarchicalRNN()
    params, opt = _stepped(impl, pretrained)
    copies = [copy.deepcopy(opt)]
    buffer = io.BytesIO()
    torch.save(opt, buffer)  # whole-object pickling, as some training frameworks do
    buffer.seek(0)
    copies.append(torch.load(buffer, weights_only=False))
    for other in copies:
        other_params = [p for g in other.param_groups for p in g["params"]]
        assert all(q is not p for p, q in zip(params, other_params, strict=True))
        _set_grads(other_params, 7)
        other.step()
    _set_grads(params, 7)
    opt.step()
    for other in copies:
        for p, q in zip(params, [p for g in other.param_groups for p in g["params"]], strict=True):
            assert torch.equal(p, q)
        assert sorted(other.state_dict()) == sorted(opt.state_dict())


def test_load_state_dict_rejects_state_of_another_size_and_changes_nothing():
    _, saved = _stepped(shapes=((6,), (2, 3)))
    sd = saved.state_dict()
    params, opt = _stepped(shapes=((6,), (5,)))
    opt.param_groups[0]["lr"] = 0.25
    before = {k: v.clone() for k, v in opt.state[params[1]].items()}
    with pytest.raises(
        ValueError, match=r"parameter 1 was saved with shape \(2, 3\), this optimizer's has shape \(5,\)"
    ):
        opt.load_state_dict(sd)
    del sd["param_shapes"]  # as torch.distributed.checkpoint keeps it: the state's own shape tells
    expected = r"parameter 1 \(shape \(5,\)\): 'h' has shape \(2, 3, 2, 20\), expected \(5, 2, 20\)"
    with pytest.raises(ValueError, match=expected):
        opt.load_state_dict(sd)
    assert opt.param_groups[0]["lr"] == 0.25
    assert all(torch.equal(opt.state[params[1]][k], v) for k, v in before.items())


def test_load_state_dict_rejects_a_parameter_of_the_same_size_and_another_shape():
    # Adam's state has the parameter's shape and fails at the next step; ours is one row per
    # coordinate, so a (2, 3) state on a (3, 2) parameter would step the wrong coordinates.
    _, saved = _stepped(shapes=((6,), (2, 3)))
    sd = saved.state_dict()
    params, opt = _stepped(shapes=((6,), (3, 2)))
    before = {k: v.clone() for k, v in opt.state[params[1]].items()}
    with pytest.raises(
        ValueError, match=r"parameter 1 was saved with shape \(2, 3\), this optimizer's has shape \(3, 2\)"
    ):
        opt.load_state_dict(sd)
    assert all(torch.equal(opt.state[params[1]][k], v) for k, v in before.items())
    del sd["param_shapes"]
    with pytest.raises(ValueError, match=r"'h' has shape \(2, 3, 2, 20\), expected \(6, 2, 20\)"):
        opt.load_state_dict(sd)  # the state is laid out as its parameter: the shape is in it
    # Earlier versions saved one row per coordinate and no shapes: such dicts still load.
    sd["state"][1] = {k: v.reshape(6, *v.shape[2:]) for k, v in sd["state"][1].items()}
    opt.load_state_dict(sd)


@pytest.mark.parametrize(
    "bad, error, message",
    [
        ({"lr": float("nan")}, ValueError, "lr must be a finite number >= 0"),
        ({"lr": -1.0}, ValueError, "lr must be a finite number >= 0"),
        ({"lr": "0.5"}, TypeError, "lr must be a number"),
        ({"weight_decay": None}, TypeError, "weight_decay must be a number"),
        ({"maximize": "no"}, TypeError, "maximize must be True or False"),
    ],
)
def test_load_state_dict_checks_the_saved_group_options(bad, error, message):
    # The constructor refuses these; a loaded one would step silently wrong (NaN parameters, uphill).
    params, opt = _stepped()
    sd = copy.deepcopy(opt.state_dict())
    sd["param_groups"][0].update(bad)
    before = [p.detach().clone() for p in params]
    with pytest.raises(error, match=message):
        opt.load_state_dict(sd)
    assert opt.param_groups[0]["lr"] == 1.0
    _set_grads(params, 7)
    opt.step()
    assert all(torch.isfinite(p).all() and not torch.equal(p, b) for p, b in zip(params, before, strict=True))


def test_a_state_dict_without_the_rule_or_its_fingerprint_says_what_is_missing():
    # torch.distributed.checkpoint keeps only these two entries; a tool that also drops the
    # groups' fingerprint leaves nothing that names the rule.
    _, opt = _stepped()
    sd = opt.state_dict()
    groups = [{k: v for k, v in g.items() if k != "rule_sha256"} for g in sd["param_groups"]]
    with pytest.raises(ValueError, match=r"without its 'rule' entry.*param-group entries"):
        opt.load_state_dict({"state": sd["state"], "param_groups": groups})


def test_every_live_param_group_names_the_rule():
    # Flattened checkpoints (torch.distributed.checkpoint) restore only the keys live groups have.
    params, opt = _stepped()
    fingerprint = opt.state_dict()["param_groups"][0]["rule_sha256"]
    extra = nn.Parameter(torch.zeros(3))
    opt.add_param_group({"params": [extra], "lr": 0.5})
    assert [g["rule_sha256"] for g in opt.param_groups] == [fingerprint, fingerprint]
    opt.load_state_dict(opt.state_dict())
    assert [g["rule_sha256"] for g in opt.param_groups] == [fingerprint, fingerprint]
    assert "rule_sha256" not in repr(opt)  # the head of the repr names the rule
    other = LearnedOptimizer(params, pretrained="lstm-mnist")
    assert other.param_groups[0]["rule_sha256"] != fingerprint


def test_a_param_group_naming_another_rule_refuses_to_step():
    # What ZeroRedundancyOptimizer.load_state_dict leaves after loading another rule's checkpoint.
    params, opt = _stepped()
    other = LearnedOptimizer([nn.Parameter(torch.zeros(2))], pretrained="lstm-mnist")
    opt.param_groups[0]["rule_sha256"] = other.param_groups[0]["rule_sha256"]
    before = [p.detach().clone() for p in params]
    state_before = copy.deepcopy(opt.state_dict()["state"])
    for p in params:
        p.grad = torch.ones_like(p)
    with pytest.raises(RuntimeError, match="param group 0 names another update rule"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, params, strict=True))
    assert all(torch.equal(opt.state_dict()["state"][0][k], v) for k, v in state_before[0].items())
    # A group added without the key (by hand, not add_param_group) is named, not refused.
    del opt.param_groups[0]["rule_sha256"]
    opt.step()
    assert opt.param_groups[0]["rule_sha256"] == opt.state_dict()["param_groups"][0]["rule_sha256"]


def test_parameters_on_the_meta_device_step_without_reading_values():
    # Shape-only dry runs (meta tensors) work with Adam; the non-finite screen must not read values.
    params = [nn.Parameter(torch.empty(4, 3, device="meta")), nn.Parameter(torch.empty(3, device="meta"))]
    for nonfinite in ("skip", "error"):
        opt = LearnedOptimizer(params, pretrained=_lstm(), nonfinite=nonfinite)
        for p in params:
            p.grad = torch.empty_like(p)
        opt.step()
        assert opt.state[params[0]]["rule.h"].device.type == "meta"


def test_an_integer_parameter_with_a_gradient_is_named():
    weights = nn.Parameter(torch.ones(3))
    counts = torch.zeros(2, dtype=torch.int64)
    opt = LearnedOptimizer([weights, counts], pretrained=NegGrad())
    weights.grad = torch.ones(3)
    opt.step()  # without a gradient an integer tensor is left alone, as by torch.optim
    counts.grad = torch.ones(2, dtype=torch.int64)
    with pytest.raises(TypeError, match=r"parameter 1 \(shape \(2,\)\) has dtype torch.int64"):
        opt.step()


def test_a_parameter_listed_twice_in_a_group_is_refused():
    # torch only warns: the update would be applied twice while the rule state advances once.
    a, b = _params([(2,), (3,)])
    with pytest.raises(ValueError, match=r"same parameter twice \(positions 0 and 2, shape \(2,\)\)"):
        LearnedOptimizer([a, b, a], pretrained=NegGrad())
    opt = LearnedOptimizer([b], pretrained=NegGrad())
    with pytest.raises(ValueError, match="same parameter twice"):
        opt.add_param_group({"params": iter([a, a])})
    assert len(opt.param_groups) == 1
    # Tied weights listed under two names, as named_parameters(remove_duplicate=False) gives them.
    with pytest.raises(ValueError, match=r"positions 0 and 2: 'emb', 'out', shape \(2,\)"):
        LearnedOptimizer([("emb", a), ("b", b), ("out", a)], pretrained=NegGrad())
    model = nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 5, bias=False))
    model[1].weight = model[0].weight
    with pytest.raises(ValueError, match="same parameter twice"):
        LearnedOptimizer(list(model.named_parameters(remove_duplicate=False)))


def test_the_nonfinite_warning_points_at_the_users_line_through_a_scheduler():
    (p,) = _params([(3,)])
    opt = LearnedOptimizer([p], pretrained=NegGrad())
    torch.optim.lr_scheduler.StepLR(opt, step_size=10)  # wraps opt.step
    p.grad = torch.full((3,), float("nan"))
    with pytest.warns(RuntimeWarning, match="non-finite gradients") as caught:
        opt.step()
    assert [w.filename for w in caught] == [__file__]


def test_load_state_dict_rejects_other_optimizers_and_bad_rule_weights():
    params, opt = _stepped()
    adam_params = _params([(6,), (2, 3)])
    adam = torch.optim.Adam(adam_params)
    _set_grads(adam_params, 0)
    adam.step()
    with pytest.raises(ValueError, match="not a LearnedOptimizer state_dict"):
        opt.load_state_dict(adam.state_dict())
    sd = copy.deepcopy(opt.state_dict())
    sd["param_groups"][0]["lr"] = 0.123
    del sd["rule"]["weights"]["output.weight"]
    before = params[0].detach().clone(), {k: v.clone() for k, v in opt.state[params[0]].items()}
    with pytest.raises(ValueError, match=r"rule weights missing \['output.weight'\]"):
        opt.load_state_dict(sd)
    assert opt.param_groups[0]["lr"] == 1.0  # nothing was loaded
    assert all(torch.equal(opt.state[params[0]][k], v) for k, v in before[1].items())


@pytest.mark.parametrize(
    ("where", "make_bad", "message"),
    [
        ("weight", lambda t: t.fill_(float("nan")), r"rule weight 'output.bias' holds non-finite values"),
        ("weight", lambda t: t.long(), r"rule weight 'output.bias' has dtype torch.int64, expected floats"),
        ("state", lambda t: t.fill_(float("inf")), r"parameter 0 \(shape \(6,\)\): 'h' holds non-finite values"),
        ("state", lambda t: t.int(), r"'h' has dtype torch.int32, expected a float dtype"),
        ("state", lambda t: torch.complex(t, t), r"'h' has dtype torch.complex64, expected a float dtype"),
        # Finite in float64, inf once kept in float32: checked as they will be kept.
        ("weight", lambda t: t.double().fill_(1e300), r"'output.bias' holds non-finite values .* in torch.float32"),
        ("state", lambda t: t.double().fill_(1e300), r"'h' holds non-finite values"),
    ],
)
def test_load_state_dict_rejects_non_finite_or_non_float_rule_tensors(where, make_bad, message):
    # A weight file with such values is refused on load; a checkpoint must be too, before
    # anything changes (loaded, the first step would make the parameters NaN or fail).
    params, opt = _stepped()
    sd = copy.deepcopy(opt.state_dict())
    sd["param_groups"][0]["lr"] = 0.123
    if where == "weight":
        sd["rule"]["weights"]["output.bias"] = make_bad(sd["rule"]["weights"]["output.bias"])
    else:
        sd["state"][0]["rule.h"] = make_bad(sd["state"][0]["rule.h"])
    before = {k: v.clone() for k, v in opt.state[params[0]].items()}
    weights = {k: v.clone() for k, v in opt.rule.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        opt.load_state_dict(sd)
    assert opt.param_groups[0]["lr"] == 1.0
    assert all(torch.equal(opt.state[params[0]][k], v) for k, v in before.items())
    assert all(torch.equal(opt.rule.state_dict()[k], v) for k, v in weights.items())


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda sd: sd.update(state=[]), r"'state' must be a dict from parameter index to its state, got list"),
        (lambda sd: sd["state"].update({0: None}), r"state of parameter 0 must be a dict keyed by names, got NoneType"),
        (lambda sd: sd["state"][0].update({7: torch.zeros(1)}), r"state of parameter 0 must be a dict keyed by names"),
        (lambda sd: sd.update(param_shapes=[None]), r"'param_shapes'\[0\] is None, expected a list of ints"),
    ],
)
def test_load_state_dict_refuses_a_malformed_layout_by_name(corrupt, message):
    params, opt = _stepped()
    sd = copy.deepcopy(opt.state_dict())
    corrupt(sd)
    before = {k: v.clone() for k, v in opt.state[params[0]].items()}
    with pytest.raises(ValueError, match=message):
        opt.load_state_dict(sd)
    assert all(torch.equal(opt.state[params[0]][k], v) for k, v in before.items())


@pytest.mark.parametrize("impl", _impls())
@pytest.mark.parametrize("rule", ["lstm", "hrnn"])
@pytest.mark.parametrize(
    ("saved_dtype", "loading_dtype"),
    [
        (torch.float16, torch.float32),
        (torch.float64, torch.float32),
        (torch.bfloat16, torch.float32),
        (torch.float32, torch.bfloat16),
    ],
)
def test_loaded_rule_state_takes_the_optimizers_state_dtype(impl, rule, saved_dtype, loading_dtype):
    # A checkpoint saved with another state_dtype resumes in the loading optimizer's (which
    # the fused kernels can run), including beside fresh state of a parameter added later.
    make = (lambda: _lstm()) if rule == "lstm" else (lambda: learned_optim.HierarchicalRNN())
    (a,) = _params([(6,)])
    saver = LearnedOptimizer([a], pretrained=make(), state_dtype=saved_dtype, impl="eager")
    _set_grads([a], 0)
    saver.step()
    (b,) = _params([(4,)], seed=2)
    opt = LearnedOptimizer([a], pretrained=make(), state_dtype=loading_dtype, impl=impl)
    opt.load_state_dict(saver.state_dict())
    opt.add_param_group({"params": [b]})
    for seed in (1, 2):
        _set_grads([a, b], seed)
        opt.step()
    state_dtypes = {v.dtype for p in (a, b) for k, v in opt.state[p].items() if k.startswith("rule.")}
    assert state_dtypes == {loading_dtype}
    assert torch.isfinite(a).all() and torch.isfinite(b).all()


@pytest.mark.parametrize("name", ["lstm-mnist-gain", "lstm-mnist-mixed-momentum"])
@pytest.mark.parametrize("impl", _impls())
def test_a_gradient_spike_beyond_float32_squares_leaves_momentum_rules_finite(name, impl):
    # |g| = 1e20 squares to inf in float32: the running mean square stayed inf for good, and
    # with per-tensor inputs the parameters became NaN on the next step.
    p = nn.Parameter(torch.ones(4))
    opt = LearnedOptimizer([p], pretrained=name, impl=impl)
    for g in (1e20, -1e20, 1.0, 1.0):
        p.grad = torch.full((4,), g)
        opt.step()
        assert torch.isfinite(p).all()
        assert all(torch.isfinite(v).all() for k, v in opt.state[p].items() if k.startswith("rule."))


def test_constructing_the_optimizer_leaves_the_global_rng_alone():
    # Swapping Adam for it must not change later random draws (data order, dropout, init).
    torch.manual_seed(0)
    expected = torch.rand(3)
    for make in (lambda: LearnedOptimizer(_params([(3,)])), lambda: learned_optim.load_rule("hrnn-base")):
        torch.manual_seed(0)
        make()
        assert torch.equal(torch.rand(3), expected)


def test_lstm_kernel_sees_rule_weights_edited_through_data():
    # `.data` edits move no version counter; the CPU kernel's packed weights must not go stale.
    if "cpu" not in CoordinateLSTM().fused_impls():
        pytest.skip("no CPU kernel here")
    results = []
    for impl in ("cpu", "eager"):
        (p,) = _params([(10,)])
        opt = LearnedOptimizer([p], pretrained=_lstm(), impl=impl)
        _set_grads([p], 0)
        opt.step()
        for weight in opt.rule.parameters():
            weight.data.mul_(0.5)
        _set_grads([p], 1)
        opt.step()
        results.append(p.detach().clone())
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rule", ["lstm", "hrnn"])
def test_load_state_dict_pre_hook_rewrites_what_is_loaded(rule):
    # torch.optim's documented way to adapt a checkpoint to reordered parameters: the rule
    # state must follow the rewritten dict, not the one passed in.
    pretrained = _lstm() if rule == "lstm" else learned_optim.HierarchicalRNN()
    (a, b), opt = _stepped(pretrained=pretrained, shapes=((3,), (3,)))
    sd = opt.state_dict()
    b2, a2 = nn.Parameter(b.detach().clone()), nn.Parameter(a.detach().clone())
    other = LearnedOptimizer([b2, a2], pretrained=copy.deepcopy(pretrained))

    def swap(optimizer, state_dict):
        state_dict = dict(state_dict)
        state_dict["state"] = {0: state_dict["state"][1], 1: state_dict["state"][0]}
        return state_dict

    other.register_load_state_dict_pre_hook(swap)
    other.load_state_dict(sd)
    for p, q in ((a, a2), (b, b2)):
        assert opt.state[p].keys() == other.state[q].keys()
        assert all(torch.equal(opt.state[p][k], other.state[q][k]) for k in opt.state[p])


def test_load_state_dict_post_hook_sees_the_loaded_rule_and_state():
    (p,) = _params([(3,)], dtype=torch.bfloat16)
    rule = _lstm(seed=5)
    opt = LearnedOptimizer([p], pretrained=rule)
    _set_grads([p], 0)
    opt.step()
    q = nn.Parameter(p.detach().clone())
    other = LearnedOptimizer([q], pretrained=_lstm(seed=6))
    seen = []
    other.register_load_state_dict_post_hook(
        lambda o: seen.append((o.state[q]["rule.h"].dtype, torch.equal(o.rule.output.weight, rule.output.weight)))
    )
    other.load_state_dict(opt.state_dict())
    assert seen == [(torch.float32, True)]  # not the bf16 cast torch makes, not the old weights


def test_state_dict_hooks_see_the_whole_state_dict():
    _, opt = _stepped(pretrained=learned_optim.HierarchicalRNN())
    seen = []

    def post(optimizer, state_dict):
        seen.append(sorted(state_dict))
        return {**state_dict, "rule": {**state_dict["rule"], "note": 1}}

    opt.register_state_dict_post_hook(post)
    sd = opt.state_dict()
    assert seen == [["param_groups", "param_shapes", "rule", "rule_global_state", "state"]]
    assert sd["rule"]["note"] == 1  # what the hook returned is what state_dict returns


@pytest.mark.parametrize(
    "make",
    [
        lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1.0, total_steps=10),
        lambda opt: torch.optim.lr_scheduler.CyclicLR(opt, base_lr=0.1, max_lr=1.0, step_size_up=2),
    ],
)
def test_cycling_schedulers_work_with_their_default_arguments(make):
    params = _params([(4,)])
    opt = LearnedOptimizer(params, pretrained=NegGrad())
    opt.add_param_group({"params": _params([(2,)], seed=2)})
    scheduler = make(opt)  # refuses an optimizer without a momentum to cycle
    lrs = []
    for seed in range(4):
        _set_grads([p for g in opt.param_groups for p in g["params"]], seed)
        before = params[0].detach().clone()
        opt.step()
        lrs.append(opt.param_groups[0]["lr"])
        torch.testing.assert_close(params[0].detach(), before - lrs[-1] * params[0].grad)
        scheduler.step()
    assert all(a != b for a, b in itertools.pairwise(lrs)), lrs  # the scheduler moved the lr every step


# ---------------------------------------------------------------------------- odd parameters


def test_params_without_grad_are_skipped_and_keep_state():
    a, b = _params([(4,), (3,)])
    opt = LearnedOptimizer([a, b], pretrained=_lstm(), weight_decay=0.1)
    _set_grads([a, b], 0)
    opt.step()
    a_before, a_state = a.detach().clone(), _rule_state(opt, a)
    b_before, b_state = b.detach().clone(), _rule_state(opt, b)
    a.grad = None
    b.grad = torch.randn(3)
    opt.step()
    assert torch.equal(a.detach(), a_before)
    assert all(torch.equal(opt.state[a][k], v) for k, v in a_state.items())
    assert not torch.equal(b.detach(), b_before)
    assert not torch.equal(opt.state[b]["rule.h"], b_state["rule.h"])
    c = nn.Parameter(torch.randn(2))  # never had a gradient: no state at all
    opt.add_param_group({"params": [c]})
    opt.step()
    assert c not in opt.state or not opt.state[c]


def test_empty_parameter_is_fine():
    a, b = nn.Parameter(torch.empty(0, 3)), nn.Parameter(torch.randn(3))
    opt = LearnedOptimizer([a, b], pretrained=NegGrad(), lr=0.5)
    a.grad, b.grad = torch.empty(0, 3), torch.ones(3)
    b0 = b.detach().clone()
    opt.step()
    torch.testing.assert_close(b.detach(), b0 - 0.5)


def test_sparse_gradient_raises():
    emb = nn.Embedding(10, 3, sparse=True)
    opt = LearnedOptimizer(emb.parameters(), pretrained=_lstm())
    emb(torch.tensor([1, 2])).sum().backward()
    assert emb.weight.grad.is_sparse
    before = emb.weight.detach().clone()
    with pytest.raises(RuntimeError, match=r"parameter 0 \(shape \(10, 3\)\) has a sparse gradient"):
        opt.step()
    assert torch.equal(emb.weight, before)


@pytest.mark.parametrize("impl", _impls())
def test_a_parameter_resized_after_its_state_was_made_raises_before_changing_anything(impl):
    # p.data = <bigger tensor> (growing an embedding in place): the fused path used to update
    # only the rows it had state for and leave the rest, the eager path failed in torch.cat.
    params, opt = _stepped(impl, shapes=((4,), (3,)), steps=1)
    params[0].data = torch.randn(6)
    _set_grads(params, 1)
    before = [p.detach().clone() for p in params], [_rule_state(opt, p) for p in params]
    with pytest.raises(RuntimeError, match=r"parameter 0 .* 6 elements, but its rule state has 4 rows"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before[0], strict=True))
    for p, state in zip(params, before[1], strict=True):
        assert all(torch.equal(opt.state[p][k], v) for k, v in state.items())


def test_complex_params_are_handled_as_real_view():
    gen = torch.Generator().manual_seed(0)
    p = nn.Parameter(torch.randn(3, 2, dtype=torch.complex64, generator=gen))
    q = nn.Parameter(p.detach().clone())
    opt = LearnedOptimizer([p], pretrained=NegGrad(), lr=0.1)
    sgd = torch.optim.SGD([q], lr=0.1)
    target = torch.randn(3, 2, dtype=torch.complex64, generator=gen)
    for o, x in ((opt, p), (sgd, q)):
        ((x - target).abs() ** 2).sum().backward()
        o.step()
    torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=1e-7)

    r = nn.Parameter(torch.randn(4, dtype=torch.complex64, generator=gen))
    opt = LearnedOptimizer([r], pretrained=_lstm())
    r0 = r.detach().clone()
    r.grad = torch.randn(4, dtype=torch.complex64, generator=gen)
    opt.step()
    assert r.dtype == torch.complex64
    assert opt.state[r]["rule.h"].shape == (8, 2, 20)  # one LSTM state per real coordinate
    assert not torch.equal(torch.view_as_real(r.detach()), torch.view_as_real(r0))


def test_non_contiguous_params():
    gen = torch.Generator().manual_seed(0)
    t = nn.Parameter(torch.randn(4, 3, generator=gen).t())  # transposed
    cl = nn.Parameter(torch.randn(2, 3, 4, 5, generator=gen).to(memory_format=torch.channels_last))
    assert not t.is_contiguous() and cl.is_contiguous(memory_format=torch.channels_last)
    strides = (t.stride(), cl.stride())
    refs = [nn.Parameter(x.detach().contiguous()) for x in (t, cl)]
    rule = _lstm()
    opt = LearnedOptimizer([t, cl], pretrained=rule, weight_decay=0.1, chunk_size=17)
    opt_ref = LearnedOptimizer(refs, pretrained=rule, weight_decay=0.1, chunk_size=17)
    for step in range(2):
        grads = [torch.randn(x.shape, generator=gen) for x in (t, cl)]
        for x, r, g in zip((t, cl), refs, grads, strict=True):
            x.grad, r.grad = g.clone(), g.clone()
        opt.step()
        opt_ref.step()
        assert (t.stride(), cl.stride()) == strides  # the layout is kept
        for x, r in zip((t, cl), refs, strict=True):
            assert torch.equal(x.detach(), r.detach()), step


# ---------------------------------------------------------------------------- non-finite gradients


def _two_params_after_one_step(nonfinite):
    a, b = _params([(4,), (3,)])
    opt = LearnedOptimizer([a, b], pretrained=_lstm(), weight_decay=0.1, nonfinite=nonfinite)
    _set_grads([a, b], 0)
    opt.step()
    return a, b, opt


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_skip(bad):
    a, b, opt = _two_params_after_one_step("skip")
    a0, a_state = a.detach().clone(), _rule_state(opt, a)
    b0, b_state = b.detach().clone(), _rule_state(opt, b)
    a.grad = torch.tensor([1.0, bad, 0.5, -0.5])
    b.grad = torch.randn(3)
    with pytest.warns(RuntimeWarning, match="non-finite"):
        opt.step()
    assert torch.equal(a.detach(), a0)  # not even weight decay
    assert all(torch.equal(opt.state[a][k], v) for k, v in a_state.items())
    assert not torch.equal(b.detach(), b0)
    assert not torch.equal(opt.state[b]["rule.c"], b_state["rule.c"])
    assert torch.isfinite(b.detach()).all()
    assert all(torch.isfinite(v).all() for v in opt.state[b].values())


def test_nonfinite_skip_without_warning():
    a, b = _params([(4,), (3,)])
    opt = LearnedOptimizer([a, b], pretrained=_lstm(), warn_nonfinite=False)
    a.grad = torch.full((4,), float("nan"))
    b.grad = torch.randn(3)
    a0 = a.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()
    assert torch.equal(a.detach(), a0)


def test_nonfinite_error_changes_nothing():
    a, b, opt = _two_params_after_one_step("error")
    a0, a_state = a.detach().clone(), _rule_state(opt, a)
    b0, b_state = b.detach().clone(), _rule_state(opt, b)
    a.grad = torch.randn(4)
    b.grad = torch.tensor([0.0, float("inf"), 1.0])
    with pytest.raises(FloatingPointError, match="non-finite"):
        opt.step()
    assert torch.equal(a.detach(), a0) and torch.equal(b.detach(), b0)
    assert all(torch.equal(opt.state[a][k], v) for k, v in a_state.items())
    assert all(torch.equal(opt.state[b][k], v) for k, v in b_state.items())


class LogGrad(UpdateRule):
    """A buggy rule: update = -log(grad), NaN wherever the gradient is negative."""

    rule_type = "_test_opt_log_grad"

    def state_spec(self):
        return {}

    def forward(self, grad, state, context=None):
        return -torch.log(grad), state


@pytest.mark.parametrize("nonfinite", ["skip", "error"])
def test_nonfinite_gradient_message_says_when_the_parameter_itself_went_bad(nonfinite):
    # The rule wrote NaN into the weight; the next step's message blamed only the gradient,
    # and "skip" went on skipping for ever.
    model = nn.Linear(3, 1)
    opt = LearnedOptimizer(model.parameters(), pretrained=LogGrad(), lr=0.1, nonfinite=nonfinite)
    x = torch.tensor([[1.0, -2.0, 3.0]])
    model(x).sum().backward()
    opt.step()  # the weight's gradient is x: log(-2) is NaN; the bias's is 1
    assert model.weight.isnan().any() and not model.bias.isnan().any()
    opt.zero_grad()
    model(x).square().sum().backward()  # both gradients are NaN now, through the output
    if nonfinite == "skip":
        with pytest.warns(RuntimeWarning, match="1 of these parameter tensors hold inf/NaN") as record:
            opt.step()
        assert "2 parameter tensor(s)" in str(record[0].message)
    else:
        with pytest.raises(FloatingPointError, match="hold inf/NaN values themselves"):
            opt.step()


def test_nonfinite_gradient_message_leaves_finite_parameters_out():
    a, b, opt = _two_params_after_one_step("skip")
    a.grad = torch.tensor([1.0, float("nan"), 0.5, -0.5])
    b.grad = torch.randn(3)
    with pytest.warns(RuntimeWarning, match="non-finite") as record:
        opt.step()
    assert "inf/NaN values themselves" not in str(record[0].message)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device (CUDA)")
def test_nonfinite_error_with_two_devices_changes_nothing_on_either():
    # The bad gradient is on the device updated last: the first device must stay untouched too.
    a = torch.nn.Parameter(torch.randn(4))
    b = torch.nn.Parameter(torch.randn(3, device="cuda"))
    opt = LearnedOptimizer([a, b], pretrained=NegGrad(), lr=0.1, nonfinite="error")
    a0, b0 = a.detach().clone(), b.detach().clone()
    a.grad = torch.randn(4)
    b.grad = torch.tensor([0.0, float("inf"), 1.0], device="cuda")
    with pytest.raises(FloatingPointError, match="cuda"):
        opt.step()
    assert torch.equal(a.detach(), a0) and torch.equal(b.detach(), b0)


# ---------------------------------------------------------------------------- options


def test_maximize_negates_the_gradient():
    (p,) = _params([(5,)])
    p0 = p.detach().clone()
    opt = LearnedOptimizer([p], pretrained=NegGrad(), lr=0.1, maximize=True)
    g = torch.randn(5)
    p.grad = g.clone()
    opt.step()
    torch.testing.assert_close(p.detach(), p0 + 0.1 * g, rtol=0, atol=1e-7)

    rule = _lstm()
    x, y = _params([(6,)], seed=3)[0], _params([(6,)], seed=3)[0]
    opt_max = LearnedOptimizer([x], pretrained=rule, maximize=True)
    opt_min = LearnedOptimizer([y], pretrained=rule)
    for _ in range(2):
        g = torch.randn(6)
        x.grad, y.grad = g.clone(), -g
        opt_max.step()
        opt_min.step()
    assert torch.equal(x.detach(), y.detach())
    assert torch.equal(opt_max.state[x]["rule.h"], opt_min.state[y]["rule.h"])


@pytest.mark.parametrize("rule_factory", [Momentum, _lstm], ids=["momentum", "lstm"])
def test_chunked_equals_unchunked(rule_factory):
    shapes = [(5,), (3, 4), (17,), (2, 3, 5), (1,), (64,)]
    rule = rule_factory()
    runs = []
    for chunk_size in (1 << 20, 7, 1, 16):
        params = _params(shapes)
        opt = LearnedOptimizer(params, pretrained=rule, lr=0.5, weight_decay=0.1, chunk_size=chunk_size)
        for step in range(3):
            _set_grads(params, seed=10 + step)
            opt.step()
        runs.append((params, opt))
    # An elementwise rule must agree bit for bit. The LSTM's gate matmul may round the last
    # bit differently with the number of rows (CPU BLAS kernels), so it gets a 1e-6 margin.
    exact = rule_factory is Momentum
    (ref, ref_opt), *others = runs
    for params, opt in others:
        for p, q in zip(ref, params, strict=True):
            pairs = [(p.detach(), q.detach())] + [(ref_opt.state[p][k], opt.state[q][k]) for k in ref_opt.state[p]]
            for x, y in pairs:
                if exact:
                    assert torch.equal(x, y)
                else:
                    torch.testing.assert_close(x, y, rtol=0, atol=1e-6)


def test_grad_scaler_skips_inf_steps_and_applies_others():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    opt = LearnedOptimizer(model.parameters(), pretrained=NegGrad(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    x = torch.randn(5, 3)

    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    loss = model(x).pow(2).sum()
    true_grads = torch.autograd.grad(loss, list(model.parameters()), retain_graph=True)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    for p, p0, g in zip(model.parameters(), before, true_grads, strict=True):
        torch.testing.assert_close(p.detach(), p0 - 0.1 * g, rtol=1e-5, atol=1e-6)
    assert scaler.get_scale() == 2.0**8

    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    scaler.scale(model(x).pow(2).sum() * float("inf")).backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the scaler skips the step: our non-finite path never runs
        scaler.step(opt)
    scaler.update()
    assert all(torch.equal(p.detach(), p0) for p, p0 in zip(model.parameters(), before, strict=True))
    assert scaler.get_scale() == 2.0**7


@pytest.mark.parametrize("impl", _impls())
@pytest.mark.parametrize("rule", ["lstm", "hrnn"])
def test_step_inside_autocast_computes_the_rule_in_its_own_dtype(impl, rule):
    # Training loops often call step() inside the autocast region; the rule's matmuls must not
    # drop to bf16 there (the docs promise the rule computes in its own dtype).
    pretrained = _lstm() if rule == "lstm" else learned_optim.HierarchicalRNN()
    params, opt = _stepped(impl, pretrained, steps=0)
    refs, ref_opt = _stepped(impl, copy.deepcopy(pretrained), steps=0)
    for seed in range(2):
        _set_grads(params, seed)
        _set_grads(refs, seed)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            opt.step()
        ref_opt.step()
    for p, q in zip(params, refs, strict=True):
        assert torch.equal(p, q)
        assert all(torch.equal(opt.state[p][k], ref_opt.state[q][k]) for k in opt.state[p])


# ---------------------------------------------------------------------------- construction


def test_default_rule():
    params = _params([(3,)])
    if DEFAULT_RULE not in learned_optim.list_pretrained():
        with pytest.raises(PretrainedError, match="not bundled") as info:
            LearnedOptimizer(params)
        message = str(info.value)
        assert DEFAULT_RULE in message
        assert "Bundled rules" in message
        assert str(learned_optim.list_pretrained() or "none") in message
    else:
        opt = LearnedOptimizer(params)
        assert isinstance(opt.rule, UpdateRule)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lr": -0.1}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"weight_decay": -1.0}, "weight_decay"),
        ({"nonfinite": "ignore"}, "nonfinite"),
        ({"chunk_size": 0}, r"chunk_size must be an int >= 1 or None"),
        ({"state_dtype": torch.int32}, "state_dtype"),
    ],
)
def test_bad_constructor_args(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LearnedOptimizer(_params([(3,)]), pretrained=NegGrad(), **kwargs)


def test_pretrained_must_be_a_rule():
    with pytest.raises(TypeError, match="UpdateRule"):
        LearnedOptimizer(_params([(3,)]), pretrained=nn.Linear(2, 2))
    with pytest.raises(TypeError):
        LearnedOptimizer(_params([(3,)]), pretrained=3)
    # Adam(params, 1e-3) passes lr positionally; here the second argument is the rule.
    with pytest.raises(TypeError, match=r"second argument is `pretrained`.*lr=0\.001"):
        LearnedOptimizer(_params([(3,)]), 1e-3)


def test_state_dtype_bf16_state():
    (p,) = _params([(4,)])
    opt = LearnedOptimizer([p], pretrained=_lstm(), state_dtype=torch.bfloat16)
    _set_grads([p], 0)
    opt.step()
    assert opt.state[p]["rule.h"].dtype == torch.bfloat16
    assert opt.rule_class is CoordinateLSTM

    class WiderOutput(CoordinateLSTM):
        """A subclass keeps its parent's registered rule_type."""

    assert LearnedOptimizer([p], pretrained=WiderOutput(hidden_size=4)).rule_class is WiderOutput


@pytest.mark.parametrize("poison", [False, True])
def test_sync_free_step_matches_checked_step(poison):
    # warn_nonfinite=False never reads flags back (always masks); results must not change.
    results = []
    for warn in (True, False):
        params = _params([(5, 3), (7,)], seed=3)
        opt = LearnedOptimizer(params, pretrained=_lstm(), warn_nonfinite=warn, chunk_size=4)
        for step in range(3):
            _set_grads(params, seed=step)
            if poison and step == 1:
                params[0].grad[0, 0] = float("nan")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                opt.step()
        results.append(([p.detach().clone() for p in params], [dict(opt.state[p]) for p in params]))
    (p1, s1), (p2, s2) = results
    for a, b in zip(p1, p2, strict=True):
        assert torch.equal(a, b)
    for a, b in zip(s1, s2, strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_repr_names_the_rule_and_lists_the_groups():
    model = torch.nn.Linear(3, 2)
    opt = LearnedOptimizer(
        [{"params": [model.weight]}, {"params": [model.bias], "lr": 0.5}], pretrained="hrnn-base", impl="eager"
    )
    text = repr(opt)
    assert text.startswith("LearnedOptimizer (rule: HierarchicalRNN(param_hidden=10,")
    assert "impl: 'eager'" in text
    assert "Parameter Group 0" in text and "Parameter Group 1" in text and "lr: 0.5" in text
    assert text.endswith(")")


class TupleConfig(UpdateRule):
    """A rule whose config holds a tuple: JSON stores it as a list."""

    rule_type = "_test_opt_tuple_config"

    def __init__(self, scales: tuple[float, ...] = (1.0, 0.5)) -> None:
        super().__init__()
        self.config = {"scales": scales}
        self.scales = tuple(scales)

    def state_spec(self):
        return {}

    def forward(self, grad, state, context=None):
        return -self.scales[0] * grad, state


def test_state_dict_of_a_rule_loads_into_an_optimizer_with_the_rule_loaded_from_its_folder(tmp_path):
    # The saved folder gives config {"scales": [1.0, 0.5]}, the object {"scales": (1.0, 0.5)}:
    # the same rule, which load_state_dict used to reject as "a different update rule".
    rule = TupleConfig()
    rule.save_pretrained(tmp_path / "r")
    p = nn.Parameter(torch.ones(3))
    saved = LearnedOptimizer([p], pretrained=rule).state_dict()
    LearnedOptimizer([p], pretrained=str(tmp_path / "r")).load_state_dict(saved)
    with pytest.raises(ValueError, match="different update rule"):
        LearnedOptimizer([p], pretrained=TupleConfig((1.0, 0.25))).load_state_dict(saved)


@pytest.mark.parametrize("impl", ["eager", "auto"])
@pytest.mark.parametrize("rule_name", ["lstm", "hrnn-capped"])
def test_a_complex_parameter_steps_as_its_real_view_would(rule_name, impl):
    """A complex parameter and a real parameter holding its ``view_as_real`` take the same steps,
    per-tensor statistics (the hierarchical rule's relative step size) included."""
    from learned_optim import HierarchicalRNN

    gen = torch.Generator().manual_seed(1)
    z = nn.Parameter(torch.randn(5, 3, dtype=torch.complex64, generator=gen))
    w = nn.Parameter(torch.view_as_real(z.detach()).clone())
    target = torch.randn(5, 3, dtype=torch.complex64, generator=gen)

    torch.manual_seed(0)
    rule = _lstm() if rule_name == "lstm" else HierarchicalRNN(init_lr=0.05, relative_step_cap=0.05)
    opts = [LearnedOptimizer([x], pretrained=rule, impl=impl) for x in (z, w)]
    for _ in range(4):
        for opt, value in zip(opts, (z, torch.view_as_complex(w)), strict=True):
            opt.zero_grad()
            ((value - target).abs() ** 2).sum().backward()
            opt.step()
    torch.testing.assert_close(torch.view_as_real(z.detach()), w.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("pretrained", "expected"), [("lstm", 1 << 14), ("hrnn-base", 1 << 16)])
def test_default_chunk_size_on_cpu_is_the_rules(pretrained, expected):
    rule = _lstm() if pretrained == "lstm" else pretrained
    param = nn.Parameter(torch.zeros(70_000))
    opt = LearnedOptimizer([param], pretrained=rule, impl="eager")
    assert opt.chunk_size is None and opt.rule.eager_cpu_chunk_size == expected
    calls = []
    opt.rule.register_forward_pre_hook(lambda module, args: calls.append(args[0].numel()))
    param.grad = torch.randn(70_000)
    opt.step()
    # the 70,000 coordinates go through in chunks of the rule's size
    assert max(calls) == min(expected, 70_000) and sum(calls) == 70_000
    calls.clear()
    given = LearnedOptimizer([param], pretrained=opt.rule, impl="eager", chunk_size=5000)
    given.step()
    assert max(calls) == 5000 and sum(calls) == 70_000


def _set_float32_grads(params, seed):
    # Drawn in float32 whatever the default dtype (randn draws other numbers in float64).
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float32)


@pytest.mark.skipif("cpu" not in _impls(), reason="the fused CPU kernel does not build here")
@pytest.mark.parametrize("name", ["lstm-mnist-gain", "hrnn-base"])
def test_a_float64_default_dtype_keeps_the_fused_kernel_and_float32_rules(name):
    # The kernel probe's tensors followed the default dtype: impl="auto" warned and stepped
    # eagerly (6x slower), and the loaded rule's weights became float64.
    reference = [p.detach().clone() for p in _params([(5, 4), (3,)])]
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        params = [p.detach().clone().requires_grad_(True) for p in reference]
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            opt = LearnedOptimizer(params, pretrained=name)
            for seed in (1, 2):
                _set_float32_grads(params, seed)
                opt.step()
    finally:
        torch.set_default_dtype(previous)
    assert opt.impl_for(params[0].device) == "cpu"
    assert {w.dtype for w in opt.rule.parameters()} == {torch.float32}
    expected = [p.clone().requires_grad_(True) for p in reference]
    same = LearnedOptimizer(expected, pretrained=name)
    for seed in (1, 2):
        _set_float32_grads(expected, seed)
        same.step()
    for got, want in zip(params, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("impl", _impls())
@pytest.mark.parametrize("cast_to", [torch.float64, torch.float16, torch.bfloat16])
def test_state_cast_by_outside_code_comes_back_to_the_state_dtype(impl, cast_to):
    # The fused buffers took the widest dtype of the tensors: float64 state then failed the
    # kernel's dtype check, bf16 state silently stayed bf16 under state_dtype=float32.
    params = _params([(6,), (2, 3)])
    opt = LearnedOptimizer(params, pretrained=_lstm(), impl=impl)
    _set_grads(params, 0)
    opt.step()
    for state in opt.state.values():
        for key, value in state.items():
            if torch.is_tensor(value) and value.is_floating_point():
                state[key] = value.to(cast_to)
    for seed in (1, 2):
        _set_grads(params, seed)
        opt.step()
    assert all(torch.isfinite(p).all() for p in params)
    if impl != "eager":
        dtypes = {v.dtype for p in params for k, v in opt.state[p].items() if k.startswith("rule.")}
        assert dtypes == {torch.float32}


@pytest.mark.parametrize("impl", ["cpu", "triton"])
def test_a_custom_rule_without_kernels_names_the_rule_when_a_kernel_is_asked_for(impl):
    class Unregistered(UpdateRule):  # no rule_type: never saved, never registered
        def state_spec(self):
            return {}

        def forward(self, grad, state, context=None):
            return -grad, state

    with pytest.raises(ValueError, match=rf"impl='{impl}': rule Unregistered has no such fused kernel; it has none"):
        LearnedOptimizer([nn.Parameter(torch.ones(2))], pretrained=Unregistered(), impl=impl)


# Every bundled rule: the paper's LSTM (no momentum state), the momentum LSTMs and the
# hierarchical RNN.
_HOLD_RULES = ["lstm-mnist", "lstm-mnist-mixed-momentum", "lstm-mnist-gain", "hrnn-base"]


def _rule_impls(name: str) -> list[str]:
    return ["eager", *learned_optim.load_rule(name).fused_impls()]


def _embedding_run(pretrained, impl: str, steps: int = 6):
    """An embedding's padding row, rows never looked up, a row looked up only in the first two
    steps, and a layer left out of the loss whose gradient zero_grad keeps as zeros: the
    weights at the start, after step 2 and at the end."""
    torch.manual_seed(0)
    embedding = nn.Embedding(8, 4, padding_idx=0)
    unused = nn.Linear(4, 3)
    head = nn.Linear(4, 1)
    params = [*embedding.parameters(), *unused.parameters(), *head.parameters()]
    opt = LearnedOptimizer(params, pretrained=pretrained, impl=impl)
    snapshots = [[p.detach().clone() for p in params]]
    for step in range(steps):
        opt.zero_grad(set_to_none=False)
        tokens = torch.tensor([[0, 1, 2, 7], [0, 0, 3, 7]]) if step < 2 else torch.tensor([[0, 1, 2], [0, 0, 3]])
        head(embedding(tokens)).square().mean().backward()
        opt.step()
        if step == 1:
            snapshots.append([p.detach().clone() for p in params])
    snapshots.append([p.detach().clone() for p in params])
    return snapshots


@pytest.mark.parametrize(("name", "impl"), [(name, impl) for name in _HOLD_RULES for impl in _rule_impls(name)])
def test_coordinates_with_a_zero_gradient_stay_put(name, impl):
    start, after_two, end = _embedding_run(name, impl)
    assert torch.equal(end[0][0], start[0][0]), "the padding row moved"
    assert torch.equal(end[0][4:7], start[0][4:7]), "rows never looked up moved"
    assert not torch.equal(end[0][1:4], after_two[0][1:4]), "rows still looked up froze"
    assert not torch.equal(after_two[0][7], start[0][7]), "a looked-up row did not move"
    # No drift once its gradient is zero (the rules' output for a zero input is a bias).
    assert torch.equal(end[0][7], after_two[0][7]), "a row whose gradient stopped kept moving"
    for p, p0 in zip(end[1:3], start[1:3], strict=True):
        assert torch.equal(p, p0), "a parameter with an all-zero gradient moved"


@pytest.mark.parametrize("name", ["lstm-mnist", "lstm-mnist-gain", "hrnn-base"])
def test_step_on_zero_grad_restores_the_drift_rules_were_saved_with(name, tmp_path):
    """``step_on_zero_grad=True``, what a config.json saved without the key loads as."""
    rule = learned_optim.load_rule(name)
    config = dict(rule.config)
    del config["step_on_zero_grad"]
    legacy_dir = tmp_path / "legacy"
    rule.save_pretrained(legacy_dir)
    saved = json.loads((legacy_dir / "config.json").read_text())
    del saved["config"]["step_on_zero_grad"]
    (legacy_dir / "config.json").write_text(json.dumps(saved))
    legacy = learned_optim.load_rule(legacy_dir)
    assert legacy.step_on_zero_grad is True
    assert legacy.config == {**config, "step_on_zero_grad": True}
    for impl in _rule_impls(name):
        _, after_two, end = _embedding_run(legacy, impl)
        assert not torch.equal(end[0][7], after_two[0][7]), "the old behaviour: a zero gradient still moves"
