"""numpy <-> ``deq.v1.Tensor``: dtype enum, shape, raw little-endian row-major bytes.

The dtypes and their wire bytes are ``deq_client.wire.DTYPES``, the table the server decodes with.

Encoding validates the value before any RPC; decoding checks ``len(data) == prod(shape) *
itemsize`` before it allocates anything. torch tensors are accepted by duck typing (anything with
``.detach().cpu().numpy()``), so this module never imports torch.

bfloat16 needs no extra dependency: its 16 bits are the upper half of a float32. It is encoded
from torch bfloat16 tensors and from numpy arrays whose dtype is named ``bfloat16`` (ml_dtypes),
and decoded to float32, which holds every bfloat16 value exactly.
"""

from __future__ import annotations

import math
from typing import Any, Protocol, TypeAlias

import numpy as np
import numpy.typing as npt

from deq_client._errors import InvalidArgumentError, MalformedResponseError
from deq_client.pb.deq.v1 import deq_pb2 as pb
from deq_client.wire import DTYPES, wire_values


class SupportsDetach(Protocol):
    """A torch-like tensor: ``.detach().cpu().numpy()`` gives its values."""

    def detach(self) -> Any:
        """Returns the tensor without its autograd history."""
        ...


TensorLike: TypeAlias = npt.ArrayLike | SupportsDetach
"""What the SDK accepts as a tensor: numpy arrays, nested sequences, scalars, torch tensors."""

_BY_NAME: dict[str, pb.DataType.ValueType] = {d.name: d.code for d in DTYPES.values()}
"""numpy dtype name -> wire dtype (``"bfloat16"`` is ml_dtypes' name)."""
_SUPPORTED = ", ".join(d.name for d in DTYPES.values())


def dtype_name(value: int) -> str:
    """The name of a wire dtype enum value, e.g. ``"float32"``; unknown values read ``"unknown(7)"``."""
    return DTYPES[value].name if value in DTYPES else f"unknown({value})"


def as_numpy(value: TensorLike, name: str = "tensor") -> tuple[npt.NDArray[Any], bool]:
    """Returns ``(array, is_bfloat16)``; torch bfloat16 tensors come back widened to float32."""
    detach = getattr(value, "detach", None)
    if callable(detach):
        tensor = detach().cpu()
        if str(getattr(tensor, "dtype", "")) == "torch.bfloat16":
            return np.asarray(tensor.float().numpy()), True
        array: npt.NDArray[Any] = np.asarray(tensor.numpy())
        return array, False
    try:
        array = np.asarray(value)
    except (TypeError, ValueError) as error:
        raise InvalidArgumentError(
            f"{name}: cannot be converted to a numpy array: {error}"
        ) from error
    return array, array.dtype.name == "bfloat16"


def bfloat16_bits(values: npt.NDArray[Any]) -> npt.NDArray[np.uint16]:
    """Rounds float values to bfloat16 (to nearest, ties to even) and returns the 16-bit patterns.

    NaNs stay NaN (quiet, sign kept) instead of rounding into infinity.
    """
    floats = np.ascontiguousarray(values, dtype=np.float32)
    bits = floats.view(np.uint32)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    nan = np.isnan(floats)
    quiet = ((bits >> np.uint32(16)) | np.uint32(0x0040)).astype(np.uint16)
    return np.where(nan, quiet, rounded.astype(np.uint16))


def to_proto(value: TensorLike, name: str = "tensor") -> pb.Tensor:
    """Encodes an array as a ``deq.v1.Tensor``; ``name`` is the field named in errors.

    Non-contiguous and big-endian arrays are converted; unsupported dtypes raise ``InvalidArgumentError`` (a
    ``DEQError`` and a ``ValueError``).
    """
    array, is_bfloat16 = as_numpy(value, name)
    if is_bfloat16:
        if array.dtype.name == "bfloat16":  # ml_dtypes: the bits are already bfloat16
            bits = np.ascontiguousarray(array).view(np.uint16)
        else:
            bits = bfloat16_bits(array)
        return pb.Tensor(
            dtype=pb.DATA_TYPE_BFLOAT16,
            shape=array.shape,
            data=bits.astype(DTYPES[pb.DATA_TYPE_BFLOAT16].storage).tobytes(order="C"),
        )
    wire = _BY_NAME.get(array.dtype.name)
    if wire is None:
        hint = " (cast with .astype(np.int64))" if array.dtype.kind in "iub" else ""
        raise InvalidArgumentError(
            f"{name}: dtype {array.dtype} is not supported{hint}; expected one of {_SUPPORTED}"
        )
    data = array.astype(DTYPES[wire].storage, copy=False).tobytes(order="C")
    return pb.Tensor(dtype=wire, shape=array.shape, data=data)


def from_proto(tensor: pb.Tensor, name: str = "tensor") -> npt.NDArray[Any]:
    """Decodes a ``deq.v1.Tensor`` to a writable native-endian array (bfloat16 -> float32).

    The byte count is checked against the shape and dtype before anything is allocated;
    a mismatch raises ``MalformedResponseError`` (a ``DEQError``, code INTERNAL, and a
    ``ValueError``) naming the field and both numbers.
    """
    if tensor.dtype not in DTYPES:
        raise MalformedResponseError(
            f"{name}.dtype: {dtype_name(tensor.dtype)} is not a tensor dtype; "
            f"expected one of {_SUPPORTED}"
        )
    storage = DTYPES[tensor.dtype].storage
    shape = tuple(int(d) for d in tensor.shape)
    if any(d < 0 for d in shape):
        raise MalformedResponseError(f"{name}.shape: dimensions must be >= 0, got {list(shape)}")
    count = math.prod(shape)
    expected = count * storage.itemsize
    data = tensor.data
    if len(data) != expected:
        raise MalformedResponseError(
            f"{name}.data: {len(data)} bytes, expected {expected} "
            f"(shape {list(shape)} x {storage.itemsize}-byte {dtype_name(tensor.dtype)})"
        )
    try:
        return wire_values(data, tensor.dtype, shape)
    except ValueError as error:  # e.g. a zero-size shape whose other dimensions overflow
        raise MalformedResponseError(
            f"{name}.shape: {list(shape)} is not a valid array shape"
        ) from error
