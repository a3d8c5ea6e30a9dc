"""The fused LSTM kernels (Triton; C on CPU) against the eager rule, and LearnedOptimizer's
impl dispatch.

Without a GPU the Triton kernel runs through Triton's interpreter (conftest sets
TRITON_INTERPRET=1); the C kernel needs a C compiler.
"""

from __future__ import annotations

import contextlib
import io
import warnings

import pytest
import torch
from torch import nn

from learned_optim import CoordinateLSTM, HierarchicalRNN, LearnedOptimizer
from learned_optim.rules.lstm_pack import input_count, tensor_input_count

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# The fused kernels that can run on this machine's test device.
KERNELS = [impl for impl in CoordinateLSTM().fused_impls() if impl == "triton" or DEVICE.type == "cpu"]
if not KERNELS:
    pytest.skip("no fused kernel can run here (no triton, no C compiler)", allow_module_level=True)
over_kernels = pytest.mark.parametrize("impl", KERNELS)
# bf16 keeps 8 significant bits: two roundings of the same fp32 value to bf16 differ by at most
# one unit in the last place, 2^-7 of the value.
BF16_STATE_RTOL = 2**-7
# One step matches the eager rule within 1e-5 relative; over a few steps of training the
# last-bit differences (exp, summation order) compound, through the parameters too.
TRAJECTORY_RTOL = 1e-4


def _trained_like(rule: CoordinateLSTM, seed: int = 0) -> CoordinateLSTM:
    # Random weights larger than the init, so every gate and both layers matter.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in rule.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return rule.to(DEVICE)


