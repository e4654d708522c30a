"""Pure-PyTorch DEQ engine: solvers, implicit gradients, models, checkpoints.

Imports nothing from gRPC or Prometheus; the serving layer builds on these names.
"""

from ._methods import METHODS
from ._solve import Progress, SolveResult, StopHook, solve
from ._status import Status

__all__ = ["METHODS", "Progress", "SolveResult", "Status", "StopHook", "solve"]
