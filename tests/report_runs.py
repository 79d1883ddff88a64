"""Real checkpoints for the report tests: the real engine and checkpoint, driven in simulated
time with chosen runtimes, peak RSS and failures (as agents would report them)."""

from __future__ import annotations

import heapq

from pilot.checkpoint import open_checkpoint
from pilot.engine import Engine
from pilot.events import Failure, Node, Schedule, TaskFinished, TaskStarted
from pilot.graph import make_graph

T0 = 1_780_000_000.0      # simulated epoch of the first launch


def drive(engine, outcome, runtime, *, log_dir=None, ids=None, stop_after=None, ckpt=None):
    """Run ``engine`` to the end (or for ``stop_after`` finish events): every launch is
    started at once and finishes ``runtime(task)`` seconds later with
    ``outcome(task, attempt, memory_mb) -> (failure, exit_code, peak_rss_mb)``."""
    heap, seq, finished = [], 0, 0

    def launch(actions, now):
        nonlocal seq
        for a in actions:
            engine.handle(TaskStarted(a.task, a.attempt, a.node, now))
            seq += 1
            heapq.heappush(heap, (now + runtime(a.task), seq, a, now))

    launch(engine.handle(Schedule(T0)), T0)
    while heap and (stop_after is None or finished < stop_after):
        end, _, a, start = heapq.heappop(heap)
        failure, code, rss = outcome(a.task, a.attempt, a.memory_mb)
        log = ""
        if log_dir is not None:
            log = str(log_dir / f"{ids[a.task]}.{a.attempt}.log")
            with open(log, "w") as f:
                f.writelines(f"line {k} of {ids[a.task]} attempt {a.attempt}\n" for k in range(15))
        event = TaskFinished(a.task, a.attempt, a.node, failure, code, 9 if failure == Failure.OOM else None,
                             start, end, peak_rss_mb=rss, cpu_s=0.5 * (end - start), log=log)
        launch(engine.handle(event), end)
        finished += 1
        if ckpt is not None and finished % 50 == 0:
            ckpt.tick()
    return finished


# ---- the known run: right-sizing figures computed by hand in the tests ----------------

ISR_PEAKS = [300, 400, 500, 600]             # requestMemory 1000, 10 s each
CAL_PEAKS = [1000, 1200, 1500, 2500]         # requestMemory 2000, 20 s; cal3 OOMs first (2100)
RUNTIME = {"isr": 10.0, "calibrate": 20.0, "coadd": 30.0, "extra": 5.0}


def known_graph():
    ids = [f"isr{i}" for i in range(4)] + [f"cal{i}" for i in range(4)] + ["coadd", "extra0"]
    labels = ["isr"] * 4 + ["calibrate"] * 4 + ["coadd", "extra"]
    parents = [[]] * 4 + [[i] for i in range(4)] + [list(range(4, 8)), []]
    memory = [1000] * 4 + [2000] * 4 + [3000, 500]
    retries = [0] * 4 + [1] * 4 + [0, 0]
    return make_graph(ids, labels, parents, memory_mb=memory, retries=retries, multiplier=2.0,
                      command="true")


def known_outcome(graph):
    def outcome(task, attempt, memory_mb):
        tid = graph.ids[task]
        if tid == "extra0":
            return Failure.EXIT, 3, 50.0
        if tid == "cal3" and attempt == 1:
            return Failure.OOM, None, 2100.0
        if tid.startswith("isr"):
            return Failure.NONE, 0, float(ISR_PEAKS[int(tid[3:])])
        if tid.startswith("cal"):
            return Failure.NONE, 0, float(CAL_PEAKS[int(tid[3:])])
        return Failure.NONE, 0, 2800.0
    return outcome


def known_run(tmp_path, *, stop_after=None, nodes=2):
    """(checkpoint path, graph, open checkpoint or None): the known run, whole or stopped
    after ``stop_after`` finishes (then the checkpoint is left open, as in a live run)."""
    graph = known_graph()
    path = tmp_path / "run.h5"
    logs = tmp_path / "logs"
    logs.mkdir(exist_ok=True)
    ck = open_checkpoint(path, graph)
    engine = Engine(graph, [Node(f"n{i}", 4096, 2) for i in range(nodes)])
    ck.attach(engine)
    engine.listeners.append(ck)
    label_of = [graph.labels[x] for x in graph.label]
    drive(engine, known_outcome(graph), lambda t: RUNTIME[label_of[t]], log_dir=logs, ids=graph.ids,
          stop_after=stop_after)
    if stop_after is not None:
        ck.flush()
        return path, graph, ck
    ck.close()
    return path, graph, None
