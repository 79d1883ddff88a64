"""The engine's rules, one scenario at a time: transitions, retries, memory scaling,
failure propagation, drain, deadline, restore, node loss, listeners."""

from __future__ import annotations

import numpy as np
import pytest

from pilot.engine import Engine
from pilot.engine_states import ALLOWED, IllegalTransition, TRANSITIONS
from pilot.events import (Drain, Failure, Launch, Node, NodeLost, Schedule, State, TaskFinished,
                          TaskStarted)
from pilot.graph import make_graph

P, R, L, U, D, F, X = State


def chain_graph(n=3, **values):
    return make_graph([f"t{i}" for i in range(n)], ["a"] * n, [[i - 1] if i else [] for i in range(n)],
                      **values)


def graph_of(parents, labels=None, **values):
    n = len(parents)
    return make_graph([f"t{i}" for i in range(n)], labels or ["a"] * n, parents, **values)


def finish(launch: Launch, failure=Failure.NONE, code=0, start=0.0, end=1.0):
    return TaskFinished(launch.task, launch.attempt, launch.node, failure, code, None, start, end)


class Recorder:
    def __init__(self):
        self.calls = []

    def record(self, event, transitions):
        self.calls.append((event, transitions))


def run_one(engine, launch, failure=Failure.NONE, code=0, t=1.0):
    """Start and finish one launch; returns the next launches."""
    engine.handle(TaskStarted(launch.task, launch.attempt, launch.node, t - 1))
    engine.validate()
    out = engine.handle(finish(launch, failure, code, t - 1, t))
    engine.validate()
    return out


def test_transition_table_has_the_documented_pairs():
    for pair in [(P, R), (P, X), (R, L), (L, U), (L, R), (L, D), (L, F), (U, D), (U, F), (U, R)]:
        assert (int(pair[0]), int(pair[1])) in ALLOWED
    for pair in [(D, R), (R, D), (P, L), (X, R), (D, F)]:
        assert (int(pair[0]), int(pair[1])) not in ALLOWED
    assert len(TRANSITIONS) == len(ALLOWED)


def test_chain_runs_in_order_and_listeners_see_transitions():
    g = chain_graph(3)
    e = Engine(g, [Node("n", 4096, 2)])
    rec = Recorder()
    e.listeners.append(rec)
    (a,) = e.handle(Schedule(0.0))
    assert (a.task, a.attempt, a.memory_mb, a.cpus) == (0, 1, 2048, 1)
    assert rec.calls[-1][1] == [(0, R, L)]
    (b,) = run_one(e, a)
    assert b.task == 1 and e.state[0] == D and e.state[2] == P
    assert (1, P, R) in rec.calls[-1][1] and (1, R, L) in rec.calls[-1][1]
    (c,) = run_one(e, b, t=2.0)
    assert run_one(e, c, t=3.0) == []
    assert e.finished and e.exit_code() == 0
    assert [s for _, _, s in e.history(2)] == [R, L, U, D]


def test_forbidden_transition_carries_history():
    g = chain_graph(1)
    e = Engine(g, [Node("n", 4096, 2)])
    (a,) = e.handle(Schedule(0.0))
    run_one(e, a)
    with pytest.raises(IllegalTransition) as info:
        e.handle(TaskStarted(a.task, a.attempt, a.node, 5.0))
    err = info.value
    assert err.old == D and err.new == U
    assert [(o, n) for _, o, n in err.history] == [(P, R), (R, L), (L, U), (U, D)]
    assert "t0" in str(err) and "RUNNING->DONE" in str(err)


def test_stale_messages_are_ignored():
    g = chain_graph(1, retries=1)
    e = Engine(g, [Node("n", 4096, 2)])
    (a,) = e.handle(Schedule(0.0))
    (a2,) = run_one(e, a, Failure.EXIT, 1)
    assert a2.attempt == 2
    assert e.handle(finish(a)) == []          # attempt 1 again: ignored
    assert e.state[0] == L
    e.validate()


