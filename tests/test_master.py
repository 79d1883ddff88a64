"""The master/agent loop in one process: agents are threads over LocalTransport, tasks are
real subprocesses (the native payload), checks come from the tasks' own records.

The helpers here (workflow files, records, checks) are shared with tests/test_mpi.py.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from pilot.agent import Signals
from pilot.agent_loop import run_agent
from pilot.engine_queue import QueueAhead
from pilot.errors import UserError
from pilot.events import Node, State
from pilot.master import RunConfig, group_nodes, master_main, progress_line, wall_margin
from pilot.nodes import NodeInfo
from pilot.protocol import Hello
from pilot.runner import WatchConfig
from pilot.transport import LocalHub
from tests.helpers import ROOT, wait_for
from tests.test_runner import ensure_payload, pid_gone

DATA = ROOT / "tests" / "data" / "runtime"
FAST = WatchConfig(tolerance=1.10, sample_interval=0.05, kill_grace=0.5)


# ---- shared helpers ---------------------------------------------------------------------


def workflow(name: str, folder: Path) -> tuple[Path, Path]:
    """tests/data/runtime/<name>.yaml with its placeholders filled in; (workflow, record file)."""
    record = folder / "records.txt"
    text = (DATA / f"{name}.yaml").read_text()
    text = text.replace("@PAYLOAD@", ensure_payload()).replace("@RECORD@", str(record))
    path = folder / f"{name}.yaml"
    path.write_text(text.replace("@DIR@", str(folder)))
    return path, record


@dataclass(frozen=True)
class Record:
    task: str
    node: str
    attempt: int
    start: float
    end: float
    pid: int
    memory_mb: int


def read_records(path: Path) -> list[Record]:
    if not path.exists():
        return []
    rows = [line.split() for line in path.read_text().splitlines()]
    return [Record(r[0], r[1], int(r[2]), float(r[3]), float(r[4]), int(r[5]), int(r[6])) for r in rows]


def assert_exactly_once(records: list[Record], ids) -> None:
    seen = defaultdict(int)
    for r in records:
        seen[r.task] += 1
    assert dict(seen) == {i: 1 for i in ids}


def assert_order(records: list[Record], edges) -> None:
    by = {r.task: r for r in records}
    for parent, child in edges:
        assert by[parent].end <= by[child].start, f"{child} started before {parent} ended"


def peak_memory_by_node(records: list[Record]) -> dict[str, int]:
    """Largest sum of requests of tasks running at once on each node (from their timestamps)."""
    peaks = {}
    for node in {r.node for r in records}:
        points = sorted([(r.start, 1, r.memory_mb) for r in records if r.node == node]
                        + [(r.end, 0, -r.memory_mb) for r in records if r.node == node])
        level = peak = 0
        for _, _, delta in points:   # ends sort before starts at the same instant
            level += delta
            peak = max(peak, level)
        peaks[node] = peak
    return peaks


PACKING_IDS = ["root", *(f"w{i:02d}" for i in range(12)), "join"]
PACKING_EDGES = [("root", f"w{i:02d}") for i in range(12)] + [(f"w{i:02d}", "join") for i in range(12)]


# ---- running the loop in threads -------------------------------------------------------


def run_local(tmp_path: Path, wf: Path, agents: list[NodeInfo], *, signals=None, deadline=None,
              max_failures=None, ckpt_name="ckpt.h5", queue_ahead_s=0.0):
    """master_main on this thread, one agent thread per NodeInfo; returns the exit code."""
    hub = LocalHub(len(agents) + 1)
    threads = [threading.Thread(target=run_agent, args=(hub.endpoint(r + 1), info, FAST), daemon=True)
               for r, info in enumerate(agents)]
    for th in threads:
        th.start()
    config = RunConfig(workflow=str(wf), checkpoint=str(tmp_path / ckpt_name),
                       logdir=str(tmp_path / "logs"), deadline=deadline, max_failures=max_failures,
                       progress_interval=0.2, watch=FAST, queue_ahead_s=queue_ahead_s)
    try:
        return master_main(hub.endpoint(0), config, NodeInfo("solo", 1000, 4), signals)
    finally:
        for th in threads:
            th.join(10)
            assert not th.is_alive(), "an agent did not stop"


def emulated(count: int, memory_mb=1000, cores=4) -> list[NodeInfo]:
    return [NodeInfo(f"n{i}", memory_mb, cores) for i in range(count)]


# ---- pure parts ---------------------------------------------------------------------------


def test_group_nodes_shares_a_node_between_its_ranks():
    hellos = [Hello(3, "b", 100, 2), Hello(1, "a", 500, 4), Hello(2, "b", 100, 2), Hello(4, "c", 7, 1)]
    nodes, ranks = group_nodes(hellos)
    assert nodes == [Node("a", 500, 4), Node("b", 100, 2), Node("c", 7, 1)]
    assert ranks == [[1], [2, 3], [4]]


def test_wall_margin():
    assert wall_margin(1000.0, 0.0) == 60.0
    assert wall_margin(100.0, 90.0) == 1.0


# ---- the loop ------------------------------------------------------------------------------


def test_packing_order_and_exactly_once(tmp_path):
    wf, record = workflow("packing", tmp_path)
    assert run_local(tmp_path, wf, emulated(2)) == 0
    records = read_records(record)
    assert_exactly_once(records, PACKING_IDS)
    assert_order(records, PACKING_EDGES)
    peaks = peak_memory_by_node(records)
    assert set(peaks) <= {"n0", "n1"} and max(peaks.values()) <= 1000
    assert (tmp_path / "logs" / "00000" / "w03.1.log").exists()


def test_ranks_of_one_node_share_its_budget(tmp_path):
    wf, record = workflow("packing", tmp_path)
    assert run_local(tmp_path, wf, [NodeInfo("shared", 1000, 8)] * 3) == 0
    records = read_records(record)
    assert_exactly_once(records, PACKING_IDS)
    assert peak_memory_by_node(records)["shared"] <= 1000


def test_one_rank_runs_tasks_itself(tmp_path):
    wf, record = workflow("packing", tmp_path)
    assert run_local(tmp_path, wf, []) == 0
    records = read_records(record)
    assert_exactly_once(records, PACKING_IDS)
    assert {r.node for r in records} == {"solo"} and peak_memory_by_node(records)["solo"] <= 1000


def test_failures_are_classified_while_others_go_on(tmp_path, caplog):
    wf, record = workflow("failures", tmp_path)
    assert run_local(tmp_path, wf, emulated(2)) == 1
    assert_exactly_once(read_records(record), ["ok1", "ok2", "ok3", "ok4"])
    text = caplog.text
    for task, kind in (("segv", "SIGNAL"), ("exit3", "EXIT"), ("slow", "TIMEOUT"), ("nocmd", "LAUNCH")):
        assert f"task {task} attempt 1 failed: {kind}" in text


def test_oom_is_retried_with_a_scaled_request(tmp_path, caplog):
    wf, record = workflow("oom_retry", tmp_path)
    assert run_local(tmp_path, wf, emulated(1)) == 0
    assert_oom_retried(read_records(record), caplog.text)


def assert_oom_retried(records: list[Record], log_text: str) -> None:
    """oom_retry.yaml: ``big`` ran out of memory once, then ran with its request scaled to 300 MB."""
    assert_exactly_once(records, ["big", "small1", "small2", "after_big"])
    big = next(r for r in records if r.task == "big")
    assert (big.attempt, big.memory_mb) == (2, 300)
    assert "task big attempt 1 failed: OOM" in log_text


def test_bad_fit_refused_before_launching(tmp_path):
    wf, _ = workflow("too_big", tmp_path)
    with pytest.raises(UserError, match="huge"):
        run_local(tmp_path, wf, emulated(2))
    assert not (tmp_path / "fine.marker").exists()


def _markers(folder: Path, count: int):
    found = [p for p in folder.glob("*.marker")]
    return found if len(found) >= count else None


def _signal_when(signals: Signals, signum: int, predicate, timeout: float, what: str) -> None:
    """In a thread: set ``signals.signum`` (as the rank's handler would) once ``predicate()`` holds."""
    def stop() -> None:
        wait_for(predicate, timeout, what=what)
        signals.signum = signum

    threading.Thread(target=stop, daemon=True).start()


def test_signal_drains_kills_and_exits_3(tmp_path):
    wf, _ = workflow("long", tmp_path)
    signals = Signals()
    _signal_when(signals, 15, lambda: _markers(tmp_path, 6), 20, "tasks running")
    began = time.monotonic()
    assert run_local(tmp_path, wf, emulated(2), signals=signals) == 3
    assert time.monotonic() - began < 30
    pids = [int(n) for p in tmp_path.glob("*.marker") for n in p.read_text().split() if int(n) > 0]
    assert len(pids) >= 6
    for pid in pids:
        wait_for(lambda: pid_gone(pid), 5, what=f"pid {pid} gone")


def test_wall_time_stops_launching_and_exits_3(tmp_path):
    wf, _ = workflow("long", tmp_path)
    began = time.monotonic()
    assert run_local(tmp_path, wf, emulated(1, cores=2), deadline=time.time() + 3.0) == 3
    assert time.monotonic() - began < 20
    assert len(list(tmp_path.glob("*.marker"))) <= 2


def test_progress_line_counts():
    class FakeEngine:   # only the arrays progress_line reads
        import numpy as np
        state = np.array([State.DONE, State.RUNNING, State.LAUNCHED, State.FAILED, State.READY])
        node_of = np.array([0, 1, 1, -1, -1])
        memory_request = np.array([5, 10, 20, 40, 80, 10])
        queue = QueueAhead(1.0)

    engine = FakeEngine()
    engine.state = np.append(engine.state, State.LAUNCHED)   # task 5: queued behind task 1
    engine.node_of = np.append(engine.node_of, 1)
    engine.queue.link(5, 1, 0.0)
    line = progress_line(engine, [Node("a", 100, 1), Node("b", 100, 1)])
    assert line == ("progress: done 1/6 running 2 queued 1 ready 1 failed 1 dep_fail 0 | nodes busy 1/2 "
                    "| memory 30/200 MB")


def test_resume_after_a_drain_runs_each_task_once(tmp_path):
    wf, record = workflow("packing", tmp_path)
    signals = Signals()
    _signal_when(signals, 10, lambda: len(read_records(record)) >= 3, 30, "3 records")
    assert run_local(tmp_path, wf, emulated(2), signals=signals) == 3
    first = len(read_records(record))
    assert 3 <= first < len(PACKING_IDS)
    assert run_local(tmp_path, wf, emulated(2)) == 0
    records = read_records(record)
    assert_exactly_once(records, PACKING_IDS)
    assert_order(records, PACKING_EDGES)


def test_a_task_queued_behind_one_that_runs_long_is_taken_back_for_a_free_node(tmp_path, caplog):
    """Label estimates say 0.05 s, so tasks queue behind the one that takes 8 s; once the other
    node is free, they are taken back and run there instead of waiting for it."""
    record = tmp_path / "records.txt"
    payload = ensure_payload()
    fast = [f"f{i:02d}" for i in range(12)]
    lines = [f'  - {{id: {t}, command: ["{payload}", "--sleep", "0.05", "--record", "{record}"]}}' for t in fast[:4]]
    lines.append(f'  - {{id: slow, command: ["{payload}", "--sleep", "8", "--record", "{record}"]}}')
    lines += [f'  - {{id: {t}, command: ["{payload}", "--sleep", "0.05", "--record", "{record}"]}}' for t in fast[4:]]
    wf = tmp_path / "wf.yaml"
    wf.write_text("requestMemory: 100\ntasks:\n" + "\n".join(lines) + "\n")
    caplog.set_level("INFO", logger="pilot.master")
    assert run_local(tmp_path, wf, emulated(2, cores=1), queue_ahead_s=0.5) == 0
    by = {r.task: r for r in read_records(record)}
    assert set(by) == {*fast, "slow"}
    late = [t for t in fast if by[t].end > by["slow"].end]
    assert not late, f"{late} waited for the slow task"
    assert "taking back task" in caplog.text


def _paced_master(pace_s: float, queued: bool):
    """A Master over two emulated nodes whose engine has (or has not) tasks queued ahead."""
    from pilot.engine import Engine
    from pilot.events import Schedule
    from pilot.graph import make_graph
    from pilot.master import Master, MasterOptions

    graph = make_graph([f"t{i}" for i in range(6)], ["a"] * 6, [[] for _ in range(6)], memory_mb=[100] * 6)
    nodes = [Node("a", 1000, 1), Node("b", 1000, 1)]
    engine = Engine(graph, nodes, runtime_estimates={"a": 0.01 if queued else 5.0}, queue_ahead_s=0.5)
    engine.handle(Schedule(0.0))
    hub = LocalHub(3)
    master = Master(hub.endpoint(0), graph, engine, nodes, [[1], [2]], MasterOptions("logs", pace_s=pace_s))
    assert bool(engine.queue.queued_at) == queued
    master._last_turn = time.monotonic()
    return master


def test_rank_0_paces_its_turns_while_tasks_are_queued_ahead():
    master = _paced_master(0.2, queued=True)
    before = time.monotonic()
    master._pace()
    assert time.monotonic() - before >= 0.2 - (before - master._last_turn)


def test_rank_0_answers_at_once_when_nothing_is_queued_ahead_or_it_drains():
    for master in (_paced_master(60.0, queued=False), _paced_master(60.0, queued=True)):
        if master.engine.queue.queued_at:
            master.drained_at = time.monotonic()
        before = time.monotonic()
        master._pace()
        assert time.monotonic() - before < 30.0   # a paced turn would have waited 60 s
