"""Helpers shared by the built-in task families (seeding, minibatching, MLPs)."""

from __future__ import annotations

import hashlib
import itertools
import numbers
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

import torch
from torch import Tensor, nn

T = TypeVar("T")

# Instance seed ranges: meta-training, validation and evaluation instances never share a seed.
TRAIN_SEEDS = (0, 10**8)
VALIDATION_SEED_BASE = 10**8
EVALUATION_SEED_BASE = 2 * 10**8

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "sigmoid": nn.Sigmoid,
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "softplus": nn.Softplus,
    "leaky_relu": nn.LeakyReLU,
}


def check_positive_ints(**values: object) -> None:
    """``ValueError`` naming the first of ``values`` that is not an integer >= 1 (a bool is not)."""
    for name, value in values.items():
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def derive_seed(seed: int, stream: str) -> int:
    """A 63-bit seed for one named random stream of an instance.

    Data, initialisation and batch order each get their own stream: a ``torch.Generator``
    and the global RNG seeded with the same number produce the same numbers, which would
    silently correlate e.g. the initial weights with the data.
    """
    digest = hashlib.sha256(f"{int(seed)}/{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def generator(seed: int, stream: str) -> torch.Generator:
    """A private CPU generator for the named stream of instance ``seed``."""
    return torch.Generator().manual_seed(derive_seed(seed, stream))


def seeded_module(seed: int, factory: Callable[[], nn.Module]) -> nn.Module:
    """Build a module with PyTorch's default initialisation, reproducibly and without
    disturbing the caller's global RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "init"))
        return factory()


def activation(name: str) -> nn.Module:
    """A fresh activation module by name (see :data:`ACTIVATIONS`)."""
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; choose from {', '.join(sorted(ACTIVATIONS))}") from None


def mlp(sizes: Sequence[int], act: str | Sequence[str]) -> nn.Sequential:
    """Fully connected network ``sizes[0] -> ... -> sizes[-1]``, activation after each hidden layer.

    ``act`` is one activation name for all hidden layers, or one name per hidden layer.
    """
    n_hidden = len(sizes) - 2
    acts = [act] * n_hidden if isinstance(act, str) else list(act)
    if len(acts) != n_hidden:
        raise ValueError(f"got {len(acts)} activations for {n_hidden} hidden layers")
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(fan_in, fan_out))
        if i < n_hidden:
            layers.append(activation(acts[i]))
    return nn.Sequential(*layers)


def minibatches(
    inputs: Tensor, targets: Tensor, batch_size: int, gen: torch.Generator
) -> Iterator[tuple[Tensor, Tensor]]:
    """Endless minibatches from preloaded tensors, reshuffled every epoch with ``gen``.

    The last partial batch of an epoch is dropped so every batch has the same shape.
    A ``batch_size`` of at least the number of examples gives the full set every step
    (no copying, no shuffling).
    """
    n = inputs.shape[0]
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if batch_size >= n:
        while True:
            yield inputs, targets
    while True:
        order = torch.randperm(n, generator=gen)
        for start in range(0, n - batch_size + 1, batch_size):
            idx = order[start : start + batch_size]
            yield inputs[idx], targets[idx]


def choose(options: Sequence[T], gen: torch.Generator) -> T:
    """One element of ``options``, uniformly, drawn with ``gen``."""
    if len(options) == 0:
        raise ValueError("cannot choose from an empty set of options")
    return options[int(torch.randint(len(options), (1,), generator=gen))]
