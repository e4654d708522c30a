"""Pure-PyTorch DEQ engine: solvers, implicit gradients, models, checkpoints.

Imports nothing from gRPC or Prometheus; the serving layer builds on these names.
"""

from ._cells import CELLS
from ._checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from ._convert import mlp_to_deq
from ._implicit import IFT, JFB, Backward, Phantom, make_backward
from ._methods import METHODS
from ._model import DEQModel, nonfinite_outputs
from ._package import export_deq
from ._slots import Retired, SlotPool, SlotStopHook
from ._solve import Progress, SolveResult, StopHook, solve
from ._status import Status

__all__ = [
    "CELLS",
    "IFT",
    "JFB",
    "METHODS",
    "Backward",
    "CheckpointError",
    "DEQModel",
    "Phantom",
    "Progress",
    "Retired",
    "SlotPool",
    "SlotStopHook",
    "SolveResult",
    "Status",
    "StopHook",
    "export_deq",
    "load_checkpoint",
    "make_backward",
    "mlp_to_deq",
    "nonfinite_outputs",
    "save_checkpoint",
    "solve",
]
