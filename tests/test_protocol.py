"""Every wire message survives to_wire/from_wire, as builtins only."""

from __future__ import annotations

import pytest

from pilot.events import Drain, Failure, Launch, Node, NodeLost, Schedule, TaskFinished, TaskStarted
from pilot.protocol import (ALL_TASKS, MESSAGE_TYPES, Alive, Begin, Hello, Interrupted, Kill, Recall, RunTask, Shutdown,
                            RUN_TASK_CODE, from_wire, succeeded_wire, to_wire)

SAMPLES = [
    Hello(rank=3, node="nid001", memory_mb=96000, cores=68, pid=4242),
    RunTask(task=7, attempt=2, node=1, task_id="isr_1", label="isr", node_name="nid001",
            command=["pipetask", "run-qbb", "repo", "g.qg"], env={"A": "1"}, log="/l/00000/isr_1.2.log",
            timeout=600.0, memory_mb=4096, cpus=2),
    RunTask(task=0, attempt=1, node=0, task_id="a", label="default", node_name="h", command="echo hi",
            env=None, log="l", timeout=0.0, memory_mb=1, cpus=1, after=6),
    Recall(task=9, attempt=1),
    Alive(rank=2),
    Begin(tag="3f9a1c2b7d4e.9c1f00aa"),
    Kill(task=ALL_TASKS, attempt=0, failure=Failure.INTERRUPTED),
    Kill(task=5, attempt=1, failure=Failure.TIMEOUT),
    Shutdown(code=3),
    Interrupted(rank=2, signal=15),
    Schedule(time=1.5),
    TaskStarted(task=1, attempt=1, node=0, time=2.0, pid=99),
    TaskFinished(task=1, attempt=1, node=0, failure=Failure.OOM, exit_code=None, signal=9, start=1.0,
                 end=2.0, peak_rss_mb=123.4, cpu_s=0.5, log="x.log"),
    TaskFinished(task=2, attempt=3, node=1, failure=Failure.NONE, exit_code=0, signal=None, start=1.0,
                 end=2.0),
    NodeLost(node=2, time=3.0),
    Drain(time=4.0, reason="signal 15"),
    Launch(task=1, attempt=1, node=0, memory_mb=100, cpus=1),
    Launch(task=2, attempt=1, node=0, memory_mb=100, cpus=1, after=1),
    Node(name="n", memory_mb=1000, cores=4),
]


def builtins_only(value) -> bool:
    if isinstance(value, (list, tuple)):
        return all(builtins_only(v) for v in value)
    if isinstance(value, dict):
        return all(builtins_only(k) and builtins_only(v) for k, v in value.items())
    return type(value) in (int, float, str, bool, type(None))


def test_every_type_has_a_sample():
    assert {type(m) for m in SAMPLES} == set(MESSAGE_TYPES)


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(message):
    wire = to_wire(message)
    assert isinstance(wire, tuple) and builtins_only(wire)
    back = from_wire(wire)
    assert back == message and type(back) is type(message)
    for name, value in vars(message).items():
        assert type(getattr(back, name)) is type(value)


@pytest.mark.parametrize("wire", [(), (999,), ("x",), None, (0, 1), (-1, "tag"), ([1], 2),
                                  (7, 4, 2, 1, 99, 0, None, 10.5, 11.25, 0.0, 0.002, "/l/t4.2.log")])
def test_bad_wire_is_rejected(wire):
    with pytest.raises(ValueError):
        from_wire(wire)


def test_wire_forms_made_without_a_message_match_to_wire():
    """Rank 0's orders and the lane's successes go out in wire form directly: the same tuples
    (and the same types) as to_wire of the messages."""
    finished = TaskFinished(task=4, attempt=2, node=1, failure=Failure.NONE, exit_code=0, signal=None,
                            start=10.5, end=11.25, peak_rss_mb=0.0, cpu_s=0.002, log="/l/00000/t4.2.log")
    wire = succeeded_wire(4, 2, 1, 10.5, 11.25, 0.002, "/l/00000/t4.2.log")
    assert wire == to_wire(finished) and [type(v) for v in wire] == [type(v) for v in to_wire(finished)]
    assert from_wire(wire) == finished
    run = SAMPLES[1]
    assert (RUN_TASK_CODE, *vars(run).values()) == to_wire(run)
