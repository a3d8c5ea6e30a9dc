"""Where the library's warnings point: at the user's line, not at ours."""

from __future__ import annotations

import os
import sys

import torch

_INTERNAL = (os.path.dirname(torch.__file__) + os.sep, os.path.dirname(__file__) + os.sep)


def user_stacklevel() -> int:
    """``stacklevel`` for a warning raised by the caller that points at the first frame outside
    torch and learned_optim (public entry points are reached both directly and through others)."""
    frame, level = sys._getframe(1), 1  # the caller of warnings.warn is level 1
    while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL):
        frame, level = frame.f_back, level + 1
    return level
