"""Task families whose loss is multiplied by a per-instance factor.

A rule meta-trained on losses of one size can stall on a loss a hundred times smaller (its
log-magnitude gradient input tells it how large gradients are, and it learns to take small
steps where gradients are small). Meta-training over random loss scales teaches it to read
the scale-free inputs instead; evaluating on fixed scales measures how far it is robust.
"""

from __future__ import annotations

import dataclasses
import math
import random

from torch import Tensor

from learned_optim.tasks._common import derive_seed
from learned_optim.tasks.base import LossFn, TaskError, TaskFamily, TaskInstance, sample_instance


def _scaled_loss(loss: LossFn, scale: float) -> LossFn:
    def scaled(outputs: Tensor, targets: Tensor) -> Tensor:
        return loss(outputs, targets) * scale

    return scaled


class LossScaled(TaskFamily):
    """``family`` with each instance's loss multiplied by a factor drawn from ``[low, high]``.

    The factor is log-uniform and fixed by the instance's seed (its own random stream, so the
    instance is otherwise the one ``family`` samples with that seed); ``low == high`` scales
    every instance by the same factor. Use a meta-loss that compares losses to the initial one
    (``"log"``, ``"log-ramp"``, ``"final"``): ``"mean"`` and ``"ramp"`` would weigh instances
    by their scale.

    Args:
        family: the task family whose instances are scaled.
        low: smallest factor, > 0.
        high: largest factor, >= ``low``.
        name: label in reports (default: the family's name with the range).
    """

    def __init__(self, family: TaskFamily, low: float, high: float, name: str | None = None) -> None:
        if not isinstance(family, TaskFamily):
            raise TaskError(f"LossScaled: family must be a TaskFamily, got {type(family).__name__}")
        low, high = float(low), float(high)
        if not (math.isfinite(low) and math.isfinite(high) and 0 < low <= high):
            raise TaskError(f"LossScaled: need finite factors with 0 < low <= high, got low={low!r}, high={high!r}")
        self.family, self.low, self.high = family, low, high
        scales = f"x{low:g}" if low == high else f"x{low:g}-{high:g}"
        self.name = name if name is not None else f"{family.name}-loss{scales}"

    def scale_for(self, seed: int) -> float:
        """The loss factor of instance ``seed``."""
        if self.low == self.high:
            return self.low
        rng = random.Random(derive_seed(seed, "loss-scale"))
        return math.exp(rng.uniform(math.log(self.low), math.log(self.high)))

    def sample(self, seed: int) -> TaskInstance:
        """``family``'s instance ``seed`` with its loss multiplied by :meth:`scale_for`."""
        instance = sample_instance(self.family, seed)
        scale = self.scale_for(seed)
        return dataclasses.replace(
            instance, loss=_scaled_loss(instance.loss, scale), name=f"{instance.name}, loss x{scale:.3g}"
        )