def _inputs(rule: CoordinateLSTM, n: int, seed: int = 1, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(seed)
    # Magnitudes from 1e-9 to 10, exact zeros, and values below the preprocessing cut-off exp(-p).
    grad = torch.randn(n, generator=g) * torch.logspace(-9, 1, n)
    grad[::17] = 0.0
    state = {k: (torch.randn((n, *shape), generator=g) * 0.5).to(dtype) for k, shape in rule.state_spec().items()}
    return grad.to(DEVICE), {k: v.to(DEVICE) for k, v in state.items()}


def _no_warning() -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _assert_close_entrywise(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor | None = None) -> None:
    # Each entry to 1e-5 of itself (plus of ``scale``, e.g. the gradients a momentum sums with
    # cancellations): momenta and mean squares span many orders of magnitude, and _rel
    # (relative to the largest) would let a wrong small entry pass.
    a, b = a.detach().float(), b.detach().float()
    bound = b.abs() if scale is None else b.abs() + scale.detach().float().abs().reshape(-1, *[1] * (b.dim() - 1))
    bad = (a - b).abs() > 1e-5 * bound + 1e-30
    assert not bad.any(), f"{int(bad.sum())} of {b.numel()} entries differ, e.g. {a[bad][:3]} vs {b[bad][:3]}"


@pytest.mark.parametrize(
    "config",
    [
        {},
        {"hidden_size": 7},
        {"hidden_size": 20, "num_layers": 1},
        {"hidden_size": 5, "num_layers": 3},
        {"preprocess": False, "input_scale": 3.0},
        {"preprocess_p": 4.0, "output_scale": 0.5},
        # Hidden sizes that are no multiple of the C kernel's 5 units per step, at the top of
        # their padded width: the kernel ran past its tiles (a crash at 61-64).
        {"hidden_size": 16},
        {"hidden_size": 32, "num_layers": 1},
        {"hidden_size": 64},
    ],
    ids=["paper", "hidden7", "one-layer", "three-layers", "raw-grad", "p4", "hidden16", "hidden32", "hidden64"],
)
@over_kernels
def test_kernel_matches_eager_fp32(config, impl):
    rule = _trained_like(CoordinateLSTM(**config))
    grad, state = _inputs(rule, 300)  # not a multiple of any block size: a partial last block
    with torch.no_grad():
        expected_update, expected_state = rule(grad, state)
    h, c = state["h"].clone(), state["c"].clone()
    update = torch.empty_like(grad)
    rule.fused_step(impl, grad, {"h": h, "c": c}, update)
    assert _rel(update, expected_update) < 1e-5
    assert _rel(h, expected_state["h"]) < 1e-5
    assert _rel(c, expected_state["c"]) < 1e-5


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the C kernel")
def test_cpu_kernel_leaves_rules_with_more_state_than_its_scratch_to_eager():
    """The C kernel keeps num_layers * hidden_size <= 256 state units per coordinate in its block
    scratch; a deeper rule (13 x 20) overran it and stepped wrongly: it must run eagerly."""
    from learned_optim.rules import lstm_cpu

    deep = CoordinateLSTM(num_layers=13)
    assert not lstm_cpu.supports(deep) and "cpu" not in deep.fused_impls()
    assert lstm_cpu.supports(CoordinateLSTM(num_layers=4, hidden_size=64))
    results = []
    for impl in ("eager", "auto"):
        torch.manual_seed(1)
        param = nn.Parameter(torch.randn(50))
        opt = LearnedOptimizer([param], pretrained=_trained_like(CoordinateLSTM(num_layers=13)), impl=impl)
        for i in range(3):
            param.grad = torch.randn(50) * 10.0 ** (i - 1)
            opt.step()
        results.append(param.detach().clone())
    torch.testing.assert_close(results[1], results[0])


@over_kernels
def test_kernel_with_bf16_state_matches_eager_with_bf16_state(impl):
    rule = _trained_like(CoordinateLSTM())
    grad, state = _inputs(rule, 200, dtype=torch.bfloat16)
    with torch.no_grad():
        expected_update, expected_state = rule(grad, state)
    h, c = state["h"].clone(), state["c"].clone()
    update = torch.empty_like(grad)
    rule.fused_step(impl, grad, {"h": h, "c": c}, update)
    assert h.dtype == torch.bfloat16 and c.dtype == torch.bfloat16
    # Both compute in fp32 from the same bf16 state; only the final rounding can differ by one ulp.
    assert _rel(update, expected_update) < 1e-5
    for key, value in (("h", h), ("c", c)):
        assert torch.allclose(value.float(), expected_state[key].float(), rtol=BF16_STATE_RTOL, atol=1e-6)


@over_kernels
def test_kernel_keep_flags_leave_skipped_tensors_untouched(impl):
    rule = _trained_like(CoordinateLSTM())
    grad, state = _inputs(rule, 150)
    segment_ids = torch.cat([torch.full((n,), i, dtype=torch.int32) for i, n in enumerate((70, 50, 30))]).to(DEVICE)
    keep = torch.tensor([True, False, True], device=DEVICE)
    with torch.no_grad():
        expected_update, expected_state = rule(grad, state)
    h, c = state["h"].clone(), state["c"].clone()
    update = torch.full_like(grad, float("nan"))
    rule.fused_step(impl, grad, {"h": h, "c": c}, update, keep=keep, segment_ids=segment_ids)
    kept = (segment_ids != 1).cpu()
    assert torch.equal(update[~kept], torch.zeros_like(update[~kept]))
    assert torch.equal(h[~kept], state["h"][~kept]) and torch.equal(c[~kept], state["c"][~kept])
    assert _rel(update[kept], expected_update[kept]) < 1e-5
    assert _rel(h[kept], expected_state["h"][kept]) < 1e-5


@over_kernels
def test_packed_weights_follow_rule_updates(impl):
    rule = _trained_like(CoordinateLSTM())
    grad, state = _inputs(rule, 100)
    first = torch.empty_like(grad)
    rule.fused_step(impl, grad, {k: v.clone() for k, v in state.items()}, first)
    with torch.no_grad():
        rule.output.weight.mul_(2.0)  # in place: the kernel must not keep using stale packed weights
        expected, _ = rule(grad, state)
    second = torch.empty_like(grad)
    rule.fused_step(impl, grad, {k: v.clone() for k, v in state.items()}, second)
    assert _rel(second, expected) < 1e-5
    assert not torch.allclose(first, second)


MOMENTUM_CONFIGS = pytest.mark.parametrize(
    "config",
    [
        {"momentum_decays": [0.5, 0.9, 0.99]},
        {"momentum_decays": [0.9, 0.3], "rms_decay": 0.9, "preprocess": False, "input_scale": 2.0},
        {"momentum_decays": [0.7], "hidden_size": 7, "num_layers": 3},
    ],
    ids=["three-momenta", "raw-grad", "hidden7"],
)


def _momentum_inputs(rule: CoordinateLSTM, n: int, dtype: torch.dtype = torch.float32):
    """Gradients and state mid-run: averages of earlier gradients, some coordinates still fresh (v = 0)."""
    grad, state = _inputs(rule, n, dtype=dtype)
    g = torch.Generator().manual_seed(2)
    scale = torch.logspace(-6, 1, n)
    state["m"] = (torch.randn(state["m"].shape, generator=g) * scale[:, None]).to(dtype).to(DEVICE)
    v = (torch.rand(n, generator=g) + 0.1) * scale**2
    v[::5] = 0.0  # no gradient seen yet: the averages start at this one
    state["v"] = v.to(dtype).to(DEVICE)
    return grad, state


def _fused_steps(rule, impl, grad, state, steps=1, **kwargs):
    state = {k: v.clone() for k, v in state.items()}
    for step in range(steps):
        update = torch.full_like(grad, float("nan"))
        rule.fused_step(impl, grad * (step + 1) * (-1) ** step, state, update, **kwargs)
    return update, state


def _eager_steps(rule, grad, state, steps=1):
    with torch.no_grad():
        for step in range(steps):
            update, state = rule(grad * (step + 1) * (-1) ** step, state)
    return update, state


@MOMENTUM_CONFIGS
@over_kernels
def test_kernel_with_momentum_inputs_matches_eager_fp32(config, impl):
    rule = _trained_like(CoordinateLSTM(**config))
    assert impl in rule.fused_impls()
    grad, state = _momentum_inputs(rule, 300)
    expected_update, expected_state = _eager_steps(rule, grad, state, steps=3)
    update, fused_state = _fused_steps(rule, impl, grad, state, steps=3)
    assert _rel(update, expected_update) < 1e-5
    for key in ("h", "c"):
        assert _rel(fused_state[key], expected_state[key]) < 1e-5, key
    _assert_close_entrywise(fused_state["v"], expected_state["v"])
    _assert_close_entrywise(fused_state["m"], expected_state["m"], scale=3 * grad)  # |g| up to 3|grad|
    # From the optimizer's initial state (all zero) too, with zero gradients mixed in.
    zeros = {k: torch.zeros_like(v) for k, v in state.items()}
    expected_update, expected_state = _eager_steps(rule, grad, zeros, steps=2)
    update, fused_state = _fused_steps(rule, impl, grad, zeros, steps=2)
    assert torch.isfinite(update).all()
    assert _rel(update, expected_update) < 1e-5
    _assert_close_entrywise(fused_state["m"], expected_state["m"], scale=2 * grad)


@over_kernels
def test_kernel_with_momentum_inputs_and_bf16_state_matches_eager(impl):
    rule = _trained_like(CoordinateLSTM(momentum_decays=[0.5, 0.9, 0.99]))
    grad, state = _momentum_inputs(rule, 200, dtype=torch.bfloat16)
    expected_update, expected_state = _eager_steps(rule, grad, state)
    update, fused_state = _fused_steps(rule, impl, grad, state)
    assert _rel(update, expected_update) < 1e-5
    for key in ("h", "c", "m", "v"):
        assert fused_state[key].dtype == torch.bfloat16
        assert torch.allclose(fused_state[key].float(), expected_state[key].float(), rtol=BF16_STATE_RTOL, atol=1e-6)


@pytest.mark.skipif("triton" not in KERNELS, reason="needs Triton")
@pytest.mark.parametrize("config", [{}, {"momentum_decays": [0.5, 0.9]}], ids=["paper", "momenta"])
def test_triton_kernel_splits_launches_that_would_overflow_its_offsets(config, monkeypatch):
    from learned_optim.rules import lstm_triton

    rule = _trained_like(CoordinateLSTM(**config))
    grad, state = _momentum_inputs(rule, 300) if config else (torch.randn(300, device=DEVICE) * 1e-2, None)
    if state is None:
        state = {k: torch.randn_like(v) for k, v in rule.init_state(300, DEVICE).items()}
    whole_update, whole_state = _fused_steps(rule, "triton", grad, state, steps=2)
    # Room for one block of coordinates (40 state elements each) per launch: 5 launches.
    monkeypatch.setattr(lstm_triton, "MAX_STATE_ELEMENTS", lstm_triton.LAUNCH["block"] * 41)
    split_update, split_state = _fused_steps(rule, "triton", grad, state, steps=2)
    assert torch.equal(split_update, whole_update)
    for key, value in whole_state.items():
        assert torch.equal(split_state[key], value), key


@over_kernels
def test_kernel_keep_flags_leave_skipped_momenta_untouched(impl):
    rule = _trained_like(CoordinateLSTM(momentum_decays=[0.5, 0.9]))
    grad, state = _momentum_inputs(rule, 150)
    segment_ids = torch.cat([torch.full((n,), i, dtype=torch.int32) for i, n in enumerate((70, 50, 30))]).to(DEVICE)
    keep = torch.tensor([True, False, True], device=DEVICE)
    expected_update, expected_state = _eager_steps(rule, grad, state)
    update, fused_state = _fused_steps(rule, impl, grad, state, keep=keep, segment_ids=segment_ids)
    kept = (segment_ids != 1).cpu()
    assert torch.equal(update[~kept], torch.zeros_like(update[~kept]))
    for key in ("h", "c", "m", "v"):
        assert torch.equal(fused_state[key][~kept], state[key][~kept]), key
        if key in ("m", "v"):  # a momentum sums gradients (cancellations), a mean square does not
            scale = grad[kept] if key == "m" else None
            _assert_close_entrywise(fused_state[key][kept], expected_state[key][kept], scale=scale)
        else:
            assert _rel(fused_state[key][kept], expected_state[key][kept]) < 1e-5, key
    assert _rel(update[kept], expected_update[kept]) < 1e-5


@over_kernels
def test_optimizer_with_a_momentum_rule_picks_the_kernel_and_matches_eager(impl):
    config = {"momentum_decays": [0.5, 0.9, 0.99]}
    eager, eager_opt = _train("eager", steps=5, rule_config=config)
    fused, fused_opt = _train(impl, steps=5, rule_config=config)
    assert fused_opt.impl_for(DEVICE) == impl
    for a, b in zip(eager.parameters(), fused.parameters(), strict=True):
        assert _rel(b, a) < TRAJECTORY_RTOL
    for p_eager, p_fused in zip(eager.parameters(), fused.parameters(), strict=True):
        for key in ("rule.m", "rule.v"):
            assert _rel(fused_opt.state[p_fused][key], eager_opt.state[p_eager][key]) < TRAJECTORY_RTOL


AGREEMENT = {"momentum_decays": [0.5, 0.9, 0.99], "tensor_agreement": True}
NORM_RATIO = {"momentum_decays": [0.5, 0.9, 0.99], "tensor_norm_ratio": True}
BOTH_TENSOR_INPUTS = {**AGREEMENT, "tensor_norm_ratio": True}
STEP_GAIN = {**BOTH_TENSOR_INPUTS, "tensor_step_gain": True}
STEP_RESPONSE = {**NORM_RATIO, "tensor_step_response": True, "tensor_step_gain": True}
# Per-tensor inputs without momenta: the Triton kernel once left them out of layer 0.
RESPONSE_ONLY = {"tensor_step_response": True, "tensor_step_gain": True}
MOMENTUM_STEP = {**NORM_RATIO, "tensor_step_gain": True, "momentum_step": True}
cpu_kernel = pytest.mark.skipif("cpu" not in KERNELS, reason="the C kernel")


@over_kernels
@pytest.mark.parametrize("poison_step", [None, 2], ids=["finite", "skips-a-tensor"])
@pytest.mark.parametrize("chunk_size", [1 << 16, 50], ids=["whole", "split-tensors"])
@pytest.mark.parametrize(
    "config",
    [AGREEMENT, NORM_RATIO, BOTH_TENSOR_INPUTS, STEP_GAIN, STEP_RESPONSE, RESPONSE_ONLY, MOMENTUM_STEP],
    ids=["agreement", "ratio", "both", "gain", "response", "response-only", "momentum-step"],
)
def test_kernel_with_per_tensor_inputs_matches_eager(config, poison_step, chunk_size, impl):
    assert CoordinateLSTM(**config).fused_impls() == CoordinateLSTM().fused_impls()
    # The step response feeds each update back into the next step's inputs, which with these
    # large random weights amplifies last-bit differences about 5x per step by the fifth:
    # two eager cells of equal float64 accuracy (sigmoid over a column slice or the whole
    # gates, FMA or not in the cell update) end 2.6e-5 apart after 4 steps and 1.3e-4 after 5.
    steps = 4 if config.get("tensor_step_response") else 5
    runs = {}
    for run_impl in ("eager", impl):
        with pytest.warns(RuntimeWarning, match="non-finite") if poison_step is not None else _no_warning():
            runs[run_impl] = _train(
                run_impl, steps=steps, poison_step=poison_step, rule_config=config, chunk_size=chunk_size
            )
    (eager, eager_opt), (fused, fused_opt) = runs["eager"], runs[impl]
    assert fused_opt.impl_for(DEVICE) == impl
    for p_eager, p_fused in zip(eager.parameters(), fused.parameters(), strict=True):
        assert _rel(p_fused, p_eager) < TRAJECTORY_RTOL
        keys = [k for k in ("rule.h", "rule.m", "rule.u", "rule.q") if k in eager_opt.state[p_eager]]
        for key in keys:
            assert _rel(fused_opt.state[p_fused][key], eager_opt.state[p_eager][key]) < TRAJECTORY_RTOL, key
    # the per-tensor inputs matter: without them the trajectory differs
    if poison_step is None:
        plain, _ = _train(impl, steps=steps, rule_config=config, chunk_size=chunk_size, zero_agreement=True)
        assert _rel(plain[0].weight, fused[0].weight) > 1e-3


@over_kernels
def test_momentum_step_reads_the_stored_bf16_momenta_as_the_kernel_does(impl):
    # The fused path adds the momentum step from the momenta the kernel wrote (rounded to
    # bf16): the eager rule must read the same rounded values, or the updates differ by 1e-2.
    start = [p.detach().clone() for p in _model().parameters()]
    runs = [
        _train(run_impl, steps=1, rule_config=MOMENTUM_STEP, state_dtype=torch.bfloat16) for run_impl in ("eager", impl)
    ]
    (eager, _), (fused, _) = runs
    # The C kernel rounds to bf16 as torch does; Triton's rounding may differ by one unit in the
    # last place of a momentum (BF16_STATE_RTOL), which the momentum step passes on.
    tolerance = 1e-5 if impl == "cpu" else BF16_STATE_RTOL
    for p0, a, b in zip(start, eager.parameters(), fused.parameters(), strict=True):
        assert _rel(b - p0, a - p0) < tolerance


@pytest.mark.skipif(not KERNELS, reason="no fused kernel here")
@pytest.mark.parametrize("config", [AGREEMENT, NORM_RATIO, STEP_RESPONSE], ids=["agreement", "ratio", "response"])
def test_auto_picks_the_kernel_for_per_tensor_inputs_without_a_warning(config):
    # impl="auto" first tries the kernel on a few coordinates; that trial must give such
    # rules their tensors' layout, or they would silently fall back to the eager path.
    model = _model()
    plain = LearnedOptimizer(model.parameters(), pretrained=CoordinateLSTM(momentum_decays=config["momentum_decays"]))
    opt = LearnedOptimizer(model.parameters(), pretrained=CoordinateLSTM(**config))
    with _no_warning():
        assert opt.impl_for(DEVICE) == plain.impl_for(DEVICE) != "eager"


@cpu_kernel
def test_cpu_kernel_with_per_tensor_inputs_steps_meta_fit_rollouts_like_eager(monkeypatch):
    from learned_optim.meta_fit import rollout
    from learned_optim.tasks import get_task

    rule = _trained_like(CoordinateLSTM(hidden_size=6, **BOTH_TENSOR_INPUTS), seed=4)
    family = get_task("teacher")
    fused = rollout(rule, family.sample(3), 12)
    monkeypatch.setattr(CoordinateLSTM, "fused_impls", lambda self: ())
    eager = rollout(rule, family.sample(3), 12)
    assert fused == pytest.approx(eager, rel=1e-4)


@over_kernels
def test_kernels_refuse_a_missing_or_malformed_agreement_table_before_writing(impl):
    from learned_optim.rules.lstm_cpu import lstm_step_cpu
    from learned_optim.rules.lstm_pack import pack_lstm_weights
    from learned_optim.rules.lstm_triton import lstm_step_triton

    kernel = {"cpu": lstm_step_cpu, "triton": lstm_step_triton}[impl]
    rule = _trained_like(CoordinateLSTM(hidden_size=6, **AGREEMENT))
    grad, state = _inputs(rule, 40)
    before = {k: v.clone() for k, v in state.items()}
    ids = torch.zeros(40, dtype=torch.int32, device=DEVICE)
    table = torch.zeros(1, 3, device=DEVICE)
    bad = [
        ({"agreement": None}, "agreement table"),
        ({"agreement": torch.zeros(1, 2, device=DEVICE)}, r"\(num_tensors, 3\)"),
        ({"agreement": table.double()}, "float32"),
        ({"agreement": table, "segment_ids": None}, "int32 segment_ids"),
        ({"agreement": table, "segment_ids": ids.long()}, "int32 segment_ids"),
    ]
    for overrides, message in bad:
        kwargs = {"segment_ids": ids, "m": state["m"], "v": state["v"], **overrides}
        update = torch.empty(40, device=DEVICE)
        with pytest.raises(ValueError, match=message):
            kernel(rule, pack_lstm_weights(rule), grad, state["h"], state["c"], update, **kwargs)
        for key, value in state.items():
            assert torch.equal(value, before[key]), key


def test_a_rule_with_more_inputs_than_the_packed_layout_holds_runs_eagerly():
    # 16 padded units for hidden_size 7: 2 gradient features + 15 momenta do not fit.
    rule = CoordinateLSTM(hidden_size=7, momentum_decays=[0.5] * 15)
    assert rule.fused_impls() == ()
    assert CoordinateLSTM(hidden_size=7, momentum_decays=[0.5] * 14).fused_impls() == CoordinateLSTM().fused_impls()


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.Sigmoid(), nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 3)).to(DEVICE)


