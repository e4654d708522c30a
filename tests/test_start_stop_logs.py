"""Issue 13, item 8: one start line naming the addresses, model dir, device, scheduler and
models; one final line after the drain saying what was drained."""

from __future__ import annotations

import logging
import shutil

from serving_harness import running_server

from deq_server.models import bundled_checkpoints


def messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "deq_server"]


def test_one_start_line_and_one_final_line(caplog, tmp_path):
    shutil.copy(bundled_checkpoints()["digits"], tmp_path / "digits.safetensors")
    caplog.set_level(logging.INFO, logger="deq_server")
    with running_server(model_dir=tmp_path, scheduler="request") as running:
        started = [m for m in messages(caplog) if m.startswith("deq-server ready")]
        assert len(started) == 1
        line = started[0]
        assert f"gRPC 127.0.0.1:{running.port} (plaintext)" in line
        assert f"metrics 127.0.0.1:{running.metrics_port}" in line
        assert f"model dir {tmp_path}" in line
        assert "device cpu (float32)" in line
        assert "scheduler request" in line
        assert "compile step off" in line
        assert line.endswith("models: digits v1")
    final = messages(caplog)[-1]
    assert final.startswith("stopped: drained 0 call(s) in flight at shutdown")
    assert "1 model(s)" in final


def test_the_bundled_demo_start_line_says_so(caplog):
    caplog.set_level(logging.INFO)
    with running_server(metrics_address=""):
        pass
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "no checkpoint in None" not in text
    assert "no --model-dir: serving the bundled models ['digits']" in text
    (line,) = [m for m in messages(caplog) if m.startswith("deq-server ready")]
    assert "metrics off" in line
    assert "model dir none (bundled demo only)" in line
