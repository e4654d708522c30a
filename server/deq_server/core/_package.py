"""Exported model packages (`.pt2`): any DEQ as three `torch.export` programs, no code shipped.

A package is a PT2 archive holding the programs `inject(x) -> u`, `cell(z, u) -> z_next` and
`head(z) -> y` (each exported with a dynamic batch dimension), their weights, and in
`extra/deq.json` the metadata a safetensors checkpoint carries (`config` with the shapes, solver
and backward defaults, provenance, and a `sha256` over the weights, the graphs and the metadata).
Loading runs nothing from the file: `_package_scan` refuses what torch would unpickle, exec or
load as a library before torch sees the bytes, and torch then reads the archive rebuilt from
exactly the members checked (sample inputs emptied). The loaded programs are ordinary modules: solving, slots, implicit gradients
and fine-tuning work on them as on the built-in cells. Before they run on real data, they run
on fake tensors at the largest batch (`_package_cost`): peak memory and FLOPs within caps.
"""

from __future__ import annotations

import copy
import inspect
import io
import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.export import Dim, ExportedProgram

from ._files import atomic_write, checkpoint_digest, checkpoint_metadata
from ._model import DEQModel
from ._package_cost import CostError, measure
from ._package_scan import PROGRAMS, PackageRefusedError, Scan, read_regular, scan_package

ARCHITECTURE = "exported"
SHAPE_KEYS = ("input_shape", "inj_shape", "state_shape", "output_shape")
MAX_SAMPLE_ELEMENTS = 1 << 24  # per-sample state/input/output size; the batch multiplies it


class PackageError(ValueError):
    """A package that cannot be served; `load_checkpoint` turns it into a CheckpointError."""


class ExportedLayer(nn.Module):
    """The three exported programs as one cell (the `Layer` protocol of `DEQModel`).

    Keeps the `ExportedProgram`s (their graphs; the weights are shared with the modules) so that
    fine-tuned weights can be written back as the same programs.
    """

    def __init__(self, programs: dict[str, ExportedProgram], shapes: dict[str, list[int]]) -> None:
        super().__init__()
        self.programs = dict(programs)
        self.inject_program = _runnable(programs["inject"])
        self.cell_program = _runnable(programs["cell"])
        self.head_program = _runnable(programs["head"])
        self.input_shape: tuple[int, ...] = tuple(shapes["input_shape"])
        self.inj_shape: tuple[int, ...] = tuple(shapes["inj_shape"])
        self.state_shape: tuple[int, ...] = tuple(shapes["state_shape"])
        self.output_shape: tuple[int, ...] = tuple(shapes["output_shape"])

    def __deepcopy__(self, memo: dict[int, Any]) -> ExportedLayer:
        # The programs are shared, not copied: only their graphs and signatures are read (to
        # write fine-tuned weights back), and deep-copying a program renames its input nodes
        # (`input` -> `input_1`) without its signature, which torch then refuses.
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        with warnings.catch_warnings():  # torch's own pytree deprecation, raised by the copy
            warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
            for key, value in self.__dict__.items():
                new.__dict__[key] = value if key == "programs" else copy.deepcopy(value, memo)
        return new

    def train(self, mode: bool = True) -> ExportedLayer:
        # Exported modules refuse train()/eval(): their graphs fixed the mode when exported.
        self.training = mode
        return self

    # `forward`, not the module call: no hooks, and the graphs take and return flat tensors.
    def inject(self, x: Tensor) -> Tensor:
        return _one(self.inject_program.forward(x.reshape(x.shape[0], *self.input_shape)))

    def cell(self, z: Tensor, inj: Tensor) -> Tensor:
        return _one(self.cell_program.forward(z, inj))

    def head(self, z: Tensor) -> Tensor:
        return _one(self.head_program.forward(z))

    def current_programs(self) -> dict[str, ExportedProgram]:
        """The programs with this layer's current weights (fine-tuned ones too), on the CPU."""
        out = {}
        for name, ep in self.programs.items():
            module = getattr(self, f"{name}_program")
            state: dict[str, Tensor] = {}
            for fqn, old in ep.state_dict.items():
                value = _lookup(module, fqn).detach().cpu().clone()
                state[fqn] = nn.Parameter(value) if isinstance(old, nn.Parameter) else value
            constants = {
                fqn: _lookup(module, fqn).detach().cpu().clone() if isinstance(old, Tensor) else old
                for fqn, old in ep.constants.items()
            }
            out[name] = ExportedProgram(
                root=ep.graph_module,
                graph=ep.graph,
                graph_signature=ep.graph_signature,
                state_dict=state,
                range_constraints=ep.range_constraints,
                module_call_graph=ep.module_call_graph,
                example_inputs=None,
                constants=constants,
                verifiers=ep.verifiers,
            )
        return out


