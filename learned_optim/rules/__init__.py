"""Update rules: every rule is an :class:`UpdateRule` registered by its ``rule_type``."""

from __future__ import annotations

from learned_optim.rules.base import RuleState, StepContext, UpdateRule
from learned_optim.rules.hierarchical import HierarchicalRNN
from learned_optim.rules.lstm import CoordinateLSTM
from learned_optim.rules.registry import RULE_TYPES, get_rule_class, register_rule

__all__ = [
    "RULE_TYPES",
    "CoordinateLSTM",
    "HierarchicalRNN",
    "RuleState",
    "StepContext",
    "UpdateRule",
    "get_rule_class",
    "register_rule",
]
