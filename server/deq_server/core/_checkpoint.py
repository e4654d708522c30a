"""Checkpoints: one `.safetensors` file holding the weights, the model config and provenance.

Metadata (all strings, as safetensors requires): `deq_format_version`, `config` (JSON),
`architecture`, `solver` (JSON), `created_at` (UTC ISO 8601), `parent` (the checkpoint this one
was fine-tuned from, or ""), any caller-supplied `user.*` keys, and `sha256` over the tensors and
every other metadata entry (safetensors itself checks no content: a flipped bit in the weights or
in the config would otherwise load as a different model). Saving is atomic; loading validates everything and names what
is wrong. No pickle ever runs: a `.pt` file is read only with `torch.load(weights_only=True)`.
"""

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
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

from ._model import DEQModel

FORMAT_VERSION = 1
_REQUIRED_KEYS = ("deq_format_version", "config", "architecture", "created_at", "sha256")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be trusted: unreadable, corrupt, or not matching its config."""


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


def save_checkpoint(
    model: DEQModel,
    path: str | os.PathLike[str],
    metadata: dict[str, str] | None = None,
    *,
    parent: str = "",
) -> None:
    """Save `model` atomically to a `.safetensors` file with its config and provenance."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    config = model.config
    meta = {
        "deq_format_version": str(FORMAT_VERSION),
        "config": json.dumps(config, sort_keys=True),
        "architecture": str(config["cell"]),
        "solver": json.dumps(config["solver"], sort_keys=True),
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "parent": parent,
    }
    for key, value in (metadata or {}).items():
        if not isinstance(value, str):
            raise TypeError(f"metadata[{key!r}] must be a str, got {type(value).__name__}")
        meta[f"user.{key}"] = value
    meta["sha256"] = checkpoint_digest(tensors, meta)
    atomic_write(path, st_save(tensors, metadata=meta))


def _read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    data = path.read_bytes()
    if len(data) < 8:
        raise CheckpointError(f"{path}: truncated ({len(data)} bytes, no header)")
    header_len = int.from_bytes(data[:8], "little")
    if header_len > len(data) - 8:
        raise CheckpointError(
            f"{path}: truncated or corrupt: header claims {header_len} bytes, file has {len(data) - 8}"
        )
    try:
        header = json.loads(data[8 : 8 + header_len])
        tensors = st_load(data)
    except (SafetensorError, ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file: {exc}") from exc
    meta = header.get("__metadata__") or {}
    return tensors, meta


def _parse_meta(path: Path, meta: dict[str, str]) -> dict[str, Any]:
    missing = [k for k in _REQUIRED_KEYS if k not in meta]
    if missing:
        raise CheckpointError(f"{path}: metadata lacks {missing}; not a deq-serve checkpoint")
    if meta["deq_format_version"] != str(FORMAT_VERSION):
        raise CheckpointError(
            f"{path}: deq_format_version {meta['deq_format_version']!r} is not supported "
            f"(expected {FORMAT_VERSION})"
        )
    try:
        config = json.loads(meta["config"])
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: metadata 'config' is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: metadata 'config' must be a JSON object")
    return config


def _build(path: Path, config: dict[str, Any], tensors: dict[str, Tensor]) -> DEQModel:
    try:
        model = DEQModel.from_config(config)
    except (ValueError, TypeError, KeyError) as exc:
        raise CheckpointError(f"{path}: invalid model config: {exc}") from exc
    expected = model.state_dict()
    problems = [f"missing tensor {k!r}" for k in expected if k not in tensors]
    problems += [f"unexpected tensor {k!r}" for k in tensors if k not in expected]
    for name, ref in expected.items():
        got = tensors.get(name)
        if got is not None and got.shape != ref.shape:
            problems.append(
                f"tensor {name!r} has shape {tuple(got.shape)}, expected {tuple(ref.shape)}"
            )
        elif got is not None and not got.is_floating_point():
            problems.append(f"tensor {name!r} has dtype {got.dtype}, expected a floating dtype")
    if problems:
        raise CheckpointError(f"{path}: weights do not match the config: " + "; ".join(problems))
    dtypes = {t.dtype for t in tensors.values()}
    if len(dtypes) == 1:
        model = model.to(dtype=dtypes.pop())
    model.load_state_dict(tensors)
    return model


def load_checkpoint(
    path: str | os.PathLike[str], *, config: dict[str, Any] | None = None
) -> DEQModel:
    """Load and validate a checkpoint; `model.provenance` holds its metadata.

    `.safetensors` files carry their config. A `.pt` file is a plain state dict (or a dict with
    "config" and "state_dict") read with `torch.load(weights_only=True)`; pass `config` when the
    file holds none. Anything wrong raises `CheckpointError` naming the problem.
    """
    p = Path(path)
    if p.suffix == ".pt":
        return _load_pt(p, config)
    if p.suffix != ".safetensors":
        raise CheckpointError(f"{p}: unsupported checkpoint suffix {p.suffix!r}; use .safetensors")
    tensors, meta = _read_safetensors(p)
    parsed = _parse_meta(p, meta)
    if checkpoint_digest(tensors, meta) != meta["sha256"]:
        raise CheckpointError(f"{p}: weights or metadata do not match the sha256 (corrupted file)")
    model = _build(p, parsed, tensors)
    if meta["architecture"] != parsed.get("cell"):
        raise CheckpointError(
            f"{p}: metadata architecture {meta['architecture']!r} != config cell {parsed.get('cell')!r}"
        )
    if "solver" in meta and meta["solver"] != json.dumps(model.config["solver"], sort_keys=True):
        raise CheckpointError(f"{p}: metadata 'solver' does not match the config's solver")
    model.provenance = {"path": str(p), **meta}
    return model


def _load_pt(path: Path, config: dict[str, Any] | None) -> DEQModel:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise  # a missing or unreadable file is not a refused one
    except Exception as exc:  # weights_only refuses pickled code with UnpicklingError
        raise CheckpointError(f"{path}: refused: not a plain weights file ({exc})") from exc
    if isinstance(obj, dict) and "state_dict" in obj:
        config = obj.get("config", config)
        obj = obj["state_dict"]
    if config is None:
        raise CheckpointError(f"{path}: a .pt state dict carries no config; pass config=")
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: config must be a dict, got {type(config).__name__}")
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a dict of tensors")
    model = _build(path, config, obj)
    model.provenance = {"path": str(path), "config": json.dumps(config, sort_keys=True)}
    return model
