"""Served models and their published versions, loaded from the model directory at start.

Layout of the model directory: `<name>.safetensors` or `<name>.pt2` (an exported package) is
version 1 of `<name>`; `<name>/<N>.safetensors` or `<name>/<N>.pt2` is version N (both files for
one version: ambiguous, logged and skipped). With no checkpoint there (or no directory), the bundled demo models are served.
A checkpoint that fails to load is logged and skipped: the other models keep serving.

Memory stays bounded however many versions training publishes: only the newest `keep_versions`
of each model stay loaded (like Triton's `latest` version policy). Older versions keep their files
and answer NOT_FOUND saying they were unloaded; LoadModel serves such a file again.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from deq_server.core import (
    CHECKPOINT_SUFFIXES,
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_ROWS,
    CheckpointError,
    DEQModel,
    ExportedLayer,
    PackageError,
    checked_probe,
    load_checkpoint,
)
from deq_server.models import bundled_checkpoints

from .errors import NotFoundError, invalid

log = logging.getLogger("deq_server.registry")
_VERSION_FILE = re.compile(r"^(\d+)\.(?:safetensors|pt2)$")


def resolve_device(name: str) -> torch.device:
    """`auto` is CUDA when available, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass
class ModelVersion:
    """One published version: an eval-mode model on the serving device."""

    version: str
    model: DEQModel
    path: Path


@dataclass
class ServedModel:
    """A model name and its published versions (keys are decimal version numbers)."""

    name: str
    versions: dict[str, ModelVersion] = field(default_factory=dict)
    training: bool = False

    @property
    def latest(self) -> ModelVersion:
        return self.versions[max(self.versions, key=int)]

    def ordered_versions(self) -> list[str]:
        return sorted(self.versions, key=int)


def discover(model_dir: Path | None) -> dict[str, dict[str, Path]]:
    """name -> version -> checkpoint path, from the directory layout above."""
    found: dict[str, dict[str, Path]] = {}
    ambiguous: set[tuple[str, str]] = set()

    if model_dir is None or not model_dir.is_dir():
        return found
    root = model_dir.resolve()

    def note(name: str, version: str, path: Path) -> None:
        # Confined as LoadModel is: a link may not leave the directory, and only regular
        # files count (a FIFO or a device would hang or never end).
        if not path.resolve().is_relative_to(root):
            log.error("skipping %s: it links outside the model directory", path)
            return
        if not path.is_file():
            log.error("skipping %s: not a regular file", path)
            return
        if version in found.setdefault(name, {}):
            ambiguous.add((name, version))
        found[name][version] = path

    for path in sorted(model_dir.iterdir()):
        if path.suffix in CHECKPOINT_SUFFIXES:
            note(path.stem, "1", path)
    for folder in sorted(p for p in model_dir.iterdir() if p.is_dir()):
        if not folder.resolve().is_relative_to(root):
            log.error("skipping %s: it links outside the model directory", folder)
            continue
        for path in sorted(folder.iterdir()):
            match = _VERSION_FILE.match(path.name)
            if match:
                note(folder.name, str(int(match.group(1))), path)
    for name, version in sorted(ambiguous):
        log.error("skipping %s version %s: more than one checkpoint file for it", name, version)
        del found[name][version]
    return {name: versions for name, versions in found.items() if versions}


# What `atomic_write` names its temp files: `.<target name>.<random>.tmp` beside the target.
_TEMP_FILE = re.compile(r"^\..+\.(?:safetensors|pt2)\.[A-Za-z0-9_]+\.tmp$")


def remove_stale_temp_files(model_dir: Path | None) -> list[Path]:
    """Delete the temp files of interrupted commits (a SIGKILL mid-save) in the model directory
    and its version folders; call at start, before any commit can be in flight."""
    if model_dir is None or not model_dir.is_dir():
        return []
    removed = []
    for folder in [
        model_dir,
        *(p for p in model_dir.iterdir() if p.is_dir() and not p.is_symlink()),
    ]:
        for path in folder.iterdir():
            if _TEMP_FILE.match(path.name) and path.is_file() and not path.is_symlink():
                path.unlink(missing_ok=True)
                removed.append(path)
                log.warning("removed %s, left by an interrupted commit", path)
    return removed


