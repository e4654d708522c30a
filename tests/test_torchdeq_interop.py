"""DEQs trained with torchdeq, exported with `export_deq`, served and fine-tuned by deq-serve.

The examples' own pieces (examples/from_torchdeq.py, examples/mdeq_conv.py) run here with tiny
settings: a LayerNorm two-layer cell and an MDEQ-style two-branch conv cell, trained a few steps
with torchdeq 0.1.0, exported as `.pt2` packages. The claims: the package (in process and behind a
real server on 127.0.0.1) answers what the eager modules' solve answers; implicit gradients through
the exported programs equal those through the eager modules (deq_server's and torchdeq's IFT);
a Train stream on the package commits `<name>/2.pt2` holding exactly the session's final weights;
tritonclient (OIP) gets the conv model's in-process answers.
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from serving_harness import running_server
from torch import Tensor, nn

from deq_client import DEQClient
from deq_client.pb.deq.v1 import deq_pb2 as pb
from deq_server.core import IFT, DEQModel, Status, load_checkpoint, solve
from deq_server.serving import training

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
import from_torchdeq
import mdeq_conv

NAME = "digits_ln"
SOLVE = {"tol": 1e-6, "max_iter": 200, "method": "anderson", "stop_mode": "rel"}


@pytest.fixture(scope="module")
def split() -> from_torchdeq.Split:
    return from_torchdeq.load_split()


@pytest.fixture(scope="module")
def digits(split, tmp_path_factory):
    """The LayerNorm-cell DEQ, 12 torchdeq IFT steps, exported as `<dir>/digits_ln.pt2`."""
    torch.manual_seed(0)
    modules = from_torchdeq.build_modules(hidden=32, width=64, seed=0)
    losses = from_torchdeq.train(modules, split.x_train, split.y_train, max_steps=12, lr=1e-2)
    assert np.mean(losses[-3:]) < np.mean(losses[:3])  # torchdeq's training did train it
    path = tmp_path_factory.mktemp("models") / f"{NAME}.pt2"
    from_torchdeq.export(modules, path, split.x_train[:4])
    return modules.eval(), path


def core_solve(modules: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """The eager modules' fixed point by deq_server.core.solve: (head(z*), status)."""
    with torch.no_grad():
        u = modules.inject(x)
        result = solve(modules.cell, torch.zeros_like(u), args=(u,), **SOLVE)
        return modules.head(result.z), result.status


def close(a: object, b: object, atol: float) -> float:
    """Max |a - b| (returned), asserted <= atol."""
    diff = float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())
    assert diff <= atol, f"max |diff| {diff:.3e} > {atol:g}"
    return diff


def test_package_and_server_answer_the_eager_modules_solve(digits, split):
    modules, path = digits
    x = split.x_test
    reference, info = from_torchdeq.torchdeq_solve(modules, x, tol=1e-6, max_iter=200)
    assert float(info["rel_lowest"].max()) <= 1e-6  # torchdeq's solve reached the tolerance
    eager, eager_status = core_solve(modules, x)
    assert bool((eager_status == Status.CONVERGED).all())

    loaded = load_checkpoint(path).eval()
    z = torch.randn(5, 32)
    with torch.no_grad():
        u = modules.inject(x[:5])
        close(loaded.cell(z, u), modules.cell(z, u), 1e-6)  # one step of the exported program
        package, result = loaded(x, **SOLVE)
    assert bool(result.converged.all())
    close(package, eager, 1e-5)
    close(package, reference, 1e-5)

    with running_server(model_dir=path.parent) as server:
        served = from_torchdeq.infer_served(server.port, NAME, x, **SOLVE)
    assert served.model_version == "1"
    assert served.status_names == ["CONVERGED"] * len(x)
    assert float(served.residual.max()) <= 1e-6
    close(served.output, eager, 1e-5)
    close(served.output, reference, 1e-5)
    # The same decisions too: the trained model is not a constant.
    labels = reference.argmax(1)
    assert np.array_equal(served.output.argmax(1), labels.numpy())
    assert len(set(labels.tolist())) >= 5


class EagerLayer(nn.Module):
    """The eager modules as a `DEQModel` layer (the `Layer` protocol), shapes given."""

    def __init__(self, modules: nn.Module, input_shape, state_shape, output_shape) -> None:
        super().__init__()
        self.parts = modules
        self.input_shape = tuple(input_shape)
        self.state_shape = tuple(state_shape)
        self.output_shape = tuple(output_shape)

    def inject(self, x: Tensor) -> Tensor:
        return self.parts.inject(x)

    def cell(self, z: Tensor, u: Tensor) -> Tensor:
        return self.parts.cell(z, u)

    def head(self, z: Tensor) -> Tensor:
        return self.parts.head(z)


