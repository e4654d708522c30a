"""Train sessions: fine-tune a private copy of a served model with implicit gradients.

A session holds the model's training lock from its config message to its end. Each batch is one
optimizer step (a step whose loss or gradient is not finite is skipped, and one that leaves
unusable weights is taken back; either says so). Committing
saves the weights atomically into the model directory and publishes them as a new version;
a session that ends any other way writes nothing and publishes nothing.

Server caps no request can lift: one session per model and `--max-train-sessions` in all
(RESOURCE_EXHAUSTED past it), at most `--max-train-steps` batches per stream (a config asking for
more is INVALID_ARGUMENT; the batch past the cap RESOURCE_EXHAUSTED), and the inference caps on
every batch (`--max-batch`, `--max-iter-cap`, `--min-tol`). A session lets go of its weights and
optimizer state when it ends, so memory does not grow with the number of sessions served.
"""

from __future__ import annotations

import copy
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.utils import parametrize

from deq_client.pb.deq.v1 import deq_pb2 as pb
from deq_client.wire import LOSSES, OPTIMIZERS, name_of
from deq_server.core import (
    CHECKPOINT_SUFFIXES,
    IFT,
    JFB,
    Backward,
    DEQModel,
    ExportedLayer,
    Phantom,
    save_checkpoint,
)

from . import tensors, validate
from .config import ServerConfig
from .errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    NotFoundError,
    ResourceExhaustedError,
    invalid,
)
from .memory import release_free_memory
from .metrics import Metrics
from .registry import ModelVersion, Registry, ServedModel

MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_model_name(field: str, name: str) -> str:
    """A model name usable as a file name: no separators, no dot-dot, no control characters."""
    if not MODEL_NAME.fullmatch(name) or ".." in name:
        raise invalid(
            field, "a name of letters, digits, '.', '_' or '-' (no path parts)", repr(name)
        )
    return name


def confined_path(model_dir: Path | None, relative: str) -> Path:
    """`relative` resolved inside the model directory (symlinks followed), or INVALID_ARGUMENT.

    Absolute paths, `..` parts, control characters and links pointing outside are refused
    before anything is read.
    """
    if model_dir is None:
        raise FailedPreconditionError("the server has no --model-dir to load checkpoints from")
    if (
        not relative
        or len(relative) > 1024
        or any(ord(c) < 32 for c in relative)
        or Path(relative).is_absolute()
    ):
        raise invalid(
            "path",
            "a relative path (up to 1024 characters) inside the model directory",
            repr(relative[:80]),
        )
    if ".." in Path(relative).parts or not relative.endswith(CHECKPOINT_SUFFIXES):
        raise invalid(
            "path",
            "a .safetensors or .pt2 file inside the model directory (no '..')",
            repr(relative),
        )
    root = Path(model_dir).resolve()
    try:
        path = (root / relative).resolve()
        if not path.is_relative_to(root):
            raise invalid(
                "path", "a file inside the model directory (links may not leave it)", repr(relative)
            )
        if not path.is_file():
            raise NotFoundError(f"no checkpoint at {relative!r} in the model directory")
    except OSError as exc:  # a name too long for the filesystem, a loop of links, ...
        raise invalid("path", "a usable path inside the model directory", exc.strerror) from None
    except RuntimeError:  # Python 3.11's Path.resolve on a loop of links
        raise invalid(
            "path", "a usable path inside the model directory", "a loop of links"
        ) from None
    return path


def _check_publish_as(
    name: str, served: ServedModel, model: DEQModel, registry: Registry, server: ServerConfig
) -> None:
    """Publishing under another served model's name must keep its clients working (same shapes),
    and the name must be free in the model directory (no file where its version folder goes)."""
    assert server.model_dir is not None
    target = Path(server.model_dir) / name
    if target.exists() and not target.is_dir():
        raise AlreadyExistsError(
            f"config.publish_as {name!r}: a file of that name is in the model directory"
        )
    other = registry.models.get(name)
    if other is None or other is served:
        return
    theirs = other.latest.model
    mine = (model.input_shape, model.output_shape)
    if (theirs.input_shape, theirs.output_shape) != mine:
        raise invalid(
            "config.publish_as",
            f"a new name, or a served model with the same input and output shapes "
            f"({list(mine[0])} -> {list(mine[1])})",
            f"{name!r}, which maps {list(theirs.input_shape)} -> {list(theirs.output_shape)}",
        )


