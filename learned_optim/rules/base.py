"""The interface every update rule implements.

A rule is an ``nn.Module`` whose ``forward`` is a pure, batched, differentiable map
from the gradients of a flat vector of coordinates (and their per-coordinate state)
to an update and a new state. The same code runs inside ``LearnedOptimizer.step``
under ``no_grad`` and inside ``meta_fit`` with autograd through the rule's weights.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

RuleState = dict[str, Tensor]


@dataclass
class StepContext:
    """What a rule may know about the coordinates of one batch besides their gradients.

    Attributes:
        segment_ids: ``(n,)`` int64 tensor; coordinate ``i`` belongs to tensor
            ``segment_ids[i]`` of this batch. Rules that need per-tensor statistics
            (for instance the hierarchical RNN) reduce over it.
        num_segments: number of distinct tensors in the batch.
    """

    segment_ids: Tensor | None = None
    num_segments: int = 0


class UpdateRule(nn.Module):
    """Base class of learned update rules.

    Subclasses set ``rule_type`` (the name written to ``config.json``), keep every
    constructor argument in ``self.config`` (so the rule can be rebuilt from its config),
    and implement :meth:`state_spec` and :meth:`forward`.

    The per-coordinate state is a ``dict[str, Tensor]`` whose tensors all have the
    number of coordinates as their first dimension; ``LearnedOptimizer`` slices it per
    parameter and concatenates it across parameters, so rules never see tensors.
    """

    rule_type: ClassVar[str] = ""

    def __init__(self) -> None:
        super().__init__()
        self.config: dict[str, Any] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # Only a class that names itself registers: a subclass inheriting its parent's
        # rule_type must not silently replace the parent in the registry.
        if cls.__dict__.get("rule_type"):
            from learned_optim.rules.registry import register_rule

            register_rule(cls)

    @classmethod
    def config_keys(cls) -> list[str]:
        """Constructor arguments that make up this rule's config."""
        sig = inspect.signature(cls.__init__)
        return [name for name in sig.parameters if name != "self"]

    def state_spec(self) -> dict[str, tuple[int, ...]]:
        """Per-coordinate state: name -> trailing shape (the leading dim is the coordinate)."""
        raise NotImplementedError(f"{type(self).__name__} must implement state_spec()")

    def init_state(
        self, n: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
    ) -> RuleState:
        """Fresh state for ``n`` coordinates (zeros unless a subclass overrides)."""
        return {
            name: torch.zeros((n, *shape), device=device, dtype=dtype)
            for name, shape in self.state_spec().items()
        }

    def forward(
        self, grad: Tensor, state: RuleState, context: StepContext | None = None
    ) -> tuple[Tensor, RuleState]:
        """Return ``(update, new_state)`` for a flat batch of coordinates.

        Args:
            grad: ``(n,)`` gradients (already negated for ``maximize``).
            state: per-coordinate state, each tensor ``(n, ...)``.
            context: optional batch layout (tensor membership of each coordinate).

        Returns:
            ``update``, ``(n,)``, to be *added* to the parameters (before ``lr``), and the
            new state with the same keys and shapes as ``state``.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement forward()")

    def state_bytes_per_coordinate(self, dtype: torch.dtype = torch.float32) -> int:
        """Bytes of optimizer state this rule keeps per parameter coordinate."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        total = 0
        for shape in self.state_spec().values():
            count = 1
            for d in shape:
                count *= d
            total += count
        return total * itemsize

    # Saving and loading live in learned_optim.weights; these are thin conveniences.
    def save_pretrained(self, save_directory: str, model_card: str | None = None) -> None:
        """Write ``config.json`` and ``model.safetensors`` (and optionally README.md)."""
        from learned_optim.weights import save_pretrained

        save_pretrained(self, save_directory, model_card=model_card)

    @classmethod
    def from_pretrained(cls, name_or_path: str, **kwargs: Any) -> UpdateRule:
        """Load a rule from a bundled name, a local directory or a Hub repo id."""
        from learned_optim.weights import load_rule

        rule = load_rule(name_or_path, **kwargs)
        if cls is not UpdateRule and not isinstance(rule, cls):
            raise TypeError(
                f"{name_or_path!r} holds a {type(rule).__name__}, not a {cls.__name__}"
            )
        return rule

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> str:
        """Publish this rule to the Hugging Face Hub; returns the commit URL."""
        from learned_optim.hub import push_to_hub

        return push_to_hub(self, repo_id, **kwargs)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.config.items())
