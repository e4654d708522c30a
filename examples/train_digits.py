"""Train the bundled `digits` demo model: a DEQ-MLP on scikit-learn's 8x8 digits.

The model takes the 64 raw pixel values in [0, 16] (normalisation lives in the config through
`input_shift`/`input_scale`) and is trained with implicit (IFT) gradients. The script then sweeps
solver tolerances on the held-out split, writes the numbers as JSON, saves the checkpoint and
checks that the saved file reproduces the held-out accuracy.

    python examples/train_digits.py            # ~30 s on one CPU thread
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor

from deq_server.core import DEQModel, Status, load_checkpoint, save_checkpoint

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "examples" / "digits_results.json"
DEFAULT_MODEL = REPO / "server" / "deq_server" / "models" / "digits.safetensors"
SPLIT = "train_test_split(test_size=0.25, random_state=0, stratify=y)"
SWEEP_TOLS = (1e-2, 1e-4, 1e-6)
SWEEP_METHODS = ("anderson", "picard")
SWEEP_MAX_ITER = 200

Split = tuple[Tensor, Tensor, Tensor, Tensor]


def parse_args() -> argparse.Namespace:
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--hidden", type=int, default=64, help="state width (default 64)")
    p.add_argument("--max-norm", type=float, default=0.8, help="spectral cap on W (default 0.8)")
    p.add_argument(
        "--init-scale", type=float, default=2.0, help="initial ||W||_2 before the cap (default 2.0)"
    )
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-2, help="peak Adam learning rate")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results JSON path")
    p.add_argument("--out-model", type=Path, default=DEFAULT_MODEL, help="checkpoint path")
    return p.parse_args()


def load_split() -> Split:
    """The fixed stratified 75/25 split of load_digits as float32 raw pixels and int64 labels."""
    X, y = load_digits(return_X_y=True)
    X_tr, X_te, y_tr, y_te = train_test_split(X, y, test_size=0.25, random_state=0, stratify=y)
    pixels = [torch.as_tensor(a, dtype=torch.float32) for a in (X_tr, X_te)]
    labels = [torch.as_tensor(a, dtype=torch.int64) for a in (y_tr, y_te)]
    return pixels[0], labels[0], pixels[1], labels[1]


def build_config(hidden: int, max_norm: float, init_scale: float) -> dict[str, Any]:
    """The model config: raw pixels in [0, 16] map to [-1, 1]; W is spectrally capped."""
    return {
        "cell": "mlp",
        "in_features": 64,
        "hidden": hidden,
        "out_features": 10,
        "activation": "tanh",
        "input_shift": 8.0,
        "input_scale": 1 / 8,
        "norm": "spectral",
        "max_norm": max_norm,
        "init_scale": init_scale,
        "solver": {"method": "anderson", "tol": 1e-4, "max_iter": 50, "stop_mode": "rel"},
        "backward": {"mode": "ift", "tol": 1e-6, "max_iter": 100},
    }


def train(model: DEQModel, X: Tensor, y: Tensor, args: argparse.Namespace) -> dict[str, Any]:
    """Adam + cosine decay on cross-entropy through the implicit backward; returns statistics."""
    gen = torch.Generator().manual_seed(args.seed)
    steps_per_epoch = -(-len(X) // args.batch_size)
    total = args.epochs * steps_per_epoch
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    fwd_iters, bwd_iters, bwd_unconverged, steps = 0, 0, 0, 0
    model.train()
    for epoch in range(args.epochs):
        order = torch.randperm(len(X), generator=gen)
        loss_sum = 0.0
        for batch in order.split(args.batch_size):
            logits, result = model(X[batch])
            loss = F.cross_entropy(logits, y[batch])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            steps += 1
            loss_sum += float(loss.detach()) * len(batch)
            fwd_iters += int(result.iterations.sum())
            if result.backward is not None:
                bwd_iters += int(result.backward.iterations.sum())
                bwd_unconverged += int((~result.backward.converged).sum())
        if epoch % 5 == 4 or epoch == args.epochs - 1:
            print(f"epoch {epoch + 1:3d}  loss {loss_sum / len(X):.4f}")
    seen = args.epochs * len(X)
    return {
        "train_steps": steps,
        "mean_forward_iterations": fwd_iters / seen,
        "mean_backward_iterations": bwd_iters / seen,
        "backward_unconverged_samples": bwd_unconverged,
    }


@torch.no_grad()
def evaluate(model: DEQModel, X: Tensor, y: Tensor, **solver: Any) -> dict[str, Any]:
    """Accuracy and per-sample solver statistics in eval mode; `solver` overrides the defaults."""
    model.eval()
    logits, result = model(X, **solver)
    iters = result.iterations.to(torch.float64)
    return {
        "accuracy": float((logits.argmax(1) == y).double().mean()),
        "mean_iterations": float(iters.mean()),
        "max_iterations": int(result.iterations.max()),
        "converged": float((result.status == Status.CONVERGED).double().mean()),
    }


def sweep(model: DEQModel, X: Tensor, y: Tensor) -> list[dict[str, Any]]:
    """Evaluate every (method, tol) pair of the sweep at max_iter SWEEP_MAX_ITER, stop_mode rel."""
    rows = []
    for method in SWEEP_METHODS:
        for tol in SWEEP_TOLS:
            opts = {"method": method, "tol": tol, "max_iter": SWEEP_MAX_ITER, "stop_mode": "rel"}
            rows.append({"method": method, "tol": tol, **evaluate(model, X, y, **opts)})
    return rows


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The sweep as a markdown table."""
    lines = [
        "| method | tol | accuracy | mean iters | max iters | converged |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['tol']:.0e} | {r['accuracy']:.4f} | {r['mean_iterations']:.2f}"
            f" | {r['max_iterations']} | {r['converged']:.4f} |"
        )
    return "\n".join(lines)


