"""Build, run and drain the server: `deq-server` (also `python -m deq_server`)."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from deq_client.pb.deq.v1 import deq_pb2, deq_pb2_grpc
from deq_client.pb.inference import grpc_service_pb2 as oip_pb2
from deq_client.pb.inference import grpc_service_pb2_grpc as oip_grpc
from deq_server import __version__
from deq_server.models import bundled_checkpoints

from . import compiled_step, processes
from .auth import TokenAuthInterceptor, split_tokens
from .config import ServerConfig, parse_config
from .engine import ContinuousScheduler, RequestScheduler
from .health_watch import BoundedHealthServicer
from .metrics import GrpcMetricsInterceptor, Metrics
from .model_poll import ModelPoller
from .oip import OIPServicer
from .registry import Registry, resolve_device
from .scheduler import Scheduler
from .servicer import DEQServicer, TolerantStreamDecoding

log = logging.getLogger("deq_server")
SERVICE_NAMES = (
    deq_pb2.DESCRIPTOR.services_by_name["DEQService"].full_name,
    oip_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name,
    health.SERVICE_NAME,
    reflection.SERVICE_NAME,
)


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


class StartupError(RuntimeError):
    """The server cannot start (a busy address, say); its message is the one line printed."""


def _check_free(address: str, what: str) -> None:
    """Refuse a busy HOST:PORT before gRPC or the HTTP server try it (gRPC would log a C-core
    line first, and by default set SO_REUSEPORT, sharing the port with another server)."""
    host, port = _split(address)
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except OSError as error:
        raise StartupError(
            f"{what} {address}: cannot resolve the host ({error.strerror})"
        ) from None
    for family, kind, proto, _, sockaddr in infos[:1]:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(sockaddr)
            except OSError as error:
                raise StartupError(
                    f"{what} {address} is not available: {error.strerror} "
                    "(another server there? choose another port)"
                ) from None


@dataclass
class RunningServer:
    """A started server: its bound ports and the parts a shutdown needs."""

    server: grpc.aio.Server
    port: int
    metrics_port: int | None
    health: health.aio.HealthServicer
    registry: Registry
    scheduler: Scheduler
    metrics: Metrics
    _metrics_http: Any = None
    poller: ModelPoller | None = None  # with --model-control poll
    _poll_task: asyncio.Task[None] | None = None

    async def stop(self, grace: float) -> None:
        """Drain: report NOT_SERVING, refuse new calls, let in-flight ones finish within `grace`;
        then one final log line with what was drained."""
        in_flight = _in_flight(self.metrics)
        if self._poll_task is not None:
            self._poll_task.cancel()
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        await self.scheduler.close()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
        cut = _in_flight(self.metrics)
        log.info(
            "stopped: drained %d call(s) in flight at shutdown (%d finished, %d cut off at the "
            "%gs grace); %d model(s) unloaded",
            in_flight,
            max(0, in_flight - cut),
            cut,
            grace,
            len(self.registry.models),
        )


def _in_flight(metrics: Metrics) -> int:
    """RPCs started and not yet handled, from the go-grpc-prometheus counters."""
    totals = {"grpc_server_started_total": 0.0, "grpc_server_handled_total": 0.0}
    for family in metrics.registry.collect():
        for sample in family.samples:
            if sample.name in totals:
                totals[sample.name] += sample.value
    return max(0, int(totals["grpc_server_started_total"] - totals["grpc_server_handled_total"]))


def scheduler_for(config: ServerConfig, device: torch.device) -> str:
    """`--scheduler`, with `auto` resolved by device: on a CPU, where a solver step costs about
    its number of busy rows, request-level batching measured faster at every concurrency (see
    the benchmarks); on a GPU, where a step costs about the same for 1 or 256 rows, continuous."""
    if config.scheduler != "auto":
        return config.scheduler
    return "continuous" if device.type == "cuda" else "request"


def compile_step_for(config: ServerConfig, device: torch.device) -> tuple[bool, str]:
    """`--compile-step`, with `auto` resolved, and why: on where it measured faster, a CPU with
    the request scheduler (a lone digits request 2.25 -> 1.75 ms p50, concurrency 16 about a
    seventh more requests/s, 64 the same), when a C++ compiler is there to build the programs.
    Off on a GPU (not measured there) and with the continuous scheduler on a CPU."""
    if config.compile_step not in ("auto", "on", "off"):  # ServerConfig made in code, unchecked
        raise ValueError(f"compile_step must be auto, on or off, got {config.compile_step!r}")
    if config.compile_step != "auto":
        return config.compile_step == "on", config.compile_step
    if device.type != "cpu" or scheduler_for(config, device) != "request":
        return False, "off (auto: only a CPU with the request scheduler compiles)"
    compiler = compiled_step.cpp_compiler()
    if compiler is None:
        return False, "off (auto: no C++ compiler on PATH)"
    return True, f"on (auto: CPU, request scheduler, {compiler})"


def make_scheduler(config: ServerConfig, metrics: Metrics, device: torch.device) -> Scheduler:
    """The scheduler `--scheduler` names (or `auto` picks); both report busy rows per solver
    batch."""

    def on_batch(model: str, rows: int) -> None:
        metrics.model(model).batch_size.observe(rows)

    compile_step, _ = compile_step_for(config, device)
    if scheduler_for(config, device) == "request":
        return RequestScheduler(
            config.workers, config.max_batch, on_batch=on_batch, compile_step=compile_step
        )
    return ContinuousScheduler(
        config.max_batch_slots,
        config.max_batch,
        on_batch=on_batch,
        compile_step=compile_step,
    )


async def sync_health(
    health_servicer: BoundedHealthServicer, registry: Registry, strict: bool
) -> None:
    """SERVING while the registry is ready (some model served; with `strict`, none failed at
    start), else NOT_SERVING, for the server and its two services; a change is logged."""
    ready, why = registry.readiness(strict)
    serving = health_pb2.HealthCheckResponse.SERVING
    status = serving if ready else health_pb2.HealthCheckResponse.NOT_SERVING
    if not await health_servicer.set_all(status, ("", *SERVICE_NAMES[:2])):
        return
    if ready:
        log.info("health SERVING")
    else:
        log.warning("health NOT_SERVING: %s", why)


async def start_server(
    config: ServerConfig, *, shared_port: bool = False, freeze_imports: bool = False
) -> RunningServer:
    """Load the models, then start gRPC (health SERVING only once loaded) and /metrics.

    `shared_port`: bind the gRPC port with SO_REUSEPORT, beside sibling processes that do the
    same (`--processes`, whose parent checked that the port was free). `freeze_imports`: the
    process is this server's alone (`deq-server`), so what it has imported can be frozen out of
    the garbage collector's reach (see below)."""
    # A busy address fails before anything is loaded (fast, one line).
    if not shared_port:
        _check_free(config.address, "gRPC address")
    if config.metrics_address:
        _check_free(config.metrics_address, "metrics address")
    metrics = Metrics()
    # Intra-op threads that spin on cores the event loop needs make small solver steps tens of
    # times slower (measured: 1 ms -> 39 ms per step on 2 busy cores), hence half by default.
    torch.set_num_threads(config.torch_threads or max(1, (os.cpu_count() or 2) // 2))
    device = resolve_device(config.device)
    if compile_step_for(config, device)[0]:
        compiled_step.preload()
    if freeze_imports:
        # What the process holds by now (torch, gRPC, numpy; with the compiled step torch's
        # compiler too: 180-300 thousand objects) is never garbage, yet every full collection
        # walks it: a 40-80 ms pause of the event loop (measured), which at concurrency 64 made
        # a 140 ms p99. Frozen, a collection skips it. The models load after this, so an
        # unloaded version is still collected. Garbage first: what is frozen is kept for good.
        gc.collect()
        gc.freeze()
    registry = Registry(
        device,
        getattr(torch, config.dtype),
        keep_versions=config.keep_versions,
        max_model_bytes=config.max_model_bytes,
        max_rows=max(config.max_batch, config.max_batch_slots),  # the most a program is given
        max_iter_cap=config.max_iter_cap,
        min_tol=config.min_tol,
        on_evict=lambda name, version: metrics.model_info.remove(name, version, str(device)),
    )
    # Siblings (--processes) share the directory: their parent cleaned and seeded it once, and a
    # slow sibling must not delete the temp file of another's commit in flight.
    registry.load_all(config.model_dir, bundled_checkpoints(), prepare=not shared_port)
    for name, served in registry.models.items():
        for version in served.versions:
            metrics.model_served(name, version, str(registry.device))
    scheduler = make_scheduler(config, metrics, device)

    limits = [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
        # What one client, authenticated or not, can hold: streams per connection, and idle
        # connections closed; the server pings quiet peers so that dead ones are noticed.
        ("grpc.max_concurrent_streams", config.max_streams_per_connection),
        ("grpc.max_connection_idle_ms", int(config.connection_idle_seconds * 1000)),
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        # gRPC sets SO_REUSEPORT by default: a second server would bind the same port and share
        # its connections. A busy address must fail instead (unless siblings share it on purpose).
        ("grpc.so_reuseport", 1 if shared_port else 0),
    ]
    interceptors: list[grpc.aio.ServerInterceptor] = [GrpcMetricsInterceptor(metrics.registry)]
    infer_tokens, admin_tokens = (
        split_tokens(config.infer_tokens),
        split_tokens(config.admin_tokens),
    )
    if infer_tokens or admin_tokens:
        interceptors.append(TokenAuthInterceptor(infer_tokens, admin_tokens))
    interceptors.append(TolerantStreamDecoding())  # innermost: the others see its handler
    server = grpc.aio.server(
        interceptors=interceptors,
        options=limits,
        maximum_concurrent_rpcs=config.max_concurrent_rpcs or None,
    )
    deq = DEQServicer(registry, scheduler, metrics, config)
    deq_pb2_grpc.add_DEQServiceServicer_to_server(deq, server)
    health_servicer = BoundedHealthServicer(config.max_watch_streams)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    oip_grpc.add_GRPCInferenceServiceServicer_to_server(
        OIPServicer(deq, registry, health_servicer, __version__), server
    )
    reflection.enable_server_reflection(SERVICE_NAMES, server)
    try:
        if config.tls_cert is not None and config.tls_key is not None:
            credentials = grpc.ssl_server_credentials(
                [(config.tls_key.read_bytes(), config.tls_cert.read_bytes())]
            )
            port = server.add_secure_port(config.address, credentials)
        else:
            port = server.add_insecure_port(config.address)
    except RuntimeError as error:  # taken between the check and the bind
        await scheduler.close()
        raise StartupError(f"gRPC address {config.address} is not available ({error})") from None

    metrics_http, metrics_port = None, None
    if config.metrics_address:
        host, wanted = _split(config.metrics_address)
        try:
            metrics_http, _ = start_http_server(wanted, host, registry=metrics.registry)
        except OSError as error:
            await scheduler.close()
            raise StartupError(
                f"metrics address {config.metrics_address} is not available: {error.strerror}"
            ) from None
        metrics_port = metrics_http.server_port
    await server.start()
    await sync_health(health_servicer, registry, config.strict_readiness)
    loop = asyncio.get_running_loop()
    pending: set[asyncio.Task[None]] = set()

    def on_change() -> None:  # from the loop or a training thread
        def schedule() -> None:
            task = loop.create_task(sync_health(health_servicer, registry, config.strict_readiness))
            pending.add(task)
            task.add_done_callback(pending.discard)

        loop.call_soon_threadsafe(schedule)

    registry.on_change = on_change
    poller, poll_task = None, None
    if config.model_control == "poll" and config.model_dir is not None:
        poller = ModelPoller(
            registry,
            config.model_dir,
            config.poll_interval,
            on_served=lambda name, version: metrics.model_served(
                name, version, str(registry.device)
            ),
            on_stopped=lambda name, version, last: metrics.forget_model(name) if last else None,
        )
        poll_task = loop.create_task(poller.run())
    host = _split(config.address)[0] or "0.0.0.0"
    models = ", ".join(
        f"{name} v{','.join(sorted(served.versions, key=int))}"
        for name, served in sorted(registry.models.items())
    )
    log.info(
        "deq-server ready: gRPC %s:%d (%s), metrics %s, model dir %s, device %s (%s), "
        "scheduler %s, compile step %s, models: %s",
        host,
        port,
        "TLS" if config.tls_cert is not None else "plaintext",
        f"{_split(config.metrics_address)[0]}:{metrics_port}" if metrics_port else "off",
        "none (bundled demo only)"
        if config.model_dir is None
        else f"{config.model_dir}"
        + (f" (polled every {config.poll_interval:g}s)" if poller else ""),
        registry.device,
        config.dtype,
        scheduler_for(config, registry.device),
        compile_step_for(config, registry.device)[1],
        models or "none",
    )
    return RunningServer(
        server,
        port,
        metrics_port,
        health_servicer,
        registry,
        scheduler,
        metrics,
        metrics_http,
        poller,
        poll_task,
    )


async def serve(
    config: ServerConfig,
    *,
    shared_port: bool = False,
    on_ready: Callable[[int, int | None], None] | None = None,
) -> None:
    """Run until SIGTERM/SIGINT, then drain within the grace period; `on_ready(port,
    metrics_port)` once serving."""
    running = await start_server(config, shared_port=shared_port, freeze_imports=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if on_ready is not None:  # after the handlers: a stop from now on drains
        on_ready(running.port, running.metrics_port)
    await stop.wait()
    log.info("draining (grace %.1fs)", config.grace_seconds)
    await running.stop(config.grace_seconds)


class _JsonFormatter(logging.Formatter):
    def __init__(self, process: str = "") -> None:
        super().__init__()
        self.process = process

    def format(self, record: logging.LogRecord) -> str:
        entry = {"level": record.levelname, "logger": record.name, "message": record.getMessage()}
        if self.process:
            entry["process"] = self.process
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_logging(config: ServerConfig, process: str = "") -> None:
    """Log to stderr as --log-format says; `process` ("0", "1", ...) tags a child's lines."""
    handler = logging.StreamHandler(sys.stderr)
    if config.log_format == "json":
        handler.setFormatter(_JsonFormatter(process))
    else:
        tag = f"[{process}]" if process else ""
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s %(levelname)s %(name)s{tag}: %(message)s")
        )
    logging.basicConfig(level=logging.INFO, handlers=[handler])


def main(argv: Sequence[str] | None = None) -> None:
    config = parse_config(argv)
    # Every torch.load in the server process is weights-only, whatever its caller asks (torch's
    # package reader, for one, falls back to full unpickling); set once, before any thread
    # (and inherited by --processes children).
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    setup_logging(config)
    try:
        if config.processes > 1:
            sys.exit(processes.run(config))
        asyncio.run(serve(config))
    except StartupError as error:
        sys.exit(f"deq-server: error: {error}")
