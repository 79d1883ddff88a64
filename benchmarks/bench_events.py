"""Rank 0's CPU per engine event: a real Engine (default policy) with a real HDF5
checkpoint listener, fed the event stream of null tasks as agents would send it.

The engine and checkpoint are set up as ``pilot run`` sets them up (pilot/master.py
``_make_engine``): a new checkpoint in a temporary folder, ``attach``, then appended as
a listener. Each launch comes back as a TaskStarted and then, in launch order, a
TaskFinished (exit 0) that frees its slot, so the nodes stay full, like null tasks that
end as soon as they start. Two workloads: independent tasks and a DRP-shaped DAG
(benchmarks/drp_workflow.py). Two modes: one ``handle`` per event, and (when the engine
has it) ``handle_many`` over batches of the events waiting at once, as the master reads
them. Figures are CPU time of this process (all threads, so the checkpoint's writer
thread counts) per task and per event, less the CPU of the emulated agents (measured by
replaying the same run against the recorded launches); checkpoint close (final snapshot)
is excluded. Each case runs ``--repeat`` times and the least CPU is shown (the machine is
shared).

    .venv/bin/python benchmarks/bench_events.py
    .venv/bin/python benchmarks/bench_events.py --tasks 5000 --drp-tasks 2000 --profile
    .venv/bin/python benchmarks/bench_events.py --queue-ahead 0      # without queue-ahead
    .venv/bin/python benchmarks/bench_events.py --no-starts    # one event per task, as in a run

``--no-starts``: the emulated agents send no TaskStarted, as agents do for an attempt that
ends within ``STARTED_DELAY_S`` (pilot/agent.py): a null task is then one TaskFinished, the
engine's path for the short tasks of a dispatch benchmark.
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import pstats
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from drp_workflow import drp_graph  # noqa: E402

from pilot.checkpoint import open_checkpoint  # noqa: E402
from pilot.engine import Engine  # noqa: E402
from pilot.events import Failure, Node, Schedule, State, TaskFinished, TaskStarted  # noqa: E402
from pilot.graph import make_graph  # noqa: E402


def null_graph(n: int):
    """``n`` independent null tasks of 1 core, 1000 MB."""
    return make_graph([f"null{i}" for i in range(n)], ["null"] * n, [[]] * n,
                      memory_mb=1000, command="true")


QUEUE_AHEAD_S = [0.0]   # the engine's queue-ahead horizon (--queue-ahead)
SEND_STARTS = [True]    # the emulated agents report starts (not with --no-starts)


def make_engine(graph, nodes, folder: str):
    """Engine + checkpoint listener, wired as the master wires them."""
    ckpt = open_checkpoint(Path(folder) / "bench.h5", graph)
    engine = Engine(graph, nodes, queue_ahead_s=QUEUE_AHEAD_S[0])
    ckpt.attach(engine)
    engine.listeners.append(ckpt)
    return engine, ckpt


class Agents:
    """Emulated agents: each launch reports started at once, then finished in launch order; a
    launch queued behind another (queue-ahead) starts as that one finishes."""

    def __init__(self):
        self.waiting: collections.deque = collections.deque()   # messages ready for rank 0
        self.running: collections.deque = collections.deque()   # launches not finished yet
        self.behind: dict = {}                                  # task -> launch queued behind it
        self.clock = 0.0

    def launched(self, launches) -> None:
        for a in launches:
            if a.after >= 0:
                self.behind[a.after] = a
                continue
            self.clock += 1e-3
            self.start(a)

    def start(self, a) -> None:
        if SEND_STARTS[0]:
            self.waiting.append(TaskStarted(a.task, a.attempt, a.node, self.clock))
        self.running.append((a, self.clock))

    def finish(self, a, start: float) -> None:
        self.waiting.append(TaskFinished(a.task, a.attempt, a.node, Failure.NONE, 0, None, start, self.clock))
        nxt = self.behind.pop(a.task, None)
        if nxt is not None:
            self.start(nxt)

    def next_batch(self, size: int) -> list:
        """Up to ``size`` waiting messages; when none wait, the oldest attempt finishes."""
        if not self.waiting and self.running:
            a, start = self.running.popleft()
            self.clock += 1e-3
            self.finish(a, start)
            while self.running and len(self.waiting) < size:   # others ending at the same time
                a, start = self.running.popleft()
                self.finish(a, start)
        return [self.waiting.popleft() for _ in range(min(size, len(self.waiting)))]


def drive(engine, batch: int) -> int:
    """Run to the end; ``batch`` 0 means one ``handle`` per event. Returns events handled."""
    agents, events = Agents(), 0
    agents.launched(engine.handle(Schedule(0.0)))
    while True:
        got = agents.next_batch(max(batch, 1))
        if not got:
            return events
        events += len(got)
        if batch:
            agents.launched(engine.handle_many(got))
        else:
            agents.launched(engine.handle(got[0]))


class Recorder:
    """Wraps an engine and keeps what each call returned."""

    def __init__(self, engine):
        self.engine, self.returned = engine, []

    def handle(self, event):
        return self._keep(self.engine.handle(event))

    def handle_many(self, events):
        return self._keep(self.engine.handle_many(events))

    def _keep(self, launches):
        self.returned.append(launches)
        return launches


class Replay:
    """Returns the recorded launches again: drives the emulated agents alone."""

    def __init__(self, returned):
        self.returned = iter(returned)

    def handle(self, event):
        return next(self.returned)

    handle_many = handle


def cpu_of(run) -> float:
    c0 = time.process_time()
    run()
    return time.process_time() - c0


def measure(graph, nodes, batch: int, profile: bool) -> tuple[float, int]:
    """(CPU seconds spent by the engine and checkpoint, events) for one run."""
    with tempfile.TemporaryDirectory() as folder:
        engine, ckpt = make_engine(graph, nodes, folder)
        rec, events = Recorder(engine), [0]
        prof = cProfile.Profile() if profile else None

        def run():
            if prof:
                prof.enable()
            events[0] = drive(rec, batch)
            ckpt.flush()
            if prof:
                prof.disable()

        total = cpu_of(run)
        ckpt.close()
        done = int((engine.state == State.DONE).sum())
        assert done == graph.size, f"{done} of {graph.size} tasks done"
    if prof:
        pstats.Stats(prof).sort_stats("tottime").print_stats(14)
    agents = cpu_of(lambda: drive(Replay(rec.returned), batch))
    return total - agents, events[0]


def report(name: str, graph, nodes, batch: int, repeat: int, profile: bool) -> None:
    runs = [measure(graph, nodes, batch, profile) for _ in range(repeat)]
    cpu, events = min(runs)
    mode = f"handle_many<={batch}" if batch else "handle"
    print(f"{name:12} {graph.size:7d} tasks {events:7d} events  {mode:15} "
          f"{1e6 * cpu / graph.size:7.1f} us CPU/task {1e6 * cpu / events:7.1f} us CPU/event",
          flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=20_000, help="independent null tasks")
    parser.add_argument("--drp-tasks", type=int, default=10_000, help="about this many DRP tasks")
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--node-memory", type=int, default=8000, metavar="MB")
    parser.add_argument("--batch", type=int, default=8,
                        help="most events per handle_many call (when the engine has it)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each case; the least CPU is shown")
    parser.add_argument("--profile", action="store_true", help="print the top functions by own time")
    parser.add_argument("--queue-ahead", type=float, default=0.5, metavar="SECONDS",
                        help="the engine's queue-ahead horizon, as `pilot run --queue-ahead` (default 0.5; 0: off)")
    parser.add_argument("--no-starts", action="store_true",
                        help="no TaskStarted: one event per task, as agents report tasks shorter than 50 ms")
    args = parser.parse_args(argv)
    QUEUE_AHEAD_S[0] = args.queue_ahead
    SEND_STARTS[0] = not args.no_starts
    nodes = [Node(f"n{i}", args.node_memory, args.cores) for i in range(args.nodes)]
    print(f"{args.nodes} nodes x ({args.node_memory} MB, {args.cores} cores), queue-ahead {args.queue_ahead} s"
          + ("" if SEND_STARTS[0] else ", no TaskStarted"))
    drp, _ = drp_graph(args.drp_tasks)
    modes = [0] + ([args.batch] if hasattr(Engine, "handle_many") else [])
    for batch in modes:
        report("independent", null_graph(args.tasks), nodes, batch, args.repeat, args.profile)
        report("drp", drp, nodes, batch, args.repeat, args.profile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
