"""`deq-server --processes N` against one process: the multi-process layout on this machine.

One `deq-server` program (the bundled demo, the default configuration otherwise) runs with each
`--processes` count in turn, beside a grpc.aio echo server (the ceiling: one Python gRPC
process that does no work). The closed-loop load of concurrency c goes over `--connections`
channels, c / K callers on each (a channel is one connection, and the kernel gives each
connection to one of the server's processes: how evenly they spread is part of the result).
Layouts alternate for `--rounds` rounds, since this VM's speed drifts. OIP ModelInfer, one
digits sample per request, tol 1e-4. Server CPU is summed over the server's processes.

    python bench/processes.py [--processes 1 2] [--concurrency 1 64] [--connections 8]
        [--warmup 1]   # DEQ_* variables set the servers' configuration (DEQ_COMPILE_STEP=off, ...)

A script, not a test: it prints a markdown table and writes the raw numbers as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serving  # the sibling script: its echo server, payloads and closed loop

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "processes.json"
# The parent's ready line (a lone server's, or the --processes parent's; not a child's "[i]").
READY = re.compile(r"deq_server: deq-server ready: (?:\d+ processes on )?gRPC 127\.0\.0\.1:(\d+)")


def server_pids(pid: int) -> list[int]:
    """The server's processes: `pid` and the children it spawned (not the resource tracker)."""
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return [pid]
    return [pid] + [
        int(k) for k in kids if b"resource_tracker" not in Path(f"/proc/{k}/cmdline").read_bytes()
    ]


def cpu_s(pids: list[int]) -> float:
    return sum(serving.process_cpu_s(p) or 0.0 for p in pids)


@asynccontextmanager
async def deq_server(processes: int) -> AsyncIterator[tuple[str, list[int]]]:
    """`deq-server [--processes N]` on a free loopback port: its target and process ids."""
    args = ["--address=127.0.0.1:0", "--metrics-address=", "--model-dir="]
    if processes > 1:
        args.append(f"--processes={processes}")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "deq_server", *args, stderr=asyncio.subprocess.PIPE
    )
    assert proc.stderr is not None
    drain = None
    try:
        while True:
            line = await asyncio.wait_for(proc.stderr.readline(), serving.START_TIMEOUT_S)
            if not line:
                raise RuntimeError(f"deq-server exited with {await proc.wait()} before ready")
            if found := READY.search(line.decode()):
                break

        async def discard() -> None:  # keep the pipe from filling up
            assert proc.stderr is not None
            while await proc.stderr.readline():
                pass

        drain = asyncio.ensure_future(discard())
        target = f"127.0.0.1:{found[1]}"
        service = serving.pb.DESCRIPTOR.services_by_name["DEQService"].full_name
        await serving.wait_serving(target, service)
        yield target, server_pids(proc.pid)
    finally:
        if proc.returncode is None:
            proc.terminate()
        await asyncio.wait_for(proc.wait(), serving.STOP_TIMEOUT_S + 30)
        if drain is not None:
            drain.cancel()


async def level(
    target: str, pids: list[int], method: str, payloads: list[bytes], conc: int, args: Any
) -> dict[str, Any]:
    """One closed-loop level over K separate connections; pooled latencies."""
    k = min(args.connections, conc)
    options = [("grpc.use_local_subchannel_pool", 1)]  # a connection per channel
    channels = [grpc.aio.insecure_channel(target, options=options) for _ in range(k)]
    try:
        calls = [ch.unary_unary(method) for ch in channels]
        per = conc // k  # main() checks that it divides
        pid = pids[0]
        await asyncio.gather(
            *(serving.closed_loop(c, payloads, per, args.warmup, pid) for c in calls)
        )
        before = cpu_s(pids)
        levels = await asyncio.gather(
            *(serving.closed_loop(c, payloads, per, args.seconds, pid) for c in calls)
        )
        used = cpu_s(pids) - before
    finally:
        for ch in channels:
            await ch.close()
    latencies = np.concatenate([np.asarray(lv.latencies) for lv in levels])
    wall = max(lv.wall_s for lv in levels)
    return {
        "connections": k,
        "rps": len(latencies) / wall,
        "p50_ms": float(np.median(latencies) * 1e3),
        "p99_ms": float(np.percentile(latencies, 99) * 1e3),
        "server_cpu_ms_per_req": used / len(latencies) * 1e3,
        "errors": sum(sum(lv.errors.values()) for lv in levels),
    }


async def one_round(round_: int, args: Any) -> list[dict[str, Any]]:
    x, _, _ = serving.digits(1)
    oip = serving.oip_payloads(x, 1e-4)
    echo_payload = [os.urandom(serving.ECHO_BYTES)]
    rows = []
    async with serving.server_process("echo") as echo:
        for conc in args.concurrency:
            row = await level(
                echo.target, [echo.pid], serving.ECHO_METHOD, echo_payload, conc, args
            )
            rows.append(
                {"round": round_, "processes": 1, "target": "echo", "concurrency": conc, **row}
            )
    for n in args.processes:
        async with deq_server(n) as (target, pids):
            for conc in args.concurrency:
                row = await level(target, pids, serving.OIP_METHOD, oip, conc, args)
                rows.append(
                    {"round": round_, "processes": n, "target": "oip", "concurrency": conc, **row}
                )
                print(
                    f"round {round_} processes={n} c={conc}: {row['rps']:.0f} req/s",
                    file=sys.stderr,
                )
    return rows


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """One line per round x layout x concurrency, against the echo of the same round."""
    echo = {(r["round"], r["concurrency"]): r["rps"] for r in rows if r["target"] == "echo"}
    lines = [
        "| round | processes | conc | conns | echo req/s | oip req/s | oip / echo | oip p50 ms "
        "| srv CPU ms/req |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["target"] != "oip":
            continue
        ceiling = echo[(r["round"], r["concurrency"])]
        lines.append(
            f"| {r['round']} | {r['processes']} | {r['concurrency']} | {r['connections']} "
            f"| {ceiling:.0f} | {r['rps']:.0f} | {r['rps'] / ceiling:.3f} | {r['p50_ms']:.1f} "
            f"| {r['server_cpu_ms_per_req']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 64])
    p.add_argument("--connections", type=int, default=8, help="channels the load goes over")
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument(
        "--warmup",
        type=float,
        default=1.0,
        help="unmeasured seconds per level (with the compiled step, the CPU default: its compile)",
    )
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args()
    if min(args.processes) < 1 or min(args.concurrency) < 1 or args.connections < 1:
        p.error("--processes, --concurrency and --connections must be >= 1")
    if args.seconds <= 0 or args.rounds < 1:
        p.error("--seconds > 0 and --rounds >= 1")
    if any(c % min(args.connections, c) for c in args.concurrency):
        p.error("every --concurrency must split evenly over the connections")
    started = time.perf_counter()
    rows = []
    for r in range(1, args.rounds + 1):
        rows += asyncio.run(one_round(r, args))
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
