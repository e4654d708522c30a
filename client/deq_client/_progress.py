"""Training progress for ``train(..., progress=True)``: a tqdm bar when tqdm is importable (it is not
a dependency), else one plain line per event on stderr."""

from __future__ import annotations

import importlib
import sys
from typing import Any

from deq_client._results import TrainEvent


def _describe(event: TrainEvent) -> str:
    if event.kind == "committed":
        return f"committed {event.model} version {event.version} after {event.steps} steps"
    if event.skipped:
        return f"step {event.step} skipped: {event.skip_reason}"
    return (
        f"step {event.step} loss {event.loss:.6g} grad_norm {event.grad_norm:.3g} "
        f"forward_iterations {event.forward_iterations_mean:.1f}"
    )


class Progress:
    """Reports each ``TrainEvent``; does nothing when ``enabled`` is false."""

    def __init__(self, enabled: bool, total: int | None = None) -> None:
        self._enabled = enabled
        self._bar: Any = None
        if enabled:
            try:
                tqdm = importlib.import_module("tqdm.auto").tqdm
            except ImportError:
                return
            self._bar = tqdm(total=total, unit="step", desc="train")

    def update(self, event: TrainEvent) -> None:
        """Reports one event."""
        if not self._enabled:
            return
        if self._bar is None:
            sys.stderr.write(_describe(event) + "\n")
        elif event.kind == "step":
            self._bar.update(1)
            if not event.skipped:
                self._bar.set_postfix(loss=f"{event.loss:.4g}", refresh=False)
        else:
            self._bar.write(_describe(event))

    def close(self) -> None:
        """Closes the bar, if any."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
