"""``DEQError``, the one exception type of the SDK, and the one place that builds it from gRPC."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

import grpc

_CODES: dict[int, grpc.StatusCode] = {code.value[0]: code for code in grpc.StatusCode}


def status_code(value: int) -> grpc.StatusCode:
    """The ``grpc.StatusCode`` of a numeric code (as in ``InferStreamResponse.error_code``)."""
    return _CODES.get(value, grpc.StatusCode.UNKNOWN)


class DEQError(Exception):
    """A failed call: the gRPC status ``code`` and the server's ``message``.

    ``details`` is the same text under gRPC's name for it; ``request_id`` is set for a failed item
    of ``infer_many``.
    """

    def __init__(self, code: grpc.StatusCode, message: str, request_id: str | None = None) -> None:
        super().__init__(code, message, request_id)
        self.code = code
        self.message = message
        self.request_id = request_id

    @property
    def details(self) -> str:
        """The status message, as ``grpc.RpcError.details()`` calls it."""
        return self.message

    def __str__(self) -> str:
        where = f" (request {self.request_id})" if self.request_id is not None else ""
        return f"{self.code.name}{where}: {self.message}"

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError) -> DEQError:
        """Builds the error from a sync or asyncio ``grpc.RpcError``."""
        code_of = getattr(error, "code", None)
        code = code_of() if callable(code_of) else None
        details_of = getattr(error, "details", None)
        message = details_of() if callable(details_of) else None
        return cls(
            code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN,
            message if isinstance(message, str) else str(error),
        )


class InvalidArgumentError(DEQError, ValueError):
    """A value the SDK refused before any RPC: a ``DEQError`` with code INVALID_ARGUMENT (as the
    server would answer), and a ``ValueError``, so that both ``except`` clauses catch it."""

    def __init__(self, message: str) -> None:
        super().__init__(grpc.StatusCode.INVALID_ARGUMENT, message)


class InvalidArgumentTypeError(InvalidArgumentError, TypeError):
    """An ``InvalidArgumentError`` for a value of the wrong type; also a ``TypeError``."""


class MalformedResponseError(DEQError, ValueError):
    """A response the SDK cannot decode (a server bug): code INTERNAL; also a ``ValueError``."""

    def __init__(self, message: str) -> None:
        super().__init__(grpc.StatusCode.INTERNAL, message)


class _RecordsErrors(Protocol):
    @property
    def error(self) -> Exception | None: ...


@contextmanager
def rpc_errors(requests: _RecordsErrors | None = None) -> Iterator[None]:
    """Re-raises every ``grpc.RpcError`` in the block as ``DEQError``.

    When the call's request stream raised (a bad batch, say), gRPC cancels the call (sync: an
    RpcError; asyncio: ``CancelledError``); that original exception is raised instead.
    """
    try:
        yield
    except grpc.RpcError as error:
        if requests is not None and requests.error is not None:
            raise requests.error from error
        raise DEQError.from_rpc_error(error) from error
    except asyncio.CancelledError as cancelled:
        if requests is not None and requests.error is not None:
            raise requests.error from cancelled
        raise
