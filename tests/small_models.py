"""Small float64 DEQ configs shared by the tests, one per cell type."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

# Smooth activations where gradients are checked: relu's kinks make finite differences ill-posed.
SMALL_CONFIGS: dict[str, dict[str, Any]] = {
    "mlp": {"cell": "mlp", "in_features": 5, "hidden": 8, "out_features": 3},
    "conv": {
        "cell": "conv",
        "in_channels": 2,
        "height": 4,
        "width": 4,
        "channels": 4,
        "groups": 2,
        "out_features": 3,
        "activation": "softplus",
    },
    "tied_mlp": {
        "cell": "tied_mlp",
        "layers": [5, 6, 7, 3],
        "activations": ["tanh", "sigmoid", "identity"],
    },
}


def small_input(kind: str, batch: int, generator: torch.Generator) -> torch.Tensor:
    """A float64 input batch matching SMALL_CONFIGS[kind]."""
    shape = (batch, 2, 4, 4) if kind == "conv" else (batch, 5)
    return torch.randn(*shape, dtype=torch.float64, generator=generator)


def slow_model_dir(folder: Path) -> Path:
    """A model directory with `slow`: a picard solve that needs all of its 1000 iterations
    (linear cell, orthogonal W scaled to rho = 0.999, 512 states), far longer than test deadlines."""
    from deq_server.core import DEQModel, save_checkpoint

    model = DEQModel.from_config(
        {
            "cell": "mlp",
            "in_features": 8,
            "hidden": 512,
            "out_features": 2,
            "activation": "identity",
            "solver": {"method": "picard", "tol": 1e-9, "max_iter": 1000, "stop_mode": "abs"},
        }
    )
    with torch.no_grad():
        q, _ = torch.linalg.qr(torch.randn(512, 512))
        model.layer.W.weight.copy_(0.999 * q)
    save_checkpoint(model, folder / "slow.safetensors")
    return folder
