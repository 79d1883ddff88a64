"""The checkpoint: new runs, restarts, --retry-failed, hash refusal, corrupt files,
durability within the window, the in-memory fake, and kills at every compaction step."""

from __future__ import annotations

import os
import signal

import h5py
import numpy as np
import pytest

from pilot.checkpoint import MemoryCheckpoint, load_checkpoint, open_checkpoint
from pilot.checkpoint_schema import FORMAT_VERSION
from pilot.engine import Engine
from pilot.errors import UserError
from pilot.events import Failure, Node, Schedule, State, TaskFinished, TaskStarted
from pilot.graph import make_graph
from pilot.journal import journal_generations, journal_path, read_journal
from tests.helpers import wait_for
from tests.test_kill_loop import HOOK_STEPS, durable_done, read_records, start_child, synced_records


def chain_graph(n=12, command="true"):
    return make_graph([f"t{i}" for i in range(n)], ["a" if i % 2 else "b" for i in range(n)],
                      [[i - 1] if i % 4 else [] for i in range(n)], memory_mb=100, retries=2,
                      multiplier=2.0, command=command)


def new_engine(graph, ckpt):
    engine = Engine(graph, [Node("n0", 1000, 2)])
    if ckpt.restored is not None:
        engine.restore(*ckpt.restored)
    ckpt.attach(engine)
    engine.listeners.append(ckpt)
    return engine


def finish(engine, a, failure=Failure.NONE, code=0, t=1.0, log=""):
    engine.handle(TaskStarted(a.task, a.attempt, a.node, t))
    return engine.handle(TaskFinished(a.task, a.attempt, a.node, failure, code, None, t, t + 1,
                                      peak_rss_mb=12.5, cpu_s=0.5, log=log))


def test_new_checkpoint_schema(tmp_path):
    path, graph = tmp_path / "c.h5", chain_graph()
    ck = open_checkpoint(path, graph)
    assert ck.restored is None
    ck.close()
    with h5py.File(path, "r") as f:
        assert f.attrs["format_version"] == FORMAT_VERSION
        assert f.attrs["n_tasks"] == graph.size
        assert f["static/ids"][()].tobytes().split(b"\0")[3] == b"t3"
        assert list(f["static/parent_ptr"][()]) == list(graph.parent_ptr)
        assert {"state", "attempts", "memory_request", "exit_code", "signal", "failure", "start",
                "end", "node", "peak_rss_mb", "cpu_s", "log"} <= set(f["tasks"])
        assert f["history"].shape == (0,)


def test_restart_keeps_done_attempts_and_scaled_memory(tmp_path):
    path, graph = tmp_path / "c.h5", chain_graph()
    ck = open_checkpoint(path, graph)
    engine = new_engine(graph, ck)
    first, second = engine.handle(Schedule(0.0))[:2]      # t0 and t4 on one node (2 cores)
    finish(engine, first, log="/logs/t0.1.log")
    finish(engine, second, Failure.OOM, code=None)         # retried with twice the memory
    assert engine.memory_request[second.task] == 200
    ck.close()

    ck2 = open_checkpoint(path, graph)
    state, attempts, memory = ck2.restored
    assert state[first.task] == State.DONE and attempts[first.task] == 1
    assert attempts[second.task] == 1 and memory[second.task] == 200
    assert state[second.task] in (State.PENDING, State.DONE)
    assert not np.isin(state, (State.LAUNCHED, State.RUNNING, State.READY)).any()
    engine2 = new_engine(graph, ck2)
    assert engine2.state[first.task] == State.DONE
    assert engine2.memory_request[second.task] == 200
    ck2.close()
    view = load_checkpoint(path)
    assert view.table.log[first.task] == "/logs/t0.1.log"
    assert view.table.peak_rss_mb[first.task] == pytest.approx(12.5)
    assert view.table.failure[second.task] == Failure.OOM


def test_in_flight_attempt_is_not_counted_after_a_restart(tmp_path):
    path, graph = tmp_path / "c.h5", chain_graph()
    ck = open_checkpoint(path, graph)
    engine = new_engine(graph, ck)
    a = engine.handle(Schedule(0.0))[0]
    engine.handle(TaskStarted(a.task, a.attempt, a.node, 0.5))
    ck.flush()
    ck._journal.close()           # stop as a killed run would, lock released by the kernel
    ck._stopping = True
    ck.lock.release()
    ck2 = open_checkpoint(path, graph)
    state, attempts, _ = ck2.restored
    assert state[a.task] == State.PENDING and attempts[a.task] == 0
    ck2.close()


