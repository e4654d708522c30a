"""A real Prometheus server (Debian's `prometheus` binary) on a free 127.0.0.1 port, for tests.

Started with a generated configuration; talked to through its HTTP API with the standard library.
Every wait is a bounded poll of a condition.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import yaml
from serving_harness import free_port

BINARY = shutil.which("prometheus")
T = TypeVar("T")


class PrometheusAPI:
    """The few calls of the HTTP API the tests need."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url

    def get(self, path: str, **params: str) -> Any:
        url = f"{self.base_url}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=10) as response:
            body = json.load(response)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[float]:
        """Instant query: the values of the result (a scalar is a list of one)."""
        data = self.get("/api/v1/query", query=expr)
        if data["resultType"] in ("scalar", "string"):
            return [float(data["result"][1])]
        return [float(sample["value"][1]) for sample in data["result"]]

    def has_data(self, expr: str) -> bool:
        """At least one finite value (a quantile of nothing is NaN, which a panel cannot draw)."""
        return any(math.isfinite(v) for v in self.query(expr))

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.base_url}/-/ready", timeout=2) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, ConnectionError):
            return False


def poll(condition: Callable[[], T], *, timeout: float, interval: float, what: str) -> T:
    """Calls `condition` until it returns something truthy; fails the test after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


@contextmanager
def running_prometheus(config: dict[str, Any], workdir: Path) -> Iterator[PrometheusAPI]:
    """Prometheus with `config` on 127.0.0.1:<free port>; terminated (and reaped) on exit."""
    assert BINARY is not None, "prometheus is not installed"
    config_file = workdir / "prometheus.yml"
    config_file.write_text(yaml.safe_dump(config))
    port = free_port()
    log = (workdir / "prometheus.log").open("wb")
    process = subprocess.Popen(
        [
            BINARY,
            f"--config.file={config_file}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    api = PrometheusAPI(f"http://127.0.0.1:{port}")
    try:
        poll(
            lambda: process.poll() is not None or api.ready(),
            timeout=60,
            interval=0.2,
            what="Prometheus to be ready",
        )
        assert process.poll() is None, (workdir / "prometheus.log").read_text()
        yield api
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
