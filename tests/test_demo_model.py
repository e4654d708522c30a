"""The bundled `digits` model: shipped as package data, accurate, and tolerance-aware."""

from __future__ import annotations

import pytest
import torch

from deq_server.core import Status, load_checkpoint
from deq_server.demo import TOLERANCES, evaluate, held_out_digits
from deq_server.models import DEMO_MODEL, bundled_checkpoints


@pytest.fixture(scope="module")
def digits():
    path = bundled_checkpoints()[DEMO_MODEL]
    return load_checkpoint(path).eval(), held_out_digits()


def test_demo_checkpoint_is_small_package_data():
    path = bundled_checkpoints()[DEMO_MODEL]
    assert path.suffix == ".safetensors"
    assert path.stat().st_size < 100_000


def test_demo_model_takes_raw_pixels_and_is_accurate_on_held_out_digits(digits):
    model, (x, y) = digits
    assert x.min() >= 0
    assert x.max() == 16
    config = model.config
    assert (config["in_features"], config["out_features"]) == (64, 10)
    stats = evaluate(model, x, y)
    assert stats["accuracy"] >= 0.95
    assert stats["converged"] == 1.0


def test_tighter_tolerance_costs_more_iterations_and_is_met(digits):
    model, (x, _y) = digits
    means = []
    for tol in TOLERANCES:
        with torch.no_grad():
            _, result = model(x, tol=tol, max_iter=200, stop_mode="rel")
        assert (result.status == Status.CONVERGED).all()
        assert (result.residual <= tol).all()
        means.append(result.iterations.double().mean().item())
    assert means[0] < means[1] < means[2]
