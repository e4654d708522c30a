"""Peak memory of one training step versus forward solver depth: implicit vs unrolled backprop.

Each (mode, iterations) point runs in a fresh process and reports
- graph bytes: what autograd saved for backward during the step (saved-tensor hooks), the memory
  that unrolled backprop grows with depth and the implicit backward does not;
- peak RSS growth: how far the step raised the process's resident-set high-water mark;
- CUDA peak allocated bytes when run on a GPU.
The forward solve is forced to run exactly N picard iterations (tol far below reach).

    python bench/memory.py [--device cpu|cuda] [--out bench/results/memory.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from deq_server.core import IFT, DEQModel

ITERATIONS = (10, 50, 200)
MODES = ("implicit", "unrolled")
CONFIG = {"cell": "mlp", "in_features": 256, "hidden": 256, "out_features": 10}
BATCH = 256


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def training_step(model: DEQModel, x: Tensor, mode: str, iterations: int) -> Tensor:
    """Forward + backward of one step; returns the loss."""
    if mode == "implicit":
        y, _ = model(
            x,
            tol=1e-30,
            max_iter=iterations,
            method="picard",
            stop_mode="abs",
            backward=IFT(tol=1e-6, max_iter=50),
        )
    else:
        inj = model.inject(x)
        z = model.init_state(x)
        for _ in range(iterations):
            z = model.cell(z, inj)
        y = model.head(z)
    loss = y.square().mean()
    loss.backward()
    return loss.detach()


def measure(mode: str, iterations: int, device: str) -> dict[str, Any]:
    """One point, in this process: graph bytes, peak RSS growth, CUDA peak."""
    torch.manual_seed(0)
    torch.set_num_threads(2)
    model = DEQModel.from_config(CONFIG).to(device).train()
    x = torch.randn(BATCH, CONFIG["in_features"], device=device)
    training_step(model, x, mode, 2)  # warm-up: allocator pools, lazy kernels
    model.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    graph = 0

    def pack(t: Tensor) -> Tensor:
        nonlocal graph
        graph += t.numel() * t.element_size()
        return t

    rss_before = peak_rss_bytes()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        training_step(model, x, mode, iterations)
    return {
        "mode": mode,
        "iterations": iterations,
        "graph_bytes": graph,
        "peak_rss_growth_bytes": peak_rss_bytes() - rss_before,
        "cuda_peak_bytes": torch.cuda.max_memory_allocated() if device == "cuda" else None,
    }


def run_child(mode: str, iterations: int, device: str) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, __file__, "--child", mode, str(iterations), "--device", device],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("bench/results/memory.json"))
    parser.add_argument("--child", nargs=2, metavar=("MODE", "ITERATIONS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child[0], int(args.child[1]), args.device)))
        return

    rows = [run_child(mode, n, args.device) for mode in MODES for n in ITERATIONS]
    print(
        f"one training step, mlp cell d={CONFIG['hidden']}, batch {BATCH}, float32, {args.device}"
    )
    print("| backward | forward iterations | graph MiB | peak RSS growth MiB | CUDA peak MiB |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['mode']} | {r['iterations']} | {mib(r['graph_bytes'])} | "
            f"{mib(r['peak_rss_growth_bytes'])} | {mib(r['cuda_peak_bytes'])} |"
        )
    ratios = {}
    for mode in MODES:
        by_n = {r["iterations"]: r for r in rows if r["mode"] == mode}
        key = "cuda_peak_bytes" if args.device == "cuda" else "graph_bytes"
        ratios[mode] = by_n[ITERATIONS[-1]][key] / by_n[ITERATIONS[0]][key]
        print(
            f"{mode}: {key} at {ITERATIONS[-1]} / at {ITERATIONS[0]} iterations = "
            f"{ratios[mode]:.2f}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    machine = {
        "platform": platform.platform(),
        "cpus": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": args.device,
    }
    args.out.write_text(json.dumps({"machine": machine, "rows": rows, "ratios": ratios}, indent=2))


if __name__ == "__main__":
    main()
