"""One prepared script for a GPU machine: the CUDA path against the CPU, then timings.

Checks, for every method, that solving on CUDA gives the CPU's statuses and iteration counts
(float64) and states within rounding, that implicit gradients agree, that a `SlotPool` with
staggered arrivals gives the CPU's per-sample answers (eager, and compiled as --compile-step
compiles it), that the request-level lanes' compiled iteration (`CompiledIteration`, AOTInductor)
does too, then times the seed-cell benchmark
(d=256, B=256, rel tol 1e-5, float32) on both devices, a `SlotPool` step against its busy rows
(flat on a GPU is the regime where continuous batching pays), and the request-level and
continuous schedulers in process on bench/scheduler.py's traces. Prints tables, writes JSON.

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

from deq_server.core import (
    IFT,
    METHODS,
    CompiledIteration,
    DEQModel,
    SlotPool,
    load_checkpoint,
    make_method,
    solve,
)
from deq_server.models import bundled_checkpoints

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


def _digits(device: str, dtype: torch.dtype) -> DEQModel:
    return load_checkpoint(bundled_checkpoints()["digits"]).to(device, dtype).eval().frozen()


def _program(model: DEQModel) -> CompiledIteration:
    """The model's iteration as --compile-step builds it for a request-level lane."""
    x = torch.zeros(2, 64, dtype=next(model.parameters()).dtype, device=model_device(model))
    with torch.no_grad():
        z0, inj = model.init_state(x), model.inject(x)
    return CompiledIteration(
        model.cell, make_method("anderson"), z0, [inj], stop_mode="rel", divergence=1e5,
        max_rows=256,
    )  # fmt: skip


def model_device(model: DEQModel) -> torch.device:
    return next(model.parameters()).device