def gradients(model: nn.Module, loss: Tensor, rename) -> dict[str, Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {rename(n): p.grad.clone() for n, p in model.named_parameters()}


def exported_name(name: str) -> str:
    # "layer.cell_program.W1.weight" -> "cell.W1.weight"; "layer.head_program.bias" -> "head.bias"
    program, _, rest = name.removeprefix("layer.").partition(".")
    return f"{program.removesuffix('_program')}.{rest}"


def test_implicit_gradients_through_the_exported_cell_equal_the_eager_cells(digits, split):
    modules, path = digits
    x, y = split.x_test[:24].double(), split.y_test[:24]
    tight = {"tol": 1e-12, "max_iter": 300, "method": "anderson", "stop_mode": "rel"}
    backward = IFT(tol=1e-12, max_iter=300)

    exported = load_checkpoint(path).double().train()
    out_e, res_e = exported(x, backward=backward, **tight)
    grads_e = gradients(exported, F.cross_entropy(out_e, y), exported_name)
    assert bool(res_e.converged.all())
    assert bool(res_e.backward.converged.all())

    eager_parts = copy.deepcopy(modules).double()
    eager = DEQModel({"cell": "eager"}, layer=EagerLayer(eager_parts, (64,), (32,), (10,))).train()
    out_m, res_m = eager(x, backward=backward, **tight)
    grads_m = gradients(eager, F.cross_entropy(out_m, y), lambda n: n.removeprefix("layer.parts."))
    assert bool(res_m.backward.converged.all())

    # torchdeq's own implicit backward (its IFTGrad autograd.Function), float64, tight solves.
    torchdeq_parts = copy.deepcopy(modules).double().train()
    deq = from_torchdeq.torchdeq_layer(f_tol=1e-12, f_max_iter=300, b_tol=1e-12, b_max_iter=300)
    out_t, info = from_torchdeq.torchdeq_forward(torchdeq_parts, deq.train(), x)
    grads_t = gradients(torchdeq_parts, F.cross_entropy(out_t, y), lambda n: n)
    assert float(info["rel_lowest"].max()) <= 1e-11

    names = sorted(n for n, _ in modules.named_parameters())
    assert sorted(grads_e) == sorted(grads_m) == sorted(grads_t) == names
    close(out_e.detach(), out_t.detach(), 1e-9)
    for name in names:
        assert float(grads_m[name].abs().max()) > 1e-4, name  # every parameter gets a gradient
        close(grads_e[name], grads_m[name], 1e-6)
        close(grads_e[name], grads_t[name], 1e-6)


def shifted_batches(split, n: int, size: int = 64):
    """A new task for the exported model: predict (digit + 1) mod 10. Its loss starts high."""
    gen = torch.Generator().manual_seed(1)
    for _ in range(n):
        idx = torch.randperm(len(split.x_train), generator=gen)[:size]
        yield split.x_train[idx].numpy(), ((split.y_train[idx] + 1) % 10).numpy()


@pytest.mark.slow
def test_train_stream_commits_a_pt2_version_holding_the_sessions_final_weights(
    digits, split, tmp_path, monkeypatch
):
    _, path = digits
    shutil.copy(path, tmp_path / f"{NAME}.pt2")
    final: dict[str, DEQModel] = {}
    commit = training.TrainSession.commit

    def capturing_commit(self, version):
        final["model"] = copy.deepcopy(self.model)  # the session's weights as they are at commit
        return commit(self, version)

    monkeypatch.setattr(training.TrainSession, "commit", capturing_commit)
    config = {
        "loss": "cross_entropy",
        "optimizer": "adam",
        "learning_rate": 2e-2,
        "gradient_mode": "ift",
        "backward_tol": 1e-6,
        "backward_max_iter": 100,
        "tol": 1e-5,
        "max_iter": 100,
    }
    x = split.x_test[:64]
    with (
        running_server(model_dir=tmp_path) as server,
        DEQClient(f"127.0.0.1:{server.port}", timeout=120) as client,
    ):
        events = list(client.train(NAME, shifted_batches(split, 20), config))
        served = client.infer(NAME, x.numpy(), **SOLVE)
        first = client.infer(NAME, x.numpy(), version="1", **SOLVE)

    steps, committed = events[:-1], events[-1]
    assert [e.kind for e in steps] == ["step"] * 20
    assert not any(e.skipped for e in steps)
    losses = [e.loss for e in steps]
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])
    assert max(e.backward_iterations_max for e in steps) >= 1
    assert (committed.kind, committed.model, committed.version, committed.steps) == (
        "committed",
        NAME,
        "2",
        20,
    )
    saved = tmp_path / NAME / "2.pt2"
    assert saved.is_file()

    # The committed file holds exactly the session's final weights, and reloads the same twice.
    session = final["model"].eval()
    a, b = load_checkpoint(saved).eval(), load_checkpoint(saved).eval()
    assert a.provenance["user.steps"] == "20"
    state = session.state_dict()
    assert list(a.state_dict()) == list(state)
    for key, value in a.state_dict().items():
        assert torch.equal(value, state[key]), key
        assert torch.equal(value, b.state_dict()[key]), key
    with torch.no_grad():
        y_a, res_a = a(x, **SOLVE)
        y_b, _ = b(x, **SOLVE)
        y_s, res_s = session(x, **SOLVE)
    assert torch.equal(y_a, y_b)
    assert torch.equal(y_a, y_s)
    assert torch.equal(res_a.iterations, res_s.iterations)

    # Version 2 serves the committed weights; version 1 still serves the original ones.
    assert served.model_version == "2"
    assert first.model_version == "1"
    assert served.status_names == ["CONVERGED"] * len(x)
    close(served.output, y_a, 1e-5)
    with torch.no_grad():
        original, _ = load_checkpoint(path).eval()(x, **SOLVE)
    close(first.output, original, 1e-5)
    assert float(np.abs(served.output - original.numpy()).max()) > 0.1  # training moved it
    shifted = (split.y_test[:64] + 1) % 10
    assert from_torchdeq.accuracy(served.output, shifted) > from_torchdeq.accuracy(
        first.output, shifted
    )


