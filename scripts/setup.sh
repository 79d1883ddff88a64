#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv with an MPI runtime
# (the `mpich` wheel ships mpiexec), then install pilot in editable mode with its test
# extras (which builds pilot._launch, the C extension tasks start through) and build the native
# test payload. Safe to run again: it skips work already done.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PILOT_PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
stamp=.venv/.pilot-installed
if [ ! -f "$stamp" ] || [ -n "$(find pyproject.toml setup.py native -newer "$stamp" 2>/dev/null)" ]; then
    .venv/bin/pip install --quiet --disable-pip-version-check --upgrade pip
    .venv/bin/pip install --quiet --disable-pip-version-check -e '.[test,mpich]'
    touch "$stamp"
fi
# The native payload (a precise test task) is built with CMake into build/native.
if command -v cmake >/dev/null 2>&1; then
    cmake -S . -B build/native -DCMAKE_BUILD_TYPE=Release >/dev/null
    cmake --build build/native >/dev/null
fi