def test_retries_then_fail_for_good_and_dep_fail_descendants_only():
    # t0 -> t1 -> t2, and an independent t3
    g = graph_of([[], [0], [1], []], retries=[2, 0, 0, 0])
    e = Engine(g, [Node("n", 2048, 1)])
    (a,) = e.handle(Schedule(0.0))
    assert a.task == 0
    for attempt in (2, 3):   # t0 goes first again: it heads the longest path
        (a,) = run_one(e, a, Failure.EXIT, 1)
        assert a.task == 0 and a.attempt == attempt
    out = run_one(e, a, Failure.EXIT, 1)
    assert e.state[0] == F and e.state[1] == X and e.state[2] == X
    assert [x.task for x in out] == [3]
    run_one(e, out[0])
    assert e.finished and e.exit_code() == 1


def test_retry_unless_exit_is_never_retried():
    g = chain_graph(1, retries=5, retry_unless_exit=(3,))
    e = Engine(g, [Node("n", 4096, 2)])
    (a,) = e.handle(Schedule(0.0))
    assert run_one(e, a, Failure.EXIT, 3) == []
    assert e.state[0] == F and e.attempts[0] == 1


def test_oom_scales_memory_up_to_the_cap_then_fails():
    g = chain_graph(1, memory_mb=1000, retries=10, multiplier=1.5, memory_max=3000)
    e = Engine(g, [Node("n", 8000, 2)])
    (a,) = e.handle(Schedule(0.0))
    seen = [a.memory_mb]
    while True:
        out = run_one(e, a, Failure.OOM, None)
        if not out:
            break
        a = out[0]
        seen.append(a.memory_mb)
    assert seen == [1000, 1500, 2250, 3000]   # ceil(1000 * 1.5**n), capped at requestMemoryMax
    assert e.state[0] == F and e.memory_request[0] == 3000


def test_oom_cap_is_the_largest_node_without_memory_max():
    g = chain_graph(1, memory_mb=3000, retries=10, multiplier=2.0)
    e = Engine(g, [Node("a", 4000, 2), Node("b", 5000, 2)])
    (a,) = e.handle(Schedule(0.0))
    (a,) = run_one(e, a, Failure.OOM, None)
    assert a.memory_mb == 5000 and a.node == 1
    assert run_one(e, a, Failure.OOM, None) == []
    assert e.state[0] == F


def test_oom_without_multiplier_retries_with_same_memory():
    g = chain_graph(1, memory_mb=1000, retries=1)
    e = Engine(g, [Node("n", 8000, 2)])
    (a,) = e.handle(Schedule(0.0))
    (a,) = run_one(e, a, Failure.OOM, None)
    assert a.memory_mb == 1000 and a.attempt == 2


def test_interrupted_and_lost_attempts_do_not_count():
    g = chain_graph(1, retries=0)
    e = Engine(g, [Node("a", 4096, 2), Node("b", 4096, 2)])
    (a,) = e.handle(Schedule(0.0))
    (a,) = run_one(e, a, Failure.INTERRUPTED, None)
    assert a.attempt == 1
    e.handle(TaskStarted(a.task, a.attempt, a.node, 1.0))
    (b,) = e.handle(NodeLost(a.node, 2.0))
    e.validate()
    assert b.attempt == 1 and b.node != a.node and not e.cluster.alive[a.node]
    assert e.handle(finish(a, end=3.0)) == []   # from the lost node: ignored
    run_one(e, b, t=4.0)
    assert e.exit_code() == 0


def test_max_failures_stops_launching():
    g = graph_of([[], [], [], []])
    e = Engine(g, [Node("n", 2048, 1)], max_failures=1)
    (a,) = e.handle(Schedule(0.0))
    assert run_one(e, a, Failure.EXIT, 1) == []
    assert e.finished and e.exit_code() == 1
    assert e.counts()[R] == 3


def test_drain_leaves_work_and_exits_3():
    g = graph_of([[], [], []])
    e = Engine(g, [Node("n", 2048, 1)])
    (a,) = e.handle(Schedule(0.0))
    assert e.handle(Drain(0.5, "signal")) == []
    assert not e.finished
    assert run_one(e, a) == []
    assert e.finished and e.exit_code() == 3