def test_train_commit_of_a_head_whose_input_is_named_input(digits, split, tmp_path):
    modules, _ = digits
    plain = copy.deepcopy(modules)
    plain.head = plain.head.lin  # a bare nn.Linear: its program's input is named 'input'
    from_torchdeq.export(plain, tmp_path / "plain.pt2", split.x_train[:4])
    batches = list(shifted_batches(split, 2))
    config = {"loss": "cross_entropy", "learning_rate": 1e-3}
    with (
        running_server(model_dir=tmp_path) as server,
        DEQClient(f"127.0.0.1:{server.port}", timeout=120) as client,
    ):
        events = list(client.train("plain", batches, config))
    assert (events[-1].kind, events[-1].version) == ("committed", "2")
    assert (tmp_path / "plain" / "2.pt2").is_file()


TRITON_PROBE = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import tritonclient.grpc as triton

    port, name, data = sys.argv[1], sys.argv[2], sys.argv[3]
    x = np.load(data)
    client = triton.InferenceServerClient(url=f"127.0.0.1:{port}")
    inp = triton.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    params = {"tol": 1e-6, "max_iter": 200, "method": "anderson", "stop_mode": "rel"}
    result = client.infer(name, [inp], parameters=params)
    print(json.dumps({
        "ready": client.is_model_ready(name),
        "metadata": client.get_model_metadata(name, as_json=True),
        "output": result.as_numpy("output").tolist(),
        "status": result.as_numpy("status").tolist(),
        "residual": result.as_numpy("residual").tolist(),
    }))
    client.close()
    """
)


@pytest.mark.slow
def test_conv_example_over_oip_with_tritonclient_answers_like_the_in_process_model(tmp_path):
    split = from_torchdeq.load_split((1, 8, 8))
    modules = mdeq_conv.build_modules(c1=4, c2=8, groups=2, seed=0)
    from_torchdeq.train(modules, split.x_train, split.y_train, max_steps=4, lr=1e-2)
    path = tmp_path / "digits_mdeq.pt2"
    mdeq_conv.export(modules, path, split.x_train[:4])
    local = load_checkpoint(path).eval()
    assert local.input_shape == (1, 8, 8)
    assert local.state_shape == (4 * 64 + 8 * 16,)

    x = split.x_test[:48]
    with torch.no_grad():
        expected, result = local(x, **SOLVE)
    assert bool(result.converged.all())
    eager, _ = core_solve(modules.eval(), x)
    close(expected, eager, 1e-5)

    data = tmp_path / "x.npy"
    np.save(data, x.numpy())
    with running_server(model_dir=tmp_path) as server:
        out = subprocess.run(
            [sys.executable, "-c", TRITON_PROBE, str(server.port), "digits_mdeq", str(data)],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout)
    assert seen["ready"]
    assert seen["metadata"]["inputs"][0]["shape"] == ["-1", "1", "8", "8"]
    assert seen["metadata"]["outputs"][0]["shape"] == ["-1", "10"]
    assert seen["status"] == [pb.SAMPLE_STATUS_CONVERGED] * len(x)
    assert max(seen["residual"]) <= 1e-6
    close(seen["output"], expected, 1e-5)
