"""The Docker engine for the deployment tests: reach it or skip loudly, build images, wait.

No image registry is reachable from these machines, so the base image is made here: debootstrap
a Debian bookworm minbase with Python, trust the machine's CA bundle (pip inside the image needs
it to reach the package index), `docker import` it, then add a venv holding the torch 2.13.0 CPU
wheel that pip finds on this machine's disk. Both images are kept by tag, so only a machine's
first run pays for them (a few minutes). Everything talks to the engine through the Docker SDK;
containers use the host network and the tests give them 127.0.0.1 ports.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

docker = pytest.importorskip("docker", reason="the Docker SDK is in the dev extra")

REPO = Path(__file__).resolve().parent.parent
ROOTFS_IMAGE = "deq-serve-rootfs:bookworm-minbase"
BASE_IMAGE = "deq-serve-base:bookworm-torch2.13.0-cpu"
TORCH = "torch==2.13.0"
DEBIAN_MIRROR = os.environ.get("DEQ_DEBIAN_MIRROR", "http://deb.debian.org/debian")
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
IMAGE_CA_BUNDLE = "/etc/ssl/certs/host-ca-certificates.crt"
ENGINE_TIMEOUT = 900  # seconds per engine call: a build streams for minutes

_BASE_DOCKERFILE = f"""\
FROM {ROOTFS_IMAGE}
COPY *.whl /tmp/wheels/
RUN python3 -m venv /opt/venv \\
    && /opt/venv/bin/pip install --no-cache-dir /tmp/wheels/*.whl \\
    && rm -rf /tmp/wheels
ENV PATH=/opt/venv/bin:$PATH VIRTUAL_ENV=/opt/venv
"""


def engine() -> Any:
    """A client of a running engine, or a SKIPPED test that says why there is none."""
    try:
        client = docker.from_env(timeout=ENGINE_TIMEOUT)
        client.ping()
    except docker.errors.DockerException as error:
        pytest.skip(f"no Docker engine could be reached, the image was not tested: {error}")
    return client


def has_image(client: Any, tag: str) -> bool:
    try:
        client.images.get(tag)
    except docker.errors.ImageNotFound:
        return False
    return True


def _import_rootfs(client: Any, workdir: Path) -> None:
    """debootstrap -> CA bundle -> tarball -> `docker import` as ROOTFS_IMAGE."""
    if os.geteuid() != 0 or shutil.which("debootstrap") is None:
        pytest.skip("building the local base image needs root and debootstrap; not tested")
    root = workdir / "rootfs"
    subprocess.run(
        [
            "debootstrap",
            "--variant=minbase",
            "--include=python3,python3-venv,python3-pip,ca-certificates",
            "bookworm",
            str(root),
            DEBIAN_MIRROR,
        ],
        check=True,
        capture_output=True,
        timeout=1200,
    )
    shutil.copyfile(HOST_CA_BUNDLE, root / IMAGE_CA_BUNDLE.lstrip("/"))
    tarball = workdir / "rootfs.tar"
    subprocess.run(
        ["tar", "--numeric-owner", "-C", str(root), "-cf", str(tarball), "."], check=True
    )
    shutil.rmtree(root)
    repository, tag = ROOTFS_IMAGE.split(":")
    env = " ".join(f"{k}={IMAGE_CA_BUNDLE}" for k in ("PIP_CERT", "SSL_CERT_FILE"))
    client.api.import_image(
        src=str(tarball),
        repository=repository,
        tag=tag,
        changes=[f"ENV {env}", 'CMD ["/bin/bash"]'],
    )


def _build_base(client: Any, workdir: Path) -> None:
    """ROOTFS_IMAGE plus a venv on PATH holding the local torch CPU wheel."""
    context = workdir / "context"
    context.mkdir()
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", TORCH, "-d", str(context)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    (context / "Dockerfile").write_text(_BASE_DOCKERFILE)
    build(client, context, BASE_IMAGE)


def ensure_base_image(client: Any) -> str:
    """The local base image's tag, built first if this machine has not got it yet."""
    if not has_image(client, BASE_IMAGE):
        with tempfile.TemporaryDirectory(prefix="deq-base-") as tmp:
            if not has_image(client, ROOTFS_IMAGE):
                _import_rootfs(client, Path(tmp))
            _build_base(client, Path(tmp))
    return BASE_IMAGE


def build(client: Any, context: Path, tag: str, **buildargs: str) -> None:
    """`docker build --network host`; a failure shows the end of the build log."""
    try:
        client.images.build(
            path=str(context),
            tag=tag,
            buildargs=buildargs or None,
            network_mode="host",
            rm=True,
            forcerm=True,
        )
    except docker.errors.BuildError as error:
        log = "".join(str(chunk.get("stream", chunk.get("error", ""))) for chunk in error.build_log)
        raise AssertionError(f"docker build of {tag} failed: {error}\n{log[-4000:]}") from error


def health(container: Any) -> str:
    """The container's HEALTHCHECK status, or its state once it is no longer running."""
    container.reload()
    state = container.attrs["State"]
    if state["Status"] != "running":
        return f"{state['Status']} (exit code {state['ExitCode']})"
    return str(state.get("Health", {}).get("Status", "no healthcheck"))


def wait_healthy(container: Any, timeout: float = 180.0) -> None:
    """Polls the HEALTHCHECK status while it is "starting"; it must end "healthy"."""
    deadline = time.monotonic() + timeout
    status = health(container)
    while status == "starting" and time.monotonic() < deadline:
        time.sleep(0.5)
        status = health(container)
    assert status == "healthy", f"{container.name}: {status}\n{logs(container)}"


def logs(container: Any) -> str:
    return str(container.logs(tail=60).decode(errors="replace"))
