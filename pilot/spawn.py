"""Starting a task's process (:func:`launch_native`, else :func:`spawn_posix`), and reaping it
(:func:`reap`).

A task runs in a session and process group of its own; stdin is /dev/null, stdout and stderr
are appended to its log; SIGPIPE and SIGXFSZ (which Python ignores) are back at their defaults
and its signal mask is empty; it inherits no descriptor but 0-2 (MPI libraries open some
without O_CLOEXEC).

Two ways to start it, the same for the task:

- ``pilot._launch``, a C extension (native/launch.c, built by ``pip install``): one call opens
  the log, vforks and execs, and opens the pidfd; one call kills what is left of the group,
  waits and closes the pidfd. Its child resets two signals, where glibc's ``posix_spawn`` child
  reads and resets the handlers of all 64 (about 120 system calls), and an exec error comes back
  through the memory the vfork child shares with its parent, not through a pipe. The process
  gets SIGKILL if the agent dies first (a parent-death signal). Used where it was built and the
  kernel has ``close_range`` (Linux >= 5.11), unless ``PILOT_NATIVE_LAUNCH=0``.
- ``os.posix_spawn``, with the mask emptied in the child, and ``os.wait4``.

An agent runs most attempts in a ``pilot._launch.Lane`` (:func:`new_lane`, native/lane.c): the
same launch and reaping, with what is queued behind an attempt launched in the call that reaps
it (see pilot/agent.py).
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import shutil
import signal

try:
    from pilot import _launch
except ImportError:   # not built (no C compiler where pilot was installed)
    _launch = None

CLOSE_RANGE_CLOEXEC = 1 << 2
LOG_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_APPEND
# Python ignores these; a task gets them at their defaults, as subprocess gives them.
DEFAULT_SIGNALS = (signal.SIGPIPE, signal.SIGXFSZ)


@functools.lru_cache(maxsize=1)
def native_usable() -> bool:
    """Whether tasks start through ``pilot._launch`` in this process (see the module docstring)."""
    return (_launch is not None and os.environ.get("PILOT_NATIVE_LAUNCH", "1") != "0"
            and _launch.close_range_usable())


def spawn_posix(argv: list[str], env: dict, log: str) -> tuple[int, int]:
    """Start ``argv`` (see the module docstring) through ``os.posix_spawn``; its pid and pidfd.
    ``env`` maps str or bytes (a program without a ``/`` is looked up on its PATH, as
    subprocess does). Raises OSError when the log cannot be opened or the program cannot be
    run, ValueError for an empty ``argv`` or a NUL or ``=`` where none may be."""
    pid = _posix_spawn(program_of(argv, _path_of(env)), argv, env, log)
    return pid, os.pidfd_open(pid)


def launch_native(argv: list[str], entries: list[bytes], log: str, path: bytes | None) -> tuple[int, int]:
    """:func:`spawn_posix` through ``pilot._launch`` (only where :func:`native_usable`), with
    the environment as ``b"NAME=value"`` entries and ``path`` its PATH."""
    return _launch.launch(program_of(argv, path), argv, entries, log, _devnull())


def new_lane():
    """A ``pilot._launch.Lane`` (see native/lane.c) launching as :func:`launch_native` does;
    None where the native launch is not used, or with ``PILOT_LANE=0`` (every attempt in a
    Python ``Runner``, as ``benchmarks/bench_dispatch.py --without-lane`` compares)."""
    if not native_usable() or os.environ.get("PILOT_LANE", "1") == "0":
        return None
    return _launch.Lane(_devnull())


def reap(pid: int, pidfd: int) -> tuple[int, float]:
    """For a child whose main process has ended (``pidfd`` readable): kill what is left of its
    process group (while the leader is a zombie its pid, the group's id, cannot have been
    reused), wait for it and close ``pidfd``. Its wait status and CPU seconds (user + system,
    the descendants it waited for included; to the microsecond)."""
    if native_usable():
        return _launch.reap(pid, pidfd)
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    _, status, usage = os.wait4(pid, 0)
    os.close(pidfd)
    return status, round(usage.ru_utime + usage.ru_stime, 6)


def _path_of(env) -> bytes | None:
    path = env.get(b"PATH") if b"PATH" in env else env.get("PATH")
    return os.fsencode(path) if isinstance(path, str) else path


@functools.lru_cache(maxsize=1)
def _devnull() -> int:
    """/dev/null, opened once (close-on-exec): every task's stdin is a copy of it."""
    return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)


# ---- posix_spawn ------------------------------------------------------------------------


def _posix_spawn(program: str, argv: list[str], env: dict, log: str) -> int:
    cloexec_from(3)
    actions = [(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
               (os.POSIX_SPAWN_OPEN, 1, log, LOG_FLAGS, 0o644), (os.POSIX_SPAWN_DUP2, 1, 2)]
    return os.posix_spawn(program, argv, env, file_actions=actions, setsid=True,
                          setsigdef=DEFAULT_SIGNALS, setsigmask=())


@functools.lru_cache(maxsize=1)
def _libc_close_range():
    """libc's ``close_range`` (glibc >= 2.34), or None."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).close_range
    except (AttributeError, OSError):
        return None
    fn.argtypes = (ctypes.c_uint, ctypes.c_uint, ctypes.c_int)
    fn.restype = ctypes.c_int
    return fn


def cloexec_from(low: int = 3) -> None:
    """Mark every descriptor from ``low`` up close-on-exec, so that a spawned task inherits none:
    one ``close_range(CLOSE_RANGE_CLOEXEC)`` call (Linux >= 5.11), else fcntl over the entries
    of /proc/self/fd."""
    fn = _libc_close_range()
    if fn is not None and fn(low, 0xFFFFFFFF, CLOSE_RANGE_CLOEXEC) == 0:
        return
    _cloexec_listed(low)


def _cloexec_listed(low: int) -> None:
    for name in os.listdir("/proc/self/fd"):
        if int(name) >= low:
            try:
                os.set_inheritable(int(name), False)
            except OSError:
                pass   # the listing's own descriptor, closed by now


# ---- finding the program ----------------------------------------------------------------


def program_of(argv: list[str], path: bytes | None) -> str:
    """The program ``argv`` runs: ``argv[0]`` if it names a path, else where ``path`` (a PATH)
    finds it (FileNotFoundError if nowhere; ValueError if ``argv`` is empty)."""
    if not argv:
        raise ValueError("empty command")
    program = argv[0]
    if "/" in program:
        return program
    found = _which(program, path)
    if found is None:
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), program)
    return found


_FOUND: dict[tuple[str, bytes | None], str] = {}


def _which(program: str, path: bytes | None) -> str | None:
    """``program``'s path on ``path``, looked up once and remembered (a program not found is
    looked up again next time). An exec through PATH would instead try every PATH folder before
    the right one (about ten on a venv's PATH) on every launch."""
    key = (program, path)
    found = _FOUND.get(key)
    if found is None:
        found = shutil.which(program, path=os.fsdecode(path) if path is not None else os.defpath)
        if found is not None:
            _FOUND[key] = found
    return found
