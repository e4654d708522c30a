"""`--compile-step` for the request-level lanes: each lane's solver iteration compiled ahead of
time (`core.CompiledIteration`), the lane solving eagerly until its program is ready, and for good
if it cannot be built (logged once, with the reason).

Compiling takes seconds of CPU, most of it Python (export, code generation) that would hold the
GIL the event loop and the engine need, so it runs in a child process
(`python -m deq_server.serving.compiled_step DIR`), one at a time, in a private temporary
directory that holds the job (the served model saved as a checkpoint, read back by the same
checked loader as any other, and the settings as JSON: no pickle) and receives the program. A
thread of this process waits for the child and loads the program.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch

from deq_server.core import (
    CompiledIteration,
    DEQModel,
    ExportedLayer,
    load_checkpoint,
    make_method,
    save_checkpoint,
)

from .processes import die_with_parent

log = logging.getLogger("deq_server.compile")

# BatchSolve's own keywords among a batch's shared settings; the rest are the method's options
_SOLVE_KEYS = ("method", "stop_mode", "divergence")
COMPILE_TIMEOUT_S = 600.0
_JOB, _PACKAGE = "job.json", "iteration.pt2"
_PARENT = "DEQ_COMPILE_PARENT"  # the child checks that its parent is still this server

# (future, served model, frozen model, name, settings, row cap); the models held weakly, so that
# versions unloaded while their compile waits its turn (a burst of Train commits, say) are freed
_Work = tuple[
    Future[CompiledIteration],
    weakref.ref[DEQModel],
    weakref.ref[DEQModel],
    str,
    dict[str, Any],
    int,
]
_queue: queue.Queue[_Work] = queue.Queue()


def cpp_compiler() -> str | None:
    """Where the C++ compiler AOTInductor calls is (its choice: $CXX, else g++; clang++ on
    macOS), or None when there is none: without one no program can be built."""
    name = os.environ.get("CXX") or ("clang++" if sys.platform == "darwin" else "g++")
    return shutil.which(name)


def preload() -> None:
    """Import the program loader now: about a second holding the GIL, better spent while the
    server starts than when the first program arrives with requests in flight."""
    import torch._inductor  # noqa: F401


_lock = threading.Lock()
_thread: threading.Thread | None = None
# per frozen model (kept while it is served), its programs by settings: a lane dropped when idle
# and made again later finds its program instead of compiling it again
_programs: weakref.WeakKeyDictionary[DEQModel, dict[Any, Future[CompiledIteration]]] = (
    weakref.WeakKeyDictionary()
)


def compile_iteration(
    served: DEQModel, model: DEQModel, name: str, shared: dict[str, Any], max_rows: int
) -> Future[CompiledIteration]:
    """The compilation (queued, running or done) of the iteration that a lane of `model` (the
    frozen copy of `served`, served as `name`) with these shared settings runs."""
    global _thread
    key = (tuple(sorted(shared.items(), key=repr)), max_rows)
    with _lock:
        known = _programs.setdefault(model, {})
        if key in known:
            return known[key]
        future = known[key] = Future()
        _queue.put((future, weakref.ref(served), weakref.ref(model), name, dict(shared), max_rows))
        if _thread is None:  # one waiting thread per process, a daemon: exit never waits on it
            _thread = threading.Thread(target=_serve, name="deq-compile", daemon=True)
            _thread.start()
    return future


def wait_idle(timeout: float) -> bool:
    """Wait until no compile is queued or running (a benchmark's warm-up, say); False if some
    still is after `timeout` seconds."""
    end = time.monotonic() + timeout
    with _queue.all_tasks_done:
        while _queue.unfinished_tasks:
            left = end - time.monotonic()
            if left <= 0:
                return False
            _queue.all_tasks_done.wait(left)
    return True


def ready(future: Future[CompiledIteration] | None) -> CompiledIteration | None:
    """The compiled iteration once it is built, else None (not yet, or never)."""
    if future is None or not future.done() or future.exception() is not None:
        return None
    return future.result()


def _serve() -> None:
    while True:
        future, served_ref, model_ref, name, shared, max_rows = _queue.get()
        served, model = served_ref(), model_ref()
        try:
            if served is None or model is None:
                raise LookupError(f"model {name} was unloaded before its compile started")
            future.set_result(_build(served, model, name, shared, max_rows))
        except Exception as exc:  # logged by _build; its traceback would hold the models
            future.set_exception(exc.with_traceback(None))
        finally:
            _queue.task_done()  # whatever happened: wait_idle must not wait for it
        del future, served, model  # while this thread waits for the next job, it holds no model


def _settings(shared: dict[str, Any]) -> dict[str, Any]:
    """CompiledIteration's keywords for a batch's shared settings (the method built as
    BatchSolve builds it, so that the program fits the batches)."""
    options = {k: v for k, v in shared.items() if k not in _SOLVE_KEYS}
    return {
        "method": make_method(shared.get("method", "anderson"), **options),
        "stop_mode": shared.get("stop_mode", "rel"),
        "divergence": shared.get("divergence", 1e5),
    }


def _examples(model: DEQModel) -> tuple[torch.Tensor, torch.Tensor]:
    """Example rows (their values do not matter): the start and injection of two zero inputs."""
    ref = next(model.parameters())
    with torch.no_grad():
        x = torch.zeros(2, *model.input_shape, dtype=ref.dtype, device=ref.device)
        return model.init_state(x), model.inject(x)


def _build(
    served: DEQModel, model: DEQModel, name: str, shared: dict[str, Any], max_rows: int
) -> CompiledIteration:
    settings = _settings(shared)
    ref = next(model.parameters())
    tmp = Path(tempfile.mkdtemp(prefix="deq-compile-"))  # 0700: ours alone
    try:
        suffix = ".pt2" if isinstance(served.layer, ExportedLayer) else ".safetensors"
        with torch.inference_mode(False):
            save_checkpoint(served, tmp / f"model{suffix}")
        job = {"model": f"model{suffix}", "shared": shared, "max_rows": max_rows,
               "dtype": str(ref.dtype).removeprefix("torch."), "device": str(ref.device)}  # fmt: skip
        (tmp / _JOB).write_text(json.dumps(job))
        done = subprocess.run(
            [sys.executable, "-m", __name__, str(tmp)],
            capture_output=True,
            text=True,
            timeout=COMPILE_TIMEOUT_S,
            env={
                **os.environ,
                "PYTHONPATH": os.pathsep.join(p for p in sys.path if p),
                _PARENT: str(os.getpid()),
            },
            check=False,
        )
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise RuntimeError(f"the compiler process exited with {done.returncode}: {last}")
        z0, inj = _examples(model)
        program = CompiledIteration(
            model.cell, z=z0, args=[inj], max_rows=max_rows, package=tmp / _PACKAGE, **settings
        )
    except Exception as exc:
        log.warning(
            "--compile-step: model %s solves eagerly (%s: %s)", name, type(exc).__name__, exc
        )
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("--compile-step: model %s (%s) runs its compiled iteration", name, settings["method"])
    return program


def _compile(directory: Path) -> None:
    """The child's work: the job's program, written to the package path."""
    die_with_parent()  # a compile nobody waits for is not worth finishing
    if os.getppid() != int(os.environ.get(_PARENT, "0")):
        raise SystemExit("the server that asked for this compile is gone")
    job = json.loads((directory / _JOB).read_text())
    served = load_checkpoint(directory / job["model"])
    model = served.to(job["device"], getattr(torch, job["dtype"])).eval().frozen()
    z0, inj = _examples(model)
    CompiledIteration(
        model.cell,
        z=z0,
        args=[inj],
        max_rows=job["max_rows"],
        package=directory / _PACKAGE,
        **_settings(job["shared"]),
    )


if __name__ == "__main__":
    torch.set_num_threads(1)
    _compile(Path(sys.argv[1]))