def save(model: DEQModel, path: Path, seed: int, accuracy: float, steps: int) -> int:
    """Save the float32 checkpoint with provenance metadata; returns its size in bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {
        "dataset": "sklearn.datasets.load_digits (raw pixels 0..16)",
        "split": SPLIT,
        "seed": str(seed),
        "test_accuracy": f"{accuracy:.6f}",
        "train_steps": str(steps),
        "script": "examples/train_digits.py",
    }
    save_checkpoint(model.float(), path, metadata=metadata)
    path.chmod(0o644)  # the atomic save's temp file is created 0600; this file is package data
    return path.stat().st_size


def display_path(path: Path) -> str:
    """`path` relative to the repository when inside it, so the JSON does not hold /home paths."""
    resolved = path.resolve()
    return str(resolved.relative_to(REPO)) if resolved.is_relative_to(REPO) else str(path)


def verify(path: Path, X: Tensor, y: Tensor, expected: float) -> float:
    """Reload the checkpoint and check it reproduces the held-out accuracy exactly."""
    reloaded = evaluate(load_checkpoint(path), X, y)["accuracy"]
    if reloaded != expected:
        raise SystemExit(f"{path}: reloaded accuracy {reloaded} != trained {expected}")
    return reloaded


def main() -> None:
    """Train, sweep, save, verify, report."""
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    X_tr, y_tr, X_te, y_te = load_split()
    model = DEQModel.from_config(build_config(args.hidden, args.max_norm, args.init_scale))

    start = time.perf_counter()
    stats = train(model, X_tr, y_tr, args)
    train_seconds = time.perf_counter() - start

    default = evaluate(model, X_te, y_te)
    train_acc = evaluate(model, X_tr, y_tr)["accuracy"]
    rows = sweep(model, X_te, y_te)
    size = save(model, args.out_model, args.seed, default["accuracy"], stats["train_steps"])
    reloaded = verify(args.out_model, X_te, y_te, default["accuracy"])

    print(f"\ntrain {train_seconds:.1f} s, {stats['train_steps']} steps, train acc {train_acc:.4f}")
    print(f"held-out accuracy (default solver {model.config['solver']}): {default['accuracy']:.4f}")
    print(f"\n{markdown_table(rows)}\n")
    print(f"saved {args.out_model} ({size} bytes); reloaded accuracy {reloaded:.4f}")

    results = {
        "config": model.config,
        "split": SPLIT,
        "seed": args.seed,
        "train": {**stats, "seconds": round(train_seconds, 2), "accuracy": train_acc},
        "test_default": default,
        "sweep": rows,
        "checkpoint": {
            "path": display_path(args.out_model),
            "bytes": size,
            "reloaded_accuracy": reloaded,
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
