"""Update rules: gradient preprocessing, the coordinatewise LSTM, configs and the registry."""

from __future__ import annotations

import json
import math

import pytest
import torch

from learned_optim.rules import RULE_TYPES, CoordinateLSTM, UpdateRule, get_rule_class
from learned_optim.rules.base import StepContext
from learned_optim.rules.preprocess import log_sign_preprocess


def _hand_preprocess(g: float, p: float) -> tuple[float, float]:
    """Appendix A of Andrychowicz et al. 2016, written out for one number."""
    if abs(g) >= math.exp(-p):
        return math.log(abs(g)) / p, math.copysign(1.0, g)
    return -1.0, math.exp(p) * g


@pytest.mark.parametrize("p", [10.0, 5.0, 2.5])
def test_log_sign_preprocess_matches_hand_computation(p):
    threshold = math.exp(-p)
    large = [1.0, -2.0, 123.0, -threshold * 20, 0.5, threshold * 1.0001]
    small = [threshold * 0.5, -threshold * 0.999, 1e-9, -1e-12, 0.0]
    boundary = [threshold, -threshold]  # |g| = e^-p exactly: the large branch
    values = large + small + boundary
    grad = torch.tensor(values, dtype=torch.float64)
    out = log_sign_preprocess(grad, p)
    assert out.shape == (len(values), 2)
    assert out.dtype == torch.float64
    expected = torch.tensor([_hand_preprocess(v, p) for v in values], dtype=torch.float64)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    # Both branches meet at the boundary: (-1, ±1) from either side.
    torch.testing.assert_close(out[-2:], torch.tensor([[-1.0, 1.0], [-1.0, -1.0]], dtype=torch.float64))
    assert (out[: len(large), 0] > -1).all() and (out[: len(large), 1].abs() == 1).all()
    assert (out[len(large) : len(large) + len(small), 0] == -1).all()


def test_log_sign_preprocess_fp32_and_boundary():
    p = 10.0
    # The float32 number nearest e^-p must land in the large branch, not flip branches.
    g = torch.tensor([math.exp(-p), -math.exp(-p), 3.0, 1e-7], dtype=torch.float32)
    out = log_sign_preprocess(g, p)
    assert out.dtype == torch.float32
    exp = torch.tensor(
        [[-1.0, 1.0], [-1.0, -1.0], [math.log(3.0) / p, 1.0], [-1.0, math.exp(p) * 1e-7]], dtype=torch.float32
    )
    torch.testing.assert_close(out, exp, rtol=1e-5, atol=1e-6)


def test_log_sign_preprocess_rejects_bad_p():
    with pytest.raises(ValueError, match="preprocess_p"):
        log_sign_preprocess(torch.ones(3), 0.0)
    with pytest.raises(ValueError, match="preprocess_p"):
        CoordinateLSTM(preprocess_p=-1.0)
    # exp(100) overflows float32: NaN steps on a zero gradient (eager), finite ones (C kernel).
    for p in (100.0, 1e-300):
        with pytest.raises(ValueError, match=r"preprocess_p must be in \[0.01, 80\]"):
            CoordinateLSTM(preprocess_p=p)
    # Config numbers are used in float32, where these are inf: every step would be inf/NaN.
    for name in ("preprocess_p", "output_scale", "input_scale"):
        with pytest.raises(ValueError, match=f"{name} must be within float32's range"):
            CoordinateLSTM(**{name: 1e39})


def test_log_sign_preprocess_has_finite_gradients():
    # Meta-training differentiates through the features; zeros and tiny values must not give NaN.
    g = torch.tensor([0.0, 1e-30, -1e-6, 1e-3, -4.0], requires_grad=True)
    out = log_sign_preprocess(g, 10.0)
    (grad,) = torch.autograd.grad(out.sum(), g)
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(grad[:3], torch.full((3,), math.exp(10.0)))  # small branch: d(e^p g)/dg
    torch.testing.assert_close(grad[3:], 1.0 / (10.0 * g.detach()[3:]))  # large branch: d(log|g|/p)/dg


def test_preprocess_off_uses_scaled_raw_gradient():
    rule = CoordinateLSTM(hidden_size=4, preprocess=False, input_scale=3.0)
    g = torch.tensor([1.0, -2.0, 1e-9])
    torch.testing.assert_close(rule.features(g), (g * 3.0).unsqueeze(-1))
    assert rule.weights[0].shape == (16, 1 + 4)  # one input feature + hidden
    on = CoordinateLSTM(hidden_size=4)
    assert on.weights[0].shape == (16, 2 + 4)
    state = rule.init_state(3)
    update, new_state = rule(g, state)
    assert update.shape == (3,)
    assert torch.isfinite(update).all()
    assert set(new_state) == {"h", "c"}


@pytest.mark.parametrize("preprocess", [True, False])
def test_batched_lstm_equals_per_coordinate_loop(preprocess):
    torch.manual_seed(0)
    rule = CoordinateLSTM(hidden_size=6, num_layers=2, preprocess=preprocess, output_scale=0.5)
    with torch.no_grad():  # bigger read-out so the updates are not all ~0
        rule.output.weight.normal_()
    n = 13
    grad = torch.randn(n) * torch.logspace(-8, 2, n)
    state = {k: torch.randn_like(v) for k, v in rule.init_state(n).items()}
    with torch.no_grad():
        update, new_state = rule(grad, state)
        for i in range(n):
            u_i, s_i = rule(grad[i : i + 1], {k: v[i : i + 1] for k, v in state.items()})
            torch.testing.assert_close(u_i, update[i : i + 1], rtol=1e-6, atol=1e-7)
            for k in state:
                torch.testing.assert_close(s_i[k], new_state[k][i : i + 1], rtol=1e-6, atol=1e-7)
    assert update.abs().min() > 0
    for k in state:
        assert new_state[k].shape == state[k].shape
        assert not torch.equal(new_state[k], state[k])


