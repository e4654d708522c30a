"""`--processes N`: N full server processes on one gRPC port, one /metrics endpoint.

On a CPU one server process is bounded by one GIL: its event loop and its engine thread take
turns. Several processes lift that wall. Each child is a complete server (event loop, engine
thread, models, Train sessions), exactly a replica: the children bind the same port with
SO_REUSEPORT and the kernel spreads incoming connections over them. A connection stays with the
process that accepted it, so a client gains only with several connections (several channels or
clients); one channel is served by one process.

The parent loads no model. It refuses a busy port before any child starts, starts the children
(spawned, so no torch state is forked), serves /metrics by scraping each child's private
endpoint on 127.0.0.1 and adding a `process` label, stops the children on SIGTERM/SIGINT (each
drains as a lone server does) and, if a child dies, stops the others and exits non-zero, so
that the orchestrator restarts the whole unit. Children share the model directory as replicas
do: commits get directory-claimed version numbers, and each child polls the directory
(`--model-control poll` is implied), so one child's Train commit reaches the others within
`--poll-interval`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import http.client
import logging
import multiprocessing
import os
import signal
import socket
import sys
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection, wait
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from deq_server.models import bundled_checkpoints

from .config import ServerConfig
from .model_store import remove_stale_temp_files, seed_with

log = logging.getLogger("deq_server")


def _join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def child_config(config: ServerConfig, port: int) -> ServerConfig:
    """What each child runs: the shared port, a private metrics port on loopback, the model
    directory polled, and the torch threads split between the processes."""
    from .app import _split

    host = _split(config.address)[0]
    threads = config.torch_threads or max(1, (os.cpu_count() or 2) // (2 * config.processes))
    return dataclasses.replace(
        config,
        address=_join(host, port),
        metrics_address="127.0.0.1:0" if config.metrics_address else "",
        model_control="poll" if config.model_dir is not None else config.model_control,
        torch_threads=threads,
        processes=1,
    )


class ChildMetrics:
    """A Prometheus collector: every child's series, each with its `process` label (a child that
    cannot be scraped just has no series this time; Prometheus sees the gap)."""

    def __init__(self, ports: list[int]) -> None:
        self.ports = ports

    def _scrape(self, index: int) -> list[Metric]:
        try:
            url = f"http://127.0.0.1:{self.ports[index]}/metrics"
            with urllib.request.urlopen(url, timeout=5) as reply:
                return list(text_string_to_metric_families(reply.read().decode()))
        except (OSError, http.client.HTTPException, ValueError) as exc:
            log.warning("process %d: metrics not scraped: %s", index, exc)
            return []

    def collect(self) -> Iterator[Metric]:
        merged: dict[str, Metric] = {}
        # all at once: one stuck child costs one timeout, not one per child after it
        with ThreadPoolExecutor(max_workers=len(self.ports)) as pool:
            scraped = list(pool.map(self._scrape, range(len(self.ports))))
        for index, families in enumerate(scraped):
            for family in families:
                into = merged.get(family.name)
                if into is None:
                    into = merged[family.name] = Metric(
                        family.name, family.documentation, family.type, family.unit
                    )
                for sample in family.samples:
                    labels = {**sample.labels, "process": str(index)}
                    into.samples.append(sample._replace(labels=labels))
        yield from merged.values()


def die_with_parent() -> None:
    """Linux: SIGTERM this child process when its parent dies (even by SIGKILL), so that no child
    keeps working for a parent that is gone (a server child drains as on any SIGTERM)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _child(config: ServerConfig, index: int, parent: int, conn: Connection) -> None:
    """A child's entry point (spawned): run one full server on the shared port, report ready."""
    from .app import StartupError, serve, setup_logging

    die_with_parent()
    if os.getppid() != parent:  # the parent died before the line above took effect
        return
    setup_logging(config, str(index))

    def ready(port: int, metrics_port: int | None) -> None:
        conn.send(("ready", port, metrics_port))

    try:
        asyncio.run(serve(config, shared_port=True, on_ready=ready))
    except StartupError as error:
        conn.send(("error", str(error)))
        sys.exit(1)
    except Exception as exc:  # a TLS key that cannot be read, say: one line to the parent
        with contextlib.suppress(OSError):
            conn.send(("error", f"server process {index}: {type(exc).__name__}: {exc}"))
        raise


class _StopSignal:
    """SIGTERM/SIGINT as a readable socket (for `wait`) and a flag, installed for the parent's
    whole life: a signal during the children's start stops them too."""

    def __init__(self) -> None:
        self.received = False
        self._read, self._write = socket.socketpair()
        self._write.setblocking(False)
        self._previous = {
            s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)
        }

    def _on_signal(self, signum: int, frame: object) -> None:
        self.received = True
        with contextlib.suppress(BlockingIOError):  # one wake-up byte is enough
            self._write.send(b"x")

    @property
    def readable(self) -> socket.socket:
        """Readable once a signal came."""
        return self._read

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._read.close()
        self._write.close()


def _reserve_port(address: str) -> tuple[socket.socket, int]:
    """A SO_REUSEPORT socket bound to the address (never listening, so it takes no
    connection): it pins port 0's pick for the children and is closed once they listen."""
    from .app import StartupError, _split

    host, port = _split(address)
    try:
        family, kind, proto, _, sockaddr = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        holder = socket.socket(family, kind, proto)
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        holder.bind(sockaddr)
    except OSError as error:
        raise StartupError(f"gRPC address {address} is not available ({error})") from None
    return holder, int(holder.getsockname()[1])


