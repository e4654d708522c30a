"""Channel settings shared by ``DEQClient`` and ``AsyncDEQClient``: TLS, auth metadata, options,
the default timeout and the retry policy."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import grpc

from deq_client._errors import InvalidArgumentError
from deq_client._retry import RetryPolicy

_MESSAGE_LIMIT = 2**31 - 1  # as tritonclient: tensors are large; the server enforces its own


@dataclass(frozen=True)
class ChannelSettings:
    """Everything needed to open a channel and make calls on it."""

    target: str
    credentials: grpc.ChannelCredentials | None
    options: tuple[tuple[str, Any], ...]
    metadata: tuple[tuple[str, str], ...]
    timeout: float | None
    retry: RetryPolicy

    def call_timeout(self, timeout: float | None) -> float | None:
        """The deadline of one unary call: its own ``timeout`` or the client's default."""
        return self.timeout if timeout is None else _seconds("timeout", timeout)


def _seconds(field: str, value: float) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not (math.isfinite(value) and value > 0)
    ):
        raise InvalidArgumentError(
            f"{field}: must be a finite number of seconds > 0, got {value!r}"
        )
    return float(value)


def channel_settings(
    target: str,
    *,
    token: str | None,
    timeout: float | None,
    tls: bool,
    root_certificates: bytes | str | os.PathLike[str] | None,
    retries: int,
    backoff: float,
    options: list[tuple[str, Any]] | None,
) -> ChannelSettings:
    """Validates the client's constructor arguments; ``options`` override the defaults by key."""
    if not isinstance(target, str) or not target:
        raise InvalidArgumentError("target: expected 'host:port' (or any gRPC target string)")
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise InvalidArgumentError(f"retries: must be an int >= 0, got {retries!r}")
    backoff = _seconds("backoff", backoff)
    merged: dict[str, Any] = {
        "grpc.max_send_message_length": _MESSAGE_LIMIT,
        "grpc.max_receive_message_length": _MESSAGE_LIMIT,
    }
    merged.update(options or [])

    credentials = None
    if tls or root_certificates is not None:
        if isinstance(root_certificates, str | os.PathLike):
            with open(root_certificates, "rb") as file:
                root_certificates = file.read()
        credentials = grpc.ssl_channel_credentials(root_certificates=root_certificates)
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    return ChannelSettings(
        target=target,
        credentials=credentials,
        options=tuple(merged.items()),
        metadata=metadata,
        timeout=None if timeout is None else _seconds("timeout", timeout),
        retry=RetryPolicy(retries, backoff),
    )
