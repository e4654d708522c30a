"""Server configuration: one way to set it, CLI flags each mirrored by a DEQ_* variable."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path


@dataclass(frozen=True)
class ServerConfig:
    """Everything the server reads at start. Defaults serve the bundled demo on loopback."""

    address: str = "127.0.0.1:50051"
    metrics_address: str = "127.0.0.1:9090"
    model_dir: Path | None = None
    device: str = "auto"
    dtype: str = "float32"
    max_message_bytes: int = 64 * 2**20
    max_batch: int = 1024
    max_queue: int = 1024
    max_concurrent_rpcs: int = 0
    max_iter_cap: int = 1000
    min_tol: float = 1e-10
    max_train_steps: int = 10_000
    max_train_sessions: int = 4
    train_idle_seconds: float = 300.0
    stream_idle_seconds: float = 300.0
    max_watch_streams: int = 16
    max_infer_streams: int = 0
    max_streams_per_connection: int = 100
    connection_idle_seconds: float = 600.0
    train_max_seconds: float = 3600.0
    keep_versions: int = 2
    max_model_bytes: int = 4 << 30
    workers: int = 1
    scheduler: str = "continuous"
    max_batch_slots: int = 256
    torch_threads: int = 0
    grace_seconds: float = 10.0
    log_format: str = "text"
    infer_tokens: str = ""
    admin_tokens: str = ""
    tls_cert: Path | None = None
    tls_key: Path | None = None


_HELP = {
    "address": "gRPC listen address HOST:PORT (port 0 picks a free one)",
    "metrics_address": "Prometheus /metrics listen address HOST:PORT (empty disables it)",
    "model_dir": "folder of .safetensors checkpoints and .pt2 packages; with none there, the bundled demo is served",
    "device": "auto (CUDA when available, else CPU), cpu, cuda or cuda:N",
    "dtype": "float32 or float64 for the served weights",
    "max_message_bytes": "largest gRPC message accepted or sent",
    "max_batch": "largest batch one request may carry (and rows per solver batch)",
    "max_concurrent_rpcs": "RPCs in progress (all kinds, health included) before gRPC itself refuses new ones with RESOURCE_EXHAUSTED, without running a handler (0: no limit)",
    "max_queue": "requests waiting for the solver before new ones get RESOURCE_EXHAUSTED",
    "max_iter_cap": "largest max_iter a request may ask for",
    "min_tol": "smallest tolerance a request may ask for",
    "max_train_steps": "most batches one Train stream may send (its config's max_steps too)",
    "max_train_sessions": "Train sessions open at once, over all models (one per model always)",
    "train_idle_seconds": "a Train stream silent this long is closed (DEADLINE_EXCEEDED, nothing published)",
    "stream_idle_seconds": "an InferStream with no new request this long is closed (DEADLINE_EXCEEDED; answers in flight are sent first)",
    "max_watch_streams": "health Watch streams open at once (open to everyone, so capped: RESOURCE_EXHAUSTED past it)",
    "max_infer_streams": "InferStreams open at once, over all clients (RESOURCE_EXHAUSTED past it; 0: half of --max-concurrent-rpcs, or 1024 without that limit)",
    "max_streams_per_connection": "concurrent RPCs one HTTP/2 connection may open (gRPC's max_concurrent_streams)",
    "connection_idle_seconds": "a connection with no RPC in flight this long is closed (GOAWAY)",
    "train_max_seconds": "longest a Train stream may take to send its messages, from its first (then closed, nothing published)",
    "keep_versions": "newest published versions of each model kept in memory (older: disk only)",
    "max_model_bytes": "largest checkpoint file or package (and its tensors) read; larger ones are refused unread",
    "workers": "solver threads of the request scheduler (solver work never runs on the event loop)",
    "scheduler": "continuous (samples join and leave the solver batch every iteration) or request",
    "max_batch_slots": "solver slots per model version and method setting (continuous scheduler)",
    "torch_threads": "CPU threads per torch op (0: half the cores, the rest for gRPC and Python)",
    "grace_seconds": "how long in-flight calls may finish after SIGTERM",
    "log_format": "text or json",
    "infer_tokens": "comma-separated bearer tokens with the infer scope (none: auth off)",
    "admin_tokens": "comma-separated bearer tokens with the admin and infer scopes",
    "tls_cert": "PEM certificate chain: serve TLS (with --tls-key)",
    "tls_key": "PEM private key of --tls-cert",
}
_CHOICES = {
    "dtype": ["float32", "float64"],
    "log_format": ["text", "json"],
    "scheduler": ["continuous", "request"],
}


def env_name(field: str) -> str:
    return "DEQ_" + field.upper()


def parse_config(
    argv: Sequence[str] | None = None, env: dict[str, str] | None = None
) -> ServerConfig:
    """Flags win over DEQ_* environment variables, which win over the defaults."""
    env = dict(os.environ if env is None else env)
    defaults = ServerConfig()
    parser = argparse.ArgumentParser(prog="deq-server", description="Serve DEQ models over gRPC.")
    for f in fields(ServerConfig):
        default = getattr(defaults, f.name)
        kind = type(default) if default is not None else Path
        raw = env.get(env_name(f.name))
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            type=kind,
            default=kind(raw) if raw is not None else default,
            choices=_CHOICES.get(f.name),
            help=f"{_HELP[f.name]} (env {env_name(f.name)})",
        )
    args = parser.parse_args(argv)
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("--tls-cert and --tls-key go together")
    for name in (
        "max_train_steps",
        "max_train_sessions",
        "keep_versions",
        "max_model_bytes",
        "max_watch_streams",
        "max_streams_per_connection",
    ):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    for name in (
        "train_idle_seconds",
        "train_max_seconds",
        "stream_idle_seconds",
        "connection_idle_seconds",
    ):
        if not 0 < getattr(args, name) < float("inf"):
            parser.error(f"--{name.replace('_', '-')} must be a finite number of seconds > 0")
    if args.max_infer_streams < 0:
        parser.error("--max-infer-streams must be 0 (automatic) or more")
    if 0 < args.max_concurrent_rpcs <= args.max_infer_streams:
        parser.error(
            "--max-infer-streams must be below --max-concurrent-rpcs, or InferStreams "
            "alone could hold every RPC slot"
        )
    return ServerConfig(**vars(args))


def infer_stream_cap(config: ServerConfig) -> int:
    """InferStreams allowed open at once: --max-infer-streams, or when 0, half the RPC slots
    (the other half stays free for unary calls, Train and health) or 1024 without a limit."""
    if config.max_infer_streams:
        return config.max_infer_streams
    if config.max_concurrent_rpcs:
        return max(1, config.max_concurrent_rpcs // 2)
    return 1024
