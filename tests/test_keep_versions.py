"""Bounded memory across publications: only the newest `--keep-versions` versions of a model stay
loaded. Older ones keep their files on disk, are released from memory, answer NOT_FOUND with a
message saying why, and can be served again with LoadModel; a call already holding a version that
gets unloaded still finishes with it.
"""

from __future__ import annotations

import gc
import shutil
import threading
import urllib.request
import weakref
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from serving_harness import channel_to, running_server
from small_models import slow_model_dir

from deq_client.pb.deq.v1 import deq_pb2 as pb
from deq_client.pb.deq.v1 import deq_pb2_grpc
from deq_server.core import DEQModel, save_checkpoint
from deq_server.models import bundled_checkpoints
from deq_server.serving.errors import NotFoundError
from deq_server.serving.registry import Registry

CONFIG = {"cell": "mlp", "in_features": 4, "hidden": 8, "out_features": 2}


def versions_on_disk(folder: Path, count: int) -> None:
    """`m.safetensors` (version 1) and `m/2..count.safetensors`."""
    save_checkpoint(DEQModel.from_config(CONFIG), folder / "m.safetensors")
    (folder / "m").mkdir()
    for version in range(2, count + 1):
        save_checkpoint(DEQModel.from_config(CONFIG), folder / "m" / f"{version}.safetensors")


def test_publishing_keeps_the_newest_versions_and_lets_the_others_go(tmp_path):
    versions_on_disk(tmp_path, 5)
    evicted: list[tuple[str, str]] = []
    registry = Registry(torch.device("cpu"), torch.float32, keep_versions=2)
    registry.on_evict = lambda name, version: evicted.append((name, version))
    refs = []
    for version in range(1, 6):
        path = tmp_path / ("m.safetensors" if version == 1 else f"m/{version}.safetensors")
        entry = registry.load_version(str(version), path)
        refs.append(weakref.ref(entry.model))
        registry.publish("m", entry)
        del entry
    assert registry.models["m"].ordered_versions() == ["4", "5"]
    assert evicted == [("m", "1"), ("m", "2"), ("m", "3")]
    gc.collect()
    assert [ref() is None for ref in refs] == [True, True, True, False, False]
    with pytest.raises(NotFoundError, match=r"version '2'.*not loaded.*--keep-versions.*LoadModel"):
        registry.resolve("m", "2")
    with pytest.raises(NotFoundError, match=r"has no version '9'"):
        registry.resolve("m", "9")


def test_versions_published_out_of_order_keep_the_newest(tmp_path):
    """Concurrent loads finish in any order: a lower number published last is no reason to
    unload a newer one (only LoadModel bringing an old version back pins it)."""
    versions_on_disk(tmp_path, 4)
    registry = Registry(torch.device("cpu"), torch.float32, keep_versions=2)
    for version in (1, 3, 4, 2):
        path = tmp_path / ("m.safetensors" if version == 1 else f"m/{version}.safetensors")
        registry.publish("m", registry.load_version(str(version), path))
    assert registry.models["m"].ordered_versions() == ["3", "4"]


def test_start_loads_only_the_newest_versions(tmp_path):
    versions_on_disk(tmp_path, 4)
    registry = Registry(torch.device("cpu"), torch.float32, keep_versions=2)
    registry.load_all(tmp_path, {})
    assert registry.models["m"].ordered_versions() == ["3", "4"]
    keep_all = Registry(torch.device("cpu"), torch.float32)
    keep_all.load_all(tmp_path, {})
    assert keep_all.models["m"].ordered_versions() == ["1", "2", "3", "4"]


def test_keep_versions_must_be_positive():
    with pytest.raises(ValueError, match="keep_versions"):
        Registry(torch.device("cpu"), torch.float32, keep_versions=0)


def digits_tensor(rows: int) -> pb.Tensor:
    x = np.full((rows, 64), 8.0, np.float32)
    return pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=[rows, 64], data=x.tobytes())


def commit(stub: deq_pb2_grpc.DEQServiceStub) -> str:
    labels = pb.Tensor(dtype=pb.DATA_TYPE_INT64, shape=[2], data=np.arange(2).tobytes())
    config = pb.TrainConfig(model="digits", learning_rate=1e-3, loss=pb.LOSS_CROSS_ENTROPY)
    batch = pb.TrainBatch(inputs=digits_tensor(2), targets=labels)
    requests = [pb.TrainRequest(config=config), pb.TrainRequest(batch=batch)]
    return list(stub.Train(iter(requests), timeout=120))[-1].committed.version


