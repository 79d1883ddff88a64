#!/usr/bin/env bash
# Set up what pilot needs, then run the example workflow on 3 MPI ranks (a master and two agents,
# each agent emulating a node of its own), show its status table, and leave the checkpoint and
# logs under runs/example/. Running it again resumes from the checkpoint (nothing is redone).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH" HYDRA_LAUNCHER=fork \
       MPIR_CVAR_CH4_PROGRESS_THROTTLE=1 MPIR_CVAR_CH4_PROGRESS_THROTTLE_NO_PROGRESS_COUNT=1
workflow="${1:-examples/diamond.yaml}"
mkdir -p runs/example
rc=0
mpiexec -n 3 pilot run "$workflow" --checkpoint runs/example/checkpoint.h5 \
    --node-per-rank --node-memory 4096 --node-cores 2 || rc=$?
pilot status runs/example/checkpoint.h5
exit "$rc"