def test_retry_failed_resets_failed_and_dep_fail(tmp_path):
    path = tmp_path / "c.h5"
    graph = make_graph(["a", "b", "c"], ["x", "x", "y"], [[], [0], [1]], memory_mb=100, retries=0)
    ck = open_checkpoint(path, graph)
    engine = new_engine(graph, ck)
    a = engine.handle(Schedule(0.0))[0]
    finish(engine, a, Failure.EXIT, code=3)
    assert list(engine.state) == [State.FAILED, State.DEP_FAIL, State.DEP_FAIL]
    ck.close()
    ck2 = open_checkpoint(path, graph)
    assert list(ck2.restored[0]) == [State.FAILED, State.DEP_FAIL, State.DEP_FAIL]
    ck2.close()
    ck3 = open_checkpoint(path, graph, retry_failed=True)
    state, attempts, memory = ck3.restored
    assert list(state) == [State.PENDING] * 3 and list(attempts) == [0, 0, 0]
    ck3.close()
    assert list(load_checkpoint(path).table.state) == [State.PENDING] * 3


def test_another_workflow_is_refused(tmp_path):
    path = tmp_path / "c.h5"
    open_checkpoint(path, chain_graph()).close()
    before = path.read_bytes()
    with pytest.raises(UserError, match="another workflow") as err:
        open_checkpoint(path, chain_graph(command="false"))
    assert "\n" not in str(err.value)
    assert path.read_bytes() == before


