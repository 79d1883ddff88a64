"""Processes that an earlier start of a run left on a host, found by the tag its tasks carry.

Every attempt's environment has ``PILOT_RUN=<run>.<incarnation>``: ``<run>`` names the
checkpoint (the same on every restart of it), ``<incarnation>`` one start of ``pilot run``.
A task's main process dies with its agent (a parent-death signal) and Slurm ends every process
of a step, but what a task starts itself (a shell's children, a pipeline's workers, a daemon)
outlives a dead agent outside a Slurm step, and would then run beside the restarted attempt:
twice the work on the same outputs, and memory the scheduler does not count. So:

- once rank 0 holds the checkpoint's lock (no other start of the run is alive), every rank
  kills the processes on its host tagged with the same run and another incarnation;
- at the end of a run every agent kills those of its own incarnation that lead a session of
  their own: what a task started in a new session (a daemon) is out of reach of the end of the
  task's process group. (Other processes of this start may still be about then, the LSST warm
  servers of the host's agents among them: those are left alone.)

A process is found by reading ``/proc/<pid>/environ`` (the environment it started with), among
the processes of this user. The ranks themselves and their ancestors are never touched, nor any
process group but one a tagged process leads.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import signal
import socket
import time

log = logging.getLogger("pilot.leftovers")
ENV = "PILOT_RUN"
KILL_DEADLINE_S = 5.0   # how long a sweep keeps killing what it finds (a task may fork meanwhile)


def run_name(graph_hash: str, created: float, checkpoint: str) -> str:
    """The ``<run>`` part of the tag: the same for every start of one checkpoint (its workflow's
    hash, its creation time and its real path: a copy of it is another run)."""
    key = f"{graph_hash}:{created!r}:{os.path.realpath(checkpoint)}"
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def new_tag(run: str) -> str:
    """``<run>.<incarnation>`` for a new start of ``run``."""
    return f"{run}.{secrets.token_hex(4)}"


def tagged(tag: str, others: bool, proc: str = "/proc") -> list[int]:
    """Pids of this user's processes on this host tagged with ``tag``'s run: of another
    incarnation (``others``) or of ``tag``'s own. This process and its ancestors are left out."""
    return _found(_matcher(tag, others), proc)


def _found(matches, proc: str) -> list[int]:
    """Pids of this user's processes that ``matches`` takes, but this one and its ancestors."""
    spared, uid = _self_and_ancestors(proc), os.getuid()
    found = []
    try:
        names = os.listdir(proc)
    except OSError:   # no /proc: nothing can be found
        return found
    for name in names:
        # The owner first: a stat does not touch the process's memory, as reading its environ
        # does (which waits on a process stuck with its memory map locked).
        if name.isdigit() and int(name) not in spared and _owner(f"{proc}/{name}") == uid \
                and matches(int(name), proc):
            found.append(int(name))
    return found


def _matcher(tag: str, others: bool):
    """``matches(pid, proc)``: whether the process is tagged with ``tag``'s run and another
    incarnation (``others``) or ``tag``'s own."""
    run, _, incarnation = tag.partition(".")
    needle = f"{ENV}={run}.".encode()

    def matches(pid: int, proc: str) -> bool:
        value = _tag_of(f"{proc}/{pid}/environ", needle)
        return value is not None and (value != incarnation) == others
    return matches


def _owner(path: str) -> int:
    try:
        return os.stat(path).st_uid
    except OSError:
        return -1


def _tag_of(path: str, needle: bytes) -> str | None:
    """The incarnation in the process's ``PILOT_RUN`` if it names the run in ``needle``."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:   # gone, or another user's
        return None
    at = data.find(needle)
    while at > 0 and data[at - 1] != 0:   # inside another variable's value
        at = data.find(needle, at + 1)
    if at < 0:
        return None
    end = data.find(b"\0", at)
    return data[at + len(needle):end if end >= 0 else len(data)].decode(errors="replace")


def _stat_fields(pid: int, proc: str) -> list[bytes]:
    """The fields of ``/proc/<pid>/stat`` after the command: state, ppid, pgrp, session, ...
    ([] if the process is gone)."""
    try:
        with open(f"{proc}/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return []


def _session_of(pid: int, proc: str) -> int:
    fields = _stat_fields(pid, proc)
    return int(fields[3]) if len(fields) > 3 else 0


def _self_and_ancestors(proc: str) -> set[int]:
    pids, pid = set(), os.getpid()
    while pid > 1 and pid not in pids:
        pids.add(pid)
        fields = _stat_fields(pid, proc)
        if len(fields) < 2:
            break
        pid = int(fields[1])
    return pids


def kill_tagged(tag: str, others: bool, deadline_s: float = KILL_DEADLINE_S, proc: str = "/proc") -> list[int]:
    """SIGKILL what :func:`tagged` finds (of ``tag``'s own start: only session leaders) until
    nothing is found or the deadline passes; the pids killed. A found process that leads its
    process group (a task, which starts in a session of its own) takes its group with it; a group
    led by anything else is not touched (a warm server is in its agent's group)."""
    matches = _matcher(tag, others)
    killed: list[int] = []
    end = time.monotonic() + deadline_s
    while True:
        found = _found(matches, proc)
        if not others:
            found = [pid for pid in found if _session_of(pid, proc) == pid]
        if not found or time.monotonic() >= end:
            return killed
        for pid in found:
            if _kill(pid, matches, proc) and pid not in killed:
                killed.append(pid)
        time.sleep(0.01)   # let SIGKILL land before looking again (a dead process has no environ)


def _kill(pid: int, matches, proc: str) -> bool:
    """SIGKILL ``pid``, with its group if it leads one, if it is still a process ``matches``
    takes: its pidfd pins the process, so a pid reused since the scan is not hit."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:   # gone
        return False
    try:
        if not matches(pid, proc):
            return False
        if os.getpgid(pid) == pid:
            os.killpg(pid, signal.SIGKILL)
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        return True
    except (ProcessLookupError, PermissionError):
        return False
    finally:
        os.close(pidfd)


def sweep(tag: str, others: bool) -> None:
    """:func:`kill_tagged`, said in the log when it killed anything."""
    killed = kill_tagged(tag, others)
    if killed:
        what = "an earlier start of this run" if others else "this run's tasks"
        shown = " ".join(map(str, killed[:20])) + (" ..." if len(killed) > 20 else "")
        log.warning("killed %d processes %s left on %s (pids %s)", len(killed), what, socket.gethostname(), shown)