def test_commits_unload_old_versions_which_stay_on_disk_and_can_be_loaded_again(tmp_path):
    shutil.copy(bundled_checkpoints()["digits"], tmp_path / "digits.safetensors")
    with running_server(model_dir=tmp_path, keep_versions=2) as server, channel_to(server) as ch:
        stub = deq_pb2_grpc.DEQServiceStub(ch)
        assert [commit(stub) for _ in range(3)] == ["2", "3", "4"]
        info = stub.GetModel(pb.GetModelRequest(name="digits"), timeout=60).model
        assert list(info.versions) == ["3", "4"]
        with pytest.raises(grpc.RpcError) as err:
            stub.Infer(pb.InferRequest(model="digits", version="2", input=digits_tensor(1)))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert "not loaded" in err.value.details()
        assert "--keep-versions" in err.value.details()
        url = f"http://127.0.0.1:{server.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=30) as response:
            info_series = [
                ln
                for ln in response.read().decode().splitlines()
                if ln.startswith("deq_model_info{")
            ]
        assert sorted(ln.split('version="')[1].split('"')[0] for ln in info_series) == ["3", "4"]
        # Files of every version stay; LoadModel of an unloaded version's file serves it again
        # under its own number, beside the newest (which unpinned requests keep getting).
        assert (tmp_path / "digits.safetensors").is_file()
        assert sorted(p.name for p in (tmp_path / "digits").iterdir()) == [
            ".2.claim",  # the numbers' claims (model_store)
            ".3.claim",
            ".4.claim",
            "2.safetensors",
            "3.safetensors",
            "4.safetensors",
        ]
        with pytest.raises(grpc.RpcError) as err:
            stub.Infer(pb.InferRequest(model="digits", version="2", input=digits_tensor(1)))
        assert "LoadModel of 'digits/2.safetensors' serves it again as version 2" in (
            err.value.details()
        )
        stub.LoadModel(pb.LoadModelRequest(name="digits", path="digits/2.safetensors"), timeout=60)
        info = stub.GetModel(pb.GetModelRequest(name="digits"), timeout=60).model
        assert list(info.versions) == ["2", "4"]
        assert (
            stub.Infer(pb.InferRequest(model="digits", input=digits_tensor(1))).model_version == "4"
        )
        pinned = pb.InferRequest(model="digits", version="2", input=digits_tensor(1))
        assert stub.Infer(pinned).model_version == "2"
        stub.LoadModel(pb.LoadModelRequest(name="digits", path="digits.safetensors"), timeout=60)
        info = stub.GetModel(pb.GetModelRequest(name="digits"), timeout=60).model
        assert list(info.versions) == ["1", "4"]
        # A file that was never this model's version N gets a new number, never a used one.
        shutil.copy(tmp_path / "digits.safetensors", tmp_path / "copy.safetensors")
        copy = stub.LoadModel(pb.LoadModelRequest(name="digits", path="copy.safetensors"))
        assert list(copy.model.versions) == ["4", "5"]


def test_a_call_in_flight_finishes_on_the_version_unloaded_under_it(tmp_path):
    slow_model_dir(tmp_path)
    with running_server(model_dir=tmp_path, keep_versions=1) as server, channel_to(server) as ch:
        stub = deq_pb2_grpc.DEQServiceStub(ch)
        x = np.random.default_rng(0).standard_normal((32, 8)).astype(np.float32)
        request = pb.InferRequest(
            model="slow",
            version="1",
            input=pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=[32, 8], data=x.tobytes()),
        )
        answers: list[pb.InferResponse] = []
        caller = threading.Thread(target=lambda: answers.append(stub.Infer(request, timeout=120)))
        caller.start()
        for _ in range(1_000_000):  # bounded: wait until the call is in the scheduler
            if server.scheduler.pending() >= 1:
                break
        stub.LoadModel(pb.LoadModelRequest(name="slow", path="slow.safetensors"), timeout=60)
        assert server.scheduler.pending() >= 1  # version 1 was unloaded while the call ran
        info = stub.GetModel(pb.GetModelRequest(name="slow"), timeout=60).model
        assert list(info.versions) == ["2"]
        caller.join(timeout=120)
        assert len(answers) == 1
        assert answers[0].model_version == "1"
        assert list(answers[0].iterations) == [1000] * 32
