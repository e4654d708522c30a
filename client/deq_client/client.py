"""``DEQClient``: the synchronous client of ``deq.v1.DEQService``.

Each method is a thin wrapper: build the request (``_requests``), call the stub with retries
(``_retry``), decode the response (``_results``); every ``grpc.RpcError`` becomes ``DEQError``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sized
from contextlib import closing
from types import TracebackType
from typing import Any, Self, TypeVar, Unpack

import grpc

from deq_client._channel import channel_settings
from deq_client._errors import DEQError
from deq_client._health import CHECK_METHOD, decode_response, encode_request
from deq_client._progress import Progress
from deq_client._requests import (
    InferOptions,
    check_infer_options,
    infer_request,
    infer_stream_requests,
    train_requests,
)
from deq_client._results import InferResult, InOrder, ModelInfo, TrainEvent
from deq_client._retry import Replay, call_unary, stream
from deq_client._tensor import TensorLike
from deq_client.pb.deq.v1 import deq_pb2 as pb
from deq_client.pb.deq.v1 import deq_pb2_grpc as pb_grpc

R = TypeVar("R")


class DEQClient:
    """A synchronous client of a deq-serve server.

    Args:
        target: The server address, ``"host:port"`` (any gRPC target string).
        token: A bearer token, sent as ``authorization: Bearer <token>`` metadata.
        timeout: The default deadline of unary calls in seconds (``None``: none). Streams
            (``infer_many``, ``train``) take only their own ``timeout``.
        tls: Use TLS with the system's root certificates.
        root_certificates: PEM bytes, or a path to a PEM file, of the CAs to trust (implies TLS).
        retries: Retries on UNAVAILABLE, with exponential backoff starting at ``backoff``
            seconds, within the call's timeout; no other code is retried, and a stream only
            before its first response (its requests are replayed).
        backoff: The first retry's backoff in seconds.
        options: Extra gRPC channel options; they override the client's by key.
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
            self._channel = grpc.insecure_channel(settings.target, options=settings.options)
        else:
            self._channel = grpc.secure_channel(
                settings.target, settings.credentials, options=settings.options
            )
        self._stub: pb_grpc.DEQServiceStub = pb_grpc.DEQServiceStub(self._channel)
        self._health: Any = self._channel.unary_unary(
            CHECK_METHOD,
            request_serializer=encode_request,
            response_deserializer=decode_response,
        )

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Closes the channel; calls in flight are cancelled."""
        self._channel.close()

    def _unary(self, method: Callable[..., R], request: object, timeout: float | None) -> R:
        """One unary call with the client's metadata, deadline and retries."""

        def attempt(remaining: float | None) -> R:
            return method(request, timeout=remaining, metadata=self._settings.metadata)

        return call_unary(self._settings.retry, self._settings.call_timeout(timeout), attempt)

    def _stream(
        self, method: Callable[..., Any], replay: Replay[Any], timeout: float | None
    ) -> Generator[Any, None, None]:
        """The responses of one streaming call, retried until its first response."""

        def start(requests: Iterator[Any], remaining: float | None) -> Any:
            return method(requests, timeout=remaining, metadata=self._settings.metadata)

        return stream(self._settings.retry, timeout, replay, start)

    def infer(
        self,
        model: str,
        x: TensorLike,
        *,
        timeout: float | None = None,
        **options: Unpack[InferOptions],
    ) -> InferResult:
        """Solves the batch ``x`` to its fixed point; options as in ``infer_request``.

        ``tol`` may be one float or one per sample; ``method`` is picard|anderson|broyden,
        ``stop_mode`` abs|rel. Raises ``DEQError``: INVALID_ARGUMENT before any RPC for bad
        arguments (also a ``ValueError``, or a ``TypeError`` for a wrong type), the call's status
        for a failed call.
        """
        request = infer_request(model, x, **options)
        response: pb.InferResponse = self._unary(self._stub.Infer, request, timeout)
        return InferResult.from_proto(response)

    def infer_many(
        self,
        model: str,
        xs: Iterable[TensorLike],
        *,
        timeout: float | None = None,
        **options: Unpack[InferOptions],
    ) -> Iterator[InferResult]:
        """Pipelines one ``infer`` per batch of ``xs`` on one ``InferStream`` call.

        Results come in the order of ``xs`` whatever order the server answers in. A failed item
        raises its ``DEQError`` (with ``request_id``, the item's position) when reached, which
        ends the stream; breaking out of the loop cancels it. ``timeout`` bounds the whole stream.
        """
        check_infer_options(options)
        replay = Replay(infer_stream_requests(model, xs, options))
        order = InOrder()
        with closing(self._stream(self._stub.InferStream, replay, timeout)) as responses:
            for response in responses:
                for item in order.push(response):
                    if isinstance(item, DEQError):
                        raise item
                    yield item
        order.finish(replay.sent)

    def train(
        self,
        model: str,
        batches: Iterable[tuple[TensorLike, TensorLike]],
        config: Mapping[str, Any],
        *,
        timeout: float | None = None,
        progress: bool = False,
    ) -> Iterator[TrainEvent]:
        """Fine-tunes ``model`` on ``(inputs, targets)`` batches; yields one event per step.

        ``config`` is validated before the call (see ``train_config`` for its keys; ``loss`` and
        ``learning_rate`` are required). When ``batches`` is exhausted the session commits and the
        last event is ``kind == "committed"`` with the published version. Stopping early, or an
        exception from ``batches`` (raised here as it was), cancels the session: nothing is
        published.
        """
        replay = Replay(train_requests(model, batches, config))
        bar = Progress(progress, len(batches) if isinstance(batches, Sized) else None)
        with closing(bar), closing(self._stream(self._stub.Train, replay, timeout)) as responses:
            for response in responses:
                event = TrainEvent.from_proto(response)
                bar.update(event)
                yield event

    def list_models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        """Describes every loaded model."""
        request = pb.ListModelsRequest()
        response: pb.ListModelsResponse = self._unary(self._stub.ListModels, request, timeout)
        return [ModelInfo.from_proto(info) for info in response.models]

    def get_model(self, name: str, *, timeout: float | None = None) -> ModelInfo:
        """Describes one model: versions, config, shapes, solver defaults, device, dtype."""
        request = pb.GetModelRequest(name=name)
        response: pb.GetModelResponse = self._unary(self._stub.GetModel, request, timeout)
        return ModelInfo.from_proto(response.model)

    def load_model(self, name: str, path: str, *, timeout: float | None = None) -> ModelInfo:
        """Serves the checkpoint at ``path`` (relative to the server's model directory) as
        ``name``, as its next version if ``name`` is already served. Needs the admin scope."""
        request = pb.LoadModelRequest(name=name, path=path)
        response: pb.LoadModelResponse = self._unary(self._stub.LoadModel, request, timeout)
        return ModelInfo.from_proto(response.model)

    def unload_model(self, name: str, *, timeout: float | None = None) -> None:
        """Stops serving ``name``; its files stay. Needs the admin scope."""
        self._unary(self._stub.UnloadModel, pb.UnloadModelRequest(name=name), timeout)

    def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """The serving status of ``service`` ("" = the whole server) from ``grpc.health.v1``.

        Returns ``"SERVING"``, ``"NOT_SERVING"``, ``"UNKNOWN"`` or ``"SERVICE_UNKNOWN"`` (a service
        the server does not know, which the Check method reports as NOT_FOUND).
        """
        try:
            status: str = self._unary(self._health, service, timeout)
        except DEQError as error:
            if error.code == grpc.StatusCode.NOT_FOUND:
                return "SERVICE_UNKNOWN"
            raise
        return status
