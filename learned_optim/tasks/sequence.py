"""Sequence reversal with a small transformer: an architecture unlike every meta-training task.

The learned rules were meta-trained on MLPs, small convnets and synthetic problems. A
transformer (embeddings, attention, layer norm, residual paths) tests how far they carry
beyond that, with the same fair protocol as every other task (``learned-optim compare``).
:class:`SequenceMixFamily` is the meta-training counterpart: other sequence operations on
small transformers of random shapes, reversal left out.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from learned_optim.tasks import register_task
from learned_optim.tasks._common import check_positive_ints, choose, generator, minibatches, seeded_module
from learned_optim.tasks.base import TaskFamily, TaskInstance


class ReversalTransformer(nn.Module):
    """Token and position embeddings, a pre-norm ``nn.TransformerEncoder`` (no dropout, so runs
    are deterministic) and a linear read-out: ``(batch, length)`` tokens -> ``(batch, length,
    vocab)`` logits. ``norm_first=False`` gives the post-norm layout of the original
    transformer."""

    def __init__(self, vocab: int, length: int, width: int, heads: int, layers: int, norm_first: bool = True) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, width)
        self.positions = nn.Parameter(0.02 * torch.randn(length, width))
        layer = nn.TransformerEncoderLayer(
            width, heads, dim_feedforward=2 * width, dropout=0.0, batch_first=True, norm_first=norm_first
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.readout = nn.Linear(width, vocab)

    def forward(self, tokens: Tensor) -> Tensor:
        hidden = self.encoder(self.tokens(tokens) + self.positions)
        return self.readout(self.norm(hidden))


def sequence_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy over every position of every sequence."""
    return nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())


def _sequence_instance(
    seed: int,
    tokens: Tensor,
    targets: Tensor,
    n_train: int,
    batch_size: int,
    model_factory: Callable[[], nn.Module],
    name: str,
) -> TaskInstance:
    """The first ``n_train`` sequences train (in minibatches), the rest are held out."""
    train, test = slice(0, n_train), slice(n_train, None)
    return TaskInstance(
        model=seeded_module(seed, model_factory),
        loss=sequence_cross_entropy,
        batches=minibatches(tokens[train], targets[train], batch_size, generator(seed, "batches")),
        train_set=(tokens[train], targets[train]),
        test_set=(tokens[test], targets[test]),
        name=name,
    )


class ReversalFamily(TaskFamily):
    """Reverse random token sequences with a small transformer.

    Each instance draws ``n_train`` + ``n_test`` random sequences of ``length`` tokens from a
    vocabulary of ``vocab``; the target of a sequence is the sequence reversed, so every
    output position must attend to its mirror position. A freshly initialised
    :class:`ReversalTransformer` (PyTorch's default initialisation) is trained on minibatches
    with the cross-entropy per position; chance level is ``log(vocab)``.

    Args:
        vocab: vocabulary size.
        length: tokens per sequence.
        width: model width (embedding size).
        heads: attention heads.
        layers: encoder layers.
        n_train: training sequences.
        n_test: held-out sequences.
        batch_size: minibatch size.
        name: label used in reports.
    """

    def __init__(
        self,
        vocab: int = 16,
        length: int = 12,
        width: int = 32,
        heads: int = 4,
        layers: int = 2,
        n_train: int = 4096,
        n_test: int = 512,
        batch_size: int = 32,
        name: str = "transformer-reverse",
    ) -> None:
        check_positive_ints(
            vocab=vocab, length=length, width=width, heads=heads, layers=layers, n_train=n_train, n_test=n_test,
            batch_size=batch_size,
        )  # fmt: skip
        if vocab < 2:
            raise ValueError(f"vocab must be at least 2 (one token makes every target known), got {vocab}")
        if width % heads:
            raise ValueError(f"width ({width}) must be a multiple of heads ({heads})")
        self.vocab, self.length, self.width, self.heads, self.layers = vocab, length, width, heads, layers
        self.n_train, self.n_test, self.batch_size = n_train, n_test, batch_size
        self.name = name

    def sample(self, seed: int) -> TaskInstance:
        """The reversal instance for ``seed``."""
        tokens = torch.randint(
            self.vocab, (self.n_train + self.n_test, self.length), generator=generator(seed, "reversal")
        )
        return _sequence_instance(
            seed,
            tokens,
            tokens.flip(1),
            self.n_train,
            self.batch_size,
            lambda: ReversalTransformer(self.vocab, self.length, self.width, self.heads, self.layers),
            f"{self.name}[v{self.vocab} len{self.length} w{self.width} x{self.layers}]",
        )


register_task("transformer-reverse", ReversalFamily)