def test_gradients_reach_all_rule_parameters_through_unroll():
    torch.manual_seed(0)
    rule = CoordinateLSTM(hidden_size=8)
    a = torch.rand(10) + 0.5
    b = torch.randn(10)

    def f(x):
        return (a * (x - b) ** 2).sum()

    x = torch.zeros(10, requires_grad=True)
    state = rule.init_state(10)
    meta_loss = torch.zeros(())
    for _ in range(5):
        (g,) = torch.autograd.grad(f(x), x, create_graph=True)
        update, state = rule(g, state)
        x = x + update
        meta_loss = meta_loss + f(x)
    meta_loss.backward()
    names = [name for name, _ in rule.named_parameters()]
    assert len(names) == 2 * 2 + 2  # weight + bias per layer, read-out weight + bias
    for name, param in rule.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name


def test_config_round_trip_rebuilds_same_structure():
    rule = CoordinateLSTM(
        hidden_size=7, num_layers=3, preprocess=False, preprocess_p=4.0, input_scale=2.0, output_scale=0.3
    )
    assert sorted(rule.config) == sorted(CoordinateLSTM.config_keys())
    config = json.loads(json.dumps(rule.config))  # must survive config.json
    rebuilt = get_rule_class(rule.rule_type)(**config)
    assert type(rebuilt) is CoordinateLSTM
    assert rebuilt.config == rule.config
    assert rebuilt.state_spec() == rule.state_spec() == {"h": (3, 7), "c": (3, 7)}
    shapes = {k: v.shape for k, v in rule.state_dict().items()}
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == shapes
    rebuilt.load_state_dict(rule.state_dict())
    g = torch.randn(5)
    with torch.no_grad():
        u1, _ = rule(g, rule.init_state(5))
        u2, _ = rebuilt(g, rebuilt.init_state(5))
    assert torch.equal(u1, u2)


def test_state_bytes_per_coordinate():
    rule = CoordinateLSTM()
    assert rule.state_bytes_per_coordinate() == 320  # 2 layers x 20 units x (h, c) x 4 bytes
    assert rule.state_bytes_per_coordinate(torch.bfloat16) == 160
    assert CoordinateLSTM(hidden_size=5, num_layers=1).state_bytes_per_coordinate() == 40
    state = rule.init_state(3)
    assert sum(v[0].numel() * v.element_size() for v in state.values()) == 320


def test_lstm_rejects_bad_sizes():
    with pytest.raises(ValueError, match="hidden_size"):
        CoordinateLSTM(hidden_size=0)
    with pytest.raises(ValueError, match="num_layers"):
        CoordinateLSTM(num_layers=0)


def test_registry_and_subclass_registration():
    assert get_rule_class("CoordinateLSTM") is CoordinateLSTM
    with pytest.raises(ValueError, match="CoordinateLSTM"):  # lists the known types
        get_rule_class("NoSuchRule")

    try:

        class _Tweaked(CoordinateLSTM):  # inherits rule_type; must not take over the registered name
            pass

        assert RULE_TYPES["CoordinateLSTM"] is CoordinateLSTM
        assert _Tweaked.rule_type == "CoordinateLSTM"
    finally:
        RULE_TYPES["CoordinateLSTM"] = CoordinateLSTM

    class _Own(UpdateRule):
        rule_type = "_test_rules_own"

        def state_spec(self):
            return {}

    try:
        assert get_rule_class("_test_rules_own") is _Own
    finally:
        RULE_TYPES.pop("_test_rules_own", None)


def test_base_class_requires_implementation():
    rule = UpdateRule()
    with pytest.raises(NotImplementedError):
        rule.state_spec()
    with pytest.raises(NotImplementedError):
        rule(torch.zeros(1), {})


def _custom_rule(forward, spec=None, name="_test_rules_custom"):
    """A rule class whose forward is ``forward`` (registered under ``name``)."""
    return type(
        "Custom",
        (UpdateRule,),
        {"rule_type": name, "state_spec": lambda self: {"m": (2,)} if spec is None else spec, "forward": forward},
    )


def _m(grad, state):
    return {"m": state["m"] + grad[:, None]}


@pytest.mark.parametrize(
    ("forward", "match"),
    [
        # Each of these used to be silently accepted (broadcast into the state or the params)
        # or to fail deep inside the step with an error that did not name the rule.
        (lambda self, g, s, c=None: (-g.mean(), _m(g, s)), r"update of shape \(\), .*expected .*shape \(2,\)"),
        (lambda self, g, s, c=None: (-g.mean().reshape(1), _m(g, s)), r"update of shape \(1,\)"),
        (lambda self, g, s, c=None: (-g[:, None], _m(g, s)), r"update of shape \(2, 1\)"),
        (lambda self, g, s, c=None: (-g.to(torch.complex64), _m(g, s)), "complex64"),
        (lambda self, g, s, c=None: -g, r"must return \(update, new_state\)"),
        (lambda self, g, s, c=None: (-g, {"m": g}), r"new_state\['m'\] has shape \(2,\).*expected \(2, 2\)"),
        (lambda self, g, s, c=None: (-g, {}), r"new_state has keys \[\], expected \['m'\]"),
        (lambda self, g, s, c=None: (-g, {**_m(g, s), "x": g}), r"keys \['m', 'x'\], expected \['m'\]"),
        (lambda self, g, s, c=None: (-g, {"m": _m(g, s)["m"].double()}), r"dtype torch.float64.*float32"),
    ],
)
def test_a_wrong_forward_output_is_named_in_the_optimizer_and_in_full_step(forward, match):
    from learned_optim import LearnedOptimizer

    try:
        rule = _custom_rule(forward)()
        p = torch.nn.Parameter(torch.zeros(2))  # 2 coordinates: a (2,) state broadcasts into (2, 2)
        opt = LearnedOptimizer([p], pretrained=rule)
        p.grad = torch.ones(2)
        with pytest.raises((ValueError, TypeError), match=match):
            opt.step()
        assert torch.equal(p.detach(), torch.zeros(2))  # checked before anything changed
        with pytest.raises((ValueError, TypeError), match=match):
            rule.full_step(torch.ones(2), rule.init_state(2), torch.zeros(2, dtype=torch.int64), 1)
    finally:
        RULE_TYPES.pop("_test_rules_custom", None)