def _one(outputs: tuple[Tensor, ...]) -> Tensor:
    if len(outputs) != 1:
        raise PackageError(f"a program returns {len(outputs)} outputs; each must return one tensor")
    return outputs[0]


def _lookup(module: nn.Module, fqn: str) -> Tensor:
    owner, _, leaf = fqn.rpartition(".")
    value = getattr(module.get_submodule(owner) if owner else module, leaf)
    if not isinstance(value, Tensor):
        raise PackageError(f"program state {fqn!r} is not a tensor")
    return value


def _require_torch_export() -> None:
    """`.pt2` packages need torch 2.9 or later (the PT2 archive, `module(check_guards=)`)."""
    if "check_guards" not in inspect.signature(ExportedProgram.module).parameters:
        raise PackageError(f".pt2 packages need torch >= 2.9; this server runs {torch.__version__}")


def _runnable(ep: ExportedProgram) -> torch.fx.GraphModule:
    """`ep` as a module: no generated guard code (it would be exec'd from the file's strings),
    a forward of flat tensors in and out (no pytree flattening per call: the solver calls the
    cell every iteration), and tensor constants registered as buffers so that
    `.to(device, dtype)` moves them with the weights. Shapes are checked by the server."""
    module = ep.module(check_guards=False)
    module.graph._codegen = torch.fx.graph.CodeGen()
    module.graph.eliminate_dead_code()  # weights a program holds but never reads
    module.recompile()
    for fqn in ep.constants:
        value = getattr(module, fqn, None) if "." not in fqn else None
        if isinstance(value, Tensor) and fqn not in dict(module.named_buffers()):
            delattr(module, fqn)
            module.register_buffer(fqn, value, persistent=False)
    return module


def _flat_tensors(programs: dict[str, ExportedProgram]) -> dict[str, Tensor]:
    """Every weight and tensor constant of the programs, named `program/fqn` (for the digest)."""
    out: dict[str, Tensor] = {}
    for name, ep in sorted(programs.items()):
        for fqn, t in ep.state_dict.items():
            out[f"{name}/{fqn}"] = t
        for fqn, c in ep.constants.items():
            if isinstance(c, Tensor):
                out[f"{name}/const/{fqn}"] = c
    return out


def _digest(
    programs: dict[str, ExportedProgram], graphs: dict[str, str], meta: dict[str, str]
) -> str:
    return checkpoint_digest(
        _flat_tensors(programs), {**meta, **{f"\0graph.{k}": v for k, v in graphs.items()}}
    )


def _shapes(config: dict[str, Any]) -> dict[str, list[int]]:
    shapes = {}
    for key in SHAPE_KEYS:
        value = config.get(key)
        if (
            not isinstance(value, list)
            or len(value) > 8
            or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in value)
        ):
            raise PackageError(f"config {key!r} must list at most 8 positive ints, got {value!r}")
        if math.prod(value) > MAX_SAMPLE_ELEMENTS:
            raise PackageError(f"config {key!r} {value} exceeds {MAX_SAMPLE_ELEMENTS} elements")
        shapes[key] = value
    unknown = sorted(set(config) - {"cell", "solver", "backward", *SHAPE_KEYS})
    if unknown:
        raise PackageError(f"unknown config keys {unknown} for an exported model")
    return shapes


def _shape_check(name: str, out: object, shape: tuple[int, ...]) -> Tensor:
    if not isinstance(out, Tensor) or tuple(out.shape) != (3, *shape):
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise PackageError(f"program {name!r} returns {got} for 3 rows; metadata says {shape}")
    return out


def _rows_independent(name: str, run: Any, *args: Tensor) -> Tensor:
    """`run` on three rows, checked equal to `run` on each row alone (the solver and the
    scheduler evaluate any subset of a batch, so no program may mix rows)."""
    together = run(*args)
    alone = torch.cat([run(*(a[i : i + 1] for a in args)) for i in range(args[0].shape[0])])
    if not torch.allclose(together, alone, rtol=1e-4, atol=1e-5):
        raise PackageError(f"program {name!r} mixes the rows of a batch (batch statistics?)")
    return together


