"""What this rank's node offers, and what the allocation says about time.

Node identity is ``SLURMD_NODENAME`` when set, else the hostname. Memory comes from
``SLURM_MEM_PER_NODE``, else the cgroup limit (v2 ``memory.max``, v1
``memory.limit_in_bytes``), else ``MemTotal`` in /proc/meminfo; a reserve for the OS and the
pilot's own ranks is taken off (:func:`memory_reserve_mb`). Cores come from
``SLURM_CPUS_ON_NODE``, else the CPU affinity of this process. Explicit overrides win.
"""

from __future__ import annotations

import functools
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
UNLIMITED = 1 << 60   # cgroup v1 reports "no limit" as a huge number (~2^63)


@dataclass(frozen=True)
class NodeInfo:
    """One rank's view of its node: identity, usable memory (MB) and cores."""

    name: str
    memory_mb: int
    cores: int


def node_name(env=os.environ) -> str:
    """Node identity: ``SLURMD_NODENAME`` when set, else the hostname."""
    return env.get("SLURMD_NODENAME") or socket.gethostname()


def memory_reserve_mb(total_mb: int) -> int:
    """Memory kept back from tasks: 5% of the node, at least 512 MB, at most 8 GB."""
    return int(min(8192, max(512, total_mb * 0.05)))


def cgroup_dirs(controller: str, proc_cgroup: str | None = None) -> list[Path]:
    """Candidate folders of this process's cgroup for ``controller`` (v2 first, then v1)."""
    text = proc_cgroup if proc_cgroup is not None else _read("/proc/self/cgroup") or ""
    found = []
    for line in text.splitlines():
        _, names, path = line.split(":", 2)
        rel = path.lstrip("/")
        if names == "":
            found.append(CGROUP_ROOT / rel)
        elif controller in names.split(","):
            found += [CGROUP_ROOT / controller / rel, CGROUP_ROOT / controller]
    return found


def cgroup_memory_limit_mb() -> int | None:
    """The cgroup memory limit of this process in MB, or None when unlimited or unknown."""
    for folder in cgroup_dirs("memory"):
        for name in ("memory.max", "memory.limit_in_bytes"):
            value = _read(folder / name)
            if value is None:
                continue
            if value == "max" or int(value) >= UNLIMITED:
                return None
            return int(value) // (1024 * 1024)
    return None


@functools.lru_cache(maxsize=1)
def oom_events_file() -> Path | None:
    """The cgroup file holding this process's ``oom_kill`` counter (v2 events, v1 oom_control)."""
    for folder in cgroup_dirs("memory"):
        for name in ("memory.events", "memory.oom_control"):
            if _read(folder / name) is not None:
                return folder / name
    return None


def oom_kill_count() -> int | None:
    """How many times the kernel OOM killer fired in this cgroup (None when not readable)."""
    path = oom_events_file()
    data = _read_small(path) if path is not None else None
    for line in (data or b"").split(b"\n"):
        key, _, value = line.partition(b" ")
        if key == b"oom_kill":
            return int(value)
    return None


_oom_read: list = [float("-inf"), None]   # [time.monotonic() of the last read, its value]


def recent_oom_kill_count(max_age: float = 0.01) -> int | None:
    """:func:`oom_kill_count`, read again only when the last read is ``max_age`` seconds old.

    Launches in quick succession share one read of the cgroup file; ``max_age=0`` forces a
    fresh read (and refreshes what the next callers share).
    """
    now = time.monotonic()
    if now - _oom_read[0] >= max_age:
        _oom_read[:] = [now, oom_kill_count()]
    return _oom_read[1]


def meminfo_total_mb(text: str | None = None) -> int:
    """``MemTotal`` from /proc/meminfo in MB."""
    text = text if text is not None else _read("/proc/meminfo") or ""
    for line in text.splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    raise RuntimeError("MemTotal not found in /proc/meminfo")


def detect_memory_mb(env=os.environ) -> int:
    """Usable task memory of the node in MB (after the reserve)."""
    if env.get("SLURM_MEM_PER_NODE"):
        total = int(env["SLURM_MEM_PER_NODE"])
    elif env.get("SLURM_MEM_PER_CPU") and env.get("SLURM_CPUS_ON_NODE"):
        # --mem-per-cpu (CSD3's default): the job's share of the node is per CPU allocated.
        total = int(env["SLURM_MEM_PER_CPU"]) * int(env["SLURM_CPUS_ON_NODE"])
    else:
        limit = cgroup_memory_limit_mb()
        physical = meminfo_total_mb()
        total = min(limit, physical) if limit else physical
    return max(1, total - memory_reserve_mb(total))


def detect_cores(env=os.environ) -> int:
    """Cores for tasks: ``SLURM_CPUS_ON_NODE``, else this process's CPU affinity."""
    if env.get("SLURM_CPUS_ON_NODE"):
        return int(env["SLURM_CPUS_ON_NODE"])
    return len(os.sched_getaffinity(0))


def local_node(memory_mb: int | None = None, cores: int | None = None, *, per_rank: bool = False,
               rank: int = 0, env=os.environ) -> NodeInfo:
    """This rank's node, with optional overrides; ``per_rank`` makes the rank a node of its own."""
    name = node_name(env)
    if per_rank:
        name = f"{name}/rank{rank}"
    return NodeInfo(name, memory_mb or detect_memory_mb(env), cores or detect_cores(env))


def job_end_time(env=os.environ) -> float | None:
    """End of the Slurm job as epoch seconds, or None outside Slurm (or when unknown)."""
    if env.get("SLURM_JOB_END_TIME"):
        return float(env["SLURM_JOB_END_TIME"])
    job = env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID")
    if not job or not shutil.which("squeue"):
        return None
    try:
        out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%e"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        return datetime.fromisoformat(out).timestamp()
    except (OSError, ValueError, subprocess.SubprocessError):
        return None


def run_deadline(walltime_s: float | None, start: float | None = None, env=os.environ) -> float | None:
    """The run's end: ``--walltime`` seconds from start, or the Slurm job end, whichever is first."""
    start = time.time() if start is None else start
    ends = [t for t in (start + walltime_s if walltime_s else None, job_end_time(env)) if t]
    return min(ends) if ends else None


def _read_small(path) -> bytes | None:
    # A quarter of the cost of Path.read_text: this one runs while tasks are launched.
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return os.read(fd, 65536)
    except OSError:
        return None
    finally:
        os.close(fd)


def _read(path) -> str | None:
    try:
        return Path(path).read_text().strip()
    except (OSError, ValueError):
        return None
