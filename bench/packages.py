"""Exported `.pt2` packages against the same cell as a built-in module.

For the seed `mlp` cell (z' = tanh(W z + U x + b)) at a few widths and batch sizes it exports the
built-in model's inject/cell/head with `export_deq`, then measures, on the same weights:

- one cell evaluation (median over many calls), built-in vs exported, and their ratio (target
  <= 1.2x);
- a whole solve (anderson, tol 1e-4), built-in vs exported;
- a SlotPool step over a full pool (what the continuous scheduler runs);
- load time of the package vs the safetensors checkpoint, and the peak resident memory a fresh
  process adds while loading each (`ru_maxrss` after loading minus after imports).

    python bench/packages.py [--quick] [--out PATH]

A script, not a test: it prints a markdown table and writes the raw numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from deq_server.core import DEQModel, SlotPool, export_deq, load_checkpoint, save_checkpoint

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "packages.json"
TARGET = 1.2


class MLPInject(nn.Module):
    """The built-in mlp cell's injection as a module owning only its own weights."""

    def __init__(self, layer: Any) -> None:
        super().__init__()
        self.lin, self.shift, self.scale = layer.injection, layer.input_shift, layer.input_scale

    def forward(self, x: Tensor) -> Tensor:
        return self.lin((x.flatten(1) - self.shift) * self.scale)  # type: ignore[no-any-return]


class MLPCell(nn.Module):
    """z' = act(W z + inj), sharing the built-in cell's W."""

    def __init__(self, layer: Any) -> None:
        super().__init__()
        self.W, self.act = layer.W, layer.act

    def forward(self, z: Tensor, inj: Tensor) -> Tensor:
        return self.act(self.W(z) + inj)  # type: ignore[no-any-return]


class MLPHead(nn.Module):
    def __init__(self, layer: Any) -> None:
        super().__init__()
        self.out = layer.out

    def forward(self, z: Tensor) -> Tensor:
        return self.out(z)  # type: ignore[no-any-return]


def export_builtin(model: DEQModel, path: Path, example: Tensor) -> DEQModel:
    """The built-in model's three maps exported as a package (same weights)."""
    layer = model.layer
    return export_deq(
        path,
        inject=MLPInject(layer),
        cell=MLPCell(layer),
        head=MLPHead(layer),
        example_input=example,
    ).eval()


