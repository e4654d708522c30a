"""Prometheus metrics (names and labels fixed in DESIGN.md), one registry per server.

Facts are recorded where they are born: per-sample iterations, residuals and statuses when a solve
returns, request outcomes when the response (or error) leaves. `GrpcMetricsInterceptor` adds the
go-grpc-prometheus series for every RPC kind, streams included. The series every request touches
are bulk ones (`BulkCounter`, `BulkHistogram`): an increment or an observation is a queue append,
folded when read, so the event loop pays no lock and no bucket search per request.
"""

from __future__ import annotations

import functools
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

import grpc
import numpy as np
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from deq_server.core import SolveResult, Status

from .bulk_counter import BulkCounter
from .bulk_histogram import BulkHistogram
from .device_metrics import DeviceMemoryCollector

SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
ITERATIONS = (
    1,
    2,
    3,
    4,
    5,
    6,
    8,
    10,
    12,
    15,
    20,
    25,
    30,
    40,
    50,
    75,
    100,
    150,
    200,
    300,
    500,
    1000,
)
RESIDUALS = tuple(10.0**e for e in range(-12, 3))
BATCH = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class ModelSeries:
    """One model's per-request series: what a request records, and the labelled children of the
    per-turn series looked up once (a `labels` call takes a lock and a dict lookup)."""

    def __init__(self, metrics: Metrics, model: str) -> None:
        self._metrics, self.model = metrics, model
        self._labels = (model,)
        # deq_inference_pending_requests: changed on the event loop only, read when scraped
        self.in_flight = 0
        self._samples: dict[int, Any] = {}

    def request_done(self, code: str, seconds: float) -> None:
        """One request's outcome (a status code name) and latency."""
        self._metrics.requests.inc((self.model, code))
        self._metrics.request_seconds.observe(self._labels, seconds)

    def queued(self, seconds: np.ndarray) -> None:
        """How long each of several requests waited for the solver."""
        self._metrics.queue_seconds.observe_many(self._labels, seconds)

    @functools.cached_property
    def batch_size(self) -> Any:
        return self._metrics.batch_size.labels(self.model)

    def samples(self, status: int) -> Any:
        """The deq_solver_samples_total child of a `Status` value."""
        child = self._samples.get(status)
        if child is None:
            name = Status(status).name
            child = self._samples[status] = self._metrics.samples.labels(self.model, name)
        return child


