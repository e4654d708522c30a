"""deq-serve: serve and fine-tune Deep Equilibrium Models.

`deq_server.core` is the pure-PyTorch engine (solvers, implicit gradients, models, checkpoints).
"""

__version__ = "0.1.0"
