"""Scheduling benchmark: the packing policies on DRP-shaped workflows, in simulated time.

For each size it builds the workflow of benchmarks/drp_workflow.py (seeded lognormal
runtimes per label), simulates it with the real engine under each policy on identical
KNL-like nodes, and prints the makespan, the lower bound
max(critical path, memory-seconds / total memory, core-seconds / total cores), their ratio,
the scheduling decisions per second (launches / wall time spent inside Engine.handle), the
wall and CPU time of each simulation, and how much shorter the default policy's makespan is
than each baseline's.

    .venv/bin/python benchmarks/bench_schedule.py --sizes 10000 100000
    .venv/bin/python benchmarks/bench_schedule.py --sizes 1000000 --policies default
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from drp_workflow import drp_graph  # noqa: E402

from pilot.events import Node  # noqa: E402
from pilot.policy import POLICIES, make_policy  # noqa: E402
from pilot.simulate import simulate  # noqa: E402


def run_size(size: int, nodes, policies) -> dict:
    """Simulate one workflow size under each policy; returns {policy: SimResult}."""
    t0 = time.perf_counter()
    graph, runtimes = drp_graph(size)
    print(f"\n{graph.size} tasks, {graph.parent_idx.size} edges (built in {time.perf_counter() - t0:.1f} s)")
    print(f"  {'policy':8} {'makespan s':>11} {'bound s':>10} {'ratio':>6} {'mem use':>8} "
          f"{'decisions/s':>12} {'wall s':>7} {'CPU s':>6}")
    results = {}
    for name in policies:
        t0, c0 = time.perf_counter(), time.process_time()
        result = simulate(graph, nodes, make_policy(name), runtimes)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        results[name] = result
        print(f"  {name:8} {result.makespan_s:11.0f} {result.lower_bound_s:10.0f} {result.ratio:6.3f} "
              f"{100 * result.memory_utilisation:7.1f}% {result.decisions_per_s:12.0f} {wall:7.1f} "
              f"{cpu:6.1f}", flush=True)
    return results


def compare(results: dict) -> None:
    """How much shorter the default policy's makespan is than each other policy's."""
    if "default" not in results:
        return
    ours = results["default"].makespan_s
    for name, other in results.items():
        if name != "default":
            print(f"  default vs {name}: {100 * (1 - ours / other.makespan_s):+.1f}% makespan "
                  f"({ours:.0f} s vs {other.makespan_s:.0f} s)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--nodes", type=int, default=64)
    parser.add_argument("--node-memory", type=int, default=96 * 1024, metavar="MB")
    parser.add_argument("--node-cores", type=int, default=68)
    parser.add_argument("--policies", nargs="+", choices=sorted(POLICIES),
                        default=["default", "fifo", "slots"])
    args = parser.parse_args(argv)
    nodes = [Node(f"knl{i}", args.node_memory, args.node_cores) for i in range(args.nodes)]
    print(f"{args.nodes} nodes x ({args.node_memory} MB, {args.node_cores} cores)")
    for size in args.sizes:
        compare(run_size(size, nodes, args.policies))
    print("\nload average at the end: %.1f %.1f %.1f" % os.getloadavg())
    return 0


if __name__ == "__main__":
    sys.exit(main())
