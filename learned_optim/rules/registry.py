"""Name -> class registry used to rebuild rules from ``config.json``."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from learned_optim.rules.base import UpdateRule

RULE_TYPES: dict[str, type[UpdateRule]] = {}


def register_rule(cls: type[UpdateRule]) -> type[UpdateRule]:
    """Make ``cls`` loadable by its ``rule_type`` (done automatically for subclasses)."""
    RULE_TYPES[cls.rule_type] = cls
    return cls


def get_rule_class(rule_type: str) -> type[UpdateRule]:
    """The class registered as ``rule_type``; ValueError listing the known ones if none."""
    try:
        return RULE_TYPES[rule_type]
    except KeyError:
        known = ", ".join(sorted(RULE_TYPES)) or "none"
        raise ValueError(f"unknown rule type {rule_type!r}; known rule types: {known}") from None
