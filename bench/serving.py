"""Closed-loop Infer load on loopback next to a do-nothing grpc.aio echo server (the ceiling).

The servers run in subprocesses of this script (`--serve deq|echo`, which print their port as
JSON and stop when their stdin closes); readiness is the gRPC health check. The load generator is
one grpc.aio client in this process: `c` coroutines each send a request, await its response and
send the next, for a fixed duration per concurrency level after a warm-up. Infer (deq.v1) and
ModelInfer (the Open Inference Protocol, as tritonclient sends it: raw FP32, tol a double
parameter) send B held-out `digits` samples per request (raw pixels in [0, 16]); echo sends 256
random bytes through a generic handler that returns them. All go through the same loop, as raw
bytes.

Per level it reports requests/s, p50/p99 latency, mean solver iterations, the responses'
server-side timings and the CPU seconds per request spent by the server process and the client.

    python bench/serving.py [--seconds 10] [--concurrency 1 16 64] [--tol T] [--batch 1] [--out P]

The served configuration is the default one; DEQ_* variables change it (DEQ_SCHEDULER=request,
DEQ_COMPILE_STEP=off, ...). Where the compiled step is on (the default on a CPU with a C++
compiler), the deq server answers one request and waits for its compile before it reports ready,
so every level measures the compiled iteration.

A script, not a test: it prints a markdown table and writes the raw numbers as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from google.protobuf import json_format
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from deq_client.pb.deq.v1 import deq_pb2 as pb
from deq_client.pb.deq.v1 import deq_pb2_grpc
from deq_client.pb.inference import grpc_service_pb2 as oip

MODEL = "digits"
INFER_METHOD = "/deq.v1.DEQService/Infer"
OIP_METHOD = "/inference.GRPCInferenceService/ModelInfer"
ECHO_SERVICE = "bench.v1.Echo"
ECHO_METHOD = f"/{ECHO_SERVICE}/Echo"
ECHO_BYTES = 256
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "serving.json"
TARGET_FRACTION = 0.4  # the fast-path issue's target: req/s at concurrency 64 / echo req/s
CALL_TIMEOUT_S = 10.0  # per RPC
START_TIMEOUT_S = 120.0  # server start + readiness
STOP_TIMEOUT_S = 15.0
MAX_ERRORS = 100  # per level: stop the level early rather than spin on a dead server
MAX_REQUESTS_PER_S = 100_000  # hard count bound per level: seconds * this


# --- servers (subprocess side) -------------------------------------------------------------


async def _echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return request


async def serve(kind: str) -> None:
    """Start a `deq` or `echo` server on 127.0.0.1:0, print its port, stop when stdin closes."""
    if kind == "deq":
        import torch

        from deq_server.serving.app import compile_step_for, start_server
        from deq_server.serving.compiled_step import COMPILE_TIMEOUT_S, wait_idle
        from deq_server.serving.config import parse_config

        # the defaults, on free loopback ports; DEQ_* variables (DEQ_SCHEDULER=request,
        # DEQ_COMPILE_STEP=off, ...) set the rest
        config = parse_config(
            ["--address=127.0.0.1:0", "--metrics-address=127.0.0.1:0", "--model-dir="]
        )
        running = await start_server(config, freeze_imports=True)  # as deq-server does
        port, stop = running.port, running.stop
        compiled, compile_step = compile_step_for(config, running.registry.device)
        if compiled:  # one request makes the lane, which queues its compile: wait for it
            x, _, _ = digits(1)
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                await channel.unary_unary(OIP_METHOD)(oip_payloads(x, None)[0], timeout=60)
            done = await asyncio.get_running_loop().run_in_executor(
                None, wait_idle, COMPILE_TIMEOUT_S
            )
            if not done:
                raise RuntimeError("the compiled step was not built in time")
        settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()}
        settings |= {
            "scheduler": type(running.scheduler).__name__,
            "device": str(running.registry.device),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "torch_interop_threads": torch.get_num_interop_threads(),
            "compile_step": compile_step,
        }
    else:
        server = grpc.aio.server()
        handler = grpc.unary_unary_rpc_method_handler(_echo)  # no (de)serializers: raw bytes
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(ECHO_SERVICE, {"Echo": handler}),)
        )
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        stop, settings = server.stop, {"handler": "generic unary, returns the request bytes"}
    print(json.dumps({"port": port, "settings": settings}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # EOF: parent is done
    await stop(0)


# --- servers (parent side) -----------------------------------------------------------------


@dataclass
class Server:
    """A running server subprocess."""

    kind: str
    pid: int
    port: int
    settings: dict[str, Any]

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"


async def wait_serving(target: str, service: str) -> None:
    """Wait (bounded by START_TIMEOUT_S) for the server to answer a health Check with SERVING.

    Both servers print their port only after setting SERVING, so one Check that waits for the
    connection is enough. (Check, not Watch: the deq server's metrics interceptor breaks Watch.)
    """
    async with grpc.aio.insecure_channel(target) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service),
            timeout=START_TIMEOUT_S,
            wait_for_ready=True,
        )
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        raise RuntimeError(f"{target}: health {service!r} is {reply.status}, not SERVING")


@asynccontextmanager
async def server_process(kind: str) -> AsyncIterator[Server]:
    """Run `--serve kind` in a subprocess; close its stdin (then kill) on exit."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        os.path.abspath(__file__),
        "--serve",
        kind,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdin is not None
    assert proc.stdout is not None
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), START_TIMEOUT_S)
        if not line:
            raise RuntimeError(f"{kind} server exited with {await proc.wait()} before its port")
        info = json.loads(line)
        server = Server(kind, proc.pid, info["port"], info["settings"])
        service = pb.DESCRIPTOR.services_by_name["DEQService"].full_name if kind == "deq" else ""
        await wait_serving(server.target, service)
        yield server
    finally:
        proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), STOP_TIMEOUT_S)
        except TimeoutError:
            proc.kill()
            await proc.wait()


