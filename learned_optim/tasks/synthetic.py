"""Synthetic XOR-of-hyperplanes classification (after Tom Bosc, 2016, "Learning to learn
neural networks").

Each dataset has correlated Gaussian inputs ``x ~ N(0, A Aᵀ)`` with ``A`` uniform in
[-1, 1]; the label is the XOR of the sides of two random hyperplanes, each through a random
point of the input distribution. Inputs are then perturbed by Gaussian noise whose scale is
drawn per dataset from an exponential distribution, so some datasets are nearly separable
and others noisy. Datasets whose minority class is rarer than ``min_minority`` are redrawn.
The optimisee is an MLP with one hidden layer of 32 ReLU units and one sigmoid output,
trained with binary cross-entropy (computed from the logit for stability).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from learned_optim.tasks import register_task
from learned_optim.tasks._common import generator, minibatches, mlp, seeded_module
from learned_optim.tasks.base import TaskFamily, TaskInstance

Split = tuple[Tensor, Tensor]


@dataclass(frozen=True)
class XORDataset:
    """One generated dataset.

    Attributes:
        train: ``(inputs, labels)`` of the training part; inputs float32 ``(n_train, dim)``
            standardised with the training part's mean and std, labels float32 0/1 ``(n_train,)``.
        test: the held-out part, standardised with the training statistics.
        noise_scale: the drawn noise standard deviation, relative to each input feature's std.
        minority_fraction: fraction of the rarer class over the whole dataset.
        attempts: how many draws the class-balance rejection needed.
    """

    train: Split
    test: Split
    noise_scale: float
    minority_fraction: float
    attempts: int


def make_xor_dataset(
    seed: int,
    n_samples: int = 200,
    n_train: int = 100,
    dim: int = 10,
    noise_mean: float = 0.2,
    min_minority: float = 0.15,
    max_attempts: int = 1000,
) -> XORDataset:
    """Generate one XOR dataset, fully determined by ``seed``.

    Args:
        seed: determines the dataset.
        n_samples: total number of examples (training + held out).
        n_train: the first ``n_train`` examples form the training part, the rest the test part.
        dim: input dimension.
        noise_mean: mean of the exponential distribution of the noise scale; the noise added
            to a feature has standard deviation ``scale * std(feature)``. 0 disables noise.
        min_minority: datasets whose rarer class has a smaller fraction are redrawn.
        max_attempts: give up (ValueError) after this many rejected draws.
    """
    if not 2 <= n_train <= n_samples:
        raise ValueError(f"need 2 <= n_train <= n_samples, got n_train={n_train}, n_samples={n_samples}")
    _check_dataset_args(dim, noise_mean, min_minority)
    gen = generator(seed, "xor-data")
    attempts = 0
    while attempts < max_attempts:
        attempts += 1
        mixing = torch.rand(dim, dim, generator=gen, dtype=torch.float64) * 2 - 1
        clean = torch.randn(n_samples, dim, generator=gen, dtype=torch.float64) @ mixing.T
        normals = torch.randn(2, dim, generator=gen, dtype=torch.float64)
        # Anchoring each hyperplane at a draw from the input distribution gives it a random
        # offset that still cuts through the data cloud.
        anchors = torch.randn(2, dim, generator=gen, dtype=torch.float64) @ mixing.T
        sides = ((clean[:, None, :] - anchors) * normals).sum(-1) > 0
        labels = sides[:, 0] ^ sides[:, 1]
        positive = labels.double().mean().item()
        minority = min(positive, 1 - positive)
        train_labels = labels[:n_train]
        if minority >= min_minority and bool(train_labels.any()) and not bool(train_labels.all()):
            break
    else:  # the while condition failed: every draw was rejected
        raise ValueError(f"no dataset with minority fraction >= {min_minority} in {max_attempts} draws (seed {seed})")
    scale = 0.0
    if noise_mean > 0:
        scale = torch.empty((), dtype=torch.float64).exponential_(1 / noise_mean, generator=gen).item()
    noise = torch.randn(n_samples, dim, generator=gen, dtype=torch.float64)
    inputs = clean + scale * clean.std(0) * noise
    mean, std = inputs[:n_train].mean(0), inputs[:n_train].std(0).clamp_min(1e-12)
    inputs = ((inputs - mean) / std).to(torch.float32)
    targets = labels.to(torch.float32)
    return XORDataset(
        train=(inputs[:n_train], targets[:n_train]),
        test=(inputs[n_train:], targets[n_train:]),
        noise_scale=scale,
        minority_fraction=minority,
        attempts=attempts,
    )


def binary_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean binary cross-entropy of a sigmoid output, computed from its logit."""
    return nn.functional.binary_cross_entropy_with_logits(logits, labels)


