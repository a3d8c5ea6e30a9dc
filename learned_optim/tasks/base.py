"""The task API: a problem class that ``meta_fit`` trains on and ``compare`` evaluates on.

A *task family* samples *task instances*. An instance is one concrete optimisation
problem: a freshly initialised ``nn.Module``, a loss, a stream of training minibatches
and, optionally, the whole training split and a held-out split for evaluation.
Everything an instance does is fixed by the seed it was sampled with.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from learned_optim.tasks._common import derive_seed

Batch = tuple[Any, Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]


class TaskError(ValueError):
    """A task definition is unusable (bad model, loss or data)."""


@dataclass
class TaskInstance:
    """One sampled optimisation problem.

    Attributes:
        model: freshly initialised module; ``model(inputs)`` gives what ``loss`` takes.
        loss: ``loss(model(inputs), targets)`` returns a scalar tensor.
        batches: iterator over training minibatches ``(inputs, targets)``; ``inputs`` is a
            tensor or a tuple of tensors (passed as ``model(*inputs)``).
        train_set: the whole training split as one batch (for the final training loss), or None.
        test_set: a held-out split as one batch, or None.
        name: description of the instance (e.g. the sampled variation).
    """

    model: nn.Module
    loss: LossFn
    batches: Iterator[Batch]
    train_set: Batch | None = None
    test_set: Batch | None = None
    name: str = "task"

    def __post_init__(self) -> None:
        if not isinstance(self.batches, Iterator):
            hint = (
                " (a list or other re-iterable: pass itertools.cycle(batches), or give it to Task(data=...), "
                "which loops over epochs)"
                if isinstance(self.batches, Iterable)
                else ""
            )
            raise TaskError(
                f"task {self.name!r}: TaskInstance.batches must be an iterator of (inputs, targets) "
                f"batches, got {type(self.batches).__name__}{hint}"
            )

    def next_batch(self) -> Batch:
        """The next training minibatch (:class:`TaskError` if ``batches`` ran out)."""
        try:
            return next(self.batches)
        except StopIteration:
            raise TaskError(
                f"task {self.name!r}: the instance's batches ran out; a TaskInstance's batches must be "
                "endless (loop over epochs, or draw each batch from a generator)"
            ) from None


def call_model(model: Callable[..., Tensor], inputs: Any) -> Tensor:
    """``model(*inputs)`` for a tuple of inputs, else ``model(inputs)``."""
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


class TaskFamily:
    """A distribution over task instances. Subclasses implement :meth:`sample`."""

    name: str = "task"

    def sample(self, seed: int) -> TaskInstance:
        """A task instance fully determined by ``seed``."""
        raise NotImplementedError(f"{type(self).__name__} must implement sample(seed)")


def sample_instance(family: TaskFamily, seed: int) -> TaskInstance:
    """``family.sample(seed)``, refused with a :class:`TaskError` unless it is a :class:`TaskInstance`."""
    instance = family.sample(seed)
    if not isinstance(instance, TaskInstance):
        name = getattr(family, "name", type(family).__name__)
        raise TaskError(
            f"task {name!r}: {type(family).__name__}.sample(seed) must return a learned_optim.tasks.TaskInstance "
            f"(model, loss, batches, ...), got {type(instance).__name__}"
        )
    return instance


def _checked_batch(batch: Any, index: int, source: str) -> Batch:
    """``batch`` if it is a pair (inputs, targets), else a :class:`TaskError` naming it."""
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
        length = f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else ""
        raise TaskError(f"{source}: batch {index} must be a pair (inputs, targets), got {type(batch).__name__}{length}")
    return batch


def _batch_stream(data: Any, generator: torch.Generator, source: str) -> Iterator[Batch]:
    """Endless stream of batches from a sampler function or a re-iterable (epoch after epoch)."""
    if callable(data) and not isinstance(data, Iterable):
        for index in itertools.count(1):
            try:
                batch = data(generator)
            except Exception as error:
                raise TaskError(
                    f"{source}: the data sampler is called as `data(generator)` (a torch.Generator to draw "
                    f"from) and raised {type(error).__name__} at batch {index}: {error}"
                ) from error
            yield _checked_batch(batch, index, source)
        return
    if isinstance(data, Iterator):
        # Even an endless one: every instance would draw from one shared stream, so an
        # instance's batches would depend on what was drawn before (validation, resume).
        raise TaskError(
            f"{source}: data is a one-shot iterator ({type(data).__name__}), which cannot give each "
            "instance its own reproducible batches; pass a re-iterable source (a DataLoader, a list "
            "of batches) or a sampler function generator -> batch"
        )
    if not isinstance(data, Iterable):
        raise TaskError(
            f"{source}: data must be an iterable of (inputs, targets) batches (e.g. a DataLoader) "
            f"or a function generator -> batch, got {type(data).__name__}"
        )
    served = 0
    while True:
        iterator = iter(data)
        epoch_count = 0
        for batch in iterator:
            epoch_count += 1
            served += 1
            yield _checked_batch(batch, served, source)
        if epoch_count == 0 or iterator is data:
            raise TaskError(
                f"{source}: data ran out after {served} batch(es); pass a re-iterable source "
                "(a DataLoader, a list of batches) or a sampler function generator -> batch"
            )


@dataclass
class Task(TaskFamily):
    """A user's problem class from an ordinary ``nn.Module``.

    Args:
        model: a factory returning a freshly initialised module (called under a seeded RNG,
            so each instance gets its own reproducible initialisation).
        loss: ``loss(model(inputs), targets) -> scalar tensor``.
        data: training batches ``(inputs, targets)``: an iterable that can be iterated again
            (a ``DataLoader``, a list), or a sampler ``f(generator) -> batch``.
        train_set: optional whole training split ``(inputs, targets)`` for evaluation.
        test_set: optional held-out split ``(inputs, targets)``.
        name: a label used in reports.

    Example:
        >>> task = Task(model=lambda: nn.Linear(4, 1), loss=nn.functional.mse_loss,
        ...             data=lambda g: (torch.randn(32, 4, generator=g), torch.randn(32, 1, generator=g)))
    """

    model: Callable[[], nn.Module]
    loss: LossFn
    data: Any
    train_set: Batch | None = None
    test_set: Batch | None = None
    name: str = "task"
    _checked: bool = field(default=False, init=False, repr=False)

    def sample(self, seed: int) -> TaskInstance:
        if isinstance(self.model, nn.Module) or not callable(self.model):
            is_module = isinstance(self.model, nn.Module)
            given = f"an {type(self.model).__name__} instance" if is_module else repr(self.model)
            raise TaskError(
                f"task {self.name!r}: model must be a factory returning a fresh nn.Module (e.g. "
                f"`model=lambda: MyNet()`), got {given}: every task instance needs its own initialisation"
            )
        check_task_data(self.data, self.name)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(seed, "init"))
            module = self.model()
            generator = torch.Generator().manual_seed(derive_seed(seed, "data"))
            # DataLoader shuffling draws from the global RNG when an epoch starts.
            batches = _seeded_stream(self.data, generator, seed, f"task {self.name!r}")
        if not isinstance(module, nn.Module):
            raise TaskError(
                f"task {self.name!r}: model factory returned {type(module).__name__}, expected an nn.Module"
            )
        instance = TaskInstance(
            model=module,
            loss=self.loss,
            batches=batches,
            train_set=self.train_set,
            test_set=self.test_set,
            name=self.name,
        )
        if not self._checked:
            with torch.random.fork_rng(devices=[]):  # a model with dropout draws while checked
                validate_instance(instance, f"task {self.name!r}")
            self._checked = True
            fresh = self.sample(seed)
            probed = {id(p) for p in instance.model.parameters() if p.requires_grad}
            if any(id(p) in probed for p in fresh.model.parameters() if p.requires_grad):
                self._checked = False
                raise TaskError(
                    f"task {self.name!r}: the model factory returned a module whose trainable parameters "
                    "it returned before (the same module object, or one built around shared layers); "
                    "every instance would start where the last one was trained: build a new module in "
                    "the factory (e.g. `model=lambda: MyNet()`)"
                )
            return fresh
        return instance


def _seeded_stream(data: Any, generator: torch.Generator, seed: int, source: str) -> Iterator[Batch]:
    # Separate streams: equal seeds would tie the initial weights to the data.
    epoch_seeds = itertools.count(derive_seed(seed, "epochs") >> 8)
    # A DataLoader shuffling with its own generator= would shuffle every instance from that one
    # generator: each instance gets private states of it instead, derived from its seed.
    loader_generators = _loader_generators(data)
    private_states = [
        torch.Generator(device=g.device).manual_seed(derive_seed(seed, f"loader-generator/{i}")).get_state()
        for i, g in enumerate(loader_generators)
    ]
    yield from _epochs_with_seed(data, generator, epoch_seeds, source, loader_generators, private_states)


def _loader_generators(data: Any) -> list[torch.Generator]:
    """The ``torch.Generator`` objects a ``DataLoader`` shuffles with, if any: its own
    ``generator=`` and its (batch) sampler's, each once."""
    if not isinstance(data, DataLoader):
        return []
    batch_sampler = getattr(data, "batch_sampler", None)
    found: list[torch.Generator] = []
    for owner in (data, getattr(data, "sampler", None), batch_sampler, getattr(batch_sampler, "sampler", None)):
        generator = getattr(owner, "generator", None)
        if isinstance(generator, torch.Generator) and not any(generator is g for g in found):
            found.append(generator)
    return found


