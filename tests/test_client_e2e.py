"""The SDK and deqctl against a real server on loopback."""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from serving_harness import running_server
from sklearn.datasets import load_digits

from deq_client import AsyncDEQClient, DEQClient, DEQError
from deq_server.models import bundled_checkpoints


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    shutil.copy(bundled_checkpoints()["digits"], folder / "digits.safetensors")
    return folder


@pytest.fixture(scope="module")
def server(model_dir):
    with running_server(model_dir=model_dir) as running:
        yield running


@pytest.fixture(scope="module")
def target(server):
    return f"127.0.0.1:{server.port}"


def digits(n: int) -> tuple[np.ndarray, np.ndarray]:
    data = load_digits()
    return data.data[:n].astype(np.float32), data.target[:n].astype(np.int64)


def test_sdk_infer_list_get_health(target):
    x, labels = digits(6)
    with DEQClient(target, timeout=30) as client:
        assert client.health() == "SERVING"
        info = next(m for m in client.list_models() if m.name == "digits")
        assert info.input_shape == (64,)
        assert client.get_model("digits") == info
        result = client.infer("digits", x, tol=[1e-2, 1e-6] * 3, return_state=True)
        assert result.status_names == ["CONVERGED"] * 6
        assert result.converged.all()
        assert (result.iterations[0::2] < result.iterations[1::2]).all()
        assert (result.output.argmax(1) == labels).mean() >= 0.8
        assert result.state is not None
        assert result.state.shape == (6, 64)
        with pytest.raises(DEQError) as info:
            client.infer("nope", x)
        assert info.value.code.name == "NOT_FOUND"


def test_sdk_errors_are_one_type_whether_the_client_or_the_server_refuses(target):
    """Issue 13, item 5: tol=0 (refused by the SDK) and tol=1e-20 (by the server's --min-tol)
    are both DEQError INVALID_ARGUMENT; the SDK's is also a ValueError (TypeError: wrong type)."""
    x, _ = digits(2)
    with DEQClient(target, timeout=30) as client:
        for options, local in (
            ({"tol": 0.0}, ValueError),
            ({"tol": "1e-3"}, TypeError),
            ({"method": "newton"}, ValueError),
            ({"tol": 1e-20}, None),
            ({"max_iter": 10**6}, None),
        ):
            with pytest.raises(DEQError) as info:
                client.infer("digits", x, **options)
            assert info.value.code.name == "INVALID_ARGUMENT", options
            assert str(info.value).startswith("INVALID_ARGUMENT: ")
            if local is not None:
                assert isinstance(info.value, local)
        with pytest.raises(DEQError) as info:
            client.infer("digits", x.astype(np.uint8))
        assert info.value.code.name == "INVALID_ARGUMENT"

    async def both_sides() -> list[DEQError]:
        errors = []
        async with AsyncDEQClient(target, timeout=30) as client:
            for tol in (0.0, 1e-20):
                try:
                    await client.infer("digits", x, tol=tol)
                except DEQError as error:
                    errors.append(error)
        return errors

    errors = asyncio.run(both_sides())
    assert [error.code.name for error in errors] == ["INVALID_ARGUMENT"] * 2
    assert isinstance(errors[0], ValueError)


def test_sdk_load_and_unload(target, model_dir):
    shutil.copy(model_dir / "digits.safetensors", model_dir / "copy.safetensors")
    with DEQClient(target, timeout=30) as client:
        info = client.load_model("copy", "copy.safetensors")
        assert (info.name, info.versions) == ("copy", ["1"])
        assert client.infer("copy", digits(1)[0]).model_version == "1"
        client.unload_model("copy")
        assert "copy" not in [m.name for m in client.list_models()]
        with pytest.raises(DEQError) as info:
            client.load_model("x", "../escape.safetensors")
        assert info.value.code.name == "INVALID_ARGUMENT"


def test_sdk_infer_many_keeps_request_order(target):
    x, _ = digits(8)
    with DEQClient(target, timeout=30) as client:
        results = list(client.infer_many("digits", [x[i : i + 2] for i in range(0, 8, 2)]))
    assert [r.output.shape for r in results] == [(2, 10)] * 4
    with DEQClient(target, timeout=30) as client:
        one = client.infer("digits", x[4:6])
    np.testing.assert_allclose(results[2].output, one.output, rtol=1e-6)


