#!/usr/bin/env bash
# Install the packages only the benchmarks need (Parsl, for benchmarks/bench_peers.py) into
# the project's .venv. Idempotent: installs nothing when they already import. Run
# scripts/setup.sh first.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    echo "no .venv: run scripts/setup.sh first" >&2
    exit 2
fi
if .venv/bin/python -c "import parsl.executors" 2>/dev/null; then
    echo "parsl already installed: $(.venv/bin/python -c 'import parsl; print(parsl.__version__)')"
    exit 0
fi
.venv/bin/pip install --quiet --disable-pip-version-check parsl
echo "parsl installed: $(.venv/bin/python -c 'import parsl; print(parsl.__version__)')"
