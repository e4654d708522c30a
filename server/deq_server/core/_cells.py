"""DEQ cells: each holds an injection, the fixed-point map and an output head.

A cell exposes `inject(x) -> inj`, `cell(z, inj) -> z_next`, `head(z) -> y` and `state_shape`.
Every operation is per-sample (no batch statistics), so the solver may evaluate any subset of rows.
Configs are plain JSON dicts; `resolve_config` fills defaults and rejects unknown or mistyped keys.
"""

from __future__ import annotations

import functools
import importlib.metadata
import itertools
import math
from typing import Any, ClassVar, Protocol, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ._activations import activation

NORMS = ("none", "weight", "spectral")


class Layer(Protocol):
    """What `DEQModel` needs of a cell: the three maps and the per-sample shapes."""

    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    state_shape: tuple[int, ...]

    def inject(self, x: Tensor) -> Tensor: ...
    def cell(self, z: Tensor, inj: Tensor) -> Tensor: ...
    def head(self, z: Tensor) -> Tensor: ...


def resolve_config(
    config: dict[str, Any], required: dict[str, type], defaults: dict[str, Any]
) -> dict[str, Any]:
    """Merge defaults into a cell config; name any missing, unknown or mistyped key."""
    known = {"cell", "solver", "backward", *required, *defaults}
    unknown = sorted(set(config) - known)
    if unknown:
        raise ValueError(f"unknown config keys {unknown} for cell {config.get('cell')!r}")
    missing = sorted(set(required) - set(config))
    if missing:
        raise ValueError(f"missing config keys {missing} for cell {config.get('cell')!r}")
    out = {**defaults, **config}
    for key, typ in required.items():
        value = out[key]
        if typ is int and (
            isinstance(value, bool) or not isinstance(value, int) or not 1 <= value < 2**31
        ):
            raise ValueError(
                f"config key {key!r} must be a positive int below 2**31, got {value!r}"
            )
        if typ is list and not (isinstance(value, list) and len(value) <= 1024):
            raise ValueError(f"config key {key!r} must be a list of at most 1024 entries")
    for key, default in defaults.items():
        value = out[key]
        if isinstance(default, bool) or default is None:
            continue
        if isinstance(default, int) and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f"config key {key!r} must be an int, got {value!r}")
        if isinstance(default, float) and (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            raise ValueError(f"config key {key!r} must be a finite number, got {value!r}")
        if isinstance(default, str) and not isinstance(value, str):
            raise ValueError(f"config key {key!r} must be a string, got {value!r}")
    return out


class SpectralCap(nn.Module):
    """Parametrization W -> W * min(1, max_norm / ||W||_2): keeps the linear map contractive.

    Without autograd (serving), the capped weight is cached until W changes: the exact 2-norm
    is an SVD, too costly to redo on every request.
    """

    def __init__(self, max_norm: float) -> None:
        super().__init__()
        if max_norm <= 0.0:
            raise ValueError(f"max_norm must be > 0, got {max_norm}")
        self.max_norm = max_norm
        self._cache: tuple[tuple[object, ...], Tensor] | None = None

    def _cap(self, weight: Tensor) -> Tensor:
        if weight.is_meta:  # shapes only (the loader's check); the meta SVD imports torch._dynamo
            return weight
        sigma = torch.linalg.matrix_norm(weight.flatten(1), ord=2)
        return weight * (self.max_norm / sigma).clamp(max=1.0)

    def forward(self, weight: Tensor) -> Tensor:
        if torch.is_grad_enabled() and weight.requires_grad:
            self._cache = None
            return self._cap(weight)
        # In-place updates bump the tensor's version counter, so the key notices optimizer steps.
        key = (weight.data_ptr(), weight._version, weight.dtype, weight.device)
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, self._cap(weight))
        return self._cache[1]


class WeightNorm(nn.Module):
    """Parametrization (g, v) -> g v / ||v|| (norms over all dims but the first): torch's
    `weight_norm` with the same op and stored names (`original0` = g, `original1` = v), except on
    the meta device (the loader's shape check), where torch's computes a norm that imports
    torch._dynamo, seconds of every server start."""

    def forward(self, g: Tensor, v: Tensor) -> Tensor:
        return v if v.is_meta else torch._weight_norm(v, g, 0)

    def right_inverse(self, weight: Tensor) -> tuple[Tensor, Tensor]:
        if weight.is_meta:
            return weight.new_empty((weight.shape[0],) + (1,) * (weight.dim() - 1)), weight
        return torch.norm_except_dim(weight, 2, 0), weight


def _normalise(layer: nn.Module, norm: str, max_norm: float) -> None:
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; expected one of {list(NORMS)}")
    if norm == "weight":
        parametrize.register_parametrization(layer, "weight", WeightNorm())
    elif norm == "spectral":
        parametrize.register_parametrization(layer, "weight", SpectralCap(max_norm))


