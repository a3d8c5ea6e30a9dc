"""Shared test settings: one torch thread (tests run beside other CPU-heavy jobs); Triton's
interpreter where there is no GPU, so the fused kernels are tested on CPU too."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    # Read when Triton kernels are defined: set before learned_optim imports its kernels.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest


@pytest.fixture(autouse=True)
def _one_thread():
    # The test models are tiny: intra-op threads only add synchronisation, which is very
    # slow when the 2 cores are shared with other processes.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