def test_deadline_launches_nothing_that_would_end_after_it():
    g = graph_of([[], [], []])
    e = Engine(g, [Node("n", 2048, 1)], runtime_estimates={"a": 10.0})
    e.set_deadline(25.0, margin_s=4.0)
    (a,) = e.handle(Schedule(0.0))
    (b,) = e.handle(finish(a, start=0.0, end=10.0))
    assert e.handle(finish(b, start=10.0, end=20.0)) == []     # 20 + 10 > 25 - 4
    assert e.finished and e.exit_code() == 3


def test_estimates_are_learned_from_finished_attempts():
    g = graph_of([[], [], []], labels=["x", "x", "y"])
    e = Engine(g, [Node("n", 8192, 4)])
    launches = e.handle(Schedule(0.0))
    e.handle(finish(launches[0], start=0.0, end=4.0))
    e.handle(finish(launches[1], start=0.0, end=6.0))
    est = e.label_estimates()
    assert est["x"] == pytest.approx(5.0) and est["y"] == pytest.approx(5.0)  # y: filled by the mean


def test_restore_keeps_done_and_requeues_active():
    g = graph_of([[], [], [1]], memory_mb=[1000, 1000, 1000])
    e = Engine(g, [Node("n", 4096, 4)])
    state = np.array([D, U, P], dtype=np.int8)
    made = e.restore(state, np.array([1, 2, 0]), np.array([1000, 1500, 1000]))
    e.validate()
    assert list(e.state) == [D, R, P] and list(e.attempts) == [1, 1, 0]
    assert e.memory_request[1] == 1500 and (1, P, R) in made
    (a,) = e.handle(Schedule(0.0))
    assert (a.task, a.attempt, a.memory_mb) == (1, 2, 1500)


def test_reset_failed_gives_failed_work_another_go():
    g = graph_of([[], [0]], retries=0)
    e = Engine(g, [Node("n", 4096, 4)])
    (a,) = e.handle(Schedule(0.0))
    run_one(e, a, Failure.EXIT, 1)
    assert list(e.state) == [F, X]
    e2 = Engine(g, [Node("n", 4096, 4)])
    e2.restore(e.state, e.attempts, e.memory_request)
    e2.reset_failed()
    e2.validate()
    assert list(e2.state) == [R, P] and e2.attempts[0] == 0
    (a,) = e2.handle(Schedule(0.0))
    (b,) = run_one(e2, a)
    run_one(e2, b)
    assert e2.exit_code() == 0


def test_restore_after_first_event_is_refused():
    e = Engine(chain_graph(1), [Node("n", 4096, 1)])
    e.handle(Schedule(0.0))
    with pytest.raises(RuntimeError):
        e.restore(e.state, e.attempts, e.memory_request)


def test_no_node_able_to_run_work_exits_3():
    g = graph_of([[], []], memory_mb=[1000, 1000])
    e = Engine(g, [Node("a", 1000, 1)])
    (a,) = e.handle(Schedule(0.0))
    assert e.handle(NodeLost(0, 0.5)) == []
    assert e.finished and e.exit_code() == 3


# ---- handle_many: several events, one dispatch ---------------------------------------


def packed_rows(ckpt):
    """Every row a MemoryCheckpoint got, as raw bytes, and the log paths."""
    return (b"".join(part.rows.tobytes() for part in ckpt.rows),
            [part.log(i) for part in ckpt.rows for i in range(len(part.rows))])


def engine_with_rows(g, nodes):
    from pilot.checkpoint import MemoryCheckpoint

    e = Engine(g, nodes)
    ckpt = MemoryCheckpoint(g)
    ckpt.attach(e)
    e.listeners.append(ckpt)
    return e, ckpt


