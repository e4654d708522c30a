"""The model directory on disk: which checkpoint files are which version, and its upkeep.

Layout: `<name>.safetensors` or `<name>.pt2` (an exported package) is version 1 of `<name>`;
`<name>/<N>.safetensors` or `<name>/<N>.pt2` is version N (both files for one version:
ambiguous, logged and skipped). Only regular files inside the directory count.

Version numbers are claimed with an empty `<name>/.<N>.claim` file, created exclusively: servers
sharing the directory (replicas on one volume) never hand out one number twice, and since claims
stay, no number is ever reused, even after its checkpoint is deleted.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path

from deq_server.core import CHECKPOINT_SUFFIXES, atomic_write

log = logging.getLogger("deq_server.registry")
# Up to 18 digits, as a request may pin: a file named with a larger number (crafted, or a typo)
# is no version, and cannot push every later number past what clients can ask for.
_VERSION_FILE = re.compile(r"^(\d{1,18})\.(?:safetensors|pt2)$")
_CLAIM_FILE = re.compile(r"^\.(\d{1,18})\.claim$")
_logged: set[str] = set()  # skip reasons already logged: a poll rescans every few seconds


def _log_once(message: str) -> None:
    if message not in _logged:
        if len(_logged) < 10_000:
            _logged.add(message)
        log.error("%s", message)


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:  # a link loop
        return False


def _inside(path: Path, root: Path) -> bool:
    """Whether `path`, links followed, lies in `root`; a link loop (or a path the system cannot
    resolve) does not."""
    try:
        return path.resolve().is_relative_to(root)
    except (OSError, RuntimeError):  # RuntimeError: Python 3.11's "Symlink loop"
        return False


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
        if not _inside(path, root):
            _log_once(f"skipping {path}: it links outside the model directory, or in a loop")
            return
        if not path.is_file():
            _log_once(f"skipping {path}: not a regular file")
            return
        if version in found.setdefault(name, {}):
            ambiguous.add((name, version))
        found[name][version] = path

    for path in sorted(model_dir.iterdir()):
        if path.suffix in CHECKPOINT_SUFFIXES:
            note(path.stem, "1", path)
    for folder in sorted(p for p in model_dir.iterdir() if _is_dir(p)):
        if not _inside(folder, root):
            _log_once(f"skipping {folder}: it links outside the model directory, or in a loop")
            continue
        for path in sorted(folder.iterdir()):
            match = _VERSION_FILE.match(path.name)
            if match:
                note(folder.name, str(int(match.group(1))), path)
    for name, version in sorted(ambiguous):
        _log_once(f"skipping {name} version {version}: more than one checkpoint file for it")
        del found[name][version]
    return {name: versions for name, versions in found.items() if versions}


def claim_version(model_dir: Path, name: str, start: int) -> int:
    """The first number from `start` on, past every claim of `name`, whose claim file this call
    creates (O_EXCL: of two processes, exactly one wins each number). OSError where the
    directory cannot be written."""
    folder = model_dir / name
    folder.mkdir(exist_ok=True)
    claimed = (int(m.group(1)) for p in folder.iterdir() if (m := _CLAIM_FILE.match(p.name)))
    number = max(start, 1 + max(claimed, default=0))
    for _ in range(10_000):  # each miss is a number another process took meanwhile
        try:
            os.close(os.open(folder / f".{number}.claim", os.O_WRONLY | os.O_CREAT | os.O_EXCL))
            return number
        except FileExistsError:
            number += 1
    raise OSError(f"no version number of {name} could be claimed")


def drop_claim(model_dir: Path, name: str, number: int) -> None:
    """Take back the claim of a number never published (a refused load, a failed commit), and
    the folder it made if nothing else is in it: a refusal leaves the directory as it was."""
    folder = model_dir / name
    (folder / f".{number}.claim").unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # not empty, or gone
        folder.rmdir()


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
            atomic_write(model_dir / name / f"1{source.suffix}", source.read_bytes())
    except OSError as exc:
        log.warning("cannot seed the model directory %s: %s", model_dir, exc)
        return False
    log.info("seeded %s with %s as version 1", model_dir, sorted(checkpoints))
    return True
