"""One task attempt as a subprocess: launch, watch memory and time, classify the end.

A :class:`Runner` never blocks: the agent calls :meth:`Runner.observe` with memory samples
and :meth:`Runner.poll` until it returns the attempt's :class:`~pilot.events.TaskFinished`.

- The task runs in its own session and process group (a list command as argv, a string
  through ``/bin/sh -c``); stdout and stderr go to one log file. It is started by
  :mod:`pilot.spawn` (a vfork and exec in C): stdin from /dev/null, signal
  dispositions and mask as subprocess gives them, and no descriptor but 0-2 inherited (MPI's
  among them).
- Memory: the resident memory of the whole process tree (the task and all its descendants,
  found through ``/proc/<pid>/task/*/children``) is summed from ``/proc/<pid>/stat``. Over
  ``memory_mb * tolerance`` (default 1.10) the group is killed with SIGKILL: ``Failure.OOM``.
  A task killed by SIGKILL while the cgroup's ``oom_kill`` counter went up is OOM as well
  (the counter before the launch is shared by the launches of the same ~10 ms; the one after
  a SIGKILL death is read afresh).
- Time: over ``timeout`` seconds the group gets SIGTERM, then SIGKILL after a grace period:
  ``Failure.TIMEOUT``.
- When the task's main process ends, whatever is left in its process group is killed.
- Peak RSS is the largest sample (``ru_maxrss`` is useless here: a child spawned from Python
  inherits the parent's high-water mark across exec). CPU time is the task's user+system time
  including the descendants it waited for (``wait4``).
"""

from __future__ import annotations

import functools
import math
import os
import signal
import sys
import time
from dataclasses import dataclass

from pilot import leftovers, nodes
from pilot.events import Failure, TaskFinished, TaskStarted, new_task_finished, new_task_started
from pilot.protocol import RunTask
from pilot.spawn import launch_native, native_usable, program_of, reap, spawn_posix

PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024
OOM_READ_MAX_AGE = 0.01   # seconds: launches this close together share one read of the OOM counter
# Launcher variables of the pilot's own MPI job: a task that uses MPI itself must not see them.
MPI_ENV_PREFIXES = ("PMI_", "PMIX_", "HYDI_", "HYDRA_", "MPI_LOCAL", "OMPI_", "PRTE_")


@dataclass(frozen=True)
class WatchConfig:
    """How attempts are watched.

    tolerance: a task may use ``memory_mb * tolerance`` before it is killed.
    sample_interval: seconds between memory samples (the agent scans /proc this often).
    kill_grace: seconds between SIGTERM and SIGKILL for timeouts and interruptions.
    """

    tolerance: float = 1.10
    sample_interval: float = 0.5
    kill_grace: float = 2.0


# ---- process table ------------------------------------------------------------------


class ProcessTable:
    """A snapshot of every process (``pid -> (ppid, pgid, rss_kb)``) from one pass over /proc."""

    def __init__(self, table: dict[int, tuple[int, int, int]]):
        self.table = table
        self.children: dict[int, list[int]] = {}
        self.groups: dict[int, list[int]] = {}
        for pid, (ppid, pgid, _) in table.items():
            self.children.setdefault(ppid, []).append(pid)
            self.groups.setdefault(pgid, []).append(pid)

    @classmethod
    def scan(cls, proc: str = "/proc") -> "ProcessTable":
        table = {}
        for entry in os.scandir(proc):
            if entry.name.isdigit():
                row = _stat_row(f"{proc}/{entry.name}/stat")
                if row is not None:
                    table[int(entry.name)] = row
        return cls(table)

    @classmethod
    def of_trees(cls, roots, proc: str = "/proc") -> "ProcessTable":
        """Only the processes under ``roots``, found through ``/proc/<pid>/task/*/children``
        (far cheaper than :meth:`scan` on a host with many other processes); falls back to a
        full scan where the kernel lacks those files."""
        table: dict[int, tuple[int, int, int]] = {}
        stack = list(roots)
        while stack:
            pid = stack.pop()
            row = _stat_row(f"{proc}/{pid}/stat")
            if row is None or pid in table:
                continue
            table[pid] = row
            kids = _children(proc, pid)
            if kids is None:
                return cls.scan(proc)
            stack.extend(kids)
        return cls(table)

    def tree(self, root: int, pgid: int) -> set[int]:
        """The descendants of ``root`` (itself included) and every member of group ``pgid``."""
        found: set[int] = set()
        stack = [root] if root in self.table else []
        while stack:
            pid = stack.pop()
            found.add(pid)
            stack.extend(c for c in self.children.get(pid, ()) if c not in found)
        return found.union(self.groups.get(pgid, ()))

    def rss_mb(self, root: int, pgid: int) -> float:
        """Resident memory (MB) of the tree rooted at ``root`` plus its process group."""
        return sum(self.table[pid][2] for pid in self.tree(root, pgid)) / 1024.0