def test_handle_many_equals_one_handle_per_event_when_only_the_last_dispatches():
    # TaskStarted never dispatches, so [started..., finished] must leave exactly the state and
    # checkpoint rows of one handle per event
    g = graph_of([[], [], [], [], [0, 1]], retries=1)
    nodes = [Node("a", 4096, 2), Node("b", 4096, 1)]
    one, ck_one = engine_with_rows(g, nodes)
    many, ck_many = engine_with_rows(g, nodes)
    launches = one.handle(Schedule(0.0))
    assert many.handle_many([Schedule(0.0)]) == launches and len(launches) == 3
    started = [TaskStarted(a.task, a.attempt, a.node, 1.0) for a in launches]
    failed = finish(launches[0], Failure.EXIT, 1, 1.0, 2.0)
    batch = started + [failed]
    expect = [out for ev in batch for out in one.handle(ev)]
    got = many.handle_many(batch)
    many.validate()
    assert got == expect and [a.task for a in got] == [0] and got[0].attempt == 2
    for name in ("state", "attempts", "memory_request", "node_of", "start_time"):
        assert np.array_equal(getattr(one, name), getattr(many, name), equal_nan=True), name
    assert packed_rows(ck_one) == packed_rows(ck_many)
    assert [many.history(t) for t in range(5)] == [one.history(t) for t in range(5)]


def test_handle_many_applies_all_events_then_dispatches_once_at_the_last_time():
    g = graph_of([[], [], [], []])
    e = Engine(g, [Node("n", 4096, 2)])
    rec = Recorder()
    e.listeners.append(rec)
    a, b = e.handle(Schedule(0.0))
    rec.calls.clear()
    batch = [finish(a, start=0.0, end=1.0), finish(b, start=0.0, end=3.0)]
    launches = e.handle_many(batch)
    e.validate()
    assert sorted(x.task for x in launches) == [2, 3]
    assert [call[0] for call in rec.calls] == batch            # one record per event, in order
    assert rec.calls[0][1] == [(a.task, L, D)]                 # the first event: its own change only
    assert rec.calls[1][1] == [(b.task, L, D), (2, R, L), (3, R, L)]
    assert e.start_time[2] == e.start_time[3] == 3.0


def test_handle_many_listener_reads_the_engine_as_it_was_after_each_event():
    # task 0 fails and is requeued by the first event; the second event's dispatch relaunches
    # it: the first row must still say READY with no node
    g = graph_of([[], []], retries=1)
    e, ckpt = engine_with_rows(g, [Node("n", 2048, 1)])
    (a,) = e.handle(Schedule(0.0))
    e.handle(TaskStarted(a.task, a.attempt, a.node, 0.5))
    (again,) = e.handle_many([finish(a, Failure.EXIT, 1, 0.5, 1.0), Schedule(2.0)])
    assert again.task == 0 and again.attempt == 2
    first, second = ckpt.rows[-2].rows, ckpt.rows[-1].rows
    assert (first["state"][0], first["node"][0], first["attempts"][0]) == (R, -1, 1)
    assert (second["state"][0], second["node"][0], second["attempts"][0], second["time"][0]) == (L, 0, 2, 2.0)


def test_handle_many_of_nothing_does_nothing_and_a_drain_stops_its_dispatch():
    g = graph_of([[], [], []])
    e = Engine(g, [Node("n", 2048, 1)])
    rec = Recorder()
    e.listeners.append(rec)
    assert e.handle_many([]) == [] and rec.calls == []
    (a,) = e.handle(Schedule(0.0))
    assert e.handle_many([finish(a), Drain(1.5)]) == []
    assert e.finished and e.exit_code() == 3 and len(rec.calls) == 3
    assert e.handle_many([TaskStarted(a.task, a.attempt + 1, a.node, 2.0)]) == []   # stale: ignored


def test_transition_table_is_the_allowed_set():
    from pilot.engine_states import ALLOWED_TABLE

    pairs = {(a, b) for a in range(len(State)) for b in range(len(State)) if ALLOWED_TABLE[a][b]}
    assert pairs == set(ALLOWED)


def test_numpy_mean_is_numpy_to_the_last_bit():
    from pilot.engine import numpy_mean

    rng = np.random.default_rng(3)
    for n in list(range(1, 40)) + [127, 128, 129, 300]:
        for _ in range(20):
            values = rng.lognormal(3.0, 2.0, n)
            assert numpy_mean(values.tolist()) == float(np.mean(values)), n
