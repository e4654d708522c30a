"""Peak memory of one training step versus forward solver depth: implicit vs unrolled backprop.

Each (mode, iterations) point runs in a fresh process and reports
- peak bytes: the high-water mark of tensor memory allocated during the step, from the torch
  profiler's allocation events (CPU) or `torch.cuda.max_memory_allocated` (GPU);
- graph bytes: what autograd saved for backward during the step (saved-tensor hooks; tensors
  saved by two ops count twice), the memory that unrolled backprop grows with depth.
The forward solve is forced to run exactly N picard iterations (tol far below reach).

    python bench/memory.py [--device cpu|cuda] [--out bench/results/memory.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.profiler import ProfilerActivity, profile

from deq_server.core import IFT, DEQModel

ITERATIONS = (10, 50, 200)
MODES = ("implicit", "unrolled")
CONFIG = {"cell": "mlp", "in_features": 256, "hidden": 256, "out_features": 10}
BATCH = 256


def peak_allocated(events: list[tuple[int, int]]) -> int:
    """High-water mark of a sequence of (time, +alloc / -free bytes) events."""
    live = peak = 0
    for _, nbytes in sorted(events):
        live += nbytes
        peak = max(peak, live)
    return peak


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

    activities = [ProfilerActivity.CPU]
    with (
        profile(activities=activities, profile_memory=True) as prof,
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
    ):
        training_step(model, x, mode, iterations)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        events = prof.profiler.kineto_results.events()
        peak = peak_allocated(
            [(e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]"]
        )
    return {"mode": mode, "iterations": iterations, "peak_bytes": peak, "graph_bytes": graph}


def run_child(mode: str, iterations: int, device: str) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, __file__, "--child", mode, str(iterations), "--device", device],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def mib(n: int) -> str:
    return f"{n / 2**20:.2f}"


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
    print("| backward | forward iterations | peak MiB | autograd graph MiB |")
    print("|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['mode']} | {r['iterations']} | {mib(r['peak_bytes'])} | {mib(r['graph_bytes'])} |"
        )
    ratios = {}
    for mode in MODES:
        by_n = {r["iterations"]: r for r in rows if r["mode"] == mode}
        ratios[mode] = by_n[ITERATIONS[-1]]["peak_bytes"] / by_n[ITERATIONS[0]]["peak_bytes"]
        print(
            f"{mode}: peak at {ITERATIONS[-1]} / at {ITERATIONS[0]} iterations = {ratios[mode]:.2f}"
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
