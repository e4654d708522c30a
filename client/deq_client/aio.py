"""``AsyncDEQClient``: the asyncio client (``grpc.aio``), the same methods as ``DEQClient``.

Requests, results, errors, retries and channel settings are the sync client's (``_requests``,
``_results``, ``_errors``, ``_retry``, ``_channel``); only the thin call wrappers live here.
"""

from __future__ import annotations

import os
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Mapping,
    Sized,
)
from contextlib import aclosing, closing
from types import TracebackType
from typing import Any, Self, TypeVar, Unpack

import grpc
import grpc.aio

from deq_client._channel import channel_settings
from deq_client._errors import DEQError
from deq_client._health import CHECK_METHOD, decode_response, encode_request
from deq_client._progress import Progress
from deq_client._requests import (
    InferOptions,
    check_infer_options,
    infer_request,
    infer_stream_request,
    infer_stream_requests,
    train_batch,
    train_config,
    train_requests,
)
from deq_client._results import InferResult, InOrder, ModelInfo, TrainEvent
from deq_client._retry import AsyncReplay, Replay, acall_unary, astream
from deq_client._tensor import TensorLike
from deq_client.pb.deq.v1 import deq_pb2 as pb
from deq_client.pb.deq.v1 import deq_pb2_grpc as pb_grpc

R = TypeVar("R")


