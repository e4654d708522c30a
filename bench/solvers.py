"""Benchmark deq_server.core.solve against torchdeq 0.1.0 on a seed tanh cell.

Cell f(z, inj) = tanh(z @ W.T + inj), inj = x @ U.T, with W = rho * S (S symmetric, spectral
norm 1) or W = rho * Q (Q orthogonal), d = B = 256 and inputs of mixed scale: sample i is scaled
by logspace(-1.5, 0.5, B)[i]. Every solver gets the same W, U, x, rel tol 1e-5 and max_iter.

For each family x rho x method it reports batch-level f-evaluations, mean per-sample
f-evaluations, converged samples and wall time (median after one warm-up), and for our methods the
"solo" cost: the same subset of samples solved one at a time (B = 1), compared with the batched
per-sample counts of that subset (row-local methods should give a ratio near 1).

    python bench/solvers.py [--quick] [--out PATH] [--no-torchdeq] [--solo-samples N]

A script, not a test: it prints a markdown table and writes the raw numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from deq_server.core import Status, solve

D = 256
BATCH = 256
TOL = 1e-5
MAX_ITER = 500
RHOS = (0.9, 0.95, 0.99)
FAMILIES = ("symmetric", "orthogonal")
SEED = 0
THREADS = 2
DTYPE = torch.float32
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "solvers.json"
SOLO_TARGET = 1.1  # batched per-sample evals / solo evals should stay below this

Cell = Callable[[Tensor, Tensor], Tensor]

TORCHDEQ_NOTE = (
    "torchdeq 0.1.0 stopping rule (read from torchdeq/solver/*.py): it computes per-sample "
    "residuals (rel: ||f(z)-z|| / (||f(z)|| + 1e-9)) but stops the whole batch only when the "
    "batch MAX of the current step's residuals is < tol, so every row is evaluated at every step "
    "until the slowest sample converges (or max_iter); it then returns each sample's "
    "lowest-residual iterate seen. fixed_point_iter and anderson return f(x) for the best x (the "
    "residual was measured at x); broyden returns x. anderson (m=6, fixed ridge lam=1e-4 on "
    "G G^T, not scaled with the residual) spends 2 unchecked f calls before its loop. broyden "
    "(ls=False, LBFGS_thres=None: keeps max_iter rank-one terms, no limited memory) makes 1 f call "
    "before its loop and also stops once, after 30 steps, the batch-max residual is < 3*tol and "
    "has moved by < 1.3x over the last 30 steps, so it can return with some rows above tol. "
    "torchdeq f-evaluations here are counted by wrapping f (each call evaluates all B rows); its "
    "converged count is recomputed as ||f(z)-z||/||f(z)|| <= tol on the z it returns."
)


@dataclass(frozen=True)
class Problem:
    """One family/rho configuration: the cell's weight and the batch's injection."""

    family: str
    rho: float
    w_t: Tensor  # W transposed, contiguous (d, d)
    inj: Tensor  # (B, d) = x @ U.T

    def cell(self) -> Cell:
        """The fixed-point map f(z, inj) = tanh(z @ W.T + inj); closes over W only."""
        w_t = self.w_t

        def f(z: Tensor, inj: Tensor) -> Tensor:
            return torch.tanh(torch.addmm(inj, z, w_t))

        return f


@dataclass(frozen=True)
class Spec:
    """A solver to benchmark: implementation, method name and options."""

    impl: str  # "ours" | "torchdeq"
    method: str
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        opts = ", ".join(f"{k}={v}" for k, v in self.options.items())
        return f"{self.method} ({opts})" if opts else self.method


@dataclass
class Outcome:
    """What one batched solve produced."""

    batch_evals: int
    sample_evals: Tensor  # (B,) f-evaluations spent on each sample
    converged: int  # by the solver's own verdict (ours) or recomputed (torchdeq)
    residual: Tensor  # (B,) recomputed rel residual of the returned z
    wall_s: float  # the solve call alone (not the residual recomputation)
    extra: dict[str, Any] = field(default_factory=dict)


class Counted:
    """Wraps f and counts batched calls."""

    def __init__(self, fn: Cell) -> None:
        self.fn = fn
        self.calls = 0

    def __call__(self, z: Tensor, inj: Tensor) -> Tensor:
        self.calls += 1
        return self.fn(z, inj)


OUR_SPECS = (
    Spec("ours", "picard"),
    Spec("ours", "anderson"),
    Spec("ours", "anderson", {"m": 8}),
    Spec("ours", "broyden"),
)
TORCHDEQ_SPECS = (
    Spec("torchdeq", "fixed_point_iter"),
    Spec("torchdeq", "anderson"),
    Spec("torchdeq", "broyden"),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--quick", action="store_true", help="only rho=0.95, one timed run")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"default {DEFAULT_OUT}")
    p.add_argument("--no-torchdeq", action="store_true", help="skip the torchdeq comparison")
    p.add_argument(
        "--solo-samples", type=int, default=64, help="samples solved alone per row (0 = skip)"
    )
    p.add_argument("--repeats", type=int, default=None, help="timed runs (default 3, quick 1)")
    p.add_argument(
        "--slow-s",
        type=float,
        default=3.0,
        help="a solver whose warm-up run exceeds this many seconds is timed once",
    )
    return p.parse_args(argv)


def make_problem(family: str, rho: float) -> Problem:
    """Seeded W for the family, and the shared seeded U and mixed-scale x."""
    gen = torch.Generator().manual_seed(SEED)
    U = torch.randn(D, D, generator=gen, dtype=DTYPE) / D**0.5
    scale = torch.logspace(-1.5, 0.5, BATCH, dtype=DTYPE)
    x = torch.randn(BATCH, D, generator=gen, dtype=DTYPE) * scale[:, None]
    wgen = torch.Generator().manual_seed(SEED + 1 + FAMILIES.index(family))
    A = torch.randn(D, D, generator=wgen, dtype=torch.float64)
    if family == "symmetric":
        S = (A + A.T) / 2
        base = S / torch.linalg.matrix_norm(S, ord=2)
    elif family == "orthogonal":
        base = torch.linalg.qr(A).Q
    else:
        raise ValueError(f"unknown family {family!r}")
    W = (rho * base).to(DTYPE)
    return Problem(family, rho, W.T.contiguous(), x @ U.T)


def rel_residual(f: Cell, z: Tensor, inj: Tensor) -> Tensor:
    """Per-sample ||f(z) - z|| / ||f(z)||."""
    with torch.no_grad():
        fz = f(z, inj)
        return (fz - z).norm(dim=1) / fz.norm(dim=1).clamp_min(torch.finfo(z.dtype).tiny)


def run_ours(spec: Spec, prob: Problem) -> Outcome:
    """One batched solve with deq_server.core.solve."""
    f = Counted(prob.cell())
    z0 = torch.zeros_like(prob.inj)
    t0 = time.perf_counter()
    res = solve(
        f,
        z0,
        args=(prob.inj,),
        tol=TOL,
        max_iter=MAX_ITER,
        method=spec.method,
        stop_mode="rel",
        **spec.options,
    )
    wall_s = time.perf_counter() - t0
    recomputed = rel_residual(prob.cell(), res.z, prob.inj)
    return Outcome(
        batch_evals=res.steps,
        sample_evals=res.iterations,
        converged=int((res.status == Status.CONVERGED).sum()),
        residual=recomputed,
        wall_s=wall_s,
        extra={
            "f_calls_counted": f.calls,
            "converged_recomputed": int((recomputed <= TOL).sum()),
            "status_counts": {s.name: int((res.status == s).sum()) for s in Status},
        },
    )


def torchdeq_solvers() -> dict[str, Callable[..., Any]]:
    """torchdeq's solvers by name; raises ImportError when torchdeq is not installed."""
    from torchdeq.solver import anderson_solver, broyden_solver, fixed_point_iter

    return {
        "fixed_point_iter": fixed_point_iter,
        "anderson": anderson_solver,
        "broyden": broyden_solver,
    }


