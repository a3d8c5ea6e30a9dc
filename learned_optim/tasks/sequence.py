"""Sequence reversal with a small transformer: an architecture unlike every meta-training task.

The learned rules were meta-trained on MLPs, small convnets and synthetic problems. A
transformer (embeddings, attention, layer norm, residual paths) tests how far they carry
beyond that, with the same fair protocol as every other task (``learned-optim compare``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from learned_optim.tasks import register_task
from learned_optim.tasks._common import generator, minibatches, seeded_module
from learned_optim.tasks.base import TaskFamily, TaskInstance


class ReversalTransformer(nn.Module):
    """Token and position embeddings, a pre-norm ``nn.TransformerEncoder`` (no dropout, so runs
    are deterministic) and a linear read-out: ``(batch, length)`` tokens -> ``(batch, length,
    vocab)`` logits."""

    def __init__(self, vocab: int, length: int, width: int, heads: int, layers: int) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, width)
        self.positions = nn.Parameter(0.02 * torch.randn(length, width))
        layer = nn.TransformerEncoderLayer(
            width, heads, dim_feedforward=2 * width, dropout=0.0, batch_first=True, norm_first=True
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
        if min(vocab, length, width, heads, layers, n_train, n_test, batch_size) < 1:
            raise ValueError("sizes, sample counts and batch_size must be positive")
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
        targets = tokens.flip(1)
        train, test = slice(0, self.n_train), slice(self.n_train, None)
        model = seeded_module(
            seed, lambda: ReversalTransformer(self.vocab, self.length, self.width, self.heads, self.layers)
        )
        return TaskInstance(
            model=model,
            loss=sequence_cross_entropy,
            batches=minibatches(tokens[train], targets[train], self.batch_size, generator(seed, "batches")),
            train_set=(tokens[train], targets[train]),
            test_set=(tokens[test], targets[test]),
            name=f"{self.name}[v{self.vocab} len{self.length} w{self.width} x{self.layers}]",
        )


register_task("transformer-reverse", ReversalFamily)
