#!/usr/bin/env bash
# Create (or refresh) .venv-lsst: a second virtual environment on Python >= 3.12 (the current
# Rubin middleware releases need it) with pilot installed in editable mode plus its test, mpich
# and lsst extras. Safe to run again: a stamp file skips the install when nothing changed.
# The interpreter is $PILOT_LSST_PYTHON, else pyenv's newest 3.12.x/3.13.x, else python3.12.
set -euo pipefail
cd "$(dirname "$0")/.."

find_python() {
    if [ -n "${PILOT_LSST_PYTHON:-}" ]; then echo "$PILOT_LSST_PYTHON"; return; fi
    if command -v pyenv >/dev/null 2>&1; then
        local root; root="$(pyenv root)"
        local v
        for v in $(ls "$root/versions" 2>/dev/null | grep -E '^3\.1[23]\.[0-9]+$' | sort -V -r); do
            echo "$root/versions/$v/bin/python3"; return
        done
    fi
    command -v python3.12 || command -v python3.13 || { echo "no Python >= 3.12 found" >&2; exit 1; }
}

if [ ! -x .venv-lsst/bin/python ]; then
    "$(find_python)" -m venv .venv-lsst
fi
stamp=.venv-lsst/.pilot-installed
if [ ! -f "$stamp" ] || [ -n "$(find pyproject.toml setup.py native -newer "$stamp" 2>/dev/null)" ]; then
    .venv-lsst/bin/pip install --quiet --disable-pip-version-check --upgrade pip
    .venv-lsst/bin/pip install --quiet --disable-pip-version-check -e '.[test,mpich,lsst]'
    touch "$stamp"
fi