def process_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of a process so far (Linux /proc; None elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def self_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


# --- load ----------------------------------------------------------------------------------


@dataclass
class Level:
    """What one closed-loop run at one concurrency saw."""

    latencies: list[float] = field(default_factory=list)
    responses: list[tuple[int, bytes]] = field(default_factory=list)  # (payload index, bytes)
    errors: Counter[str] = field(default_factory=Counter)
    wall_s: float = 0.0
    server_cpu_s: float | None = None
    client_cpu_s: float = 0.0


async def closed_loop(
    call: grpc.aio.UnaryUnaryMultiCallable,
    payloads: Sequence[bytes],
    concurrency: int,
    seconds: float,
    server_pid: int,
) -> Level:
    """`concurrency` workers, each one request in flight, until `seconds` have passed."""
    level = Level()
    budget = max(1, int(seconds * MAX_REQUESTS_PER_S))
    stop_at = time.perf_counter() + seconds

    async def worker(n: int) -> None:
        nonlocal budget
        while budget > 0 and sum(level.errors.values()) < MAX_ERRORS:
            start = time.perf_counter()
            if start >= stop_at:
                return
            budget -= 1
            index = n % len(payloads)
            n += concurrency
            try:
                reply = await call(payloads[index], timeout=CALL_TIMEOUT_S)
            except grpc.aio.AioRpcError as exc:
                level.errors[exc.code().name] += 1
                continue
            level.latencies.append(time.perf_counter() - start)
            level.responses.append((index, reply))

    server_cpu, client_cpu = process_cpu_s(server_pid), self_cpu_s()
    start = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    level.wall_s = time.perf_counter() - start
    level.client_cpu_s = self_cpu_s() - client_cpu
    server_after = process_cpu_s(server_pid)
    if server_cpu is not None and server_after is not None:
        level.server_cpu_s = server_after - server_cpu
    return level


# --- inputs and results --------------------------------------------------------------------


def digits(batch: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray | None, str]:
    """Request inputs (n, batch, 64) float32 in [0, 16], labels (n, batch) or None, source."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        x = np.random.default_rng(seed).uniform(0, 16, size=(450, 64))
        y, source = None, "uniform [0, 16] (scikit-learn not installed)"
    else:
        data = load_digits()  # the demo's held-out split: the model was trained without it
        _, x, _, y = train_test_split(
            data.data, data.target, test_size=0.25, random_state=0, stratify=data.target
        )
        source = "load_digits held-out 25% split (random_state=0)"
    n = max(1, len(x) // batch)
    rows = np.arange(n * batch) % len(x)
    labels = None if y is None else np.asarray(y)[rows].reshape(n, batch)
    return x[rows].astype("<f4").reshape(n, batch, 64), labels, source


def infer_payloads(x: np.ndarray, tol: float | None) -> list[bytes]:
    """One serialized InferRequest per (batch, 64) slice of `x`."""
    solver = pb.SolverOptions() if tol is None else pb.SolverOptions(tol=tol)
    return [
        pb.InferRequest(
            model=MODEL,
            input=pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=list(xb.shape), data=xb.tobytes()),
            solver=solver,
        ).SerializeToString()
        for xb in x
    ]


def oip_payloads(x: np.ndarray, tol: float | None) -> list[bytes]:
    """One serialized Open Inference Protocol ModelInferRequest per slice of `x`, as tritonclient
    sends it (raw FP32 contents, tol as a double parameter)."""
    out = []
    for xb in x:
        request = oip.ModelInferRequest(model_name=MODEL)
        request.inputs.add(name="input", datatype="FP32", shape=list(xb.shape))
        request.raw_input_contents.append(xb.astype("<f4").tobytes())
        if tol is not None:
            request.parameters["tol"].double_param = tol
        out.append(request.SerializeToString())
    return out


def _ms(values: np.ndarray, q: float | None = None) -> float:
    return float(1e3 * (values.mean() if q is None else np.percentile(values, q)))


def summarize(
    target: str, concurrency: int, level: Level, labels: np.ndarray | None
) -> dict[str, Any]:
    """One table row: throughput, latency, CPU and, for Infer, the responses' contents."""
    lat = np.asarray(level.latencies) if level.latencies else np.full(1, np.nan)
    done = len(level.latencies)
    row: dict[str, Any] = {
        "target": target,
        "concurrency": concurrency,
        "requests": done,
        "errors": dict(level.errors),
        "wall_s": level.wall_s,
        "rps": done / level.wall_s if level.wall_s > 0 else 0.0,
        "p50_ms": _ms(lat, 50),
        "p99_ms": _ms(lat, 99),
        "mean_ms": _ms(lat),
        "server_cpu_ms_per_req": None,
        "client_cpu_ms_per_req": 1e3 * level.client_cpu_s / max(done, 1),
    }
    if level.server_cpu_s is not None:
        row["server_cpu_ms_per_req"] = 1e3 * level.server_cpu_s / max(done, 1)
    if target == "oip" and level.responses:
        answers = [(i, oip.ModelInferResponse.FromString(b)) for i, b in level.responses]
        raw = [
            dict(zip((o.name for o in r.outputs), r.raw_output_contents, strict=True))
            for _, r in answers
        ]
        iters = np.concatenate([np.frombuffer(a["iterations"], "<i8") for a in raw]).astype(float)
        row |= {"mean_iterations": float(iters.mean()), "max_iterations": int(iters.max())}
        if labels is not None:
            hits = [
                np.frombuffer(a["output"], "<f4").reshape(-1, 10).argmax(1) == labels[i]
                for (i, _), a in zip(answers, raw, strict=True)
            ]
            row["accuracy"] = float(np.concatenate(hits).mean())
        return row
    if target != "infer" or not level.responses:
        return row
    replies = [(i, pb.InferResponse.FromString(b)) for i, b in level.responses]
    iters = np.concatenate([np.asarray(r.iterations, dtype=float) for _, r in replies])
    status = np.concatenate([np.asarray(r.status) for _, r in replies])
    timings = {
        k: np.asarray([getattr(r.timings, k) for _, r in replies])
        for k in ("queue_seconds", "solve_seconds", "total_seconds")
    }
    row |= {
        "mean_iterations": float(iters.mean()),
        "max_iterations": int(iters.max()),
        "converged": float((status == pb.SAMPLE_STATUS_CONVERGED).mean()),
        **{f"server_{k.split('_')[0]}_ms": _ms(v) for k, v in timings.items()},
        **{f"server_{k.split('_')[0]}_p99_ms": _ms(v, 99) for k, v in timings.items()},
    }
    if labels is not None:
        hits = [
            np.frombuffer(r.output.data, "<f4").reshape(tuple(r.output.shape)).argmax(1)
            == labels[i]
            for i, r in replies
        ]
        row["accuracy"] = float(np.concatenate(hits).mean())
    return row


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """One line per target x concurrency."""
    head = (
        "| target | conc | req/s | p50 ms | p99 ms | mean iters | srv queue ms | srv solve ms "
        "| srv total ms | srv CPU ms/req | client CPU ms/req | errors |"
    )
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        lines.append(
            f"| {r['target']} | {r['concurrency']} | {r['rps']:.0f} | {r['p50_ms']:.2f} "
            f"| {r['p99_ms']:.2f} | {_fmt(r.get('mean_iterations'))} "
            f"| {_fmt(r.get('server_queue_ms'))} | {_fmt(r.get('server_solve_ms'))} "
            f"| {_fmt(r.get('server_total_ms'))} | {_fmt(r['server_cpu_ms_per_req'], '.3f')} "
            f"| {r['client_cpu_ms_per_req']:.3f} | {sum(r['errors'].values())} |"
        )
    return "\n".join(lines)


def machine_info() -> dict[str, Any]:
    """Where the numbers came from."""
    versions = {}
    for package in ("torch", "grpcio", "protobuf", "numpy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": sys.version.split()[0],
        "cpu_count": os.cpu_count(),
        **versions,
        "loadavg_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


# --- main ----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--seconds", type=float, default=10.0, help="measured seconds per level")
    p.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds per level")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--tol", type=float, default=None, help="solver tol (default: the model's)")
    p.add_argument("--batch", type=int, default=1, help="samples per Infer request")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--serve", choices=["deq", "echo"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.seconds <= 0 or args.warmup < 0 or args.batch < 1 or min(args.concurrency) < 1:
        p.error("--seconds > 0, --warmup >= 0, --batch >= 1 and --concurrency >= 1")
    return args


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    """Start both servers, then per concurrency level: warm up and measure echo, then Infer."""
    x, labels, source = digits(args.batch)
    payloads = {
        "echo": [os.urandom(ECHO_BYTES)],
        "infer": infer_payloads(x, args.tol),
        "oip": oip_payloads(x, args.tol),
    }
    rows: list[dict[str, Any]] = []
    async with (
        server_process("echo") as echo_server,
        server_process("deq") as deq_server,
        grpc.aio.insecure_channel(echo_server.target) as echo_channel,
        grpc.aio.insecure_channel(deq_server.target) as deq_channel,
    ):
        model = await deq_pb2_grpc.DEQServiceStub(deq_channel).GetModel(
            pb.GetModelRequest(name=MODEL), timeout=CALL_TIMEOUT_S
        )
        targets = {
            "echo": (echo_channel.unary_unary(ECHO_METHOD), echo_server.pid),
            "infer": (deq_channel.unary_unary(INFER_METHOD), deq_server.pid),
            "oip": (deq_channel.unary_unary(OIP_METHOD), deq_server.pid),
        }
        for concurrency in args.concurrency:
            for name, (call, pid) in targets.items():
                if args.warmup > 0:
                    await closed_loop(call, payloads[name], concurrency, args.warmup, pid)
                level = await closed_loop(call, payloads[name], concurrency, args.seconds, pid)
                rows.append(summarize(name, concurrency, level, labels))
                print(f"{name} c={concurrency}: {rows[-1]['rps']:.0f} req/s", file=sys.stderr)
    return {
        "servers": {
            "deq": deq_server.settings
            | {"model": json_format.MessageToDict(model.model, preserving_proto_field_name=True)},
            "echo": echo_server.settings,
        },
        "inputs": {
            "source": source,
            "requests": len(payloads["infer"]),
            "infer_request_bytes": len(payloads["infer"][0]),
            "echo_request_bytes": ECHO_BYTES,
        },
        "rows": rows,
    }


def fractions(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Infer req/s / echo req/s at each concurrency."""
    rps = {(r["target"], r["concurrency"]): r["rps"] for r in rows}
    return {
        f"{target} {c}": rps[(target, c)] / rps[("echo", c)]
        for t, c in rps
        for target in ("infer", "oip")
        if t == "echo" and (target, c) in rps and rps[("echo", c)] > 0
    }


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (or, with --serve, one server), print the table, write the JSON."""
    args = parse_args(argv)
    if args.serve:
        asyncio.run(serve(args.serve))
        return 0
    machine = machine_info()
    start = time.perf_counter()
    result = asyncio.run(bench(args))
    machine["loadavg_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    ratio = fractions(result["rows"])
    top = str(max(args.concurrency))
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    config |= {"model": MODEL, "total_wall_s": time.perf_counter() - start}

    print(markdown_table(result["rows"]))
    print()
    for key, f in ratio.items():
        print(f"{key.split()[0]} / echo req/s at concurrency {key.split()[1]}: {f:.3f}")
    for target in ("infer", "oip"):
        if f"{target} {top}" in ratio:
            verdict = "meets" if ratio[f"{target} {top}"] >= TARGET_FRACTION else "misses"
            print(f"At concurrency {top}, {target} {verdict} the target of >= {TARGET_FRACTION}.")
    print(f"machine: {json.dumps(machine)}")
    print(f"total wall: {config['total_wall_s']:.1f}s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "machine": machine,
        "config": config,
        **result,
        "infer_over_echo": ratio,
        "target_fraction": TARGET_FRACTION,
    }
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
