#!/usr/bin/env bash
# The test command of the README, run by CI as .ci/run on a fresh machine: installs everything the
# tests need, then lints and runs the whole suite. Exits non-zero on any failure (pytest's
# "no tests collected", exit 5, included).
set -euo pipefail
cd "$(dirname "$0")/.."

# CPU wheel from the local disk first: a bare torch requirement would pull a multi-GB CUDA build.
python -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
python -m pip install --quiet --disable-pip-version-check -e ".[server,dev]"

# buf (the proto linter) ships in the npm package @bufbuild/buf; kept out of the tree in .tools/.
npm install --silent --no-audit --no-fund --prefix .tools @bufbuild/buf@1.75.0 > /dev/null
.tools/node_modules/.bin/buf lint
./scripts/gen_protos.sh --check

python -m ruff check .
python -m ruff format --check .
python -m mypy server/deq_server/core
python -m mypy --strict client/deq_client
python -m pytest -q -p no:cacheprovider "$@"
