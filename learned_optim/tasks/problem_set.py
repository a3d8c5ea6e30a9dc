"""The meta-training problem set of Wichrowska et al. (2017, "Learned Optimizers that Scale and
Generalize", section 4): many small, cheap and diverse problems.

Every instance draws one *kind* of problem:

- ``quadratic``: ``||Wθ − y||²`` in 2..20 dimensions, ``W`` with a random condition number;
- ``bowl2d``: a 2-D bowl with random axis scaling and rotation;
- the classic test functions ``rosenbrock``, ``beale``, ``booth``, ``matyas``, ``ackley``,
  ``branin``, ``michalewicz`` (2-D) and ``styblinski-tang`` (2..10-D), shifted so that their
  minimum is 0, started from a random point of their usual search domain;
- ``logistic`` and ``softmax`` regression on random synthetic data;
- ``mlp-sigmoid`` and ``mlp-relu``: small MLPs classifying random synthetic data (labels from a
  random teacher network or from Gaussian clusters).

Outside the paper's set, and never drawn unless asked for (``kinds=``, or the family
``problem-set-large``), the *large-data* kinds ``softmax-large``, ``mlp-sigmoid-large`` and
``mlp-relu-large``: the same classifiers with thousands of training examples, wider networks and
always minibatched, so that they keep improving for thousands of steps under gradient noise, as
real training does; an optimizer that anneals its step early pays for it there. And the
*memorisation* kinds ``mlp-sigmoid-memorize`` and ``mlp-relu-memorize`` (family
``problem-set-long`` with the large-data kinds): MLPs fitting random labels, which have no noise
floor above zero but need thousands of minibatch steps to reach it; there an optimizer that
takes the noisy gradients for convergence and anneals stops far above the reachable loss.
And the *wide* kinds ``softmax-wide``, ``mlp-sigmoid-wide`` and ``mlp-relu-wide`` (family
``problem-set-wide`` with the large-data and memorisation kinds): classifiers on 128..1024
sparse, non-negative, correlated image-like features, where a first layer's per-coordinate
steps add up coherently, so a step size that suits the narrow problems overshoots.

and, independently with the family's probabilities, *transforms* on top of it:

- ``rescale``: the parameters are reparameterised ``θ = s·φ`` (the optimiser sees ``φ``), or the
  loss is multiplied by ``s``, with ``s`` log-uniform in [1e-2, 1e2];
- ``sparse``: each batch draws a Bernoulli mask; only the masked coordinates get gradient;
- ``noisy``: each batch draws Gaussian noise that is added to the gradient; the loss value is
  unchanged.

Batch format. Every batch is ``(inputs, targets)`` with two tensors (the harness and the generic
task tests compare and slice batches as tensors). ``inputs`` is the problem's data (a quadratic's
``W``, a minibatch of features; no columns for the test functions) with **one extra last column**
holding the batch's perturbation seed: the mask and noise of the ``sparse`` and ``noisy``
transforms are drawn from it inside the model's forward (:meth:`ProblemModel.perturbation`), so
they travel with the batch and a replayed batch gets the same ones. A negative seed means "no
perturbation"; ``train_set`` and ``test_set`` use it, so they give the clean loss and gradient.

Every loss is a scalar, strictly positive (a constant :data:`EPS` is added) and, where the
minimum is known, its minimum is ``EPS``: the meta-objective ``log(f_t / f_0)`` stays finite.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from learned_optim.tasks import register_task
from learned_optim.tasks._common import choose, derive_seed, generator, minibatches, mlp, seeded_module
from learned_optim.tasks.base import Batch, TaskFamily, TaskInstance

EPS = 1e-8
"""Added to every loss so it stays strictly positive at an exact minimum."""

TEST_FUNCTIONS = (
    "rosenbrock",
    "beale",
    "booth",
    "matyas",
    "styblinski-tang",
    "ackley",
    "branin",
    "michalewicz",
)
PROBLEM_KINDS = ("quadratic", "bowl2d", *TEST_FUNCTIONS, "logistic", "softmax", "mlp-sigmoid", "mlp-relu")
"""Every kind of problem of the paper's set (what the family draws by default)."""

LARGE_DATA_KINDS = ("softmax-large", "mlp-sigmoid-large", "mlp-relu-large")
"""Classifiers on many examples, always minibatched (drawn only when named in ``kinds``)."""

MEMORIZE_KINDS = ("mlp-sigmoid-memorize", "mlp-relu-memorize")
"""MLPs fitting random labels, always minibatched (drawn only when named in ``kinds``)."""

WIDE_DATA_KINDS = ("softmax-wide", "mlp-sigmoid-wide", "mlp-relu-wide")
"""Classifiers on wide, sparse, non-negative image-like inputs, always minibatched (drawn only
when named in ``kinds``)."""

ALL_KINDS = (*PROBLEM_KINDS, *LARGE_DATA_KINDS, *MEMORIZE_KINDS, *WIDE_DATA_KINDS)

