"""Wire tensors <-> torch, validated before any allocation.

numpy has no bfloat16: as in the client SDK (`deq_client._tensor`), a bfloat16 tensor travels as
its 16-bit patterns (little-endian), which torch reinterprets as `torch.bfloat16` without
rounding. Every bfloat16 value is exactly a float32, so the cast to the serving dtype is exact.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from deq_client.pb.deq.v1 import deq_pb2 as pb

from .errors import invalid

_DTYPES: dict[int, tuple[np.dtype, torch.dtype]] = {
    pb.DATA_TYPE_FLOAT32: (np.dtype("<f4"), torch.float32),
    pb.DATA_TYPE_FLOAT64: (np.dtype("<f8"), torch.float64),
    pb.DATA_TYPE_FLOAT16: (np.dtype("<f2"), torch.float16),
    pb.DATA_TYPE_INT64: (np.dtype("<i8"), torch.int64),
    pb.DATA_TYPE_BFLOAT16: (np.dtype("<u2"), torch.bfloat16),  # the bit patterns
}
_TO_WIRE = {torch_dtype: code for code, (_, torch_dtype) in _DTYPES.items()}


def decode(t: pb.Tensor, field: str, *, max_elements: int) -> torch.Tensor:
    """The tensor in `t`, checked: known dtype, non-negative shape, byte count, element cap."""
    if t.dtype not in _DTYPES:
        names = sorted(pb.DataType.Name(c) for c in _DTYPES)
        raise invalid(
            f"{field}.dtype",
            f"one of {names}",
            pb.DataType.Name(t.dtype) if t.dtype in pb.DataType.values() else t.dtype,
        )
    shape = tuple(t.shape)
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
    np_dtype, _ = _DTYPES[t.dtype]
    if len(t.data) != count * np_dtype.itemsize:
        raise invalid(
            f"{field}.data",
            f"{count * np_dtype.itemsize} bytes for shape {list(shape)}",
            f"{len(t.data)} bytes",
        )
    array = np.frombuffer(t.data, dtype=np_dtype).reshape(shape)
    out = torch.from_numpy(array.astype(np_dtype.newbyteorder("="), copy=True))
    return out.view(torch.bfloat16) if t.dtype == pb.DATA_TYPE_BFLOAT16 else out


def encode(x: torch.Tensor) -> pb.Tensor:
    """A wire tensor from a torch tensor (moved to the CPU, little-endian row-major)."""
    x = x.detach().cpu().contiguous()
    if x.dtype not in _TO_WIRE:
        x = x.to(torch.float32)
    wire = _TO_WIRE[x.dtype]
    array = x.view(torch.uint16).numpy() if x.dtype == torch.bfloat16 else x.numpy()
    return pb.Tensor(
        dtype=wire,
        shape=list(array.shape),
        data=array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes(),
    )


def wire_dtype(dtype: torch.dtype) -> int:
    return _TO_WIRE.get(dtype, pb.DATA_TYPE_UNSPECIFIED)
