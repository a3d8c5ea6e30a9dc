"""Name -> class registry used to rebuild rules from ``config.json``."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from learned_optim.rules.base import UpdateRule

RULE_TYPES: dict[str, type[UpdateRule]] = {}

_BUILTIN_MODULE = "learned_optim.rules."


def _where(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def register_rule(cls: type[UpdateRule]) -> type[UpdateRule]:
    """Make ``cls`` loadable by its ``rule_type`` (done automatically for subclasses that set one).

    Raises ``ValueError`` if ``cls`` has no ``rule_type`` or takes the name of a built-in rule
    (``CoordinateLSTM``, ``HierarchicalRNN``): the bundled rules would then load as ``cls``.
    Redefining the same class (same module and qualified name, e.g. a re-run notebook cell)
    replaces the entry silently; another class taking a user rule's name replaces it with a
    ``UserWarning``.
    """
    from learned_optim.rules.base import UpdateRule

    if not (isinstance(cls, type) and issubclass(cls, UpdateRule)):
        raise TypeError(f"register_rule expects an UpdateRule subclass, got {cls!r}")
    name = cls.rule_type
    if not isinstance(name, str) or not name:
        raise ValueError(f"{cls.__qualname__} has no rule_type: set the class attribute rule_type = '<name>'")
    old = RULE_TYPES.get(name)
    if old is not None and old is not cls and _where(old) != _where(cls):
        if old.__module__.startswith(_BUILTIN_MODULE):
            raise ValueError(
                f"rule_type {name!r} is the built-in {_where(old)}; give {cls.__qualname__} a rule_type of its own"
            )
        warnings.warn(
            f"{_where(cls)} replaces {_where(old)} as rule_type {name!r}: files saved with that rule_type "
            "now load as the new class",
            UserWarning,
            stacklevel=3,  # the class statement (through UpdateRule.__init_subclass__)
        )
    RULE_TYPES[name] = cls
    return cls


def get_rule_class(rule_type: str) -> type[UpdateRule]:
    """The class registered as ``rule_type``; ValueError listing the known ones if none."""
    try:
        return RULE_TYPES[rule_type]
    except KeyError:
        known = ", ".join(sorted(RULE_TYPES)) or "none"
        raise ValueError(
            f"unknown rule type {rule_type!r}; known rule types: {known} (a custom rule registers "
            "itself when the module defining it is imported; learned-optim: --import MODULE)"
        ) from None