TRANSFORMS = ("rescale", "sparse", "noisy")
"""The transforms that can be applied on top of a problem."""

DEFAULT_TRANSFORM_PROBS: Mapping[str, float] = {"rescale": 0.2, "sparse": 0.2, "noisy": 0.2}

# Search domains the random starting points are drawn from (per coordinate: low, high).
FUNCTION_DOMAINS: Mapping[str, tuple[tuple[float, float], ...]] = {
    "rosenbrock": ((-2.0, 2.0), (-1.0, 3.0)),
    "beale": ((-4.5, 4.5), (-4.5, 4.5)),
    "booth": ((-10.0, 10.0), (-10.0, 10.0)),
    "matyas": ((-10.0, 10.0), (-10.0, 10.0)),
    "styblinski-tang": ((-5.0, 5.0),),  # the same for every coordinate
    "ackley": ((-5.0, 5.0), (-5.0, 5.0)),
    "branin": ((-5.0, 10.0), (0.0, 15.0)),
    "michalewicz": ((0.0, math.pi), (0.0, math.pi)),
}

# Known minimisers (used by the tests and documentation).
STYBLINSKI_TANG_ARGMIN = -2.903534027771177  # root of 4x³ − 32x + 5 = 0, per coordinate
_STYBLINSKI_TANG_MIN_1D = -39.16616570377142  # (x⁴ − 16x² + 5x) / 2 at the root
BRANIN_MIN = 5 / (4 * math.pi)  # = 0.397887..., at (−π, 12.275), (π, 2.275), (9.42478, 2.475)
# max over [0, π] of sin(x)·sin²⁰(x²/π) (at x = 2.2029055); the second coordinate's term reaches
# exactly 1 at π/2, so the 2-D minimum is −1.8013034.
_MICHALEWICZ_MAX_1 = 0.8013034100985525
MICHALEWICZ_MIN = -1.0 - _MICHALEWICZ_MAX_1
MICHALEWICZ_ARGMIN = (2.2029055201726093, math.pi / 2)
# Outside [0, π] the Michalewicz terms can exceed the in-domain optimum (e.g. near x = −4.97),
# which would make the shifted loss negative; a stiff quadratic wall keeps it ≥ 0 everywhere.
_MICHALEWICZ_WALL = 10.0

QUADRATIC_DIMS = (2, 20)
QUADRATIC_MAX_CONDITION = 100.0  # of W; the Hessian WᵀW gets its square
BOWL_AXIS_SCALES = (0.1, 10.0)
STYBLINSKI_TANG_DIMS = (2, 10)
DATA_DIMS = (2, 20)
DATA_TRAIN_SIZES = (32, 512)
DATA_TEST_SIZE = 256
SOFTMAX_CLASSES = (3, 10)
MLP_CLASSES = (2, 5)
MLP_HIDDEN = (4, 32)
MLP_DEPTHS = (1, 2)
BATCH_SIZES = (8, 16, 32, 64, 128)
LARGE_DATA_DIMS = (16, 64)
LARGE_DATA_TRAIN_SIZES = (4096, 16384)
LARGE_DATA_TEST_SIZE = 1024
LARGE_CLASSES = (2, 10)
LARGE_MLP_HIDDEN = (32, 128)
LARGE_TEACHER_HIDDEN = 32
LARGE_BATCH_SIZES = (16, 32, 64, 128)
MEMORIZE_DATA_DIMS = (8, 32)
MEMORIZE_TRAIN_SIZES = (512, 4096)
MEMORIZE_HIDDEN = (32, 128)
MEMORIZE_BATCH_SIZES = (32, 64, 128)
WIDE_DATA_DIMS = (128, 1024)
WIDE_DATA_TRAIN_SIZES = (2048, 8192)
WIDE_MLP_HIDDEN = (8, 32)
WIDE_ACTIVE_FRACTION = (0.1, 0.5)
WIDE_DATA_RANK = 16
RESCALE_RANGE = (1e-2, 1e2)
SPARSE_KEEP = (0.1, 0.9)
# Noise standard deviation relative to the RMS of the clean initial gradient: the gradient
# scale varies over many orders of magnitude between problems, a fixed one would be meaningless.
NOISE_RELATIVE = (0.01, 1.0)
# Per-batch perturbation seeds are stored in float inputs: below 2**24 they are exact in float32.
_SEED_LIMIT = 2**24
NO_PERTURBATION = -1.0


# ----------------------------------------------------------------------------- the functions


def _rosenbrock(t: Tensor) -> Tensor:
    x, y = t[0], t[1]
    return (1 - x) ** 2 + 100 * (y - x**2) ** 2


def _beale(t: Tensor) -> Tensor:
    x, y = t[0], t[1]
    return (1.5 - x + x * y) ** 2 + (2.25 - x + x * y**2) ** 2 + (2.625 - x + x * y**3) ** 2


def _booth(t: Tensor) -> Tensor:
    x, y = t[0], t[1]
    return (x + 2 * y - 7) ** 2 + (2 * x + y - 5) ** 2