def _groups(model: nn.Module) -> list[dict]:
    return [
        {"params": model[0].parameters(), "lr": 0.3, "weight_decay": 0.1},
        {"params": model[2].parameters(), "maximize": False},
        {"params": model[4].parameters(), "lr": 0.7},
    ]


def _train(
    impl: str,
    steps: int = 4,
    poison_step: int | None = None,
    rule_config: dict | None = None,
    zero_agreement: bool = False,
    **kwargs,
) -> tuple[nn.Module, LearnedOptimizer]:
    model = _model()
    rule = _trained_like(CoordinateLSTM(**(rule_config or {})), seed=3)
    if rule.tensor_step_gain:
        with torch.no_grad():  # gains within about [1/e, e], as meta-trained ones (not saturated at e^±4)
            rule.gain.weight.mul_(0.05)
            rule.gain.bias.mul_(0.05)
    if zero_agreement:
        with torch.no_grad():
            first, stop = input_count(rule) - tensor_input_count(rule), input_count(rule)
            rule.weights[0][:, first:stop] = 0.0  # the per-tensor inputs' columns
    opt = LearnedOptimizer(_groups(model), pretrained=rule, impl=impl, **kwargs)
    g = torch.Generator().manual_seed(5)
    for step in range(steps):
        x = torch.randn(16, 6, generator=g).to(DEVICE)
        y = torch.randint(0, 3, (16,), generator=g).to(DEVICE)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        if step == poison_step:
            model[2].weight.grad[0, 0] = float("nan")
        opt.step()
    return model, opt


