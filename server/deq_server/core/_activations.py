"""Activations by name, so model configs stay JSON and MLP conversion can map modules to names."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "tanh": torch.tanh,
    "relu": F.relu,
    "sigmoid": F.sigmoid,
    "gelu": F.gelu,
    "silu": F.silu,
    "elu": F.elu,
    "softplus": F.softplus,
    "leaky_relu": F.leaky_relu,
    "identity": lambda x: x,
}


def activation(name: str) -> Callable[[Tensor], Tensor]:
    """Look up an activation; unknown names raise ValueError listing the valid ones."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(
            f"unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}"
        ) from None


def activation_name(module: nn.Module) -> str:
    """Name of an activation module whose function equals the registry's default-argument one."""
    exact: list[tuple[type[nn.Module], str, dict[str, object]]] = [
        (nn.Tanh, "tanh", {}),
        (nn.ReLU, "relu", {}),
        (nn.Sigmoid, "sigmoid", {}),
        (nn.GELU, "gelu", {"approximate": "none"}),
        (nn.SiLU, "silu", {}),
        (nn.ELU, "elu", {"alpha": 1.0}),
        (nn.Softplus, "softplus", {"beta": 1.0, "threshold": 20.0}),
        (nn.LeakyReLU, "leaky_relu", {"negative_slope": 0.01}),
        (nn.Identity, "identity", {}),
    ]
    for cls, name, attrs in exact:
        if type(module) is cls and all(getattr(module, k) == v for k, v in attrs.items()):
            return name
    raise ValueError(
        f"unsupported activation module {module!r}; expected one of "
        f"{[c.__name__ for c, _, _ in exact]} with default arguments"
    )
