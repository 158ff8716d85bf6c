"""Fixtures that several test modules share (pytest loads this file before them): one torch
thread per test, and one finished tiny Fashion-MNIST run (tests/helpers_runs.py) copied into
each test that needs a finished run. Helpers that are not fixtures live in tests/helpers_*.py;
test modules do not import each other."""
from __future__ import annotations

import contextlib
import io
import shutil
from pathlib import Path

import pytest
import torch
from helpers_runs import FINISHED_RECIPE, FINISHED_SETTINGS


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


@pytest.fixture(scope="session")
def finished_run_once(tmp_path_factory) -> Path:
    """The finished tiny run, trained once; tests take a copy (`finished_run`), never this."""
    from powergrad.config.loading import load_recipe
    from powergrad.training import engine

    out = tmp_path_factory.mktemp("finished_once")
    threads = torch.get_num_threads()  # set up before any test's one_thread fixture
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # its epoch lines are no test's output
            summary = engine.train(load_recipe(FINISHED_RECIPE,
                                               [*FINISHED_SETTINGS, f"log.output={out}"]))
    finally:
        torch.set_num_threads(threads)
    return Path(summary["run_dir"])


@pytest.fixture
def finished_run(finished_run_once, tmp_path) -> Path:
    """A copy of the finished tiny run for this test to read, continue or damage:
    tmp_path/finished/resnet_pgt (so log.output=tmp_path/finished continues it)."""
    copy = tmp_path / "finished" / finished_run_once.name
    shutil.copytree(finished_run_once, copy)
    return copy