def _backward(config: pb.TrainConfig, model: DEQModel, server: ServerConfig) -> Backward:
    mode = config.gradient_mode
    own = model.backward_strategy
    if mode == pb.GRADIENT_MODE_PHANTOM:
        # The model's configured steps and damping when it is a phantom model (its steps, like
        # IFT's max_iter, brought within the server's cap), the class defaults otherwise.
        if not isinstance(own, Phantom):
            return Phantom()
        return Phantom(steps=min(own.steps, server.max_iter_cap), damping=own.damping)
    if mode == pb.GRADIENT_MODE_JFB:
        return own if isinstance(own, JFB) else JFB()
    if mode not in (pb.GRADIENT_MODE_UNSPECIFIED, pb.GRADIENT_MODE_IFT):
        raise invalid("config.gradient_mode", "IFT, PHANTOM or JFB", mode)
    base = own if isinstance(own, IFT) else IFT()
    # The model's own defaults are brought within the server's caps (the client never set
    # them, so refusing would name a field it cannot fix); values the client sets are checked.
    if config.HasField("backward_tol"):
        tol = config.backward_tol
    else:
        tol = min(max(base.tol, server.min_tol), validate.MAX_TOL)
    if config.HasField("backward_max_iter"):
        max_iter = config.backward_max_iter
    else:
        max_iter = min(base.max_iter, server.max_iter_cap)
    if not (math.isfinite(tol) and server.min_tol <= tol <= validate.MAX_TOL):
        raise invalid(
            "config.backward_tol", f"a number in [{server.min_tol:g}, {validate.MAX_TOL:g}]", tol
        )
    if not 1 <= max_iter <= server.max_iter_cap:
        raise invalid("config.backward_max_iter", f"1..{server.max_iter_cap}", max_iter)
    try:
        return IFT(tol=tol, max_iter=max_iter, method=base.method, stop_mode=base.stop_mode)
    except ValueError as exc:
        raise invalid(
            "config.backward_tol/backward_max_iter", "tol > 0 and max_iter >= 1", exc
        ) from None


def _optimizer(config: pb.TrainConfig, params: Any) -> torch.optim.Optimizer:
    lr, decay, momentum = config.learning_rate, config.weight_decay, config.momentum
    if not (math.isfinite(lr) and lr > 0):
        raise invalid("config.learning_rate", "a finite number > 0", lr)
    if not (math.isfinite(decay) and decay >= 0):
        raise invalid("config.weight_decay", "a finite number >= 0", decay)
    if not (math.isfinite(momentum) and momentum >= 0):
        raise invalid("config.momentum", "a finite number >= 0", momentum)
    name = "adam" if not config.optimizer else name_of(OPTIMIZERS, config.optimizer)
    if name is None:
        raise invalid("config.optimizer", "ADAM, ADAMW or SGD", config.optimizer)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=decay, momentum=momentum)
    cls = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
    return cls(params, lr=lr, weight_decay=decay)


@dataclass
class Published:
    """What a commit produced, ready to be added to the registry on the event loop."""

    name: str
    entry: ModelVersion
    steps: int


def _optimizer_state(optimizer: torch.optim.Optimizer) -> dict[Any, dict[str, Any]]:
    """A copy of the optimizer's per-parameter state (Adam's moments and step count, SGD's
    momentum buffers) to put back if a step has to be taken back: its tensors cloned, without
    `deepcopy(state_dict())`'s packing and unpacking (a few percent of a digits step)."""
    return {
        p: {k: v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v) for k, v in s.items()}
        for p, s in optimizer.state.items()
    }


def _usable(model: DEQModel) -> bool:
    """Whether every parameter, and every weight its parametrizations derive (a spectral cap's
    SVD overflows on huge weights), is finite."""
    with torch.no_grad():
        try:
            derived = [
                getattr(module, name)
                for module in model.modules()
                if parametrize.is_parametrized(module)
                for name in module.parametrizations
            ]
        except RuntimeError:  # e.g. an SVD that did not converge on non-finite input
            return False
        tensors_ = [*model.parameters(), *derived]
        return all(bool(torch.isfinite(t).all()) for t in tensors_)


