"""An MDEQ-style convolutional DEQ on digits as 1x8x8 images, exported with `export_deq`.

Two resolution branches solved jointly, as in multiscale DEQs (Bai et al. 2020): a high-resolution
state of `C1` channels at 8x8 and a low-resolution one of `C2` channels at 4x4. The fixed-point
state is both branches packed into one flat vector per sample (as torchdeq's MDEQ wrapper packs
them), so the cell is an ordinary `cell(z, u) -> z'`:

    each branch i:  b_i = u_i + conv(relu(conv(z_i)))          (two-conv block, injection skip)
    fusion:         hi' = GroupNorm(b_hi + upsample(conv1x1(b_lo)))
                    lo' = GroupNorm(b_lo + conv3x3_stride2(b_hi))
    head:           Linear(concat(hi*, lo*))

GroupNorm statistics are per sample (every op is per-sample, as `export_deq` requires), and
normalising a sum dominated by the injection keeps the map contractive, so Anderson reaches a
relative residual of 1e-6 in float32.

It trains with torchdeq (`from_torchdeq.train`: `torchdeq.get_deq`, Anderson, implicit backward),
is exported as a `.pt2` package, loaded with `load_checkpoint`, and (with --serve) served by a real
deq-server on 127.0.0.1 and queried through the deq_client SDK with (N, 1, 8, 8) inputs.

    python examples/mdeq_conv.py                      # train (~20 s on one core), export, load
    python examples/mdeq_conv.py --serve --epochs 1

Its pieces (`build_modules`, `export`, and `from_torchdeq`'s `train` / `torchdeq_solve`) are
importable; tests/test_torchdeq_interop.py serves it and queries it with tritonclient.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from from_torchdeq import DEQModules, add_common_flags, load_split, run
from torch import Tensor, nn

from deq_server.core import DEQModel, export_deq

NAME = "digits_mdeq"
SOLVER = {"method": "anderson", "tol": 1e-4, "max_iter": 60, "stop_mode": "rel"}
BACKWARD = {"mode": "ift", "tol": 1e-6, "max_iter": 100}
HI, LO = 8, 4  # the branches' spatial sizes


class Branches:
    """Packing of the two branches, (B, C1, 8, 8) and (B, C2, 4, 4), into one (B, N) state."""

    def __init__(self, c1: int, c2: int) -> None:
        self.c1, self.c2 = c1, c2
        self.n1 = c1 * HI * HI
        self.size = self.n1 + c2 * LO * LO

    def unpack(self, z: Tensor) -> tuple[Tensor, Tensor]:
        b = z.shape[0]
        return z[:, : self.n1].reshape(b, self.c1, HI, HI), z[:, self.n1 :].reshape(
            b, self.c2, LO, LO
        )

    @staticmethod
    def pack(hi: Tensor, lo: Tensor) -> Tensor:
        return torch.cat([hi.flatten(1), lo.flatten(1)], dim=1)


class Inject(nn.Module):
    """Pixels (B, 1, 8, 8) in [0, 16] -> the injection of both branches, packed."""

    def __init__(self, branches: Branches) -> None:
        super().__init__()
        self.branches = branches
        self.hi = nn.Conv2d(1, branches.c1, 3, padding=1)
        self.lo = nn.Conv2d(1, branches.c2, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = x / 8.0 - 1.0
        return self.branches.pack(self.hi(x), self.lo(x))


class ResidualBlock(nn.Module):
    """b = u + conv(relu(conv(z))): a branch's two-conv update on the injection's skip path."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        with torch.no_grad():  # a small recurrent gain to start inside contraction
            self.conv1.weight.mul_(0.5)

    def forward(self, z: Tensor, u: Tensor) -> Tensor:
        return u + self.conv2(torch.relu(self.conv1(z)))


class MultiscaleCell(nn.Module):
    """One MDEQ step: a residual block per branch, each branch fused with the other, GroupNorm."""

    def __init__(self, branches: Branches, groups: int) -> None:
        super().__init__()
        c1, c2 = branches.c1, branches.c2
        self.branches = branches
        self.block_hi = ResidualBlock(c1)
        self.block_lo = ResidualBlock(c2)
        self.lo_to_hi = nn.Conv2d(c2, c1, 1, bias=False)
        self.hi_to_lo = nn.Conv2d(c1, c2, 3, stride=2, padding=1, bias=False)
        self.norm_hi = nn.GroupNorm(groups, c1)
        self.norm_lo = nn.GroupNorm(groups, c2)

    def forward(self, z: Tensor, u: Tensor) -> Tensor:
        z_hi, z_lo = self.branches.unpack(z)
        u_hi, u_lo = self.branches.unpack(u)
        b_hi = self.block_hi(z_hi, u_hi)
        b_lo = self.block_lo(z_lo, u_lo)
        up = F.interpolate(self.lo_to_hi(b_lo), scale_factor=2.0, mode="nearest")
        hi = self.norm_hi(b_hi + up)
        lo = self.norm_lo(b_lo + self.hi_to_lo(b_hi))
        return self.branches.pack(hi, lo)


class Head(nn.Module):
    """Logits from both branches' states (flattened)."""

    def __init__(self, branches: Branches, classes: int = 10) -> None:
        super().__init__()
        self.fc = nn.Linear(branches.size, classes)

    def forward(self, z: Tensor) -> Tensor:
        return self.fc(z)


def build_modules(c1: int = 8, c2: int = 16, groups: int = 4, seed: int = 0) -> DEQModules:
    """The multiscale DEQ: (1, 8, 8) pixels -> packed state of c1*64 + c2*16 -> 10 logits."""
    torch.manual_seed(seed)
    branches = Branches(c1, c2)
    return DEQModules(Inject(branches), MultiscaleCell(branches, groups), Head(branches))


def export(
    modules: DEQModules,
    path: str | Path,
    example_input: Tensor,
    metadata: dict[str, str] | None = None,
) -> DEQModel:
    """Write the modules as a `.pt2` package (eval mode) with this example's solver defaults."""
    return export_deq(
        path,
        inject=modules.inject,
        cell=modules.cell,
        head=modules.head,
        example_input=example_input,
        solver=SOLVER,
        backward=BACKWARD,
        metadata={"trained_with": "torchdeq 0.1.0", "example": "mdeq_conv", **(metadata or {})},
    )


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--c1", type=int, default=8, help="channels of the 8x8 branch (default 8)")
    p.add_argument("--c2", type=int, default=16, help="channels of the 4x4 branch (default 16)")
    p.add_argument("--groups", type=int, default=4, help="GroupNorm groups (default 4)")
    return add_common_flags(p, NAME).parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    split = load_split((1, 8, 8))
    modules = build_modules(args.c1, args.c2, args.groups, args.seed)
    run(modules, split, args, export, "examples/mdeq_conv.py")


if __name__ == "__main__":
    main()
