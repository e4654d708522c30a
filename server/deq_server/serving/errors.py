"""Service errors carry their gRPC status; they are mapped to the wire in exactly one place."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

log = logging.getLogger("deq_server")


class ServingError(Exception):
    """An expected failure with the status code and message the caller should see."""

    code = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgumentError(ServingError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFoundError(ServingError):
    code = grpc.StatusCode.NOT_FOUND


class FailedPreconditionError(ServingError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class AlreadyExistsError(ServingError):
    code = grpc.StatusCode.ALREADY_EXISTS


class ResourceExhaustedError(ServingError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceededError(ServingError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


def invalid(field: str, expected: str, got: object) -> InvalidArgumentError:
    """INVALID_ARGUMENT naming the field, what was expected and what came."""
    return InvalidArgumentError(f"{field}: expected {expected}, got {got}")


R = TypeVar("R")


def code_of(exc: BaseException) -> grpc.StatusCode:
    """The status code a failure ends its RPC with (for metrics; nothing logged)."""
    if isinstance(exc, ServingError):
        return exc.code
    if isinstance(exc, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.INTERNAL


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status a failure maps to: its own for ServingError, INTERNAL (logged) otherwise."""
    if isinstance(exc, ServingError):
        return exc.code, exc.message
    log.error("unexpected error", exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}"


def unary(
    method: Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[R]],
) -> Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[R]]:
    """Map exceptions of a unary handler to gRPC statuses."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> R:
        try:
            return await method(self, request, context)
        except ServingError as exc:
            await context.abort(exc.code, exc.message)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # the one place unexpected errors become INTERNAL
            code, message = status_of(exc)
            await context.abort(code, message)
        raise AssertionError("unreachable: abort raises")

    return wrapper


def streaming(
    method: Callable[[Any, Any, grpc.aio.ServicerContext], AsyncIterator[R]],
) -> Callable[[Any, Any, grpc.aio.ServicerContext], AsyncIterator[R]]:
    """Map exceptions of a streaming handler to gRPC statuses."""

    @functools.wraps(method)
    async def wrapper(
        self: Any, request: Any, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[R]:
        try:
            async for item in method(self, request, context):
                yield item
        except ServingError as exc:
            await context.abort(exc.code, exc.message)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            code, message = status_of(exc)
            await context.abort(code, message)

    return wrapper


def streaming_writes(
    method: Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[None]],
) -> Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[None]]:
    """`unary`'s mapping, for a streaming handler that sends with `context.write` (so that it
    can bound how long one write waits), where the status itself may not be sendable."""
    handler = unary(method)

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> None:
        try:
            await handler(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception:
            # gRPC sends no status while an earlier answer still waits for the client to read
            # it; the handler ends anyway, and the transport ends the stream at the client's
            # deadline or disconnection.
            log.warning("a stream ended without a status: its client reads nothing")
            raise asyncio.CancelledError from None

    return wrapper
