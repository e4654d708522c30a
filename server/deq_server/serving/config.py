"""Server configuration: one way to set it, CLI flags each mirrored by a DEQ_* variable."""

from __future__ import annotations

import argparse
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, NoReturn


@dataclass(frozen=True)
class ServerConfig:
    """Everything the server reads at start. Defaults serve the bundled demo on loopback."""

    address: str = "127.0.0.1:50051"
    metrics_address: str = "127.0.0.1:9090"
    model_dir: Path | None = None  # none: the demo only; parse_config defaults to default_model_dir
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
    max_streams_per_connection: int = 1000
    connection_idle_seconds: float = 600.0
    train_max_seconds: float = 3600.0
    keep_versions: int = 2
    model_control: str = "none"
    poll_interval: float = 5.0
    max_model_bytes: int = 4 << 30
    workers: int = 1
    scheduler: str = "auto"
    max_batch_slots: int = 256
    compile_step: str = "auto"
    torch_threads: int = 0
    processes: int = 1
    grace_seconds: float = 10.0
    strict_readiness: bool = False
    log_format: str = "text"
    infer_tokens: str = ""
    admin_tokens: str = ""
    tls_cert: Path | None = None
    tls_key: Path | None = None


_HELP = {
    "address": "gRPC listen address HOST:PORT (port 0 picks a free one)",
    "metrics_address": "Prometheus /metrics listen address HOST:PORT (empty disables it)",
    "model_dir": "folder of .safetensors checkpoints and .pt2 packages, where Train publishes; created if missing, and one holding no checkpoint gets the bundled demo as version 1 (empty: no folder, the demo only and no Train)",
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
    "max_streams_per_connection": "concurrent RPCs one HTTP/2 connection may open (gRPC's max_concurrent_streams; gRPC counts a finished call until its cleanup, so under load 64 callers on one connection already met a limit of 100 with REFUSED_STREAM)",
    "connection_idle_seconds": "a connection with no RPC in flight this long is closed (GOAWAY)",
    "train_max_seconds": "longest a Train stream may take to send its messages, from its first (then closed, nothing published)",
    "keep_versions": "newest published versions of each model kept in memory (older: disk only)",
    "model_control": "none (the model dir is read at start; then LoadModel, UnloadModel and Train change what is served) or poll (also rescan it every --poll-interval: serve new versions, such as other replicas' commits, and stop serving removed files)",
    "poll_interval": "seconds between rescans of the model dir with --model-control poll",
    "max_model_bytes": "largest checkpoint file or package (and its tensors) read, larger ones refused unread; also the most memory one call of a package's programs may hold at the largest batch",
    "workers": "request-level batches that may solve at once per model version and method (stepped in turn on the one engine thread; solver work never runs on the event loop)",
    "scheduler": "continuous (samples join and leave the solver batch every iteration), request (a batch runs until its slowest sample is done) or auto (request on a CPU, where it measured faster; continuous on a GPU)",
    "max_batch_slots": "solver slots per model version and method setting (continuous scheduler)",
    "compile_step": "compile the solver's iterations: on, off, or auto (on where it measured faster: a CPU with the request scheduler and a C++ compiler on PATH); the request scheduler's lanes run their iteration as one AOTInductor program built in a child process on first use, the continuous scheduler's slot step is torch.compile'd per bucket of busy slots; a flag without a value means on",
    "torch_threads": "CPU threads per torch op (0: half the cores, the rest for gRPC and Python; with --processes, that half split between them)",
    "processes": "full server processes sharing the gRPC port (SO_REUSEPORT; the kernel spreads connections, so a client gains with several connections) behind one /metrics with a process label; more than 1 implies --model-control poll, so that one's Train commit reaches the others",
    "grace_seconds": "how long in-flight calls may finish after SIGTERM",
    "strict_readiness": "report NOT_SERVING while any checkpoint found at start failed to load (until LoadModel serves that model); without it, SERVING once any model is served",
    "log_format": "text or json",
    "infer_tokens": "comma-separated bearer tokens with the infer scope (none: auth off)",
    "admin_tokens": "comma-separated bearer tokens with the admin and infer scopes",
    "tls_cert": "PEM certificate chain: serve TLS (with --tls-key)",
    "tls_key": "PEM private key of --tls-cert",
}
_CHOICES = {
    "dtype": ["float32", "float64"],
    "log_format": ["text", "json"],
    "scheduler": ["auto", "continuous", "request"],
    "compile_step": ["auto", "on", "off"],
    "model_control": ["none", "poll"],
}
_INT32_MAX = 2**31 - 1


