"""Faults: a torn checkpoint is impossible, and a diverging fine-tune harms nothing served."""

from __future__ import annotations

import random
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import torch
from serving_harness import channel_to, running_server

from deq_client.pb.deq.v1 import deq_pb2 as pb
from deq_client.pb.deq.v1 import deq_pb2_grpc
from deq_server.core import DEQModel, load_checkpoint
from deq_server.models import bundled_checkpoints
from deq_server.serving.config import parse_config
from deq_server.serving.metrics import Metrics
from deq_server.serving.registry import Registry
from deq_server.serving.training import TrainSession

SAVER = textwrap.dedent(
    """
    import sys, torch
    from deq_server.core import DEQModel, save_checkpoint
    config = {"cell": "mlp", "in_features": 4, "hidden": 256, "out_features": 2}
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(DEQModel.from_config(config))
    k = 0
    while True:
        print(k, flush=True)
        save_checkpoint(models[k % 2], sys.argv[1])
        k += 1
    """
)


def test_sigkill_during_saves_always_leaves_a_whole_checkpoint(tmp_path):
    path = tmp_path / "m.safetensors"
    config = {"cell": "mlp", "in_features": 4, "hidden": 256, "out_features": 2}
    expected = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        expected.append(DEQModel.from_config(config).state_dict())
    rng = random.Random(0)
    for _ in range(20):
        proc = subprocess.Popen(
            [sys.executable, "-c", SAVER, str(path)], stdout=subprocess.PIPE, text=True
        )
        for _ in range(rng.randint(2, 40)):  # kill at a random point of a random save
            proc.stdout.readline()
        proc.kill()
        proc.wait()
        proc.stdout.close()
        state = load_checkpoint(path).state_dict()
        assert any(all(torch.equal(state[k], ref[k]) for k in ref) for ref in expected), (
            "the checkpoint is neither the old nor the new one"
        )
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "m.safetensors"]
    assert all(name.startswith(".m.safetensors.") for name in leftovers)  # only temp files


def test_a_diverging_fine_tune_skips_steps_and_leaves_serving_untouched(tmp_path):
    shutil.copy(bundled_checkpoints()["digits"], tmp_path / "digits.safetensors")
    x = np.random.default_rng(0).integers(0, 17, (4, 64)).astype(np.float32)
    wire = pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=[4, 64], data=x.tobytes())
    y = np.arange(4, dtype=np.int64)
    targets = pb.Tensor(dtype=pb.DATA_TYPE_INT64, shape=[4], data=y.tobytes())
    with running_server(model_dir=tmp_path) as server, channel_to(server) as channel:
        stub = deq_pb2_grpc.DEQServiceStub(channel)
        before = stub.Infer(pb.InferRequest(model="digits", input=wire)).output.data
        config = pb.TrainConfig(
            model="digits",
            optimizer=pb.OPTIMIZER_SGD,
            learning_rate=1e38,
            loss=pb.LOSS_CROSS_ENTROPY,
        )
        batch = pb.TrainRequest(batch=pb.TrainBatch(inputs=wire, targets=targets))
        call = stub.Train(iter([pb.TrainRequest(config=config), *[batch] * 6]))
        events = [e for e in call]
        steps = [e.step for e in events if e.WhichOneof("event") == "step"]
        assert any(s.skipped for s in steps)
        assert all(s.skip_reason.startswith("non-finite") for s in steps if s.skipped)
        committed = events[-1].committed
        assert committed.steps == sum(not s.skipped for s in steps)
        # The served version 1 answered the same all along; the diverged weights are version 2.
        # Same to float rounding, not bit for bit: solver batches (and so GEMM blocking and
        # Anderson's ring order) differ from call to call.
        after = stub.Infer(pb.InferRequest(model="digits", version="1", input=wire)).output.data
        np.testing.assert_allclose(
            np.frombuffer(after, np.float32), np.frombuffer(before, np.float32), rtol=1e-4
        )
    published = load_checkpoint(tmp_path / "digits" / f"{committed.version}.safetensors")
    assert published.provenance["user.steps"] == str(committed.steps)


def test_an_update_that_breaks_the_weights_is_taken_back(tmp_path):
    """Adam at lr 1e38 turns finite gradients into weights the spectral cap cannot handle: the
    step is taken back and reported, the stream goes on and commits, nothing is INTERNAL."""
    shutil.copy(bundled_checkpoints()["digits"], tmp_path / "digits.safetensors")
    x = np.random.default_rng(1).integers(0, 17, (4, 64)).astype(np.float32)
    wire = pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=[4, 64], data=x.tobytes())
    targets = pb.Tensor(
        dtype=pb.DATA_TYPE_INT64, shape=[4], data=np.arange(4, dtype=np.int64).tobytes()
    )
    config = pb.TrainConfig(
        model="digits", optimizer=pb.OPTIMIZER_ADAM, learning_rate=1e38, loss=pb.LOSS_CROSS_ENTROPY
    )
    batch = pb.TrainRequest(batch=pb.TrainBatch(inputs=wire, targets=targets))
    with running_server(model_dir=tmp_path) as server, channel_to(server) as channel:
        stub = deq_pb2_grpc.DEQServiceStub(channel)
        events = list(stub.Train(iter([pb.TrainRequest(config=config), *[batch] * 3])))
    steps = [e.step for e in events if e.WhichOneof("event") == "step"]
    assert [s.skip_reason for s in steps] == ["non-finite weights after the update"] * 3
    assert events[-1].committed.steps == 0


def test_a_step_taken_back_leaves_weights_and_optimizer_state_as_they_were(tmp_path):
    """Two good Adam steps build moments and a step count; a third at lr 1e38 breaks the
    weights and is taken back: the weights and every optimizer state tensor are as before it."""
    shutil.copy(bundled_checkpoints()["digits"], tmp_path / "digits.safetensors")
    registry = Registry(torch.device("cpu"), torch.float32)
    registry.load_all(tmp_path, bundled_checkpoints())
    config = parse_config([f"--model-dir={tmp_path}", "--metrics-address="])
    train = pb.TrainConfig(model="digits", learning_rate=1e-3, loss=pb.LOSS_CROSS_ENTROPY)
    session = TrainSession(train, registry, config, Metrics())
    x = np.random.default_rng(1).integers(0, 17, (4, 64)).astype(np.float32)
    batch = pb.TrainBatch(
        inputs=pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=[4, 64], data=x.tobytes()),
        targets=pb.Tensor(
            dtype=pb.DATA_TYPE_INT64, shape=[4], data=np.arange(4, dtype=np.int64).tobytes()
        ),
    )
    assert not any(session.step(batch).skipped for _ in range(2))
    weights = [p.detach().clone() for p in session.model.parameters()]
    state = {
        i: {k: v.clone() for k, v in session.optimizer.state[p].items()}
        for i, p in enumerate(session.model.parameters())
    }
    session.optimizer.param_groups[0]["lr"] = 1e38
    assert session.step(batch).skip_reason == "non-finite weights after the update"
    for i, p in enumerate(session.model.parameters()):
        assert torch.equal(p.detach(), weights[i])
        after = session.optimizer.state[p]
        assert after.keys() == state[i].keys()
        for k, v in state[i].items():
            assert torch.equal(after[k], v)
    session.close()
