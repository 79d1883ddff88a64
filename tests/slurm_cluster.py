"""The local Slurm cluster (slurm/local-cluster.sh) as a session fixture, and helpers for jobs on it.

The fixture starts the cluster once per session and stops it at the end (by the script's pid files);
a cluster that was already up before the session is left running. Without root, or with Slurm
missing and no apt-get to install it, the tests that use it are skipped.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.helpers import PAYLOAD, ROOT, mpi_env, wait_for

SCRIPT = ROOT / "slurm" / "local-cluster.sh"
DATA = ROOT / "tests" / "data" / "slurm"
NODES = {"n1", "n2", "n3", "n4"}


def unavailable_reason() -> str | None:
    """Why the local cluster cannot run here, or None."""
    if os.geteuid() != 0:
        return "the local Slurm cluster needs root (its slurmd daemons run as root)"
    if not shutil.which("slurmctld") and not shutil.which("apt-get"):
        return "slurm-wlm is not installed and apt-get is not available to install it"
    if not PAYLOAD.exists():
        return f"the native payload {PAYLOAD} is not built (scripts/setup.sh builds it)"
    return None


def _cluster(command: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(SCRIPT), command], capture_output=True, text=True, timeout=timeout)


def _slurm_conf() -> str:
    out = subprocess.run(["bash", "-c", f'eval "$({SCRIPT} env)" && printf %s "$SLURM_CONF"'],
                         capture_output=True, text=True, check=True)
    return out.stdout


@pytest.fixture(scope="session")
def slurm_env():
    """Environment for Slurm commands and `pilot` against the running local cluster."""
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    from tests.test_transport import cleanup_shm, shm_segments

    was_up = _cluster("status", timeout=30).returncode == 0
    before = shm_segments()
    started = _cluster("start")
    if started.returncode != 0:
        pytest.fail(f"slurm/local-cluster.sh start failed: {started.stderr.strip()}")
    yield mpi_env(SLURM_CONF=_slurm_conf())
    if not was_up:
        stopped = _cluster("stop", timeout=120)
        assert stopped.returncode == 0, stopped.stderr
    cleanup_shm(before)   # what the ranks of cancelled jobs could not remove


def fill_workflow(name: str, folder: Path) -> tuple[Path, Path]:
    """Copy tests/data/slurm/NAME.yaml into ``folder`` with the payload and a record file filled in."""
    records = folder / "records.txt"
    text = (DATA / f"{name}.yaml").read_text()
    path = folder / f"{name}.yaml"
    path.write_text(text.replace("@PAYLOAD@", str(PAYLOAD)).replace("@RECORD@", str(records)))
    return path, records


def read_records(path: Path) -> list[dict]:
    """The payload's records: one dict per finished task attempt."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        task, node, attempt, start, end, pid, memory = line.split()
        rows.append(dict(task=task, node=node, attempt=int(attempt), start=float(start), end=float(end),
                         pid=int(pid), memory_mb=int(memory)))
    return rows


def peak_memory_per_node(rows: list[dict]) -> dict[str, int]:
    """Largest sum of memory requests of tasks running at one instant, per node (ends before starts)."""
    peaks = {}
    for node in {r["node"] for r in rows}:
        events = sorted([(r["start"], 1, r["memory_mb"]) for r in rows if r["node"] == node]
                        + [(r["end"], 0, -r["memory_mb"]) for r in rows if r["node"] == node])
        level = peak = 0
        for _, _, delta in events:
            level += delta
            peak = max(peak, level)
        peaks[node] = peak
    return peaks


def pilot(env: dict, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run the pilot CLI from the venv."""
    return subprocess.run([str(Path(env["PATH"].split(":")[0]) / "pilot"), *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


def chain_end(run_dir: Path, job: str):
    """The chain's end record of ``job``, or None."""
    from pilot.slurm_jobs import read_chain
    return next((r for r in read_chain(run_dir) if r["event"] == "end" and r["job"] == job), None)


def wait_chain_done(run_dir: Path, first_job: str, timeout: float) -> list[dict]:
    """Wait until the chain started by ``first_job`` ended without a successor; returns its end records."""
    from pilot.slurm_jobs import read_chain

    def done():
        records = read_chain(run_dir)
        begin = next(i for i, r in enumerate(records) if r["event"] == "submit" and r["job"] == first_job)
        ends = [r for r in records[begin:] if r["event"] == "end"]
        return ends if ends and not ends[-1]["next"] else None
    return wait_for(done, timeout, interval=0.5, what=f"the chain of job {first_job} to finish")


def cancel_leftovers(env: dict, run_dir: Path) -> None:
    """scancel whatever a failed test left queued or running in ``run_dir``'s chain."""
    from pilot.slurm_jobs import chain_jobs, read_chain
    jobs = chain_jobs(read_chain(run_dir))
    if jobs:
        subprocess.run(["scancel", "--signal=KILL", *jobs], env=env, capture_output=True)
        subprocess.run(["scancel", *jobs], env=env, capture_output=True)