def _matyas(t: Tensor) -> Tensor:
    x, y = t[0], t[1]
    return 0.26 * (x**2 + y**2) - 0.48 * x * y


def _styblinski_tang(t: Tensor) -> Tensor:
    # Shifted per coordinate (not by d·min at the end) so the sum has no cancellation.
    return ((t**4 - 16 * t**2 + 5 * t) / 2 - _STYBLINSKI_TANG_MIN_1D).sum()


def _ackley(t: Tensor) -> Tensor:
    # The tiny constant keeps sqrt differentiable at the minimum (its gradient is inf at 0).
    radius = torch.sqrt(0.5 * (t**2).sum() + 1e-30)
    waves = torch.cos(2 * math.pi * t).mean()
    return -20 * torch.exp(-0.2 * radius) - torch.exp(waves) + math.e + 20


def _branin(t: Tensor) -> Tensor:
    x, y = t[0], t[1]
    b, c, r, s, u = 5.1 / (4 * math.pi**2), 5 / math.pi, 6.0, 10.0, 1 / (8 * math.pi)
    return (y - b * x**2 + c * x - r) ** 2 + s * (1 - u) * torch.cos(x) + s - BRANIN_MIN


def _michalewicz(t: Tensor) -> Tensor:
    i = torch.arange(1, t.numel() + 1, dtype=t.dtype)
    value = -(torch.sin(t) * torch.sin(i * t**2 / math.pi) ** 20).sum() - MICHALEWICZ_MIN
    wall = (torch.relu(-t) ** 2 + torch.relu(t - math.pi) ** 2).sum()
    return value + _MICHALEWICZ_WALL * wall


_FUNCTIONS: Mapping[str, Callable[[Tensor], Tensor]] = {
    "rosenbrock": _rosenbrock,
    "beale": _beale,
    "booth": _booth,
    "matyas": _matyas,
    "styblinski-tang": _styblinski_tang,
    "ackley": _ackley,
    "branin": _branin,
    "michalewicz": _michalewicz,
}


def evaluate_function(name: str, theta: Tensor) -> Tensor:
    """The named test function at ``theta``, shifted so its minimum is 0 (shape ``(1,)``).

    Computed in float64: the shifts subtract constants of order 1..100 from values that are
    near 0 at the optimum, which float32 could not resolve to 1e-6.
    """
    return _FUNCTIONS[name](theta.double()).to(theta.dtype).reshape(1)


# ----------------------------------------------------------------------------- problem bodies
# A body maps the (already transformed) parameter tensors and the data columns of the inputs
# to what the loss takes. They are module-level functions (bound with partial) so models pickle.


def _function_body(name: str, params: Sequence[Tensor], data: Tensor) -> Tensor:
    return evaluate_function(name, params[0])


def _quadratic_body(params: Sequence[Tensor], data: Tensor) -> Tensor:
    return data @ params[0]


def _mlp_body(act: str, squeeze: bool, params: Sequence[Tensor], data: Tensor) -> Tensor:
    hidden = data
    n_layers = len(params) // 2
    for i in range(n_layers):
        hidden = F.linear(hidden, params[2 * i], params[2 * i + 1])
        if i < n_layers - 1:
            hidden = torch.sigmoid(hidden) if act == "sigmoid" else torch.relu(hidden)
    return hidden.squeeze(-1) if squeeze else hidden


# ----------------------------------------------------------------------------- losses


def shifted_value_loss(output: Tensor, target: Tensor) -> Tensor:
    """Loss of the test functions: their (already shifted) value plus :data:`EPS`; ``target`` is unused."""
    return output.sum() + EPS


def sum_of_squares_loss(output: Tensor, target: Tensor) -> Tensor:
    """``||output − target||² + EPS`` (quadratics and bowls)."""
    return (output - target).pow(2).sum() + EPS


def binary_cross_entropy_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean binary cross-entropy from logits, plus :data:`EPS`."""
    return F.binary_cross_entropy_with_logits(logits, labels) + EPS


def cross_entropy_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean softmax cross-entropy, plus :data:`EPS`."""
    return F.cross_entropy(logits, labels) + EPS


def _scaled_loss(base: Callable[[Tensor, Tensor], Tensor], factor: float, output: Tensor, target: Tensor) -> Tensor:
    return factor * base(output, target)


# ----------------------------------------------------------------------------- the model


