"""A DEQ trained with torchdeq, exported with `export_deq`, served by deq-serve.

The model is a DEQ on scikit-learn's 8x8 digits whose cell none of deq-serve's built-in cells
expresses: a LayerNorm around a two-layer update,

    u  = inject(x)                       = Linear(x / 8 - 1)
    z' = cell(z, u)                      = LayerNorm(u + W2 relu(W1 z + V u))
    y  = head(z*)                        = Linear(z*)

It is trained with torchdeq 0.1.0's own API (`torchdeq.get_deq`, its Anderson solver and its
implicit (IFT) or phantom backward), then written as one `.pt2` package of torch.export programs
with `deq_server.core.export_deq`, loaded back with `load_checkpoint`, and (with --serve) served
by a real deq-server on 127.0.0.1 and queried through the deq_client SDK. The script prints the
served outputs next to torchdeq's: the largest absolute difference of the logits and the accuracy
of each on the held-out split.

    python examples/from_torchdeq.py                    # train (~10 s on one core), export, load
    python examples/from_torchdeq.py --serve            # ... and infer through a real server
    python examples/from_torchdeq.py --grad phantom --epochs 3 --model-dir /tmp/models

The package lands in --model-dir as `<name>.pt2` (version 1 of `<name>`); serve it later with
`deq-server --model-dir DIR`. The pieces (`build_modules`, `train`, `torchdeq_solve`, `export`,
`serving`) are importable: tests/test_torchdeq_interop.py runs them with tiny settings.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor, nn
from torchdeq import get_deq

from deq_server.core import DEQModel, export_deq, load_checkpoint

NAME = "digits_ln"
SPLIT = "train_test_split(test_size=0.25, random_state=0, stratify=y)"
SOLVER = {"method": "anderson", "tol": 1e-4, "max_iter": 50, "stop_mode": "rel"}
BACKWARD = {"mode": "ift", "tol": 1e-6, "max_iter": 100}


@dataclass
class Split:
    """The fixed stratified 75/25 split of load_digits: raw pixels in [0, 16], int64 labels."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor


def load_split(sample_shape: tuple[int, ...] = (64,)) -> Split:
    """load_digits split as float32 tensors shaped (N, *sample_shape), e.g. (64,) or (1, 8, 8)."""
    X, y = load_digits(return_X_y=True)
    X_tr, X_te, y_tr, y_te = train_test_split(X, y, test_size=0.25, random_state=0, stratify=y)

    def pixels(a: np.ndarray) -> Tensor:
        return torch.as_tensor(a, dtype=torch.float32).reshape(len(a), *sample_shape)

    return Split(
        pixels(X_tr),
        torch.as_tensor(y_tr, dtype=torch.int64),
        pixels(X_te),
        torch.as_tensor(y_te, dtype=torch.int64),
    )


class Inject(nn.Module):
    """u = Linear(x / 8 - 1): raw pixels in [0, 16] to the state width."""

    def __init__(self, in_features: int, hidden: int) -> None:
        super().__init__()
        self.lin = nn.Linear(in_features, hidden)

    def forward(self, x: Tensor) -> Tensor:
        return self.lin(x / 8.0 - 1.0)


class LayerNormMLPCell(nn.Module):
    """z' = LayerNorm(u + W2 relu(W1 z + V u)): a two-layer update inside a LayerNorm."""

    def __init__(self, hidden: int, width: int) -> None:
        super().__init__()
        self.W1 = nn.Linear(hidden, width)
        self.V = nn.Linear(hidden, width, bias=False)
        self.W2 = nn.Linear(width, hidden)
        self.norm = nn.LayerNorm(hidden)
        with torch.no_grad():  # a small recurrent gain: the map starts well inside contraction
            self.W1.weight.mul_(0.5)

    def forward(self, z: Tensor, u: Tensor) -> Tensor:
        return self.norm(u + self.W2(torch.relu(self.W1(z) + self.V(u))))


class Head(nn.Module):
    """y = Linear(z*): the logits.

    A module of its own rather than a bare nn.Linear: the programs' input names come from the
    forward arguments, and nn.Linear's `input` (a Python builtin's name) is renamed by
    `copy.deepcopy` of the exported graph but not in its signature, which breaks a Train commit
    of the package (see test_train_commit_of_a_head_whose_input_is_named_input)."""

    def __init__(self, hidden: int, classes: int = 10) -> None:
        super().__init__()
        self.lin = nn.Linear(hidden, classes)

    def forward(self, z: Tensor) -> Tensor:
        return self.lin(z)


