"""With no address flags and no DEQ_* variables, the server listens on 127.0.0.1 only: gRPC on
50051 and /metrics on 9090, never on 0.0.0.0 or an IPv6 wildcard.

The server runs with its real defaults inside a fresh network namespace (`unshare -n`, as root),
so the fixed default ports cannot clash with anything else on the machine, and its listening
sockets are read from that namespace's /proc/<pid>/net/tcp{,6}.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from deq_server.serving.config import ServerConfig, parse_config

LISTEN = "0A"  # TCP state code of a listening socket in /proc/net/tcp


def netns_available() -> bool:
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return False
    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True, check=False)
    return probe.returncode == 0


def listening(pid: int) -> set[tuple[str, int]]:
    """(address, port) of every listening TCP socket in the process's network namespace."""
    found = set()
    for table in ("tcp", "tcp6"):
        lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            if state != LISTEN:
                continue
            address, port = local.split(":")
            # The kernel prints each 32-bit word of the address in host (little-endian) order.
            raw = b"".join(
                bytes.fromhex(address[i : i + 8])[::-1] for i in range(0, len(address), 8)
            )
            ip = ipaddress.ip_address(raw)
            if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
                ip = ip.ipv4_mapped  # gRPC may serve 127.0.0.1 from a dual-stack socket
            found.add((str(ip), int(port, 16)))
    return found


def test_parsed_defaults_are_loopback():
    config = parse_config([], env={})
    assert config.address == ServerConfig().address == "127.0.0.1:50051"
    assert config.metrics_address == ServerConfig().metrics_address == "127.0.0.1:9090"


@pytest.mark.skipif(not netns_available(), reason="needs `unshare -n` (root) and `ip`")
def test_the_default_server_listens_on_loopback_only():
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEQ_")}
    script = f"ip link set lo up && exec {sys.executable} -m deq_server --device cpu"
    proc = subprocess.Popen(
        ["unshare", "-n", "sh", "-c", script],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        sockets: set[tuple[str, int]] = set()
        for _ in range(600):  # bounded: each poll waits up to 0.1 s for the process to exit
            sockets = listening(proc.pid)
            if {p for _, p in sockets} >= {50051, 9090}:
                break
            try:
                proc.wait(timeout=0.1)
            except subprocess.TimeoutExpired:
                continue
            pytest.fail(f"the server exited: {proc.stderr.read() if proc.stderr else ''}")
        assert sockets == {("127.0.0.1", 50051), ("127.0.0.1", 9090)}
    finally:
        proc.kill()
        proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()
