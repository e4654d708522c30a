"""Retries on UNAVAILABLE with exponential backoff, for unary calls and for streams.

Why not gRPC's own ``retryPolicy`` (service config): in grpcio 1.81 a race in the core retry
timer can leave a retried call hanging forever (grpc/grpc#41036; reproduced here with a 1 ms
backoff), so the SDK retries in Python, where the behaviour is plain to read and test.

Rules: only UNAVAILABLE is retried; never past the call's deadline (the timeout covers all
attempts); a stream only until its first response arrives. A stream's requests are replayed to
the next attempt by ``Replay`` / ``AsyncReplay``, which keep what was pulled from the caller's
iterator until the stream commits (first response) and never pull an item twice.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Generator, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import grpc

from deq_client._errors import DEQError, rpc_errors

T = TypeVar("T")
R = TypeVar("R")

MAX_BACKOFF = 10.0
"""The longest wait between two attempts, in seconds."""


class Deadline:
    """The end of a call's time budget; ``None`` means none."""

    def __init__(self, timeout: float | None) -> None:
        self._end = None if timeout is None else time.monotonic() + timeout

    def remaining(self) -> float | None:
        """Seconds left (never negative), or ``None`` without a deadline."""
        return None if self._end is None else max(self._end - time.monotonic(), 0.0)


@dataclass(frozen=True)
class RetryPolicy:
    """``retries`` more attempts after the first on UNAVAILABLE, waiting ``backoff * 2**n``
    seconds (capped at ``MAX_BACKOFF``, jittered down by up to half)."""

    retries: int
    backoff: float

    def delay(self, error: DEQError, attempt: int, deadline: Deadline) -> float | None:
        """The wait before retrying after ``error`` on attempt ``attempt`` (0-based), or ``None``
        when it must not be retried (another code, retries spent, or past the deadline)."""
        if error.code != grpc.StatusCode.UNAVAILABLE or attempt >= self.retries:
            return None
        wait = min(self.backoff * 2**attempt, MAX_BACKOFF) * random.uniform(0.5, 1.0)
        remaining = deadline.remaining()
        return None if remaining is not None and wait >= remaining else wait


def call_unary(policy: RetryPolicy, timeout: float | None, call: Callable[[float | None], R]) -> R:
    """Runs ``call(remaining_timeout)`` with retries; every RpcError leaves as ``DEQError``."""
    deadline = Deadline(timeout)
    attempt = 0
    while True:
        try:
            with rpc_errors():
                return call(deadline.remaining())
        except DEQError as error:
            wait = policy.delay(error, attempt, deadline)
            if wait is None:
                raise
        time.sleep(wait)
        attempt += 1


async def acall_unary(
    policy: RetryPolicy, timeout: float | None, call: Callable[[float | None], Awaitable[R]]
) -> R:
    """``call_unary`` for ``grpc.aio``."""
    deadline = Deadline(timeout)
    attempt = 0
    while True:
        try:
            with rpc_errors():
                return await call(deadline.remaining())
        except DEQError as error:
            wait = policy.delay(error, attempt, deadline)
            if wait is None:
                raise
        await asyncio.sleep(wait)
        attempt += 1


class _ReplayLog(Generic[T]):
    """What ``Replay`` and ``AsyncReplay`` share: the log of pulled items and the bookkeeping.

    Before the stream commits every pulled item is logged, so a new attempt can resend it. After
    it commits the current attempt pulls without logging, but items a dead attempt's consumer was
    still pulling are logged, so the current attempt sends them next and in order.
    """

    def __init__(self) -> None:
        self.log: list[T] = []
        self.current = 0  # the number of the live attempt
        self.committed = False
        self.error: Exception | None = None
        self.sent = 0  # distinct items pulled from the caller's iterator

    def next_attempt(self) -> int:
        self.current += 1
        return self.current

    def commit(self) -> None:
        """The first response arrived: no more retries, so stop keeping items once sent."""
        self.committed = True

    def pulled(self, number: int, item: T) -> bool:
        """Files an item attempt ``number`` pulled; True when it was logged."""
        self.sent += 1
        if not self.committed or number != self.current:
            self.log.append(item)
            return True
        return False