class _AddGradientNoise(torch.autograd.Function):
    """Identity in the forward pass; adds ``noise`` to the incoming gradient in the backward pass.

    Equivalent to adding the zero-valued term ``(noise · (θ − θ.detach())).sum()`` to the loss,
    which the model cannot do since it returns the problem's output, not the loss. The loss value
    stays exactly the clean one, and the backward is linear so second-order meta-gradients work.
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, theta: Tensor, noise: Tensor) -> Tensor:
        ctx.save_for_backward(noise)
        return theta.clone()

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple[Tensor, None]:
        (noise,) = ctx.saved_tensors
        return grad + noise, None


class ProblemModel(nn.Module):
    """One problem-set instance as a module: its parameters are the optimisation variables.

    ``forward(inputs)`` takes the batch inputs (data columns plus the perturbation-seed column,
    see the module docstring) and returns what the instance's loss takes. Gradient path from
    the parameters ``φ`` to the problem: sparse mask, then gradient noise, then ``θ = s·φ``, so
    the optimiser sees ``mask · (s·∇f(θ) + noise)``: sparse stays sparse when noise is added.

    Args:
        body: ``body(params, data) -> output``, the problem in terms of ``θ``.
        init: initial ``θ`` by parameter name (kept in this order).
        scale: the ``rescale`` factor ``s`` (the stored parameters are ``θ0 / s``).
        keep_prob: probability that a coordinate is in a batch's sparse mask; None: not sparse.
        noise_std: standard deviation of the gradient noise (w.r.t. the stored parameters).
        salt: mixed into every batch's perturbation seed so instances do not share masks.
    """

    def __init__(
        self,
        body: Callable[[Sequence[Tensor], Tensor], Tensor],
        init: Mapping[str, Tensor],
        *,
        scale: float = 1.0,
        keep_prob: float | None = None,
        noise_std: float = 0.0,
        salt: int = 0,
    ) -> None:
        super().__init__()
        self.body = body
        self.param_names = tuple(init)
        for name, value in init.items():
            self.register_parameter(name, nn.Parameter(value.detach().clone() / scale))
        self.scale = scale
        self.keep_prob = keep_prob
        self.noise_std = noise_std
        self.salt = salt

    @property
    def perturbed(self) -> bool:
        """Whether batches carry a sparse mask or gradient noise."""
        return self.keep_prob is not None or self.noise_std > 0

    def perturbation(self, inputs: Tensor) -> tuple[list[Tensor] | None, list[Tensor] | None]:
        """The sparse masks (bool) and gradient noises of a batch, one per parameter, or None
        for a transform that is off or a batch without perturbation (negative seed)."""
        seed = int(inputs[0, -1].item())
        if seed < 0 or not self.perturbed:
            return None, None
        gen = torch.Generator().manual_seed(self.salt + seed)
        params = [getattr(self, name) for name in self.param_names]
        masks = noises = None
        if self.keep_prob is not None:
            masks = [(torch.rand(p.shape, generator=gen) < self.keep_prob).to(p.device) for p in params]
        if self.noise_std > 0:
            noises = [(self.noise_std * torch.randn(p.shape, generator=gen)).to(p.device, p.dtype) for p in params]
        return masks, noises

    def forward(self, inputs: Tensor) -> Tensor:
        """The problem's output for ``inputs`` (data columns + perturbation-seed column)."""
        params = [getattr(self, name) for name in self.param_names]
        if self.perturbed:
            masks, noises = self.perturbation(inputs)
            if masks is not None:
                # Same value; gradient only through the masked coordinates.
                params = [torch.where(m, p, p.detach()) for p, m in zip(params, masks, strict=True)]
            if noises is not None:
                params = [_AddGradientNoise.apply(p, n) for p, n in zip(params, noises, strict=True)]
        if self.scale != 1.0:
            params = [self.scale * p for p in params]
        return self.body(params, inputs[:, :-1])


# ----------------------------------------------------------------------------- sampling helpers


def _uniform(gen: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=gen, dtype=torch.float64))


def _log_uniform(gen: torch.Generator, low: float, high: float) -> float:
    return math.exp(_uniform(gen, math.log(low), math.log(high)))


def _int(gen: torch.Generator, low: int, high: int) -> int:
    """Uniform integer in ``[low, high]`` (inclusive)."""
    return int(torch.randint(low, high + 1, (), generator=gen))


def _log_int(gen: torch.Generator, low: int, high: int) -> int:
    return min(high, max(low, round(_log_uniform(gen, low, high))))


def _with_seed_column(data: Tensor) -> Tensor:
    return torch.cat([data, data.new_full((data.shape[0], 1), NO_PERTURBATION)], dim=1)


def _random_orthogonal(dim: int, gen: torch.Generator) -> Tensor:
    q, r = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
    # Fixing the signs makes Q Haar-distributed rather than biased by the QR convention.
    return q * torch.sign(torch.diagonal(r))


@dataclass
class _Problem:
    """A drawn base problem before transforms."""

    label: str
    body: Callable[[Sequence[Tensor], Tensor], Tensor]
    init: dict[str, Tensor]
    loss: Callable[[Tensor, Tensor], Tensor]
    train: Batch  # inputs with the seed column
    test: Batch | None = None
    batch_size: int | None = None  # None: every batch is the whole training set


