"""Checkpoints: one `.safetensors` file holding the weights, the model config and provenance.

Metadata (all strings, as safetensors requires): `deq_format_version`, `config` (JSON),
`architecture`, `solver` (JSON), `created_at` (UTC ISO 8601), `parent` (the checkpoint this one
was fine-tuned from, or ""), any caller-supplied `user.*` keys, and `sha256` over the tensors and
every other metadata entry (safetensors itself checks no content: a flipped bit in the weights or
in the config would otherwise load as a different model). Saving is atomic; loading validates everything and names what
is wrong. No pickle ever runs: a `.pt` file is read only with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

from ._files import FORMAT_VERSION, atomic_write, checkpoint_digest, checkpoint_metadata
from ._model import DEQModel
from ._package import ExportedLayer, PackageError, load_package, save_package
from ._package_scan import PackageRefusedError, read_regular

CHECKPOINT_SUFFIXES = (".safetensors", ".pt2")
# Checkpoint files above this size are refused before they are read (a server's
# --max-model-bytes can set it lower or higher).
DEFAULT_MAX_BYTES = 4 << 30
# The largest batch a loaded package's costs are checked for (the server passes its own).
DEFAULT_MAX_ROWS = 1024
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
    meta = checkpoint_metadata(config, str(config["cell"]), metadata, parent)
    meta["sha256"] = checkpoint_digest(tensors, meta)
    atomic_write(path, st_save(tensors, metadata=meta))


# safetensors dtype -> (torch dtype name, bytes per element)
_ST_DTYPES = {
    "F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2),
    "BF16": ("bfloat16", 2), "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2),
    "I8": ("int8", 1), "U8": ("uint8", 1), "BOOL": ("bool", 1),
}  # fmt: skip
_FLOATING = {"float64", "float32", "float16", "bfloat16"}
MAX_HEADER_BYTES = 16 << 20
MAX_CONFIG_CHARS = 1 << 20


def _read(path: Path, max_bytes: int) -> bytes:
    try:
        return read_regular(path, max_bytes)
    except PackageRefusedError as exc:
        raise CheckpointError(f"{path}: refused: {exc}") from None


def _header(path: Path, data: bytes) -> dict[str, Any]:
    """The safetensors header, checked entry by entry against the file before anything is
    allocated: known dtypes, shapes of sane ints whose bytes match their (in-file) offsets."""
    if len(data) < 8:
        raise CheckpointError(f"{path}: truncated ({len(data)} bytes, no header)")
    header_len = int.from_bytes(data[:8], "little")
    if header_len > len(data) - 8 or header_len > MAX_HEADER_BYTES:
        raise CheckpointError(
            f"{path}: truncated or corrupt: header claims {header_len} bytes, file has {len(data) - 8}"
        )
    try:
        header = json.loads(data[8 : 8 + header_len])
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise CheckpointError(
            f"{path}: not a readable safetensors file: {str(exc)[:200]}"
        ) from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a readable safetensors file: header is not an object")
    body = len(data) - 8 - header_len
    for name, entry in header.items():
        if name == "__metadata__":
            if not isinstance(entry, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in entry.items()
            ):
                raise CheckpointError(f"{path}: __metadata__ must map strings to strings")
            continue
        problem = _entry_problem(entry, body)
        if problem:
            raise CheckpointError(
                f"{path}: not a readable safetensors file: tensor {name!r}: {problem}"
            )
    return header


def _entry_problem(entry: Any, body: int) -> str:
    if not isinstance(entry, dict):
        return "header entry is not an object"
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in _ST_DTYPES:
        return f"unsupported dtype {dtype!r}"
    if (
        not isinstance(shape, list)
        or len(shape) > 8
        or not all(isinstance(n, int) and not isinstance(n, bool) and 0 <= n < 2**40 for n in shape)
    ):
        return f"shape {str(shape)[:80]} is not a list of at most 8 sizes below 2**40"
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(n, int) and not isinstance(n, bool) for n in offsets)
        or not 0 <= offsets[0] <= offsets[1] <= body
    ):
        return f"data offsets {str(offsets)[:80]} do not lie in the file"
    if math.prod(shape) * _ST_DTYPES[dtype][1] != offsets[1] - offsets[0]:
        return f"shape {shape} of {dtype} does not match its {offsets[1] - offsets[0]} bytes"
    return ""


def _parse_meta(path: Path, meta: dict[str, str]) -> dict[str, Any]:
    missing = [k for k in _REQUIRED_KEYS if k not in meta]
    if missing:
        raise CheckpointError(f"{path}: metadata lacks {missing}; not a deq-serve checkpoint")
    if meta["deq_format_version"] != str(FORMAT_VERSION):
        raise CheckpointError(
            f"{path}: deq_format_version {meta['deq_format_version']!r} is not supported "
            f"(expected {FORMAT_VERSION})"
        )
    if len(meta["config"]) > MAX_CONFIG_CHARS:
        raise CheckpointError(f"{path}: metadata 'config' is over {MAX_CONFIG_CHARS} characters")
    try:
        config = json.loads(meta["config"])
    except (json.JSONDecodeError, RecursionError) as exc:
        raise CheckpointError(f"{path}: metadata 'config' is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: metadata 'config' must be a JSON object")
    return config


Spec = tuple[tuple[int, ...], str]  # a tensor's shape and dtype name


def _meta_model(path: Path, config: dict[str, Any], max_bytes: int) -> DEQModel:
    """The model built on the meta device (no memory): its tensor shapes and their bytes, which
    must be within `max_bytes` before the real one is allocated."""
    try:
        with torch.device("meta"):
            model = DEQModel.from_config(config)
    except Exception as exc:  # any failure to build from a config is the config's fault
        raise CheckpointError(f"{path}: invalid model config: {str(exc)[:300]}") from None
    total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    if total > max_bytes:
        raise CheckpointError(
            f"{path}: the config's weights take {total} bytes, above the cap of {max_bytes}"
        )
    return model


def _check_specs(path: Path, expected: dict[str, Spec], found: dict[str, Spec]) -> None:
    problems = [f"missing tensor {k!r}" for k in expected if k not in found]
    problems += [f"unexpected tensor {k!r}" for k in found if k not in expected]
    for name, (shape, _) in expected.items():
        got = found.get(name)
        if got is not None and got[0] != shape:
            problems.append(f"tensor {name!r} has shape {got[0]}, expected {shape}")
        elif got is not None and got[1] not in _FLOATING:
            problems.append(f"tensor {name!r} has dtype {got[1]}, expected a floating dtype")
    if problems:
        raise CheckpointError(f"{path}: weights do not match the config: " + "; ".join(problems))


def _build(
    path: Path, config: dict[str, Any], found: dict[str, Spec], max_bytes: int
) -> Callable[[dict[str, Tensor]], DEQModel]:
    """Check the tensors' shapes against the config without allocating; returns the step that
    builds the model and loads the (then read) tensors into it."""
    meta_model = _meta_model(path, config, max_bytes)
    expected = {k: (tuple(t.shape), "float32") for k, t in meta_model.state_dict().items()}
    _check_specs(path, expected, found)

    def load(tensors: dict[str, Tensor]) -> DEQModel:
        for name, t in tensors.items():
            if not bool(torch.isfinite(t).all()):
                raise CheckpointError(f"{path}: tensor {name!r} holds non-finite values")
        try:
            model = DEQModel.from_config(config)
            dtypes = {t.dtype for t in tensors.values()}
            if len(dtypes) == 1:
                model = model.to(dtype=dtypes.pop())
            model.load_state_dict(tensors)
        except Exception as exc:  # shapes matched on meta, so this is the config's fault
            raise CheckpointError(f"{path}: invalid model config: {str(exc)[:300]}") from None
        return model

    return load


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    config: dict[str, Any] | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_rows: int = DEFAULT_MAX_ROWS,
) -> DEQModel:
    """Load and validate a checkpoint; `model.provenance` holds its metadata.

    `.safetensors` files carry their config (a built-in or registered cell); `.pt2` packages
    carry exported programs (see `export_deq`). A `.pt` file is a plain state dict (or a dict
    with "config" and "state_dict") read with `torch.load(weights_only=True)`; pass `config` when
    the file holds none. A package's programs must hold at most `max_bytes` at once when
    called on `max_rows` rows (the largest batch the caller will give them). Anything wrong
    raises `CheckpointError` naming the problem.
    """
    p = Path(path)
    if p.suffix == ".pt":
        return _load_pt(p, config, max_bytes)
    if p.suffix == ".pt2":
        try:
            return load_package(p, max_bytes=max_bytes, max_rows=max_rows, parse_meta=_parse_meta)
        except (PackageError, PackageRefusedError) as exc:
            raise CheckpointError(f"{p}: refused: {exc}") from None
    if p.suffix != ".safetensors":
        raise CheckpointError(
            f"{p}: unsupported checkpoint suffix {p.suffix!r}; use .safetensors or .pt2"
        )
    data = _read(p, max_bytes)
    header = _header(p, data)
    meta = header.get("__metadata__") or {}
    parsed = _parse_meta(p, meta)
    found = {
        k: (tuple(v["shape"]), _ST_DTYPES[v["dtype"]][0])
        for k, v in header.items()
        if k != "__metadata__"
    }
    build = _build(p, parsed, found, max_bytes)
    try:
        tensors = st_load(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{p}: not a readable safetensors file: {str(exc)[:200]}") from None
    del data  # the tensors hold copies: the file's bytes need not stay while the model is built
    if checkpoint_digest(tensors, meta) != meta["sha256"]:
        raise CheckpointError(f"{p}: weights or metadata do not match the sha256 (corrupted file)")
    model = build(tensors)
    if meta["architecture"] != parsed.get("cell"):
        raise CheckpointError(
            f"{p}: metadata architecture {meta['architecture']!r} != config cell {parsed.get('cell')!r}"
        )
    if "solver" in meta and meta["solver"] != json.dumps(model.config["solver"], sort_keys=True):
        raise CheckpointError(f"{p}: metadata 'solver' does not match the config's solver")
    model.provenance = {"path": str(p), **meta}
    return model


def _load_pt(path: Path, config: dict[str, Any] | None, max_bytes: int) -> DEQModel:
    data = _read(path, max_bytes)
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
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
    found = {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in obj.items()}
    model = _build(path, config, found, max_bytes)(obj)
    model.provenance = {"path": str(path), "config": json.dumps(config, sort_keys=True)}
    return model
