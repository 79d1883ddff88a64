"""Task states and the small frozen messages that drive the engine.

The same dataclasses are engine events, engine actions and (through
:mod:`pilot.protocol`) wire messages between ranks. Task numbers are indices into
:class:`pilot.graph.Graph`; node numbers are indices into the engine's node list.
Times are seconds since the epoch (or simulated seconds).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum


class State(IntEnum):
    PENDING = 0    # some parent not done yet
    READY = 1      # all parents done, waiting for a slot
    LAUNCHED = 2   # placed on a node, not yet confirmed started
    RUNNING = 3    # the agent started its process
    DONE = 4       # exited 0
    FAILED = 5     # failed for good (retries used up or not retryable)
    DEP_FAIL = 6   # an ancestor failed for good


TERMINAL = frozenset({State.DONE, State.FAILED, State.DEP_FAIL})


class Failure(IntEnum):
    """Why an attempt ended; NONE for success."""

    NONE = 0
    EXIT = 1          # non-zero exit code
    SIGNAL = 2        # killed by a signal (segfault, abort, ...)
    OOM = 3           # over its memory request (agent's watch) or killed by the kernel OOM killer
    TIMEOUT = 4       # over its `timeout`
    INTERRUPTED = 5   # killed because the run was draining: the attempt does not count
    LOST = 6          # its node or agent went away: the attempt does not count
    LAUNCH = 7        # the command could not be started (no such file, permission)


# ---- events (into the engine) -------------------------------------------------------


@dataclass(frozen=True)
class Schedule:
    """Ask for launches now (start of a run, or after nodes/capacity change)."""

    time: float


@dataclass(frozen=True)
class TaskStarted:
    task: int
    attempt: int
    node: int
    time: float
    pid: int = 0


@dataclass(frozen=True)
class TaskFinished:
    task: int
    attempt: int
    node: int
    failure: Failure          # Failure.NONE when the attempt succeeded
    exit_code: int | None     # None when killed by a signal
    signal: int | None        # signal number that ended it, if any
    start: float
    end: float
    peak_rss_mb: float = 0.0
    cpu_s: float = 0.0
    log: str = ""


@dataclass(frozen=True)
class NodeLost:
    node: int
    time: float


@dataclass(frozen=True)
class Drain:
    """Stop launching (signal or wall time); running tasks are left to the caller."""

    time: float
    reason: str = ""


# ---- actions (out of the engine) ----------------------------------------------------


@dataclass(frozen=True)
class Launch:
    task: int
    attempt: int      # 1 for the first attempt
    node: int
    memory_mb: int    # the request for this attempt (after memory scaling)
    cpus: int
    after: int = -1   # start when this task's current attempt ends (its reservation passes on); -1: now


@dataclass(frozen=True)
class Node:
    """What a node offers to tasks."""

    name: str
    memory_mb: int
    cores: int


# ---- fast construction ----------------------------------------------------------------


def plain(cls) -> bool:
    """Whether the dataclass ``cls``'s ``__init__`` only stores its arguments (no
    ``__post_init__``, no slots): :func:`maker` can build it."""
    return not hasattr(cls, "__post_init__") and not hasattr(cls, "__slots__")


def maker(cls):
    """A constructor of the frozen dataclass ``cls`` taking *every* field, positionally and in
    order, that stores them as its ``__init__`` would, without an ``object.__setattr__`` per
    field: half the cost, for the messages made once per task (a run makes millions).
    Only for classes :func:`plain`."""
    from dataclasses import fields

    assert plain(cls), cls
    names = tuple(f.name for f in fields(cls))
    # Generated, as dataclasses make __init__: a store per named parameter costs about half of
    # a dict update from zip(names, values).
    stores = "".join(f"    d[{name!r}] = {name}\n" for name in names)
    source = f"def make({', '.join(names)}):\n    message = new(cls)\n    d = message.__dict__\n{stores}    return message\n"
    scope = {"new": object.__new__, "cls": cls}
    exec(source, scope)
    make = scope["make"]
    make.__doc__ = f"{cls.__name__}({', '.join(names)}), every field given"
    return make


new_task_started = maker(TaskStarted)
new_task_finished = maker(TaskFinished)
new_launch = maker(Launch)
