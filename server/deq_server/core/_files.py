"""File helpers shared by both checkpoint formats: content digests and atomic writes."""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor


def tensors_digest(tensors: dict[str, Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes of the tensors, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def checkpoint_digest(tensors: dict[str, Tensor], meta: dict[str, str]) -> str:
    """sha256 over the tensors and every metadata entry except `sha256` itself."""
    h = hashlib.sha256(tensors_digest(tensors).encode())
    for key in sorted(meta):
        if key != "sha256":
            h.update(f"\0{key}\0{meta[key]}".encode())
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike[str], data: bytes, mode: int = 0o644) -> None:
    """Write `data` to `path` so that a crash leaves either the old file or the new one.

    Temp file in the same folder (same filesystem), fsync, rename over the target, fsync folder.
    """
    target = Path(path)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)  # mkstemp creates 0600; checkpoints are read by other users too
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(target.parent)


FORMAT_VERSION = 1


def checkpoint_metadata(
    config: dict[str, Any], architecture: str, metadata: dict[str, str] | None, parent: str
) -> dict[str, str]:
    """The metadata both formats carry (all strings), before the digest is added."""
    meta = {
        "deq_format_version": str(FORMAT_VERSION),
        "config": json.dumps(config, sort_keys=True),
        "architecture": architecture,
        "solver": json.dumps(config["solver"], sort_keys=True),
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "parent": parent,
    }
    for key, value in (metadata or {}).items():
        if not isinstance(value, str):
            raise TypeError(f"metadata[{key!r}] must be a str, got {type(value).__name__}")
        meta[f"user.{key}"] = value
    return meta