class _CountsSteps(UpdateRule):
    """Per-tensor and global state: a step counter per tensor and one for all (``finalize``
    is the hook the tests below break)."""

    rule_type = "_test_rules_counts_steps"

    def __init__(self) -> None:
        super().__init__()
        self.config = {}
        self.scale = torch.nn.Parameter(torch.tensor(0.1))

    def state_spec(self):
        return {"m": ()}

    def segment_state_spec(self):
        return {"n": (1,)}

    def global_state_spec(self):
        return {"t": (1,)}

    def forward(self, grad, state, context=None):
        m = 0.9 * state["m"] + grad
        return -self.scale * m, {"m": m}

    def finalize(self, segment_state, global_state, segment_sums, counts):
        return {"n": segment_state["n"] + 1}, {"t": global_state["t"] + 1}


@pytest.mark.parametrize(
    ("finalize", "match"),
    [
        (
            lambda self, seg, glob, sums, counts: (seg, {**glob, "typo": glob["t"]}),
            r"new global state has keys \['t', 'typo'\]",
        ),
        (lambda self, seg, glob, sums, counts: ({"n": seg["n"][:, 0]}, glob), r"new segment state \['n'\] has shape"),
        (lambda self, seg, glob, sums, counts: (seg, {"t": glob["t"].double()}), "float64"),
        (lambda self, seg, glob, sums, counts: seg, r"must return \(new_segment_state, new_global_state\)"),
    ],
)
def test_a_wrong_finalize_output_is_named_in_the_optimizer_in_full_step_and_in_meta_fit(finalize, match):
    from learned_optim import LearnedOptimizer
    from learned_optim.meta_fit import meta_fit

    broken = type("Broken", (_CountsSteps,), {"rule_type": "_test_rules_broken_finalize", "finalize": finalize})
    try:
        rule = broken()
        params = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2, 2))]
        opt = LearnedOptimizer(params, pretrained=rule)
        for p in params:
            p.grad = torch.ones_like(p)
        with pytest.raises((ValueError, TypeError), match=match):
            opt.step()  # (finalize runs after the updates: the step's updates were applied)
        with pytest.raises((ValueError, TypeError), match=match):
            rule.full_step(torch.ones(3), rule.init_state(3), torch.tensor([0, 0, 1]), 2)
        with pytest.raises((ValueError, TypeError), match=match):
            meta_fit(rule, "quadratic", steps=4, unroll=2, meta_iterations=1, validate_every=0, progress=False)
    finally:
        RULE_TYPES.pop("_test_rules_broken_finalize", None)


def test_a_global_state_that_does_not_fit_the_rule_is_named_by_learned_step():
    from learned_optim.functional import StepEntry, learned_step

    rule = _CountsSteps()
    param = torch.zeros(3)
    for global_state, match in (
        ({}, r"global_state has keys \[\], expected \['t'\]"),
        ({"t": torch.zeros(3)}, r"global_state\['t'\] has shape \(3,\)"),
    ):
        entry = StepEntry(
            param=param,
            grad=torch.ones(3),
            state=rule.init_state(3),
            lr=1.0,
            weight_decay=0.0,
            maximize=False,
            segment_state=rule.init_segment_state(1),
        )
        with pytest.raises(ValueError, match=match):
            learned_step(rule, [entry], global_state=global_state)
        assert torch.equal(param, torch.zeros(3))


@pytest.mark.parametrize(
    ("init_state", "match"),
    [
        (
            lambda self, n, device=None, dtype=torch.float32: {"mom": torch.zeros(n, device=device, dtype=dtype)},
            r"init_state returned keys \['mom'\], expected \['m'\]",
        ),
        (
            lambda self, n, device=None, dtype=torch.float32: {"m": torch.zeros(n, 2, device=device, dtype=dtype)},
            r"init_state returned \['m'\] of shape \(\d+, 2\)",
        ),
    ],
)
def test_a_wrong_init_state_is_named_in_the_optimizer_and_in_meta_fit(init_state, match):
    from learned_optim import LearnedOptimizer
    from learned_optim.meta_fit import meta_fit

    broken = type("Broken", (_CountsSteps,), {"rule_type": "_test_rules_broken_init", "init_state": init_state})
    try:
        p = torch.nn.Parameter(torch.zeros(3))
        p.grad = torch.ones(3)
        with pytest.raises(ValueError, match=match):
            LearnedOptimizer([p], pretrained=broken()).step()
        with pytest.raises(ValueError, match=match):
            meta_fit(broken(), "quadratic", steps=4, unroll=2, meta_iterations=1, validate_every=0, progress=False)
    finally:
        RULE_TYPES.pop("_test_rules_broken_init", None)


def test_an_init_state_that_ignores_the_state_dtype_is_named():
    from learned_optim import LearnedOptimizer

    def init_state(self, n, device=None, dtype=torch.float32):
        return {"m": torch.zeros(n, device=device)}  # float32 whatever was asked for

    broken = type("Broken", (_CountsSteps,), {"rule_type": "_test_rules_float32_init", "init_state": init_state})
    try:
        p = torch.nn.Parameter(torch.zeros(3))
        p.grad = torch.ones(3)
        with pytest.raises(ValueError, match=r"dtype torch.float32, expected .*dtype torch.bfloat16"):
            LearnedOptimizer([p], pretrained=broken(), state_dtype=torch.bfloat16).step()
    finally:
        RULE_TYPES.pop("_test_rules_float32_init", None)