@pytest.mark.parametrize("warn_nonfinite", [True, False], ids=["host-check", "sync-free"])
@over_kernels
def test_optimizer_fused_matches_eager(warn_nonfinite, impl):
    eager, _ = _train("eager", warn_nonfinite=warn_nonfinite)
    fused, opt = _train(impl, warn_nonfinite=warn_nonfinite)
    assert opt.impl_for(DEVICE) == impl
    for a, b in zip(eager.parameters(), fused.parameters(), strict=True):
        assert _rel(b, a) < TRAJECTORY_RTOL


@over_kernels
def test_optimizer_fused_skips_nonfinite_tensor_like_eager(impl):
    with pytest.warns(RuntimeWarning, match="non-finite"):
        eager, eager_opt = _train("eager", poison_step=2)
    with pytest.warns(RuntimeWarning, match="non-finite"):
        fused, fused_opt = _train(impl, poison_step=2)
    for a, b in zip(eager.parameters(), fused.parameters(), strict=True):
        assert torch.isfinite(b).all()
        assert _rel(b, a) < TRAJECTORY_RTOL
    for p_eager, p_fused in zip(eager.parameters(), fused.parameters(), strict=True):
        for key in ("rule.h", "rule.c"):
            assert _rel(fused_opt.state[p_fused][key], eager_opt.state[p_eager][key]) < TRAJECTORY_RTOL


