"""Rank-0 scale: build, validate and prioritise 1M- and 15M-task DRP graphs, then dispatch.

    .venv/bin/python benchmarks/bench_scale.py                                   # 1M tasks, 3 runs
    .venv/bin/python benchmarks/bench_scale.py --tasks 15000000 --repeat 1       # 15M: ~7 GB, ~2 min

Each run is a fresh Python process (so that its peak RSS is the run's alone) that does what
rank 0 does before and during a run, on a graph of benchmarks/drp_workflow.py built directly in
arrays (no workflow file: a 15M-task file would be gigabytes):

1. build the Graph (ids, labels, requests, CSR both ways);
2. validate as ``pilot run`` does: topological levels (cycle check) and fit on the nodes;
3. priorities (longest remaining path, unweighted, as ``pilot validate``);
4. the graph hash the checkpoint keys on;
5. the Engine with the default policy (its runtime-weighted priorities, the ready queue);
6. dispatch: the simulator (real Engine and policy, no processes) on ~10,000 cores
   (132 nodes x 76 cores, 256 GB) until ``--sim-seconds`` of simulated time, then a drain.
   Scheduling decisions per second = launches / wall time inside ``Engine.handle`` (finish
   events included), and launches / CPU time of the whole simulation (steadier on a loaded
   machine), against the ~170/s that 10,000 cores of 60 s quanta need.

Peak RSS (``ru_maxrss``) is read after each step. Medians over ``--repeat`` runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
NEEDED_PER_S = 10_000 / 60.0   # launches/s that keep 10,000 cores busy with 60 s quanta
STEPS = ("build", "validate", "priorities", "hash", "engine", "dispatch")

_MEASURE = r"""
import json, resource, sys, time
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/benchmarks"]
tasks, sim_seconds, nodes_n, node_mb, node_cores = (float(x) for x in sys.argv[2:7])
out, began = {}, time.perf_counter()

def step(name, t0):
    now = time.perf_counter(), time.process_time()
    out[name + "_s"], out[name + "_cpu_s"] = now[0] - t0[0], now[1] - t0[1]
    out[name + "_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return time.perf_counter(), time.process_time()

from drp_workflow import drp_graph
from pilot.events import Node
from pilot.graph import check_fits, graph_hash, priorities, topological_levels
from pilot.simulate import simulate
nodes = [Node(f"n{i}", int(node_mb), int(node_cores)) for i in range(int(nodes_n))]
t = time.perf_counter(), time.process_time()
graph, runtimes = drp_graph(int(tasks), seed=0)
t = step("build", t)
topological_levels(graph)
check_fits(graph, nodes)
t = step("validate", t)
priorities(graph)
t = step("priorities", t)
graph_hash(graph)
t = step("hash", t)
box = [t]
result = simulate(graph, nodes, None, runtimes, drain_at=sim_seconds,
                  setup=lambda engine: box.append(step("engine", box[0])))
step("dispatch", box[-1])
out.update(launches=result.launches, engine_handle_s=result.engine_seconds,
           decisions_per_s=result.decisions_per_s,
           decisions_per_cpu_s=result.launches / out["dispatch_cpu_s"])
out.update(tasks=graph.size, edges=int(graph.parent_idx.size), cpu_s=time.process_time(),
           total_s=time.perf_counter() - began)
print(json.dumps(out))
"""


def measure(tasks: int, args) -> dict:
    """One fresh-process run; its figures."""
    cmd = [sys.executable, "-c", _MEASURE, str(HERE.parent), str(tasks), str(args.sim_seconds),
           str(args.nodes), str(args.node_memory), str(args.node_cores)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE.parent)
    if proc.returncode != 0:
        sys.exit(f"run of {tasks} tasks failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def report(tasks: int, args) -> None:
    """Measure one size ``--repeat`` times and print the medians."""
    runs, loads = [], []
    for _ in range(args.repeat):
        runs.append(measure(tasks, args))
        loads.append(os.getloadavg()[0])
    first = runs[0]
    print(f"\n{first['tasks']:,} tasks, {first['edges']:,} edges; median of {len(runs)} fresh "
          f"processes; load average {min(loads):.1f}-{max(loads):.1f} on {os.cpu_count()} cpus")
    print(f"  {'step':11} {'wall s':>7} {'CPU s':>7} {'peak RSS MB':>12}   (wall per run)")
    for name in STEPS:
        per_run = ", ".join(f"{r[name + '_s']:.1f}" for r in runs)
        print(f"  {name:11} {median(runs, name + '_s'):7.2f} {median(runs, name + '_cpu_s'):7.2f} "
              f"{median(runs, name + '_rss_mb'):12.0f}   ({per_run})")
    ready = [sum(r[s + key] for s in STEPS[:5]) for r in runs for key in ("_s", "_cpu_s")]
    peak = max(r["dispatch_rss_mb"] for r in runs)
    print(f"  to engine ready (build, validate, priorities, hash, engine): "
          f"{statistics.median(ready[0::2]):.1f} s wall, {statistics.median(ready[1::2]):.1f} s CPU; "
          f"peak RSS {peak:.0f} MB ({1e6 * peak / first['tasks']:.0f} bytes/task)")
    dispatch(runs, args)


def dispatch(runs: list[dict], args) -> None:
    """Print the simulated dispatch rate against the rate 10,000 cores of 60 s quanta need."""
    rate, per_cpu = median(runs, "decisions_per_s"), median(runs, "decisions_per_cpu_s")
    rates = ", ".join(f"{r['decisions_per_s']:,.0f}" for r in runs)
    print(f"  dispatch on {args.nodes} nodes x {args.node_cores} cores "
          f"({args.nodes * args.node_cores:,} cores), {args.sim_seconds:.0f} simulated s: "
          f"{median(runs, 'launches'):,.0f} launches")
    print(f"    {rate:,.0f} decisions/s of wall time in Engine.handle (runs: {rates}); "
          f"{per_cpu:,.0f} per CPU second of the whole simulator")
    print(f"    ratio to the {NEEDED_PER_S:.0f}/s that 10,000 cores of 60 s quanta need: "
          f"{rate / NEEDED_PER_S:.0f}x (wall), {per_cpu / NEEDED_PER_S:.0f}x (CPU)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, nargs="+", default=[1_000_000],
                        help="graph sizes (about this many tasks each); 15000000 needs ~7 GB")
    parser.add_argument("--repeat", type=int, default=3, help="fresh-process runs (median)")
    parser.add_argument("--sim-seconds", type=float, default=600.0,
                        help="simulated seconds of dispatch before the drain")
    parser.add_argument("--nodes", type=int, default=132)
    parser.add_argument("--node-memory", type=int, default=256_000, metavar="MB")
    parser.add_argument("--node-cores", type=int, default=76)
    args = parser.parse_args(argv)
    for tasks in args.tasks:
        report(tasks, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
