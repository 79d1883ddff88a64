#!/usr/bin/env bash
# Set up everything the test suite needs, then run the whole suite.
# Extra arguments go to pytest (for example: scripts/test.sh -k engine).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
