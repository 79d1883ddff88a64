"""Wire messages between ranks and their encoding.

The messages are the frozen dataclasses of :mod:`pilot.events` plus the agent-only ones
below. On the wire a message is a plain tuple of builtins, ``(type code, field values...)``,
with enums as ints: :func:`to_wire` and :func:`from_wire` convert both ways.

Directions: agents send :class:`Hello`, ``TaskStarted``, ``TaskFinished`` and
:class:`Interrupted`; the master sends :class:`Begin` (once), :class:`RunTask`, :class:`Kill`,
:class:`Recall` and :class:`Shutdown`.
"""

from __future__ import annotations

import enum
import operator
import typing
from dataclasses import dataclass, fields

from pilot import events
from pilot.events import Drain, Failure, Launch, Node, NodeLost, Schedule, TaskFinished, TaskStarted, maker, plain


@dataclass(frozen=True)
class Hello:
    """First message of an agent: who it is and what its node offers."""

    rank: int
    node: str
    memory_mb: int
    cores: int
    pid: int = 0


@dataclass(frozen=True)
class RunTask:
    """Start one attempt of a task on the receiving agent."""

    task: int
    attempt: int
    node: int              # engine node number (echoed back in TaskStarted/TaskFinished)
    task_id: str
    label: str
    node_name: str
    command: object        # str (run by /bin/sh -c) or list[str] (argv)
    env: dict | None
    log: str
    timeout: float         # seconds, 0 = none
    memory_mb: int
    cpus: int
    after: int = -1        # start when this task's attempt here ends (queue-ahead); -1: now


ALL_TASKS = -1


@dataclass(frozen=True)
class Kill:
    """Kill an attempt (``task == ALL_TASKS``: every running attempt); it ends as ``failure``."""

    task: int
    attempt: int = 0
    failure: Failure = Failure.INTERRUPTED


@dataclass(frozen=True)
class Recall:
    """Give back a task queued ahead, unstarted (it has waited long and another node has room):
    the agent reports it ``INTERRUPTED``; if it has started already, its own report follows."""

    task: int
    attempt: int


@dataclass(frozen=True)
class Shutdown:
    """The run is over: the agent leaves its loop."""

    code: int = 0


@dataclass(frozen=True)
class Interrupted:
    """An agent caught a signal (srun forwards them to every rank): the master drains."""

    rank: int
    signal: int


@dataclass(frozen=True)
class Begin:
    """Sent to every agent once rank 0 holds the checkpoint, before any ``RunTask``: the tag its
    attempts carry (``PILOT_RUN``, see :mod:`pilot.leftovers`)."""

    tag: str


@dataclass(frozen=True)
class Alive:
    """An agent is alive (sent every few seconds): rank 0 declares a silent agent hung."""

    rank: int


MESSAGE_TYPES = (Hello, RunTask, Kill, Shutdown, Interrupted,
                 Schedule, TaskStarted, TaskFinished, NodeLost, Drain, Launch, Node, Recall, Alive, Begin)
_CODE = {cls: code for code, cls in enumerate(MESSAGE_TYPES)}


def _enum_fields(cls) -> tuple[tuple[int, type], ...]:
    module = events if cls.__module__ == events.__name__ else None
    hints = typing.get_type_hints(cls, globalns=vars(module) if module else globals())
    return tuple((i, hints[f.name]) for i, f in enumerate(fields(cls))
                 if isinstance(hints[f.name], type) and issubclass(hints[f.name], enum.Enum))


_ENUMS = {cls: _enum_fields(cls) for cls in MESSAGE_TYPES}
_NAMES = {cls: tuple(f.name for f in fields(cls)) for cls in MESSAGE_TYPES}
# One C call reads a message's fields (and its type code) in order: a message per task each way
_VALUES = {cls: operator.attrgetter(*_NAMES[cls]) if len(_NAMES[cls]) > 1 else
           (lambda m, name=_NAMES[cls][0]: (getattr(m, name),)) for cls in MESSAGE_TYPES}


def to_wire(message) -> tuple:
    """A message as ``(type code, values...)``, builtins only (enums become ints)."""
    cls = type(message)
    values = _VALUES[cls](message)
    enums = _ENUMS[cls]
    if enums:
        values = list(values)
        for i, _ in enums:
            values[i] = int(values[i])
    return (_CODE[cls], *values)


def from_wire(wire) -> object:
    """The message encoded by :func:`to_wire`; ValueError for anything else."""
    try:
        decode = _DECODERS[wire[0]]
    except (IndexError, TypeError, KeyError) as err:
        raise ValueError(f"not a pilot message: {wire!r:.200}") from err
    return decode(wire)


def _decoder(cls):
    """A function from ``cls``'s wire form to the message, generated as :func:`~pilot.events.maker`
    is: one store per field read straight from the tuple, and an enum field looked up in its
    members (calling the enum costs 10 times more). Half the cost of slicing the tuple and calling
    a maker with it, for a message decoded once per task on each side."""
    names, enums = _NAMES[cls], dict(_ENUMS[cls])
    scope = {"new": object.__new__, "cls": cls}
    check = (f"    if len(wire) != {len(names) + 1}:\n"
             f"        raise ValueError(f'{cls.__name__} needs {len(names)} fields, got {{len(wire) - 1}}')\n")
    if not plain(cls):
        return _exec_decoder(check + "    return cls(*wire[1:])\n", scope)
    body = ["    message = new(cls)\n    d = message.__dict__\n"]
    for i, name in enumerate(names):
        if i in enums:
            scope[f"kind{i}"], scope[f"members{i}"] = enums[i], enums[i]._value2member_map_
            body.append(f"    value = wire[{i + 1}]\n"
                        f"    d[{name!r}] = members{i}[value] if value in members{i} else kind{i}(value)\n")
        else:
            body.append(f"    d[{name!r}] = wire[{i + 1}]\n")
    return _exec_decoder(check + "".join(body) + "    return message\n", scope)


def _exec_decoder(body: str, scope: dict):
    exec("def decode(wire):\n" + body, scope)
    return scope["decode"]


_DECODERS = {_CODE[cls]: _decoder(cls) for cls in MESSAGE_TYPES}
_MAKERS = {cls: maker(cls) for cls in MESSAGE_TYPES if plain(cls)}
new_run_task = _MAKERS[RunTask]
RUN_TASK_CODE = _CODE[RunTask]   # (RUN_TASK_CODE, *fields) is a RunTask's wire form (no enum fields)
assert not _ENUMS[RunTask]
_TASK_FINISHED_CODE = _CODE[TaskFinished]


def succeeded_wire(task: int, attempt: int, node: int, start: float, end: float, cpu_s: float, log: str) -> tuple:
    """:func:`to_wire` of the TaskFinished of an attempt that exited 0, made without the message
    (an agent's lane reports most attempts so)."""
    return (_TASK_FINISHED_CODE, task, attempt, node, 0, 0, None, start, end, 0.0, cpu_s, log)
