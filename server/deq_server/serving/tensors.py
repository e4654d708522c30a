"""Wire tensors <-> torch, validated before any allocation.

The dtypes are `deq_client.wire.DTYPES`, the SDK's table; each is the torch dtype of the same
name, and travels as the little-endian bytes of its storage dtype. For bfloat16 those are its
16-bit patterns, which torch views as `torch.bfloat16` without rounding; every bfloat16 value is
exactly a float32, so the cast to the serving dtype is exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from deq_client.pb.deq.v1 import deq_pb2 as pb
from deq_client.wire import DTYPES, wire_values

from .errors import invalid

TORCH_DTYPES: dict[int, torch.dtype] = {code: getattr(torch, d.name) for code, d in DTYPES.items()}
"""Wire dtype -> torch dtype, by the wire table's names."""
# The torch dtype of each wire dtype's bytes: itself, except torch.uint16 for bfloat16.
_STORAGE: dict[int, torch.dtype] = {
    code: getattr(torch, d.storage.name) for code, d in DTYPES.items()
}
_TO_WIRE = {torch_dtype: code for code, torch_dtype in TORCH_DTYPES.items()}


@dataclass(frozen=True)
class WireTensor:
    """A tensor as a request carried it, whatever the protocol: a wire dtype code, a shape and
    the little-endian bytes (the OIP raw contents or a deq.v1 Tensor's data), unchecked."""

    dtype: int
    shape: tuple[int, ...]
    data: bytes

    @classmethod
    def of(cls, t: pb.Tensor) -> WireTensor:
        return cls(t.dtype, tuple(t.shape), t.data)


def _check(t: WireTensor, field: str, max_elements: int) -> None:
    """Known dtype, a non-negative batch-first shape, the element cap and the byte count."""
    if t.dtype not in DTYPES:
        names = sorted(pb.DataType.Name(c) for c in DTYPES)
        raise invalid(
            f"{field}.dtype",
            f"one of {names}",
            pb.DataType.Name(t.dtype) if t.dtype in pb.DataType.values() else t.dtype,
        )
    shape = t.shape
    if not 1 <= len(shape) <= 16 or any(not 0 <= d <= max_elements for d in shape):
        # each size capped too: [0, 2**40, 2**40] holds no element but no array can take it
        raise invalid(
            f"{field}.shape",
            f"a batch-first shape of 1..16 sizes in 0..{max_elements}",
            list(shape)[:17],
        )
    count = math.prod(shape)
    if count > max_elements:
        raise invalid(f"{field}.shape", f"at most {max_elements} elements", count)
    itemsize = DTYPES[t.dtype].storage.itemsize
    if len(t.data) != count * itemsize:
        raise invalid(
            f"{field}.data",
            f"{count * itemsize} bytes for shape {list(shape)}",
            f"{len(t.data)} bytes",
        )


def decode(t: pb.Tensor, field: str, *, max_elements: int) -> torch.Tensor:
    """The tensor in `t`, checked: known dtype, non-negative shape, byte count, element cap."""
    _check(WireTensor.of(t), field, max_elements)
    return to_torch(t)


def decode_array(t: WireTensor, field: str, *, max_elements: int) -> np.ndarray:
    """The values of `t` as a new native-endian numpy array (the SDK's decoding), checked as
    `decode` checks; bfloat16 widened to float32. No torch call: for the event loop."""
    _check(t, field, max_elements)
    return wire_values(t.data, t.dtype, t.shape)


def to_torch(t: pb.Tensor) -> torch.Tensor:
    """The values of `t`, unchecked: for tensors `decode` checked or this server encoded."""
    storage = DTYPES[t.dtype].storage
    array = np.frombuffer(t.data, dtype=storage).reshape(tuple(t.shape))
    native = torch.from_numpy(array.astype(storage.newbyteorder("="), copy=True))
    return native.view(TORCH_DTYPES[t.dtype])


def encode(x: torch.Tensor) -> pb.Tensor:
    """A wire tensor from a torch tensor (moved to the CPU, little-endian row-major)."""
    x = x.detach().cpu().contiguous()
    if x.dtype not in _TO_WIRE:
        x = x.to(torch.float32)
    code = _TO_WIRE[x.dtype]
    array = x.view(_STORAGE[code]).numpy()
    return pb.Tensor(
        dtype=code,
        shape=list(array.shape),
        data=array.astype(DTYPES[code].storage, copy=False).tobytes(),
    )


def wire_dtype(dtype: torch.dtype) -> int:
    """The wire dtype of a torch dtype; DATA_TYPE_UNSPECIFIED for one the wire lacks."""
    return _TO_WIRE.get(dtype, pb.DATA_TYPE_UNSPECIFIED)