def probe(model: DEQModel) -> None:
    """Run an exported model's programs on one and on three rows, on its device and in its
    dtype: shapes as the metadata says, and rows independent in all three programs. Raises
    PackageError naming what disagrees."""
    ref = next(iter(model.parameters()), None)
    dtype = ref.dtype if ref is not None else torch.float32
    device = ref.device if ref is not None else torch.device("cpu")
    layer = model.layer
    assert isinstance(layer, ExportedLayer)
    gen = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> Tensor:
        return torch.rand(*shape, generator=gen, dtype=dtype).to(device)

    with torch.no_grad():
        x = rand(3, *model.input_shape)
        u = _shape_check("inject", _rows_independent("inject", model.inject, x), layer.inj_shape)
        z = rand(3, *model.state_shape)
        _shape_check("cell", _rows_independent("cell", model.cell, z, u), model.state_shape)
        _shape_check("head", _rows_independent("head", model.head, z), model.output_shape)


def _model(
    programs: dict[str, ExportedProgram],
    config: dict[str, Any],
    max_rows: int | None = None,
    max_bytes: int = 0,
) -> DEQModel:
    """The programs as a checked DEQModel; with `max_rows` (loading), their costs at that
    batch checked first."""
    shapes = _shapes(config)
    try:
        model = DEQModel(config, layer=ExportedLayer(programs, shapes))
    except (TypeError, KeyError, ValueError) as exc:
        raise PackageError(f"invalid model config: {exc}") from exc
    if next(iter(model.parameters()), None) is None:  # the server reads dtype and device there
        raise PackageError("the programs hold no parameters: nothing to serve or fine-tune")
    if max_rows is not None:
        check_costs(model, max_rows, max_bytes)
    checked_probe(model)
    return model


def check_costs(model: DEQModel, rows: int, max_bytes: int) -> None:
    """Each program run on fake tensors of `rows` rows (nothing allocated): PackageError if one
    would hold more than `max_bytes` at once or take too many FLOPs (see `_package_cost`)."""
    layer = model.layer
    assert isinstance(layer, ExportedLayer)
    dtype = next(iter(model.parameters())).dtype
    x_shape, u_shape, z_shape = layer.input_shape, layer.inj_shape, layer.state_shape

    def empty(shape: tuple[int, ...]) -> Tensor:
        return torch.empty(rows, *shape, dtype=dtype)

    calls = {
        "inject": (layer.inject_program, lambda: (empty(x_shape),)),
        "cell": (layer.cell_program, lambda: (empty(z_shape), empty(u_shape))),
        "head": (layer.head_program, lambda: (empty(z_shape),)),
    }
    for name, (module, inputs) in calls.items():
        try:
            measure(module, inputs, max_bytes)
        except CostError as exc:
            raise PackageError(f"program {name!r} at {rows} rows: {exc}") from None


def checked_probe(model: DEQModel) -> None:
    """`probe`, with any failure of the programs themselves reported as a PackageError."""
    try:
        probe(model)
    except PackageError:
        raise
    except Exception as exc:  # a program that fails on inputs of the declared shapes
        raise PackageError(
            f"the programs do not run on the declared shapes: {type(exc).__name__}: "
            f"{str(exc)[:300]}"
        ) from None


def load_package(path: Path, *, max_bytes: int, max_rows: int, parse_meta: Any) -> DEQModel:
    """Load and validate a `.pt2` package (see the module docstring); `parse_meta(path, meta)`
    checks the shared metadata keys and returns the config; `max_rows` is the largest batch the
    programs will be called on. Raises PackageError or PackageRefusedError naming the problem."""
    _require_torch_export()
    scan = scan_package(read_regular(path, max_bytes), max_bytes)  # the file's bytes freed here
    meta = scan.metadata
    config = parse_meta(path, meta)
    if config.get("cell") != ARCHITECTURE or meta["architecture"] != ARCHITECTURE:
        raise PackageError(
            f"a .pt2 package's cell must be {ARCHITECTURE!r}, got {config.get('cell')!r}"
        )
    _shapes(config)  # before torch allocates anything
    from torch.export.pt2_archive._package import load_pt2

    try:
        contents = load_pt2(io.BytesIO(scan.canonical))
    except Exception as exc:  # torch's reader raises many kinds; each means "refused"
        raise PackageError(f"torch could not read the programs: {str(exc)[:300]}") from None
    try:
        return _checked_model(path, contents, scan, config, meta, max_rows, max_bytes)
    except PackageError:
        raise
    except Exception as exc:  # whatever else a crafted file provokes: refused, never a crash
        raise PackageError(f"refused: {type(exc).__name__}: {str(exc)[:300]}") from None