def test_async_client(target):
    x, _ = digits(3)

    async def main():
        async with AsyncDEQClient(target, timeout=30) as client:
            return await client.infer("digits", x, tol=1e-4), await client.health()

    result, health = asyncio.run(main())
    assert health == "SERVING"
    assert result.status_names == ["CONVERGED"] * 3


def run_deqctl(target: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "deq_client.cli", "--target", target, *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def deqctl(target: str, *args: str) -> list[dict]:
    out = run_deqctl(target, *args)
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines()]


def test_deqctl_models_infer_train(target, tmp_path):
    models = deqctl(target, "models")
    assert "digits" in [m["name"] for m in models]
    x, y = digits(64)
    np.save(tmp_path / "x.npy", x[:3])
    (answer,) = deqctl(
        target,
        "infer",
        "--model",
        "digits",
        "--input",
        str(tmp_path / "x.npy"),
        "--tol",
        "1e-5",
        "--output",
        str(tmp_path / "y.npy"),
    )
    assert answer["status"] == ["CONVERGED"] * 3
    assert np.load(tmp_path / "y.npy").shape == (3, 10)
    np.save(tmp_path / "inputs.npy", x)
    np.save(tmp_path / "targets.npy", y)
    events = deqctl(
        target,
        "train",
        "--model",
        "digits",
        "--inputs",
        str(tmp_path / "inputs.npy"),
        "--targets",
        str(tmp_path / "targets.npy"),
        "--loss",
        "cross_entropy",
        "--batch-size",
        "32",
        "--publish-as",
        "digits-tuned",
    )
    assert [e["kind"] for e in events] == ["step", "step", "committed"]
    assert events[-1]["model"] == "digits-tuned"
    assert events[-1]["version"] == "1"


def test_deqctl_local_errors_are_one_line_not_tracebacks(target, tmp_path):
    """Issue 13, item 4 (in part): a missing file, a bad tol, float labels for cross-entropy."""
    x, y = digits(4)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "float_labels.npy", y.astype(np.float32))
    (tmp_path / "text.npy").write_text("not an array")
    cases = [
        (["infer", "--model", "digits", "--input", str(tmp_path / "missing.npy")], "missing.npy"),
        (["infer", "--model", "digits", "--input", str(tmp_path / "text.npy")], "deqctl: error:"),
        (
            ["infer", "--model", "digits", "--input", str(tmp_path / "x.npy"), "--tol", "0"],
            "deqctl: INVALID_ARGUMENT: tol",
        ),
        (
            [
                "train",
                "--model",
                "digits",
                "--inputs",
                str(tmp_path / "x.npy"),
                "--targets",
                str(tmp_path / "float_labels.npy"),
                "--loss",
                "cross_entropy",
            ],
            "deqctl: INVALID_ARGUMENT: batch 0 targets: cross_entropy takes int64",
        ),
    ]
    for args, expected in cases:
        out = run_deqctl(target, *args)
        assert out.returncode == 1, (args, out.stderr)
        lines = out.stderr.splitlines()
        assert len(lines) == 1, out.stderr
        assert expected in lines[0], lines[0]


def test_deqctl_version_load_unload_and_a_pinned_infer(target, model_dir, tmp_path):
    """Issue 13, item 4: `deqctl --version`, `load`, `unload`, and `infer --version`."""
    out = subprocess.run(
        [sys.executable, "-m", "deq_client.cli", "--version"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert out.stdout.strip() == f"deqctl {importlib.metadata.version('deq-serve')}"
    shutil.copy(model_dir / "digits.safetensors", model_dir / "cli-copy.safetensors")
    (loaded,) = deqctl(target, "load", "--name", "cli-copy", "--path", "cli-copy.safetensors")
    assert (loaded["name"], loaded["versions"]) == ("cli-copy", ["1"])
    np.save(tmp_path / "x.npy", digits(2)[0])
    x = str(tmp_path / "x.npy")
    (answer,) = deqctl(target, "infer", "--model", "cli-copy", "--version", "1", "--input", x)
    assert answer["model_version"] == "1"
    assert answer["status"] == ["CONVERGED"] * 2
    assert deqctl(target, "unload", "--name", "cli-copy") == [{"unloaded": "cli-copy"}]
    assert "cli-copy" not in [m["name"] for m in deqctl(target, "models")]
    missing = run_deqctl(target, "infer", "--model", "cli-copy", "--input", x)
    assert missing.returncode == 1
    assert missing.stderr.startswith("deqctl: NOT_FOUND")