def _quadratic(gen: torch.Generator) -> _Problem:
    dim = _int(gen, *QUADRATIC_DIMS)
    condition = _log_uniform(gen, 1.0, QUADRATIC_MAX_CONDITION)
    # Singular values log-uniform in [1/condition, 1], the extremes pinned so cond(W) is exact.
    logs = torch.rand(dim, generator=gen, dtype=torch.float64) * -math.log(condition)
    logs[0], logs[-1] = 0.0, -math.log(condition)
    weights = _random_orthogonal(dim, gen) @ torch.diag(logs.exp()) @ _random_orthogonal(dim, gen).T
    target = torch.randn(dim, generator=gen)
    theta0 = torch.randn(dim, generator=gen)
    return _Problem(
        label=f"quadratic(d={dim} cond={condition:.3g})",
        body=_quadratic_body,
        init={"theta": theta0},
        loss=sum_of_squares_loss,
        train=(_with_seed_column(weights.float()), target),
    )


def _bowl2d(gen: torch.Generator) -> _Problem:
    # f(θ) = Σ c_i ((Rθ)_i)², a quadratic with W = diag(√c) R and y = 0.
    scales = torch.tensor([_log_uniform(gen, *BOWL_AXIS_SCALES) for _ in range(2)], dtype=torch.float64)
    angle = _uniform(gen, 0.0, math.pi)
    rotation = torch.tensor(
        [[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]], dtype=torch.float64
    )
    weights = torch.diag(scales.sqrt()) @ rotation
    theta0 = torch.randn(2, generator=gen)
    return _Problem(
        label=f"bowl2d(scales={scales[0]:.3g}/{scales[1]:.3g} angle={angle:.2f})",
        body=_quadratic_body,
        init={"theta": theta0},
        loss=sum_of_squares_loss,
        train=(_with_seed_column(weights.float()), torch.zeros(2)),
    )


def _function(name: str, gen: torch.Generator) -> _Problem:
    domain = FUNCTION_DOMAINS[name]
    label = name
    if name == "styblinski-tang":
        dim = _int(gen, *STYBLINSKI_TANG_DIMS)
        domain = domain * dim
        label = f"{name}(d={dim})"
    theta0 = torch.tensor([_uniform(gen, low, high) for low, high in domain], dtype=torch.float32)
    return _Problem(
        label=label,
        body=partial(_function_body, name),
        init={"theta": theta0},
        loss=shifted_value_loss,
        # No data: the inputs are just the seed column; the target is the (shifted) minimum.
        train=(torch.full((1, 1), NO_PERTURBATION), torch.zeros(1)),
    )


def _classification_data(
    gen: torch.Generator, n: int, dim: int, classes: int, teacher_hidden: int | None
) -> tuple[Tensor, Tensor, str]:
    """``n`` examples: features ``(n, dim)`` and int64 labels in ``[0, classes)``."""
    if _uniform(gen, 0.0, 1.0) < 0.5:
        spread = _uniform(gen, 0.5, 2.5)
        centers = spread * torch.randn(classes, dim, generator=gen)
        labels = torch.randint(classes, (n,), generator=gen)
        return centers[labels] + torch.randn(n, dim, generator=gen), labels, "clusters"
    inputs = torch.randn(n, dim, generator=gen)
    return inputs, _teacher_labels(gen, inputs, classes, teacher_hidden), "teacher"


def _teacher_labels(gen: torch.Generator, inputs: Tensor, classes: int, teacher_hidden: int | None) -> Tensor:
    """Labels of zero-mean ``inputs`` from a random linear or one-hidden-layer ReLU teacher."""
    n, dim = inputs.shape
    if teacher_hidden is None:
        logits = inputs @ torch.randn(dim, classes, generator=gen) / math.sqrt(dim)
    else:
        w1 = torch.randn(dim, teacher_hidden, generator=gen) / math.sqrt(dim)
        w2 = torch.randn(teacher_hidden, classes, generator=gen) * math.sqrt(2.0 / teacher_hidden)
        logits = torch.relu(inputs @ w1) @ w2
    # Labels sampled from softmax(β·logits) (Gumbel-max): large β gives nearly separable data.
    sharpness = _log_uniform(gen, 1.0, 10.0)
    gumbel = -torch.log(-torch.log(torch.rand(n, classes, generator=gen).clamp_min(1e-12)))
    return (sharpness * logits / logits.std().clamp_min(1e-6) + gumbel).argmax(dim=1)


def _image_like_data(gen: torch.Generator, n: int, dim: int, classes: int) -> tuple[Tensor, Tensor]:
    """``n`` wide inputs like pixels or bag-of-words counts, and teacher labels.

    Non-negative, sparse (a random fraction of the features is non-zero in each example) and
    correlated (a low-rank latent plus noise, thresholded). Unlike zero-mean inputs, these add up
    coherently in a first layer: the same per-coordinate step moves a unit's pre-activation
    by ~``dim`` times the step rather than ~``sqrt(dim)``, so a step size that suits a narrow
    network overshoots here, as it does on MNIST.
    """
    basis = torch.randn(WIDE_DATA_RANK, dim, generator=gen)
    latent = torch.randn(n, WIDE_DATA_RANK, generator=gen) @ basis / math.sqrt(WIDE_DATA_RANK)
    z = (0.8 * latent + 0.6 * torch.randn(n, dim, generator=gen)).clamp(-6, 6)  # unit variance
    active = _uniform(gen, *WIDE_ACTIVE_FRACTION)
    threshold = math.sqrt(2.0) * torch.erfinv(torch.tensor(1.0 - 2.0 * active)).item()
    inputs = (torch.relu(z - threshold) / 2).clamp(max=1.0)
    labels = _teacher_labels(gen, inputs - inputs.mean(0), classes, LARGE_TEACHER_HIDDEN)
    return inputs, labels


