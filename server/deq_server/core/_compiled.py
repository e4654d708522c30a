"""One solver iteration compiled ahead of time, for `BatchSolve`: f, the row bookkeeping and the
method's step as one native program (torch.export, then AOTInductor), any number of rows.

On small batches an eager iteration is some sixty torch calls whose dispatch costs far more than
their arithmetic (a lone `digits` sample: about 110 us per iteration on a 2-core VM, of which the
arithmetic is a few); the compiled program runs the same iteration as a few fused kernels called
from C++ (about 20 us). The program is functional: it takes the active rows' tensors and returns
the updated ones, and `BatchSolve` rebinds them. The answers are the eager ones up to the
rounding of fused arithmetic (tests: float64).

Compiling takes seconds and a C++ compiler; the serving layer (`--compile-step`, on by default on
a CPU that has a compiler) compiles in a child process (`package`: where the program is written,
then loaded from), solving eagerly meanwhile.
"""

from __future__ import annotations

import dataclasses
import tempfile
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ._rows import Observation, Rows, advance


def _state_fields(state: Any) -> list[str]:
    return [] if state is None else [f.name for f in dataclasses.fields(state)]


class _Iteration(nn.Module):
    """The traced function: `advance`'s work on copies of its inputs, the results returned.
    `owner` registers f's module (a bound method's `__self__`) so that its weights are traced."""

    def __init__(
        self,
        f: Callable[..., Tensor],
        method: Any,
        shape: torch.Size,
        n_args: int,
        state: Any,
        stop_mode: str,
        divergence: float,
    ) -> None:
        super().__init__()
        owner = getattr(f, "__self__", None)
        self.owner = owner if isinstance(owner, nn.Module) else None
        self.f, self.method, self.shape = f, method, shape
        self.n_args, self.template = n_args, state
        self.fields = _state_fields(state)
        self.stop_mode, self.divergence = stop_mode, divergence

    def forward(self, z: Tensor, *flat: Tensor) -> tuple[Tensor, ...]:
        args, rest = flat[: self.n_args], flat[self.n_args :]
        evals, cap, tol, first, best, best_z = rest[:6]
        rows = Rows(evals.clone(), cap, tol, first.clone(), best.clone(), best_z.clone())
        state = None
        if self.template is not None:
            own = {n: t.clone() for n, t in zip(self.fields, rest[6:], strict=True)}
            state = dataclasses.replace(self.template, **own)
        seen, z_next = advance(
            self.f, self.method, z, self.shape, args, rows, state, self.stop_mode, self.divergence
        )
        kept = [getattr(state, n) for n in self.fields]
        return (z_next, seen.g, seen.abs_res, seen.res, seen.running,
                rows.evals, rows.first, rows.best, rows.best_z, *kept)  # fmt: skip


class CompiledIteration:
    """`advance` for one f, method, stop mode, dtype and device, as an AOTInductor program.

    Built from example rows (any count; their values do not matter); raises whatever export or
    compilation raises (a cell with data-dependent Python, no C++ compiler, ...): the caller
    solves eagerly then. `max_rows` bounds the row count the program accepts. With `package`,
    the program is written there, or loaded from there when the file exists (made by the same
    call, in another process: the file is trusted, never one a client supplied).
    """

    def __init__(
        self,
        f: Callable[..., Tensor],
        method: Any,
        z: Tensor,
        args: Sequence[Tensor],
        *,
        stop_mode: str,
        divergence: float,
        max_rows: int,
        package: str | Path | None = None,
    ) -> None:
        if not all(isinstance(a, Tensor) and a.dim() > 0 for a in args):
            raise TypeError("a compiled iteration takes batch-first tensor arguments only")
        self.method, self.stop_mode, self.divergence = method, stop_mode, divergence
        # the model (or function) it was made for, weakly: a cache keyed by the model may hold
        # this program, which must not keep the model alive
        self._owner = weakref.ref(getattr(f, "__self__", f))
        self.dtype, self.device = z.dtype, z.device
        self.width, self.n_args = z.shape[1:].numel(), len(args)
        # two example rows: torch.export specialises a dimension it sees as 1
        two = torch.zeros(2, dtype=torch.int64, device=z.device)
        z2 = z.reshape(z.shape[0], -1).index_select(0, two)
        args2 = [a.index_select(0, two) for a in args]
        rows = Rows.start(z2, torch.ones(2, dtype=z.dtype, device=z.device), two + 2)
        state = method.init(z2)
        self._fields = _state_fields(state)
        self.max_rows = max_rows
        if package is not None and Path(package).exists():
            self._run = torch._inductor.aoti_load_package(str(package)).loader.run
            return
        module = _Iteration(f, method, z.shape[1:], len(args), state, stop_mode, divergence)
        example = (z2, *args2, *self._row_tensors(rows), *self._state_tensors(state))
        n = torch.export.Dim("rows", min=1, max=max(2, max_rows))
        dims = [{0: n} if t.dim() > 0 else None for t in example]
        dynamic = (dims[0], tuple(dims[1:]))  # forward(z, *flat)
        with torch.no_grad(), tempfile.TemporaryDirectory(prefix="deq-aoti-") as tmp:
            program = torch.export.export(module.eval(), example, dynamic_shapes=dynamic)
            path = torch._inductor.aoti_compile_and_package(
                program, package_path=str(package or Path(tmp) / "iteration.pt2")
            )
            self._run = torch._inductor.aoti_load_package(path).loader.run

    @staticmethod
    def _row_tensors(rows: Rows) -> tuple[Tensor, ...]:
        return (rows.evals, rows.cap, rows.tol, rows.first, rows.best, rows.best_z)

    def _state_tensors(self, state: Any) -> list[Tensor]:
        return [getattr(state, n) for n in self._fields]

    def fits(
        self, f: Callable[..., Tensor], method: Any, z: Tensor, args: Sequence[Any], stop_mode: str
    ) -> bool:
        """Whether this program computes `advance` for this f, settings and tensors."""
        return (
            getattr(f, "__self__", f) is self._owner()
            and method == self.method
            and stop_mode == self.stop_mode
            and z.dtype == self.dtype
            and z.device == self.device
            and z.shape[1:].numel() == self.width
            and 1 <= z.shape[0] <= self.max_rows
            and len(args) == self.n_args
            and all(isinstance(a, Tensor) and a.shape[0] == z.shape[0] for a in args)
        )

    def __call__(
        self, z: Tensor, args: Sequence[Tensor], rows: Rows, state: Any
    ) -> tuple[Observation, Tensor, Rows, Any]:
        """One iteration: the observation, the next iterate, and the rows and method state
        after it (new tensors; the inputs are left as they were)."""
        flat = [z, *args, *self._row_tensors(rows), *self._state_tensors(state)]
        out = self._run(flat)
        z_next, g, abs_res, res, running, evals, first, best, best_z = out[:9]
        if state is not None:
            state = dataclasses.replace(state, **dict(zip(self._fields, out[9:], strict=True)))
        rows = Rows(evals, rows.cap, rows.tol, first, best, best_z)
        return Observation(g, abs_res, res, running), z_next, rows, state