def _children(proc: str, pid: int) -> list[int] | None:
    """Children of every thread of ``pid`` ([] if it is gone; None if the kernel cannot say)."""
    try:
        threads = os.listdir(f"{proc}/{pid}/task")
    except OSError:
        return []
    kids: list[int] = []
    for tid in threads:
        try:
            with open(f"{proc}/{pid}/task/{tid}/children", "rb") as f:
                kids.extend(int(k) for k in f.read().split())
        except FileNotFoundError:
            if not os.path.exists(f"{proc}/{pid}/task/{tid}"):
                continue
            return None
        except OSError:
            continue
    return kids


def _stat_row(path: str) -> tuple[int, int, int] | None:
    try:
        with open(path, "rb") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rfind(b")") + 2:].split()
    return int(fields[1]), int(fields[2]), int(fields[21]) * PAGE_KB


# ---- environment and logs -----------------------------------------------------------


_run_tag: list[str] = []   # the run's PILOT_RUN (see pilot.leftovers), once the master gave it


def set_run_tag(tag: str | None) -> None:
    """Every attempt launched from now on carries ``PILOT_RUN=tag`` (see :mod:`pilot.leftovers`;
    None: no tag)."""
    _run_tag[:] = [tag] if tag else []
    for cached in (_agent_env, _agent_envb, _shape_entries, _shape_envb, _shape_environ):
        cached.cache_clear()


def run_tag_env() -> dict[str, str]:
    """``{"PILOT_RUN": tag}`` once the run's tag is set, else {}."""
    return {leftovers.ENV: _run_tag[0]} if _run_tag else {}


@functools.lru_cache(maxsize=1)
def _agent_env() -> dict[str, str]:
    # Cached once per process; callers copy it.
    env = {k: v for k, v in os.environ.items() if not k.startswith(MPI_ENV_PREFIXES)}
    env.update(run_tag_env())
    return env


FS_ENCODING, FS_ERRORS = sys.getfilesystemencoding(), sys.getfilesystemencodeerrors()   # as os.fsencode


@functools.lru_cache(maxsize=1)
def _agent_envb() -> dict[bytes, bytes]:
    # Bytes spare the encoding of ~100 variables on every launch.
    return {os.fsencode(k): os.fsencode(v) for k, v in _agent_env().items()}


def _attempt_vars(run: RunTask) -> dict[str, str]:
    """What an attempt adds to the agent's environment: PILOT_* and the task's own ``env``."""
    extra = {
        "PILOT_TASK_ID": run.task_id, "PILOT_LABEL": run.label, "PILOT_ATTEMPT": str(run.attempt),
        "PILOT_NODE": run.node_name, "PILOT_MEMORY_MB": str(run.memory_mb), "PILOT_CPUS": str(run.cpus),
        "OMP_NUM_THREADS": str(run.cpus),
    }
    if run.env:
        extra.update({str(k): str(v) for k, v in run.env.items()})
    return extra


def task_env(run: RunTask, base=None) -> dict[str, str]:
    """The attempt's environment: the agent's (without MPI launcher variables) plus PILOT_*."""
    if base is None:
        env = _agent_env().copy()
    else:
        env = {k: v for k, v in base.items() if not k.startswith(MPI_ENV_PREFIXES)}
    env.update(_attempt_vars(run))
    return env


