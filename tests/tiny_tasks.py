"""Tiny task families for the meta_fit / compare / CLI tests.

pytest puts ``tests/`` on ``sys.path``, so the CLI can load these as ``--task tiny_tasks:tiny``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from learned_optim.tasks import Task

_W = torch.tensor([[0.5], [-1.0], [0.25]])


def target(x: Tensor) -> Tensor:
    """The function the tiny regression learns."""
    return 2.0 * torch.tanh(x @ _W)


def tiny_model() -> nn.Module:
    """A plain user module: Linear -> Tanh -> Linear."""
    return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))


def tiny_sampler(generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """A fresh minibatch of 16 examples per call (so the data position matters)."""
    x = torch.randn(16, 3, generator=generator)
    return x, target(x)


_gen = torch.Generator().manual_seed(1234)
TRAIN_X = torch.randn(128, 3, generator=_gen)
TRAIN_Y = target(TRAIN_X)
TEST_X = torch.randn(64, 3, generator=_gen)
TEST_Y = target(TEST_X)


def tiny_loader() -> DataLoader:
    """A shuffled DataLoader over the fixed training split."""
    return DataLoader(TensorDataset(TRAIN_X, TRAIN_Y), batch_size=16, shuffle=True)


def make_tiny(name: str = "tiny", model: Callable[[], nn.Module] = tiny_model, data: object = tiny_sampler) -> Task:
    """The tiny regression task (MSE) with whole train/test splits for evaluation."""
    return Task(
        model=model,
        loss=nn.functional.mse_loss,
        data=data,
        train_set=(TRAIN_X, TRAIN_Y),
        test_set=(TEST_X, TEST_Y),
        name=name,
    )


# Module-level TaskFamily for the CLI (``--task tiny_tasks:tiny``).
tiny = make_tiny()


class Counter:
    """Wraps a model factory and counts its calls (i.e. how many instances were built)."""

    def __init__(self, factory: Callable[[], nn.Module] = tiny_model) -> None:
        self.factory = factory
        self.calls = 0

    def __call__(self) -> nn.Module:
        self.calls += 1
        return self.factory()


class Theta(nn.Module):
    """A model that is just a parameter vector; ``forward`` ignores its input and returns θ."""

    def __init__(self, dim: int = 4) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.randn(dim))

    def forward(self, inputs: Tensor) -> Tensor:
        return self.theta


def half_square(scale: float = 1.0, model: Callable[[], nn.Module] = Theta) -> Task:
    """``f(θ) = scale/2 · ||θ||²`` with deterministic (dummy) batches.

    SGD's step is ``θ ← (1 − lr·scale) θ``: the optimum is reached in one step at
    ``lr = 1/scale`` and the iteration diverges for ``lr > 2/scale``.
    """
    dummy = (torch.zeros(1), torch.zeros(1))

    def loss(output: Tensor, _target: Tensor) -> Tensor:
        return 0.5 * scale * output.pow(2).sum()

    return Task(model=model, loss=loss, data=[dummy], train_set=dummy, name=f"half-square-{scale:g}")