def _mlp_problem(
    label: str,
    source: str,
    seed: int,
    sizes: tuple[int, ...],
    act: str,
    inputs: Tensor,
    labels: Tensor,
    n_train: int,
    batch_size: int | None,
) -> _Problem:
    """An MLP with layer ``sizes`` classifying ``inputs`` (the first ``n_train`` rows train, the
    rest test); one output unit means logistic regression on 0/1 labels."""
    binary = sizes[-1] == 1
    # PyTorch's default initialisation, reproducible and without touching the global RNG.
    net = seeded_module(seed, partial(mlp, sizes, act))
    init = {f"{'w' if p.ndim == 2 else 'b'}{i // 2}": p.detach() for i, p in enumerate(net.parameters())}
    targets = labels.float() if binary else labels
    inputs = _with_seed_column(inputs)
    shape = "-".join(map(str, sizes))
    return _Problem(
        label=f"{label}({shape} {source} n={n_train} bs={batch_size or 'full'})",
        body=partial(_mlp_body, act, binary),
        init=init,
        loss=binary_cross_entropy_loss if binary else cross_entropy_loss,
        train=(inputs[:n_train], targets[:n_train]),
        test=(inputs[n_train:], targets[n_train:]),
        batch_size=batch_size,
    )


def _memorizer(kind: str, gen: torch.Generator, seed: int) -> _Problem:
    """An MLP fitting labels drawn independently of the inputs (the test split too)."""
    dim = _int(gen, *MEMORIZE_DATA_DIMS)
    n_train = _log_int(gen, *MEMORIZE_TRAIN_SIZES)
    classes = _int(gen, *LARGE_CLASSES)
    hidden = tuple(_log_int(gen, *MEMORIZE_HIDDEN) for _ in range(_int(gen, *MLP_DEPTHS)))
    act = kind.removeprefix("mlp-").removesuffix("-memorize")
    batch_size = choose(list(MEMORIZE_BATCH_SIZES), gen)
    n = n_train + DATA_TEST_SIZE
    inputs = torch.randn(n, dim, generator=gen)
    labels = torch.randint(classes, (n,), generator=gen)
    sizes = (dim, *hidden, classes)
    return _mlp_problem(kind, "random labels", seed, sizes, act, inputs, labels, n_train, batch_size)


def _hidden_layers(gen: torch.Generator, kind: str, widths: tuple[int, int]) -> tuple[tuple[int, ...], str]:
    """Hidden widths (log-uniform in ``widths``, one or two layers) and activation of a ``softmax``
    (none) or ``mlp-<activation>`` classifier."""
    if kind == "softmax":
        return (), "relu"
    return tuple(_log_int(gen, *widths) for _ in range(_int(gen, *MLP_DEPTHS))), kind.removeprefix("mlp-")


def _wide_classifier(kind: str, gen: torch.Generator, seed: int) -> _Problem:
    """A classifier on image-like inputs of 128..1024 features (see :func:`_image_like_data`)."""
    kind_base = kind.removesuffix("-wide")
    dim = _log_int(gen, *WIDE_DATA_DIMS)
    n_train = _log_int(gen, *WIDE_DATA_TRAIN_SIZES)
    classes = _int(gen, *LARGE_CLASSES)
    hidden, act = _hidden_layers(gen, kind_base, WIDE_MLP_HIDDEN)
    batch_size = choose(list(LARGE_BATCH_SIZES), gen)
    inputs, labels = _image_like_data(gen, n_train + LARGE_DATA_TEST_SIZE, dim, classes)
    sizes = (dim, *hidden, classes)
    return _mlp_problem(kind, "image-like", seed, sizes, act, inputs, labels, n_train, batch_size)


