"""Checkpoint figures: sustained events/s with durability on, restart time on 1M tasks with
900k done, and bytes per task.

    .venv/bin/python benchmarks/bench_checkpoint.py            # 1M tasks (~1 min, ~1.5 GB RAM)
    .venv/bin/python benchmarks/bench_checkpoint.py --tasks 100000 --seconds 2

Prints figures and ratios; the goal for restart is under 5 s.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pilot.checkpoint import load_checkpoint, open_checkpoint  # noqa: E402
from pilot.engine import Engine  # noqa: E402
from pilot.events import Failure, Node, Schedule, State, TaskFinished, TaskStarted  # noqa: E402
from pilot.graph import graph_from_arrays, graph_hash  # noqa: E402

L, U, D, R = State.LAUNCHED, State.RUNNING, State.DONE, State.READY


def big_graph(n: int):
    """``n`` tasks in chains of 10 (isr -> calibrate -> ...), QuantumGraph-like UUID ids."""
    ids = [f"{i:08x}-1f2e-4d3c-8b7a-{i * 2654435761 % 16**12:012x}" for i in range(n)]
    has_parent = np.arange(n) % 10 != 0
    parent_ptr = np.zeros(n + 1, np.int64)
    np.cumsum(has_parent, out=parent_ptr[1:])
    parent_idx = (np.flatnonzero(has_parent) - 1).astype(np.int32)
    labels = ["isr", "characterizeImage", "calibrate", "makeWarp", "assembleCoadd"]
    label = (np.arange(n) // 2 % len(labels)).astype(np.int32)
    return graph_from_arrays(ids, labels, label, parent_ptr, parent_idx, memory_mb=2048,
                             command="pipetask run-qbb repo g.qg --qgraph-node-id {id}")


def sustained(folder: str, n: int, seconds: float) -> dict:
    """Feed start/finish pairs (3 transitions each) to record() as fast as possible."""
    graph = big_graph(n)
    ck = open_checkpoint(os.path.join(folder, "rate.h5"), graph)
    events, t, start = 0, 0, time.perf_counter()
    while time.perf_counter() - start < seconds and t + 1 < n:
        ck.record(TaskStarted(t, 1, 0, 1.0), [(t, L, U)])
        ck.record(TaskFinished(t, 1, 0, Failure.NONE, 0, None, 1.0, 2.0, log=f"/logs/{t}.1.log"),
                  [(t, U, D), (t + 1, State.PENDING, R), (t + 2, R, L)])
        ck.tick(time.time())
        events, t = events + 2, t + 1
    fed = time.perf_counter() - start
    ck.flush()
    durable = time.perf_counter() - start
    ck.close()
    return {"events": events, "events_per_s": events / durable, "feed_s": fed, "durable_s": durable}


class _NoListener:
    def record(self, event, transitions) -> None:
        pass


def engine_overhead(folder: str, n: int, repeat: int = 3) -> dict:
    """Best-of-``repeat`` seconds of a full engine run of ``n`` tasks: bare, with a listener
    that does nothing (the engine's own cost of reporting), and with the checkpoint."""
    best = {"bare": float("inf"), "no-op listener": float("inf"), "checkpoint": float("inf")}
    for k in range(repeat):
        for name in best:
            graph = big_graph(n)
            engine = Engine(graph, [Node(f"n{j}", 64 * 2048, 64) for j in range(4)])
            ck = None
            if name == "checkpoint":
                ck = open_checkpoint(os.path.join(folder, f"engine{k}.h5"), graph)
                ck.attach(engine)
            engine.listeners.extend([ck] if ck else [_NoListener()] if name != "bare" else [])
            start = time.perf_counter()
            events = _drive(engine, ck)
            if ck is not None:
                ck.close()
            best[name] = min(best[name], time.perf_counter() - start)
    return {"events": events, **best}


def _drive(engine, ck) -> int:
    pending, events = list(engine.handle(Schedule(0.0))), 1
    while pending:
        a = pending.pop()
        engine.handle(TaskStarted(a.task, a.attempt, a.node, 1.0))
        pending += engine.handle(TaskFinished(a.task, a.attempt, a.node, Failure.NONE, 0, None, 1.0, 2.0))
        events += 2
        if ck is not None and events % 64 == 0:
            ck.tick(time.time())
    return events


def restart(folder: str, n: int, done: int) -> dict:
    """Make a checkpoint of ``n`` tasks with ``done`` done, then time a restart of it."""
    graph = big_graph(n)
    path = os.path.join(folder, "big.h5")
    t0 = time.perf_counter()
    ck = open_checkpoint(path, graph)
    created = time.perf_counter() - t0
    for lo in range(0, done, 100_000):
        tasks = range(lo, min(done, lo + 100_000))
        ck.record(TaskStarted(lo, 1, 0, 1.0), [(t, R, D) for t in tasks])
    t0 = time.perf_counter()
    ck.close()
    compacted = time.perf_counter() - t0
    size = os.path.getsize(path)
    t0 = time.perf_counter()
    graph_hash(graph)
    hashing = time.perf_counter() - t0
    t0 = time.perf_counter()
    ck = open_checkpoint(path, graph)
    opened = time.perf_counter() - t0
    n_done = int((ck.restored[0] == D).sum())
    ck.close()
    t0 = time.perf_counter()
    load_checkpoint(path)
    status_read = time.perf_counter() - t0
    return {"create_s": created, "close_s": compacted, "restart_s": opened, "hash_s": hashing,
            "status_read_s": status_read, "done": n_done, "bytes": size}


def restart_after_kill(folder: str, n: int, done: int) -> float:
    """Restart when the completions are still in the journal (the run was killed)."""
    graph = big_graph(n)
    path = os.path.join(folder, "killed.h5")
    ck = open_checkpoint(path, graph)
    for lo in range(0, done, 100_000):
        ck.record(TaskStarted(lo, 1, 0, 1.0), [(t, R, D) for t in range(lo, min(done, lo + 100_000))])
    ck.flush()
    ck._stopping = True      # as if killed: no compaction, the lock file freed by the kernel
    ck._journal.close()
    ck.lock.release()
    t0 = time.perf_counter()
    ck = open_checkpoint(path, graph)
    elapsed = time.perf_counter() - t0
    assert int((ck.restored[0] == D).sum()) == done
    ck.close()
    return elapsed


def alternatives(folder: str, seconds: float) -> dict:
    """Per-event costs of the designs not chosen: fsync per event, HDF5 updated in place."""
    import h5py

    from pilot.journal import ROW, JournalWriter, encode_block

    row = np.zeros(1, ROW)
    journal = JournalWriter(os.path.join(folder, "alt.journal"))
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        journal.write(encode_block(row, [""]))
        journal.sync()
        count += 1
    out = {"fsync_per_event": count / (time.perf_counter() - start)}
    journal.close()
    with h5py.File(os.path.join(folder, "alt.h5"), "w") as f:
        state = f.create_dataset("state", data=np.zeros(100_000, np.int8))
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            state[count % 100_000] = 4
            f.flush()
            count += 1
        out["hdf5_flush_per_event"] = count / (time.perf_counter() - start)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=1_000_000)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--dir", default=None, help="folder for the files (default: a temp folder)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        rate = sustained(folder, 200_000, args.seconds)
        print(f"sustained: {rate['events']} events in {rate['durable_s']:.2f} s incl. final fsync "
              f"-> {rate['events_per_s']:,.0f} events/s durable (window 0.25 s)")
        alt = alternatives(folder, min(args.seconds, 2.0))
        print(f"not chosen: journal fsync per event {alt['fsync_per_event']:,.0f} events/s; HDF5 in place, "
              f"flush per event (no fsync) {alt['hdf5_flush_per_event']:,.0f} events/s; "
              f"group commit is {rate['events_per_s'] / alt['fsync_per_event']:.0f}x the first")
        over = engine_overhead(folder, 20_000)
        ev, bare, noop, with_ck = over["events"], over["bare"], over["no-op listener"], over["checkpoint"]
        print(f"engine run of 20k tasks (best of 3): {ev / bare:,.0f} events/s bare, {ev / noop:,.0f} with a "
              f"no-op listener, {ev / with_ck:,.0f} with the checkpoint incl. its final compaction "
              f"(checkpoint / no-op time {with_ck / noop:.2f})")
        done = args.tasks * 9 // 10
        r = restart(folder, args.tasks, done)
        print(f"{args.tasks:,} tasks, {r['done']:,} done: restart (open_checkpoint) {r['restart_s']:.2f} s "
              f"(of which graph_hash {r['hash_s']:.2f} s), status read {r['status_read_s']:.2f} s; "
              f"goal < 5 s: {'met' if r['restart_s'] < 5 else 'NOT met'}")
        print(f"new checkpoint {r['create_s']:.2f} s, final compaction {r['close_s']:.2f} s, "
              f"size {r['bytes'] / 1e6:.1f} MB = {r['bytes'] / args.tasks:.0f} bytes/task")
        killed = restart_after_kill(folder, args.tasks, done)
        print(f"restart after a kill ({done:,} completions still in the journal): {killed:.2f} s")


if __name__ == "__main__":
    main()