def test_meta_fit_names_a_rule_whose_weights_get_no_meta_gradient():
    from learned_optim.meta_fit import meta_fit

    def forward(self, grad, state, context=None):
        m = 0.9 * state["m"] + grad
        return -self.scale.item() * m, {"m": m}  # .item() cuts the graph

    detached = type("Detached", (_CountsSteps,), {"rule_type": "_test_rules_detached", "forward": forward})
    try:
        with pytest.raises(ValueError, match="no trainable weight of Detached got a meta-gradient"):
            meta_fit(detached(), "quadratic", steps=4, unroll=2, meta_iterations=1, validate_every=0, progress=False)
    finally:
        RULE_TYPES.pop("_test_rules_detached", None)


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ({"m": 2}, r"state_spec\(\)\['m'\] must be a tuple of sizes, got 2"),
        ({"m": (2.5,)}, r"state_spec\(\)\['m'\] must be a tuple of sizes"),
        ({"m": (-1,)}, r"state_spec\(\)\['m'\] must be a tuple of sizes"),
        ({3: ()}, "names must be strings"),
        ({"segment.m": ()}, "segment."),
        ([("m", ())], "must return a dict"),
    ],
)
def test_a_bad_state_spec_is_named_when_the_optimizer_is_built(spec, match):
    from learned_optim import LearnedOptimizer

    try:
        rule = _custom_rule(lambda self, g, s, c=None: (-g, s), spec=spec)()
        with pytest.raises(ValueError, match=match):
            LearnedOptimizer([torch.nn.Parameter(torch.zeros(2))], pretrained=rule)
    finally:
        RULE_TYPES.pop("_test_rules_custom", None)


def test_a_rule_type_of_a_built_in_rule_cannot_be_taken():
    # It used to replace CoordinateLSTM in the registry: every bundled LSTM then failed to load.
    with pytest.raises(ValueError, match="built-in"):

        class _Mine(UpdateRule):
            rule_type = "CoordinateLSTM"

    assert RULE_TYPES["CoordinateLSTM"] is CoordinateLSTM


def test_register_rule_needs_a_rule_type_and_a_rule_class():
    from learned_optim.rules import register_rule

    class _Nameless(UpdateRule):
        pass

    with pytest.raises(ValueError, match="rule_type"):
        register_rule(_Nameless)
    with pytest.raises(TypeError, match="UpdateRule subclass"):
        register_rule(dict)
    assert "" not in RULE_TYPES


def test_another_class_taking_a_users_rule_type_warns_but_a_redefinition_does_not():
    import warnings

    def define(qualname):
        cls = type(qualname, (UpdateRule,), {"rule_type": "_test_rules_taken", "__qualname__": qualname})
        return cls

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            define("First")
            second = define("First")  # re-running a notebook cell: replaced silently
        assert RULE_TYPES["_test_rules_taken"] is second
        with pytest.warns(UserWarning, match="replaces"):
            third = define("Other")
        assert RULE_TYPES["_test_rules_taken"] is third
    finally:
        RULE_TYPES.pop("_test_rules_taken", None)


def _hand_momenta(grads: list[float], decays: list[float], rms_decay: float) -> list[float]:
    """The scaled momentum inputs after the last gradient, for one coordinate."""
    m, v = None, None
    for g in grads:
        if v is None or v == 0:
            m, v = [g] * len(decays), g * g
        else:
            m = [d * mi + (1 - d) * g for d, mi in zip(decays, m, strict=True)]
            v = rms_decay * v + (1 - rms_decay) * g * g
    return [mi / math.sqrt(v + 1e-30) for mi in m]


def test_momentum_inputs_match_hand_computation_and_grow_the_state():
    decays = [0.5, 0.9]
    rule = CoordinateLSTM(hidden_size=4, momentum_decays=decays, rms_decay=0.95).double()
    assert rule.weights[0].shape == (16, 2 + 2 + 4)
    assert rule.state_spec()["m"] == (2,) and rule.state_spec()["v"] == ()
    assert rule.state_bytes_per_coordinate() == 2 * 2 * 4 * 4 + 3 * 4
    torch.manual_seed(0)
    history = torch.randn(5, 3, dtype=torch.float64)
    history[:2, 1] = 0.0  # a coordinate whose first gradients are zero starts later
    state = rule.init_state(3, dtype=torch.float64)
    for g in history:
        momenta, m, v = rule.momentum_features(g, state)
        _, state = rule(g, state)
        assert torch.equal(state["m"], m) and torch.equal(state["v"], v)
    for i in range(3):
        expected = _hand_momenta(history[:, i].tolist(), decays, 0.95)
        assert momenta[i].tolist() == pytest.approx(expected, rel=1e-12)


def test_momentum_inputs_of_all_zero_gradients_are_zero_not_nan():
    rule = CoordinateLSTM(hidden_size=3, momentum_decays=[0.9])
    state = rule.init_state(2)
    update, state = rule(torch.zeros(2), state)
    momenta, _, _ = rule.momentum_features(torch.zeros(2), state)
    update, state = rule(torch.zeros(2), state)
    assert torch.equal(momenta, torch.zeros_like(momenta))
    assert not state["m"].any() and not state["v"].any()
    # A coordinate that never had a gradient does not move.
    assert torch.equal(update, torch.zeros_like(update))


def test_init_from_a_rule_without_momentum_computes_the_same_updates():
    torch.manual_seed(1)
    base = CoordinateLSTM(hidden_size=5)
    extended = CoordinateLSTM(hidden_size=5, momentum_decays=[0.5, 0.99])
    extended.init_from(base)
    state_a, state_b = base.init_state(7), extended.init_state(7)
    for _ in range(4):
        g = torch.randn(7)
        update_a, state_a = base(g, state_a)
        update_b, state_b = extended(g, state_b)
        torch.testing.assert_close(update_a, update_b, rtol=1e-6, atol=1e-7)
    # the new inputs are trainable from there: their weights get meta-gradients
    update_b.sum().backward()
    assert extended.weights[0].grad[:, 2:4].abs().sum() > 0