class TrainSession:
    """One Train stream's state. Steps and commit run on a worker thread, never the event loop."""

    def __init__(
        self, config: pb.TrainConfig, registry: Registry, server: ServerConfig, metrics: Metrics
    ) -> None:
        if server.model_dir is None:
            raise FailedPreconditionError(
                "the server has no --model-dir to publish trained models into"
            )
        if not (server.model_dir.is_dir() and os.access(server.model_dir, os.W_OK)):
            raise FailedPreconditionError(
                "the server's --model-dir is not a writable folder: nothing could be published"
            )
        served, version = registry.resolve(config.model, config.version)
        if served.training:
            raise FailedPreconditionError(f"model {served.name!r} is already being trained")
        if registry.training_sessions >= server.max_train_sessions:
            raise ResourceExhaustedError(
                f"{registry.training_sessions} Train sessions are open "
                f"(--max-train-sessions {server.max_train_sessions}); retry later"
            )
        if config.max_steps > server.max_train_steps:
            raise invalid(
                "config.max_steps",
                f"0..{server.max_train_steps} (--max-train-steps; 0 means that cap)",
                config.max_steps,
            )
        self.publish_as = check_model_name("config.publish_as", config.publish_as or served.name)
        _check_publish_as(self.publish_as, served, version.model, registry, server)
        loss = name_of(LOSSES, config.loss)
        if loss is None:
            raise invalid("config.loss", "MSE or CROSS_ENTROPY", config.loss)
        if config.HasField("max_grad_norm") and not config.max_grad_norm > 0:
            raise invalid("config.max_grad_norm", "a number > 0", config.max_grad_norm)
        if not (math.isfinite(config.jacobian_reg_weight) and config.jacobian_reg_weight >= 0):
            raise invalid(
                "config.jacobian_reg_weight", "a finite number >= 0", config.jacobian_reg_weight
            )
        self.config = config
        self.served: ServedModel = served
        self.source = version
        self.model = copy.deepcopy(version.model).train()
        self.backward = _backward(config, self.model, server)
        self.optimizer = _optimizer(config, self.model.parameters())
        self.loss = loss
        self.registry, self.server, self.metrics = registry, server, metrics
        self.steps = 0
        self.batches = 0
        served.training = True
        metrics.train_sessions.inc()

    def close(self) -> None:
        """Release the model's training lock and the session's memory (however it ended).

        The weights and optimizer state go now, not when the last reference to the session does
        (a cancelled step's worker thread may still hold it); a step still running on them
        fails on the missing attributes, and its result is discarded.
        """
        self.served.training = False
        self.metrics.train_sessions.dec()
        self.optimizer.state.clear()
        del self.optimizer, self.model
        release_free_memory()  # the weights and any unloaded versions: back to the OS

    def _targets(self, t: pb.Tensor, batch: int) -> torch.Tensor:
        shape = self.model.output_shape
        if self.loss == "cross_entropy":
            y = tensors.decode(t, "batch.targets", max_elements=batch)
            if y.dtype != torch.int64 or tuple(y.shape) != (batch,):
                raise invalid(
                    "batch.targets",
                    f"int64 class indices shaped [{batch}]",
                    f"{y.dtype} {list(y.shape)}",
                )
            if bool(((y < 0) | (y >= shape[0])).any()):
                raise invalid(
                    "batch.targets", f"classes in 0..{shape[0] - 1}", "a class out of range"
                )
            return y
        y = validate.batch_tensor(t, "batch.targets", shape, self.server)
        if y.shape[0] != batch:
            raise invalid("batch.targets.shape[0]", f"the inputs' batch {batch}", y.shape[0])
        return y

    def step(self, batch: pb.TrainBatch) -> pb.TrainStep:
        """One optimizer step on one batch (validated first)."""
        if self.config.max_steps and self.batches >= self.config.max_steps:
            raise FailedPreconditionError(
                f"max_steps ({self.config.max_steps}) reached; close the stream to commit"
            )
        if self.batches >= self.server.max_train_steps:
            raise ResourceExhaustedError(
                f"the server's --max-train-steps ({self.server.max_train_steps}) batches per "
                "Train stream were sent; close the stream before it to commit"
            )
        self.batches += 1
        x = validate.batch_tensor(batch.inputs, "batch.inputs", self.model.input_shape, self.server)
        y = self._targets(batch.targets, x.shape[0])
        device, dtype = self.registry.device, self.registry.dtype
        x = x.to(device=device, dtype=dtype)
        y = y.to(device=device, dtype=dtype if y.is_floating_point() else torch.int64)
        solver = validate.solver_options(self.config.solver, x.shape[0], self.server)
        start = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        out, result = self.model(x.requires_grad_(False), backward=self.backward, **solver)
        loss = F.cross_entropy(out, y) if self.loss == "cross_entropy" else F.mse_loss(out, y)
        if self.config.jacobian_reg_weight > 0:
            loss = loss + self.config.jacobian_reg_weight * self._jacobian_penalty(x, result.z)
        event = pb.TrainStep(
            step=self.steps + 1,
            loss=float(loss.detach()),
            forward_iterations_mean=float(result.iterations.double().mean()),
            forward_iterations_max=int(result.iterations.max()),
            forward_residual_max=float(result.residual.max()),
        )
        if not math.isfinite(event.loss):
            return self._skip(event, "non-finite loss")
        loss.backward()
        limit = self.config.max_grad_norm if self.config.HasField("max_grad_norm") else math.inf
        event.grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), limit))
        if not math.isfinite(event.grad_norm):
            return self._skip(event, "non-finite gradient")
        params = [p.detach().clone() for p in self.model.parameters()]
        state = _optimizer_state(self.optimizer)
        try:
            self.optimizer.step()
            usable = _usable(self.model)
        except RuntimeError:  # e.g. Adam's step size overflowing the weights' dtype
            usable = False
        if not usable:  # a huge learning rate, say: take the step back
            with torch.no_grad():
                for p, old in zip(self.model.parameters(), params, strict=True):
                    p.copy_(old)
            self.optimizer.state.clear()
            self.optimizer.state.update(state)
            return self._skip(event, "non-finite weights after the update")
        self.steps += 1
        back = result.backward
        if back is not None:
            event.backward_iterations_mean = float(back.iterations.double().mean())
            event.backward_iterations_max = int(back.iterations.max())
            event.backward_residual_max = float(back.residual.max())
            method = self.backward.method if isinstance(self.backward, IFT) else "unrolled"
            self.metrics.record_solve(self.served.name, method, "backward", back)
        self.metrics.record_solve(
            self.served.name,
            solver.get("method", self.model.config["solver"]["method"]),
            "forward",
            result,
        )
        self.metrics.train_steps.labels(self.served.name).inc()
        self.metrics.train_loss.labels(self.served.name).set(event.loss)
        event.samples_per_second = x.shape[0] / max(time.perf_counter() - start, 1e-9)
        return event

    def _skip(self, event: pb.TrainStep, reason: str) -> pb.TrainStep:
        self.optimizer.zero_grad(set_to_none=True)
        event.skipped, event.skip_reason = True, reason
        return event

    def _jacobian_penalty(self, x: torch.Tensor, z_star: torch.Tensor) -> torch.Tensor:
        """Hutchinson estimate of ||J_f(z*)||_F^2 / n, differentiable in the parameters."""
        z = z_star.detach().requires_grad_()
        fz = self.model.cell(z, self.model.inject(x))
        v = torch.randn_like(fz)
        (jtv,) = torch.autograd.grad(fz, z, v, create_graph=True)
        return jtv.pow(2).sum() / v.numel()

    def commit(self, version: str) -> Published:
        """Save atomically as `version` (reserved by the caller) and load it back (worker thread)."""
        assert self.server.model_dir is not None
        folder = Path(self.server.model_dir) / self.publish_as
        suffix = ".pt2" if isinstance(self.model.layer, ExportedLayer) else ".safetensors"
        path = folder / f"{version}{suffix}"
        if path.exists() or not folder.resolve().is_relative_to(
            Path(self.server.model_dir).resolve()
        ):
            raise FailedPreconditionError(
                f"refusing to write {path}: it exists or leaves the model dir"
            )
        model = self.model.eval().cpu()
        try:
            folder.mkdir(parents=True, exist_ok=True)
            save_checkpoint(
                model, path, metadata={"steps": str(self.steps)}, parent=str(self.source.path)
            )
        except OSError as exc:  # a full disk, a folder made read-only since the start
            raise FailedPreconditionError(
                f"could not write {self.publish_as}/{path.name} into the model directory: "
                f"{exc.strerror or type(exc).__name__}"
            ) from None
        return Published(
            self.publish_as, self.registry.load_version(str(version), path), self.steps
        )
