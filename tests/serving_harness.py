"""A real deq-server on 127.0.0.1 (free ports), run on its own event-loop thread for sync tests."""

from __future__ import annotations

import asyncio
import socket
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

import grpc

from deq_server.serving.app import RunningServer, start_server
from deq_server.serving.config import ServerConfig

# compile step off: see conftest (tests that compile ask for it)
LOOPBACK = ServerConfig(address="127.0.0.1:0", metrics_address="127.0.0.1:0", compile_step="off")


@contextmanager
def running_server(**overrides: object) -> Iterator[RunningServer]:
    """Start a server with LOOPBACK plus `overrides`; stop it (grace 0) on exit."""
    config = replace(LOOPBACK, **overrides)
    loop = asyncio.new_event_loop()
    started: list[RunningServer] = []
    ready = threading.Event()
    failure: list[BaseException] = []

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            started.append(loop.run_until_complete(start_server(config)))
        except BaseException as exc:
            failure.append(exc)
            return
        finally:
            ready.set()
        loop.run_forever()

    thread = threading.Thread(target=run, name="deq-server", daemon=True)
    thread.start()
    ready.wait()
    if failure:
        raise failure[0]
    running = started[0]
    try:
        yield running
    finally:
        asyncio.run_coroutine_threadsafe(running.stop(0), loop).result()
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()


@contextmanager
def channel_to(running: RunningServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        yield channel


def free_port() -> int:
    """A port on 127.0.0.1 that was free a moment ago (for servers run as separate processes)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server_argv(
    port: int, model_dir: object, metrics_port: int | None = None, *extra: str
) -> list[str]:
    """The command line of a `python -m deq_server` process on 127.0.0.1."""
    metrics = "" if metrics_port is None else f"127.0.0.1:{metrics_port}"
    return [
        sys.executable,
        "-m",
        "deq_server",
        "--address",
        f"127.0.0.1:{port}",
        "--metrics-address",
        metrics,
        "--model-dir",
        str(model_dir),
        *extra,
    ]
