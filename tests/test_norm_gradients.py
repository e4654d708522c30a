"""Weight-normalised cells train: the implicit gradient reaches the parameters behind W.

Regression: the forward solve once computed W inside torch's parametrization cache under
no_grad, and the backward reused that cached W, so W's own parameters got no gradient.
"""

from __future__ import annotations

import pytest
import torch

from deq_server.core import DEQModel


@pytest.mark.parametrize("norm", ["weight", "spectral", "none"])
@pytest.mark.parametrize("backward", ["ift", "phantom", "jfb"])
def test_every_parameter_gets_a_gradient(norm, backward):
    torch.manual_seed(0)
    config = {"cell": "mlp", "in_features": 5, "hidden": 8, "out_features": 3, "norm": norm}
    model = DEQModel.from_config({**config, "backward": backward}).double()
    x = torch.randn(4, 5, dtype=torch.float64)
    y, _ = model(x, tol=1e-10, max_iter=100)
    y.square().sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_the_frozen_copy_answers_like_the_model_and_leaves_it_trainable():
    torch.manual_seed(1)
    config = {"cell": "mlp", "in_features": 5, "hidden": 8, "out_features": 3, "norm": "weight"}
    model = DEQModel.from_config(config).double()
    frozen = model.frozen()
    x = torch.randn(3, 5, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(frozen(x, tol=1e-12)[0], model(x, tol=1e-12)[0])
    assert not any(p.requires_grad for p in frozen.parameters())
    y, _ = model(x)  # the original still has its parametrization and trains
    y.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("norm", ["weight", "spectral", "none"])
def test_a_copy_frozen_in_inference_mode_is_made_of_ordinary_tensors(norm):
    # The serving engine runs in inference mode; inference tensors have no version counter, and
    # the spectral cap's weight cache keys on it.
    torch.manual_seed(2)
    config = {"cell": "mlp", "in_features": 5, "hidden": 8, "out_features": 3, "norm": norm}
    model = DEQModel.from_config(config).double()
    x = torch.randn(3, 5, dtype=torch.float64)
    with torch.inference_mode():
        frozen = model.frozen()
    assert not any(t.is_inference() for t in [*frozen.parameters(), *frozen.buffers()])
    with torch.no_grad():
        torch.testing.assert_close(frozen(x, tol=1e-12)[0], model(x, tol=1e-12)[0])