def _classifier(kind: str, gen: torch.Generator, seed: int) -> _Problem:
    label = kind
    large = kind.endswith("-large")
    if large:
        kind = kind.removesuffix("-large")
        dim = _int(gen, *LARGE_DATA_DIMS)
        n_train = _log_int(gen, *LARGE_DATA_TRAIN_SIZES)
        n_test = LARGE_DATA_TEST_SIZE
        classes = _int(gen, *LARGE_CLASSES)
        hidden, act = _hidden_layers(gen, kind, LARGE_MLP_HIDDEN)
        teacher_hidden = LARGE_TEACHER_HIDDEN
        batch_size: int | None = choose(list(LARGE_BATCH_SIZES), gen)
    else:
        dim = _int(gen, *DATA_DIMS)
        n_train = _log_int(gen, *DATA_TRAIN_SIZES)
        n_test = DATA_TEST_SIZE
        if kind == "logistic":
            classes, hidden, act = 2, (), "relu"
        elif kind == "softmax":
            classes, hidden, act = _int(gen, *SOFTMAX_CLASSES), (), "relu"
        else:
            classes = _int(gen, *MLP_CLASSES)
            hidden = tuple(_int(gen, *MLP_HIDDEN) for _ in range(_int(gen, *MLP_DEPTHS)))
            act = kind.removeprefix("mlp-")
        teacher_hidden = 16 if hidden else None
        batch_size = None
    inputs, labels, source = _classification_data(gen, n_train + n_test, dim, classes, teacher_hidden)
    if not large:
        # Drawn after the data, as always, so that seeds keep giving the same problems.
        batch_size = None if _uniform(gen, 0.0, 1.0) < 0.5 else choose([b for b in BATCH_SIZES if b < n_train], gen)
    sizes = (dim, *hidden, 1 if kind == "logistic" else classes)
    return _mlp_problem(label, source, seed, sizes, act, inputs, labels, n_train, batch_size)


def _build(kind: str, gen: torch.Generator, seed: int) -> _Problem:
    if kind == "quadratic":
        return _quadratic(gen)
    if kind == "bowl2d":
        return _bowl2d(gen)
    if kind in _FUNCTIONS:
        return _function(kind, gen)
    if kind in MEMORIZE_KINDS:
        return _memorizer(kind, gen, seed)
    if kind in WIDE_DATA_KINDS:
        return _wide_classifier(kind, gen, seed)
    return _classifier(kind, gen, seed)


def _perturbed_batches(base: Iterator[Batch], gen: torch.Generator) -> Iterator[Batch]:
    """The batches of ``base`` with a fresh perturbation seed in the last input column."""
    for inputs, targets in base:
        # Copy: full-batch streams yield the same tensor every time.
        inputs = inputs.clone()
        inputs[:, -1] = float(torch.randint(_SEED_LIMIT, (), generator=gen))
        yield inputs, targets


def _initial_grad_rms(model: ProblemModel, loss: Callable[[Tensor, Tensor], Tensor], batch: Batch) -> float:
    with torch.enable_grad():
        params = list(model.parameters())
        grads = torch.autograd.grad(loss(model(batch[0]), batch[1]), params, allow_unused=True)
    flat = torch.cat([g.flatten() for g in grads if g is not None])
    value = float(flat.pow(2).mean().sqrt())
    return value if math.isfinite(value) else 0.0


# ----------------------------------------------------------------------------- the family


@dataclass(frozen=True)
class ProblemDraw:
    """What :meth:`ProblemSet.draw` picked for a seed: the problem kind and applied transforms."""

    kind: str
    transforms: tuple[str, ...] = ()


