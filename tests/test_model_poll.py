"""`--model-control poll` (issue 14): each rescan serves the versions that appeared in the model
directory and stops serving removed files; a half-written file is never served, and is tried
again once it changes. Rescans are driven by the test (poll_once), the interval set to an hour."""

from __future__ import annotations

import asyncio
import os
import shutil
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from serving_harness import running_server

from deq_client import DEQClient, DEQError
from deq_server.models import bundled_checkpoints
from deq_server.serving.app import RunningServer
from deq_server.serving.model_poll import PollResult

DIGITS = bundled_checkpoints()["digits"]
X = np.full((1, 64), 8.0, np.float32)


@contextmanager
def polled(model_dir: Path, **overrides: object) -> Iterator[tuple[RunningServer, DEQClient]]:
    options = {"model_control": "poll", "poll_interval": 3600.0, **overrides}
    with (
        running_server(model_dir=model_dir, **options) as server,
        DEQClient(f"127.0.0.1:{server.port}", timeout=60) as client,
    ):
        yield server, client


def poll(server: RunningServer) -> PollResult:
    """One rescan, on the server's own event loop."""
    assert server.poller is not None
    assert server._poll_task is not None
    loop = server._poll_task.get_loop()
    return asyncio.run_coroutine_threadsafe(server.poller.poll_once(), loop).result(60)


def place(source: Path, target: Path) -> None:
    """Copy as a commit writes: a temp file renamed into place."""
    target.parent.mkdir(exist_ok=True)
    tmp = target.with_name(f".{target.name}.copy.tmp")
    shutil.copy(source, tmp)
    os.replace(tmp, target)


def metrics_lines(server: RunningServer) -> list[str]:
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.read().decode().splitlines()


def model_info_versions(server: RunningServer) -> list[str]:
    lines = metrics_lines(server)
    found = [
        ln.split('version="')[1].split('"')[0] for ln in lines if ln.startswith("deq_model_info{")
    ]
    return sorted(found, key=int)


def test_new_versions_are_served_and_removed_ones_stopped(tmp_path: Path) -> None:
    with polled(tmp_path, keep_versions=2) as (server, client):
        assert client.get_model("digits").versions == ["1"]
        assert poll(server) == PollResult()  # nothing changed
        place(DIGITS, tmp_path / "digits" / "2.safetensors")
        assert poll(server).served == [("digits", "2")]
        assert client.infer("digits", X).model_version == "2"
        assert model_info_versions(server) == ["1", "2"]
        # three at once with --keep-versions 2: the newest two, and 3 is never loaded
        for n in (3, 4, 5):
            place(DIGITS, tmp_path / "digits" / f"{n}.safetensors")
        assert poll(server).served == [("digits", "5"), ("digits", "4")]
        assert client.get_model("digits").versions == ["4", "5"]
        # a new model's folder is a new model
        place(DIGITS, tmp_path / "other" / "1.safetensors")
        assert poll(server).served == [("other", "1")]
        # every served model has its pending gauge, at 0 while idle (what an autoscaler reads)
        pending = [ln for ln in metrics_lines(server) if ln.startswith("deq_inference_pending")]
        assert sorted(pending) == [
            'deq_inference_pending_requests{model="digits"} 0.0',
            'deq_inference_pending_requests{model="other"} 0.0',
        ]
        # removed files stop being served (and 3, never served, is now among the newest two);
        # the last one takes the model with it
        (tmp_path / "digits" / "5.safetensors").unlink()
        changed = poll(server)
        assert (changed.stopped, changed.served) == ([("digits", "5")], [("digits", "3")])
        assert client.get_model("digits").versions == ["3", "4"]
        assert model_info_versions(server) == ["1", "3", "4"]  # other's 1, digits' 3 and 4
        (tmp_path / "other" / "1.safetensors").unlink()
        assert poll(server).stopped == [("other", "1")]
        assert model_info_versions(server) == ["3", "4"]
        with pytest.raises(DEQError) as err:
            client.infer("other", X)
        assert err.value.code.name == "NOT_FOUND"
        # a file put back, or one older than what is served, waits for LoadModel
        place(DIGITS, tmp_path / "digits" / "5.safetensors")
        assert poll(server) == PollResult()
        assert client.get_model("digits").versions == ["3", "4"]


def test_a_half_written_file_is_never_served_and_is_retried_once_it_changes(
    tmp_path: Path,
) -> None:
    data = DIGITS.read_bytes()
    with polled(tmp_path) as (server, client):
        half = tmp_path / "digits" / "2.safetensors"
        half.parent.mkdir(exist_ok=True)
        half.write_bytes(data[: len(data) // 2])  # a copy caught midway (not atomic)
        first = poll(server)
        assert (first.served, first.refused) == ([], [half])
        assert poll(server) == PollResult()  # unchanged: not tried again
        assert client.get_model("digits").versions == ["1"]
        half.write_bytes(data)
        assert poll(server).served == [("digits", "2")]
        assert client.infer("digits", X, version="2").model_version == "2"


def test_without_poll_the_directory_is_read_at_start_only(tmp_path: Path) -> None:
    with running_server(model_dir=tmp_path) as server:
        assert server.poller is None
        assert server._poll_task is None


def test_a_giant_version_number_on_disk_pushes_no_number_past_what_clients_can_pin(
    tmp_path: Path,
) -> None:
    """Numbers beyond 18 digits (what a request may pin) are neither versions nor claims."""
    giant = "9" * 19
    (tmp_path / "digits").mkdir()
    place(DIGITS, tmp_path / "digits" / "1.safetensors")
    place(DIGITS, tmp_path / "digits" / f"{giant}.safetensors")
    (tmp_path / "digits" / f".{giant}.claim").touch()
    with polled(tmp_path) as (server, client):
        assert client.get_model("digits").versions == ["1"]
        assert poll(server) == PollResult()
        events = list(
            client.train(
                "digits", [(X, np.array([3]))], {"loss": "cross_entropy", "learning_rate": 1e-3}
            )
        )
        assert events[-1].version == "2"


def test_a_loop_of_links_in_the_model_dir_is_skipped_not_a_crash(tmp_path: Path) -> None:
    """A link to itself (Python 3.11's resolve raises RuntimeError on it) at start, in a poll,
    in a version folder and as LoadModel's path: skipped or INVALID_ARGUMENT, never INTERNAL."""
    place(DIGITS, tmp_path / "digits" / "1.safetensors")
    (tmp_path / "loop.safetensors").symlink_to("loop.safetensors")
    with polled(tmp_path) as (server, client):
        assert sorted(server.registry.models) == ["digits"]
        (tmp_path / "digits" / "2.safetensors").symlink_to("2.safetensors")
        assert poll(server) == PollResult()
        with pytest.raises(DEQError) as err:
            client.load_model("again", "loop.safetensors")
        assert err.value.code.name == "INVALID_ARGUMENT"
        # a commit takes the looped name's number: its file replaces the link
        config = {"loss": "cross_entropy", "learning_rate": 1e-3}
        events = list(client.train("digits", [(X, np.array([3]))], config))
        assert events[-1].version == "2"
        assert (tmp_path / "digits" / "2.safetensors").is_file()
