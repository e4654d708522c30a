"""Checkpoints: one `.safetensors` file holding the weights, the model config and provenance.

Metadata (all strings, as safetensors requires): `deq_format_version`, `config` (JSON),
`architecture`, `solver` (JSON), `created_at` (UTC ISO 8601), `parent` (the checkpoint this one
was fine-tuned from, or ""), any caller-supplied `user.*` keys, and `sha256` over the tensors and
every other metadata entry (safetensors itself checks no content: a flipped bit in the weights or
in the config would otherwise load as a different model). Saving is atomic; loading validates everything and names what
is wrong. No pickle ever runs: a `.pt` file is read only with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

from ._files import atomic_write, checkpoint_digest
from ._model import DEQModel
from ._package import ExportedLayer, PackageError, load_package, save_package
from ._package_scan import PackageRefusedError

FORMAT_VERSION = 1
SUFFIXES = (".safetensors", ".pt2")
# Checkpoint files above this size are refused before they are read (a server's
# --max-model-bytes can set it lower or higher).
DEFAULT_MAX_BYTES = 4 << 30
_REQUIRED_KEYS = ("deq_format_version", "config", "architecture", "created_at", "sha256")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be trusted: unreadable, corrupt, or not matching its config."""


def save_checkpoint(
    model: DEQModel,
    path: str | os.PathLike[str],
    metadata: dict[str, str] | None = None,
    *,
    parent: str = "",
) -> None:
    """Save `model` atomically with its config and provenance: a `.safetensors` file, or for an
    exported model (`.pt2` package or `export_deq`) a `.pt2` package of the same programs."""
    if isinstance(model.layer, ExportedLayer):
        if Path(path).suffix != ".pt2":
            raise ValueError(f"an exported model saves as a .pt2 package, not {path}")
        save_package(model, path, metadata, parent=parent)
        return
    if Path(path).suffix != ".safetensors":
        raise ValueError(f"a built-in or registered cell saves as .safetensors, not {path}")
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
    except (json.JSONDecodeError, RecursionError) as exc:
        raise CheckpointError(f"{path}: metadata 'config' is not valid JSON: {exc}") from None
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
    path: str | os.PathLike[str],
    *,
    config: dict[str, Any] | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> DEQModel:
    """Load and validate a checkpoint; `model.provenance` holds its metadata.

    `.safetensors` files carry their config (a built-in or registered cell); `.pt2` packages
    carry exported programs (see `export_deq`). A `.pt` file is a plain state dict (or a dict
    with "config" and "state_dict") read with `torch.load(weights_only=True)`; pass `config` when
    the file holds none. Anything wrong raises `CheckpointError` naming the problem.
    """
    p = Path(path)
    if p.suffix == ".pt":
        return _load_pt(p, config)
    if p.suffix == ".pt2":
        try:
            return load_package(p, max_bytes=max_bytes, parse_meta=_parse_meta)
        except (PackageError, PackageRefusedError) as exc:
            raise CheckpointError(f"{p}: refused: {exc}") from None
    if p.suffix != ".safetensors":
        raise CheckpointError(
            f"{p}: unsupported checkpoint suffix {p.suffix!r}; use .safetensors or .pt2"
        )
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