class Registry:
    """Name -> ServedModel, on one device and dtype, keeping the newest `keep_versions` of each.

    `on_evict(name, version)` runs for every version dropped from memory (metrics clean-up).
    """

    def __init__(
        self,
        device: torch.device,
        dtype: torch.dtype,
        keep_versions: int | None = None,
        on_evict: Callable[[str, str], None] | None = None,
        max_model_bytes: int = DEFAULT_MAX_BYTES,
        max_rows: int = DEFAULT_MAX_ROWS,
        max_iter_cap: int | None = None,
        min_tol: float | None = None,
    ) -> None:
        if keep_versions is not None and keep_versions < 1:
            raise ValueError(f"keep_versions must be at least 1, got {keep_versions}")
        self.device = device
        self.dtype = dtype
        self.keep_versions = keep_versions
        self.on_evict = on_evict
        self.max_model_bytes = max_model_bytes
        self.max_rows = max_rows
        self.max_iter_cap = max_iter_cap
        self.min_tol = min_tol
        self.models: dict[str, ServedModel] = {}
        # Models whose newest checkpoint at start failed to load, with the reason (cleared
        # when LoadModel or a commit publishes one); read by the health status.
        self.failed: dict[str, str] = {}
        self.on_change: Callable[[], None] | None = None  # after a model is served or unloaded
        self._reserved: dict[str, set[int]] = {}
        # The highest version of each name ever served in this process: numbers are never
        # handed out twice, even after UnloadModel (a client pinned to "1" must not get
        # answers from another checkpoint).
        self._highest: dict[str, int] = {}

    @property
    def training_sessions(self) -> int:
        """Train sessions open now (each holds its model's `training` flag)."""
        return sum(served.training for served in self.models.values())

    def reserve_version(self, name: str, model_dir: Path | None, path: Path | None = None) -> str:
        """The next version number of `name`, past every served, on-disk, reserved or ever
        served one; or, when `path` is the on-disk file of version N of `name` and no version N
        or later was served yet, N itself (loading `copy.safetensors` as `copy` gives "1").

        Call on the event loop before any await; `release` it once published or abandoned, so
        two concurrent publications never share a number or overwrite a file.
        """
        used = self._reserved.setdefault(name, set())
        on_disk = discover(model_dir).get(name, {})
        served = self.models[name].versions if name in self.models else {}
        taken = (*map(int, served), *used, self._highest.get(name, 0))
        if path is not None:
            for number, file in on_disk.items():
                if file.resolve() == path.resolve() and int(number) > max(taken, default=0):
                    used.add(int(number))
                    return number
        version = 1 + max((*taken, *map(int, on_disk)), default=0)
        used.add(version)
        return str(version)

    def release(self, name: str, version: str) -> None:
        self._reserved.get(name, set()).discard(int(version))

    def load_version(self, version: str, path: Path) -> ModelVersion:
        """Load a checkpoint as an eval-mode model on the serving device (not yet served)."""
        try:
            model = load_checkpoint(path, max_bytes=self.max_model_bytes, max_rows=self.max_rows)
            model = model.to(device=self.device, dtype=self.dtype).eval()
        except (CheckpointError, OSError):
            raise
        except Exception as exc:  # anything else a crafted file provokes: refused, not a crash
            raise CheckpointError(f"{path}: refused: {type(exc).__name__}: {exc}") from None
        if isinstance(model.layer, ExportedLayer):  # programs may hard-code a dtype or device
            try:
                checked_probe(model)
            except PackageError as exc:
                raise CheckpointError(f"{path}: refused: {exc}") from None
        self._check_solver_defaults(path, model)
        return ModelVersion(version=version, model=model, path=path)

    def _check_solver_defaults(self, path: Path, model: DEQModel) -> None:
        """A request that sets nothing solves with the model's defaults: they must be within
        the caps a request is held to, and the tolerance representable in the serving dtype."""
        solver = model.solver_defaults
        tol, max_iter = solver["tol"], solver["max_iter"]
        if self.max_iter_cap is not None and max_iter > self.max_iter_cap:
            raise CheckpointError(
                f"{path}: solver default max_iter {max_iter} is above the server's "
                f"--max-iter-cap {self.max_iter_cap}"
            )
        if self.min_tol is not None and tol < self.min_tol:
            raise CheckpointError(
                f"{path}: solver default tol {tol:g} is below the server's --min-tol {self.min_tol:g}"
            )
        if not 0 < float(torch.tensor(tol, dtype=self.dtype)) < float("inf"):
            raise CheckpointError(
                f"{path}: solver default tol {tol:g} is not representable in {self.dtype}"
            )

    def add(self, name: str, version: str, path: Path) -> ModelVersion:
        entry = self.load_version(version, path)
        self.publish(name, entry)
        return entry

    def publish(self, name: str, entry: ModelVersion) -> list[str]:
        """Serve a new version (one dict assignment: readers see the old or the new, never a mix),
        then unload the versions past the newest `keep_versions`; returns those unloaded.

        Calls already holding an unloaded version finish with it: only the registry lets go.
        """
        served = self.models.setdefault(name, ServedModel(name))
        served.versions[entry.version] = entry
        self._highest[name] = max(self._highest.get(name, 0), int(entry.version))
        self.failed.pop(name, None)
        evicted = (
            [] if self.keep_versions is None else served.ordered_versions()[: -self.keep_versions]
        )
        for version in evicted:
            del served.versions[version]
            if self.on_evict is not None:
                self.on_evict(name, version)
        if self.on_change is not None:
            self.on_change()
        return evicted

    def unload(self, name: str) -> None:
        """Stop serving `name` (its files stay)."""
        del self.models[name]
        if self.on_change is not None:
            self.on_change()

    def readiness(self, strict: bool) -> tuple[bool, str]:
        """Whether the server is ready to serve, and why not: some model must be served, and
        with `strict`, no checkpoint found at start may have failed (as Triton's strict
        readiness)."""
        if not self.models:
            return False, "no model is served"
        if strict and self.failed:
            return False, f"checkpoints failed to load (--strict-readiness): {sorted(self.failed)}"
        return True, ""

    def load_all(self, model_dir: Path | None) -> None:
        """Load every checkpoint of the directory, or the bundled demos when it holds none.
        Temp files a killed commit left behind are removed first."""
        remove_stale_temp_files(model_dir)
        found = discover(model_dir)
        if not found:
            found = {name: {"1": path} for name, path in bundled_checkpoints().items()}
            where = "no --model-dir" if model_dir is None else f"no checkpoint in {model_dir}"
            log.info("%s: serving the bundled models %s", where, sorted(found))
        for name, versions in found.items():
            loaded, newest_failed = 0, ""
            for version in sorted(versions, key=int, reverse=True):  # newest first
                if self.keep_versions is not None and loaded >= self.keep_versions:
                    break  # older files stay on disk, unloaded
                try:
                    self.add(name, version, versions[version])
                    loaded += 1
                except (ValueError, OSError) as exc:
                    log.error("skipping %s: %s", versions[version], exc)
                    if loaded == 0 and not newest_failed:
                        newest_failed = str(exc)  # a fallback to an older version serves
            if newest_failed:  # but the directory's newest did not load: strict readiness sees it
                self.failed[name] = newest_failed

    def resolve(self, name: str, version: str = "") -> tuple[ServedModel, ModelVersion]:
        """The model and the requested (or latest) version; NOT_FOUND names what is missing."""
        served = self.models.get(name)
        if served is None:
            raise NotFoundError(f"model {name!r} is not served; models: {sorted(self.models)}")
        if not version:
            return served, served.latest
        if not (version.isascii() and version.isdigit() and len(version) <= 18):
            raise invalid(
                "version", "a decimal version number (up to 18 digits)", repr(version[:40])
            )
        entry = served.versions.get(version)
        if entry is None:
            loaded = served.ordered_versions()
            if (
                self.keep_versions
                and loaded
                and version.isdigit()
                and int(version) < int(loaded[0])
            ):
                raise NotFoundError(
                    f"version {version!r} of model {name!r} is not loaded: the server keeps the "
                    f"newest {self.keep_versions} versions in memory (--keep-versions), now "
                    f"{loaded}; its checkpoint stays on disk, and LoadModel serves it again"
                )
            raise NotFoundError(f"model {name!r} has no version {version!r}; versions: {loaded}")
        return served, entry
