"""Served models and their published versions, loaded from the model directory at start.

The directory's layout is model_store's. A directory holding no checkpoint is seeded with the
bundled demo models as their version 1 (where it cannot be written, they are served from the
package). A checkpoint that fails to load is logged and skipped: the other models keep serving.

Memory stays bounded however many versions training publishes: only `keep_versions` of each
model stay loaded (like Triton's `latest` version policy: the newest, or an older version that
LoadModel brought back and the newest others). The others keep their files and answer NOT_FOUND saying they were
unloaded; LoadModel of `<name>/<N>.safetensors` serves version N again under its own number.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from deq_server.core import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_ROWS,
    CheckpointError,
    DEQModel,
    ExportedLayer,
    PackageError,
    checked_probe,
    load_checkpoint,
)

from .errors import NotFoundError, invalid
from .model_store import (
    claim_version,
    discover,
    drop_claim,
    remove_stale_temp_files,
    seed_with,
)

log = logging.getLogger("deq_server.registry")


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
        self._claims: dict[tuple[str, int], Path] = {}  # claim files of reservations open now
        # Reservations of an older version's own file (LoadModel bringing it back): once
        # published it stays beside the newest instead of being unloaded at once.
        self._restoring: set[tuple[str, int]] = set()
        # The file each version number of each name was served from in this process: a number
        # is never given to another file, even after UnloadModel (a client pinned to "1" must
        # not get answers from another checkpoint), but its own file may come back under it.
        self._sources: dict[str, dict[int, Path]] = {}

    @property
    def training_sessions(self) -> int:
        """Train sessions open now (each holds its model's `training` flag)."""
        return sum(served.training for served in self.models.values())

    def reserve_version(self, name: str, model_dir: Path | None, path: Path | None = None) -> str:
        """The version number a publication of `name` gets: when `path` is the on-disk file of
        version N of `name` (`<name>/<N>.safetensors`, or `<name>.safetensors` for 1), N itself,
        unless N is served or reserved now or was served from another file; otherwise the next
        number past every served, on-disk, reserved, ever served or claimed one, claimed in the
        model directory (so that servers sharing it never pick the same).

        Call on the event loop before any await; `release` it once published or abandoned, so
        two concurrent publications never share a number or overwrite a file.
        """
        used = self._reserved.setdefault(name, set())
        sources = self._sources.get(name, {})
        on_disk = discover(model_dir).get(name, {})
        served = self.models[name].versions if name in self.models else {}
        if path is not None:
            for number, file in on_disk.items():
                n = int(number)
                if (
                    file.resolve() == path.resolve()
                    and number not in served
                    and n not in used
                    and sources.get(n, file).resolve() == file.resolve()
                ):
                    used.add(n)
                    self._restoring.add((name, n))
                    return number
        taken = (*map(int, served), *used, *sources, *map(int, on_disk))
        version = 1 + max(taken, default=0)
        if model_dir is not None:
            try:  # the directory's claim: no other server sharing it gets this number
                version = claim_version(model_dir, name, version)
                self._claims[name, version] = model_dir
            except OSError as exc:  # read-only: the number holds for this process only
                log.debug("no claim for %s in %s: %s", name, model_dir, exc)
        used.add(version)
        return str(version)

    def reserve_exact(self, name: str, number: int) -> bool:
        """Reserve version `number` of `name` for its own on-disk file (a poll found it), unless
        it is served, reserved or was ever served now; `release` it as reserve_version's."""
        served = self.models[name].versions if name in self.models else {}
        used = self._reserved.setdefault(name, set())
        if str(number) in served or number in used or number in self._sources.get(name, {}):
            return False
        used.add(number)
        return True

    def ever_served(self, name: str) -> set[int]:
        """The version numbers of `name` this process ever served."""
        return set(self._sources.get(name, {}))

    def release(self, name: str, version: str) -> None:
        """End a reservation: published, its claim stays for good; abandoned, it is dropped."""
        number = int(version)
        self._reserved.get(name, set()).discard(number)
        self._restoring.discard((name, number))
        model_dir = self._claims.pop((name, number), None)
        if model_dir is not None and number not in self._sources.get(name, {}):
            drop_claim(model_dir, name, number)

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
        then unload all but the newest `keep_versions`, or, for a version LoadModel brings back
        (`reserve_version` of its own file), all but it and the newest others; returns those
        unloaded.

        Calls already holding an unloaded version finish with it: only the registry lets go.
        """
        served = self.models.setdefault(name, ServedModel(name))
        served.versions[entry.version] = entry
        self._sources.setdefault(name, {})[int(entry.version)] = entry.path
        self.failed.pop(name, None)
        evicted = []
        if self.keep_versions is not None:
            if (name, int(entry.version)) in self._restoring:
                others = [v for v in served.ordered_versions() if v != entry.version]
                evicted = others[: max(0, len(others) - (self.keep_versions - 1))]
            else:
                evicted = served.ordered_versions()[: -self.keep_versions]
        for version in evicted:
            del served.versions[version]
            if self.on_evict is not None:
                self.on_evict(name, version)
        if self.on_change is not None:
            self.on_change()
        return evicted

    def retire(self, name: str, version: str) -> bool:
        """Stop serving one version (its file was removed); the model too when it was its last
        (then True). Its number stays used."""
        served = self.models[name]
        del served.versions[version]
        if self.on_evict is not None:
            self.on_evict(name, version)
        if not served.versions:
            del self.models[name]
        if self.on_change is not None:
            self.on_change()
        return name not in self.models

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

    def load_all(
        self, model_dir: Path | None, bundled: Mapping[str, Path], *, prepare: bool = True
    ) -> None:
        """Load every checkpoint of the directory, seeding an empty one with `bundled` (name ->
        file) first; serve `bundled` from where it lies when there is no directory or it cannot
        be written. Temp files a killed commit left behind are removed first. `prepare=False`:
        neither (someone else prepared the directory)."""
        if prepare:
            remove_stale_temp_files(model_dir)
            if model_dir is not None:
                seed_with(model_dir, bundled)
        found = discover(model_dir)
        if not found:
            found = {name: {"1": path} for name, path in bundled.items()}
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
            source = self._sources.get(name, {}).get(int(version))
            if source is not None or (self.keep_versions and int(version) < int(loaded[0])):
                file = "its file" if source is None else repr(_relative_name(name, source))
                raise NotFoundError(
                    f"version {version!r} of model {name!r} is not loaded: the server keeps "
                    f"{self.keep_versions} versions of each model in memory (--keep-versions), "
                    f"now {loaded}; LoadModel of {file} serves it again as version {version}"
                )
            raise NotFoundError(f"model {name!r} has no version {version!r}; versions: {loaded}")
        return served, entry


def _relative_name(name: str, path: Path) -> str:
    """How LoadModel names a version file: `<name>/<N>.<suffix>` or a top-level file."""
    return f"{name}/{path.name}" if path.parent.name == name else path.name