class Metrics:
    """Every series the service exports, on a private registry (several servers per process)."""

    def __init__(self) -> None:
        # per-model children, made on first use and dropped with the model's series
        self._models: dict[str, ModelSeries] = {}
        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        r.register(DeviceMemoryCollector())
        self.requests = BulkCounter(
            "deq_inference_requests",
            "Inference requests by outcome.",
            ["model", "code"],
            registry=r,
        )
        self.request_seconds = BulkHistogram(
            "deq_inference_request_duration_seconds",
            "Inference request latency.",
            ["model"],
            buckets=SECONDS,
            registry=r,
        )
        self.queue_seconds = BulkHistogram(
            "deq_inference_queue_duration_seconds",
            "Time requests wait for the solver.",
            ["model"],
            buckets=SECONDS,
            registry=r,
        )
        # per-sample series, recorded a whole solve at a time
        self.iterations = BulkHistogram(
            "deq_solver_iterations",
            "Cell evaluations per sample to leave the solver.",
            ["model", "method", "phase"],
            buckets=ITERATIONS,
            registry=r,
        )
        self.residual = BulkHistogram(
            "deq_solver_residual",
            "Final residual per sample.",
            ["model", "phase"],
            buckets=RESIDUALS,
            registry=r,
        )
        self.samples = Counter(
            "deq_solver_samples",
            "Samples leaving the solver, by status.",
            ["model", "status"],
            registry=r,
        )
        self.batch_size = Histogram(
            "deq_batch_size", "Samples per solver batch.", ["model"], buckets=BATCH, registry=r
        )
        # deq_inference_pending_requests: each served model's ModelSeries.in_flight
        self._served: set[str] = set()
        r.register(_PendingRequests(self._models, self._served))
        self.train_steps = Counter(
            "deq_train_steps", "Optimizer steps taken by training sessions.", ["model"], registry=r
        )
        self.train_loss = Gauge("deq_train_loss", "Loss of the latest step.", ["model"], registry=r)
        self.train_sessions = Gauge(
            "deq_train_sessions_active", "Training sessions in progress.", registry=r
        )
        self.model_info = Gauge(
            "deq_model_info",
            "Served model versions (value 1).",
            ["model", "version", "device"],
            registry=r,
        )

    def model_served(self, model: str, version: str, device: str) -> None:
        """A version is served: its deq_model_info series, and the model's pending gauge at 0
        from now on (an autoscaler reading it sees idle replicas, not missing series)."""
        self.model_info.labels(model, version, device).set(1)
        self._served.add(model)

    def model(self, model: str) -> ModelSeries:
        """`model`'s per-request series (the same object until `forget_model`)."""
        series = self._models.get(model)
        if series is None:
            series = self._models[model] = ModelSeries(self, model)
        return series

    def forget_model(self, model: str) -> None:
        """Remove every series labelled with `model` (an unloaded model's series would otherwise
        be exported for as long as the process lives)."""
        self._models.pop(model, None)
        self._served.discard(model)
        per_model: list[tuple[Any, tuple[str, ...]]] = [
            (self.requests, ("model", "code")),
            (self.request_seconds, ("model",)),
            (self.queue_seconds, ("model",)),
            (self.iterations, ("model", "method", "phase")),
            (self.residual, ("model", "phase")),
            (self.samples, ("model", "status")),
            (self.batch_size, ("model",)),
            (self.train_steps, ("model",)),
            (self.train_loss, ("model",)),
            (self.model_info, ("model", "version", "device")),
        ]
        for metric, names in per_model:
            label_sets = {
                tuple(sample.labels[n] for n in names)
                for family in metric.collect()
                for sample in family.samples
                if sample.labels.get("model") == model
            }
            for values in label_sets:
                metric.remove(*values)

    def record_solve(self, model: str, method: str, phase: str, result: SolveResult) -> None:
        """Per-sample facts of one solve (forward or backward), in bulk."""
        self.record_solves(model, method, phase, [result])

    def record_solves(
        self, model: str, method: str, phase: str, results: Sequence[SolveResult]
    ) -> None:
        """Per-sample facts of several solves of one model and method: one update per series,
        however many requests (the engine records a turn's finished requests at once)."""
        iterations = np.concatenate([r.iterations.cpu().numpy() for r in results])
        # 0: never evaluated (its caller left while it was queued)
        self.iterations.observe_many((model, method, phase), iterations[iterations > 0])
        residual = np.concatenate([r.residual.cpu().double().numpy() for r in results])
        self.residual.observe_many((model, phase), residual)
        if phase == "forward":
            statuses = np.concatenate([r.status.cpu().numpy() for r in results])
            counts = np.bincount(statuses, minlength=len(Status) + 1)
            series = self.model(model)
            for status in np.flatnonzero(counts).tolist():
                series.samples(status).inc(int(counts[status]))