def run_torchdeq(spec: Spec, prob: Problem, solvers: dict[str, Callable[..., Any]]) -> Outcome:
    """One batched solve with a torchdeq solver on the same cell, z0, tol and max_iter."""
    f = Counted(prob.cell())
    inj = prob.inj
    z0 = torch.zeros_like(inj)
    t0 = time.perf_counter()
    with torch.no_grad():
        z, _, info = solvers[spec.method](
            lambda z: f(z, inj), z0, max_iter=MAX_ITER, tol=TOL, stop_mode="rel", **spec.options
        )
    wall_s = time.perf_counter() - t0
    residual = rel_residual(prob.cell(), z, inj)
    return Outcome(
        batch_evals=f.calls,
        sample_evals=torch.full((BATCH,), f.calls, dtype=torch.int64),
        converged=int((residual <= TOL).sum()),
        residual=residual,
        wall_s=wall_s,
        extra={"reported_rel_lowest_max": float(info["rel_lowest"].max())},
    )


def timed(run: Callable[[], Outcome], repeats: int, slow_s: float) -> tuple[Outcome, list[float]]:
    """One warm-up run, then `repeats` timed runs (one when the warm-up exceeded slow_s).

    Each run times its own solve call (perf_counter); the last run's outcome is returned.
    """
    out = run()
    times = []
    for _ in range(1 if out.wall_s > slow_s else repeats):
        out = run()
        times.append(out.wall_s)
    return out, times