class MLPCell(nn.Module):
    """The seed cell z = act(W z + U x' + b), x' = (x - input_shift) * input_scale; y = W_out z + b_out."""

    REQUIRED: ClassVar[dict[str, type]] = {"in_features": int, "hidden": int, "out_features": int}
    DEFAULTS: ClassVar[dict[str, Any]] = {
        "activation": "tanh",
        "norm": "none",
        "max_norm": 0.9,
        "init_scale": 0.5,
        "input_scale": 1.0,
        "input_shift": 0.0,
    }

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        c = config
        self.act = activation(c["activation"])
        self.input_scale, self.input_shift = float(c["input_scale"]), float(c["input_shift"])
        self.injection = nn.Linear(c["in_features"], c["hidden"])
        self.W = nn.Linear(c["hidden"], c["hidden"], bias=False)
        self.out = nn.Linear(c["hidden"], c["out_features"])
        # init_scale is W's initial spectral norm: gaussian n x n with std s/(2 sqrt(n)) has about s.
        # Not on the meta device (the checkpoint loader's shape check), where normal_ imports
        # torch._dynamo: about 2 s of every server start for values that are never there.
        if not self.W.weight.is_meta:
            nn.init.normal_(self.W.weight, std=c["init_scale"] / (2 * math.sqrt(c["hidden"])))
        _normalise(self.W, c["norm"], c["max_norm"])
        self.input_shape: tuple[int, ...] = (c["in_features"],)
        self.output_shape: tuple[int, ...] = (c["out_features"],)
        self.state_shape: tuple[int, ...] = (c["hidden"],)

    def inject(self, x: Tensor) -> Tensor:
        x = (x.flatten(1) - self.input_shift) * self.input_scale
        return F.linear(x, self.injection.weight, self.injection.bias)

    def cell(self, z: Tensor, inj: Tensor) -> Tensor:
        # F.linear, not the module call: this runs every iteration, and a module call costs
        # more than the product itself on small batches
        return self.act(F.linear(z, self.W.weight) + inj)

    def head(self, z: Tensor) -> Tensor:
        return F.linear(z, self.out.weight, self.out.bias)


