"""Thin Python SDK for deq-serve: numpy in and out, no torch (torch tensors are accepted as input).

    from deq_client import DEQClient

    with DEQClient("127.0.0.1:50051", timeout=10) as client:
        result = client.infer("digits", x.astype("float32"), tol=1e-4, method="anderson")
        print(result.output.argmax(1), result.iterations, result.status_names)

``AsyncDEQClient`` (also in ``deq_client.aio``) has the same methods as coroutines and async
iterators. Every failed call raises ``DEQError`` with the gRPC status ``code`` and ``message``.
"""

from deq_client._errors import DEQError
from deq_client._results import InferResult, ModelInfo, TrainEvent
from deq_client.aio import AsyncDEQClient
from deq_client.client import DEQClient

__all__ = ["AsyncDEQClient", "DEQClient", "DEQError", "InferResult", "ModelInfo", "TrainEvent"]