class GrpcMetricsInterceptor(grpc.aio.ServerInterceptor):
    """grpc_server_started_total, grpc_server_handled_total{grpc_code} and
    grpc_server_handling_seconds for unary and streaming RPCs alike."""

    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ["grpc_type", "grpc_service", "grpc_method"]
        self.started = BulkCounter("grpc_server_started", "RPCs started.", labels, registry)
        self.handled = BulkCounter(
            "grpc_server_handled", "RPCs completed, by code.", [*labels, "grpc_code"], registry
        )
        self.seconds = BulkHistogram(
            "grpc_server_handling_seconds",
            "RPC handling time.",
            labels,
            buckets=SECONDS,
            registry=registry,
        )
        # per method: the handler the service gave and its wrapped twin (made once, not per RPC)
        self._wrapped: dict[str, tuple[Any, Any]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = await continuation(details)
        if handler is None:
            return None
        known = self._wrapped.get(details.method)
        if known is not None and known[0] is handler:
            return known[1]
        wrapped = self._wrap(details.method, handler)
        if len(self._wrapped) < 1024:  # methods are few; never grow without bound
            self._wrapped[details.method] = (handler, wrapped)
        return wrapped

    def _wrap(self, full_method: str, handler: Any) -> Any:
        service, _, method = full_method.lstrip("/").rpartition("/")
        if handler.request_streaming and handler.response_streaming:
            kind, behaviour, factory = (
                "bidi_stream",
                handler.stream_stream,
                grpc.stream_stream_rpc_method_handler,
            )
        elif handler.request_streaming:
            kind, behaviour, factory = (
                "client_stream",
                handler.stream_unary,
                grpc.stream_unary_rpc_method_handler,
            )
        elif handler.response_streaming:
            kind, behaviour, factory = (
                "server_stream",
                handler.unary_stream,
                grpc.unary_stream_rpc_method_handler,
            )
        else:
            kind, behaviour, factory = (
                "unary",
                handler.unary_unary,
                grpc.unary_unary_rpc_method_handler,
            )
        labels = (kind, service, method)
        wrapped = (
            self._wrap_stream(behaviour, labels)
            if handler.response_streaming
            else self._wrap_unary(behaviour, labels)
        )
        return factory(
            wrapped,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _series(
        self, labels: tuple[str, str, str]
    ) -> tuple[Callable[[], None], Callable[[float, str], None]]:
        """The calls that record one method's RPC start and end (the label tuples made once per
        method and code, not per RPC)."""
        started, handled, seconds = self.started, self.handled, self.seconds
        by_code: dict[str, tuple[str, ...]] = {}

        def start() -> None:
            started.inc(labels)

        def finish(start: float, code: str) -> None:
            key = by_code.get(code)
            if key is None:
                key = by_code[code] = (*labels, code)
            handled.inc(key)
            seconds.observe(labels, time.perf_counter() - start)

        return start, finish

    def _wrap_unary(self, behaviour: Any, labels: tuple[str, str, str]) -> Any:
        started, finish = self._series(labels)

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            started()
            start, failed = time.perf_counter(), None
            try:
                return await behaviour(request, context)
            except BaseException as exc:
                failed = exc
                raise
            finally:
                finish(start, _code(context, failed))

        return unary

    def _wrap_stream(self, behaviour: Any, labels: tuple[str, str, str]) -> Any:
        started, finish = self._series(labels)

        async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            started()
            start, failed = time.perf_counter(), None
            try:
                result = behaviour(request, context)
                if hasattr(result, "__aiter__"):
                    async for response in result:
                        yield response
                else:  # a coroutine that writes through the context (e.g. health Watch)
                    await result
            except BaseException as exc:
                failed = exc
                raise
            finally:
                finish(start, _code(context, failed))

        return stream


def _code(context: grpc.aio.ServicerContext, failed: BaseException | None) -> str:
    """The status name an RPC ended with."""
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code.name
    if failed is None:
        return "OK"
    if isinstance(failed, BaseException) and type(failed).__name__ == "CancelledError":
        return "CANCELLED"
    return "UNKNOWN"


class _PendingRequests(Collector):
    """deq_inference_pending_requests{model}: each served model's requests waiting for or in
    the solver, read from its `ModelSeries` when scraped (at 0 from the moment it is served, so
    an autoscaler sees idle replicas, not missing series)."""

    def __init__(self, models: dict[str, ModelSeries], served: set[str]) -> None:
        self._models, self._served = models, served

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "deq_inference_pending_requests",
            "Requests waiting for or in the solver.",
            labels=["model"],
        )
        for model in sorted(self._served):
            series = self._models.get(model)
            family.add_metric([model], 0 if series is None else series.in_flight)
        yield family
