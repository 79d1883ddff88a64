"""Queue-ahead in the engine: which tasks are queued behind which, and what happens to a
queued task when its predecessor ends, is lost, or when it is reported before it."""

from __future__ import annotations

from pilot.engine import Engine
from pilot.engine_queue import DEPTH
from pilot.events import Drain, Failure, Node, NodeLost, Schedule, State, TaskFinished
from pilot.graph import make_graph


def independent(n, labels=None, **values):
    values.setdefault("memory_mb", [100] * n)
    return make_graph([f"t{i}" for i in range(n)], labels or ["a"] * n, [[] for _ in range(n)], **values)


def ended(launch, failure=Failure.NONE, end=1.0):
    return TaskFinished(launch.task, launch.attempt, launch.node, failure, 0, None, end - 0.001, end)


def engine_of(graph, nodes, horizon=0.5, estimate=0.01, depth=2):
    """An engine with queue-ahead; chains ``depth`` deep (2 keeps the cases below short)."""
    e = Engine(graph, nodes, runtime_estimates={name: estimate for name in graph.labels},
               queue_ahead_s=horizon, queue_ahead_depth=depth)
    return e


def test_short_tasks_get_a_chain_of_queued_tasks_behind_them():
    e = engine_of(independent(DEPTH + 2), [Node("n", 1000, 1)], depth=DEPTH)
    first = e.handle(Schedule(0.0))
    e.validate()
    assert [(a.task, a.after) for a in first] == [(i, i - 1) for i in range(1 + DEPTH)]
    assert all(e.state[a.task] == State.LAUNCHED for a in first)
    assert e.cluster.n_active == 1   # only the running one holds the core


def test_the_queued_task_takes_the_reservation_when_its_predecessor_ends_whatever_the_outcome():
    e = engine_of(independent(4, retries=[1] * 4), [Node("n", 1000, 1)])
    run, q1, q2 = e.handle(Schedule(0.0))
    more = e.handle(ended(run, Failure.EXIT, end=0.01))   # a failure frees the slot just the same
    e.validate()
    assert e.cluster.active_tasks().tolist() == [q1.task]
    assert [(a.task, a.after) for a in more] == [(run.task, q2.task)]   # the retry comes first
    e.handle(ended(q1, end=0.02))
    e.validate()
    assert e.cluster.active_tasks().tolist() == [q2.task]


def test_long_tasks_get_nothing_queued_behind_them():
    e = engine_of(independent(4), [Node("n", 1000, 1)], estimate=5.0)
    assert [a.after for a in e.handle(Schedule(0.0))] == [-1]


def test_nothing_is_queued_behind_a_task_holding_less_than_it_needs():
    g = independent(3, memory_mb=[200, 500, 100])
    e = engine_of(g, [Node("n", 300, 1)])
    launches = e.handle(Schedule(0.0))
    assert [(a.task, a.after) for a in launches] == [(0, -1), (2, 0)]   # t1 needs more than t0 holds
    e.validate()


def test_a_label_limit_counts_queued_tasks():
    g = make_graph([f"t{i}" for i in range(4)], ["a", "a", "b", "b"], [[]] * 4, memory_mb=[100] * 4,
                   concurrency_limit={"b": 1})
    e = engine_of(g, [Node("n", 1000, 2)])
    launches = e.handle(Schedule(0.0))
    e.validate()
    assert sum(g.label[a.task] == g.labels.index("b") for a in launches) == 1


def test_a_queued_task_reported_before_its_predecessor_leaves_the_chain():
    e = engine_of(independent(3), [Node("n", 1000, 1)])
    run, q1, q2 = e.handle(Schedule(0.0))
    e.handle(ended(q1, Failure.INTERRUPTED, end=0.001))   # dropped by its agent: does not count
    e.validate()
    assert e.state[q1.task] == State.READY and e.attempts[q1.task] == 0
    assert e.queue.after_of == {q2.task: run.task}
    e.handle(ended(run, end=0.01))
    e.validate()
    assert e.cluster.active_tasks().tolist() == [q2.task]


def test_queued_tasks_of_a_lost_node_go_back_to_ready_uncounted():
    e = engine_of(independent(5), [Node("a", 1000, 1), Node("b", 1000, 1)])
    launches = e.handle(Schedule(0.0))
    on_a = [a for a in launches if a.node == 0]
    assert len(on_a) == 3   # one running, two queued
    again = e.handle(NodeLost(0, 0.5))
    e.validate()
    assert not any(a.node == 0 for a in again)
    for a in on_a:
        assert e.attempts[a.task] == 0 or e.node_of[a.task] == 1


def test_after_a_drain_queued_tasks_still_take_their_slot_and_come_back_interrupted():
    e = engine_of(independent(3), [Node("n", 1000, 1)])
    run, q1, q2 = e.handle(Schedule(0.0))
    e.handle(Drain(0.001))
    assert e.handle(ended(run, Failure.INTERRUPTED, end=0.002)) == []
    e.handle(ended(q1, Failure.INTERRUPTED, end=0.002))
    e.handle(ended(q2, Failure.INTERRUPTED, end=0.002))
    e.validate()
    assert e.finished and e.exit_code() == 3
    assert (e.attempts == 0).all()