SEQUENCE_OPERATIONS: dict[str, Callable[[Tensor, int], Tensor]] = {
    "rotate": lambda tokens, shift: tokens.roll(-shift, dims=1),
    "sort": lambda tokens, shift: tokens.sort(dim=1).values,
    "prefix-max": lambda tokens, shift: tokens.cummax(dim=1).values,
}
"""Sequence-to-sequence maps of :class:`SequenceMixFamily`: ``(tokens, shift) -> targets``."""


class SequenceMixFamily(TaskFamily):
    """A distribution of small transformers on token-to-token sequence tasks, for meta-training.

    Each instance draws an operation from ``operations`` (rotate by a random shift, sort,
    running maximum; see :data:`SEQUENCE_OPERATIONS`), a vocabulary, a sequence length, a
    width, a depth and pre- or post-norm layers, all uniformly. Reversal, the held-out
    transformer task of the evaluation suite (``transformer-reverse``), is deliberately not
    among the operations. Chance level is ``log(vocab)``.

    Args:
        operations: names from :data:`SEQUENCE_OPERATIONS`.
        vocabs: vocabulary sizes.
        lengths: tokens per sequence.
        widths: model widths (each a multiple of ``heads``).
        layers: encoder depths.
        norm_first: pre-norm (True) and/or post-norm (False) layers.
        heads: attention heads.
        n_train: training sequences.
        n_test: held-out sequences.
        batch_size: minibatch size.
        name: label used in reports.
    """

    def __init__(
        self,
        operations: Sequence[str] = tuple(SEQUENCE_OPERATIONS),
        vocabs: Sequence[int] = (8, 16, 24),
        lengths: Sequence[int] = tuple(range(6, 13)),
        widths: Sequence[int] = (16, 32, 48),
        layers: Sequence[int] = (1, 2),
        norm_first: Sequence[bool] = (True, False),
        heads: int = 4,
        n_train: int = 4096,
        n_test: int = 512,
        batch_size: int = 32,
        name: str = "transformer-mix",
    ) -> None:
        if isinstance(operations, str):
            operations = (operations,)  # one operation, not its letters
        unknown = [op for op in operations if op not in SEQUENCE_OPERATIONS]
        if unknown or not operations:
            raise ValueError(
                f"operations must be a non-empty subset of {sorted(SEQUENCE_OPERATIONS)}, got {list(operations)}"
            )
        for label, options in (("vocabs", vocabs), ("lengths", lengths), ("widths", widths), ("layers", layers)):
            if not options or min(options) < (2 if label == "vocabs" else 1):
                floor = "integers >= 2" if label == "vocabs" else "positive integers"
                raise ValueError(f"{label} must be a non-empty list of {floor}, got {list(options)}")
        if min(lengths) < 2:
            raise ValueError(f"lengths must be at least 2 (rotation needs a shift), got {list(lengths)}")
        if not norm_first:
            raise ValueError("norm_first must hold True and/or False")
        check_positive_ints(heads=heads, n_train=n_train, n_test=n_test, batch_size=batch_size)
        if any(w % heads for w in widths):
            raise ValueError(f"every width must be a multiple of heads ({heads}), got {list(widths)}")
        self.operations, self.vocabs, self.lengths = tuple(operations), tuple(vocabs), tuple(lengths)
        self.widths, self.layers, self.norm_first = tuple(widths), tuple(layers), tuple(norm_first)
        self.heads, self.n_train, self.n_test, self.batch_size = heads, n_train, n_test, batch_size
        self.name = name

    def sample(self, seed: int) -> TaskInstance:
        """The instance for ``seed``: its draw is recorded in its name."""
        gen = generator(seed, "architecture")
        operation = choose(self.operations, gen)
        vocab, length = choose(self.vocabs, gen), choose(self.lengths, gen)
        width, depth, norm_first = choose(self.widths, gen), choose(self.layers, gen), choose(self.norm_first, gen)
        shift = int(torch.randint(1, length, (1,), generator=gen))
        tokens = torch.randint(vocab, (self.n_train + self.n_test, length), generator=generator(seed, "sequences"))
        detail = f"{operation}{shift}" if operation == "rotate" else operation
        return _sequence_instance(
            seed,
            tokens,
            SEQUENCE_OPERATIONS[operation](tokens, shift),
            self.n_train,
            self.batch_size,
            lambda: ReversalTransformer(vocab, length, width, self.heads, depth, norm_first=norm_first),
            f"{self.name}[{detail} v{vocab} len{length} w{width} x{depth} {'pre' if norm_first else 'post'}-norm]",
        )


register_task("transformer-mix", SequenceMixFamily)
