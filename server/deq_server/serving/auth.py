"""Optional bearer-token auth with two scopes: `infer` and `admin` (Train, LoadModel, UnloadModel).

Admin tokens carry both scopes. Health and reflection stay open so that probes and tools work.
A presented token is hashed (sha256) and compared with `hmac.compare_digest` against the digest of
every configured token, with no early exit: the time taken depends neither on how much of a guess
is right, nor on its length, nor on which token it matches. Tokens are never logged.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import grpc

from .memory import release_free_memory_soon

ADMIN_METHODS = frozenset(f"/deq.v1.DEQService/{m}" for m in ("Train", "LoadModel", "UnloadModel"))
OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def split_tokens(raw: str) -> list[str]:
    return [t.strip() for t in raw.split(",") if t.strip()]


def _digest(token: str) -> bytes:
    """Fixed-length stand-in for a token, so that comparisons never leak its length."""
    return hashlib.sha256(token.encode()).digest()


def _bearer(metadata: Iterable[tuple[str, Any]] | None) -> str | None:
    for key, value in metadata or ():
        if key == "authorization":
            text = value.decode() if isinstance(value, bytes) else str(value)
            scheme, _, token = text.partition(" ")
            return token.strip() if scheme.lower() == "bearer" else None
    return None


def _denied(handler: Any, code: grpc.StatusCode, message: str) -> Any:
    """A handler of the same RPC kind that only aborts."""

    async def unary(_request: Any, context: grpc.aio.ServicerContext) -> Any:
        release_free_memory_soon()  # a flood of refused calls should not leave the heap big
        await context.abort(code, message)

    async def stream(_request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        release_free_memory_soon()
        await context.abort(code, message)
        yield None  # never reached: abort raises; this line makes the function a generator

    kinds = {
        (False, False): (grpc.unary_unary_rpc_method_handler, unary),
        (True, False): (grpc.stream_unary_rpc_method_handler, unary),
        (False, True): (grpc.unary_stream_rpc_method_handler, stream),
        (True, True): (grpc.stream_stream_rpc_method_handler, stream),
    }
    factory, behaviour = kinds[(handler.request_streaming, handler.response_streaming)]
    return factory(
        behaviour,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """UNAUTHENTICATED without a valid token; PERMISSION_DENIED without the method's scope."""

    def __init__(self, infer_tokens: list[str], admin_tokens: list[str]) -> None:
        self._tokens = [(_digest(t), {"infer"}) for t in infer_tokens]
        self._tokens += [(_digest(t), {"infer", "admin"}) for t in admin_tokens]

    def _scopes(self, token: str | None) -> set[str] | None:
        if token is None:
            return None
        given, found = _digest(token), None
        for known, scopes in self._tokens:  # no early exit: time does not depend on the match
            if hmac.compare_digest(given, known):
                found = scopes
        return found

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_PREFIXES):
            return handler
        scopes = self._scopes(_bearer(details.invocation_metadata))
        if scopes is None:
            return _denied(
                handler, grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token"
            )
        needed = "admin" if details.method in ADMIN_METHODS else "infer"
        if needed not in scopes:
            return _denied(
                handler, grpc.StatusCode.PERMISSION_DENIED, f"the token lacks the {needed} scope"
            )
        return handler
