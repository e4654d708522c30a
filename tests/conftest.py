"""Shared fixtures: deterministic seeds for every test."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)
