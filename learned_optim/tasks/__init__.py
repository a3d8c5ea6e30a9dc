"""Task families: the problem classes rules are meta-trained and evaluated on."""

from __future__ import annotations

from collections.abc import Callable

from learned_optim.tasks._common import derive_seed
from learned_optim.tasks.base import (
    Batch,
    Task,
    TaskError,
    TaskFamily,
    TaskInstance,
    call_model,
    sample_instance,
    validate_instance,
)

# name -> zero-argument factory of a TaskFamily; filled by the modules below.
TASKS: dict[str, Callable[[], TaskFamily]] = {}


def register_task(name: str, factory: Callable[[], TaskFamily]) -> None:
    """Make a task family available by name (CLI ``--task``, ``get_task``)."""
    TASKS[name] = factory


def list_tasks() -> list[str]:
    """Names of the built-in task families."""
    return sorted(TASKS)


def get_task(name: str) -> TaskFamily:
    """The built-in task family called ``name``; ValueError listing the known names if none."""
    try:
        factory = TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; built-in tasks: {', '.join(list_tasks())}") from None
    return factory()


# The built-in families register themselves on import; imported last because they use
# register_task above.
from learned_optim.tasks.mnist import MLPVariations, MNISTConvFamily, MNISTMLPFamily, load_mnist, load_mnist_folder  # noqa: E402
from learned_optim.tasks.problem_set import ProblemModel, ProblemSet  # noqa: E402
from learned_optim.tasks.quadratic import QuadraticFamily  # noqa: E402
from learned_optim.tasks.scaled import LossScaled  # noqa: E402
from learned_optim.tasks.sequence import ReversalFamily, ReversalTransformer, SequenceMixFamily  # noqa: E402
from learned_optim.tasks.synthetic import XORDataset, XORFamily, make_xor_dataset  # noqa: E402
from learned_optim.tasks.teacher import TeacherFamily  # noqa: E402

__all__ = [
    "TASKS",
    "Batch",
    "LossScaled",
    "MLPVariations",
    "MNISTConvFamily",
    "MNISTMLPFamily",
    "ProblemModel",
    "ProblemSet",
    "QuadraticFamily",
    "ReversalFamily",
    "ReversalTransformer",
    "SequenceMixFamily",
    "Task",
    "TaskError",
    "TaskFamily",
    "TaskInstance",
    "TeacherFamily",
    "XORDataset",
    "XORFamily",
    "call_model",
    "derive_seed",
    "get_task",
    "list_tasks",
    "load_mnist",
    "load_mnist_folder",
    "make_xor_dataset",
    "register_task",
    "sample_instance",
    "validate_instance",
]