class Replay(_ReplayLog[T]):
    """One request iterator fed to successive attempts of a streaming call (``attempt()``).

    Records the exception the caller's iterator raised (``error``) so that ``rpc_errors`` can
    raise it instead of the cancellation gRPC turns it into; gRPC pulls on its own thread.
    """

    def __init__(self, source: Iterator[T]) -> None:
        super().__init__()
        self._source = source
        self._lock = threading.Lock()

    def attempt(self) -> Iterator[T]:
        """The request iterator of a new attempt: the logged items, then the rest."""
        with self._lock:
            return self._view(self.next_attempt())

    def commit(self) -> None:
        with self._lock:
            super().commit()

    def _view(self, number: int) -> Iterator[T]:
        index = 0
        while True:
            with self._lock:
                if self.error is not None:
                    raise self.error
                if self.committed and number == self.current and index:
                    del self.log[:index]  # committed: what the live attempt sent is not kept
                    index = 0
                if index < len(self.log):
                    item = self.log[index]
                    index += 1
                else:
                    try:
                        item = next(self._source)
                    except StopIteration:
                        return
                    except Exception as error:
                        self.error = error
                        raise
                    if self.pulled(number, item):
                        index += 1
            yield item


class AsyncReplay(_ReplayLog[T]):
    """``Replay`` for an async source under ``grpc.aio``.

    gRPC cancels a dead attempt's consumer task, possibly while it awaits the caller's iterator;
    the pending ``anext`` is shielded and handed to the next attempt, so the caller's async
    generator is never cancelled halfway and no item is lost.
    """

    def __init__(self, source: AsyncIterator[T]) -> None:
        super().__init__()
        self._source = source
        self._lock = asyncio.Lock()
        self._pending: asyncio.Future[T] | None = None

    def attempt(self) -> AsyncIterator[T]:
        """The request iterator of a new attempt: the logged items, then the rest."""
        return self._view(self.next_attempt())

    async def _next(self) -> T:
        return await anext(self._source)

    async def _view(self, number: int) -> AsyncIterator[T]:
        index = 0
        while True:
            async with self._lock:
                if self.error is not None:
                    raise self.error
                if self.committed and number == self.current and index:
                    del self.log[:index]  # committed: what the live attempt sent is not kept
                    index = 0
                if index < len(self.log):
                    item = self.log[index]
                    index += 1
                else:
                    if self._pending is None:
                        self._pending = asyncio.ensure_future(self._next())
                    try:
                        item = await asyncio.shield(self._pending)
                    except StopAsyncIteration:
                        return  # the finished future stays, so every view ends here
                    except asyncio.CancelledError:
                        raise
                    except Exception as error:
                        self.error = error
                        raise
                    self._pending = None
                    if self.pulled(number, item):
                        index += 1
            yield item


def stream(
    policy: RetryPolicy,
    timeout: float | None,
    replay: Replay[Any],
    start: Callable[[Iterator[Any], float | None], Any],
) -> Generator[Any, None, None]:
    """Yields the responses of ``start(requests, remaining_timeout)`` (a streaming call),
    retrying before the first response; breaking off cancels the call."""
    deadline = Deadline(timeout)
    attempt = 0
    while True:
        call = start(replay.attempt(), deadline.remaining())
        received = False
        try:
            with rpc_errors(replay):
                for response in call:
                    if not received:
                        received = True
                        replay.commit()
                    yield response
                return
        except DEQError as error:
            wait = None if received else policy.delay(error, attempt, deadline)
            if wait is None:
                raise
        finally:
            call.cancel()
        time.sleep(wait)
        attempt += 1


async def astream(
    policy: RetryPolicy,
    timeout: float | None,
    replay: Replay[Any] | AsyncReplay[Any],
    start: Callable[[Any, float | None], Any],
) -> AsyncGenerator[Any, None]:
    """``stream`` for ``grpc.aio``; ``replay`` may wrap a sync or an async source."""
    deadline = Deadline(timeout)
    attempt = 0
    while True:
        call = start(replay.attempt(), deadline.remaining())
        received = False
        try:
            with rpc_errors(replay):
                async for response in call:
                    if not received:
                        received = True
                        replay.commit()
                    yield response
                return
        except DEQError as error:
            wait = None if received else policy.delay(error, attempt, deadline)
            if wait is None:
                raise
        finally:
            call.cancel()
        await asyncio.sleep(wait)
        attempt += 1