def _task_envb(run: RunTask) -> dict[bytes, bytes]:
    """:func:`task_env` of the agent's environment, encoded (for posix_spawn)."""
    if run.env:
        return _encoded_with(_attempt_vars(run))
    # Without a task env only the id and the attempt differ between the launches of one label on
    # one node: the rest is encoded once.
    env = _shape_envb(run.label, run.node_name, run.memory_mb, run.cpus).copy()
    env[b"PILOT_TASK_ID"] = run.task_id.encode(FS_ENCODING, FS_ERRORS)
    env[b"PILOT_ATTEMPT"] = b"%d" % run.attempt
    return env


def _task_env_entries(run: RunTask) -> tuple[list[bytes], bytes | None]:
    """:func:`task_env` of the agent's environment as ``b"NAME=value"`` entries (for the native launch),
    and its PATH."""
    if run.env:
        env = _task_envb(run)
        if any(not k or b"=" in k for k in env):
            raise ValueError("illegal environment variable name")
        return [k + b"=" + v for k, v in env.items()], env.get(b"PATH")
    shared, path = _shape_entries(run.label, run.node_name, run.memory_mb, run.cpus)
    return shared + _own_entries(run), path


def _own_entries(run: RunTask) -> list[bytes]:
    """The entries of :func:`task_env` that differ between launches of one shape: id and attempt."""
    return [b"PILOT_TASK_ID=" + run.task_id.encode(FS_ENCODING, FS_ERRORS), b"PILOT_ATTEMPT=%d" % run.attempt]


@functools.lru_cache(maxsize=256)
def _shape_entries(label: str, node_name: str, memory_mb: int, cpus: int) -> tuple[list[bytes], bytes | None]:
    """The entries of :func:`_shape_envb` but the id and the attempt, and the PATH (callers copy)."""
    env = _shape_envb(label, node_name, memory_mb, cpus)
    own = (b"PILOT_TASK_ID", b"PILOT_ATTEMPT")
    return [k + b"=" + v for k, v in env.items() if k not in own], env.get(b"PATH")


@functools.lru_cache(maxsize=256)
def _shape_environ(label: str, node_name: str, memory_mb: int, cpus: int):
    """The entries of :func:`_shape_entries` converted once for the lane
    (``pilot._launch.Environ``), and the PATH."""
    from pilot._launch import Environ

    shared, path = _shape_entries(label, node_name, memory_mb, cpus)
    return Environ(shared), path


@functools.lru_cache(maxsize=256)
def _shape_envb(label: str, node_name: str, memory_mb: int, cpus: int) -> dict[bytes, bytes]:
    """The agent's encoded environment with the PILOT_* variables that launches of one label on
    one node share (callers copy it)."""
    return _encoded_with(_attempt_vars(RunTask(0, 0, 0, "", label, node_name, [], None, "", 0.0, memory_mb, cpus)))


def _encoded_with(variables: dict[str, str]) -> dict[bytes, bytes]:
    """The agent's encoded environment (a copy) with ``variables`` added, encoded."""
    env = _agent_envb().copy()
    for key, value in variables.items():
        env[key.encode(FS_ENCODING, FS_ERRORS)] = value.encode(FS_ENCODING, FS_ERRORS)
    return env


def log_path(logdir: str | os.PathLike, task: int, task_id: str, attempt: int) -> str:
    """``LOGDIR/<task // 1000 as 5 digits>/<task id>.<attempt>.log`` (``/`` in ids becomes ``_``)."""
    return log_path_in(log_folder(logdir), task, task_id, attempt)


def log_folder(logdir: str | os.PathLike) -> str:
    """``logdir`` as :func:`log_path_in` takes it: a string ending in ``/``."""
    folder = os.fspath(logdir)
    return folder if folder.endswith("/") else folder + "/"


def log_path_in(folder: str, task: int, task_id: str, attempt: int) -> str:
    """:func:`log_path` under a :func:`log_folder` (rank 0 makes one per launch)."""
    return f"{folder}{task // 1000:05d}/{task_id.replace('/', '_')}.{attempt}.log"


def argv_of(command) -> list[str]:
    """A list command runs as argv; a string runs through ``/bin/sh -c``."""
    if isinstance(command, str):
        return ["/bin/sh", "-c", command]
    return [str(part) for part in command]


