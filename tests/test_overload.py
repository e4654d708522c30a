"""Overload: `--max-concurrent-rpcs` makes gRPC itself refuse calls beyond the limit.

Claim: with the limit reached (held by an open InferStream and a health Watch, which count as
RPCs in progress), a new Infer gets RESOURCE_EXHAUSTED without a handler running (the request counter does
not move), and once the streams close the same Infer is answered.
"""

from __future__ import annotations

import queue
import urllib.request

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from serving_harness import channel_to, running_server

from deq_client.pb.deq.v1 import deq_pb2 as pb
from deq_client.pb.deq.v1 import deq_pb2_grpc


def infer_count(server) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics").read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("deq_inference_requests_total{")
    )


def test_calls_beyond_the_concurrency_limit_are_refused_before_any_handler():
    x = np.full((1, 64), 8.0, np.float32)
    request = pb.InferRequest(
        model="digits", input=pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=[1, 64], data=x.tobytes())
    )
    with running_server(max_concurrent_rpcs=2) as server, channel_to(server) as channel:
        stub = deq_pb2_grpc.DEQServiceStub(channel)
        feed: queue.Queue = queue.Queue()
        stream = stub.InferStream(iter(feed.get, None))
        feed.put(pb.InferStreamRequest(request_id="0", request=request))
        assert next(stream).request_id == "0"  # open and answered
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING  # open too
        before = infer_count(server)
        with pytest.raises(grpc.RpcError) as refused:
            stub.Infer(request, timeout=10)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert infer_count(server) == before  # no handler ran
        feed.put(None)
        assert list(stream) == []
        watch.cancel()
        # The server counts a stream as finished a moment after its client sees the end.
        for _ in range(10_000):  # bounded; each refusal is one quick round trip
            try:
                reply = stub.Infer(request, timeout=10)
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                    raise
                continue
            assert reply.status
            break
        else:
            pytest.fail("the limit was never released")
