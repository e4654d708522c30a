"""`deq-healthcheck` (also `python -m deq_server.healthcheck`): the container's HEALTHCHECK probe.

Asks the server's gRPC health service (`grpc.health.v1.Health/Check`, through the SDK's
`DEQClient.health`) for the status of the whole server and exits 0 when it is SERVING, 1 otherwise
(NOT_SERVING while draining, unreachable, timed out). Docker needs no downloaded probe binary.

The target follows the server's own configuration, so one image works whatever address the
container is given: `--target`, else `DEQ_HEALTHCHECK_TARGET`, else `DEQ_ADDRESS` (the address the
server listens on) with a wildcard host (0.0.0.0, [::]) turned into loopback. When the server
serves TLS (`DEQ_TLS_CERT`), the probe trusts that certificate. Only the thin client is imported
(no torch), so a probe costs a fraction of a second.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence

from deq_client import DEQClient, DEQError
from deq_server.serving.config import ServerConfig, env_name

_WILDCARDS = {"", "0.0.0.0", "::", "[::]"}


def probe_target(listen_address: str) -> str:
    """The address to dial for a server listening on `listen_address` (HOST:PORT)."""
    host, _, port = listen_address.rpartition(":")
    if host in _WILDCARDS:
        host = "127.0.0.1"
    return f"{host}:{port}"


def _parser(env: Mapping[str, str]) -> argparse.ArgumentParser:
    listen = env.get(env_name("address"), ServerConfig.address)
    parser = argparse.ArgumentParser(
        prog="deq-healthcheck",
        description="Exit 0 if the deq-server's gRPC health service reports SERVING, else 1.",
    )
    parser.add_argument(
        "--target",
        default=env.get("DEQ_HEALTHCHECK_TARGET") or probe_target(listen),
        help="HOST:PORT to probe (env DEQ_HEALTHCHECK_TARGET; default: DEQ_ADDRESS on loopback)",
    )
    parser.add_argument(
        "--service", default="", help="service name to check ('' = the whole server)"
    )
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds for the check")
    parser.add_argument(
        "--tls-cert",
        default=env.get(env_name("tls_cert")) or None,
        help="PEM certificate to trust: the server's --tls-cert (env DEQ_TLS_CERT)",
    )
    return parser


def check(
    target: str, *, service: str = "", timeout: float = 3.0, tls_cert: str | None = None
) -> str:
    """The serving status name of `service` at `target`; raises DEQError if the call fails."""
    with DEQClient(target, timeout=timeout, retries=0, root_certificates=tls_cert) as client:
        return client.health(service)


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    """Probe once; print the status (or the failure) and return the exit code."""
    args = _parser(os.environ if env is None else env).parse_args(argv)
    try:
        status = check(
            args.target, service=args.service, timeout=args.timeout, tls_cert=args.tls_cert
        )
    except (DEQError, OSError) as error:  # OSError: an unreadable --tls-cert
        print(f"{args.target}: {error}", file=sys.stderr)
        return 1
    print(f"{args.target}: {status}")
    return 0 if status == "SERVING" else 1


def entry_point() -> None:
    """Console-script entry: exit with the probe's code."""
    sys.exit(main())


if __name__ == "__main__":
    entry_point()
