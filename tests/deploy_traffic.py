"""Traffic of every kind for the deployment tests, through the SDK against the `digits` demo.

Shared by the Prometheus test (which needs every metric series to move) and the Docker tests
(which need a container that answers Infer and commits a Train): mixed tolerances, a solve capped
below convergence, a request the server refuses, and a short fine-tune.
"""

from __future__ import annotations

import numpy as np
import pytest

from deq_client import DEQClient, DEQError

MODEL = "digits"
TOLERANCES = [1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-2, 1e-4, 1e-6]


def digits_inputs(rows: int, seed: int = 0) -> np.ndarray:
    """Pixel values in [0, 16], the demo model's input range."""
    return np.random.default_rng(seed).integers(0, 17, (rows, 64)).astype(np.float32)


def infer_mixed(client: DEQClient) -> None:
    """One batch with a different tolerance per sample; every sample converges."""
    result = client.infer(MODEL, digits_inputs(len(TOLERANCES)), tol=TOLERANCES)
    assert result.status_names == ["CONVERGED"] * len(TOLERANCES)
    assert result.output.shape == (len(TOLERANCES), 10)


def infer_capped(client: DEQClient) -> None:
    """A tolerance no sample reaches in one iteration: every sample ends MAX_ITER (not an error)."""
    result = client.infer(MODEL, digits_inputs(4, seed=1), tol=1e-9, max_iter=1)
    assert result.status_names == ["MAX_ITER"] * 4


def infer_refused(client: DEQClient) -> None:
    """A batch of the wrong width: INVALID_ARGUMENT, counted under its code."""
    with pytest.raises(DEQError) as refused:
        client.infer(MODEL, np.zeros((2, 63), np.float32))
    assert refused.value.code.name == "INVALID_ARGUMENT"


def train_briefly(client: DEQClient, steps: int = 2) -> str:
    """A short cross-entropy fine-tune that commits; returns the published version."""
    x = digits_inputs(8 * steps, seed=2)
    y = np.arange(8 * steps) % 10
    batches = [(x[i : i + 8], y[i : i + 8]) for i in range(0, len(x), 8)]
    events = list(
        client.train(MODEL, batches, {"loss": "cross_entropy", "learning_rate": 1e-3}, timeout=120)
    )
    assert [e.kind for e in events] == ["step"] * steps + ["committed"]
    version = events[-1].version
    assert version is not None
    return version


def every_kind(client: DEQClient) -> str:
    """One round of all of the above; returns the version the fine-tune published."""
    infer_mixed(client)
    infer_capped(client)
    infer_refused(client)
    return train_briefly(client)
