"""`deq-server` freezes what it imported (gc.freeze) before it loads models: full collections
skip torch's heap (a 40-80 ms pause otherwise), and the models stay collectable.

In a child process: freezing is process-wide, and the test process must keep collecting."""

from __future__ import annotations

import json
import subprocess
import sys

CHILD = """
import asyncio, gc, json, sys
from deq_server.serving.app import start_server
from deq_server.serving.config import ServerConfig

async def main():
    config = ServerConfig(
        address="127.0.0.1:0", metrics_address="", model_dir=None, compile_step="off"
    )
    before = gc.get_freeze_count()
    running = await start_server(config, freeze_imports=True)
    frozen = gc.get_freeze_count()
    model = running.registry.models["digits"].latest.model
    # gc.get_objects() lists what collections still walk, frozen objects not
    walked = {id(o) for o in gc.get_objects()}
    model_walked = all(id(p) in walked for p in (model, *model.parameters()))
    torch_walked = id(sys.modules["torch"].__dict__) in walked
    await running.stop(0)
    return {
        "before": before, "frozen": frozen, "model_walked": model_walked,
        "torch_walked": torch_walked,
    }

print(json.dumps(asyncio.run(main())))
"""


def test_the_server_freezes_its_imports_but_not_its_models() -> None:
    out = subprocess.run(
        [sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=300, check=True
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["before"] == 0
    assert result["frozen"] > 50_000  # torch and gRPC: a full collection no longer walks them
    assert not result["torch_walked"]
    # the models load after the freeze: a model unloaded later is still collected
    assert result["model_walked"]
