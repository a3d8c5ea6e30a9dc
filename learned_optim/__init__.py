"""learned_optim: learned optimizers for PyTorch.

>>> from learned_optim import LearnedOptimizer
>>> opt = LearnedOptimizer(model.parameters())            # doctest: +SKIP
"""

from learned_optim.optimizer import LearnedOptimizer
from learned_optim.rules import CoordinateLSTM, HierarchicalRNN, StepContext, UpdateRule
from learned_optim.weights import list_pretrained, load_rule, save_pretrained

__version__ = "0.1.0"

__all__ = [
    "CoordinateLSTM",
    "HierarchicalRNN",
    "LearnedOptimizer",
    "StepContext",
    "UpdateRule",
    "__version__",
    "list_pretrained",
    "load_rule",
    "save_pretrained",
]
