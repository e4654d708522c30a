"""The server of "Two commands" (no --model-dir) can be fine-tuned, and the bundled demo stays
reachable as version 1 (issue 13, items 1 and 2): the default model directory is the per-user
data directory, created and seeded with the demo as `digits/1.safetensors`."""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from serving_harness import free_port, running_server
from sklearn.datasets import load_digits

from deq_client import DEQClient, DEQError
from deq_server.models import bundled_checkpoints

X = load_digits().data[:8].astype(np.float32)
LABELS = load_digits().target[:8].astype(np.int64)


@contextmanager
def served(**overrides: object) -> Iterator[DEQClient]:
    """An SDK client of a server started with `overrides`."""
    with (
        running_server(**overrides) as server,
        DEQClient(f"127.0.0.1:{server.port}", timeout=60) as c,
    ):
        yield c


def fine_tune(client: DEQClient) -> str:
    events = list(
        client.train("digits", [(X, LABELS)], {"loss": "cross_entropy", "learning_rate": 1e-2})
    )
    return str(events[-1].version)


def same_model(a: np.ndarray, b: np.ndarray) -> None:
    """Answers of one checkpoint: equal up to float32 noise of batching (a fine-tune moves
    them by far more)."""
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_the_two_commands_server_publishes_into_the_per_user_data_dir(tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "XDG_DATA_HOME": str(tmp_path)}
    env.pop("DEQ_MODEL_DIR", None)
    argv = ["deq-server", "--address", f"127.0.0.1:{port}", "--metrics-address", ""]
    with subprocess.Popen(argv, env=env, stderr=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stderr is not None
            lines = []
            for line in proc.stderr:  # until the start line (or the process ends)
                lines.append(line)
                if "deq-server ready" in line:
                    break
            models = tmp_path / "deq-serve" / "models"
            assert f"model dir {models}," in lines[-1], lines
            assert sorted(p.relative_to(models).as_posix() for p in models.rglob("*")) == [
                "digits",
                "digits/1.safetensors",
            ]
            assert (models / "digits" / "1.safetensors").read_bytes() == (
                bundled_checkpoints()["digits"].read_bytes()
            )
            with DEQClient(f"127.0.0.1:{port}", timeout=60) as client:
                before = client.infer("digits", X, tol=1e-6).output
                assert fine_tune(client) == "2"
                assert (models / "digits" / "2.safetensors").is_file()
                pinned = client.infer("digits", X, tol=1e-6, version="1")
                assert pinned.model_version == "1"
                same_model(pinned.output, before)
                tuned = client.infer("digits", X, tol=1e-6)
                assert tuned.model_version == "2"
                assert np.abs(tuned.output - before).max() > 1e-3  # so that same_model can fail
        finally:
            proc.terminate()
            proc.wait(timeout=60)


def test_the_bundled_demo_comes_back_as_version_1_after_evictions_and_restarts(
    tmp_path: Path,
) -> None:
    models = tmp_path / "not" / "yet" / "there"
    with served(model_dir=models, keep_versions=2) as client:
        demo = client.infer("digits", X, tol=1e-6).output
        assert [fine_tune(client), fine_tune(client)] == ["2", "3"]
        assert client.get_model("digits").versions == ["2", "3"]
        with pytest.raises(DEQError, match=r"LoadModel of 'digits/1.safetensors'") as err:
            client.infer("digits", X, version="1")
        assert err.value.code.name == "NOT_FOUND"
        assert client.load_model("digits", "digits/1.safetensors").versions == ["1", "3"]
        again = client.infer("digits", X, tol=1e-6, version="1")
        same_model(again.output, demo)
    # A restart serves the newest two; version 1's file is still there, under its number.
    with served(model_dir=models, keep_versions=2) as client:
        assert client.get_model("digits").versions == ["2", "3"]
        assert client.load_model("digits", "digits/1.safetensors").versions == ["1", "3"]
        restored = client.infer("digits", X, tol=1e-6, version="1")
        same_model(restored.output, demo)
        assert fine_tune(client) == "4"  # never a number already used


def test_a_directory_with_checkpoints_is_not_seeded(tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "1.safetensors").write_bytes(bundled_checkpoints()["digits"].read_bytes())
    with running_server(model_dir=tmp_path) as server:
        assert sorted(server.registry.models) == ["mine"]
    assert not (tmp_path / "digits").exists()


def test_an_unwritable_model_dir_serves_the_demo_from_the_package(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "a-file").write_text("in the way")
    caplog.set_level(logging.INFO)
    with running_server(model_dir=tmp_path / "a-file" / "models") as server:
        entry = server.registry.models["digits"].versions["1"]
        assert entry.path == bundled_checkpoints()["digits"]
        with DEQClient(f"127.0.0.1:{server.port}", timeout=60) as client:
            with pytest.raises(DEQError, match="not a writable folder") as err:
                fine_tune(client)
            assert err.value.code.name == "FAILED_PRECONDITION"
    assert any("cannot seed the model directory" in r.getMessage() for r in caplog.records)
