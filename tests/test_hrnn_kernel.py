"""The fused kernels of HierarchicalRNN (C on CPU; Triton, through its interpreter without a
GPU) against its eager rule, and LearnedOptimizer on them."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from learned_optim import HierarchicalRNN, LearnedOptimizer
from learned_optim.rules.base import StepContext
from learned_optim.rules.hrnn_cpu import hrnn_step_cpu
from learned_optim.rules.hrnn_triton import hrnn_step_triton, pack_hrnn_weights

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# The kernels that can run on this machine's test device (the C kernel only on CPU).
KERNELS = [impl for impl in HierarchicalRNN().fused_impls() if impl == "triton" or DEVICE.type == "cpu"]
if not KERNELS:
    pytest.skip("no fused kernel of the hierarchical RNN can run here", allow_module_level=True)
over_kernels = pytest.mark.parametrize("impl", KERNELS)


def _kernel_step(impl, rule, grad, state, update, ids, sizes, segment, keep=None):
    """One kernel step on DEVICE; state and update are written in place (moved back to CPU)."""
    on = {k: v.to(DEVICE) for k, v in state.items()}
    out = update.to(DEVICE)
    args = (grad.to(DEVICE), on, out, ids.int().to(DEVICE), torch.tensor(sizes, device=DEVICE))
    seg = {k: v.to(DEVICE) for k, v in segment.items()}
    keep = keep.to(DEVICE) if keep is not None else None
    with torch.no_grad():
        if impl == "cpu":
            sums = hrnn_step_cpu(rule, *args, seg, keep)
        else:
            moved = rule.to(DEVICE)
            sums = hrnn_step_triton(moved, pack_hrnn_weights(moved), *args, seg, keep)
            rule.to("cpu")
    for k, v in on.items():
        state[k].copy_(v.cpu())
    update.copy_(out.cpu())
    if not rule.step_on_zero_grad:
        update.masked_fill_(grad == 0, 0.0)  # HierarchicalRNN.fused_step's mask after the kernel
    return {k: v.cpu() for k, v in sums.items()}


# One step matches the eager rule within 1e-5 relative (exp/log/sigmoid approximations at fp32
# accuracy); over a few optimizer steps the last-bit differences compound through the params.
STEP_RTOL = 1e-5
TRAJECTORY_RTOL = 1e-4
SIZES = [5, 300, 17, 1, 1000]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _noisy(rule: HierarchicalRNN, seed: int = 0) -> HierarchicalRNN:
    # Weights well away from the init (which zeroes or scales down several layers).
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in rule.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return rule


def _inputs(rule: HierarchicalRNN, sizes: list[int], seed: int = 1, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    ids = torch.cat([torch.full((s,), i) for i, s in enumerate(sizes)])
    grad = torch.randn(n, generator=g) * torch.logspace(-7, 1, n)
    grad[::13] = 0.0
    state = rule.init_state(n)
    state["m"] = torch.randn(state["m"].shape, generator=g) * 0.1
    state["v"] = torch.rand(state["v"].shape, generator=g) * 0.1
    state["h"] = torch.randn(state["h"].shape, generator=g) * 0.5
    state["log_lr"] = state["log_lr"] + torch.randn(state["log_lr"].shape, generator=g) * 0.3
    state = {k: v.detach().to(dtype) for k, v in state.items()}
    segment = rule.init_segment_state(len(sizes))
    segment["h"] = torch.randn(segment["h"].shape, generator=g) * 0.5
    segment["mean_log_lr"] = segment["mean_log_lr"].detach() + 0.2 * torch.randn(len(sizes), 1, generator=g)
    segment["h"] = segment["h"].detach()
    return grad, state, ids, segment


def _eager(rule, grad, state, ids, segment, num):
    context = StepContext(ids, num, segment, rule.init_global_state())
    with torch.no_grad():
        update, new_state = rule(grad, {k: v.clone() for k, v in state.items()}, context)
    return update, new_state, context.segment_sums


@pytest.mark.parametrize(
    "config",
    [
        {},
        {"param_hidden": 7, "timescales": 3},
        {"param_hidden": 16, "timescales": 6, "lr_change_scale": 0.5},
        {"agreement_feature": True},
        {"param_hidden": 7, "timescales": 3, "agreement_feature": True},
        {"agreement_feature": True, "lr_leak": 0.05},
        {"param_hidden": 7, "timescales": 3, "lr_leak": 0.3},
    ],
    ids=["paper", "p7-k3", "p16-k6", "agreement", "p7-k3-agreement", "leak", "p7-k3-leak"],
)
@over_kernels
def test_kernel_matches_eager_rule(config, impl):
    # Zero gradients move too, so that every tensor's update has unit RMS (the mask of
    # step_on_zero_grad=False comes after the kernel: test_optimizer).
    rule = _noisy(HierarchicalRNN(**config, step_on_zero_grad=True))
    grad, state, ids, segment = _inputs(rule, SIZES)
    expected_update, expected_state, expected_sums = _eager(rule, grad, state, ids, segment, len(SIZES))
    got_state = {k: v.clone() for k, v in state.items()}
    update = torch.empty_like(grad)
    sums = _kernel_step(impl, rule, grad, got_state, update, ids, SIZES, segment)
    assert _rel(update, expected_update) < STEP_RTOL
    for k in expected_state:
        assert _rel(got_state[k], expected_state[k]) < STEP_RTOL, k
    assert sums.keys() == expected_sums.keys()
    for k in sums:
        assert _rel(sums[k], expected_sums[k]) < STEP_RTOL, k
    # Every tensor's update has unit RMS over the tensor, times its learning rates.
    lr = got_state["log_lr"].squeeze(-1).exp()
    for i, piece in enumerate((update / lr).split(SIZES)):
        assert float(piece.pow(2).mean().sqrt()) == pytest.approx(1.0, rel=1e-4), i


@pytest.mark.parametrize("config", [{}, {"step_gain": True}], ids=["cap", "gain-and-cap"])
@over_kernels
def test_kernel_applies_the_relative_step_cap_like_the_eager_rule(config, impl):
    """The cap reads each tensor's whole step (the kernels' step² sums): step scales from tiny
    to huge, so that it leaves some tensors alone and shrinks others by orders of magnitude."""
    # step_on_zero_grad: the raw kernel, without fused_step's mask of zero gradients.
    rule = _noisy(HierarchicalRNN(agreement_feature=True, relative_step_cap=0.05, step_on_zero_grad=True, **config))
    if config.get("step_gain"):
        with torch.no_grad():
            rule.gain_out.weight.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(3))
    grad, state, ids, segment = _inputs(rule, SIZES)
    scales = torch.tensor([-12.0, -3.0, 0.0, 4.0, 9.0])  # log(lr / RMS(params)) per tensor
    context = StepContext(ids, len(SIZES), segment, rule.init_global_state(), step_scales=scales)
    with torch.no_grad():
        expected, _ = rule(grad, {k: v.clone() for k, v in state.items()}, context)
    if not config:
        plain = _eager(_plain(rule), grad, state, ids, segment, len(SIZES))[0]
        factors = [a.norm() / b.norm() for a, b in zip(expected.split(SIZES), plain.split(SIZES), strict=True)]
        assert factors[0] > 0.99 and factors[-1] < 1e-2  # the cap is exercised at both ends
    update = torch.empty_like(grad)
    on = {k: v.to(DEVICE) for k, v in state.items()}
    out, seg = update.to(DEVICE), {k: v.to(DEVICE) for k, v in segment.items()}
    args = (grad.to(DEVICE), on, out, ids.int().to(DEVICE), torch.tensor(SIZES, device=DEVICE))
    with torch.no_grad():
        if impl == "cpu":
            hrnn_step_cpu(rule, *args, seg, None, scales)
        else:
            moved = rule.to(DEVICE)
            hrnn_step_triton(moved, pack_hrnn_weights(moved), *args, seg, None, scales.to(DEVICE))
            rule.to("cpu")
    assert _rel(out.cpu(), expected) < STEP_RTOL


def _plain(rule: HierarchicalRNN) -> HierarchicalRNN:
    """``rule`` without its cap: the uncapped step."""
    plain = HierarchicalRNN(**{**rule.config, "relative_step_cap": 0.0})
    plain.load_state_dict(rule.state_dict())
    return plain


@over_kernels
def test_bf16_state_rounds_like_the_eager_rule(impl):
    rule = _noisy(HierarchicalRNN())
    grad, state, ids, segment = _inputs(rule, SIZES, dtype=torch.bfloat16)
    expected_update, expected_state, _ = _eager(rule, grad, state, ids, segment, len(SIZES))
    got_state = {k: v.clone() for k, v in state.items()}
    update = torch.empty_like(grad)
    _kernel_step(impl, rule, grad, got_state, update, ids, SIZES, segment)
    assert all(v.dtype == torch.bfloat16 for v in got_state.values())
    assert _rel(update, expected_update) < STEP_RTOL
    for k in expected_state:
        # The same fp32 value rounds to the same bf16 value. Where the fp32 values differ in
        # their last bits (~1e-7 of the state's scale) they may round to neighbours: one bf16
        # unit (2^-7 relative), or a few for values that small fp32 error is large against.
        expected = expected_state[k].float()
        diff = (got_state[k].float() - expected).abs()
        assert bool((diff <= expected.abs() * 2**-7 + 1e-6 * expected.abs().max()).all()), k


@over_kernels
def test_skipped_tensor_keeps_its_state_and_gets_no_update(impl):
    rule = _noisy(HierarchicalRNN())
    grad, state, ids, segment = _inputs(rule, SIZES)
    keep = torch.tensor([True, False, True, True, False])
    zeroed = torch.where(keep[ids], grad, 0.0)
    expected_update, expected_state, expected_sums = _eager(rule, zeroed, state, ids, segment, len(SIZES))
    got_state = {k: v.clone() for k, v in state.items()}
    update = torch.full_like(grad, float("nan"))
    sums = _kernel_step(impl, rule, grad, got_state, update, ids, SIZES, segment, keep)
    kept = keep[ids]
    assert torch.equal(update[~kept], torch.zeros(int((~kept).sum())))
    assert _rel(update[kept], expected_update[kept]) < STEP_RTOL
    for k in state:
        assert torch.equal(got_state[k][~kept], state[k][~kept]), k
        assert _rel(got_state[k][kept], expected_state[k][kept]) < STEP_RTOL, k
    # A skipped tensor's sums come from a zero gradient, as on the eager path.
    for k in sums:
        assert _rel(sums[k], expected_sums[k]) < STEP_RTOL, k


@pytest.mark.skipif("triton" not in KERNELS, reason="needs Triton")
def test_triton_kernel_splits_launches_that_would_overflow_its_offsets(monkeypatch):
    from learned_optim.rules import hrnn_triton

    rule = _noisy(HierarchicalRNN())
    grad, state, ids, segment = _inputs(rule, SIZES)
    runs = []
    for limit in (hrnn_triton.MAX_STATE_ELEMENTS, hrnn_triton.BLOCK * rule.p):  # one launch; 21 launches
        monkeypatch.setattr(hrnn_triton, "MAX_STATE_ELEMENTS", limit)
        got_state = {k: v.clone() for k, v in state.items()}
        update = torch.empty_like(grad)
        sums = _kernel_step("triton", rule, grad, got_state, update, ids, SIZES, segment)
        runs.append((update, got_state, sums))
    (whole_update, whole_state, whole_sums), (split_update, split_state, split_sums) = runs
    # The per-tensor sums are float64 atomics (their order varies): the direction scale and
    # the tensor-level sums agree to rounding, the per-coordinate state exactly.
    assert _rel(split_update, whole_update) < 1e-6
    for k, v in whole_state.items():
        assert torch.equal(split_state[k], v), k
    for k, v in whole_sums.items():
        assert _rel(split_sums[k], v) < 1e-12, k


def _train(impl: str, steps: int = 6, state_dict=None, model=None, chunk_size: int = 1 << 16):
    torch.manual_seed(0)
    model = model or nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).to(DEVICE)
    groups = [
        {"params": model[0].parameters(), "lr": 0.7, "weight_decay": 0.1},
        {"params": model[2].parameters(), "maximize": False},
    ]
    rule = _noisy(HierarchicalRNN()).to(DEVICE)
    opt = LearnedOptimizer(groups, pretrained=rule, lr=2.0, impl=impl, chunk_size=chunk_size)
    if state_dict is not None:
        opt.load_state_dict(state_dict)
    x = torch.randn(32, 6, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    y = torch.randint(0, 3, (32,), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        grads = [p.grad.clone() for p in model.parameters()]
        opt.step()
        assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads, strict=True))
    return model, opt


@over_kernels
@pytest.mark.parametrize("eager_chunk", [1 << 16, 40], ids=["whole", "split"])
def test_optimizer_on_the_kernel_matches_eager_mode(impl, eager_chunk):
    # With 40-coordinate chunks the eager path splits the 96-coordinate weight over three.
    fused_model, fused_opt = _train(impl)
    eager_model, eager_opt = _train("eager", chunk_size=eager_chunk)
    assert fused_opt.impl_for(DEVICE) == impl
    for a, b in zip(fused_model.parameters(), eager_model.parameters(), strict=True):
        assert _rel(a, b) < TRAJECTORY_RTOL
        for k, v in eager_opt.state[b].items():
            assert _rel(fused_opt.state[a][k], v) < TRAJECTORY_RTOL, k
    for k, v in eager_opt._global_state.items():
        assert _rel(fused_opt._global_state[k], v) < TRAJECTORY_RTOL, k


@over_kernels
def test_state_dict_moves_between_kernel_and_eager(impl):
    model, opt = _train(impl, steps=3)
    saved_model = copy.deepcopy(model)
    state = copy.deepcopy(opt.state_dict())
    continued, _ = _train(impl, steps=3, state_dict=copy.deepcopy(state), model=copy.deepcopy(saved_model))
    resumed, _ = _train("eager", steps=3, state_dict=copy.deepcopy(state), model=copy.deepcopy(saved_model))
    for a, b in zip(continued.parameters(), resumed.parameters(), strict=True):
        assert _rel(a, b) < TRAJECTORY_RTOL


@pytest.mark.skipif("cpu" not in KERNELS, reason="needs the C kernel")
def test_kernel_errors_name_the_problem():
    rule = HierarchicalRNN()
    grad, state, ids, segment = _inputs(rule, [10])
    counts = torch.tensor([10])
    with pytest.raises(ValueError, match=r"segment_ids must be a \(10,\) int32 tensor, got \(10,\) torch\.int64"):
        hrnn_step_cpu(rule, grad, state, torch.empty(10), ids, counts, segment)
    bad = dict(state, h=state["h"][:, :3].contiguous())
    with pytest.raises(ValueError, match="state 'h' must be contiguous with shape \\(10, 10\\)"):
        hrnn_step_cpu(rule, grad, bad, torch.empty(10), ids.int(), counts, segment)
    mixed = dict(state, m=state["m"].double())
    with pytest.raises(ValueError, match=r"must all be float32 or all bfloat16, got 'm' in torch\.float64"):
        hrnn_step_cpu(rule, grad, mixed, torch.empty(10), ids.int(), counts, segment)


def test_a_subclass_that_changes_the_math_runs_eager():
    class Scaled(HierarchicalRNN):
        rule_type = "ScaledHRNNForKernelTest"

        def forward(self, grad, state, context=None):
            update, new_state = super().forward(grad, state, context)
            return 2 * update, new_state

    assert Scaled().fused_impls() == ()
    opt = LearnedOptimizer([nn.Parameter(torch.zeros(3))], pretrained=Scaled())
    assert opt.impl_for(torch.device("cpu")) == "eager"


@pytest.mark.parametrize("impl", [*KERNELS, "eager"])
def test_torch_compile_traces_the_hierarchical_step_in_one_graph(impl):
    torch._dynamo.reset()
    model, opt = _train(impl, steps=1)
    reference = copy.deepcopy(model)
    groups = [{"params": reference[0].parameters()}, {"params": reference[2].parameters()}]
    reference_opt = LearnedOptimizer(groups, pretrained=opt.rule, impl="eager")
    reference_opt.load_state_dict(opt.state_dict())  # state and group settings (lr, weight decay)
    backend = "inductor" if DEVICE.type == "cuda" else "aot_eager"
    compiled_step = torch.compile(opt.step, fullgraph=True, backend=backend)
    x = torch.randn(32, 6, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    y = torch.randint(0, 3, (32,), generator=torch.Generator().manual_seed(4)).to(DEVICE)
    for _ in range(3):
        for m, o, step in ((model, opt, compiled_step), (reference, reference_opt, reference_opt.step)):
            o.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            step()
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        assert _rel(a, b) < TRAJECTORY_RTOL
    for k, v in reference_opt._global_state.items():
        assert _rel(opt._global_state[k], v) < TRAJECTORY_RTOL, k


_INDUCTOR_EAGER_GLOBAL_STATE = pytest.mark.xfail(
    DEVICE.type == "cuda",
    reason="seen on an H100 (torch 2.11): under inductor the eager path's global state ends far "
    "from eager mode's (parameters agree to 7e-4); the Triton path ('auto') matches. Not yet explained.",
    strict=False,
)


@pytest.mark.parametrize("impl", ["auto", pytest.param("eager", marks=_INDUCTOR_EAGER_GLOBAL_STATE)])
def test_a_compiled_first_step_keeps_the_global_state(impl):
    # No uncompiled warm-up: the global state must exist before the first (traced) step.
    torch._dynamo.reset()
    rule = _noisy(HierarchicalRNN())
    params = [nn.Parameter(torch.randn(7, 3, generator=torch.Generator().manual_seed(0)).to(DEVICE))]
    reference = [nn.Parameter(params[0].detach().clone())]
    opt = LearnedOptimizer(params, pretrained=rule, impl=impl)
    reference_opt = LearnedOptimizer(reference, pretrained=rule, impl=impl)
    backend = "aot_eager" if DEVICE.type == "cpu" else "inductor"
    compiled_step = torch.compile(opt.step, fullgraph=True, backend=backend)
    generator = torch.Generator().manual_seed(1)
    for _ in range(4):
        grad = torch.randn(7, 3, generator=generator).to(DEVICE)
        params[0].grad, reference[0].grad = grad.clone(), grad.clone()
        compiled_step()
        reference_opt.step()
    # Inductor's CUDA kernels round differently from eager mode (fused reductions, its own
    # exp/log), and the noisy rule's learning-rate state amplifies that over the steps:
    # seen 6.6e-4 on an H100 (torch 2.11). A step that lost its state would be off by O(1).
    rtol = TRAJECTORY_RTOL if backend == "aot_eager" else 2e-3
    assert _rel(params[0], reference[0]) < rtol
    saved = opt.state_dict()["rule_global_state"]
    for k, v in reference_opt.state_dict()["rule_global_state"].items():
        assert _rel(saved[k], v) < rtol, k
        assert saved[k].grad_fn is None and not saved[k].requires_grad
