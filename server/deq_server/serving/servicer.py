"""`deq.v1.DEQService`: thin handlers that decode, call the scheduler and encode.

LoadModel reads only inside the model directory; UnloadModel stops serving, files stay.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from deq_client.pb.deq.v1 import deq_pb2 as pb
from deq_client.pb.deq.v1 import deq_pb2_grpc
from deq_client.wire import METHODS, STOP_MODES
from deq_server.core import CheckpointError

from . import tensors, validate
from .config import ServerConfig, infer_stream_cap
from .errors import (
    DeadlineExceededError,
    FailedPreconditionError,
    ResourceExhaustedError,
    invalid,
    status_of,
    streaming,
    streaming_writes,
    unary,
)
from .inference import Answer, InferCall, Inference
from .memory import release_free_memory_soon
from .metrics import Metrics
from .registry import Registry, ServedModel
from .scheduler import Scheduler
from .tensors import WireTensor
from .training import TrainSession, check_model_name, confined_path

# Requests one InferStream may have in flight or answered but not yet sent. Past it the server
# stops reading the stream, and gRPC flow control holds the client back: a client that sends
# without reading cannot make the server buffer answers without bound.
STREAM_WINDOW = 64


@dataclass(frozen=True)
class Undecodable:
    """What the InferStream deserializer yields for a message that does not parse: answered
    with an error of its own, and the stream goes on."""

    error: str


def decode_stream_request(data: bytes) -> pb.InferStreamRequest | Undecodable:
    try:
        return pb.InferStreamRequest.FromString(data)
    except DecodeError as exc:
        return Undecodable(str(exc)[:200])


class TolerantStreamDecoding(grpc.aio.ServerInterceptor):
    """Gives InferStream the deserializer above: by default grpc fails the whole stream (and
    with it every request in flight) on one undecodable message."""

    METHOD = "/deq.v1.DEQService/InferStream"

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = await continuation(details)
        if handler is None or details.method != self.METHOD:
            return handler
        return handler._replace(request_deserializer=decode_stream_request)


async def bounded_messages(
    messages: AsyncIterator[Any],
    idle: float,
    lifetime: float,
    flags: tuple[str, str],
    outcome: str,
) -> AsyncIterator[Any]:
    """A stream's messages, each awaited at most `idle` seconds, all within `lifetime` seconds
    of the call; past either, DEADLINE_EXCEEDED naming the flag (`flags`: idle, lifetime) and
    what became of the stream (`outcome`)."""
    end = time.monotonic() + lifetime
    iterator = aiter(messages)
    while True:
        left = end - time.monotonic()
        try:
            # asyncio.timeout, not wait_for: wait_for (3.11) can swallow the RPC's cancellation
            # when it races the stream's end, and a cut Train stream would then commit.
            async with asyncio.timeout(min(idle, max(left, 0.0))):
                message = await anext(iterator)
        except StopAsyncIteration:
            return
        except TimeoutError:
            if time.monotonic() >= end:
                raise DeadlineExceededError(
                    f"the stream was open {lifetime:g} s ({flags[1]}); {outcome}"
                ) from None
            raise DeadlineExceededError(
                f"no message for {idle:g} s ({flags[0]}); {outcome}"
            ) from None
        yield message


def relative_to_model_dir(message: str, model_dir: Path | None) -> str:
    """`message` with the model directory's absolute path left out: clients see paths as they
    give them, never where the server keeps its files."""
    if model_dir is None:
        return message
    for root in {str(Path(model_dir).resolve()), str(model_dir)}:
        message = message.replace(root.rstrip("/") + "/", "")
    return message


def model_info(served: ServedModel, device: str) -> pb.ModelInfo:
    latest = served.latest.model
    config = latest.config
    solver = config["solver"]
    defaults = pb.SolverOptions(
        tol=solver["tol"],
        max_iter=solver["max_iter"],
        method=METHODS[solver["method"]],
        stop_mode=STOP_MODES[solver["stop_mode"]],
    )
    return pb.ModelInfo(
        name=served.name,
        versions=served.ordered_versions(),
        latest_version=served.latest.version,
        config_json=json.dumps(config, sort_keys=True),
        input_shape=list(latest.input_shape),
        output_shape=list(latest.output_shape),
        state_shape=list(latest.state_shape),
        solver_defaults=defaults,
        device=device,
        dtype=tensors.wire_dtype(next(latest.parameters()).dtype),
        training=served.training,
    )


def infer_response(answer: Answer) -> pb.InferResponse:
    """The deq.v1 encoding of an answer."""
    response = pb.InferResponse(
        output=tensors.encode(answer.output),
        iterations=answer.iterations.tolist(),
        residual=answer.residual.tolist(),
        status=answer.status.tolist(),
        model_version=answer.version,
        timings=pb.Timings(
            queue_seconds=answer.queue_seconds,
            solve_seconds=answer.solve_seconds,
            total_seconds=answer.total_seconds,
        ),
    )
    if answer.state is not None:
        response.state.CopyFrom(tensors.encode(answer.state))
    return response


class DEQServicer(deq_pb2_grpc.DEQServiceServicer):
    """Infer, InferStream, ListModels and GetModel over the registry and the scheduler."""

    def __init__(
        self, registry: Registry, scheduler: Scheduler, metrics: Metrics, config: ServerConfig
    ) -> None:
        self.registry = registry
        self.metrics = metrics
        self.config = config
        self.inference = Inference(registry, scheduler, metrics, config)  # the data plane
        self.stream_cap = infer_stream_cap(config)
        self.open_streams = 0

    async def infer(
        self, request: pb.InferRequest, time_remaining: float | None
    ) -> pb.InferResponse:
        """One deq.v1 Infer (unary or a stream item) through the shared data plane."""
        call = InferCall(
            model=request.model,
            version=request.version,
            input=WireTensor.of(request.input),
            solver=validate.SolverRequest.of(request.solver),
            initial_state=(
                WireTensor.of(request.initial_state) if request.HasField("initial_state") else None
            ),
            return_state=request.return_state,
        )
        return infer_response(await self.inference.run(call, time_remaining))

    @unary
    async def Infer(
        self, request: pb.InferRequest, context: grpc.aio.ServicerContext
    ) -> pb.InferResponse:
        return await self.infer(request, context.time_remaining())

    @streaming_writes
    async def InferStream(
        self,
        request_iterator: AsyncIterator[pb.InferStreamRequest],
        context: grpc.aio.ServicerContext,
    ) -> None:
        """Requests are solved concurrently (up to STREAM_WINDOW at a time); each response carries
        its request id. At most `stream_cap` streams are open at once, so that streams (which
        any client can hold open) never take every RPC slot from unary calls."""
        if self.open_streams >= self.stream_cap:
            release_free_memory_soon()  # a flood of refused streams should not leave the heap big
            raise ResourceExhaustedError(
                f"{self.open_streams} InferStreams are open (--max-infer-streams "
                f"{self.stream_cap}); use Infer, or retry later"
            )
        self.open_streams += 1
        try:
            await self._infer_stream(request_iterator, context)
        finally:
            self.open_streams -= 1

    async def _infer_stream(
        self,
        request_iterator: AsyncIterator[pb.InferStreamRequest],
        context: grpc.aio.ServicerContext,
    ) -> None:
        done: asyncio.Queue[pb.InferStreamResponse | None] = asyncio.Queue()
        tasks: set[asyncio.Task[None]] = set()
        window = asyncio.Semaphore(STREAM_WINDOW)

        limit = self.config.max_message_bytes
        idle = self.config.stream_idle_seconds

        async def answer(item: pb.InferStreamRequest | Undecodable) -> None:
            if isinstance(item, Undecodable):
                await done.put(
                    pb.InferStreamResponse(
                        error_code=grpc.StatusCode.INVALID_ARGUMENT.value[0],
                        error_message=f"a message on this stream could not be decoded: {item.error}",
                    )
                )
                return
            try:
                response = await self.infer(item.request, context.time_remaining())
                message = pb.InferStreamResponse(request_id=item.request_id, response=response)
                size = message.ByteSize()
                if size > limit:  # sending it would end the whole stream
                    raise ResourceExhaustedError(
                        f"the answer takes {size} bytes, above the server's "
                        f"--max-message-bytes {limit}; ask for fewer samples or no state"
                    )
            except Exception as exc:
                code, text = status_of(exc)
                message = pb.InferStreamResponse(
                    request_id=item.request_id, error_code=code.value[0], error_message=text
                )
            await done.put(message)

        async def read() -> None:
            messages = bounded_messages(
                request_iterator,
                idle,
                float("inf"),
                ("--stream-idle-seconds", ""),
                "closed once the answers in flight were sent",
            )
            try:
                async for item in messages:
                    await window.acquire()  # released when its answer is taken to be sent
                    task = asyncio.create_task(answer(item))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
            finally:  # a failing reader still lets the answers in flight out, then ends
                while tasks:
                    await asyncio.gather(*list(tasks), return_exceptions=True)
                await done.put(None)

        reader = asyncio.create_task(read())
        try:
            while (message := await done.get()) is not None:
                window.release()
                try:  # a client that reads nothing holds the answer back (flow control)
                    async with asyncio.timeout(idle):
                        await context.write(message)
                except TimeoutError:
                    raise DeadlineExceededError(
                        f"no answer was read for {idle:g} s (--stream-idle-seconds)"
                    ) from None
            await reader
        finally:
            reader.cancel()
            for task in list(tasks):
                task.cancel()
            release_free_memory_soon()  # a flood of streams ending should not leave the heap big

    @streaming
    async def Train(
        self,
        request_iterator: AsyncIterator[pb.TrainRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.TrainResponse]:
        """Config first, then batches; the client's half-close commits and publishes. A stream
        silent for --train-idle-seconds, or open for --train-max-seconds, is closed (nothing
        published), so idle clients cannot hold the session slots or their models' locks."""
        session: TrainSession | None = None
        try:
            messages = bounded_messages(
                request_iterator,
                self.config.train_idle_seconds,
                self.config.train_max_seconds,
                ("--train-idle-seconds", "--train-max-seconds"),
                "closed, nothing published",
            )
            async for message in messages:
                kind = message.WhichOneof("message")
                if session is None:
                    if kind != "config":
                        raise invalid("message", "a config as the first message", kind)
                    session = TrainSession(message.config, self.registry, self.config, self.metrics)
                    continue
                if kind != "batch":
                    raise invalid("message", "a batch (the config comes once, first)", kind)
                event = await asyncio.to_thread(session.step, message.batch)
                yield pb.TrainResponse(step=event)
            if session is None:
                raise invalid("message", "a config as the first message", "an empty stream")
            version = self.registry.reserve_version(session.publish_as, self.config.model_dir)
            try:
                commit = asyncio.ensure_future(asyncio.to_thread(session.commit, version))
                try:
                    published = await asyncio.shield(commit)
                except asyncio.CancelledError:
                    # The caller left mid-commit: let the write finish, then take it back.
                    with contextlib.suppress(Exception):
                        (await commit).entry.path.unlink()
                    raise
                self.metrics.model_served(
                    published.name, published.entry.version, str(self.registry.device)
                )
                self.registry.publish(published.name, published.entry)  # may unload old ones
            finally:
                self.registry.release(session.publish_as, version)
            yield pb.TrainResponse(
                committed=pb.TrainCommitted(
                    model=published.name, version=published.entry.version, steps=published.steps
                )
            )
        finally:
            if session is not None:
                session.close()

    @unary
    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        device = str(self.registry.device)
        models = [model_info(m, device) for _, m in sorted(self.registry.models.items())]
        return pb.ListModelsResponse(models=models)

    @unary
    async def LoadModel(
        self, request: pb.LoadModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.LoadModelResponse:
        """Serve a checkpoint of the model directory as `name` (its next version if served)."""
        name = check_model_name("name", request.name)
        path = confined_path(self.config.model_dir, request.path)
        served = self.registry.models.get(name)
        if served is not None and served.training:
            raise FailedPreconditionError(f"model {name!r} is being trained")
        version = self.registry.reserve_version(name, self.config.model_dir, path)
        try:
            entry = await asyncio.to_thread(self.registry.load_version, version, path)
            self.metrics.model_served(name, version, str(self.registry.device))
            self.registry.publish(name, entry)  # may unload old versions
        except CheckpointError as exc:
            reason = relative_to_model_dir(str(exc), self.config.model_dir)
            raise invalid("path", "a valid deq-serve checkpoint", reason) from None
        except OSError as exc:  # unreadable, or gone since it was found
            reason = relative_to_model_dir(f"{type(exc).__name__}: {exc}", self.config.model_dir)
            raise invalid("path", "a readable file", reason) from None
        finally:
            self.registry.release(name, version)
        return pb.LoadModelResponse(
            model=model_info(self.registry.models[name], str(self.registry.device)),
            version=version,
        )

    @unary
    async def UnloadModel(
        self, request: pb.UnloadModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.UnloadModelResponse:
        served, _ = self.registry.resolve(request.name)
        if served.training:
            raise FailedPreconditionError(f"model {served.name!r} is being trained")
        self.registry.unload(served.name)
        self.metrics.forget_model(served.name)
        return pb.UnloadModelResponse()

    @unary
    async def GetModel(
        self, request: pb.GetModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetModelResponse:
        served, _ = self.registry.resolve(request.name)
        return pb.GetModelResponse(model=model_info(served, str(self.registry.device)))