@over_kernels
def test_fused_state_lives_in_one_buffer_and_resumes_across_impls(impl):
    model, opt = _train(impl, steps=2)
    buffers = {opt.state[p]["rule.h"].untyped_storage().data_ptr() for p in model.parameters()}
    assert len(buffers) == 1  # every parameter's state is a view of one flat buffer

    saved = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, saved)

    def resume(impl: str) -> nn.Module:
        saved.seek(0)
        checkpoint = torch.load(saved, weights_only=True)
        resumed = _model()
        resumed.load_state_dict(checkpoint["model"])
        resumed_opt = LearnedOptimizer(_groups(resumed), pretrained=_trained_like(CoordinateLSTM(), seed=3), impl=impl)
        resumed_opt.load_state_dict(checkpoint["opt"])
        g = torch.Generator().manual_seed(9)
        for _ in range(2):
            x = torch.randn(16, 6, generator=g).to(DEVICE)
            y = torch.randint(0, 3, (16,), generator=g).to(DEVICE)
            resumed_opt.zero_grad()
            nn.functional.cross_entropy(resumed(x), y).backward()
            resumed_opt.step()
        return resumed

    from_eager, from_fused = resume("eager"), resume(impl)
    for a, b in zip(from_eager.parameters(), from_fused.parameters(), strict=True):
        assert _rel(b, a) < TRAJECTORY_RTOL


@over_kernels
def test_fused_rebuilds_its_buffer_when_a_parameter_stops_getting_gradients(impl):
    model = _model()
    opt = LearnedOptimizer(model.parameters(), pretrained=_trained_like(CoordinateLSTM()), impl=impl)
    x, y = torch.randn(8, 6).to(DEVICE), torch.randint(0, 3, (8,)).to(DEVICE)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    frozen = model[0].weight
    before = opt.state[frozen]["rule.h"].clone()
    frozen_value = frozen.detach().clone()
    opt.zero_grad()
    frozen.requires_grad_(False)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    assert torch.equal(opt.state[frozen]["rule.h"], before)
    assert torch.equal(frozen, frozen_value)


def test_impl_errors_name_what_is_wrong(monkeypatch):
    params = [nn.Parameter(torch.zeros(3))]
    with pytest.raises(ValueError, match="impl must be one of"):
        LearnedOptimizer(params, impl="cuda")
    for impl in KERNELS:
        if impl not in HierarchicalRNN().fused_impls():
            with pytest.raises(ValueError, match="HierarchicalRNN has no such fused kernel"):
                LearnedOptimizer(params, pretrained=HierarchicalRNN(), impl=impl)
    if "triton" in KERNELS:
        opt = LearnedOptimizer(params, pretrained=CoordinateLSTM(), impl="triton")
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        with pytest.raises(RuntimeError, match="runs on CUDA devices"):
            opt.impl_for(torch.device("cpu"))
    if "cpu" in KERNELS:
        opt = LearnedOptimizer(params, pretrained=CoordinateLSTM(), impl="cpu")
        with pytest.raises(RuntimeError, match="runs on CPU tensors"):
            opt.impl_for(torch.device("cuda"))


def test_auto_picks_the_fused_kernel_of_the_device():
    opt = LearnedOptimizer([nn.Parameter(torch.zeros(3))], pretrained=CoordinateLSTM())
    expected_cpu = "cpu" if "cpu" in CoordinateLSTM().fused_impls() else "eager"
    assert opt.impl_for(torch.device("cpu")) == expected_cpu  # Triton's interpreter is never picked
    if torch.cuda.is_available():
        assert opt.impl_for(torch.device("cuda")) == "triton"
    hierarchical = LearnedOptimizer([nn.Parameter(torch.zeros(3))], pretrained=HierarchicalRNN())
    expected_hrnn = "cpu" if "cpu" in HierarchicalRNN().fused_impls() else "eager"
    assert hierarchical.impl_for(torch.device("cpu")) == expected_hrnn


