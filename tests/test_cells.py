"""Cell details that serving relies on."""

from __future__ import annotations

import torch

from deq_server.core import DEQModel


def test_spectral_cap_cache_follows_weight_changes():
    model = DEQModel.from_config(
        {
            "cell": "mlp",
            "in_features": 4,
            "hidden": 16,
            "out_features": 2,
            "norm": "spectral",
            "max_norm": 0.5,
            "init_scale": 3.0,
        }
    ).eval()
    x = torch.randn(3, 4)
    with torch.no_grad():
        first, _ = model(x, tol=1e-8, max_iter=200)
        capped = model.layer.W.weight
        assert torch.linalg.matrix_norm(capped, ord=2) <= 0.5 + 1e-6
        assert model.layer.W.weight is capped  # served from the cache while W is unchanged
        model.layer.W.parametrizations.weight.original.mul_(0.01)  # in place: a new version
        second, _ = model(x, tol=1e-8, max_iter=200)
    assert model.layer.W.weight is not capped
    assert not torch.allclose(first, second)
    fresh = model.layer.W.parametrizations.weight[0]._cap(
        model.layer.W.parametrizations.weight.original
    )
    torch.testing.assert_close(model.layer.W.weight, fresh)
