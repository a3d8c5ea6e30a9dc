"""Tests of the Wichrowska et al. (2017) problem set (learned_optim.tasks.problem_set)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from learned_optim.meta_fit import functional_loss
from learned_optim.tasks import ProblemSet, call_model, get_task, validate_instance
from learned_optim.tasks.problem_set import (
    ALL_KINDS,
    EPS,
    FUNCTION_DOMAINS,
    LARGE_DATA_KINDS,
    LARGE_DATA_TRAIN_SIZES,
    MEMORIZE_KINDS,
    MEMORIZE_TRAIN_SIZES,
    MICHALEWICZ_ARGMIN,
    MICHALEWICZ_MIN,
    PROBLEM_KINDS,
    STYBLINSKI_TANG_ARGMIN,
    TEST_FUNCTIONS,
    TRANSFORMS,
    WIDE_ACTIVE_FRACTION,
    WIDE_DATA_DIMS,
    WIDE_DATA_KINDS,
    evaluate_function,
)


def _loss(instance, batch) -> Tensor:
    return instance.loss(call_model(instance.model, batch[0]), batch[1])


def _grads(instance, batch) -> list[Tensor]:
    params = list(instance.model.parameters())
    return list(torch.autograd.grad(_loss(instance, batch), params))


def _clean(batch):
    """The batch with its perturbation seed replaced by "no perturbation"."""
    inputs = batch[0].clone()
    inputs[:, -1] = -1.0
    return inputs, batch[1]


def only(kind: str, **transform_probs: float) -> ProblemSet:
    return ProblemSet(kinds=[kind], transform_probs=transform_probs)


# --- sampling ------------------------------------------------------------------------------


def test_registered():
    family = get_task("problem-set")
    assert isinstance(family, ProblemSet)
    assert family.name == "problem-set"


@pytest.mark.parametrize("transform_probs", [0.0, 1.0, None])
def test_same_seed_same_instance(transform_probs):
    family = ProblemSet(transform_probs=transform_probs)
    for seed in range(6):
        a, b = family.sample(seed), family.sample(seed)
        assert a.name == b.name
        state_a, state_b = a.model.state_dict(), b.model.state_dict()
        assert state_a.keys() == state_b.keys()
        assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
        for _ in range(3):
            batch_a, batch_b = a.next_batch(), b.next_batch()
            assert torch.equal(batch_a[0], batch_b[0]) and torch.equal(batch_a[1], batch_b[1])
            assert torch.equal(_loss(a, batch_a), _loss(b, batch_b))
        assert torch.equal(a.train_set[0], b.train_set[0]) and torch.equal(a.train_set[1], b.train_set[1])


def test_data_problem_set_draws_only_data_fitting_kinds_and_quadratics():
    family = get_task("problem-set-data")
    kinds = {family.draw(seed).kind for seed in range(200)}
    assert kinds == {"quadratic", "logistic", "softmax", "mlp-sigmoid", "mlp-relu"}


def test_large_data_kinds_are_drawn_only_when_asked_for():
    assert not set(LARGE_DATA_KINDS) & {ProblemSet().draw(seed).kind for seed in range(300)}
    family = get_task("problem-set-large")
    assert {family.draw(seed).kind for seed in range(100)} == set(LARGE_DATA_KINDS)


@pytest.mark.parametrize("kind", LARGE_DATA_KINDS)
def test_large_data_problems_are_minibatched_classifiers_on_many_examples(kind):
    family = only(kind)
    for seed in range(3):
        instance = family.sample(seed)
        validate_instance(instance, instance.name)
        instance = family.sample(seed)
        inputs, labels = instance.train_set
        low, high = LARGE_DATA_TRAIN_SIZES
        assert low <= len(labels) <= high and instance.test_set is not None
        batch = instance.next_batch()
        assert len(batch[1]) < len(labels) // 16  # always minibatched
        assert labels.dtype == torch.int64 and int(labels.max()) >= 1
        logits = call_model(instance.model, inputs[:4])
        assert logits.shape[0] == 4 and int(labels.max()) < logits.shape[1] <= 10
        if kind == "softmax-large":
            assert len(list(instance.model.parameters())) == 2


@pytest.mark.parametrize("kind", MEMORIZE_KINDS)
def test_memorization_problems_fit_random_labels_in_minibatches(kind):
    family = only(kind)
    instance = family.sample(5)
    validate_instance(instance, instance.name)
    instance = family.sample(5)
    labels = instance.train_set[1]
    low, high = MEMORIZE_TRAIN_SIZES
    assert low <= len(labels) <= high and instance.test_set is not None
    assert len(instance.next_batch()[1]) <= len(labels) // 4  # always minibatched
    # Random labels: every class appears, about equally often, whatever the inputs.
    counts = torch.bincount(labels)
    assert len(counts) >= 2 and int(counts.min()) > 0.5 * len(labels) / len(counts)
    assert "random labels" in instance.name
    # Not drawn by the default families; drawn by problem-set-long together with the large ones.
    assert kind not in {get_task("problem-set-large").draw(seed).kind for seed in range(100)}
    assert {get_task("problem-set-long").draw(seed).kind for seed in range(100)} == {
        *LARGE_DATA_KINDS,
        *MEMORIZE_KINDS,
    }


def _mean_abs_correlation(features: Tensor) -> float:
    centred = features - features.mean(0)
    cov = centred.T @ centred / len(features)
    std = cov.diagonal().sqrt().clamp_min(1e-6)
    corr = (cov / std[:, None] / std[None, :]).abs().fill_diagonal_(0)
    return float(corr.sum() / (corr.numel() - len(corr)))


@pytest.mark.parametrize("kind", WIDE_DATA_KINDS)
def test_wide_problems_classify_sparse_non_negative_inputs_in_minibatches(kind):
    family = only(kind)
    gen = torch.Generator().manual_seed(0)
    dims = set()
    for seed in range(4):
        instance = family.sample(seed)
        validate_instance(instance, instance.name)
        instance = family.sample(seed)
        inputs, labels = instance.train_set
        features = inputs[:, :-1]  # the last column is the perturbation seed
        dims.add(features.shape[1])
        assert WIDE_DATA_DIMS[0] <= features.shape[1] <= WIDE_DATA_DIMS[1]
        assert float(features.min()) >= 0 and float(features.max()) <= 1
        active = float((features > 0).float().mean())
        assert WIDE_ACTIVE_FRACTION[0] - 0.05 < active < WIDE_ACTIVE_FRACTION[1] + 0.05, active
        # Correlated through the low-rank latent: co-activation well above that of the same
        # features with each column shuffled independently (chance level).
        shuffled = torch.stack([col[torch.randperm(len(col), generator=gen)] for col in features.T], dim=1)
        assert _mean_abs_correlation(features) > 1.5 * _mean_abs_correlation(shuffled)
        assert len(instance.next_batch()[1]) < len(labels) // 16  # always minibatched
        assert int(labels.max()) >= 1 and "image-like" in instance.name
        if kind == "softmax-wide":
            assert len(list(instance.model.parameters())) == 2
    assert len(dims) > 1
    assert kind not in {get_task("problem-set-long").draw(seed).kind for seed in range(100)}
    assert {get_task("problem-set-wide").draw(seed).kind for seed in range(200)} == {
        *LARGE_DATA_KINDS,
        *MEMORIZE_KINDS,
        *WIDE_DATA_KINDS,
    }


def test_seeds_give_varied_problems():
    family = ProblemSet()
    draws = [family.draw(seed) for seed in range(300)]
    assert {d.kind for d in draws} == set(PROBLEM_KINDS)
    assert {t for d in draws for t in d.transforms} == set(TRANSFORMS)
    assert any(not d.transforms for d in draws)
    assert family.sample(1).name != family.sample(2).name


def test_sample_leaves_global_rng_untouched():
    state = torch.get_rng_state()
    family = ProblemSet(transform_probs=1.0)
    for seed in range(len(PROBLEM_KINDS) * 2):
        instance = family.sample(seed)
        batch = instance.next_batch()
        _grads(instance, batch)  # the forward draws the batch's mask and noise
    assert torch.equal(torch.get_rng_state(), state)


def test_default_family_instances_are_small_valid_and_positive():
    family = ProblemSet()
    for seed in range(60):
        instance = family.sample(seed)
        validate_instance(instance, instance.name)
        instance = family.sample(seed)  # validation consumed a batch
        assert sum(p.numel() for p in instance.model.parameters()) <= 2000, instance.name
        for batch in (instance.train_set, instance.next_batch()):
            value = _loss(instance, batch)
            assert value.ndim == 0 and math.isfinite(value.item()) and value.item() > 0, instance.name
        if instance.test_set is not None:
            assert math.isfinite(_loss(instance, instance.test_set).item())


def test_kind_weights_and_transform_probabilities():
    family = ProblemSet(kinds={"booth": 1.0, "softmax": 3.0, "ackley": 0.0}, transform_probs={"sparse": 1.0})
    draws = [family.draw(seed) for seed in range(200)]
    kinds = [d.kind for d in draws]
    assert set(kinds) == {"booth", "softmax"}
    assert kinds.count("softmax") > 2 * kinds.count("booth")
    assert all(d.transforms == ("sparse",) for d in draws)
    assert all(ProblemSet(transform_probs=0.0).draw(s).transforms == () for s in range(50))
    assert all(ProblemSet(transform_probs=1.0).draw(s).transforms == TRANSFORMS for s in range(50))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"kinds": ["rastrigin"]},
        {"kinds": []},
        {"kinds": {"booth": 0.0}},
        {"transform_probs": {"dropout": 0.5}},
        {"transform_probs": {"sparse": 1.5}},
    ],
)
def test_bad_options_are_rejected(kwargs):
    with pytest.raises(ValueError):
        ProblemSet(**kwargs)


# --- every kind ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_each_kind_can_be_drawn_and_adam_lowers_its_loss(kind):
    family = only(kind)
    for seed in range(3):
        instance = family.sample(seed)
        assert family.draw(seed).kind == kind
        assert instance.name.startswith(f"problem-set[{kind}"), instance.name
        assert instance.train_set is not None
        value = _loss(instance, instance.train_set)
        assert math.isfinite(value.item()) and value.item() > 0
    # Plateau starts (Michalewicz) or Adam's oscillation in a valley (Rosenbrock) can stall a
    # particular seed for a few steps; seed 0 is a typical start for every kind.
    instance = family.sample(0)
    with torch.no_grad():
        before = _loss(instance, instance.train_set).item()
    optimizer = torch.optim.Adam(instance.model.parameters(), lr=0.05)
    for _ in range(20):
        optimizer.zero_grad()
        _loss(instance, instance.next_batch()).backward()
        optimizer.step()
    with torch.no_grad():
        after = _loss(instance, instance.train_set).item()
    assert 0 < after < before, f"{instance.name}: {before:.4g} -> {after:.4g}"


@pytest.mark.parametrize(
    ("kind", "point"),
    [
        ("rosenbrock", (1.0, 1.0)),
        ("booth", (1.0, 3.0)),
        ("beale", (3.0, 0.5)),
        ("branin", (math.pi, 2.275)),
        ("branin", (-math.pi, 12.275)),
        ("matyas", (0.0, 0.0)),
        ("ackley", (0.0, 0.0)),
        ("michalewicz", MICHALEWICZ_ARGMIN),
        ("styblinski-tang", None),  # STYBLINSKI_TANG_ARGMIN in every coordinate
    ],
)
def test_test_functions_have_minimum_near_zero(kind, point):
    instance = only(kind).sample(0)
    theta = instance.model.theta
    with torch.no_grad():
        if point is None:
            theta.fill_(STYBLINSKI_TANG_ARGMIN)
        else:
            theta.copy_(torch.tensor(point))
        value = _loss(instance, instance.train_set).item()
    assert 0 < value <= 1e-6 + EPS, value
    # Gradient at the minimum is finite (Ackley's sqrt is not differentiable at 0).
    assert all(torch.isfinite(g).all() for g in _grads(instance, instance.train_set))


@pytest.mark.parametrize("kind", ["quadratic", "bowl2d"])
def test_quadratics_have_minimum_near_zero(kind):
    instance = only(kind).sample(0)
    weights, target = instance.train_set[0][:, :-1], instance.train_set[1]
    with torch.no_grad():
        instance.model.theta.copy_(torch.linalg.solve(weights.double(), target.double()))
        value = _loss(instance, instance.train_set).item()
    assert 0 < value <= 1e-6 + EPS


@pytest.mark.parametrize("name", TEST_FUNCTIONS)
def test_shifted_test_functions_are_nonnegative_beyond_their_domain(name):
    gen = torch.Generator().manual_seed(0)
    dim = 5 if name == "styblinski-tang" else 2
    domain = FUNCTION_DOMAINS[name] * (dim if name == "styblinski-tang" else 1)
    low = torch.tensor([lo for lo, _ in domain], dtype=torch.float64)
    high = torch.tensor([hi for _, hi in domain], dtype=torch.float64)
    centre, half = (low + high) / 2, (high - low) / 2
    for _ in range(300):
        # Three times the search domain: optimisers do wander out of it.
        point = centre + 3 * half * (2 * torch.rand(dim, generator=gen, dtype=torch.float64) - 1)
        assert evaluate_function(name, point).item() >= -1e-12, (name, point)


def test_michalewicz_constant_is_the_domain_minimum():
    # The 2-D function is separable: the first coordinate's term peaks at 0.8013034 inside
    # [0, π], the second's at exactly 1 (x = π/2).
    x = torch.linspace(0, math.pi, 1_000_001, dtype=torch.float64)
    first = torch.sin(x) * torch.sin(x**2 / math.pi) ** 20
    second = torch.sin(x) * torch.sin(2 * x**2 / math.pi) ** 20
    assert first.max().item() + second.max().item() <= -MICHALEWICZ_MIN + 1e-12
    assert evaluate_function("michalewicz", torch.tensor(MICHALEWICZ_ARGMIN, dtype=torch.float64)).item() == (
        pytest.approx(0.0, abs=1e-12)
    )


# --- transforms ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["quadratic", "mlp-relu", "styblinski-tang"])
def test_sparse_gradients_are_zero_outside_the_mask(kind):
    instance = only(kind, sparse=1.0).sample(1)
    assert "sparse" in instance.name
    masks_seen = []
    for _ in range(3):
        batch = instance.next_batch()
        masks, noises = instance.model.perturbation(batch[0])
        assert masks is not None and noises is None
        grads = _grads(instance, batch)
        clean = _grads(instance, _clean(batch))
        for grad, full, mask in zip(grads, clean, masks, strict=True):
            assert torch.equal(grad[~mask], torch.zeros_like(grad[~mask]))
            assert torch.equal(grad[mask], full[mask])
        assert torch.equal(_loss(instance, batch), _loss(instance, _clean(batch)))
        masks_seen.append(torch.cat([m.flatten() for m in masks]))
    assert not all(torch.equal(masks_seen[0], m) for m in masks_seen[1:])
    # The evaluation splits carry no perturbation: the full gradient.
    assert instance.model.perturbation(instance.train_set[0]) == (None, None)


@pytest.mark.parametrize("kind", ["booth", "softmax", "quadratic"])
def test_noisy_gradients_keep_the_loss_value(kind):
    instance = only(kind, noisy=1.0).sample(2)
    assert "noisy" in instance.name and instance.model.noise_std > 0
    for _ in range(3):
        batch = instance.next_batch()
        _, noises = instance.model.perturbation(batch[0])
        assert noises is not None
        assert torch.equal(_loss(instance, batch), _loss(instance, _clean(batch)))
        for noisy, clean, noise in zip(_grads(instance, batch), _grads(instance, _clean(batch)), noises, strict=True):
            assert torch.allclose(noisy - clean, noise, atol=1e-5, rtol=1e-4)
            assert not torch.equal(noisy, clean)


def test_sparse_and_noisy_together_stay_sparse_and_work_functionally():
    instance = only("mlp-sigmoid", sparse=1.0, noisy=1.0).sample(3)
    names = [n for n, _ in instance.model.named_parameters()]
    # The meta-training path: the module run with replacement parameters.
    params = [p.detach().clone().add(0.01).requires_grad_(True) for p in instance.model.parameters()]
    batch = instance.next_batch()
    masks, noises = instance.model.perturbation(batch[0])
    loss = functional_loss(instance, names, params, batch)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    clean = torch.autograd.grad(functional_loss(instance, names, params, _clean(batch)), params)
    for grad, full, mask, noise in zip(grads, clean, masks, noises, strict=True):
        assert torch.equal(grad[~mask], torch.zeros_like(grad[~mask]))
        assert torch.allclose(grad[mask], (full + noise)[mask], atol=1e-5, rtol=1e-4)
    # Second-order meta-gradients flow through the transforms.
    second = torch.autograd.grad(sum((g**2).sum() for g in grads), params)
    assert all(torch.isfinite(s).all() for s in second)


@pytest.mark.parametrize("kind", ["rosenbrock", "logistic", "quadratic", "ackley"])
def test_rescale_changes_the_scale_not_the_problem(kind):
    for seed in range(6):
        plain, scaled = only(kind).sample(seed), only(kind, rescale=1.0).sample(seed)
        assert "rescale" in scaled.name
        base = _loss(plain, plain.train_set)
        value = _loss(scaled, scaled.train_set)
        model = scaled.model
        if model.scale != 1.0:
            # θ = s·φ: same loss, gradient w.r.t. φ is s times the gradient w.r.t. θ.
            assert 1e-2 <= model.scale <= 1e2
            assert torch.allclose(value, base, rtol=1e-4)
            for g_phi, g_theta in zip(_grads(scaled, scaled.train_set), _grads(plain, plain.train_set), strict=True):
                assert torch.allclose(g_phi, model.scale * g_theta, rtol=1e-3, atol=1e-6 * model.scale)
        else:
            ratio = (value / base).item()
            assert 1e-2 <= ratio <= 1e2 and ratio != pytest.approx(1.0)


def test_deterministic_problems_repeat_their_batch():
    instance = only("beale").sample(0)
    for _ in range(3):
        inputs, targets = instance.next_batch()
        assert torch.equal(inputs, instance.train_set[0]) and torch.equal(targets, instance.train_set[1])