def test_a_run_directory_given_for_a_checkpoint_names_the_checkpoint_in_it(tmp_path):
    open_checkpoint(tmp_path / "checkpoint.h5", chain_graph()).close()
    with pytest.raises(UserError) as err:
        load_checkpoint(tmp_path)
    assert str(err.value) == f"{tmp_path} is a directory, not a checkpoint file; its run's checkpoint is " \
                             f"{tmp_path / 'checkpoint.h5'}"


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty", "other_hdf5", "no_tasks"])
def test_corrupt_checkpoint_is_refused_and_left_alone(tmp_path, damage):
    path, graph = tmp_path / "c.h5", chain_graph()
    open_checkpoint(path, graph).close()
    good = path.read_bytes()
    if damage == "garbage":
        path.write_bytes(os.urandom(4096))
    elif damage == "truncated":
        path.write_bytes(good[:len(good) // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "other_hdf5":
        path.unlink()
        with h5py.File(path, "w") as f:
            f["x"] = 1
    else:
        with h5py.File(path, "a") as f:
            del f["tasks/state"]
    before = path.read_bytes()
    with pytest.raises(UserError) as err:
        open_checkpoint(path, graph)
    assert "\n" not in str(err.value) and str(path) in str(err.value)
    assert path.read_bytes() == before
    with pytest.raises(UserError):
        load_checkpoint(path)
    open_checkpoint(tmp_path / "other.h5", graph).close()   # the lock was released


def test_completions_reach_the_journal_within_the_window(tmp_path):
    path, graph = tmp_path / "c.h5", chain_graph()
    ck = open_checkpoint(path, graph, window=0.05)
    engine = new_engine(graph, ck)
    a = engine.handle(Schedule(0.0))[0]
    finish(engine, a)
    journal = journal_path(str(path), journal_generations(str(path))[-1])

    def done_on_disk():
        rows = read_journal(journal).rows
        return ((rows["task"] == a.task) & (rows["state"] == State.DONE)).any()
    wait_for(done_on_disk, timeout=5, what="the completion in the journal")
    assert load_checkpoint(path).table.state[a.task] == State.DONE
    ck.close()


def test_memory_fake_records_what_the_file_does(tmp_path):
    graph = chain_graph()
    fake, real = MemoryCheckpoint(graph), open_checkpoint(tmp_path / "c.h5", graph)
    engines = [new_engine(graph, fake), new_engine(graph, real)]
    for engine in engines:
        pending = list(engine.handle(Schedule(0.0)))
        while pending:
            a = pending.pop(0)
            failure = Failure.EXIT if a.task == 5 and a.attempt == 1 else Failure.NONE
            pending += finish(engine, a, failure, code=int(failure != Failure.NONE), log=f"l{a.task}")
    real.close()
    fake.close()
    table = load_checkpoint(tmp_path / "c.h5").table
    for name in ("state", "attempts", "memory_request", "exit_code", "failure", "end"):
        np.testing.assert_array_equal(getattr(fake.table, name), getattr(table, name))
    assert list(fake.table.log) == list(table.log)
    assert fake.table.attempts[5] == 2 and fake.closed


def test_history_keeps_attempts_across_compactions(tmp_path):
    path, graph = tmp_path / "c.h5", chain_graph()
    ck = open_checkpoint(path, graph, compact_min_bytes=1, compact_ratio=0.0)
    engine = new_engine(graph, ck)
    pending = list(engine.handle(Schedule(0.0)))
    while pending:
        pending += finish(engine, pending.pop(0))
        ck.flush()
        ck.tick()
    ck.close()
    with h5py.File(path, "r") as f:
        history = f["history"][()]
        generation = f.attrs["generation"]
    assert generation > 3
    finished = history[history["kind"] == 2]
    assert sorted(finished["task"].tolist()) == list(range(graph.size))
    assert journal_generations(str(path)) == [generation]


@pytest.mark.parametrize("step", HOOK_STEPS)
def test_kill_at_each_durable_step_leaves_a_good_checkpoint(tmp_path, step):
    ckpt, records = tmp_path / "run.h5", tmp_path / "rec.txt"
    child = start_child(ckpt, records, 60, f"{step}:2", pace=0.01, compact_bytes=1024)
    assert child.wait(timeout=60) == -signal.SIGKILL, child.stderr.read().decode()[-2000:]
    done = durable_done(ckpt)
    lines = [tid for tid, _ in read_records(records)]
    count = len(lines)
    assert done <= set(lines)
    assert {lines[i] for i in synced_records(records)} <= done   # every fsynced completion is there
    again = start_child(ckpt, records, 60)
    assert again.wait(timeout=60) == 0, again.stderr.read().decode()[-2000:]
    later = {tid for tid, _ in read_records(records)[count:]}
    assert not done & later
    assert len(durable_done(ckpt)) == 60
    assert not os.path.exists(str(ckpt) + ".tmp")


def test_lost_attempts_are_in_the_history_and_an_empty_graph_works(tmp_path):
    from pilot.events import NodeLost

    path, graph = tmp_path / "c.h5", chain_graph()
    ck = open_checkpoint(path, graph)
    engine = new_engine(graph, ck)
    a = engine.handle(Schedule(0.0))[0]
    engine.handle(TaskStarted(a.task, a.attempt, a.node, 1.0))
    engine.handle(NodeLost(a.node, 2.0))
    ck.close()
    with h5py.File(path, "r") as f:
        history = f["history"][()]
    lost = history[history["kind"] == 5]
    assert a.task in lost["task"].tolist()
    assert load_checkpoint(path).table.attempts[a.task] == 0

    empty = make_graph([], [], [])
    ck = open_checkpoint(tmp_path / "e.h5", empty)
    ck.close()
    again = open_checkpoint(tmp_path / "e.h5", empty)
    assert again.restored[0].size == 0
    again.close()


def test_event_rows_pack_every_field_of_the_row_layout():
    from pilot.checkpoint import event_rows
    from pilot.checkpoint_schema import FINISHED, TRANSITION, UNCHANGED
    from pilot.journal import ROW

    graph = chain_graph(4)
    engine = Engine(graph, [Node("n0", 1000, 2)])
    (a,) = engine.handle(Schedule(0.0))[:1]
    done = TaskFinished(a.task, a.attempt, a.node, Failure.SIGNAL, None, 11, 1.0, 2.5,
                        peak_rss_mb=12.5, cpu_s=0.25, log="/l/t0.1.log")
    data, logs = event_rows(done, [(a.task, State.LAUNCHED, State.READY), (3, State.PENDING, State.READY)],
                            engine)
    rows = np.frombuffer(data, ROW)
    assert logs == ["/l/t0.1.log", ""]
    own, other = rows[0], rows[1]
    assert (own["task"], own["kind"], own["state"], own["failure"]) == \
        (a.task, FINISHED, State.READY, Failure.SIGNAL)
    assert (own["attempts"], own["exit_code"], own["signal"], own["node"]) == (1, -1, 11, a.node)
    assert (own["memory_request"], own["time"], own["start"], own["end"]) == (100, 2.5, 1.0, 2.5)
    assert (own["peak_rss_mb"], own["cpu_s"]) == (np.float32(12.5), np.float32(0.25))
    assert (other["task"], other["kind"], other["state"], other["time"]) == (3, TRANSITION, State.READY, 2.5)
    assert np.isnan(other["start"]) and np.isnan(other["end"]) and other["exit_code"] == -1
    bare, _ = event_rows(done, [(3, State.PENDING, State.READY)])
    row = np.frombuffer(bare, ROW)[0]
    assert (row["attempts"], row["node"], row["memory_request"]) == (UNCHANGED, UNCHANGED, UNCHANGED)
