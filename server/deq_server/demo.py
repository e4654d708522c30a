"""The bundled `digits` model at three tolerances: `python -m deq_server.demo`.

Loads the packaged checkpoint and classifies the held-out quarter of scikit-learn's load_digits
(the split the model was trained without), reporting accuracy and per-sample solver iterations.
Needs scikit-learn (the `dev` extra).
"""

from __future__ import annotations

import argparse
import time

import torch

from deq_server.core import METHODS, DEQModel, Status, load_checkpoint
from deq_server.models import DEMO_MODEL, bundled_checkpoints

TOLERANCES = (1e-2, 1e-4, 1e-6)


def held_out_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed stratified 25% test split of load_digits: raw pixels in [0, 16], labels."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    _, x_test, _, y_test = train_test_split(
        data.data, data.target, test_size=0.25, random_state=0, stratify=data.target
    )
    return torch.tensor(x_test, dtype=torch.float32), torch.tensor(y_test)


def evaluate(
    model: DEQModel, x: torch.Tensor, y: torch.Tensor, **solver: object
) -> dict[str, float]:
    """Accuracy and solver statistics of one batched solve in eval mode."""
    start = time.perf_counter()
    with torch.no_grad():
        logits, result = model(x, **solver)
    seconds = time.perf_counter() - start
    return {
        "accuracy": (logits.argmax(dim=1) == y).double().mean().item(),
        "mean_iterations": result.iterations.double().mean().item(),
        "max_iterations": float(result.iterations.max()),
        "converged": (result.status == Status.CONVERGED).double().mean().item(),
        "ms": seconds * 1e3,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="anderson", choices=list(METHODS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = load_checkpoint(bundled_checkpoints()[DEMO_MODEL]).eval()
    x, y = held_out_digits()
    print(
        f"model {DEMO_MODEL!r}: {model.config['cell']} cell, hidden {model.state_shape[0]}, "
        f"{len(y)} held-out digits, method {args.method}"
    )
    print("| tol | accuracy | mean iterations | max iterations | converged | batch ms |")
    print("|---|---|---|---|---|---|")
    for tol in TOLERANCES:
        r = evaluate(model, x, y, tol=tol, max_iter=200, method=args.method, stop_mode="rel")
        print(
            f"| {tol:.0e} | {r['accuracy']:.4f} | {r['mean_iterations']:.2f} | "
            f"{r['max_iterations']:.0f} | {r['converged']:.3f} | {r['ms']:.1f} |"
        )


if __name__ == "__main__":
    main()