@contextlib.contextmanager
def _generators_swapped(generators: Sequence[torch.Generator], states: list[Tensor]) -> Iterator[None]:
    """Runs the block with ``generators`` in ``states`` (updated in place to where the block left
    them), then puts back the states the generators had before."""
    saved = [g.get_state() for g in generators]
    for generator, state in zip(generators, states, strict=True):
        generator.set_state(state)
    try:
        yield
    finally:
        states[:] = [g.get_state() for g in generators]
        for generator, state in zip(generators, saved, strict=True):
            generator.set_state(state)


def _epochs_with_seed(
    data: Any,
    generator: torch.Generator,
    epoch_seeds: Iterator[int],
    source: str,
    loader_generators: Sequence[torch.Generator] = (),
    loader_states: list[Tensor] | None = None,
) -> Iterator[Batch]:
    stream = _batch_stream(data, generator, source)
    states = loader_states if loader_states is not None else []
    while True:
        # A DataLoader starts an epoch (and shuffles) inside next(): from this instance's streams.
        with torch.random.fork_rng(devices=[]), _generators_swapped(loader_generators, states):
            torch.manual_seed(next(epoch_seeds))
            batch = next(stream)
        yield batch


def check_task_data(data: Any, name: str) -> None:
    """Raise :class:`TaskError` for a :class:`Task`'s ``data`` that instances cannot draw from
    independently and reproducibly, or that would be misread."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        # Iterated as a list of batches, it would give the tensor X as the first "batch".
        raise TaskError(
            f"task {name!r}: data is one pair of tensors (inputs, targets), but data is read as a "
            "sequence of batches (like a DataLoader), which would make the inputs tensor the first batch; "
            "to train on the whole set as one batch every step, pass a list holding it: data=[(inputs, targets)]"
        )
    if isinstance(data, DataLoader) and data.persistent_workers:
        raise TaskError(
            f"task {name!r}: the DataLoader has persistent_workers=True: PyTorch then keeps one iterator "
            "per DataLoader, so task instances drawn side by side (optimizers compared, meta-training "
            "instances, validation) would reset each other's epochs and no instance's batches could be "
            "replayed; build it with persistent_workers=False"
        )


def unused_parameters_message(names: Sequence[str]) -> str:
    """Why meta-training cannot take trainable parameters the loss does not reach."""
    return (
        f"trainable parameter(s) {', '.join(repr(n) for n in names)} get no gradient from the loss "
        "(not used in forward); meta-training steps every trainable parameter each step, so freeze "
        "them (`requires_grad_(False)`) or leave them out of the model"
    )


def validate_instance(instance: TaskInstance, source: str, *, require_all_used: bool = False) -> None:
    """Raise :class:`TaskError` if the instance cannot be optimised (checked on one batch).

    ``require_all_used``: also refuse trainable parameters the loss does not reach. An
    optimizer skips them (no gradient); meta-training, which steps them all, cannot.
    """
    named = [(name, p) for name, p in instance.model.named_parameters() if p.requires_grad]
    if not named:
        raise TaskError(f"{source}: the model has no trainable parameters")
    for name, p in named:
        if not p.is_floating_point():
            raise TaskError(f"{source}: parameter {name!r} of dtype {p.dtype} is not floating point")
    for name, module in instance.model.named_modules():
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag)) and module.sparse:
            raise TaskError(
                f"{source}: module {name!r} makes sparse gradients, which learned rules do not take; "
                "build it with sparse=False"
            )
    with _buffers_kept(instance.model):
        _check_forward(instance, source, named, require_all_used)


@contextlib.contextmanager
def _buffers_kept(model: nn.Module) -> Iterator[None]:
    """Restore the model's buffers (BatchNorm's running statistics) after the block: the checks'
    forward passes must not move a module the instance shares (a frozen backbone)."""
    saved = [(buffer, buffer.detach().clone()) for buffer in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


def _check_forward(
    instance: TaskInstance, source: str, named: list[tuple[str, nn.Parameter]], require_all_used: bool
) -> None:
    """:func:`validate_instance`'s checks that run the model and the loss."""
    batch = instance.next_batch()
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
        raise TaskError(f"{source}: each batch must be a pair (inputs, targets), got {type(batch).__name__}")
    try:
        output = call_model(instance.model, batch[0])
    except Exception as error:
        raise TaskError(
            f"{source}: the model is called on each batch's inputs, `model(inputs)` (`model(*inputs)` for a "
            f"tuple), and raised {type(error).__name__}: {error}"
        ) from error
    try:
        value = instance.loss(output, batch[1])
    except Exception as error:
        raise TaskError(
            f"{source}: the loss is called as `loss(model(inputs), targets)` and raised "
            f"{type(error).__name__}: {error}. It takes the model's outputs and the batch's targets, "
            "e.g. `loss=torch.nn.functional.cross_entropy`"
        ) from error
    if not isinstance(value, Tensor) or value.numel() != 1:
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise TaskError(f"{source}: loss must return a scalar (one-element) tensor, got {shape}")
    if not value.requires_grad:
        raise TaskError(f"{source}: loss does not depend on the model's parameters")
    if not torch.isfinite(value.detach()).all():
        # At a fresh initialisation: every step would be skipped and training would do nothing.
        raise TaskError(f"{source}: loss is {value.item()} on the first batch at the initial parameters")
    if require_all_used:
        grads = torch.autograd.grad(value, [p for _, p in named], allow_unused=True)
        unused = [name for (name, _), g in zip(named, grads, strict=True) if g is None]
        if unused:
            raise TaskError(f"{source}: {unused_parameters_message(unused)}")
    for label, split in (("train_set", instance.train_set), ("test_set", instance.test_set)):
        # Used as one batch `inputs, targets = split`: a DataLoader of two batches would
        # unpack as (first batch, second batch), any other as an error after training.
        if split is None:
            continue
        if not (isinstance(split, (tuple, list)) and len(split) == 2):
            raise TaskError(
                f"{source}: {label} must be the whole split as one pair (inputs, targets), got "
                f"{type(split).__name__}{' of length ' + str(len(split)) if isinstance(split, (tuple, list)) else ''}"
                "; pass tensors (e.g. from torch.cat over a DataLoader), not a DataLoader"
            )
        # Evaluated only after training (final loss, held-out loss): a split the model or the
        # loss cannot take is named now, not after the run.
        try:
            with torch.no_grad():
                split_value = instance.loss(call_model(instance.model, split[0]), split[1])
        except Exception as error:
            raise TaskError(
                f"{source}: {label} is evaluated as `loss(model(inputs), targets)`, which raised "
                f"{type(error).__name__}: {error}"
            ) from error
        if not isinstance(split_value, Tensor) or split_value.numel() != 1:
            shape = tuple(split_value.shape) if isinstance(split_value, Tensor) else type(split_value).__name__
            raise TaskError(f"{source}: on {label}, loss must return a scalar (one-element) tensor, got {shape}")
