"""Wire names: one table per concept, shared by the SDK, ``deqctl`` and the server.

The enum tables are derived from the generated ``deq.v1`` descriptors: a name is the value's name
without its prefix, lower case (``SOLVER_METHOD_ANDERSON`` -> ``"anderson"``), except sample
statuses, which stay upper case as in ``deq_server.core.Status`` (``"MAX_ITER"``). The
``*_UNSPECIFIED`` value (0) has no name: it means "not set". ``DTYPES`` adds what the proto cannot
say: each ``DataType``'s Open Inference Protocol name and the numpy dtype of its bytes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import numpy as np

from deq_client.pb.deq.v1 import deq_pb2 as pb

if TYPE_CHECKING:
    from google.protobuf.internal.enum_type_wrapper import _EnumTypeWrapper

V = TypeVar("V", bound=int)


def _names(enum: _EnumTypeWrapper[V], prefix: str, *, lower: bool = True) -> dict[str, V]:
    """Name -> value of every set value of a proto enum, in declaration order."""
    table: dict[str, V] = {}
    for full, value in enum.items():
        if value != 0:
            name = full.removeprefix(prefix)
            table[name.lower() if lower else name] = value
    return table


def name_of(table: Mapping[str, int], value: int) -> str | None:
    """The name of ``value`` in ``table``; ``None`` for unset (0) or unknown values."""
    return next((name for name, code in table.items() if code == value), None)


METHODS = _names(pb.SolverMethod, "SOLVER_METHOD_")
"""Solver method name -> ``SolverMethod``: picard, anderson, broyden."""
STOP_MODES = _names(pb.StopMode, "STOP_MODE_")
"""Stop mode name -> ``StopMode``: abs, rel."""
STATUSES = _names(pb.SampleStatus, "SAMPLE_STATUS_", lower=False)
"""Sample status name -> ``SampleStatus``: CONVERGED, MAX_ITER, ..."""
OPTIMIZERS = _names(pb.Optimizer, "OPTIMIZER_")
"""Optimizer name -> ``Optimizer``: adam, adamw, sgd."""
LOSSES = _names(pb.Loss, "LOSS_")
"""Loss name -> ``Loss``: mse, cross_entropy."""
GRADIENT_MODES = _names(pb.GradientMode, "GRADIENT_MODE_")
"""Gradient mode name -> ``GradientMode``: ift, phantom, jfb."""

Method = Literal["picard", "anderson", "broyden"]
"""The keys of ``METHODS``, for type checkers (a test holds them equal)."""
StopMode = Literal["abs", "rel"]
"""The keys of ``STOP_MODES``, for type checkers (a test holds them equal)."""


@dataclass(frozen=True)
class WireDtype:
    """One ``DataType``: its enum value, its OIP datatype and the numpy dtype of its wire bytes.

    ``storage`` is little-endian; for bfloat16, which numpy lacks, it is ``<u2``: the 16-bit
    patterns (the upper half of a float32), which torch views as ``torch.bfloat16``.
    """

    code: pb.DataType.ValueType
    oip: str
    storage: np.dtype[Any]

    @property
    def name(self) -> str:
        """The numpy / torch name users see: ``"float32"``, ``"bfloat16"``, ..."""
        return pb.DataType.Name(self.code).removeprefix("DATA_TYPE_").lower()


DTYPES: dict[int, WireDtype] = {
    d.code: d
    for d in (
        WireDtype(pb.DATA_TYPE_FLOAT32, "FP32", np.dtype("<f4")),
        WireDtype(pb.DATA_TYPE_FLOAT64, "FP64", np.dtype("<f8")),
        WireDtype(pb.DATA_TYPE_FLOAT16, "FP16", np.dtype("<f2")),
        WireDtype(pb.DATA_TYPE_BFLOAT16, "BF16", np.dtype("<u2")),
        WireDtype(pb.DATA_TYPE_INT64, "INT64", np.dtype("<i8")),
    )
}
"""``DataType`` value -> its ``WireDtype``, for every value but ``DATA_TYPE_UNSPECIFIED``."""


def wire_values(data: bytes, code: int, shape: tuple[int, ...]) -> np.ndarray:
    """The values of a tensor's wire bytes (`code` a ``DTYPES`` key, the byte count already
    checked against `shape`) as a native-endian array; bfloat16, which numpy lacks, widened to
    float32, exactly (its 16 bits are the upper half of a float32's). Always a new, writable
    array: the message's bytes stay the message's."""
    storage = DTYPES[code].storage
    flat = np.frombuffer(data, dtype=storage, count=math.prod(shape))
    if code == pb.DATA_TYPE_BFLOAT16:
        values = (flat.astype(np.uint32) << np.uint32(16)).view(np.float32)
    else:
        values = flat.astype(storage.newbyteorder("="))
    return values.reshape(shape)
