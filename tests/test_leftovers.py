"""Finding and killing what an earlier start of a run left on this host, on real processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from pilot import leftovers
from tests.helpers import wait_for
from tests.test_runner import pid_gone

RUN = leftovers.run_name("graphhash", 1234.5, "/runs/ckpt.h5")
OLD, NEW = f"{RUN}.0badc0de", f"{RUN}.5eed5eed"


@pytest.fixture
def started():
    """Starts processes (own sessions) and SIGKILLs their groups at the end, by pid."""
    procs: list[subprocess.Popen] = []

    def start(command, tag: str | None = None, user: int | None = None, **env) -> subprocess.Popen:
        full = {k: v for k, v in os.environ.items() if k != leftovers.ENV}
        if tag is not None:
            full[leftovers.ENV] = tag
        full.update(env)
        proc = subprocess.Popen(command, env=full, start_new_session=True, user=user,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs.append(proc)
        wait_for(lambda: _execd(proc.pid), 10, what=f"pid {proc.pid} started")
        return proc

    yield start
    for proc in procs:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def _execd(pid: int) -> bool:
    """The process has exec'd its program (its environ is the new one)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return not f.read().startswith(sys.executable.encode())
    except OSError:
        return False


def _runs(pid: int, program: bytes) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().startswith(program)
    except OSError:
        return False


def test_run_name_is_the_same_for_a_checkpoint_and_new_tags_differ():
    assert leftovers.run_name("graphhash", 1234.5, "/runs/ckpt.h5") == RUN
    assert leftovers.run_name("graphhash", 1234.5, "/runs/../runs/ckpt.h5") == RUN
    for other in (("graphhash", 1234.6, "/runs/ckpt.h5"), ("other", 1234.5, "/runs/ckpt.h5"),
                  ("graphhash", 1234.5, "/runs/copy.h5")):
        assert leftovers.run_name(*other) != RUN
    one, two = leftovers.new_tag(RUN), leftovers.new_tag(RUN)
    assert one != two and one.startswith(RUN + ".") and two.startswith(RUN + ".")


def test_tagged_tells_incarnations_and_runs_apart(started):
    old = started(["sleep", "60"], OLD)
    new = started(["sleep", "60"], NEW)
    other_run = started(["sleep", "60"], f"{leftovers.run_name('x', 1.0, '/x.h5')}.0badc0de")
    inside_a_value = started(["sleep", "60"], None, NOT_IT=f"{leftovers.ENV}={OLD}")
    found_others = leftovers.tagged(NEW, others=True)
    found_own = leftovers.tagged(NEW, others=False)
    assert old.pid in found_others and new.pid not in found_others
    assert new.pid in found_own and old.pid not in found_own
    for pid in (other_run.pid, inside_a_value.pid):
        assert pid not in found_others and pid not in found_own


@pytest.mark.skipif(os.getuid() != 0, reason="starting a process as another user needs root")
def test_another_users_processes_are_not_looked_at(started):
    other = started(["sleep", "60"], OLD, user=65534)   # nobody
    assert leftovers.tagged(NEW, others=True) == []
    assert leftovers.kill_tagged(NEW, others=True) == []
    assert not pid_gone(other.pid)


def test_kill_tagged_kills_the_whole_group_and_spares_the_current_start(started):
    # the shell's children: a tagged one (inherits the shell's environment) and one whose
    # environment dropped the tag; both are in the shell's process group and die with it
    shell = started(["sh", "-c", "sleep 60 & env -u PILOT_RUN sleep 61 & echo $!; wait"], OLD)
    untagged = int(shell.stdout.readline())
    wait_for(lambda: _runs(untagged, b"sleep"), 10, what="env -u to exec sleep")
    current = started(["sleep", "60"], NEW)
    killed = leftovers.kill_tagged(NEW, others=True)
    assert shell.pid in killed and untagged not in killed and current.pid not in killed
    shell.wait(timeout=10)
    wait_for(lambda: pid_gone(untagged), 10, what="the untagged child gone with its group")
    assert not pid_gone(current.pid)
    assert leftovers.tagged(NEW, others=True) == []


def test_a_sweeping_process_spares_itself_and_its_ancestors(started):
    """A rank started from a tagged shell (its environment and its parent's carry another start's
    tag) kills the shell's other child but neither itself nor the shell."""
    sweep = (f"import sys; sys.path.insert(0, {str(leftovers.__file__.rsplit('/pilot/', 1)[0])!r}); "
             f"from pilot import leftovers; print(leftovers.kill_tagged({NEW!r}, others=True))")
    shell = started(["sh", "-c", f"sleep 60 & echo $!; {sys.executable} -c \"{sweep}\"; echo done; wait"], OLD)
    sibling = int(shell.stdout.readline())
    killed = shell.stdout.readline().strip()
    assert killed == f"[{sibling}]", killed
    assert shell.stdout.readline().strip() == "done"   # the shell itself went on
    wait_for(lambda: pid_gone(sibling), 10, what="the sibling gone")


def test_a_group_led_by_an_untagged_process_is_not_killed(started):
    """As an LSST warm server (tagged) in its agent's process group (the agent is not): only the
    tagged process dies."""
    leader = started(["sh", "-c", f"{leftovers.ENV}={OLD} sleep 60 & echo $!; exec sleep 61"])
    tagged_child = int(leader.stdout.readline())
    wait_for(lambda: _runs(tagged_child, b"sleep"), 10, what="the tagged child to exec sleep")
    wait_for(lambda: _runs(leader.pid, b"sleep"), 10, what="the leader to exec sleep")
    assert leftovers.kill_tagged(NEW, others=True) == [tagged_child]
    wait_for(lambda: pid_gone(tagged_child), 10, what="the tagged child gone")
    assert leader.poll() is None


def test_the_sweep_of_its_own_start_takes_only_session_leaders(started):
    """At the end of a run: a daemon (a session of its own) goes, a process of this start inside
    another's session (as a warm server in its agent's) stays."""
    daemon = started(["sleep", "60"], NEW)   # started in a new session
    leader = started(["sh", "-c", f"{leftovers.ENV}={NEW} sleep 60 & echo $!; exec sleep 61"])
    inside = int(leader.stdout.readline())
    wait_for(lambda: _runs(inside, b"sleep"), 10, what="the tagged child to exec sleep")
    assert leftovers.kill_tagged(NEW, others=False) == [daemon.pid]
    daemon.wait(timeout=10)
    assert not pid_gone(inside)


def test_without_proc_nothing_is_found(tmp_path):
    assert leftovers.tagged(NEW, others=True, proc=str(tmp_path / "no-proc")) == []
    assert leftovers.kill_tagged(NEW, others=True, proc=str(tmp_path / "no-proc")) == []