def median_time(fn: Callable[[], object], repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def pool_step_time(model: DEQModel, batch: int, repeat: int) -> float:
    """Median time of one SlotPool step with every slot busy (samples re-admitted as they go)."""
    pool = SlotPool(
        model.cell,
        slots=batch,
        state_shape=model.state_shape,
        inj_shape=model.state_shape,
        dtype=torch.float32,
    )
    x = torch.randn(batch, *model.input_shape)
    with torch.no_grad():
        inj = model.inject(x)

    def refill() -> None:
        free = pool.free
        if free:
            pool.admit(
                list(range(free)),
                torch.zeros(free, *model.state_shape),
                inj[:free],
                tol=torch.full((free,), 1e-30),
                max_iter=torch.full((free,), 10**6, dtype=torch.int64),
            )

    times = []
    with torch.no_grad():
        for _ in range(repeat + 3):
            refill()
            start = time.perf_counter()
            pool.step()
            times.append(time.perf_counter() - start)
    return statistics.median(times[3:])


def peak_load_rss(path: Path) -> float:
    """MB by which loading `path` raises a fresh process's peak resident memory above its
    resident memory after the imports (the peak is reset first: /proc/self/clear_refs)."""
    code = (
        "import sys, deq_server.core as c\n"
        "def kb(key):\n"
        "    for line in open('/proc/self/status'):\n"
        "        if line.startswith(key): return int(line.split()[1])\n"
        "open('/proc/self/clear_refs', 'w').write('5')\n"
        "base = kb('VmRSS:')\n"
        "c.load_checkpoint(sys.argv[1])\n"
        "print((kb('VmHWM:') - base) / 1024)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True
    )
    return float(out.stdout.strip().splitlines()[-1])


def case(hidden: int, batch: int, repeat: int, folder: Path) -> dict[str, Any]:
    torch.manual_seed(0)
    config = {"cell": "mlp", "in_features": 64, "hidden": hidden, "out_features": 10}
    builtin = DEQModel.from_config(config).eval()
    st_path = folder / f"mlp{hidden}.safetensors"
    pt2_path = folder / f"mlp{hidden}.pt2"
    save_checkpoint(builtin, st_path)
    x = torch.randn(batch, 64)
    exported = export_builtin(builtin, pt2_path, x)
    with torch.no_grad():
        z = torch.rand(batch, hidden)
        u_b, u_e = builtin.inject(x), exported.inject(x)
        assert torch.equal(builtin.cell(z, u_b), exported.cell(z, u_e))
        cell_b = median_time(lambda: builtin.cell(z, u_b), repeat)
        cell_e = median_time(lambda: exported.cell(z, u_e), repeat)
        solve_b = median_time(lambda: builtin(x, tol=1e-4), max(repeat // 20, 5))
        solve_e = median_time(lambda: exported(x, tol=1e-4), max(repeat // 20, 5))
    step_b = pool_step_time(builtin, batch, max(repeat // 4, 20))
    step_e = pool_step_time(exported, batch, max(repeat // 4, 20))
    load_st = median_time(lambda: load_checkpoint(st_path), 5)
    load_pt2 = median_time(lambda: load_checkpoint(pt2_path), 5)
    return {
        "hidden": hidden,
        "batch": batch,
        "cell_builtin_us": cell_b * 1e6,
        "cell_exported_us": cell_e * 1e6,
        "cell_ratio": cell_e / cell_b,
        "solve_builtin_ms": solve_b * 1e3,
        "solve_exported_ms": solve_e * 1e3,
        "solve_ratio": solve_e / solve_b,
        "pool_step_builtin_us": step_b * 1e6,
        "pool_step_exported_us": step_e * 1e6,
        "pool_step_ratio": step_e / step_b,
        "load_safetensors_ms": load_st * 1e3,
        "load_pt2_ms": load_pt2 * 1e3,
        "package_bytes": pt2_path.stat().st_size,
        "safetensors_bytes": st_path.stat().st_size,
    }


def load_memory(hidden: int, folder: Path) -> dict[str, Any]:
    """Peak memory of loading one mlp model of `hidden` (its W alone is hidden^2 floats)."""
    torch.manual_seed(0)
    config = {"cell": "mlp", "in_features": 64, "hidden": hidden, "out_features": 10}
    builtin = DEQModel.from_config(config).eval()
    st_path, pt2_path = folder / "big.safetensors", folder / "big.pt2"
    save_checkpoint(builtin, st_path)
    export_builtin(builtin, pt2_path, torch.randn(2, 64))
    weights = sum(t.numel() * t.element_size() for t in builtin.state_dict().values())
    return {
        "hidden": hidden,
        "weights_mb": weights / 2**20,
        "safetensors_mb": st_path.stat().st_size / 2**20,
        "package_mb": pt2_path.stat().st_size / 2**20,
        "peak_rss_load_safetensors_mb": peak_load_rss(st_path),
        "peak_rss_load_pt2_mb": peak_load_rss(pt2_path),
        "load_safetensors_ms": median_time(lambda: load_checkpoint(st_path), 3) * 1e3,
        "load_pt2_ms": median_time(lambda: load_checkpoint(pt2_path), 3) * 1e3,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer sizes and repeats")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args()
    torch.set_num_threads(1)
    sizes = (
        [(64, 1), (256, 64)] if args.quick else [(64, 1), (64, 64), (256, 1), (256, 64), (1024, 64)]
    )
    repeat = 200 if args.quick else 1000
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for hidden, batch in sizes:
            rows.append(case(hidden, batch, repeat, Path(tmp)))
        memory = load_memory(1024 if args.quick else 4096, Path(tmp))
    print(
        "| hidden | batch | cell built-in / exported (us) | ratio | solve (ms) | ratio | "
        "pool step (us) | ratio | load .safetensors / .pt2 (ms) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['hidden']} | {r['batch']} | {r['cell_builtin_us']:.1f} / {r['cell_exported_us']:.1f} "
            f"| {r['cell_ratio']:.2f} | {r['solve_builtin_ms']:.2f} / {r['solve_exported_ms']:.2f} "
            f"| {r['solve_ratio']:.2f} | {r['pool_step_builtin_us']:.0f} / {r['pool_step_exported_us']:.0f} "
            f"| {r['pool_step_ratio']:.2f} | {r['load_safetensors_ms']:.1f} / {r['load_pt2_ms']:.1f} |"
        )
    m = memory
    print(
        f"\nLoading hidden {m['hidden']} ({m['weights_mb']:.0f} MB of weights; files "
        f"{m['safetensors_mb']:.0f} / {m['package_mb']:.0f} MB): peak RSS added "
        f"{m['peak_rss_load_safetensors_mb']:.0f} MB (.safetensors) / "
        f"{m['peak_rss_load_pt2_mb']:.0f} MB (.pt2), load {m['load_safetensors_ms']:.0f} / "
        f"{m['load_pt2_ms']:.0f} ms"
    )
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
        "torch": torch.__version__,
        "threads": 1,
        "target_ratio": TARGET,
        "rows": rows,
        "load_memory": memory,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
