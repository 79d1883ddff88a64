"""Bare launches of one program for the benchmarks' reference loops, each returning the pid of a
child to be reaped with ``os.wait``; stdin /dev/null, stdout and stderr appended to ``log``, a
session of its own, as the pilot's tasks get:

- :func:`fork_exec`: CPython's own fork-and-exec for subprocess (``_posixsubprocess.fork_exec``,
  a vfork; its private interface, as CPython 3.11-3.13 take it), called directly: no Popen
  object, an error pipe as subprocess uses;
- :func:`native`: pilot's launch (``pilot._launch``, see pilot/spawn.py) without an agent around
  it; its pidfd is closed at once.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pilot.spawn import _devnull, launch_native  # noqa: E402

LOG_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC


def env_entries(env=os.environ) -> list[bytes]:
    return [os.fsencode(k) + b"=" + os.fsencode(v) for k, v in env.items()]


def fork_exec_usable() -> bool:
    return sys.implementation.name == "cpython" and (3, 11) <= sys.version_info[:2] <= (3, 13)


def fork_exec(program: str, env: list[bytes], log: str) -> int:
    """Start ``program`` (an absolute path, no arguments) through CPython's fork_exec."""
    import _posixsubprocess

    null, out = _devnull(), os.open(log, LOG_FLAGS, 0o644)
    error_read, error_write = os.pipe2(os.O_CLOEXEC)   # the child reports a failed exec here
    try:
        pid = _posixsubprocess.fork_exec(
            [os.fsencode(program)], [os.fsencode(program)], True, (error_write,), None, env,
            null, -1, -1, out, -1, out, error_read, error_write,
            True, True, -1, None, None, None, -1, None, True)
    finally:
        os.close(error_write)
        os.close(out)
    try:
        report = os.read(error_read, 4096)
    finally:
        os.close(error_read)
    if report:
        os.waitpid(pid, 0)
        raise OSError(f"cannot run {program}: {report[:200]!r}")
    return pid


def native(program: str, env: list[bytes], log: str) -> int:
    """Start ``program`` (an absolute path, no arguments) through pilot's native launch."""
    pid, pidfd = launch_native([program], env, log, None)
    os.close(pidfd)
    return pid

