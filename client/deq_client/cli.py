"""`deqctl`: the deq-serve command line (models, infer, train, load, unload, health) over the SDK.

The target and token come from `--target` / `--token` or DEQ_TARGET / DEQ_TOKEN. Results are
printed as JSON lines, so scripts can read them; `infer --output y.npy` also saves the output.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from typing import Any

import numpy as np

from deq_client._errors import DEQError
from deq_client.client import DEQClient
from deq_client.wire import METHODS, STOP_MODES


def _client(args: argparse.Namespace) -> DEQClient:
    return DEQClient(args.target, token=args.token or None, timeout=args.timeout)


def _print(obj: Any) -> None:
    print(json.dumps(obj, default=lambda o: o.tolist() if isinstance(o, np.ndarray) else str(o)))


def cmd_models(args: argparse.Namespace) -> None:
    with _client(args) as client:
        for info in client.list_models():
            _print(asdict(info))


def cmd_health(args: argparse.Namespace) -> None:
    with _client(args) as client:
        _print({"service": args.service, "status": client.health(args.service)})


def cmd_load(args: argparse.Namespace) -> None:
    with _client(args) as client:
        _print(asdict(client.load_model(args.name, args.path)))


def cmd_unload(args: argparse.Namespace) -> None:
    with _client(args) as client:
        client.unload_model(args.name)
    _print({"unloaded": args.name})


def _version() -> str:
    try:
        return importlib.metadata.version("deq-serve")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree, not installed
        return "unknown"


def cmd_infer(args: argparse.Namespace) -> None:
    x = np.load(args.input)
    solver = {
        "version": args.model_version,
        "tol": args.tol,
        "max_iter": args.max_iter,
        "method": args.method,
        "stop_mode": args.stop_mode,
    }
    with _client(args) as client:
        result = client.infer(args.model, x, **{k: v for k, v in solver.items() if v is not None})
    if args.output:
        np.save(args.output, result.output)
    _print(
        {
            "model_version": result.model_version,
            "iterations": result.iterations,
            "residual": result.residual,
            "status": result.status_names,
            "output": None if args.output else result.output,
        }
    )


def _batches(
    inputs: np.ndarray, targets: np.ndarray, size: int, epochs: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    for _ in range(epochs):
        for start in range(0, len(inputs), size):
            yield inputs[start : start + size], targets[start : start + size]


def cmd_train(args: argparse.Namespace) -> None:
    inputs, targets = np.load(args.inputs), np.load(args.targets)
    if len(inputs) != len(targets):
        raise SystemExit(f"--inputs has {len(inputs)} rows but --targets has {len(targets)}")
    config: dict[str, Any] = {
        "loss": args.loss,
        "learning_rate": args.lr,
        "optimizer": args.optimizer,
    }
    if args.publish_as:
        config["publish_as"] = args.publish_as
    with _client(args) as client:
        batches = _batches(inputs, targets, args.batch_size, args.epochs)
        for event in client.train(args.model, batches, config, progress=args.progress):
            _print({k: v for k, v in asdict(event).items() if v is not None})


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="deqctl", description="Talk to a deq-serve server.")
    p.add_argument(
        "--target",
        default=os.environ.get("DEQ_TARGET", "127.0.0.1:50051"),
        help="HOST:PORT of the server (env DEQ_TARGET)",
    )
    p.add_argument(
        "--token", default=os.environ.get("DEQ_TOKEN"), help="bearer token (env DEQ_TOKEN)"
    )
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per call")
    p.add_argument("--version", action="version", version=f"deqctl {_version()}")
    sub = p.add_subparsers(dest="command", required=True)

    sub.add_parser("models", help="list the served models").set_defaults(run=cmd_models)
    health = sub.add_parser("health", help="gRPC health of the server or one service")
    health.add_argument("--service", default="")
    health.set_defaults(run=cmd_health)

    infer = sub.add_parser("infer", help="solve a batch from a .npy file")
    infer.add_argument("--model", required=True)
    infer.add_argument(
        "--version", dest="model_version", help="a published version to pin (default: latest)"
    )
    infer.add_argument("--input", required=True, help=".npy file, batch first")
    infer.add_argument("--output", help="save the output here (.npy) instead of printing it")
    infer.add_argument("--tol", type=float)
    infer.add_argument("--max-iter", type=int)
    infer.add_argument("--method", choices=list(METHODS))
    infer.add_argument("--stop-mode", choices=list(STOP_MODES))
    infer.set_defaults(run=cmd_infer)

    load = sub.add_parser("load", help="serve a checkpoint of the server's model directory (admin)")
    load.add_argument("--name", required=True, help="serve it as this model")
    load.add_argument("--path", required=True, help="relative to the server's --model-dir")
    load.set_defaults(run=cmd_load)
    unload = sub.add_parser("unload", help="stop serving a model; its files stay (admin)")
    unload.add_argument("--name", required=True)
    unload.set_defaults(run=cmd_unload)

    train = sub.add_parser(
        "train", help="fine-tune a served model on .npy data; commits at the end"
    )
    train.add_argument("--model", required=True)
    train.add_argument("--inputs", required=True, help=".npy inputs, batch first")
    train.add_argument("--targets", required=True, help=".npy targets (int classes or floats)")
    train.add_argument("--loss", choices=["mse", "cross_entropy"], required=True)
    train.add_argument("--optimizer", choices=["adam", "adamw", "sgd"], default="adam")
    train.add_argument("--lr", type=float, default=1e-3)
    train.add_argument("--batch-size", type=int, default=64)
    train.add_argument("--epochs", type=int, default=1)
    train.add_argument("--publish-as", help="publish under this name instead of the next version")
    train.add_argument("--progress", action="store_true", help="show a progress bar on stderr")
    train.set_defaults(run=cmd_train)
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = parser().parse_args(argv)
    try:
        args.run(args)
    except DEQError as exc:  # the server's refusals and the SDK's (a bad tol, wrong labels)
        print(f"deqctl: {exc}", file=sys.stderr)
        raise SystemExit(1) from exc
    except OSError as exc:  # a missing or unreadable file
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"deqctl: error: {where}{exc.strerror or exc}", file=sys.stderr)
        raise SystemExit(1) from exc
    except ValueError as exc:  # e.g. a file that is not a .npy array
        print(f"deqctl: error: {exc}", file=sys.stderr)
        raise SystemExit(1) from exc


if __name__ == "__main__":
    main()
