"""argparse types shared by the benchmark scripts: a bad option is a usage error, not a traceback."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """An integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def parameter_count(text: str) -> int:
    """A parameter count such as ``1000``, ``10K`` or ``1.5M`` (at least 1)."""
    scale = {"K": 1_000, "M": 1_000_000}.get(text[-1:].upper(), 1)
    number = text[:-1] if scale > 1 else text
    try:
        value = int(float(number) * scale)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a parameter count such as 1000, 10K or 1.5M, got {text!r}"
        ) from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a parameter count of at least 1, got {text!r}")
    return value


def parameter_counts(text: str) -> list[int]:
    """Comma separated :func:`parameter_count` values."""
    return [parameter_count(part.strip()) for part in text.split(",")]


def task_steps(text: str) -> tuple[str, int]:
    """``task:steps``, e.g. ``mnist-mlp:100``."""
    task, sep, steps = text.rpartition(":")
    if not sep or not task:
        raise argparse.ArgumentTypeError(f"expected task:steps such as mnist-mlp:100, got {text!r}")
    return task, positive_int(steps)


def task_steps_list(text: str) -> list[tuple[str, int]]:
    """Comma separated :func:`task_steps` values."""
    return [task_steps(part.strip()) for part in text.split(",")]
