"""The health service with a cap on Watch streams.

Health stays open to everyone (probes carry no token), so its one long-lived call, Watch, is
what an unauthenticated client can hold open: without a cap, enough Watch streams fill
--max-concurrent-rpcs and lock every authenticated caller out, and each holds memory (grpc's
servicer even keeps a condition per watched name, so random names cost more). Past
--max-watch-streams, Watch answers RESOURCE_EXHAUSTED at once; Check is never capped.
"""

from __future__ import annotations

from typing import Any

import grpc
from grpc_health.v1 import health
from grpc_health.v1 import health_pb2 as pb

from .memory import release_free_memory_soon


class BoundedHealthServicer(health.aio.HealthServicer):
    """grpc's asyncio health servicer, with at most `max_watchers` Watch streams at a time."""

    def __init__(self, max_watchers: int) -> None:
        super().__init__()
        self.max_watchers = max_watchers
        self.watchers = 0
        self.status: int | None = None  # what set_all last set

    async def set_all(self, status: int, services: tuple[str, ...]) -> bool:
        """Set `status` for every one of `services`; False when it was set already."""
        if status == self.status:
            return False
        self.status = status
        for service in services:
            await self.set(service, status)
        return True

    async def Watch(self, request: pb.HealthCheckRequest, context: Any) -> None:
        if self.watchers >= self.max_watchers:
            release_free_memory_soon()  # a flood of refused calls should not leave the heap big
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{self.watchers} health Watch streams are open (--max-watch-streams "
                f"{self.max_watchers}); use Check, or retry later",
            )
        self.watchers += 1
        try:
            await super().Watch(request, context)
        finally:
            self.watchers -= 1
            release_free_memory_soon()