class DEQModules(nn.Module):
    """The three modules of a DEQ, `inject(x) -> u`, `cell(z, u) -> z'`, `head(z) -> y`, as one
    module so that their parameters have names (`cell.W1.weight`, ...) and one optimizer."""

    def __init__(self, inject: nn.Module, cell: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.inject = inject
        self.cell = cell
        self.head = head


def build_modules(hidden: int = 64, width: int = 128, seed: int = 0) -> DEQModules:
    """The digits DEQ: 64 raw pixels -> state of `hidden` -> 10 logits."""
    torch.manual_seed(seed)
    return DEQModules(Inject(64, hidden), LayerNormMLPCell(hidden, width), Head(hidden))


def torchdeq_layer(
    *,
    grad: str = "ift",
    f_tol: float = 1e-4,
    f_max_iter: int = 30,
    b_tol: float = 1e-6,
    b_max_iter: int = 50,
    phantom_steps: int = 5,
    phantom_tau: float = 0.8,
) -> nn.Module:
    """A torchdeq DEQ (`get_deq`, sliced core) with Anderson solvers, rel stop mode, and the
    implicit backward (`grad="ift"`) or a phantom gradient of `phantom_steps` damped steps."""
    kwargs: dict[str, Any] = (
        {"ift": True} if grad == "ift" else {"grad": phantom_steps, "tau": phantom_tau}
    )
    return get_deq(
        core="sliced",
        f_solver="anderson",
        b_solver="anderson",
        f_tol=f_tol,
        f_max_iter=f_max_iter,
        f_stop_mode="rel",
        b_tol=b_tol,
        b_max_iter=b_max_iter,
        b_stop_mode="rel",
        **kwargs,
    )


def torchdeq_forward(modules: DEQModules, deq: nn.Module, x: Tensor) -> tuple[Tensor, dict]:
    """head(z*) with z* solved by torchdeq from zeros; differentiable in training mode."""
    u = modules.inject(x)
    z_out, info = deq(lambda z: modules.cell(z, u), torch.zeros_like(u))
    return modules.head(z_out[-1]), info


@torch.no_grad()
def torchdeq_solve(
    modules: DEQModules, x: Tensor, *, tol: float = 1e-6, max_iter: int = 200
) -> tuple[Tensor, dict]:
    """The eager modules' fixed point by torchdeq's Anderson solver (eval mode, rel residual)."""
    deq = torchdeq_layer(f_tol=tol, f_max_iter=max_iter).eval()
    modules.eval()
    return torchdeq_forward(modules, deq, x)


def train(
    modules: DEQModules,
    x: Tensor,
    y: Tensor,
    *,
    epochs: int = 8,
    batch_size: int = 64,
    lr: float = 3e-3,
    grad: str = "ift",
    max_steps: int | None = None,
    seed: int = 0,
    log: bool = False,
) -> list[float]:
    """Adam on cross-entropy through torchdeq's solver and backward; returns per-step losses.

    `max_steps` stops early (tests train a few steps only)."""
    deq = torchdeq_layer(grad=grad).train()
    modules.train()
    opt = torch.optim.Adam(modules.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    for epoch in range(epochs):
        for batch in torch.randperm(len(x), generator=gen).split(batch_size):
            logits, info = torchdeq_forward(modules, deq, x[batch])
            loss = F.cross_entropy(logits, y[batch])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            if max_steps is not None and len(losses) >= max_steps:
                return losses
        if log:
            steps = float(info["nstep"].float().mean())
            print(
                f"epoch {epoch + 1:2d}  loss {np.mean(losses[-len(x) // batch_size :]):.4f}"
                f"  forward steps {steps:.1f}  rel residual {float(info['rel_lowest'].max()):.1e}"
            )
    return losses


def export(
    modules: DEQModules,
    path: str | Path,
    example_input: Tensor,
    metadata: dict[str, str] | None = None,
) -> DEQModel:
    """Write the modules as a `.pt2` package (eval mode) with this example's solver defaults."""
    return export_deq(
        path,
        inject=modules.inject,
        cell=modules.cell,
        head=modules.head,
        example_input=example_input,
        solver=SOLVER,
        backward=BACKWARD,
        metadata={"trained_with": "torchdeq 0.1.0", "split": SPLIT, **(metadata or {})},
    )


@contextmanager
def serving(model_dir: str | Path, threads: int = 1) -> Iterator[int]:
    """A real deq-server on 127.0.0.1 (a free port) serving `model_dir`, run on its own event
    loop thread; yields the port and stops the server (grace 0) on exit."""
    from deq_server.serving.app import start_server
    from deq_server.serving.config import ServerConfig

    config = replace(
        ServerConfig(),
        address="127.0.0.1:0",
        metrics_address="",
        model_dir=Path(model_dir),
        device="cpu",
        torch_threads=threads,
    )
    loop = asyncio.new_event_loop()
    started: list[Any] = []
    ready = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            started.append(loop.run_until_complete(start_server(config)))
        except BaseException as exc:
            started.append(exc)
            return
        finally:
            ready.set()
        loop.run_forever()

    thread = threading.Thread(target=run, name="deq-server", daemon=True)
    thread.start()
    ready.wait()
    if isinstance(started[0], BaseException):
        raise started[0]
    running = started[0]
    try:
        yield running.port
    finally:
        asyncio.run_coroutine_threadsafe(running.stop(0), loop).result()
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()


def infer_served(port: int, name: str, x: Tensor, **options: Any) -> Any:
    """The server's answer for `x` through the deq_client SDK (an `InferResult`)."""
    from deq_client import DEQClient

    with DEQClient(f"127.0.0.1:{port}", timeout=60) as client:
        return client.infer(name, x.numpy(), **options)


def accuracy(logits: Tensor | np.ndarray, y: Tensor) -> float:
    return float((torch.as_tensor(logits).argmax(1) == y).double().mean())


def report(
    split: Split, reference: Tensor, others: dict[str, Tensor | np.ndarray], ref_name: str
) -> None:
    """One line per output: accuracy on the held-out split and max |difference| to `reference`."""
    print(f"{'outputs':<28} {'test accuracy':>13}  {'max |diff| vs ' + ref_name:>24}")
    print(f"{ref_name:<28} {accuracy(reference, split.y_test):>13.4f}  {'-':>24}")
    for label, out in others.items():
        diff = float((torch.as_tensor(out).double() - reference.double()).abs().max())
        print(f"{label:<28} {accuracy(out, split.y_test):>13.4f}  {diff:>24.2e}")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--hidden", type=int, default=64, help="state width (default 64)")
    p.add_argument("--width", type=int, default=128, help="inner width of the update (128)")
    return add_common_flags(p, NAME).parse_args()


def add_common_flags(p: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    """Training, comparison and serving flags both examples share."""
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--grad", choices=["ift", "phantom"], default="ift", help="torchdeq backward")
    p.add_argument("--tol", type=float, default=1e-6, help="comparison solve tolerance (rel)")
    p.add_argument("--max-iter", type=int, default=200, help="comparison solve iteration cap")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--model-dir", type=Path, default=None, help="where <name>.pt2 goes")
    p.add_argument("--name", default=name, help=f"model name (default {name})")
    p.add_argument("--serve", action="store_true", help="serve it and infer through the SDK")
    return p


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    split = load_split()
    modules = build_modules(args.hidden, args.width, args.seed)
    run(modules, split, args, export, "examples/from_torchdeq.py")


def run(modules: Any, split: Split, args: argparse.Namespace, export_to: Any, script: str) -> None:
    """Train with torchdeq, export with `export_to(modules, path, example, metadata=)`, load the
    package back and compare (both examples' main)."""
    start = time.perf_counter()
    losses = train(
        modules,
        split.x_train,
        split.y_train,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        grad=args.grad,
        seed=args.seed,
        log=True,
    )
    print(f"trained {len(losses)} steps with torchdeq in {time.perf_counter() - start:.1f} s")

    model_dir = args.model_dir or Path(tempfile.mkdtemp(prefix="deq-models-"))
    model_dir.mkdir(parents=True, exist_ok=True)
    path = model_dir / f"{args.name}.pt2"
    start = time.perf_counter()
    export_to(modules, path, split.x_train[:8], metadata={"script": script})
    loaded = load_checkpoint(path).eval()
    print(
        f"exported {path} ({path.stat().st_size} bytes, state {list(loaded.state_shape)}) "
        f"in {time.perf_counter() - start:.1f} s"
    )
    compare(loaded, modules, split, args, model_dir)


def compare(
    loaded: DEQModel, modules: Any, split: Split, args: argparse.Namespace, model_dir: Path
) -> None:
    """Solve the held-out split with torchdeq, the loaded package and (--serve) a real server on
    it; print convergence, the differences and the accuracies side by side."""
    opts = {"tol": args.tol, "max_iter": args.max_iter, "method": "anderson", "stop_mode": "rel"}
    reference, info = torchdeq_solve(modules, split.x_test, tol=args.tol, max_iter=args.max_iter)
    with torch.no_grad():
        package, result = loaded(split.x_test, **opts)
    outputs: dict[str, Tensor | np.ndarray] = {"load_checkpoint(.pt2)": package}
    print(
        f"torchdeq solve: rel residual max {float(info['rel_lowest'].max()):.1e}; package solve: "
        f"{int(result.converged.sum())}/{len(result.converged)} converged, "
        f"mean {float(result.iterations.double().mean()):.1f} iterations"
    )
    if args.serve:
        with serving(model_dir, args.threads) as port:
            served = infer_served(port, args.name, split.x_test, **opts)
        print(
            f"served by 127.0.0.1:{port} as {args.name} v{served.model_version}: "
            f"{int(served.converged.sum())}/{len(served.status)} converged"
        )
        outputs[f"served v{served.model_version} (SDK)"] = served.output
        gap = float(np.abs(served.output - package.numpy()).max())
        print(f"served vs load_checkpoint(.pt2): max |diff| {gap:.2e}")
    report(split, reference, outputs, "torchdeq (eager modules)")


if __name__ == "__main__":
    main()
