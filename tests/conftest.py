"""Shared test settings: one torch thread (tests run beside other CPU-heavy jobs)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    # The test models are tiny: intra-op threads only add synchronisation, which is very
    # slow when the 2 cores are shared with other processes.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