def test_cpu_kernel_handles_multithreaded_ranges():
    if "cpu" not in KERNELS:
        pytest.skip("no C compiler")
    rule = _trained_like(CoordinateLSTM())
    grad, state = _inputs(rule, 3 * 4096 + 77)
    with torch.no_grad():
        expected_update, expected_state = rule(grad, state)
    update = torch.empty_like(grad)
    threads = torch.get_num_threads()
    torch.set_num_threads(3)  # three ranges, the last one partial
    try:
        rule.fused_step("cpu", grad, state, update)
    finally:
        torch.set_num_threads(threads)
    assert _rel(update, expected_update) < 1e-5
    assert _rel(state["h"], expected_state["h"]) < 1e-5


def test_both_cpu_kernels_build_wherever_there_is_a_compiler():
    # The kernel tests run over the kernels that built: a C error in one would otherwise only
    # drop its cases (and warn), not fail.
    from learned_optim.rules import hrnn_cpu, lstm_cpu
    from learned_optim.rules.cpu_build import _compiler

    if _compiler() is None:
        pytest.skip("no C compiler")
    assert lstm_cpu.cpu_kernel_available(), lstm_cpu.cpu_kernel_error()
    assert hrnn_cpu.hrnn_kernel_available(), hrnn_cpu._KERNEL.error


def test_built_cpu_kernel_follows_the_umask(tmp_path, monkeypatch):
    # mkstemp's 0600 file, kept by the compiler and the rename, made the kernel owner-only
    # (0711): no one else could load it from a shared cache. It gets what cc -o gives: 0755 here.
    import os
    import stat

    from learned_optim.rules.cpu_build import KernelLibrary, _compiler

    if _compiler() is None:
        pytest.skip("no C compiler")
    monkeypatch.setenv("LEARNED_OPTIM_CACHE", str(tmp_path))
    old = os.umask(0o022)
    try:
        library = KernelLibrary("lstm_cpu.c", lambda lib: None)
        assert library.load() is not None, library.error
    finally:
        os.umask(old)
    (built,) = (tmp_path / "kernels").iterdir()  # no temporary file left beside it
    assert built.suffix == ".so" and oct(stat.S_IMODE(built.stat().st_mode)) == oct(0o755)


def test_cpu_kernel_build_troubles_fall_back_with_one_warning(tmp_path, monkeypatch):
    import shutil

    from learned_optim.rules import cpu_build
    from learned_optim.rules.cpu_build import KernelLibrary, _compiler

    if _compiler() is None:
        pytest.skip("no C compiler")
    cc = shutil.which(_compiler()[0])
    monkeypatch.setenv("LEARNED_OPTIM_CACHE", str(tmp_path))
    # $CC as the shell splits it ("ccache gcc", "gcc -m64"), not replaced by plain cc.
    monkeypatch.setenv("CC", f"{cc} -DLEARNED_OPTIM_TEST_FLAG")
    assert _compiler() == [cc, "-DLEARNED_OPTIM_TEST_FLAG"]
    assert KernelLibrary("lstm_cpu.c", lambda lib: None).load() is not None
    # A damaged cached kernel (a copy cut short) is built again, not given up on.
    (built,) = (tmp_path / "kernels").iterdir()
    # Replaced, not truncated in place: this process has the file mapped (SIGBUS at exit).
    damaged = built.with_name("damaged")
    damaged.write_bytes(built.read_bytes()[:100])
    damaged.replace(built)
    rebuilt = KernelLibrary("lstm_cpu.c", lambda lib: None)
    assert rebuilt.load() is not None, rebuilt.error
    # No compiler: the kernel is unavailable, said once, as a warning.
    monkeypatch.setattr(cpu_build, "_compiler", lambda: None)
    missing = KernelLibrary("lstm_cpu.c", lambda lib: None)
    with pytest.warns(RuntimeWarning, match=r"lstm_cpu\.c is unavailable \(no C compiler found"):
        assert missing.load() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert missing.load() is None  # settled: no second warning