def solo_evals(spec: Spec, prob: Problem, indices: Tensor) -> Tensor:
    """f-evaluations of each listed sample solved alone (B = 1) with the same method/options."""
    f = prob.cell()
    counts = []
    for i in indices.tolist():
        inj = prob.inj[i : i + 1]
        res = solve(
            f,
            torch.zeros_like(inj),
            args=(inj,),
            tol=TOL,
            max_iter=MAX_ITER,
            method=spec.method,
            stop_mode="rel",
            **spec.options,
        )
        counts.append(int(res.iterations[0]))
    return torch.tensor(counts, dtype=torch.int64)


def solo_indices(n: int) -> Tensor:
    """n evenly spaced batch indices (all of them when n >= B)."""
    n = min(n, BATCH)
    return (
        torch.linspace(0, BATCH - 1, n).round().long().unique()
        if n > 0
        else torch.empty(0, dtype=torch.long)
    )


def bench_row(
    spec: Spec,
    prob: Problem,
    args: argparse.Namespace,
    solvers: dict[str, Callable[..., Any]] | None,
) -> dict[str, Any]:
    """Benchmark one family/rho/method and return its raw numbers."""
    if spec.impl == "ours":
        out, times = timed(lambda: run_ours(spec, prob), args.repeats, args.slow_s)
    else:
        assert solvers is not None
        out, times = timed(lambda: run_torchdeq(spec, prob, solvers), args.repeats, args.slow_s)
    row: dict[str, Any] = {
        "family": prob.family,
        "rho": prob.rho,
        "impl": spec.impl,
        "method": spec.method,
        "options": spec.options,
        "label": spec.label,
        "batch_evals": out.batch_evals,
        "mean_sample_evals": float(out.sample_evals.double().mean()),
        "converged": out.converged,
        "batch": BATCH,
        "residual_max": float(out.residual.max()),
        "residual_median": float(out.residual.median()),
        "wall_s_median": statistics.median(times),
        "wall_s_runs": times,
        "loadavg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        **out.extra,
    }
    if spec.impl == "ours" and args.solo_samples > 0:
        idx = solo_indices(args.solo_samples)
        t0 = time.perf_counter()
        solo = solo_evals(spec, prob, idx)
        solo_wall = time.perf_counter() - t0
        batched = out.sample_evals[idx]
        row["solo"] = {
            "indices": idx.tolist(),
            "solo_evals": solo.tolist(),
            "batched_evals": batched.tolist(),
            "solo_mean": float(solo.double().mean()),
            "batched_mean": float(batched.double().mean()),
            "ratio": float(batched.double().mean() / solo.double().mean()),
            "wall_s": solo_wall,
        }
    return row


