"""`--model-control poll`: rescan the model directory every interval, serve the versions that
appeared there (another replica's commit, a file an operator copied in) and stop serving files
that were removed. Replicas sharing one directory thus serve each other's commits within one
interval (as Triton's `--model-control-mode=poll`).

A new version is one this server never served, served if it ranks among the `--keep-versions`
newest of its name (numbers of replicas' commits and LoadModels interleave); a file removed and
brought back, or older than what is served, waits for LoadModel, as at start. A file that
fails to load (half-copied, damaged) is logged once and tried again once its size or
modification time changes; it is never served half-written.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .model_store import discover
from .registry import Registry

log = logging.getLogger("deq_server.registry")


@dataclass
class PollResult:
    """What one rescan changed: (name, version) pairs served and stopped, files refused."""

    served: list[tuple[str, str]] = field(default_factory=list)
    stopped: list[tuple[str, str]] = field(default_factory=list)
    refused: list[Path] = field(default_factory=list)


def _signature(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


class ModelPoller:
    """Rescans `model_dir` into `registry`; `on_served(name, version)` runs for every version
    it serves and `on_stopped(name, version, last)` for every one it stops (metrics)."""

    def __init__(
        self,
        registry: Registry,
        model_dir: Path,
        interval: float,
        on_served: Callable[[str, str], None],
        on_stopped: Callable[[str, str, bool], None],
    ) -> None:
        self.registry = registry
        self.model_dir = model_dir
        self.interval = interval
        self.on_served = on_served
        self.on_stopped = on_stopped
        self._refused: dict[Path, tuple[int, int]] = {}  # file -> signature when it failed
        self._lock = asyncio.Lock()  # one rescan at a time (the loop and a test's poll_once)

    async def run(self) -> None:
        """Rescan every interval until cancelled; a failing rescan is logged, never fatal."""
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.poll_once()
            except Exception:
                log.exception("rescan of the model directory %s failed", self.model_dir)

    async def poll_once(self) -> PollResult:
        async with self._lock:
            result = PollResult()
            self._stop_removed(result)
            found = await asyncio.to_thread(discover, self.model_dir)
            present = {path for versions in found.values() for path in versions.values()}
            self._refused = {p: sig for p, sig in self._refused.items() if p in present}
            for name, versions in sorted(found.items()):
                await self._serve_new(name, versions, result)
            return result

    def _stop_removed(self, result: PollResult) -> None:
        root = self.model_dir.resolve()
        for name, served in list(self.registry.models.items()):
            for version, entry in list(served.versions.items()):
                try:
                    path = entry.path.resolve()
                except RuntimeError:  # replaced by a loop of links: gone as a checkpoint
                    path = entry.path.absolute()
                if path.is_relative_to(root) and not path.is_file():
                    last = self.registry.retire(name, version)
                    self.on_stopped(name, version, last)
                    result.stopped.append((name, version))
                    log.info("stopped serving %s version %s: %s was removed", name, version, path)

    async def _serve_new(self, name: str, versions: dict[str, Path], result: PollResult) -> None:
        never_served = [int(v) for v in versions if int(v) not in self.registry.ever_served(name)]
        for number in sorted(never_served, reverse=True):  # newest first: no load is wasted
            served = self.registry.models.get(name)
            loaded = [int(v) for v in served.versions] if served is not None else []
            keep = self.registry.keep_versions
            if keep is not None and len(loaded) >= keep and number < min(loaded):
                continue  # older than everything kept
            path = versions[str(number)]
            try:
                signature = _signature(path)
            except OSError:
                continue  # gone since the scan
            if self._refused.get(path) == signature:
                continue  # failed as it is now: tried again once it changes
            if not self.registry.reserve_exact(name, number):
                continue  # a LoadModel or a commit of this server holds that number now
            try:
                entry = await asyncio.to_thread(self.registry.load_version, str(number), path)
            except (ValueError, OSError) as exc:
                self._refused[path] = signature
                result.refused.append(path)
                log.error("not serving %s (retried once it changes): %s", path, exc)
            else:
                self._refused.pop(path, None)
                self.registry.publish(name, entry)
                self.on_served(name, entry.version)
                result.served.append((name, entry.version))
                log.info("serving %s version %s, found in the model directory", name, number)
            finally:
                self.registry.release(name, str(number))
