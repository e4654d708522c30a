"""Checkpoints bundled with the package, so a fresh install has a model to serve."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

DEMO_MODEL = "digits"


def bundled_checkpoints() -> dict[str, Path]:
    """Model name -> path of every `.safetensors` file shipped in this package."""
    folder = Path(str(resources.files(__name__)))
    return {p.stem: p for p in sorted(folder.glob("*.safetensors"))}