class ConvCell(nn.Module):
    """MDEQ-style residual convolutional cell for (C, H, W) inputs, GroupNorm throughout:
    z_next = act(GN3(z + GN2(conv2(act(GN1(conv1 z))) + inj))), inj = conv_in(x');
    the head pools the state and applies a linear layer."""

    REQUIRED: ClassVar[dict[str, type]] = {
        "in_channels": int,
        "height": int,
        "width": int,
        "channels": int,
        "out_features": int,
    }
    DEFAULTS: ClassVar[dict[str, Any]] = {
        "groups": 4,
        "kernel_size": 3,
        "activation": "relu",
        "norm": "none",
        "max_norm": 0.9,
        "input_scale": 1.0,
        "input_shift": 0.0,
    }

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        c = config
        ch, k = c["channels"], c["kernel_size"]
        if not 1 <= c["groups"] <= ch:
            raise ValueError(f"groups must be in 1..channels ({ch}), got {c['groups']}")
        if ch % c["groups"]:
            raise ValueError(f"channels ({ch}) must be divisible by groups ({c['groups']})")
        if not (k >= 1 and k % 2 == 1):
            raise ValueError(f"kernel_size must be a positive odd int, got {k}")
        self.act = activation(c["activation"])
        self.input_scale, self.input_shift = float(c["input_scale"]), float(c["input_shift"])
        self.in_shape = (c["in_channels"], c["height"], c["width"])
        self.injection = nn.Conv2d(c["in_channels"], ch, k, padding=k // 2)
        self.conv1 = nn.Conv2d(ch, ch, k, padding=k // 2, bias=False)
        self.conv2 = nn.Conv2d(ch, ch, k, padding=k // 2, bias=False)
        self.gn1 = nn.GroupNorm(c["groups"], ch)
        self.gn2 = nn.GroupNorm(c["groups"], ch)
        self.gn3 = nn.GroupNorm(c["groups"], ch)
        self.out = nn.Linear(ch, c["out_features"])
        for conv in (self.conv1, self.conv2):
            _normalise(conv, c["norm"], c["max_norm"])
        self.input_shape: tuple[int, ...] = self.in_shape
        self.output_shape: tuple[int, ...] = (c["out_features"],)
        self.state_shape: tuple[int, ...] = (ch, c["height"], c["width"])

    def inject(self, x: Tensor) -> Tensor:
        x = x.reshape(x.shape[0], *self.in_shape)
        return self.injection((x - self.input_shift) * self.input_scale)

    def cell(self, z: Tensor, inj: Tensor) -> Tensor:
        y = self.act(self.gn1(self.conv1(z)))
        y = self.gn2(self.conv2(y) + inj)
        return self.act(self.gn3(z + y))

    def head(self, z: Tensor) -> Tensor:
        return self.out(z.mean(dim=(2, 3)))


class TiedMLPCell(nn.Module):
    """The weight-tied DEQ form of an explicit MLP with sizes d_0..d_L (Bai et al. 2019, Thm 3).

    State z = [z_1; ...; z_L]; f(z, x) = act_blocks(W_z z + U x + b) with W_z block sub-diagonal
    (block (l, l-1) = W_l), U = [W_1; 0; ...; 0] and b the stacked biases. W_z is nilpotent, so
    picard iteration from any start reaches the fixed point, z_L = MLP(x), in exactly L steps.
    Stored blockwise (L small matmuls instead of one mostly-zero one); the head returns z_L.
    """

    REQUIRED: ClassVar[dict[str, type]] = {"layers": list, "activations": list}
    DEFAULTS: ClassVar[dict[str, Any]] = {}

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        sizes, acts = config["layers"], config["activations"]
        if len(sizes) < 2 or not all(isinstance(d, int) and d >= 1 for d in sizes):
            raise ValueError(f"layers must list >= 2 positive ints, got {sizes!r}")
        if len(acts) != len(sizes) - 1:
            raise ValueError(f"activations must have {len(sizes) - 1} entries, got {len(acts)}")
        self.acts = [activation(a) for a in acts]
        self.linears = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(sizes))
        self.sizes = list(sizes[1:])
        self.input_shape: tuple[int, ...] = (sizes[0],)
        self.output_shape: tuple[int, ...] = (sizes[-1],)
        self.state_shape: tuple[int, ...] = (sum(self.sizes),)

    @property
    def layers(self) -> list[nn.Linear]:
        """The MLP's Linear layers W_1 .. W_L, in order."""
        return [cast(nn.Linear, lin) for lin in self.linears]

    def inject(self, x: Tensor) -> Tensor:
        first, *later = self.layers
        rest = [lin.bias.expand(x.shape[0], -1) for lin in later]
        return torch.cat([first(x.flatten(1)), *rest], dim=1)

    def cell(self, z: Tensor, inj: Tensor) -> Tensor:
        blocks = z.split(self.sizes, dim=1)
        injs = inj.split(self.sizes, dim=1)
        out = [self.acts[0](injs[0])]
        for lin, act, prev, b in zip(
            self.layers[1:], self.acts[1:], blocks[:-1], injs[1:], strict=True
        ):
            out.append(act(F.linear(prev, lin.weight) + b))
        return torch.cat(out, dim=1)

    def head(self, z: Tensor) -> Tensor:
        return z[:, -self.sizes[-1] :]

    @property
    def W_z(self) -> Tensor:
        """The dense block sub-diagonal state matrix (for inspection; the cell never builds it)."""
        n = self.state_shape[0]
        layers = self.layers
        w = layers[0].weight.new_zeros(n, n)
        offsets = [0, *torch.tensor(self.sizes).cumsum(0).tolist()]
        for k, lin in enumerate(layers[1:], start=1):
            w[offsets[k] : offsets[k + 1], offsets[k - 1] : offsets[k]] = lin.weight
        return w

    @property
    def U(self) -> Tensor:
        """The dense input matrix [W_1; 0; ...; 0]."""
        w1 = self.layers[0].weight
        return torch.cat([w1, w1.new_zeros(self.state_shape[0] - w1.shape[0], w1.shape[1])])


CELLS: dict[str, type[MLPCell] | type[ConvCell] | type[TiedMLPCell]] = {
    "mlp": MLPCell,
    "conv": ConvCell,
    "tied_mlp": TiedMLPCell,
}


ENTRY_POINT_GROUP = "deq_serve.cells"


@functools.cache
def cell_class(name: object) -> type[nn.Module]:
    """The cell class called `name`: a built-in one, else one that an installed package registers
    in the entry-point group `deq_serve.cells` (code in the image, never in a checkpoint).

    A registered class follows the built-ins' protocol: `REQUIRED` and `DEFAULTS` config dicts,
    a constructor taking the resolved config, `inject`/`cell`/`head`, and the three shapes.
    """
    if isinstance(name, str) and name in CELLS:
        return CELLS[name]
    if not isinstance(name, str) or not name:
        raise ValueError(f"config 'cell' must be a cell name, got {name!r}")
    found = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP).select(name=name)
    if not found:
        raise ValueError(
            f"unknown cell {name!r}: not built in ({sorted(CELLS)}) and no installed package "
            f"registers it in the entry-point group {ENTRY_POINT_GROUP!r}"
        )
    entry = next(iter(found))
    try:
        cls = entry.load()
    except Exception as exc:  # an installed plugin that fails to import is named, not fatal
        raise ValueError(f"cell {name!r} ({entry.value}) failed to import: {exc}") from exc
    problems = []
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        problems.append("is not an nn.Module subclass")
    for attr in ("REQUIRED", "DEFAULTS"):
        if not isinstance(getattr(cls, attr, None), dict):
            problems.append(f"has no {attr} dict")
    for attr in ("inject", "cell", "head"):
        if not callable(getattr(cls, attr, None)):
            problems.append(f"has no {attr}() method")
    if problems:
        raise ValueError(f"cell {name!r} ({entry.value}) " + ", ".join(problems))
    return cast(type[nn.Module], cls)