def lane_args(run: RunTask, timeout_floor: float = math.inf) -> tuple[str, list[str], list[bytes], str, object] | None:
    """What ``pilot._launch.Lane`` takes to launch ``run`` (program, argv, environment entries,
    log, and the ``Environ`` of the entries that launches of its label on its node share, which
    come first, or None; the log's folder made), or None for an attempt the lane does not run (a
    :class:`Runner` watches those): one in LSST warm mode, or one whose timeout is not over
    ``timeout_floor`` seconds (by then the agent must have moved it to a Runner, which watches
    its time). Raises as a launch would (OSError, ValueError) when it cannot be launched."""
    if _warm(run) or (run.timeout and run.timeout <= timeout_floor):
        return None
    _make_dir(run.log.rpartition("/")[0])
    if run.env:
        base = None
        entries, path = _task_env_entries(run)
    else:   # the shared entries are converted once for the lane, not at every launch
        base, path = _shape_environ(run.label, run.node_name, run.memory_mb, run.cpus)
        entries = _own_entries(run)
    argv = argv_of(run.command)
    return program_of(argv, path), argv, entries, run.log, base


def _warm(run: RunTask) -> bool:
    """Whether ``run`` is a quantum of an LSST warm server (see pilot/lsst/warm.py)."""
    return bool(run.env) and run.env.get("PILOT_LSST_MODE") == "warm"


_made_dirs: set[str] = set()


def _make_dir(folder: str) -> None:
    if folder not in _made_dirs:
        os.makedirs(folder, exist_ok=True)
        _made_dirs.add(folder)


# ---- one attempt --------------------------------------------------------------------


