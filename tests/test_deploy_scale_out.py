"""The scale-out recipe of docs/deployment.md: one channel, several replicas, gRPC round-robin.

Two real servers on 127.0.0.1 stand for two replicas; the client names both in one target
(`ipv4:` lists them, as a DNS name with several A records does behind `dns:///`) with
`grpc.lb_policy_name=round_robin`. Inference spreads over both; a Train stream stays on one
replica, and so does the version it publishes (each replica has its own model directory here).
"""

from __future__ import annotations

from pathlib import Path

from deploy_traffic import MODEL, digits_inputs, train_briefly
from serving_harness import running_server

from deq_client import DEQClient
from deq_server.serving.app import RunningServer

ROUND_ROBIN = [("grpc.lb_policy_name", "round_robin")]


def served_requests(server: RunningServer) -> float:
    value = server.metrics.registry.get_sample_value(
        "deq_inference_requests_total", {"model": MODEL, "code": "OK"}
    )
    return float(value or 0.0)


def test_round_robin_spreads_inference_and_training_stays_on_one_replica(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with (
        running_server(model_dir=tmp_path / "a") as a,
        running_server(model_dir=tmp_path / "b") as b,
    ):
        target = f"ipv4:127.0.0.1:{a.port},127.0.0.1:{b.port}"
        with DEQClient(target, timeout=30, options=ROUND_ROBIN) as client:
            for _ in range(20):
                client.infer(MODEL, digits_inputs(1))
            assert served_requests(a) >= 5
            assert served_requests(b) >= 5
            assert served_requests(a) + served_requests(b) == 20

            assert train_briefly(client) == "2"
        versions = [sorted(s.registry.models[MODEL].versions) for s in (a, b)]
        assert sorted(versions) == [["1"], ["1", "2"]]