class ProblemSet(TaskFamily):
    """The Wichrowska et al. (2017) meta-training problem set (see the module docstring).

    Each instance draws a problem kind (with the given weights) and applies each transform
    independently with its probability; everything is determined by the seed. Instances have
    at most ~2,000 parameters. ``instance.name`` reads e.g. ``problem-set[rosenbrock,sparse]``
    (kinds with random sizes show them in parentheses).

    Args:
        kinds: the problem kinds to draw from (:data:`ALL_KINDS`), uniformly; or a mapping
            kind -> relative weight. None: all kinds, uniformly.
        transform_probs: probability of each transform (:data:`TRANSFORMS`); transforms missing
            from a mapping are never applied. A single number applies to every transform.
            None: :data:`DEFAULT_TRANSFORM_PROBS`.
        name: label used in reports.
    """

    def __init__(
        self,
        kinds: Sequence[str] | Mapping[str, float] | None = None,
        transform_probs: Mapping[str, float] | float | None = None,
        *,
        name: str = "problem-set",
    ) -> None:
        if kinds is None:
            kinds = PROBLEM_KINDS
        if isinstance(kinds, str):
            kinds = (kinds,)
        weights = dict(kinds) if isinstance(kinds, Mapping) else dict.fromkeys(kinds, 1.0)
        unknown = sorted(set(weights) - set(ALL_KINDS))
        if unknown:
            raise ValueError(f"unknown problem kinds {unknown}; choose from {', '.join(ALL_KINDS)}")
        if not weights or any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
            raise ValueError(f"kinds needs at least one kind with positive weight, got {weights}")
        if transform_probs is None:
            transform_probs = DEFAULT_TRANSFORM_PROBS
        if isinstance(transform_probs, (int, float)):
            transform_probs = dict.fromkeys(TRANSFORMS, float(transform_probs))
        unknown = sorted(set(transform_probs) - set(TRANSFORMS))
        if unknown:
            raise ValueError(f"unknown transforms {unknown}; choose from {', '.join(TRANSFORMS)}")
        probs = {t: float(transform_probs.get(t, 0.0)) for t in TRANSFORMS}
        if any(not 0.0 <= p <= 1.0 for p in probs.values()):
            raise ValueError(f"transform probabilities must lie in [0, 1], got {probs}")
        self.kind_weights = {k: float(w) for k, w in weights.items() if w > 0}
        self.transform_probs = probs
        self.name = name

    def draw(self, seed: int) -> ProblemDraw:
        """The problem kind and transforms instance ``seed`` gets (cheap; builds nothing)."""
        gen = generator(seed, "problem-set/draw")
        kinds = list(self.kind_weights)
        weights = torch.tensor([self.kind_weights[k] for k in kinds], dtype=torch.float64)
        kind = kinds[int(torch.multinomial(weights, 1, generator=gen))]
        # One uniform per transform whatever its probability, so changing one probability does
        # not reshuffle the other draws of a seed.
        uniforms = torch.rand(len(TRANSFORMS), generator=gen, dtype=torch.float64).tolist()
        transforms = tuple(t for t, u in zip(TRANSFORMS, uniforms, strict=True) if u < self.transform_probs[t])
        return ProblemDraw(kind, transforms)

    def sample(self, seed: int) -> TaskInstance:
        """The problem instance for ``seed``."""
        drawn = self.draw(seed)
        problem = _build(drawn.kind, generator(seed, f"problem-set/{drawn.kind}"), seed)
        tgen = generator(seed, "problem-set/transforms")
        scale, loss, labels = 1.0, problem.loss, [problem.label]
        keep_prob = None
        if "rescale" in drawn.transforms:
            factor = _log_uniform(tgen, *RESCALE_RANGE)
            # Half the time the parameters are rescaled, half the time the loss.
            if _uniform(tgen, 0.0, 1.0) < 0.5:
                scale = factor
                labels.append(f"rescale(params s={factor:.3g})")
            else:
                loss = partial(_scaled_loss, problem.loss, factor)
                labels.append(f"rescale(loss s={factor:.3g})")
        if "sparse" in drawn.transforms:
            keep_prob = _uniform(tgen, *SPARSE_KEEP)
            labels.append(f"sparse(p={keep_prob:.2f})")
        model = ProblemModel(
            problem.body,
            problem.init,
            scale=scale,
            keep_prob=keep_prob,
            salt=derive_seed(seed, "problem-set/perturbation") % 2**40,
        )
        if "noisy" in drawn.transforms:
            relative = _log_uniform(tgen, *NOISE_RELATIVE)
            model.noise_std = relative * _initial_grad_rms(model, loss, problem.train)
            labels.append(f"noisy(r={relative:.2g})")
        train_x, train_y = problem.train
        batch_size = problem.batch_size or train_x.shape[0]
        batches: Iterator[Batch] = minibatches(train_x, train_y, batch_size, generator(seed, "batches"))
        if model.perturbed:
            batches = _perturbed_batches(batches, generator(seed, "problem-set/perturbation-seeds"))
        return TaskInstance(
            model=model,
            loss=loss,
            batches=batches,
            train_set=problem.train,
            test_set=problem.test,
            name=f"{self.name}[{','.join(labels)}]",
        )


register_task("problem-set", ProblemSet)
# The same problems with data-fitting ones (regressions, MLPs) drawn three times as often as
# each test function: the hierarchical RNN's default meta-training distribution.
NN_HEAVY_WEIGHTS = {
    kind: (3.0 if kind in ("logistic", "softmax", "mlp-sigmoid", "mlp-relu") else 1.0) for kind in PROBLEM_KINDS
}
register_task("problem-set-nn", partial(ProblemSet, kinds=NN_HEAVY_WEIGHTS, name="problem-set-nn"))
# Only the problems that fit data (plus quadratics), most of them minibatched: closer to
# training networks than the 2-D test functions, which can be solved to machine precision.
DATA_KINDS = ("quadratic", "logistic", "softmax", "mlp-sigmoid", "mlp-relu")
register_task("problem-set-data", partial(ProblemSet, kinds=DATA_KINDS, name="problem-set-data"))
# Classifiers that take thousands of noisy minibatch steps to fit (see the module docstring).
register_task("problem-set-large", partial(ProblemSet, kinds=LARGE_DATA_KINDS, name="problem-set-large"))
# The large-data classifiers plus random-label memorisation: long runs where some problems
# reach a noise floor (annealing pays) and others keep improving to zero (annealing stalls).
register_task(
    "problem-set-long", partial(ProblemSet, kinds=(*LARGE_DATA_KINDS, *MEMORIZE_KINDS), name="problem-set-long")
)
# problem-set-long plus the wide image-like classifiers, where a step size that suits narrow
# networks overshoots: the family that teaches a rule to bring too large a learning rate down.
register_task(
    "problem-set-wide",
    partial(ProblemSet, kinds=(*LARGE_DATA_KINDS, *MEMORIZE_KINDS, *WIDE_DATA_KINDS), name="problem-set-wide"),
)
