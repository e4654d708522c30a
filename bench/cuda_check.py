"""One prepared script for a GPU machine: the CUDA path against the CPU, then timings.

Checks, for every method, that solving on CUDA gives the CPU's statuses and iteration counts
(float64) and states within rounding, that implicit gradients agree, then times the seed-cell
benchmark (d=256, B=256, rel tol 1e-5, float32) on both devices. Prints a table, writes JSON.

    python bench/cuda_check.py [--out bench/results/cuda_check.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from deq_server.core import IFT, METHODS, DEQModel, solve

DEVICES = ("cpu", "cuda")  # the reference first


def problem(device: str, dtype: torch.dtype, d: int = 256, batch: int = 256) -> tuple[Any, Tensor]:
    """The seed cell tanh(W z + U x) with symmetric W at rho 0.95 and inputs of mixed scale."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    s = (a + a.T) / 2
    w = (0.95 * s / torch.linalg.matrix_norm(s, ord=2)).to(device=device, dtype=dtype)
    u = (torch.randn(d, d, generator=g, dtype=torch.float64) / d**0.5).to(
        device=device, dtype=dtype
    )
    scale = torch.logspace(-1.5, 0.5, batch, dtype=torch.float64)[:, None]
    x = (torch.randn(batch, d, generator=g, dtype=torch.float64) * scale).to(
        device=device, dtype=dtype
    )

    def f(z: Tensor, inj: Tensor) -> Tensor:
        return torch.tanh(z @ w.T + inj)

    return f, x @ u.T


def check_solvers() -> list[dict[str, Any]]:
    rows = []
    for method in sorted(METHODS):
        out = {}
        for device in DEVICES:
            f, inj = problem(device, torch.float64, d=64, batch=32)
            out[device] = solve(
                f, torch.zeros_like(inj), args=(inj,), tol=1e-10, max_iter=300, method=method
            )
        cpu, gpu = out[DEVICES[0]], out[DEVICES[1]]
        rows.append(
            {
                "method": method,
                "same_status": bool(torch.equal(cpu.status, gpu.status.cpu())),
                "same_iterations": bool(torch.equal(cpu.iterations, gpu.iterations.cpu())),
                "max_state_diff": float((cpu.z - gpu.z.cpu()).abs().max()),
            }
        )
    return rows


def check_gradients() -> dict[str, float]:
    grads = {}
    for device in DEVICES:
        torch.manual_seed(0)
        model = (
            DEQModel.from_config(
                {"cell": "mlp", "in_features": 16, "hidden": 32, "out_features": 4}
            )
            .double()
            .to(device)
        )
        x = torch.randn(8, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        x = x.to(device).requires_grad_()
        y, _ = model(x, tol=1e-12, max_iter=500, backward=IFT(tol=1e-12, max_iter=500))
        y.square().sum().backward()
        grads[device] = torch.cat(
            [x.grad.flatten(), *(p.grad.flatten() for p in model.parameters())]
        )
    ref, other = grads[DEVICES[0]], grads[DEVICES[1]].cpu()
    diff = (ref - other).norm() / ref.norm()
    return {"relative_gradient_difference": float(diff)}


def time_solves(repeats: int = 5) -> list[dict[str, Any]]:
    rows = []
    for device in DEVICES:
        f, inj = problem(device, torch.float32)
        for method in sorted(METHODS):
            runs = []
            for _ in range(repeats + 1):
                if device == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                r = solve(
                    f, torch.zeros_like(inj), args=(inj,), tol=1e-5, max_iter=500, method=method
                )
                if device == "cuda":
                    torch.cuda.synchronize()
                runs.append(time.perf_counter() - start)
            rows.append(
                {
                    "device": device,
                    "method": method,
                    "batch_evals": r.steps,
                    "mean_sample_evals": float(r.iterations.double().mean()),
                    "converged": int(r.converged.sum()),
                    "wall_ms_median": sorted(runs[1:])[repeats // 2] * 1e3,
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/cuda_check.json"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this script is for a GPU machine")
    torch.set_num_threads(2)
    report = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "solvers": check_solvers(),
        "gradients": check_gradients(),
        "timings": time_solves(),
    }
    for row in report["solvers"]:
        print(row)
    print(report["gradients"])
    print("| device | method | batch f-evals | mean f-evals | converged | wall ms |")
    print("|---|---|---|---|---|---|")
    for r in report["timings"]:
        print(
            f"| {r['device']} | {r['method']} | {r['batch_evals']} | "
            f"{r['mean_sample_evals']:.1f} | {r['converged']} | {r['wall_ms_median']:.1f} |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
