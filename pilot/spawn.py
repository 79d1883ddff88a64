"""Starting a task's process: :func:`spawn_forked`, else :func:`spawn`.

A task runs in a session and process group of its own; stdin is /dev/null, stdout and stderr
are appended to its log; the signals Python ignores are back at their defaults and its signal
mask is empty; it inherits no descriptor but 0-2 (MPI libraries open some without O_CLOEXEC).

Two ways to start it, the same for the task:

- CPython's own fork-and-exec for subprocess (``_posixsubprocess.fork_exec``, a vfork), when
  the calling thread blocks no signal (its child keeps the caller's mask): its child resets
  two signals where glibc's ``posix_spawn`` child reads and resets the handlers of all 64 (about
  120 system calls), which costs a null task about 40 us of CPU. Its arguments are CPython's
  private interface: they are checked once (:func:`fork_exec_usable`), and a Python where they
  differ uses the other way.
- ``os.posix_spawn``, with the mask emptied in the child.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import shutil
import signal
import sys

CLOSE_RANGE_CLOEXEC = 1 << 2
LOG_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_APPEND
# Python ignores these; a task gets them at their defaults, as subprocess gives them.
DEFAULT_SIGNALS = (signal.SIGPIPE, signal.SIGXFSZ)


class Spawned:
    """A launched process, as ``Runner._spawn`` returns it."""

    __slots__ = ("pid",)

    def __init__(self, pid: int):
        self.pid = pid


def spawn_forked(argv: list[str], entries: list[bytes], log: str, path: bytes | None) -> int:
    """Start ``argv`` (see the module docstring) through fork_exec; its pid. Only where
    :func:`fork_exec_here`. ``entries``: the environment as ``b"NAME=value"``, ``path`` its PATH
    (a program without a ``/`` is looked up there, as subprocess does). Raises OSError when the
    log cannot be opened or the program cannot be run, ValueError for an empty ``argv``."""
    return _fork_exec(_program(argv, path), argv, entries, log)


def spawn(argv: list[str], env: dict, log: str) -> int:
    """Start ``argv`` (see the module docstring) through posix_spawn, on any thread; its pid.
    ``env`` maps str or bytes; errors as :func:`spawn_forked`."""
    return _posix_spawn(_program(argv, _path_of(env)), argv, env, log)


def fork_exec_here() -> bool:
    """Whether :func:`spawn_forked` may launch on this thread. fork_exec's child keeps the
    calling thread's signal mask: it serves only a thread that blocks nothing (an agent's main
    thread does not, as a rule)."""
    return fork_exec_usable() and not signal.pthread_sigmask(signal.SIG_BLOCK, ())


def env_list(env) -> list[bytes]:
    """A mapping as ``b"NAME=value"`` entries."""
    return [os.fsencode(k) + b"=" + os.fsencode(v) for k, v in env.items()]


def _path_of(env) -> bytes | None:
    path = env.get(b"PATH") if b"PATH" in env else env.get("PATH")
    return os.fsencode(path) if isinstance(path, str) else path


# ---- CPython's fork and exec ----------------------------------------------------------


@functools.lru_cache(maxsize=1)
def fork_exec_usable() -> bool:
    """Whether ``_posixsubprocess.fork_exec`` takes the arguments :func:`_fork_exec` passes:
    CPython 3.11-3.13 (read from their sources), checked by starting ``true`` once."""
    if sys.implementation.name != "cpython" or not (3, 11) <= sys.version_info[:2] <= (3, 13):
        return False
    try:
        pid = _fork_exec(shutil.which("true") or "/bin/true", ["true"], env_list(os.environ), os.devnull)
    except (ImportError, TypeError, ValueError, OSError):
        return False
    os.waitpid(pid, 0)
    return True


def _fork_exec(program: str, argv: list[str], env: list[bytes], log: str) -> int:
    import _posixsubprocess

    null = _devnull()
    out = os.open(log, LOG_FLAGS | os.O_CLOEXEC, 0o644)
    try:
        error_read, error_write = os.pipe2(os.O_CLOEXEC)   # the child reports a failed exec here
    except OSError:
        os.close(out)
        raise
    try:
        try:
            pid = _posixsubprocess.fork_exec(
                [os.fsencode(a) for a in argv], [os.fsencode(program)], True, (error_write,), None, env,
                null, -1, -1, out, -1, out, error_read, error_write,
                True, True, -1, None, None, None, -1, None, True)
        finally:
            os.close(error_write)
            os.close(out)
        report = os.read(error_read, 4096)
    finally:
        os.close(error_read)
    if report:
        os.waitpid(pid, 0)
        raise _exec_error(report, program)
    return pid


@functools.lru_cache(maxsize=1)
def _devnull() -> int:
    """/dev/null, opened once (close-on-exec): every task's stdin is a copy of it."""
    return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)


def _exec_error(report: bytes, program: str) -> OSError:
    """The OSError of a child's ``ExceptionName:hex errno:message`` report (subprocess's format)."""
    try:
        _, code, _ = report.split(b":", 2)
        number = int(code, 16)
    except ValueError:
        return OSError(errno.ENOEXEC, f"cannot run {program}: {report[:200]!r}")
    return OSError(number, os.strerror(number), program)


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


def _program(argv: list[str], path: bytes | None) -> str:
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