def _number(
    kind: type,
    *,
    low: float,
    high: float = math.inf,
    what: str = "",
    low_open: bool = False,
) -> Callable[[str], Any]:
    """An argparse type: `kind` parsed from text, finite, within [low, high] (or (low, high]
    with `low_open`)."""
    noun = "an integer" if kind is int else "a number"

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {noun}, got {text!r}") from None
        below = value <= low if low_open else value < low
        if not math.isfinite(value) or below or value > high:
            if low_open:
                bound = f"> {low}" + ("" if high == math.inf else f" (at most {high})")
            else:
                bound = f"at least {low}" if high == math.inf else f"{low} to {high}"
            raise argparse.ArgumentTypeError(f"must be {what or noun} {bound}, got {text!r}")
        return value

    return parse


# gRPC takes milliseconds as an int32
_seconds = _number(
    float, low=0, low_open=True, high=_INT32_MAX // 1000, what="a finite number of seconds"
)
_tolerance = _number(float, low=0, low_open=True, what="a finite number")


def _address(text: str, *, optional: bool = False) -> str:
    """HOST:PORT (IPv6 hosts in brackets), port 0 to 65535; empty only where `optional`."""
    if optional and text == "":
        return text
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT with a port 0-65535, got {text!r}")
    return text


def _device(text: str) -> str:
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {text!r}")
    return text


def _path(text: str) -> Path | None:
    """A path; empty text (DEQ_TLS_CERT= say) means none, as when unset."""
    return Path(text) if text else None


def _flag(text: str) -> bool:
    """A DEQ_* value of a boolean flag: 1/true/yes/on or 0/false/no/off (any case)."""
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false (1 or 0), got {text!r}")


def _switch(text: str) -> str:
    """auto (also when empty, as an unset variable), or on/off written as a boolean flag's value
    (DEQ_COMPILE_STEP=1 means on)."""
    if text.strip().lower() in ("auto", ""):
        return "auto"
    try:
        return "on" if _flag(text) else "off"
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected auto, on or off, got {text!r}") from None


def _at_least(low: int, high: int | None = None) -> Callable[[str], Any]:
    return _number(int, low=low, high=float("inf") if high is None else high)


# How each field's text (flag or DEQ_* value alike) is parsed and range-checked; fields not named
# here are plain text (str) or paths.
_TYPES: dict[str, Callable[[str], Any]] = {
    "address": _address,
    "metrics_address": lambda text: _address(text, optional=True),
    "device": _device,
    "max_message_bytes": _at_least(1, _INT32_MAX),
    "max_batch": _at_least(1),
    "max_queue": _at_least(1),
    "max_concurrent_rpcs": _at_least(0, _INT32_MAX),
    "max_iter_cap": _at_least(1),
    "min_tol": _tolerance,
    "max_train_steps": _at_least(1),
    "max_train_sessions": _at_least(1),
    "train_idle_seconds": _seconds,
    "stream_idle_seconds": _seconds,
    "max_watch_streams": _at_least(1),
    "max_infer_streams": _at_least(0, _INT32_MAX),
    "max_streams_per_connection": _at_least(1, _INT32_MAX),
    "connection_idle_seconds": _seconds,
    "train_max_seconds": _seconds,
    "keep_versions": _at_least(1),
    "poll_interval": _seconds,
    "max_model_bytes": _at_least(1),
    "workers": _at_least(1),
    "max_batch_slots": _at_least(1),
    "torch_threads": _at_least(0),
    "processes": _at_least(1, 64),
    "compile_step": _switch,
    "grace_seconds": _number(float, low=0, what="a finite number of seconds"),
}