def machine_info() -> dict[str, Any]:
    """Where the numbers came from."""
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": sys.version.split()[0],
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "loadavg_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def _fmt_solo(row: dict[str, Any]) -> tuple[str, str, str]:
    solo = row.get("solo")
    if solo is None:
        return "-", "-", "-"
    return f"{solo['solo_mean']:.1f}", f"{solo['batched_mean']:.1f}", f"{solo['ratio']:.3f}"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """One line per family/rho/method."""
    head = (
        "| family | rho | impl | method | batch f-evals | mean f-evals/sample | converged "
        "| wall ms (median) | solo mean f-evals | batched mean (same subset) | batched/solo |"
    )
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        solo_mean, batched_mean, ratio = _fmt_solo(r)
        lines.append(
            f"| {r['family']} | {r['rho']} | {r['impl']} | {r['label']} | {r['batch_evals']} "
            f"| {r['mean_sample_evals']:.1f} | {r['converged']}/{r['batch']} "
            f"| {1e3 * r['wall_s_median']:.1f} | {solo_mean} | {batched_mean} | {ratio} |"
        )
    return "\n".join(lines)


def sanity_notes(rows: list[dict[str, Any]]) -> list[str]:
    """Flag disagreements between our solver's own bookkeeping and independent checks."""
    notes = []
    for r in rows:
        if r["impl"] != "ours":
            continue
        where = f"{r['family']} rho={r['rho']} {r['label']}"
        if r["f_calls_counted"] != r["batch_evals"]:
            notes.append(
                f"{where}: steps={r['batch_evals']} but f was called {r['f_calls_counted']}x"
            )
        if r["converged_recomputed"] != r["converged"]:
            notes.append(
                f"{where}: {r['converged']} CONVERGED by status but {r['converged_recomputed']} "
                "with recomputed residual <= tol"
            )
        solo = r.get("solo")
        if solo is not None and solo["ratio"] > SOLO_TARGET:
            notes.append(f"{where}: batched/solo ratio {solo['ratio']:.3f} > {SOLO_TARGET}")
    return notes


def load_torchdeq(skip: bool) -> tuple[dict[str, Callable[..., Any]] | None, str]:
    """torchdeq's solvers (or None) and the note to print about them."""
    if skip:
        return None, "torchdeq skipped (--no-torchdeq)."
    try:
        return torchdeq_solvers(), TORCHDEQ_NOTE
    except ImportError as exc:
        return None, f"torchdeq skipped: not importable ({exc}); pip install -e '.[bench]'."


def run_all(
    args: argparse.Namespace, rhos: tuple[float, ...], solvers: dict[str, Callable[..., Any]] | None
) -> list[dict[str, Any]]:
    """Every family x rho x method row, with progress on stderr."""
    specs = OUR_SPECS + (TORCHDEQ_SPECS if solvers is not None else ())
    rows = []
    start = time.perf_counter()
    for family in FAMILIES:
        for rho in rhos:
            prob = make_problem(family, rho)
            for spec in specs:
                rows.append(bench_row(spec, prob, args, solvers))
                elapsed = time.perf_counter() - start
                print(f"[{elapsed:6.1f}s] {family} {rho} {spec.impl} {spec.label}", file=sys.stderr)
    return rows


def run_config(args: argparse.Namespace, rhos: tuple[float, ...], wall_s: float) -> dict[str, Any]:
    """The settings the numbers were taken with."""
    return {
        "d": D,
        "batch": BATCH,
        "tol": TOL,
        "stop_mode": "rel",
        "max_iter": MAX_ITER,
        "dtype": str(DTYPE),
        "seed": SEED,
        "rhos": list(rhos),
        "families": list(FAMILIES),
        "scales": "logspace(-1.5, 0.5, B)",
        "z0": "zeros",
        "repeats": args.repeats,
        "slow_s": args.slow_s,
        "solo_samples": args.solo_samples,
        "total_wall_s": wall_s,
        "loadavg_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the table and notes, write the JSON."""
    args = parse_args(argv)
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    torch.set_num_threads(THREADS)
    torch.manual_seed(SEED)
    machine = machine_info()
    solvers, torchdeq_note = load_torchdeq(args.no_torchdeq)
    rhos = (0.95,) if args.quick else RHOS

    start = time.perf_counter()
    rows = run_all(args, rhos, solvers)
    config = run_config(args, rhos, time.perf_counter() - start)
    notes = [torchdeq_note, *sanity_notes(rows)]

    print(markdown_table(rows))
    print()
    for note in notes:
        print(f"Note: {note}\n")
    print(f"machine: {json.dumps(machine)}")
    print(f"total wall: {config['total_wall_s']:.1f}s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"machine": machine, "config": config, "notes": notes, "rows": rows}
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