def check_compiled_iteration(repeats: int = 200) -> dict[str, Any]:
    """--compile-step's request-level path on CUDA: the digits model's CompiledIteration
    (float64) against the CPU's eager solve of 15 samples at their own tolerances, then a lone
    sample's solve (float32) eager and compiled on each device, p50 over `repeats`."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(15, 64, generator=g, dtype=torch.float64) * 16
    tol = torch.tensor([10.0 ** -(2 + i % 9) for i in range(15)], dtype=torch.float64)
    with torch.no_grad():
        _, ref = _digits("cpu", torch.float64)(x, tol=tol, max_iter=60)
        gpu = _digits("cuda", torch.float64)
        _, got = gpu(x.cuda(), tol=tol.cuda(), max_iter=60, iteration=_program(gpu))
    out: dict[str, Any] = {
        "same_status": bool(torch.equal(ref.status, got.status.cpu())),
        "same_iterations": bool(torch.equal(ref.iterations, got.iterations.cpu())),
        "max_state_diff": float((ref.z - got.z.cpu()).abs().max()),
        "lone_solve_p50_ms": {},
    }
    for device in DEVICES:
        model = _digits(device, torch.float32)
        program = _program(model)
        lone = x[:1].float().to(device)
        for name, iteration in (("eager", None), ("compiled", program)):
            runs = []
            with torch.inference_mode():
                for _ in range(repeats + 10):
                    start = time.perf_counter()
                    model(lone, tol=1e-4, iteration=iteration)
                    if device == "cuda":
                        torch.cuda.synchronize()
                    runs.append(time.perf_counter() - start)
            out["lone_solve_p50_ms"][f"{device} {name}"] = sorted(runs[10:])[repeats // 2] * 1e3
    return out


def run_pool(device: str, method: str, compile: bool = False) -> dict[Any, tuple[int, int, Tensor]]:
    """32 samples of the float64 problem through a 6-slot pool, a few admitted every step
    (with `compile`, the torch.compile'd step of --compile-step)."""
    f, inj = problem(device, torch.float64, d=64, batch=32)
    pool = SlotPool(
        f,
        slots=6,
        state_shape=(64,),
        inj_shape=(64,),
        dtype=torch.float64,
        device=device,
        method=method,
        compile=compile,
    )
    tol = torch.tensor([1e-3, 1e-6, 1e-10, 1e-8] * 8, dtype=torch.float64, device=device)
    cap = torch.full((32,), 300, device=device)
    waiting, out = list(range(32)), {}
    while waiting or pool.busy:
        take = waiting[: min(pool.free, 2)]
        waiting = waiting[len(take) :]
        if take:
            at = torch.tensor(take, device=device)
            pool.admit(
                take,
                torch.zeros(len(take), 64, dtype=torch.float64, device=device),
                inj[at],
                tol[at],
                cap[at],
            )
        retired = pool.step()
        for j, i in enumerate(retired.owners if retired is not None else []):
            out[i] = (int(retired.iterations[j]), int(retired.status[j]), retired.z[j].cpu())
    return out


def check_slots() -> list[dict[str, Any]]:
    rows = []
    for method, compile in (("anderson", False), ("picard", False), ("anderson", True)):
        cpu, gpu = run_pool("cpu", method), run_pool("cuda", method, compile)
        rows.append(
            {
                "method": method,
                "cuda_compiled": compile,
                "same_iterations_and_status": all(cpu[i][:2] == gpu[i][:2] for i in cpu),
                "max_state_diff": max(float((cpu[i][2] - gpu[i][2]).abs().max()) for i in cpu),
            }
        )
    return rows


def time_slot_steps(device: str, repeats: int = 50, compile: bool = False) -> list[dict[str, Any]]:
    """ms per SlotPool step of the digits model (float32) against its busy rows (eager, or
    compiled as with --compile-step; the first step, which compiles, is not timed)."""
    model = load_checkpoint(bundled_checkpoints()["digits"]).eval().to(device).frozen()
    rows = []
    with torch.no_grad():
        for busy in (8, 32, 128, 512, 2048):
            x = torch.randint(0, 17, (busy, 64), device=device).float()
            pool = SlotPool(
                model.cell,
                slots=busy,
                state_shape=(64,),
                inj_shape=(64,),
                dtype=torch.float32,
                device=device,
                compile=compile,
            )
            never = torch.full((busy,), 1e-30, device=device)
            pool.admit(
                list(range(busy)),
                torch.zeros(busy, 64, device=device),
                model.inject(x),
                never,
                torch.full((busy,), 10**9, device=device),
            )
            pool.step()
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(repeats):
                pool.step()
            if device == "cuda":
                torch.cuda.synchronize()
            rows.append(
                {
                    "device": device,
                    "compiled": compile,
                    "busy": busy,
                    "ms_per_step": (time.perf_counter() - start) * 1e3 / repeats,
                }
            )
    return rows


def time_schedulers(device: str) -> dict[str, Any]:
    """bench/scheduler.py's in-process comparison with the models on `device`."""
    import argparse as _argparse
    import random

    from scheduler import in_process, make_trace, seed_model

    args = _argparse.Namespace(inflight=128, slots=512)
    out = {}
    for workload in ("digits", "seed256"):
        if workload == "digits":
            model = load_checkpoint(bundled_checkpoints()["digits"]).eval()
        else:
            model = seed_model()
        trace = make_trace(workload, random.Random(0))[:2000]
        out[workload] = in_process(model.to(device), trace, args)
    return out


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
        "slots": check_slots(),
        "compiled_iteration": check_compiled_iteration(),
        "slot_steps": time_slot_steps("cpu")
        + time_slot_steps("cuda")
        + time_slot_steps("cuda", compile=True),
        "schedulers_in_process": {d: time_schedulers(d) for d in DEVICES},
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
    for row in report["slots"]:
        print(row)
    print("compiled iteration (--compile-step, request-level):", report["compiled_iteration"])
    print("| device | compiled | busy rows | SlotPool ms / step |\n|---|---|---|---|")
    for r in report["slot_steps"]:
        print(f"| {r['device']} | {r['compiled']} | {r['busy']} | {r['ms_per_step']:.3f} |")
    print("in-process samples/s:", json.dumps(report["schedulers_in_process"]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
