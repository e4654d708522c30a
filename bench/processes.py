"""Several full server processes against one: the bound of a multi-process layout on this machine.

N deq servers (and, the ceiling measured the same way, N echo servers) run on separate loopback
ports, each the default configuration (bench/serving.py's `--serve`); the closed-loop load of
concurrency c is split evenly, c / N callers per process, one channel (one connection) each.
Sharing one port (SO_REUSEPORT) would only add the kernel's spreading of connections, so
separate ports measure what the layout can give. Layouts alternate for `--rounds` rounds, since
this VM's speed drifts. OIP ModelInfer, one digits sample per request, tol 1e-4.

    python bench/processes.py [--processes 1 2] [--concurrency 64] [--seconds 5] [--rounds 2]

A script, not a test: it prints a markdown table and writes the raw numbers as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serving  # the sibling script: its servers, payloads and closed loop

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "processes.json"
WARMUP_S = 1.0


async def split_level(
    servers: list[serving.Server], method: str, payloads: list[bytes], conc: int, seconds: float
) -> dict[str, Any]:
    """One closed-loop level, c / N callers on each server at once; pooled latencies."""
    channels = [grpc.aio.insecure_channel(s.target) for s in servers]
    try:
        calls = [(ch.unary_unary(method), s.pid) for ch, s in zip(channels, servers, strict=True)]
        per = conc // len(servers)  # main() checks that it divides
        await asyncio.gather(
            *(serving.closed_loop(c, payloads, per, WARMUP_S, p) for c, p in calls)
        )
        levels = await asyncio.gather(
            *(serving.closed_loop(c, payloads, per, seconds, p) for c, p in calls)
        )
    finally:
        for ch in channels:
            await ch.close()
    latencies = np.concatenate([np.asarray(lv.latencies) for lv in levels])
    wall = max(lv.wall_s for lv in levels)
    server_cpu = sum(lv.server_cpu_s or 0.0 for lv in levels)
    return {
        "rps": len(latencies) / wall,
        "p50_ms": float(np.median(latencies) * 1e3),
        "p99_ms": float(np.percentile(latencies, 99) * 1e3),
        "server_cpu_ms_per_req": server_cpu / len(latencies) * 1e3,
        "errors": sum(sum(lv.errors.values()) for lv in levels),
    }


async def run_layout(n: int, concurrency: list[int], seconds: float) -> list[dict[str, Any]]:
    x, _, _ = serving.digits(1)
    work = {
        "echo": (serving.ECHO_METHOD, [os.urandom(serving.ECHO_BYTES)]),
        "oip": (serving.OIP_METHOD, serving.oip_payloads(x, 1e-4)),
    }
    serves = {"echo": "echo", "oip": "deq"}  # which `--serve` answers each target
    rows = []
    async with AsyncExitStack() as stack:
        servers = {
            kind: [
                await stack.enter_async_context(serving.server_process(serves[kind]))
                for _ in range(n)
            ]
            for kind in work
        }
        for conc in concurrency:
            for kind, (method, payloads) in work.items():
                row = await split_level(servers[kind], method, payloads, conc, seconds)
                rows.append({"processes": n, "target": kind, "concurrency": conc, **row})
                print(f"processes={n} {kind} c={conc}: {row['rps']:.0f} req/s", file=sys.stderr)
    return rows


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """One line per round x layout x concurrency: OIP next to the echo of the same layout."""
    echo = {
        (r["round"], r["processes"], r["concurrency"]): r["rps"]
        for r in rows
        if r["target"] == "echo"
    }
    lines = [
        "| round | processes | conc | echo req/s | oip req/s | oip / echo | oip p50 ms "
        "| srv CPU ms/req |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["target"] != "oip":
            continue
        ceiling = echo[(r["round"], r["processes"], r["concurrency"])]
        lines.append(
            f"| {r['round']} | {r['processes']} | {r['concurrency']} | {ceiling:.0f} "
            f"| {r['rps']:.0f} | {r['rps'] / ceiling:.3f} | {r['p50_ms']:.1f} "
            f"| {r['server_cpu_ms_per_req']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    p.add_argument("--concurrency", type=int, nargs="+", default=[64])
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args()
    if min(args.processes) < 1 or min(args.concurrency) < 1 or args.seconds <= 0 or args.rounds < 1:
        p.error("--processes >= 1, --concurrency >= 1, --seconds > 0, --rounds >= 1")
    if any(c % n for c in args.concurrency for n in args.processes):
        p.error("every --concurrency must split evenly over every --processes count")
    started = time.perf_counter()
    rows = []
    for r in range(1, args.rounds + 1):
        for n in args.processes:
            rows += [
                row | {"round": r}
                for row in asyncio.run(run_layout(n, args.concurrency, args.seconds))
            ]
    table = markdown_table(rows)
    print(table)
    result = {
        "machine": serving.machine_info(),
        "config": vars(args) | {"out": str(args.out)},
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"machine: {json.dumps(result['machine'])}")
    print(f"total wall: {time.perf_counter() - started:.1f}s\nwrote {args.out}")


if __name__ == "__main__":
    main()