@pytest.mark.parametrize("decays", [[], [0.9]])
def test_init_from_a_narrower_rule_computes_the_same_updates(decays):
    torch.manual_seed(2)
    base = CoordinateLSTM(hidden_size=4, momentum_decays=decays)
    wider = CoordinateLSTM(hidden_size=7, momentum_decays=[*decays, 0.99])
    wider.init_from(base)  # meta-fit --init with a larger hidden_size
    state_a, state_b = base.init_state(6), wider.init_state(6)
    for _ in range(5):
        g = torch.randn(6) * 1e-3
        update_a, state_a = base(g, state_a)
        update_b, state_b = wider(g, state_b)
        torch.testing.assert_close(update_a, update_b, rtol=1e-6, atol=1e-9)
    # the new units run (their state moves) and are trainable: their read-out gets meta-gradients
    assert state_b["h"][:, :, 4:].abs().sum() > 0
    update_b.sum().backward()
    assert wider.output.weight.grad[:, 4:].abs().sum() > 0
    assert wider.weights[1].grad[:4, 4:7].abs().sum() > 0  # layer 1's input from new layer-0 units


def test_init_from_refuses_what_it_cannot_extend():
    with pytest.raises(ValueError, match="hidden_size"):
        CoordinateLSTM(hidden_size=4, momentum_decays=[0.9]).init_from(CoordinateLSTM(hidden_size=5))
    with pytest.raises(ValueError, match="num_layers"):
        CoordinateLSTM(hidden_size=6, num_layers=3).init_from(CoordinateLSTM(hidden_size=5))
    with pytest.raises(ValueError, match="momentum_decays"):
        CoordinateLSTM(momentum_decays=[0.9]).init_from(CoordinateLSTM(momentum_decays=[0.5]))
    with pytest.raises(ValueError, match="momentum_decays"):
        CoordinateLSTM().init_from(CoordinateLSTM(momentum_decays=[0.5]))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"momentum_decays": [1.0]}, r"momentum_decays\[0\] must be in \[0, 1\)"),
        ({"momentum_decays": [0.9, float("nan")]}, r"momentum_decays\[1\]"),
        ({"momentum_decays": "0.9"}, "momentum_decays must be a list"),
        ({"momentum_decays": 0.9}, "momentum_decays must be a list"),
        ({"rms_decay": -0.1}, "rms_decay must be in"),
    ],
)
def test_momentum_config_is_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CoordinateLSTM(**kwargs)


