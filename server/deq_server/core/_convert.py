"""`mlp_to_deq`: any Linear/activation MLP as an equivalent weight-tied DEQ (Bai et al. 2019)."""

from __future__ import annotations

import itertools
from typing import cast

import torch
from torch import nn

from ._activations import activation_name
from ._cells import TiedMLPCell
from ._model import DEQModel


def mlp_to_deq(mlp: nn.Sequential) -> DEQModel:
    """The `tied_mlp` DEQ whose fixed point reproduces `mlp` exactly (and so do its gradients).

    `mlp` is Linear layers, each optionally followed by one activation module (none = identity).
    The solver defaults are picard with L + 1 evaluations: the fixed point is reached after L
    steps because the state matrix is nilpotent, and the last evaluation confirms a zero residual
    (the implicit backward's linear fixed point is nilpotent too: L + 1 evaluations at most).
    """
    modules = list(mlp)
    linears: list[nn.Linear] = []
    acts: list[str] = []
    for i, module in enumerate(modules):
        if isinstance(module, nn.Linear):
            linears.append(module)
            acts.append("identity")
        elif not linears:
            raise ValueError(f"mlp[{i}] must be nn.Linear (an MLP starts with a Linear layer)")
        elif acts[-1] != "identity" or isinstance(modules[i - 1], nn.Identity):
            raise ValueError(f"mlp[{i}]: one activation per Linear layer, got a second one")
        else:
            acts[-1] = activation_name(module)
    if not linears:
        raise ValueError("mlp holds no nn.Linear layer")
    if any(lin.bias is None for lin in linears):
        raise ValueError("every nn.Linear must have a bias (the DEQ stacks them into b)")
    sizes = [linears[0].in_features] + [lin.out_features for lin in linears]
    if any(a.out_features != b.in_features for a, b in itertools.pairwise(linears)):
        raise ValueError(f"consecutive Linear layers do not chain: sizes {sizes}")
    depth = len(linears)
    ref = linears[0].weight
    # Relative tolerance at rounding level: only the exact fixed point (or a layer that changes
    # nothing) stops the solve early, yet last-bit differences between batch sizes still pass.
    tol = 1e-12 if ref.dtype == torch.float64 else 1e-6
    exact = {"method": "picard", "stop_mode": "rel", "tol": tol, "max_iter": depth + 1}
    model = DEQModel.from_config(
        {
            "cell": "tied_mlp",
            "layers": sizes,
            "activations": acts,
            "solver": exact,
            "backward": {"mode": "ift", **exact},
        }
    ).to(dtype=ref.dtype, device=ref.device)
    for dst, src in zip(cast(TiedMLPCell, model.layer).layers, linears, strict=True):
        dst.weight.data.copy_(src.weight.data)
        dst.bias.data.copy_(src.bias.data)
    return model