def test_cpu_kernel_without_a_home_builds_outside_the_working_directory(tmp_path, monkeypatch):
    # A container user with no passwd entry and no $HOME: expanduser("~") stays "~", which
    # made a folder named "~" in the working directory.
    from learned_optim.rules import cpu_build
    from learned_optim.rules.cpu_build import KernelLibrary, _compiler

    if _compiler() is None:
        pytest.skip("no C compiler")
    for name in ("LEARNED_OPTIM_CACHE", "XDG_CACHE_HOME", "HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(cpu_build.os.path, "expanduser", lambda path: path)
    monkeypatch.chdir(tmp_path)
    assert cpu_build._cache_dir() is None
    library = KernelLibrary("lstm_cpu.c", lambda lib: None)
    assert library.load() is not None, library.error
    assert list(tmp_path.iterdir()) == []


STEP_CONFIGS = pytest.mark.parametrize(
    "config", [{}, {"momentum_decays": [0.5, 0.9]}, BOTH_TENSOR_INPUTS], ids=["paper", "momenta", "per-tensor"]
)
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda_only
@STEP_CONFIGS
def test_cuda_graph_captures_a_training_step(config):
    model = _model()
    # Default warn_nonfinite=True: the step drops its host-side check while being captured.
    opt = LearnedOptimizer(model.parameters(), pretrained=_trained_like(CoordinateLSTM(**config)), impl="triton")
    x = torch.randn(16, 6, device=DEVICE)
    y = torch.randint(0, 3, (16,), device=DEVICE)

    def train_step():
        opt.zero_grad(set_to_none=False)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # warm-up: state, flat buffer and packed weights are allocated here
            train_step()
    torch.cuda.current_stream().wait_stream(side)
    reference = _model()
    reference.load_state_dict(model.state_dict())
    reference_opt = LearnedOptimizer(reference.parameters(), pretrained=opt.rule, impl="triton", warn_nonfinite=False)
    reference_opt.load_state_dict(opt.state_dict())

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        train_step()  # recorded, not run
    for _ in range(4):
        graph.replay()
    for _ in range(4):
        reference_opt.zero_grad()
        nn.functional.cross_entropy(reference(x), y).backward()
        reference_opt.step()
    torch.cuda.synchronize()
    for a, b in zip(reference.parameters(), model.parameters(), strict=True):
        assert _rel(b, a) < TRAJECTORY_RTOL


@STEP_CONFIGS
@pytest.mark.parametrize("impl", ["eager", "auto", *KERNELS])
def test_torch_compile_traces_the_step_in_one_graph_and_matches_eager_mode(impl, config):
    # fullgraph=True fails on any graph break in step(): host syncs, data-pointer checks, the
    # kernel launch. The default warn_nonfinite=True must not add a sync while tracing.
    torch._dynamo.reset()
    model = _model()
    opt = LearnedOptimizer(model.parameters(), pretrained=_trained_like(CoordinateLSTM(**config)), impl=impl)
    reference = _model()
    reference.load_state_dict(model.state_dict())
    reference_opt = LearnedOptimizer(reference.parameters(), pretrained=opt.rule, impl="eager")
    x = torch.randn(16, 6, device=DEVICE)
    y = torch.randint(0, 3, (16,), device=DEVICE)
    # aot_eager: dynamo and functionalization of the kernels' in-place writes, without
    # inductor's C++ build time on CPU (the GPU run uses the default backend).
    backend = "inductor" if DEVICE.type == "cuda" else "aot_eager"
    compiled_step = torch.compile(opt.step, fullgraph=True, backend=backend)
    for _ in range(3):
        for m, o, step in ((model, opt, compiled_step), (reference, reference_opt, reference_opt.step)):
            o.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            step()
    for a, b in zip(reference.parameters(), model.parameters(), strict=True):
        assert _rel(b, a) < TRAJECTORY_RTOL
    # The state the compiled steps wrote is the optimizer's own (resume works from it).
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        for key in opt.rule.state_spec():
            assert _rel(opt.state[p][f"rule.{key}"], reference_opt.state[q][f"rule.{key}"]) < TRAJECTORY_RTOL


# The scheduler wraps opt.step after it was compiled, so it never sees the compiled calls and
# warns that it stepped first: expected here, the schedule itself is what the test checks.
@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before:UserWarning")
@pytest.mark.parametrize(
    "rule, impl", [("lstm-mnist-mixed-momentum", "auto"), ("hrnn-base", "auto"), ("hrnn-base", "eager")]
)
def test_a_compiled_step_with_a_tensor_lr_and_a_scheduler_compiles_once(rule, impl):
    # PyTorch's recipe for a compiled step under an LR scheduler: a tensor lr, which the
    # scheduler fills in place, so a new lr is no new constant to recompile for. Before, the
    # lr was read back to the host (a graph break) and the hierarchical step recompiled every
    # step once zero_grad() freed the gradients.
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = _model()
    reference = _model()
    reference.load_state_dict(model.state_dict())
    opt = LearnedOptimizer(model.parameters(), pretrained=rule, impl=impl, lr=torch.tensor(1.0), weight_decay=0.01)
    reference_opt = LearnedOptimizer(reference.parameters(), pretrained=rule, impl="eager", weight_decay=0.01)
    backend = "inductor" if DEVICE.type == "cuda" else "aot_eager"
    compiled_step = torch.compile(opt.step, fullgraph=True, backend=backend)  # before the scheduler wraps step
    schedulers = [torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.7) for o in (opt, reference_opt)]
    x = torch.randn(16, 6, device=DEVICE)
    y = torch.randint(0, 3, (16,), device=DEVICE)
    for _ in range(5):
        for m, o, step in ((model, opt, compiled_step), (reference, reference_opt, reference_opt.step)):
            o.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            step()
        for scheduler in schedulers:
            scheduler.step()
    # One graph for the first step (it makes the state), one for every later step.
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 2
    assert float(opt.param_groups[0]["lr"]) == pytest.approx(0.7**5)
    for a, b in zip(reference.parameters(), model.parameters(), strict=True):
        assert _rel(b, a) < TRAJECTORY_RTOL


@over_kernels
def test_fused_step_never_writes_into_the_users_gradients(impl, monkeypatch):
    # Small chunks, one big tensor after a small one: chunks that are views of .grad at an offset.
    monkeypatch.setattr("learned_optim.optimizer.FUSED_CHUNK_SIZE", 64)
    params = [nn.Parameter(torch.randn(5, device=DEVICE)), nn.Parameter(torch.randn(300, device=DEVICE))]
    opt = LearnedOptimizer(params, pretrained=_trained_like(CoordinateLSTM()), impl=impl, chunk_size=1)
    for p in params:
        p.grad = torch.randn_like(p)
    grads = [p.grad.clone() for p in params]
    reference = [nn.Parameter(p.detach().clone()) for p in params]
    reference_opt = LearnedOptimizer(reference, pretrained=opt.rule, impl="eager")
    for p, g in zip(reference, grads, strict=True):
        p.grad = g.clone()
    opt.step()
    reference_opt.step()
    for p, g, r in zip(params, grads, reference, strict=True):
        assert torch.equal(p.grad, g)
        assert _rel(p, r) < 1e-5


def test_subclass_that_changes_the_math_gets_no_fused_kernel():
    class ScaledLSTM(CoordinateLSTM):  # inherits rule_type: not registered
        def forward(self, grad, state, context=None):
            update, new_state = super().forward(grad, state, context)
            return 2 * update, new_state

    class NoMomentumLSTM(CoordinateLSTM):  # the kernels compute the momentum inputs themselves
        def momentum_features(self, grad, state):
            scaled, m, v = super().momentum_features(grad, state)
            return torch.zeros_like(scaled), m, v

    for rule in (ScaledLSTM(), NoMomentumLSTM(momentum_decays=[0.9])):
        assert rule.fused_impls() == ()
        opt = LearnedOptimizer([nn.Parameter(torch.zeros(3))], pretrained=rule)
        assert opt.impl_for(torch.device("cpu")) == "eager"
        message = rf"rule {type(rule).__name__} has no such fused kernel \(a subclass of CoordinateLSTM"
        with pytest.raises(ValueError, match=message):
            LearnedOptimizer([nn.Parameter(torch.zeros(3))], pretrained=rule, impl=KERNELS[0])


