"""One pilot per checkpoint: a live holder is named and refused; a dead one is taken over."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from pilot.checkpoint import open_checkpoint
from pilot.errors import UserError
from pilot.graph import make_graph
from pilot.lock import STALE_AFTER_S, acquire, read_holder
from tests.helpers import ROOT

HOLDER = """
import sys
from pilot.checkpoint import open_checkpoint
from pilot.graph import make_graph
graph = make_graph(["a", "b"], ["x", "x"], [[], [0]], memory_mb=10)
ck = open_checkpoint(sys.argv[1], graph)
print("held", flush=True)
sys.stdin.read()
"""


def graph():
    return make_graph(["a", "b"], ["x", "x"], [[], [0]], memory_mb=10)


@pytest.fixture
def holder(tmp_path):
    """A real pilot process holding the checkpoint's lock (Slurm job id set); killed by pid."""
    path = tmp_path / "c.h5"
    env = dict(os.environ, SLURM_JOB_ID="4242", PYTHONPATH=str(ROOT))
    child = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, env=env, cwd=ROOT)
    assert child.stdout.readline().strip() == b"held"
    yield path, child
    if child.poll() is None:
        os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=30)


def test_second_pilot_is_refused_naming_the_holder(holder):
    path, child = holder
    with pytest.raises(UserError) as err:
        open_checkpoint(path, graph())
    message = str(err.value)
    assert "\n" not in message
    assert f"pid {child.pid}" in message and socket.gethostname() in message
    assert "Slurm job 4242" in message


def test_lock_of_a_killed_run_is_taken_over(holder):
    path, child = holder
    before = read_holder(str(path) + ".lock")
    assert before["pid"] == child.pid
    os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=30)
    ck = open_checkpoint(path, graph())
    assert ck.restored is not None
    assert read_holder(str(path) + ".lock")["pid"] == os.getpid()
    ck.close()
    assert read_holder(str(path) + ".lock") == {}


def _foreign(path: str, age: float) -> None:
    with open(path, "w") as f:
        json.dump({"host": "another-node", "pid": 1, "slurm_job_id": "77", "since": 0}, f)
    then = time.time() - age
    os.utime(path, (then, then))


def test_holder_on_another_host_with_a_fresh_heartbeat_is_refused(tmp_path):
    path = str(tmp_path / "c.h5.lock")
    _foreign(path, age=5)
    with pytest.raises(UserError, match="pid 1 on host another-node .Slurm job 77., seen"):
        acquire(path, "c.h5")


def test_stale_holder_on_another_host_is_taken_over(tmp_path):
    path = str(tmp_path / "c.h5.lock")
    _foreign(path, age=STALE_AFTER_S + 5)
    lock = acquire(path, "c.h5")
    assert read_holder(path)["pid"] == os.getpid()
    lock.release()


def test_record_of_a_dead_pid_on_this_host_is_taken_over(tmp_path):
    path = str(tmp_path / "c.h5.lock")
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    with open(path, "w") as f:
        json.dump({"host": socket.gethostname(), "pid": child.pid}, f)
    lock = acquire(path, "c.h5")
    assert read_holder(path)["pid"] == os.getpid()
    lock.release()


def test_checkpoint_in_a_missing_folder_is_one_line(tmp_path):
    with pytest.raises(UserError, match="cannot create the lock file .*No such file or directory"):
        open_checkpoint(tmp_path / "missing" / "c.h5", graph())
