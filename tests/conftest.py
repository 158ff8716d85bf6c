"""Fixtures that several test modules share (pytest loads this file before them): one torch
thread per test."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """Every test starts with one torch thread and leaves the count as it found it.

    The tests' tensors are small: a second thread gains nothing, and OpenMP threads spinning
    beside another busy process (the other xdist worker) make a step many times slower. And
    train.threads sets torch's count for the whole process, so without the restore a test
    would run with whatever the previous test's recipe set."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