class AsyncDEQClient:
    """An asyncio client of a deq-serve server; arguments as in ``DEQClient``.

    ``infer_many`` and ``train`` accept sync or async iterables and return async iterators.
    Create it inside a running event loop; use ``async with`` or ``await client.close()``.
    """

    def __init__(
        self,
        target: str,
        *,
        token: str | None = None,
        timeout: float | None = None,
        tls: bool = False,
        root_certificates: bytes | str | os.PathLike[str] | None = None,
        retries: int = 3,
        backoff: float = 0.1,
        options: list[tuple[str, Any]] | None = None,
    ) -> None:
        self._settings = settings = channel_settings(
            target,
            token=token,
            timeout=timeout,
            tls=tls,
            root_certificates=root_certificates,
            retries=retries,
            backoff=backoff,
            options=options,
        )
        if settings.credentials is None:
            self._channel = grpc.aio.insecure_channel(settings.target, options=settings.options)
        else:
            self._channel = grpc.aio.secure_channel(
                settings.target, settings.credentials, options=settings.options
            )
        stub: Any = pb_grpc.DEQServiceStub(self._channel)  # the async stub: types differ by channel
        self._stub: pb_grpc.DEQServiceAsyncStub = stub
        self._health: Any = self._channel.unary_unary(
            CHECK_METHOD,
            request_serializer=encode_request,
            response_deserializer=decode_response,
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Closes the channel; calls in flight are cancelled."""
        await self._channel.close()

    async def _unary(
        self, method: Callable[..., Awaitable[R]], request: object, timeout: float | None
    ) -> R:
        """One unary call with the client's metadata, deadline and retries."""

        def attempt(remaining: float | None) -> Awaitable[R]:
            return method(request, timeout=remaining, metadata=self._settings.metadata)

        return await acall_unary(
            self._settings.retry, self._settings.call_timeout(timeout), attempt
        )

    def _stream(
        self,
        method: Callable[..., Any],
        replay: Replay[Any] | AsyncReplay[Any],
        timeout: float | None,
    ) -> AsyncGenerator[Any, None]:
        """The responses of one streaming call, retried until its first response."""

        def start(requests: Any, remaining: float | None) -> Any:
            return method(requests, timeout=remaining, metadata=self._settings.metadata)

        return astream(self._settings.retry, timeout, replay, start)

    async def infer(
        self,
        model: str,
        x: TensorLike,
        *,
        timeout: float | None = None,
        **options: Unpack[InferOptions],
    ) -> InferResult:
        """As ``DEQClient.infer``."""
        request = infer_request(model, x, **options)
        response: pb.InferResponse = await self._unary(self._stub.Infer, request, timeout)
        return InferResult.from_proto(response)

    async def infer_many(
        self,
        model: str,
        xs: Iterable[TensorLike] | AsyncIterable[TensorLike],
        *,
        timeout: float | None = None,
        **options: Unpack[InferOptions],
    ) -> AsyncIterator[InferResult]:
        """As ``DEQClient.infer_many``; ``xs`` may be an async iterable."""
        check_infer_options(options)
        replay: Replay[pb.InferStreamRequest] | AsyncReplay[pb.InferStreamRequest]
        if isinstance(xs, AsyncIterable):

            async def convert(
                items: AsyncIterable[TensorLike],
            ) -> AsyncIterator[pb.InferStreamRequest]:
                index = 0
                async for x in items:
                    yield infer_stream_request(index, model, x, options)
                    index += 1

            replay = AsyncReplay(convert(xs))
        else:
            replay = Replay(infer_stream_requests(model, xs, options))
        order = InOrder()
        async with aclosing(self._stream(self._stub.InferStream, replay, timeout)) as responses:
            async for response in responses:
                for item in order.push(response):
                    if isinstance(item, DEQError):
                        raise item
                    yield item
        order.finish(replay.sent)

    async def train(
        self,
        model: str,
        batches: Iterable[tuple[TensorLike, TensorLike]]
        | AsyncIterable[tuple[TensorLike, TensorLike]],
        config: Mapping[str, Any],
        *,
        timeout: float | None = None,
        progress: bool = False,
    ) -> AsyncIterator[TrainEvent]:
        """As ``DEQClient.train``; ``batches`` may be an async iterable."""
        replay: Replay[pb.TrainRequest] | AsyncReplay[pb.TrainRequest]
        if isinstance(batches, AsyncIterable):
            first = train_config(model, config)

            async def convert(items: AsyncIterable[object]) -> AsyncIterator[pb.TrainRequest]:
                yield first
                index = 0
                async for batch in items:
                    yield train_batch(index, batch, first.config.loss)
                    index += 1

            replay = AsyncReplay(convert(batches))
        else:
            replay = Replay(train_requests(model, batches, config))
        bar = Progress(progress, len(batches) if isinstance(batches, Sized) else None)
        with closing(bar):
            async with aclosing(self._stream(self._stub.Train, replay, timeout)) as responses:
                async for response in responses:
                    event = TrainEvent.from_proto(response)
                    bar.update(event)
                    yield event

    async def list_models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        """As ``DEQClient.list_models``."""
        request = pb.ListModelsRequest()
        response: pb.ListModelsResponse = await self._unary(self._stub.ListModels, request, timeout)
        return [ModelInfo.from_proto(info) for info in response.models]

    async def get_model(self, name: str, *, timeout: float | None = None) -> ModelInfo:
        """As ``DEQClient.get_model``."""
        request = pb.GetModelRequest(name=name)
        response: pb.GetModelResponse = await self._unary(self._stub.GetModel, request, timeout)
        return ModelInfo.from_proto(response.model)

    async def load_model(self, name: str, path: str, *, timeout: float | None = None) -> ModelInfo:
        """As ``DEQClient.load_model``."""
        request = pb.LoadModelRequest(name=name, path=path)
        response: pb.LoadModelResponse = await self._unary(self._stub.LoadModel, request, timeout)
        return ModelInfo.from_proto(response.model)

    async def unload_model(self, name: str, *, timeout: float | None = None) -> None:
        """As ``DEQClient.unload_model``."""
        await self._unary(self._stub.UnloadModel, pb.UnloadModelRequest(name=name), timeout)

    async def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """As ``DEQClient.health``."""
        try:
            status: str = await self._unary(self._health, service, timeout)
        except DEQError as error:
            if error.code == grpc.StatusCode.NOT_FOUND:
                return "SERVICE_UNKNOWN"
            raise
        return status
