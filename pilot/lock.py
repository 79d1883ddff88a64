"""One pilot per checkpoint: an ``flock`` on ``CKPT.lock`` plus the holder's identity in it.

The kernel drops an ``flock`` when its holder dies, so a lock left by a killed run on the
same host is simply taken. Some shared filesystems keep ``flock`` per node; there the
identity in the file decides: a holder on another host whose heartbeat (the file's mtime,
refreshed by :meth:`CheckpointLock.heartbeat`) is fresher than ``stale_after`` seconds
still holds the checkpoint. A run that ends cleanly empties the file before unlocking.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time

from pilot.errors import UserError

STALE_AFTER_S = 120.0
HEARTBEAT_S = 10.0


def identity() -> dict:
    """Who holds a lock: host (Slurm node name when set), pid, Slurm job id, since when."""
    host = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
    job = os.environ.get("SLURM_JOB_ID") or os.environ.get("SLURM_JOBID")
    return {"host": host, "pid": os.getpid(), "slurm_job_id": job, "since": time.time()}


def describe(holder: dict) -> str:
    """``pid P on host H (Slurm job J)`` for an error message."""
    text = f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}"
    if holder.get("slurm_job_id"):
        text += f" (Slurm job {holder['slurm_job_id']})"
    return text


def read_holder(path: str) -> dict:
    """The identity recorded in a lock file ({} when none or unreadable)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.loads(f.read() or "{}")
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


class CheckpointLock:
    """An acquired lock; :meth:`release` ends it (the kernel ends it if we die)."""

    def __init__(self, path: str, fd: int):
        self.path, self.fd = path, fd
        self._beat = time.monotonic()

    def heartbeat(self) -> None:
        """Refresh the file's mtime (at most every HEARTBEAT_S) so others see us alive."""
        if self.fd >= 0 and time.monotonic() - self._beat >= HEARTBEAT_S:
            os.utime(self.fd)
            self._beat = time.monotonic()

    def release(self) -> None:
        if self.fd < 0:
            return
        try:
            os.ftruncate(self.fd, 0)
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = -1


def acquire(path: str, what: str, stale_after: float = STALE_AFTER_S) -> CheckpointLock:
    """Take the lock at ``path`` or raise UserError naming its holder; ``what`` is the
    checkpoint's name for the message."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise UserError(f"cannot create the lock file {path} for checkpoint {what}: "
                        f"{err.strerror}") from None
    try:
        flocked = _flock(fd, path, what)
        _check_holder(path, fd, what, stale_after, flocked)
        _write_identity(fd)
    except BaseException:
        os.close(fd)
        raise
    return CheckpointLock(path, fd)


def _flock(fd: int, path: str, what: str) -> bool:
    """True once we hold the flock; False when the filesystem has no flock."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as err:
        if err.errno in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
            return False
        if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise
        raise UserError(f"checkpoint {what} is in use by {describe(read_holder(path))}; "
                        f"stop that run first (lock file {path})") from None


def _pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (OSError, ValueError, TypeError) as err:
        return getattr(err, "errno", None) == errno.EPERM
    return True


def _check_holder(path: str, fd: int, what: str, stale_after: float, flocked: bool) -> None:
    holder = read_holder(path)
    if not holder:
        return
    if holder.get("host") == identity()["host"]:
        # with the flock held, a holder on this host is dead (the kernel freed its lock)
        if flocked or holder.get("pid") == os.getpid() or not _pid_alive(holder.get("pid")):
            return
        raise UserError(f"checkpoint {what} is in use by {describe(holder)}; stop that run first")
    age = time.time() - os.fstat(fd).st_mtime
    if age < stale_after:
        raise UserError(f"checkpoint {what} is in use by {describe(holder)}, seen {age:.0f} s ago; "
                        f"if that run is gone, retry after {stale_after - age:.0f} s")


def _write_identity(fd: int) -> None:
    data = json.dumps(identity()).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    os.fsync(fd)
