"""Shared fixtures: deterministic seeds for every test, and a private per-user data directory."""

from __future__ import annotations

import os

import pytest
import torch

# `--compile-step auto` compiles where a C++ compiler is found (here: scripts/test.sh installs
# g++): every server a test starts would build its programs in a child process, 5-11 s of a core
# each. Servers in tests (in process or not) solve eagerly unless a test asks for compiling.
os.environ["DEQ_COMPILE_STEP"] = "off"


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


@pytest.fixture(autouse=True, scope="session")
def _private_data_home(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Servers started without --model-dir use $XDG_DATA_HOME/deq-serve/models: one folder
    for the session (subprocesses inherit it), never the real home's."""
    os.environ["XDG_DATA_HOME"] = str(tmp_path_factory.mktemp("data-home"))
