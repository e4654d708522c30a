#!/usr/bin/env bash
# The test command of the README, run by CI as .ci/run on a fresh machine: installs everything the
# tests need, then lints and runs the whole suite. Exits non-zero on any failure (pytest's
# "no tests collected", exit 5, included).
set -euo pipefail
cd "$(dirname "$0")/.."

# CPU wheel from the local disk first: a bare torch requirement would pull a multi-GB CUDA build.
python -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
python -m pip install --quiet --disable-pip-version-check -e ".[server,dev,bench]"
# A cell shipped as an installed package (tests/plugins/example_cells), registered through the
# `deq_serve.cells` entry-point group, for the bring-your-own-cell tests.
python -m pip install --quiet --disable-pip-version-check --no-deps ./tests/plugins/example_cells

# The KServe SDK, for the tests that load the KServe manifests into its models, in a venv of its
# own under .tools/: it ships its own `inference` protobuf package, which cannot share a process
# with the server's stubs, and a web stack the project does not use. Kept while the version holds.
kserve_python=.tools/kserve-venv/bin/python
if ! "$kserve_python" -c 'import importlib.metadata as m; assert m.version("kserve") == "0.21.0"' 2> /dev/null; then
  python -m venv --clear .tools/kserve-venv
  "$kserve_python" -m pip install --quiet --disable-pip-version-check "kserve==0.21.0"
fi

# buf (the proto linter) ships in the npm package @bufbuild/buf; kept out of the tree in .tools/.
# npm comes with the machine's Node.js; Debian's packages where it does not.
if ! command -v npm > /dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm > /dev/null
fi
npm install --silent --no-audit --no-fund --prefix .tools @bufbuild/buf@1.75.0 > /dev/null
.tools/node_modules/.bin/buf lint
./scripts/gen_protos.sh --check

python -m ruff check .
python -m ruff format --check .
python -m mypy server/deq_server/core
python -m mypy --strict client/deq_client
# The deployment tests run real programs: a Docker engine and docker-compose (the image and the
# compose stack), debootstrap (their local base image, since no image registry is reachable), and
# Prometheus with promtool (the dashboard's and the alerts' queries, the rules' unit tests). The
# compiled-step tests need a C++ compiler (torch's code generation calls g++).
missing=""
for tool in dockerd docker-compose debootstrap prometheus promtool g++; do
  command -v "$tool" > /dev/null || missing="$missing $tool"
done
if [ -n "$missing" ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
    docker.io docker-compose debootstrap prometheus g++ > /dev/null
fi
# Start an engine in the background unless one answers; it stops with this script. If it cannot
# start, the Docker tests are reported as SKIPPED with the reason (pytest -ra), never passed.
if ! docker info > /dev/null 2>&1; then
  dockerd > "${TMPDIR:-/tmp}/deq-serve-dockerd.log" 2>&1 &
  dockerd_pid=$!
  trap 'kill "$dockerd_pid" 2> /dev/null || true; wait "$dockerd_pid" 2> /dev/null || true' EXIT
  for _ in $(seq 120); do # bounded: up to a minute
    if docker info > /dev/null 2>&1 || ! kill -0 "$dockerd_pid" 2> /dev/null; then break; fi
    sleep 0.5
  done
fi

python -m pytest -q -p no:cacheprovider "$@"