def test_momentum_rule_in_the_optimizer_saves_loads_and_resumes(tmp_path):
    from learned_optim import LearnedOptimizer

    rule = CoordinateLSTM(hidden_size=4, momentum_decays=[0.5, 0.9])
    rule.save_pretrained(str(tmp_path / "rule"))
    loaded = CoordinateLSTM.from_pretrained(str(tmp_path / "rule"))
    assert loaded.config == rule.config

    def model_and_batches():
        torch.manual_seed(0)
        return torch.nn.Linear(3, 2), [torch.randn(8, 3) for _ in range(6)]

    def train(opt, model, batches):
        for x in batches:
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()

    model, batches = model_and_batches()
    opt = LearnedOptimizer(model.parameters(), pretrained=str(tmp_path / "rule"))
    train(opt, model, batches)
    straight = [p.detach().clone() for p in model.parameters()]

    model, batches = model_and_batches()
    opt = LearnedOptimizer(model.parameters(), pretrained=str(tmp_path / "rule"))
    train(opt, model, batches[:3])
    saved = opt.state_dict()
    assert "rule.m" in saved["state"][0] and "rule.v" in saved["state"][0]
    opt = LearnedOptimizer(model.parameters(), pretrained=str(tmp_path / "rule"))
    opt.load_state_dict(saved)
    train(opt, model, batches[3:])
    for a, b in zip(straight, model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_tensor_agreement_is_the_cosine_over_each_tensor():
    rule = CoordinateLSTM(hidden_size=4, momentum_decays=[0.5, 0.9], tensor_agreement=True).double()
    assert rule.weights[0].shape == (16, 2 + 2 + 2 + 4)
    assert rule.state_spec() == CoordinateLSTM(hidden_size=4, momentum_decays=[0.5, 0.9]).state_spec()
    torch.manual_seed(3)
    grad = torch.randn(12, dtype=torch.float64)
    state = rule.init_state(12, dtype=torch.float64)
    state["m"] = torch.randn(12, 2, dtype=torch.float64)
    state["m"][8:] = 0.0  # a tensor whose momenta are still zero: no agreement yet
    ids = torch.tensor([0] * 5 + [1] * 3 + [2] * 4)
    features = rule.tensor_features(grad, state, StepContext(segment_ids=ids, num_segments=3))
    for rows in (slice(0, 5), slice(5, 8)):
        expected = torch.nn.functional.cosine_similarity(grad[rows].unsqueeze(-1), state["m"][rows], dim=0)
        torch.testing.assert_close(features[rows], expected.expand(rows.stop - rows.start, 2))
    assert torch.equal(features[8:], torch.zeros(4, 2, dtype=torch.float64))
    # without a layout the whole batch is one tensor
    whole = rule.tensor_features(grad[:5], {k: v[:5] for k, v in state.items()}, None)
    torch.testing.assert_close(whole, features[:5])


def _steps_like(base: CoordinateLSTM, extended: CoordinateLSTM, grad_scale: float = 1.0) -> torch.Tensor:
    """Steps both rules on the same gradients of two tensors and checks their updates match;
    returns ``extended``'s last update (with its graph)."""
    context = StepContext(segment_ids=torch.tensor([0] * 4 + [1] * 5), num_segments=2)
    state_a, state_b = base.init_state(9), extended.init_state(9)
    for _ in range(4):
        g = torch.randn(9) * torch.rand(1) * grad_scale
        update_a, state_a = base(g, state_a, context)
        update_b, state_b = extended(g, state_b, context)
        torch.testing.assert_close(update_a, update_b, rtol=1e-6, atol=1e-7)
    return update_b


def test_tensor_agreement_starts_from_the_rule_it_extends_and_learns_through_it():
    torch.manual_seed(4)
    base = CoordinateLSTM(hidden_size=5, momentum_decays=[0.5, 0.99])
    extended = CoordinateLSTM(hidden_size=5, momentum_decays=[0.5, 0.99], tensor_agreement=True)
    extended.init_from(base)
    _steps_like(base, extended).sum().backward()
    assert extended.weights[0].grad[:, 4:6].abs().sum() > 0  # the agreement inputs' weights
    with pytest.raises(ValueError, match="tensor_agreement"):
        base.init_from(extended)  # cannot drop the inputs
    with pytest.raises(ValueError, match="tensor_agreement needs momentum_decays"):
        CoordinateLSTM(tensor_agreement=True)
    with pytest.raises(ValueError, match="tensor_agreement must be true or false"):
        CoordinateLSTM(momentum_decays=[0.9], tensor_agreement="yes")


def test_tensor_norm_ratio_is_the_log_norm_ratio_over_each_tensor_after_the_cosines():
    rule = CoordinateLSTM(hidden_size=4, momentum_decays=[0.5, 0.9], tensor_agreement=True, tensor_norm_ratio=True)
    rule = rule.double()
    assert rule.weights[0].shape == (16, 2 + 2 + 2 + 2 + 4)
    torch.manual_seed(6)
    grad = torch.randn(12, dtype=torch.float64)
    state = rule.init_state(12, dtype=torch.float64)
    state["m"] = torch.randn(12, 2, dtype=torch.float64)
    state["m"][8:] = 0.0  # first step of that tensor: no ratio yet
    state["m"][5:8, 1] *= 1e-6  # a tiny momentum: the ratio is clipped at 5
    ids = torch.tensor([0] * 5 + [1] * 3 + [2] * 4)
    features = rule.tensor_features(grad, state, StepContext(segment_ids=ids, num_segments=3))
    assert features.shape == (12, 4)
    expected = torch.log(grad[:5].norm() / state["m"][:5].norm(dim=0))
    torch.testing.assert_close(features[:5, 2:], expected.expand(5, 2))
    torch.testing.assert_close(features[5:8, 3], torch.full((3,), 5.0, dtype=torch.float64))
    assert torch.equal(features[8:], torch.zeros(4, 4, dtype=torch.float64))
    cosines = CoordinateLSTM(hidden_size=4, momentum_decays=[0.5, 0.9], tensor_agreement=True).double()
    context = StepContext(segment_ids=ids, num_segments=3)
    torch.testing.assert_close(features[:, :2], cosines.tensor_features(grad, state, context))
    only_ratio = CoordinateLSTM(hidden_size=4, momentum_decays=[0.5, 0.9], tensor_norm_ratio=True).double()
    torch.testing.assert_close(features[:, 2:], only_ratio.tensor_features(grad, state, context))
    with pytest.raises(ValueError, match="tensor_norm_ratio needs momentum_decays"):
        CoordinateLSTM(tensor_norm_ratio=True)


def test_norm_ratio_inputs_extend_a_rule_without_changing_its_updates():
    torch.manual_seed(7)
    base = CoordinateLSTM(hidden_size=5, momentum_decays=[0.5, 0.99], tensor_agreement=True)
    with torch.no_grad():
        base.weights[0][:, 4:6].normal_(0, 1.0)  # agreement weights in use
    extended = CoordinateLSTM(hidden_size=5, momentum_decays=[0.5, 0.99], tensor_agreement=True, tensor_norm_ratio=True)
    extended.init_from(base)
    _steps_like(base, extended, grad_scale=3.0).sum().backward()
    assert extended.weights[0].grad[:, 6:8].abs().sum() > 0  # the ratio inputs' weights
    with pytest.raises(ValueError, match="tensor_norm_ratio"):
        base.init_from(extended)  # cannot drop the inputs
    ratio_only = CoordinateLSTM(hidden_size=5, momentum_decays=[0.5, 0.99], tensor_norm_ratio=True)
    with pytest.raises(ValueError, match="tensor_agreement"):
        extended.init_from(ratio_only)  # the ratios would move behind new cosines


def test_tensor_step_gain_scales_each_tensors_updates_by_a_gain_from_its_inputs():
    torch.manual_seed(8)
    plain = CoordinateLSTM(hidden_size=5, momentum_decays=[0.5, 0.99], tensor_norm_ratio=True)
    gained = CoordinateLSTM(hidden_size=5, momentum_decays=[0.5, 0.99], tensor_norm_ratio=True, tensor_step_gain=True)
    gained.init_from(plain)
    assert torch.equal(gained.gain.weight, torch.zeros(1, 2))  # a gain of 1 until meta-trained
    with torch.no_grad():
        gained.gain.weight.copy_(torch.tensor([[0.03, -0.05]]))
        gained.gain.bias.fill_(-0.02)
    context = StepContext(segment_ids=torch.tensor([0] * 4 + [1] * 5), num_segments=2)
    state_plain, state_gained = plain.init_state(9), gained.init_state(9)
    for _ in range(3):
        grad = torch.randn(9)
        table = plain.tensor_inputs(plain.tensor_statistics(grad, state_plain, context.segment_ids, 2)).float()
        update_plain, state_plain = plain(grad, state_plain, context)
        update_gained, state_gained = gained(grad, state_gained, context)
        gain = torch.exp(4 * torch.tanh(10 * (table @ gained.gain.weight.T - 0.02).squeeze(-1) / 4))
        torch.testing.assert_close(update_gained, update_plain * gain[context.segment_ids])
        torch.testing.assert_close(state_gained["h"], state_plain["h"])  # the gain scales the output only
    assert gained.step_gains(torch.full((1, 2), 1e3)).item() == pytest.approx(math.exp(-4.0), rel=1e-5)
    with pytest.raises(ValueError, match="tensor_step_gain needs per-tensor inputs"):
        CoordinateLSTM(momentum_decays=[0.9], tensor_step_gain=True)


def test_tensor_step_gain_extends_a_rule_exactly_and_gets_meta_gradients():
    torch.manual_seed(9)
    base = CoordinateLSTM(hidden_size=5, momentum_decays=[0.5, 0.99], tensor_agreement=True)
    config = {"hidden_size": 5, "momentum_decays": [0.5, 0.99], "tensor_agreement": True, "tensor_step_gain": True}
    extended = CoordinateLSTM(**config)
    extended.init_from(base)
    _steps_like(base, extended, grad_scale=2.0).sum().backward()
    assert extended.gain.weight.grad.abs().sum() > 0 and extended.gain.bias.grad.abs() > 0
    with pytest.raises(ValueError, match="tensor_step_gain"):
        base.init_from(extended)  # cannot drop the gain
    # a trained gain carries over to a rule with more per-tensor inputs, the new ones at zero
    with torch.no_grad():
        extended.gain.weight.normal_(0, 0.05)
    wider = CoordinateLSTM(**config, tensor_norm_ratio=True)
    wider.init_from(extended)
    _steps_like(extended, wider, grad_scale=2.0)


def test_tensor_step_response_is_the_gradient_left_along_the_last_update():
    rule = CoordinateLSTM(hidden_size=4, momentum_decays=[0.5, 0.9], tensor_norm_ratio=True, tensor_step_response=True)
    rule = rule.double()
    assert rule.weights[0].shape == (16, 2 + 2 + 2 + 2 + 4)
    assert rule.state_spec()["u"] == () and rule.state_spec()["q"] == ()
    torch.manual_seed(10)
    ids = torch.tensor([0] * 5 + [1] * 3 + [2] * 4)
    context = StepContext(segment_ids=ids, num_segments=3)
    state = rule.init_state(12, dtype=torch.float64)
    first = torch.randn(12, dtype=torch.float64)
    update, state = rule(first, state, context)
    assert torch.equal(
        rule.tensor_features(first, rule.init_state(12, dtype=torch.float64), context)[:, 2:],
        torch.zeros(12, 2, dtype=torch.float64),
    )
    torch.testing.assert_close(state["u"], update)
    torch.testing.assert_close(state["q"], first * update)
    # per tensor, a chosen response r: 0.3, then -2.5 (an overshoot), then -100 (clipped)
    second = torch.randn(12, dtype=torch.float64)
    for rows, r in ((slice(0, 5), 0.3), (slice(5, 8), -2.5), (slice(8, 12), -100.0)):
        u = update[rows]
        second[rows] -= (second[rows] @ u) / (u @ u) * u  # no component along u
        second[rows] += r * (first[rows] @ u) / (u @ u) * u
    features = rule.tensor_features(second, state, context)
    expected = torch.tensor([[0.3, 0.0]] * 5 + [[-1.0, 1.5]] * 3 + [[-1.0, 4.0]] * 4, dtype=torch.float64)
    torch.testing.assert_close(features[:, 2:], expected)
    # the norm ratios come first, unchanged by the extra sums
    only_ratio = CoordinateLSTM(hidden_size=4, momentum_decays=[0.5, 0.9], tensor_norm_ratio=True).double()
    torch.testing.assert_close(features[:, :2], only_ratio.tensor_features(second, state, context))
    # without momenta the response is the only per-tensor input
    alone = CoordinateLSTM(hidden_size=4, tensor_step_response=True, tensor_step_gain=True)
    assert alone.weights[0].shape == (16, 2 + 2 + 4) and alone.gain.weight.shape == (1, 2)


_GAIN_RULE = {"hidden_size": 5, "momentum_decays": [0.5, 0.99], "tensor_norm_ratio": True, "tensor_step_gain": True}


def _gain_rule(seed: int) -> CoordinateLSTM:
    """A rule with norm-ratio inputs and a gain that is not 1, to extend with one more option."""
    torch.manual_seed(seed)
    base = CoordinateLSTM(**_GAIN_RULE)
    with torch.no_grad():
        base.gain.weight.normal_(0, 0.05)
    return base


def test_tensor_step_response_extends_a_gain_rule_exactly_and_gets_meta_gradients():
    config, base = _GAIN_RULE, _gain_rule(11)
    extended = CoordinateLSTM(**config, tensor_step_response=True)
    extended.init_from(base)
    _steps_like(base, extended, grad_scale=2.0).sum().backward()
    assert extended.weights[0].grad[:, 6:8].abs().sum() > 0  # the response inputs' weights
    assert extended.gain.weight.grad[0, 2:].abs().sum() > 0
    with pytest.raises(ValueError, match="tensor_step_response"):
        base.init_from(extended)  # cannot drop the input
    with pytest.raises(ValueError, match="tensor_step_response must be true or false"):
        CoordinateLSTM(tensor_step_response="yes")


def test_momentum_step_adds_each_tensors_normalised_momenta():
    config = {"hidden_size": 4, "momentum_decays": [0.5, 0.9], "tensor_norm_ratio": True}
    rule = CoordinateLSTM(**config, momentum_step=True).double()
    plain = CoordinateLSTM(**config).double()
    plain.load_state_dict({k: v for k, v in rule.state_dict().items() if k != "momentum_step_weight"})
    with torch.no_grad():
        rule.momentum_step_weight.copy_(torch.tensor([0.02, -0.05], dtype=torch.float64))
    torch.manual_seed(12)
    ids = torch.tensor([0] * 5 + [1] * 3 + [2] * 4)
    context = StepContext(segment_ids=ids, num_segments=3)
    state, plain_state = rule.init_state(12, dtype=torch.float64), plain.init_state(12, dtype=torch.float64)
    scales = torch.tensor([1e-3] * 5 + [1.0] * 3 + [30.0] * 4, dtype=torch.float64)  # tensors of unlike scale
    for _ in range(3):  # the first step (momenta start at the gradient) and two after it
        grad = torch.randn(12, dtype=torch.float64) * scales
        update, state = rule(grad, state, context)
        plain_update, plain_state = plain(grad, plain_state, context)
        expected = plain_update.clone()
        for tensor in range(3):
            rows = ids == tensor
            m = state["m"][rows]
            rms = m.pow(2).mean(0).sqrt()
            expected[rows] += (0.3 * rule.momentum_step_weight * m / rms).sum(-1)
        torch.testing.assert_close(update, expected)
        torch.testing.assert_close(state["m"], plain_state["m"])


def test_momentum_step_extends_a_gain_rule_exactly_and_gets_meta_gradients():
    config, base = _GAIN_RULE, _gain_rule(13)
    extended = CoordinateLSTM(**config, momentum_step=True)
    extended.init_from(base)
    assert torch.equal(extended.momentum_step_weight, torch.zeros(2))
    _steps_like(base, extended, grad_scale=2.0).sum().backward()
    assert extended.momentum_step_weight.grad.abs().min() > 0
    with pytest.raises(ValueError, match="momentum_step"):
        base.init_from(extended)  # cannot drop it
    again = CoordinateLSTM(**config, momentum_step=True)
    with torch.no_grad():
        extended.momentum_step_weight.copy_(torch.tensor([0.1, -0.2]))
    again.init_from(extended)
    assert torch.equal(again.momentum_step_weight, extended.momentum_step_weight)
    with pytest.raises(ValueError, match="momentum_step needs tensor_norm_ratio or tensor_agreement"):
        CoordinateLSTM(momentum_decays=[0.9], momentum_step=True)
    with pytest.raises(ValueError, match="momentum_step must be true or false"):
        CoordinateLSTM(momentum_decays=[0.9], tensor_norm_ratio=True, momentum_step="yes")


def test_tensor_agreement_in_the_optimizer_sees_whole_tensors_and_resumes(tmp_path):
    from learned_optim import LearnedOptimizer

    torch.manual_seed(5)
    rule = CoordinateLSTM(hidden_size=4, momentum_decays=[0.5, 0.9], tensor_agreement=True)
    with torch.no_grad():
        rule.weights[0][:, 4:6].normal_(0, 3.0)  # make the agreement inputs matter
    rule.save_pretrained(str(tmp_path / "rule"))
    assert CoordinateLSTM.from_pretrained(str(tmp_path / "rule")).config["tensor_agreement"] is True
    assert rule.fused_impls() == CoordinateLSTM().fused_impls()  # both kernels read the inputs

    def train(chunk_size, steps, saved=None):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1))
        batches = [torch.randn(16, 6) for _ in range(6)]
        opt = LearnedOptimizer(model.parameters(), str(tmp_path / "rule"), chunk_size=chunk_size, impl="eager")
        if saved is not None:
            model.load_state_dict(saved[0])
            opt.load_state_dict(saved[1])
        for x in batches[len(batches) - steps :] if saved is not None else batches[:steps]:
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()
        return model, opt

    straight, _ = train(chunk_size=1 << 16, steps=6)
    # chunks smaller than a tensor must not change the per-tensor cosine
    small_chunks, _ = train(chunk_size=7, steps=6)
    half, opt = train(chunk_size=1 << 16, steps=3)
    resumed, _ = train(chunk_size=1 << 16, steps=3, saved=(half.state_dict(), opt.state_dict()))
    for a, b, c in zip(straight.parameters(), small_chunks.parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        assert torch.equal(a, c)
    # the inputs are used: zeroing their weights changes the trajectory
    with torch.no_grad():
        rule.weights[0][:, 4:6] = 0.0
    rule.save_pretrained(str(tmp_path / "rule"))
    without, _ = train(chunk_size=1 << 16, steps=6)
    assert not torch.allclose(straight[0].weight, without[0].weight)


@pytest.mark.parametrize("hidden", [20, 7])
def test_lstm_cell_without_grad_matches_the_differentiable_cell(hidden):
    # The optimizer's step runs the in-place no-grad cell; meta-training runs the autograd one.
    from learned_optim.rules.lstm import lstm_cell

    g = torch.Generator().manual_seed(0)
    x_and_h = torch.randn(300, 3 + hidden, generator=g)
    c = torch.randn(300, hidden, generator=g) * 2
    weight = torch.randn(4 * hidden, 3 + hidden, generator=g)
    bias = torch.randn(4 * hidden, generator=g)
    with torch.no_grad():
        h_fast, c_fast = lstm_cell(x_and_h, c, weight, bias)
    weight_leaf = weight.clone().requires_grad_(True)
    h_ref, c_ref = lstm_cell(x_and_h, c, weight_leaf, bias)
    assert h_ref.requires_grad and not h_fast.requires_grad
    torch.testing.assert_close(h_fast, h_ref.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(c_fast, c_ref.detach(), rtol=1e-6, atol=1e-6)
    # float64 reference, with torch.tanh: both cells are within fp32 rounding of it
    xd, cd, wd, bd = (t.double() for t in (x_and_h, c, weight, bias))
    gates = torch.addmm(bd, xd, wd.t())
    i, f, o = torch.sigmoid(gates[:, : 3 * hidden]).chunk(3, dim=-1)
    c_exact = f * cd + i * torch.tanh(gates[:, 3 * hidden :])
    h_exact = o * torch.tanh(c_exact)
    assert (h_fast.double() - h_exact).abs().max() < 1e-5
    assert (c_fast.double() - c_exact).abs().max() < 1e-5
    # its inputs are not modified in place
    again = torch.Generator().manual_seed(0)
    assert torch.equal(x_and_h, torch.randn(300, 3 + hidden, generator=again))
    assert torch.equal(c, torch.randn(300, hidden, generator=again) * 2)