class _OneLineParser(argparse.ArgumentParser):
    """argparse, with errors on one line (no usage block): `deq-server: error: ...`, exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def env_name(field: str) -> str:
    return "DEQ_" + field.upper()


def default_model_dir(env: Mapping[str, str]) -> Path:
    """The model directory when neither --model-dir nor DEQ_MODEL_DIR names one: the per-user
    data directory of the XDG base-directory convention, so that Train has a place to publish."""
    base = env.get("XDG_DATA_HOME", "")
    root = Path(base) if os.path.isabs(base) else Path.home() / ".local" / "share"
    return root / "deq-serve" / "models"


# Flags that may come without a value, and what they mean then (`--compile-step`: on), and
# those with a `--no-` form (`--no-compile-step`: off), as when they were boolean flags.
_BARE = {"compile_step": "on"}
_NEGATED = {"compile_step": "off"}

# Defaults that depend on the environment, as --help shows them.
_SHOWN_DEFAULTS = {
    "model_dir": "$XDG_DATA_HOME/deq-serve/models, else ~/.local/share/deq-serve/models"
}


def _shown(value: object) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "off" if not value else "on"
    return repr(value) if value == "" else str(value)


def build_parser() -> argparse.ArgumentParser:
    """The `deq-server` parser: every field a flag, its help naming the default and DEQ_* twin."""
    defaults = ServerConfig()
    parser = _OneLineParser(
        prog="deq-server",
        description="Serve DEQ models over gRPC. Every flag has a DEQ_* environment twin, "
        "parsed and checked the same way; a flag wins over its variable.",
    )
    for f in fields(ServerConfig):
        default = getattr(defaults, f.name)
        flag = "--" + f.name.replace("_", "-")
        shown = _SHOWN_DEFAULTS.get(f.name) or _shown(default)
        text = f"{_HELP[f.name]} (default: {shown}; env {env_name(f.name)})"
        if isinstance(default, bool):
            parser.add_argument(
                flag,
                dest=f.name,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=text,
            )
            continue
        parser.add_argument(
            flag,
            dest=f.name,
            type=_TYPES.get(f.name, str if isinstance(default, str) else _path),
            default=argparse.SUPPRESS,  # unset flags fall back to DEQ_*, then the default
            choices=_CHOICES.get(f.name),
            help=text,
            **({"nargs": "?", "const": _BARE[f.name]} if f.name in _BARE else {}),
        )
        if f.name in _NEGATED:  # the boolean flag's negation, from when the field was one
            parser.add_argument(
                "--no-" + flag.removeprefix("--"),
                dest=f.name,
                action="store_const",
                const=_NEGATED[f.name],
                default=argparse.SUPPRESS,
                help=f"the same as {flag} {_NEGATED[f.name]}",
            )
    return parser


def _from_environment(parser: argparse.ArgumentParser, name: str, raw: str) -> object:
    """A DEQ_* value through the flag's own type and choices (the same checks as the flag)."""
    action = next(a for a in parser._actions if a.dest == name)
    variable = env_name(name)
    if isinstance(getattr(ServerConfig(), name), bool):
        convert: Callable[[str], Any] = _flag
    else:
        convert = action.type if callable(action.type) else str
    try:
        value = convert(raw)
    except (argparse.ArgumentTypeError, ValueError, TypeError) as exc:
        parser.error(f"{variable}: {exc}")
    if action.choices is not None and value not in action.choices:
        choices = ", ".join(map(str, action.choices))
        parser.error(f"{variable}: invalid choice {raw!r} (choose from {choices})")
    return value


def parse_config(
    argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None
) -> ServerConfig:
    """Flags win over DEQ_* environment variables, which win over the defaults; both go
    through the same parsing and range checks, and any failure is parser.error (exit 2)."""
    env = dict(os.environ if env is None else env)
    defaults = ServerConfig()
    parser = build_parser()
    given = vars(parser.parse_args(argv))
    values: dict[str, Any] = {}
    for f in fields(ServerConfig):
        if f.name in given:
            values[f.name] = given[f.name]
        elif (raw := env.get(env_name(f.name))) is not None:
            values[f.name] = _from_environment(parser, f.name, raw)
        elif f.name == "model_dir":
            values[f.name] = default_model_dir(env)
        else:
            values[f.name] = getattr(defaults, f.name)
    args = argparse.Namespace(**values)
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("--tls-cert and --tls-key go together")
    if 0 < args.max_concurrent_rpcs <= args.max_infer_streams:
        parser.error(
            "--max-infer-streams must be below --max-concurrent-rpcs, or InferStreams "
            "alone could hold every RPC slot"
        )
    return ServerConfig(**values)


def infer_stream_cap(config: ServerConfig) -> int:
    """InferStreams allowed open at once: --max-infer-streams, or when 0, half the RPC slots
    (the other half stays free for unary calls, Train and health) or 1024 without a limit."""
    if config.max_infer_streams:
        return config.max_infer_streams
    if config.max_concurrent_rpcs:
        return max(1, config.max_concurrent_rpcs // 2)
    return 1024
