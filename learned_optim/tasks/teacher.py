"""Student-teacher regression: fit a random one-hidden-layer ReLU network with a fresh one."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from learned_optim.tasks import register_task
from learned_optim.tasks._common import check_positive_ints, generator, minibatches, mlp, seeded_module
from learned_optim.tasks.base import TaskFamily, TaskInstance


def teacher_targets(inputs: Tensor, hidden: int, output_dim: int, gen: torch.Generator) -> Tensor:
    """Outputs of a random ReLU network ``inputs -> hidden -> output_dim`` drawn with ``gen``.

    Weights are Gaussian with He-style variances (``1/fan_in`` into the ReLU layer,
    ``2/fan_in`` out of it), so for standard normal inputs the targets have a mean square of
    about 1 whatever the sizes (a variance of about 0.7: a ReLU network's outputs have a
    mean); PyTorch's default init would give much smaller targets.
    """
    dim = inputs.shape[1]
    w1 = torch.randn(hidden, dim, generator=gen) / math.sqrt(dim)
    b1 = 0.1 * torch.randn(hidden, generator=gen)
    w2 = torch.randn(output_dim, hidden, generator=gen) * math.sqrt(2.0 / hidden)
    return torch.relu(inputs @ w1.T + b1) @ w2.T


class TeacherFamily(TaskFamily):
    """Regression onto a random teacher network.

    Each instance draws standard normal inputs, a teacher ``input_dim -> hidden (ReLU) ->
    output_dim`` whose outputs are the targets (optionally with Gaussian noise on the
    training targets), and a freshly initialised student of the same shape. Loss: mean
    squared error. Minibatches come from a fixed training set, reshuffled every epoch.

    Args:
        input_dim: input dimension.
        hidden: hidden ReLU units of teacher and student.
        output_dim: output dimension.
        n_train: training examples.
        n_test: held-out examples (noise-free targets).
        batch_size: minibatch size (at least ``n_train`` means full batch).
        noise_std: standard deviation of the noise added to the training targets.
        name: label used in reports.
    """

    def __init__(
        self,
        input_dim: int = 10,
        hidden: int = 32,
        output_dim: int = 1,
        n_train: int = 1024,
        n_test: int = 512,
        batch_size: int = 64,
        noise_std: float = 0.0,
        name: str = "teacher",
    ) -> None:
        check_positive_ints(
            input_dim=input_dim, hidden=hidden, output_dim=output_dim, n_train=n_train, n_test=n_test,
            batch_size=batch_size,
        )  # fmt: skip
        if not 0 <= noise_std < math.inf:
            raise ValueError(f"noise_std must be finite and non-negative, got {noise_std}")
        self.input_dim = input_dim
        self.hidden = hidden
        self.output_dim = output_dim
        self.n_train = n_train
        self.n_test = n_test
        self.batch_size = batch_size
        self.noise_std = noise_std
        self.name = name

    def sample(self, seed: int) -> TaskInstance:
        """The student-teacher instance for ``seed``."""
        gen = generator(seed, "teacher")
        inputs = torch.randn(self.n_train + self.n_test, self.input_dim, generator=gen)
        targets = teacher_targets(inputs, self.hidden, self.output_dim, gen)
        train_x, test_x = inputs[: self.n_train], inputs[self.n_train :]
        train_y, test_y = targets[: self.n_train], targets[self.n_train :]
        if self.noise_std:
            train_y = train_y + self.noise_std * torch.randn(train_y.shape, generator=gen)
        sizes = (self.input_dim, self.hidden, self.output_dim)
        return TaskInstance(
            model=seeded_module(seed, lambda: mlp(sizes, "relu")),
            loss=nn.functional.mse_loss,
            batches=minibatches(train_x, train_y, self.batch_size, generator(seed, "batches")),
            train_set=(train_x, train_y),
            test_set=(test_x, test_y),
            name=f"{self.name}[{'-'.join(map(str, sizes))}]",
        )


register_task("teacher", TeacherFamily)
