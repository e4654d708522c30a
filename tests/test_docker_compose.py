"""docker-compose.yml and its overrides, checked by docker-compose itself and run for real.

Without an engine: `docker-compose config` accepts every combination of files (no -f: the base
file plus docker-compose.override.yml, which publishes the server's ports); every published port
is on 127.0.0.1; only the GPU override reserves a device; every bind mount names a file of the
repository. With an engine: the `deq` service, built through compose on the local base image
and run on the host network (docker-compose.test.yml), turns healthy, answers the SDK, keeps a
Train commit in its model volume across a restart, and is taken down with its volumes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_traffic import MODEL, digits_inputs, infer_mixed, train_briefly
from docker_harness import REPO, engine, ensure_base_image, wait_healthy
from serving_harness import free_port

from deq_client import DEQClient

COMPOSE = shutil.which("docker-compose")
pytestmark = pytest.mark.skipif(
    COMPOSE is None, reason="docker-compose is not installed (scripts/test.sh installs it)"
)
BASE, PORTS = "docker-compose.yml", "docker-compose.override.yml"
GPU, TEST = "docker-compose.gpu.yml", "docker-compose.test.yml"
DEFAULT: list[str] = []  # no -f: what `docker compose up` reads
# The test override insists on a base image; any name does for `config`.
CONFIG_ENV = {"DEQ_BASE_IMAGE": "local/base:tag"}


def compose(
    files: list[str], *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """docker-compose with `files` (none: the defaults), from the repository root; fails the test
    on a non-zero exit."""
    argv = [str(COMPOSE), *(arg for f in files for arg in ("-f", f)), *args]
    result = subprocess.run(
        argv,
        cwd=REPO,
        env={**os.environ, **CONFIG_ENV, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, f"{' '.join(argv[1:])}:\n{result.stdout}\n{result.stderr}"
    return result


def resolved(files: list[str], **env: str) -> dict[str, Any]:
    """The merged, interpolated configuration docker-compose would run."""
    return dict(yaml.safe_load(compose(files, "config", env=env).stdout))


@pytest.mark.parametrize(
    "files",
    [DEFAULT, [BASE], [BASE, PORTS, GPU], [BASE, TEST]],
    ids=lambda f: "+".join(f) or "default",
)
def test_compose_accepts_the_files(files: list[str]) -> None:
    compose(files, "config", "--quiet")


@pytest.mark.parametrize(
    "ports", [{}, {"DEQ_GRPC_PORT": "50051-50053", "DEQ_METRICS_PORT": "9101-9103"}]
)
def test_every_published_port_is_on_loopback(ports: dict[str, str]) -> None:
    services = resolved(DEFAULT, **ports)["services"]
    published = {name: service.get("ports", []) for name, service in services.items()}
    assert all(published.values()), published
    for name, entries in published.items():
        for entry in entries:
            host_ip = entry["host_ip"] if isinstance(entry, dict) else entry.split(":")[0]
            assert host_ip == "127.0.0.1", f"{name} publishes {entry}"


def test_only_the_gpu_override_reserves_a_device() -> None:
    assert "deploy" not in resolved(DEFAULT)["services"]["deq"]
    deq = resolved([BASE, PORTS, GPU])["services"]["deq"]
    (device,) = deq["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia"
    assert device["capabilities"] == ["gpu"]
    assert deq["environment"]["DEQ_DEVICE"] == "cuda"


def test_bind_mounts_name_files_of_the_repository() -> None:
    for name, service in resolved(DEFAULT)["services"].items():
        for volume in service.get("volumes", []):
            source = volume["source"] if isinstance(volume, dict) else volume.split(":")[0]
            if source.startswith("/"):
                assert Path(source).exists(), f"{name} mounts missing {source}"
                assert Path(source).resolve().is_relative_to(REPO), source


@pytest.fixture
def project() -> Iterator[tuple[list[str], dict[str, str]]]:
    """A compose project of its own on free loopback ports; taken down with its volumes."""
    client = engine()
    env = {
        "COMPOSE_PROJECT_NAME": f"deqtest{os.getpid()}",
        "DEQ_BASE_IMAGE": ensure_base_image(client),
        "DEQ_IMAGE": "deq-serve:compose-test",
        "DEQ_GRPC_PORT": str(free_port()),
        "DEQ_METRICS_PORT": str(free_port()),
    }
    try:
        yield [BASE, TEST], env
    finally:
        compose([BASE, TEST], "down", "--volumes", "--remove-orphans", env=env, timeout=180)


def _service_container(env: dict[str, str]) -> Any:
    labels = [
        f"com.docker.compose.project={env['COMPOSE_PROJECT_NAME']}",
        "com.docker.compose.service=deq",
    ]
    (container,) = engine().containers.list(filters={"label": labels})
    return container


def test_compose_runs_the_service_and_keeps_commits_in_its_volume(
    project: tuple[list[str], dict[str, str]],
) -> None:
    files, env = project
    compose(files, "up", "--detach", "--build", "deq", env=env, timeout=900)
    container = _service_container(env)
    wait_healthy(container)
    target = f"127.0.0.1:{env['DEQ_GRPC_PORT']}"
    with DEQClient(target, timeout=60) as client:
        assert [m.versions for m in client.list_models()] == [["1"]]
        infer_mixed(client)
        assert train_briefly(client) == "2"

    compose(files, "restart", "deq", env=env, timeout=180)
    wait_healthy(container)
    with DEQClient(target, timeout=60) as client:
        (served,) = client.list_models()
        # both read back from the volume: the demo seeded there as version 1, and the commit
        assert served.versions == ["1", "2"]
        assert client.infer(MODEL, digits_inputs(2)).model_version == "2"