class Runner:
    """One attempt of one task: start it, watch it, and report how it ended."""

    def __init__(self, run: RunTask, watch: WatchConfig = WatchConfig(), clock=time.time):
        self.run = run
        self.watch = watch
        self.clock = clock
        self.pid = 0
        self.pidfd = -1
        self.peak_rss_mb = 0.0
        self.reason: Failure | None = None   # why the pilot killed it, if it did
        self._kill_at: float | None = None   # when to escalate to SIGKILL
        self._live = False                   # launched and not reaped yet
        self._oom_before: int | None = None
        self.started_mono = 0.0

    @classmethod
    def adopted(cls, run: RunTask, watch: WatchConfig, pid: int, pidfd: int, start_time: float,
                started_mono: float, oom_before: int | None) -> "Runner":
        """The runner of an attempt launched elsewhere (by the agent's lane): ``pidfd`` is now
        this runner's to close."""
        runner = cls(run, watch)
        runner.pid, runner.pidfd, runner.start_time, runner.started_mono = pid, pidfd, start_time, started_mono
        runner._oom_before = oom_before
        runner._live = pidfd >= 0
        return runner

    def start(self) -> TaskStarted | TaskFinished:
        """Launch the process; a launch error comes back at once as ``Failure.LAUNCH``."""
        failed = self.launch()
        return self.started() if failed is None else failed

    def launch(self) -> TaskFinished | None:
        """:meth:`start` without the ``TaskStarted`` (:meth:`started` makes it): None once
        launched. An agent sends no start for an attempt that ends within a moment, so it makes
        none unless it sends it."""
        self.start_time = self.clock()
        self.started_mono = time.monotonic()
        self._oom_before = nodes.recent_oom_kill_count(OOM_READ_MAX_AGE)
        try:
            self.pid, self.pidfd = self._launch()
        except (OSError, ValueError) as err:   # ValueError: a NUL or a "=" where none may be
            return self.launch_failed(err)
        self._live = True
        return None

    def started(self) -> TaskStarted:
        """The message saying the attempt started (after :meth:`launch`)."""
        return new_task_started(self.run.task, self.run.attempt, self.run.node, self.start_time, self.pid)

    def _launch(self) -> tuple[int, int]:
        """Launch the attempt: the pid of a child of this process, and its pidfd."""
        run = self.run
        _make_dir(run.log.rpartition("/")[0])
        if _warm(run):
            from pilot.lsst.warm import spawn as warm_spawn

            pid = warm_spawn(run.command, run.log, task_env(run)).pid
            return pid, os.pidfd_open(pid)
        # The log is appended to: an interrupted attempt gives its number back, and its output
        # must not be lost when the same attempt number runs again after a restart.
        if native_usable():
            entries, path = _task_env_entries(run)
            return launch_native(argv_of(run.command), entries, run.log, path)
        return spawn_posix(argv_of(run.command), _task_envb(run), run.log)

    def launch_failed(self, err: Exception) -> TaskFinished:
        """The result of an attempt that could not be launched (``err`` says why, in its log)."""
        _made_dirs.discard(self.run.log.rpartition("/")[0])   # made again next time, if it was removed
        try:
            with open(self.run.log, "a") as log:
                log.write(f"pilot: cannot launch {argv_of(self.run.command)!r}: {err}\n")
        except OSError:
            pass
        return self._finished(Failure.LAUNCH, None, None, 0.0)

    # -- watching --

    def observe(self, rss_mb: float) -> None:
        """A memory sample of the whole tree; kills the attempt when over its limit."""
        self.peak_rss_mb = max(self.peak_rss_mb, rss_mb)
        if self.reason is None and rss_mb > self.run.memory_mb * self.watch.tolerance:
            self.kill(Failure.OOM, hard=True)

    def check_time(self, now_mono: float | None = None) -> None:
        """Kill the attempt once past its timeout; escalate pending kills to SIGKILL."""
        now_mono = time.monotonic() if now_mono is None else now_mono
        timeout = self.run.timeout
        if self.reason is None and timeout and now_mono - self.started_mono > timeout:
            self.kill(Failure.TIMEOUT)
        if self._kill_at is not None and now_mono >= self._kill_at:
            self._signal_group(signal.SIGKILL)
            self._kill_at = None

    def kill(self, reason: Failure, hard: bool = False) -> None:
        """Kill the process group; ``hard`` skips the SIGTERM grace period."""
        if self.reason is None:
            self.reason = reason
        if hard:
            self._signal_group(signal.SIGKILL)
            self._kill_at = None
        else:
            self._signal_group(signal.SIGTERM)
            self._kill_at = time.monotonic() + self.watch.kill_grace

    def _signal_group(self, sig: int) -> None:
        if self.pid:
            try:
                os.killpg(self.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass

    @property
    def next_deadline(self) -> float | None:
        """The next monotonic time at which :meth:`check_time` has something to do."""
        times = [t for t in (self._kill_at,) if t is not None]
        if self.run.timeout and self.reason is None:
            times.append(self.started_mono + self.run.timeout)
        return min(times) if times else None

    # -- ending --

    def poll(self, exited: bool = False) -> TaskFinished | None:
        """The attempt's result once its main process has ended, else None (never blocks).
        ``exited``: the caller knows it has ended (its pidfd is readable), so it is not asked."""
        if not self._live:
            return None
        if not exited and os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
            return None
        status, cpu_s = reap(self.pid, self.pidfd)   # leftovers of the group are killed first
        self._live = False
        self.pidfd = -1
        if status == 0 and self.reason is None:   # most attempts: no classifying needed
            return self._finished(Failure.NONE, 0, None, cpu_s)
        return self.classify(status, cpu_s)

    def classify(self, status: int, cpu_s: float) -> TaskFinished:
        """The result of an ended attempt from its wait status and CPU seconds (its main process
        reaped here or by the agent's lane)."""
        code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
        sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
        if self.reason is not None and code != 0:
            # exit 0 means the work was done: the kill came after the end, before the reaping
            failure = self.reason
        elif sig == signal.SIGKILL or code == 128 + signal.SIGKILL:
            failure = Failure.OOM if self._oom_fired() else (Failure.SIGNAL if sig else Failure.EXIT)
        elif sig is not None:
            failure = Failure.SIGNAL
        else:
            failure = Failure.EXIT if code else Failure.NONE
        return self._finished(failure, code, sig, cpu_s)

    def _oom_fired(self) -> bool:
        after = nodes.recent_oom_kill_count(0.0)   # fresh: read after the death was seen
        return self._oom_before is not None and after is not None and after > self._oom_before

    def _finished(self, failure: Failure, code, sig, cpu_s: float) -> TaskFinished:
        r = self.run
        peak = round(self.peak_rss_mb, 1) if self.peak_rss_mb else 0.0   # round() costs a float formatting
        return new_task_finished(r.task, r.attempt, r.node, failure, code, sig, self.start_time,
                                 self.clock(), peak, cpu_s, r.log)