def run(config: ServerConfig) -> int:
    """Run `config.processes` children until SIGTERM/SIGINT; the exit status."""
    from .app import _check_free

    _check_free(config.address, "gRPC address")  # a busy port fails before any child starts
    if config.metrics_address:
        _check_free(config.metrics_address, "metrics address")
    if config.model_dir is not None:  # once, here: children starting together would race
        remove_stale_temp_files(config.model_dir)
        seed_with(config.model_dir, bundled_checkpoints())
    stop = _StopSignal()
    try:
        return _run(config, stop)
    finally:
        stop.close()


def _run(config: ServerConfig, stop: _StopSignal) -> int:
    # Children built on this process's prometheus_client export no *_created series: merged
    # under one family name they would clash in the OpenMetrics format Prometheus asks for.
    os.environ["PROMETHEUS_DISABLE_CREATED_SERIES"] = "True"
    holder, port = _reserve_port(config.address)
    children: list[tuple[Any, Connection]] = []
    try:
        return _supervised(config, stop, holder, port, children)
    finally:  # whatever went wrong, no child is left serving without its parent
        if any(process.is_alive() for process, _ in children):
            _stop(children, config.grace_seconds)


def _supervised(
    config: ServerConfig,
    stop: _StopSignal,
    holder: socket.socket,
    port: int,
    children: list[tuple[Any, Connection]],
) -> int:
    from .app import StartupError, _split

    spawn = multiprocessing.get_context("spawn")
    for index in range(config.processes):
        mine, theirs = spawn.Pipe(duplex=False)
        process = spawn.Process(
            target=_child,
            args=(child_config(config, port), index, os.getpid(), theirs),
            name=f"deq-server-{index}",
        )
        process.start()
        theirs.close()
        children.append((process, mine))
    try:  # a StartupError leaves the stopping to _run's `finally`
        metrics_ports = _wait_ready(children, stop)
    finally:
        holder.close()
    if metrics_ports is None:  # a signal while they started
        log.info("stopping %d server processes before they all started", len(children))
        return 0 if _clean(_stop(children, config.grace_seconds)) else 1

    metrics_http, metrics_port = None, None
    if config.metrics_address:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(ChildMetrics(metrics_ports))  # type: ignore[arg-type]
        host, wanted = _split(config.metrics_address)
        try:
            metrics_http, _ = start_http_server(wanted, host, registry=registry)
        except OSError as error:
            raise StartupError(
                f"metrics address {config.metrics_address} is not available: {error.strerror}"
            ) from None
        metrics_port = metrics_http.server_port
    log.info(
        "deq-server ready: %d processes on gRPC %s (SO_REUSEPORT), metrics %s",
        config.processes,
        _join(_split(config.address)[0] or "0.0.0.0", port),
        f"{_split(config.metrics_address)[0]}:{metrics_port}" if metrics_port else "off",
    )
    status = _supervise(children, config.grace_seconds, stop)
    if metrics_http is not None:
        metrics_http.shutdown()
    return status


def _wait_ready(children: list[tuple[Any, Connection]], stop: _StopSignal) -> list[int] | None:
    """Each child's private metrics port once all are serving (None: a stop signal came
    first); a child that fails or dies first is a StartupError (with the child's own message)."""
    from .app import StartupError

    ports: dict[int, int] = {}
    pending = dict(enumerate(children))
    while pending:
        handles: dict[Any, int] = {}
        for index, (process, conn) in pending.items():
            handles[conn], handles[process.sentinel] = index, index
        for handle in wait([stop.readable, *handles]):
            if handle is stop.readable or stop.received:
                return None
            index = handles[handle]
            if index not in pending:
                continue
            process, conn = pending[index]
            if conn.poll():
                try:
                    message = conn.recv()
                except EOFError:  # it closed its end without a word: it died
                    raise StartupError(f"server process {index} exited while starting") from None
                if message[0] == "error":
                    raise StartupError(message[1])
                ports[index] = message[2] or 0
                del pending[index]
            elif not process.is_alive():
                raise StartupError(f"server process {index} exited while starting")
    return [ports[i] for i in range(len(children))]


def _supervise(children: list[tuple[Any, Connection]], grace: float, stop: _StopSignal) -> int:
    """Wait for a stop signal or a child's death; then stop every child. The exit status: 0
    when the children drained after a signal, 1 when one died on its own."""
    sentinels = {process.sentinel: index for index, (process, _) in enumerate(children)}
    ready = wait([stop.readable, *sentinels])
    if stop.received:
        log.info("draining %d server processes (grace %.1fs)", len(children), grace)
    else:
        dead = [sentinels[s] for s in ready if s in sentinels]
        log.error("server process %s exited; stopping the others", dead[0])
    codes = _stop(children, grace)
    return 0 if stop.received and _clean(codes) else 1


def _clean(codes: list[int]) -> bool:
    """Every child exited 0, or was ended by our SIGTERM before its drain handler existed."""
    return all(code in (0, -signal.SIGTERM) for code in codes)


def _stop(children: list[tuple[Any, Connection]], grace: float) -> list[int]:
    """SIGTERM every child still running, wait for their drain (grace plus a margin for the
    engine to close), kill what is left; the children's exit codes."""
    for process, _ in children:
        if process.is_alive():
            process.terminate()
    codes = []
    for process, conn in children:
        process.join(grace + 10.0)
        if process.is_alive():
            log.error("server process %s did not stop; killed", process.name)
            process.kill()
            process.join()
        conn.close()
        codes.append(process.exitcode or 0)
    return codes
