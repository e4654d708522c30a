"""The model directory on disk: which checkpoint files are which version, and its upkeep.

Layout: `<name>.safetensors` or `<name>.pt2` (an exported package) is version 1 of `<name>`;
`<name>/<N>.safetensors` or `<name>/<N>.pt2` is version N (both files for one version:
ambiguous, logged and skipped). Only regular files inside the directory count.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

from deq_server.core import CHECKPOINT_SUFFIXES

log = logging.getLogger("deq_server.registry")
_VERSION_FILE = re.compile(r"^(\d+)\.(?:safetensors|pt2)$")


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


def seed_with(model_dir: Path, checkpoints: Mapping[str, Path]) -> bool:
    """Create `model_dir` if missing and, when it holds no checkpoint, copy each of
    `checkpoints` (name -> file) in as `<name>/1.<suffix>`: the bundled demo becomes version 1
    of a directory Train publishes into, and stays there across restarts and evictions.

    False (logged) where the directory cannot be created or written (a read-only mount).
    """
    try:
        model_dir.mkdir(parents=True, exist_ok=True)
        if discover(model_dir):
            return False
        for name, source in checkpoints.items():
            (model_dir / name).mkdir(exist_ok=True)
            _copy_atomically(source, model_dir / name / f"1{source.suffix}")
    except OSError as exc:
        log.warning("cannot seed the model directory %s: %s", model_dir, exc)
        return False
    log.info("seeded %s with %s as version 1", model_dir, sorted(checkpoints))
    return True


def _copy_atomically(source: Path, target: Path) -> None:
    """Copy to a temp file named as commits name theirs (so a crash leaves one that start-up
    removes), then rename: the target is whole or absent."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        shutil.copyfile(source, tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
