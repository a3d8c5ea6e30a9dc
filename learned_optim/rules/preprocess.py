"""Gradient preprocessing of Andrychowicz et al. 2016 (appendix A)."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def log_sign_preprocess(grad: Tensor, p: float = 10.0) -> Tensor:
    """Map gradients to two features that are well scaled whatever their magnitude.

    ``(log|g| / p, sign(g))`` where ``|g| >= exp(-p)``, else ``(-1, exp(p) * g)``.

    Args:
        grad: ``(n,)`` gradients.
        p: the cut-off exponent (``p > 0``).

    Returns:
        ``(n, 2)`` features in the dtype of ``grad``.
    """
    if p <= 0:
        raise ValueError(f"preprocess_p must be > 0, got {p}")
    magnitude = grad.abs()
    large = magnitude >= math.exp(-p)
    # clamp keeps log finite where the branch is not taken (its gradient would be inf * 0).
    log_part = torch.log(magnitude.clamp_min(math.exp(-p))) / p
    first = torch.where(large, log_part, torch.full_like(grad, -1.0))
    second = torch.where(large, torch.sign(grad), grad * math.exp(p))
    return torch.stack((first, second), dim=-1)
