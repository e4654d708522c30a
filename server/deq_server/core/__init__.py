"""Pure-PyTorch DEQ engine: solvers, implicit gradients, models, checkpoints.

Imports nothing from gRPC or Prometheus; the serving layer builds on these names.
"""

from ._cells import CELLS
from ._checkpoint import (
    CHECKPOINT_SUFFIXES,
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_ROWS,
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
)
from ._compiled import CompiledIteration
from ._convert import mlp_to_deq
from ._files import atomic_write
from ._implicit import IFT, JFB, Backward, Phantom, make_backward
from ._methods import METHODS, make_method
from ._model import DEQModel, nonfinite_outputs
from ._package import ExportedLayer, PackageError, checked_probe, export_deq
from ._rows import STOP_MODES
from ._slots import Retired, SlotPool, SlotStopHook
from ._solve import BatchSolve, Progress, SolveResult, StopHook, solve
from ._status import Status

__all__ = [
    "CELLS",
    "CHECKPOINT_SUFFIXES",
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_ROWS",
    "IFT",
    "JFB",
    "METHODS",
    "STOP_MODES",
    "Backward",
    "BatchSolve",
    "CheckpointError",
    "CompiledIteration",
    "DEQModel",
    "ExportedLayer",
    "PackageError",
    "Phantom",
    "Progress",
    "Retired",
    "SlotPool",
    "SlotStopHook",
    "SolveResult",
    "Status",
    "StopHook",
    "atomic_write",
    "checked_probe",
    "export_deq",
    "load_checkpoint",
    "make_backward",
    "make_method",
    "mlp_to_deq",
    "nonfinite_outputs",
    "save_checkpoint",
    "solve",
]
