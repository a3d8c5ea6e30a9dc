"""Random quadratics ``f(θ) = ||Wθ − y||²`` (Andrychowicz et al., 2016, "Learning to learn by
gradient descent by gradient descent")."""

from __future__ import annotations

import itertools

import torch
from torch import Tensor, nn

from learned_optim.tasks import register_task
from learned_optim.tasks._common import generator
from learned_optim.tasks.base import TaskFamily, TaskInstance


class QuadraticModel(nn.Module):
    """The optimisee of a quadratic: a single parameter vector θ; ``forward(W) = Wθ``."""

    def __init__(self, theta: Tensor) -> None:
        super().__init__()
        self.theta = nn.Parameter(theta)

    def forward(self, weights: Tensor) -> Tensor:
        """``W @ θ``."""
        return weights @ self.theta


def sum_of_squares(prediction: Tensor, target: Tensor) -> Tensor:
    """``||prediction − target||²`` (a sum, as in the paper, not a mean)."""
    return (prediction - target).pow(2).sum()


class QuadraticFamily(TaskFamily):
    """Deterministic quadratics: ``W`` (dim×dim), ``y`` and the start ``θ0`` are i.i.d.
    standard normal per instance; every "batch" is the same ``(W, y)``.

    Args:
        dim: size of θ (and of ``y``; ``W`` is square).
        name: label used in reports.
    """

    def __init__(self, dim: int = 10, name: str = "quadratic") -> None:
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
            raise ValueError(f"dim must be a positive integer, got {dim!r}")
        self.dim = dim
        self.name = name

    def sample(self, seed: int) -> TaskInstance:
        """The quadratic for ``seed``."""
        gen = generator(seed, "quadratic")
        weights = torch.randn(self.dim, self.dim, generator=gen)
        target = torch.randn(self.dim, generator=gen)
        theta0 = torch.randn(self.dim, generator=gen)
        return TaskInstance(
            model=QuadraticModel(theta0),
            loss=sum_of_squares,
            batches=itertools.repeat((weights, target)),
            train_set=(weights, target),
            test_set=None,
            name=f"{self.name}[dim={self.dim}]",
        )


register_task("quadratic", QuadraticFamily)