def _checked_model(
    path: Path,
    contents: Any,
    scan: Scan,
    config: dict[str, Any],
    meta: dict[str, str],
    max_rows: int,
    max_bytes: int,
) -> DEQModel:
    programs = contents.exported_programs
    if set(programs) != set(PROGRAMS) or contents.aoti_runners:
        raise PackageError(f"expected the programs {list(PROGRAMS)}, got {sorted(programs)}")
    if _digest(programs, scan.graph_sha256, meta) != meta["sha256"]:
        raise PackageError("weights, graphs or metadata do not match the sha256 (corrupted file)")
    for name, t in _flat_tensors(programs).items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise PackageError(f"tensor {name!r} holds non-finite values")
    model = _model(programs, config, max_rows, max_bytes)
    if "solver" in meta and meta["solver"] != json.dumps(model.config["solver"], sort_keys=True):
        raise PackageError("metadata 'solver' does not match the config's solver")
    model.provenance = {"path": str(path), **meta}
    return model


def save_package(
    model: DEQModel,
    path: str | os.PathLike[str],
    metadata: dict[str, str] | None = None,
    *,
    parent: str = "",
) -> None:
    """Write an exported model (fine-tuned weights included) atomically as a `.pt2` package."""
    from torch.export.pt2_archive._package import package_pt2

    layer = model.layer
    if not isinstance(layer, ExportedLayer):
        raise TypeError("save_package needs a model loaded from a .pt2 package or export_deq")
    programs = layer.current_programs()
    config = model.config
    meta = checkpoint_metadata(config, ARCHITECTURE, metadata, parent)

    def pack(meta: dict[str, str]) -> bytes:
        buf = io.BytesIO()
        package_pt2(buf, exported_programs=programs, extra_files={"deq.json": json.dumps(meta)})
        return buf.getvalue()

    # The digest covers the serialized graphs, known only once written: write, hash, rewrite.
    first = scan_package(pack({**meta, "sha256": ""}), 1 << 62).graph_sha256
    meta["sha256"] = _digest(programs, first, meta)
    data = pack(meta)
    if scan_package(data, 1 << 62).graph_sha256 != first:
        raise RuntimeError("torch serialized the same programs differently twice")
    atomic_write(path, data)


def _two_rows(x: Tensor) -> Tensor:
    # torch.export specialises a batch dimension of size 1; two rows keep it symbolic.
    return torch.cat([x[:1], x[:1]]) if x.shape[0] < 2 else x


def export_deq(
    path: str | os.PathLike[str],
    *,
    inject: nn.Module,
    cell: nn.Module,
    head: nn.Module,
    example_input: Tensor,
    solver: dict[str, Any] | None = None,
    backward: str | dict[str, Any] | None = None,
    metadata: dict[str, str] | None = None,
) -> DEQModel:
    """Export a DEQ as a `.pt2` package at `path` (atomically) and return it as loaded.

    `inject(x) -> u`, `cell(z, u) -> z_next` (z shaped like `cell`'s output), `head(z) -> y`:
    modules whose every operation is per-sample (eval mode; no batch statistics), with PyTorch
    operators only. `example_input` is a batch of inputs (any batch size). The state z has the
    shape of u and starts at zeros.
    Parameters shared between the three modules are stored, and fine-tuned, once per program.
    """
    _require_torch_export()
    for module in (inject, cell, head):
        module.eval()
    x = _two_rows(example_input.detach())
    with torch.no_grad():
        u = inject(x)
        z = cell(torch.zeros_like(u), u)
        y = head(z)
    batch = Dim("batch")
    programs = {
        "inject": torch.export.export(inject, (x,), dynamic_shapes=({0: batch},)),
        "cell": torch.export.export(cell, (z, u), dynamic_shapes=({0: batch}, {0: batch})),
        "head": torch.export.export(head, (z,), dynamic_shapes=({0: batch},)),
    }
    config: dict[str, Any] = {
        "cell": ARCHITECTURE,
        "input_shape": list(x.shape[1:]),
        "inj_shape": list(u.shape[1:]),
        "state_shape": list(z.shape[1:]),
        "output_shape": list(y.shape[1:]),
    }
    if solver is not None:
        config["solver"] = solver
    if backward is not None:
        config["backward"] = backward
    try:
        model = _model(programs, config)
    except PackageRefusedError:
        raise
    except ValueError as exc:
        raise ValueError(f"cannot export this DEQ: {exc}") from exc
    save_package(model, path, metadata)
    return model
