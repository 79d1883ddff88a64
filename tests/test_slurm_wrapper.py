"""The batch script's rank wrapper under MPICH's mpiexec: the drain signal reaches the rank once,
rank 0's node, pid and exit code are kept."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from pilot.slurm_script import RANK_WRAPPER
from tests.helpers import MPIEXEC, mpi_env, wait_for

pytestmark = pytest.mark.mpi

# Counts the USR1 it gets; exits 3 (drained) half a second after the first one.
RANK_PROGRAM = """
import os, signal, sys, time
got = []
signal.signal(signal.SIGUSR1, lambda *_: got.append(time.time()))
out = os.path.join(sys.argv[1], "rank." + os.environ["PMI_RANK"])
open(out + ".ready", "w").write(str(os.getpid()))
deadline = time.time() + 60
while time.time() < deadline and not (got and time.time() > got[0] + 0.5):
    time.sleep(0.02)
open(out + ".signals", "w").write(str(len(got)))
sys.exit(3 if got else 9)
"""


def test_wrapper_keeps_rank0_exit_code_and_signal_arrives_once(tmp_path):
    (tmp_path / "rank.py").write_text(RANK_PROGRAM)
    env = mpi_env(PILOT_RANK0_PID=str(tmp_path / "rank0.pid"), PILOT_RANK0_RC=str(tmp_path / "rank0.rc"),
                  SLURMD_NODENAME="nodeA")
    launcher = subprocess.Popen([str(MPIEXEC), "-launcher", "fork", "-n", "2", "bash", "-c", RANK_WRAPPER,
                                 "pilot-rank", sys.executable, str(tmp_path / "rank.py"), str(tmp_path)], env=env)
    try:
        wait_for(lambda: all((tmp_path / f"rank.{r}.ready").exists() for r in "01"), 30, what="both ranks")
        wait_for(lambda: (tmp_path / "rank0.pid").exists(), 10, what="rank 0's pid file")
        node, pid = (tmp_path / "rank0.pid").read_text().split()
        assert (node, pid) == ("nodeA", (tmp_path / "rank.0.ready").read_text())
        launcher.send_signal(signal.SIGUSR1)      # what the batch shell does when rank 0 is elsewhere
        assert launcher.wait(timeout=30) == 3
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
    assert (tmp_path / "rank0.rc").read_text().strip() == "3"
    assert [(tmp_path / f"rank.{r}.signals").read_text() for r in "01"] == ["1", "1"]
