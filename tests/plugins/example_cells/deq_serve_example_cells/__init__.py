"""A registered DEQ cell: z' = LayerNorm(g * tanh(W z + u) + (1 - g) * z), g = sigmoid(G x').

It follows the protocol of deq-serve's built-in cells: `REQUIRED` and `DEFAULTS` config keys, a
constructor taking the resolved config, `inject`/`cell`/`head` and the three per-sample shapes.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

NOT_A_CELL = "registered by mistake: not a class"


class GatedMLPCell(nn.Module):
    REQUIRED: ClassVar[dict[str, type]] = {"in_features": int, "hidden": int, "out_features": int}
    DEFAULTS: ClassVar[dict[str, Any]] = {"init_scale": 0.5}

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        n = config["hidden"]
        self.injection = nn.Linear(config["in_features"], 2 * n)
        self.W = nn.Linear(n, n, bias=False)
        self.norm = nn.LayerNorm(n)
        self.out = nn.Linear(n, config["out_features"])
        nn.init.normal_(self.W.weight, std=config["init_scale"] / (2 * math.sqrt(n)))
        self.input_shape: tuple[int, ...] = (config["in_features"],)
        self.output_shape: tuple[int, ...] = (config["out_features"],)
        self.state_shape: tuple[int, ...] = (n,)

    def inject(self, x: Tensor) -> Tensor:
        return self.injection(x.flatten(1))

    def cell(self, z: Tensor, inj: Tensor) -> Tensor:
        u, gate = inj.chunk(2, dim=1)
        g = torch.sigmoid(gate)
        return self.norm(g * torch.tanh(self.W(z) + u) + (1 - g) * z)

    def head(self, z: Tensor) -> Tensor:
        return self.out(z)