def _check_dataset_args(dim: int, noise_mean: float, min_minority: float) -> None:
    if dim < 1:
        raise ValueError(f"dim must be positive, got {dim}")
    if not 0 <= noise_mean < math.inf:
        raise ValueError(f"noise_mean must be finite and non-negative, got {noise_mean}")
    if not 0 <= min_minority <= 0.5:
        raise ValueError(f"min_minority must be in [0, 0.5], got {min_minority}")


class XORFamily(TaskFamily):
    """XOR classification datasets (see the module docstring), one per instance.

    The model outputs one logit per example (shape ``(n,)``); ``sigmoid`` of it is the
    probability of class 1.

    Args:
        dim: input dimension.
        n_samples: examples per dataset (training + held out).
        train_size: number of training examples, or an inclusive range ``(low, high)`` from
            which each instance draws its split (the rest is the held-out split).
        hidden: hidden ReLU units of the MLP.
        batch_size: minibatch size; None trains full-batch.
        noise_mean: mean of the exponential distribution of the per-dataset noise scale.
        min_minority: minimum fraction of the rarer class (datasets are redrawn otherwise).
        name: label used in reports.
    """

    def __init__(
        self,
        dim: int = 10,
        n_samples: int = 200,
        train_size: int | tuple[int, int] = (50, 150),
        hidden: int = 32,
        batch_size: int | None = None,
        noise_mean: float = 0.2,
        min_minority: float = 0.15,
        name: str = "xor",
    ) -> None:
        low, high = (train_size, train_size) if isinstance(train_size, int) else train_size
        if not 2 <= low <= high < n_samples:  # at least one held-out example
            raise ValueError(f"train_size must lie in [2, n_samples - 1 = {n_samples - 1}], got {train_size}")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be positive or None, got {batch_size}")
        if hidden < 1:
            raise ValueError(f"hidden must be positive, got {hidden}")
        _check_dataset_args(dim, noise_mean, min_minority)
        self.dim = dim
        self.n_samples = n_samples
        self.train_size = (low, high)
        self.hidden = hidden
        self.batch_size = batch_size
        self.noise_mean = noise_mean
        self.min_minority = min_minority
        self.name = name

    def dataset(self, seed: int) -> XORDataset:
        """The dataset instance ``seed`` trains on."""
        low, high = self.train_size
        n_train = int(torch.randint(low, high + 1, (1,), generator=generator(seed, "xor-split")))
        return make_xor_dataset(
            seed,
            n_samples=self.n_samples,
            n_train=n_train,
            dim=self.dim,
            noise_mean=self.noise_mean,
            min_minority=self.min_minority,
        )

    def build(self) -> nn.Sequential:
        """A freshly initialised MLP ``dim -> hidden (ReLU) -> 1 logit`` (uses the global RNG)."""
        net = mlp((self.dim, self.hidden, 1), "relu")
        net.append(nn.Flatten(0))  # (n, 1) -> (n,), the shape of the labels
        return net

    def sample(self, seed: int) -> TaskInstance:
        """The XOR instance for ``seed``."""
        data = self.dataset(seed)
        train_x, train_y = data.train
        batch_size = self.batch_size or train_x.shape[0]
        return TaskInstance(
            model=seeded_module(seed, self.build),
            loss=binary_cross_entropy,
            batches=minibatches(train_x, train_y, batch_size, generator(seed, "batches")),
            train_set=data.train,
            test_set=data.test,
            name=f"{self.name}[n_train={train_x.shape[0]} noise={data.noise_scale:.3f}]",
        )


register_task("xor", XORFamily)
