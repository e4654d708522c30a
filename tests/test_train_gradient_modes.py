"""Train's PHANTOM and JFB gradient modes honour the model's own backward settings."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from serving_harness import channel_to, running_server

from deq_client.pb.deq.v1 import deq_pb2 as pb
from deq_client.pb.deq.v1 import deq_pb2_grpc
from deq_server.core import IFT, JFB, DEQModel, Phantom, load_checkpoint, save_checkpoint
from deq_server.serving.config import ServerConfig
from deq_server.serving.training import _backward

BASE = {"cell": "mlp", "in_features": 5, "hidden": 8, "out_features": 3}
PHANTOM = {"mode": "phantom", "steps": 3, "damping": 0.5}


def model_with(backward: dict | str) -> DEQModel:
    return DEQModel.from_config({**BASE, "backward": backward}).double()


@pytest.mark.parametrize(
    ("backward", "mode", "expected"),
    [
        (PHANTOM, pb.GRADIENT_MODE_PHANTOM, Phantom(steps=3, damping=0.5)),
        ("ift", pb.GRADIENT_MODE_PHANTOM, Phantom()),  # not a phantom model: the defaults
        ("jfb", pb.GRADIENT_MODE_PHANTOM, Phantom()),
        (PHANTOM, pb.GRADIENT_MODE_JFB, JFB()),
        ("jfb", pb.GRADIENT_MODE_JFB, JFB()),
        (PHANTOM, pb.GRADIENT_MODE_IFT, IFT()),
    ],
)
def test_gradient_mode_takes_the_models_settings_of_that_kind(backward, mode, expected):
    model = model_with(backward)
    got = _backward(pb.TrainConfig(gradient_mode=mode), model, ServerConfig())
    assert got == expected


def test_a_phantom_models_steps_are_brought_within_the_server_cap():
    model = model_with({"mode": "phantom", "steps": 40, "damping": 0.5})
    got = _backward(
        pb.TrainConfig(gradient_mode=pb.GRADIENT_MODE_PHANTOM), model, ServerConfig(max_iter_cap=7)
    )
    assert got == Phantom(steps=7, damping=0.5)


def sgd_step(source: DEQModel, x: torch.Tensor, y: torch.Tensor, backward, lr: float) -> dict:
    """The weights after one plain SGD step on the MSE loss, computed here (float64)."""
    model = DEQModel.from_config(source.config).double()
    model.load_state_dict(source.state_dict())
    out, _ = model.train()(x, backward=backward)
    grads = torch.autograd.grad(torch.nn.functional.mse_loss(out, y), list(model.parameters()))
    return {
        name: (p - lr * g).detach()
        for (name, p), g in zip(model.named_parameters(), grads, strict=True)
    }


def f64(a: np.ndarray) -> pb.Tensor:
    return pb.Tensor(
        dtype=pb.DATA_TYPE_FLOAT64, shape=list(a.shape), data=a.astype("<f8").tobytes()
    )


def test_a_phantom_train_step_uses_the_models_steps_and_damping(tmp_path, gen):
    """One SGD step through a real float64 server equals the step with the model's configured
    Phantom(3, 0.5), and not the one with the class defaults (exact to rounding)."""
    reference = model_with(PHANTOM)
    save_checkpoint(reference, tmp_path / "ph.safetensors")
    x = torch.randn(6, 5, dtype=torch.float64, generator=gen)
    y = torch.randn(6, 3, dtype=torch.float64, generator=gen)
    lr = 0.5
    with (
        running_server(model_dir=tmp_path, dtype="float64") as server,
        channel_to(server) as channel,
    ):
        stub = deq_pb2_grpc.DEQServiceStub(channel)
        config = pb.TrainConfig(
            model="ph",
            optimizer=pb.OPTIMIZER_SGD,
            learning_rate=lr,
            loss=pb.LOSS_MSE,
            gradient_mode=pb.GRADIENT_MODE_PHANTOM,
        )
        batch = pb.TrainBatch(inputs=f64(x.numpy()), targets=f64(y.numpy()))
        events = list(
            stub.Train(
                iter([pb.TrainRequest(config=config), pb.TrainRequest(batch=batch)]), timeout=120
            )
        )
    assert events[-1].committed.version == "2"
    trained = load_checkpoint(tmp_path / "ph" / "2.safetensors").double()
    got = dict(trained.named_parameters())
    configured = sgd_step(reference, x, y, Phantom(steps=3, damping=0.5), lr)
    defaults = sgd_step(reference, x, y, Phantom(), lr)
    for name, want in configured.items():
        torch.testing.assert_close(got[name].detach(), want, rtol=1e-10, atol=1e-12)
    assert any(not torch.allclose(configured[n], defaults[n], rtol=1e-6) for n in configured)