def test_auto_falls_back_to_eager_where_the_kernel_cannot_run(monkeypatch):
    # A kernel that fails to build or launch on this device (simulated: the class's fused step
    # raises): "auto" warns once and steps eagerly, before anything was changed; the result is
    # the eager optimizer's. An explicit impl raises the error instead.
    impl = "triton" if DEVICE.type == "cuda" else "cpu"  # what "auto" picks on the test device
    if impl not in KERNELS:
        pytest.skip(f"no {impl!r} kernel here")

    def broken(self, *args, **kwargs):
        raise RuntimeError("kernel build failed")

    monkeypatch.setattr(CoordinateLSTM, "fused_step", broken)
    torch.manual_seed(0)
    model = _model()
    reference = _model()
    reference.load_state_dict(model.state_dict())
    rule = _trained_like(CoordinateLSTM())
    opt = LearnedOptimizer(model.parameters(), pretrained=rule)
    reference_opt = LearnedOptimizer(reference.parameters(), pretrained=rule, impl="eager")
    x = torch.randn(16, 6, device=DEVICE)
    y = torch.randint(0, 3, (16,), device=DEVICE)
    expected = f"fused '{impl}' kernel of CoordinateLSTM does not run.*kernel build failed"
    with pytest.warns(RuntimeWarning, match=expected):
        assert opt.impl_for(DEVICE) == "eager"
    for _ in range(3):
        for m, o in ((model, opt), (reference, reference_opt)):
            o.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            o.step()
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(a, b)
    explicit = LearnedOptimizer(model.parameters(), pretrained=rule, impl=impl)
    with pytest.raises(RuntimeError, match="kernel build failed"):
        explicit.step()


@over_kernels
@pytest.mark.parametrize("rule", [CoordinateLSTM, HierarchicalRNN])
def test_weight_decay_on_low_precision_params_is_rounded_once_as_in_eager_mode(impl, rule):
    # A small decay of bf16 weights survives only if decay and update are rounded together.
    # An untrained HierarchicalRNN at its default init_lr steps under half a bf16 step here: at
    # 0.01 its weights move (and without decay their mean stays at 2.999).
    pretrained = _trained_like(rule()) if rule is CoordinateLSTM else rule(init_lr=0.01)
    results = []
    for which in ("eager", impl):
        p = nn.Parameter(torch.full((1000,), 3.0, dtype=torch.bfloat16, device=DEVICE))
        opt = LearnedOptimizer([p], pretrained=pretrained, impl=which, weight_decay=1e-3)
        generator = torch.Generator().manual_seed(0)
        for _ in range(5):
            p.grad = (1e-3 * torch.randn(1000, generator=generator)).to(DEVICE, torch.bfloat16)
            opt.step()
        results.append(p.detach().float())
    # Rounded twice, 43% of the weights came out one bf16 step apart (and the decay was lost).
    assert float((results[0] != 3.0).float().mean()) > 0.5  # the weights moved
    assert float((results[1] != results[0]).float().mean()) < 0.01
    assert float(results[1].mean()) < 3.0 - 3.0 * 1e-3 * 4  # five decays of 0.1% each were applied


@over_kernels
def test_a_kernel_that_rejects_its_input_changes_nothing(impl, monkeypatch):
    p = nn.Parameter(torch.ones(3, device=DEVICE))
    opt = LearnedOptimizer([p], pretrained=_trained_like(CoordinateLSTM()), impl=impl, weight_decay=0.1)

    def broken(*args, **kwargs):
        raise ValueError("kernel refused its input")

    monkeypatch.setattr(opt.rule, "fused_step", broken)
    p.grad = torch.randn(3, device=DEVICE)
    with pytest.raises(ValueError, match="refused"):
        opt.step()
    assert torch.equal(p.detach(), torch.ones(3, device=DEVICE))  # no weight decay applied either


def test_state_dtypes_the_kernels_cannot_store_are_refused_or_run_eagerly():
    for impl in KERNELS:
        with pytest.raises(ValueError, match=r"state_dtype=torch.float16; use impl='eager'"):
            LearnedOptimizer([nn.Parameter(torch.ones(3))], impl=impl, state_dtype=torch.float16)
    opt = LearnedOptimizer([nn.Parameter(torch.ones(3))], state_dtype=torch.float16)
    assert opt.impl_for(torch.device("cpu")) == "eager"


def test_gathering_the_flat_state_lets_each_old_tensor_go_once_copied():
    import weakref

    from learned_optim.functional import FlatState

    states = [{"h": torch.randn(n, 2, 3), "v": torch.randn(n)} for n in (5, 0, 7)]
    expected = {k: torch.cat([s[k] for s in states]) for k in ("h", "v")}
    old = [weakref.ref(s[k]) for s in states for k in ("h", "v")]
    released = []

    def release(index, key, view):
        released.append((index, key))
        states[index][key] = view  # the caller's only reference to the old tensor

    flat = FlatState.gather(states, [5, 0, 7], release)
    assert released == [(i, k) for k in ("h", "v") for i in range(3)]
    assert all(ref() is None for ref in old)  # every old tensor was freed
    for key, value in expected.items():
        assert torch.equal(flat.buffers[key], value)
        assert flat.buffers[key].dtype == value.dtype


@over_kernels
def test_parameters_left_out_of_a_step_do_not_keep_the_old_state_buffers(impl):
    big, small = nn.Parameter(torch.randn(5000, device=DEVICE)), nn.Parameter(torch.randn(2, device=DEVICE))
    opt = LearnedOptimizer([big, small], pretrained=_trained_like(CoordinateLSTM()), impl=impl)
    big.grad, small.grad = torch.randn_like(big), torch.randn_like(small)
    opt.step()
    small_state = opt.state[small]["rule.h"].clone()
    small.grad = None
    opt.step()  # only `big` steps: new buffers
    buffer = opt._flat_states[big.device].buffers["h"]
    assert opt.state[big]["rule.h"].untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()
    held = opt.state[small]["rule.h"]
    assert torch.equal(held, small_state)
    assert held.untyped_storage().nbytes() == held.numel() * held.element_size()  # its own copy
