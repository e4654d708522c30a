"""Overload: `--max-concurrent-rpcs` makes gRPC itself refuse calls beyond the limit.

Claim: with the limit reached (held by open InferStream calls, which count as RPCs in
progress), a new Infer gets RESOURCE_EXHAUSTED without a handler running (the request counter does
not move), and once the streams close the same Infer is answered.
"""

from __future__ import annotations

import queue
import urllib.request

import grpc
import numpy as np
import pytest
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
        feeds = [queue.Queue(), queue.Queue()]
        streams = [stub.InferStream(iter(feed.get, None)) for feed in feeds]
        for i, (feed, stream) in enumerate(zip(feeds, streams, strict=True)):
            feed.put(pb.InferStreamRequest(request_id=str(i), request=request))
            assert next(stream).request_id == str(i)  # both streams are open and answered
        before = infer_count(server)
        with pytest.raises(grpc.RpcError) as refused:
            stub.Infer(request, timeout=10)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert infer_count(server) == before  # no handler ran
        for feed, stream in zip(feeds, streams, strict=True):
            feed.put(None)
            assert list(stream) == []
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
