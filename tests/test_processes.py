"""`--processes N`: N full server processes on one port behind one /metrics.

Real `deq-server` programs on 127.0.0.1. Claims: connections spread over both processes and
every answer is right; /metrics carries each process's series under a `process` label; a
checkpoint copied into the model directory is served by every process (the implied poll); a
busy port is refused before any child starts; SIGTERM drains every child and exits 0; a child
that dies takes the unit down (exit 1) instead of leaving a half-served port. Synchronisation
is on the server's own log lines, read as they are written.
"""

from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

from deq_client import DEQClient
from deq_server.models import bundled_checkpoints

READY = re.compile(r"ready: 2 processes on gRPC 127\.0\.0\.1:(\d+) .*metrics 127\.0\.0\.1:(\d+)")


class Server:
    """A `deq-server --processes 2` program whose stderr lines are read as they come."""

    def __init__(self, *args: str) -> None:
        command = [sys.executable, "-m", "deq_server", "--processes", "2", *args]
        self.proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.put(line)
        self.lines.put("")  # end of output

    def expect(self, pattern: str, timeout: float = 120) -> re.Match[str]:
        """The first line from now on that matches (AssertionError at the end of the output)."""
        while True:
            line = self.lines.get(timeout=timeout)
            self.seen.append(line)
            assert line, f"no line matched {pattern!r}:\n{''.join(self.seen)}"
            if found := re.search(pattern, line):
                return found

    def rest(self, timeout: float = 120) -> str:
        """Every line until the end of the output: once the parent and every child it started
        have closed stderr (queue.Empty if that takes longer than `timeout` per line)."""
        lines = []
        while line := self.lines.get(timeout=timeout):
            lines.append(line)
        return "".join(lines)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)


@contextmanager
def two_processes(model_dir: Path, *args: str) -> Iterator[tuple[Server, int, int]]:
    server = Server(
        "--address", "127.0.0.1:0", "--metrics-address", "127.0.0.1:0",
        "--model-dir", str(model_dir), *args,
    )  # fmt: skip
    try:
        ready = server.expect(READY.pattern)
        yield server, int(ready[1]), int(ready[2])
    finally:
        server.stop()


def scrape(port: int) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Samples by name, from the classic text format; the OpenMetrics one (what Prometheus
    asks for) must parse too."""
    url = f"http://127.0.0.1:{port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    ask = urllib.request.Request(url, headers={"Accept": "application/openmetrics-text"})
    with urllib.request.urlopen(ask, timeout=10) as reply:
        assert reply.headers["Content-Type"].startswith("application/openmetrics-text")
        families = list(openmetrics_families(reply.read().decode()))
    assert {f.name for f in families} >= {"deq_inference_requests", "deq_model_info"}
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((sample.labels, sample.value))
    return out


def test_connections_spread_over_both_processes_behind_one_metrics_endpoint(tmp_path):
    x = np.random.default_rng(0).integers(0, 17, size=(1, 64)).astype(np.float32)
    with two_processes(tmp_path / "models") as (_, port, metrics_port):
        answers = []
        for _ in range(16):  # a fresh connection each: the kernel picks the process
            with DEQClient(f"127.0.0.1:{port}", timeout=60) as client:
                answers.append(client.infer("digits", x, tol=1e-6))
        metrics = scrape(metrics_port)
    assert all(a.converged.all() for a in answers)
    for answer in answers[1:]:  # the same model in each process: the same answer
        np.testing.assert_allclose(answer.output, answers[0].output, rtol=1e-5, atol=1e-6)
    served = {
        labels["process"]: value
        for labels, value in metrics["deq_inference_requests_total"]
        if labels["code"] == "OK"
    }
    assert set(served) == {"0", "1"}
    assert min(served.values()) >= 1
    assert sum(served.values()) == 16
    info = {(labels["process"], labels["version"]) for labels, _ in metrics["deq_model_info"]}
    assert info == {("0", "1"), ("1", "1")}


def test_a_checkpoint_copied_in_is_served_by_every_process(tmp_path):
    models = tmp_path / "models"
    with two_processes(models, "--poll-interval", "0.2") as (server, _, metrics_port):
        shutil.copy(bundled_checkpoints()["digits"], models / "digits" / "2.safetensors")
        found = {server.expect(r"\[(\d)\]: serving digits version 2")[1] for _ in range(2)}
        metrics = scrape(metrics_port)
    assert found == {"0", "1"}
    info = {(labels["process"], labels["version"]) for labels, _ in metrics["deq_model_info"]}
    assert {("0", "2"), ("1", "2")} <= info


def test_sigterm_drains_every_process_and_exits_zero(tmp_path):
    with two_processes(tmp_path / "models") as (server, _, _):
        pass  # stop() sends SIGTERM
    assert server.proc.returncode == 0
    rest = "".join(server.seen) + server.rest()
    assert re.search(r"\[0\]: stopped: drained", rest)
    assert re.search(r"\[1\]: stopped: drained", rest)


def test_a_busy_port_is_refused_before_any_child_starts(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        server = Server("--address", f"127.0.0.1:{busy}", "--model-dir", str(tmp_path / "m"))
        server.expect(f"gRPC address 127.0.0.1:{busy} is not available")
        assert server.proc.wait(timeout=60) == 1
    output = "".join(server.seen) + server.rest()
    assert "[0]" not in output
    assert "[1]" not in output


def _children(pid: int) -> list[int]:
    """The server processes a parent spawned (not multiprocessing's resource tracker)."""
    kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [
        int(kid)
        for kid in kids
        if b"resource_tracker" not in Path(f"/proc/{kid}/cmdline").read_bytes()
    ]


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_a_child_that_dies_takes_the_unit_down(tmp_path):
    with two_processes(tmp_path / "models") as (server, _, _):
        children = _children(server.proc.pid)
        assert len(children) == 2
        os.kill(children[0], signal.SIGKILL)
        server.expect("exited; stopping the others")
        assert server.proc.wait(timeout=60) == 1
    for kid in children:  # none left behind: the parent reaped both before it exited
        assert not Path(f"/proc/{kid}").exists()


def test_sigterm_while_the_children_start_stops_them_all(tmp_path):
    server = Server("--address", "127.0.0.1:0", "--model-dir", str(tmp_path / "m"))
    server.expect(r"\[\d\]: ")  # a child is starting (or already serving)
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(timeout=60) == 0
    server.rest()  # every child shares this stderr: its end means none is left running


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_children_stop_when_the_parent_is_killed(tmp_path):
    with two_processes(tmp_path / "models") as (server, _, _):
        server.proc.kill()  # SIGKILL: no handler runs in the parent
        rest = server.rest()  # until every child closed stderr
    assert re.search(r"\[0\]: stopped: drained", rest)
    assert re.search(r"\[1\]: stopped: drained", rest)
