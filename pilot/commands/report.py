"""``pilot report CKPT --out DIR``: a page of figures and tables about a run, from its checkpoint."""

from __future__ import annotations

NAME = "report"
HELP = ("write DIR/index.html with figures (Gantt, memory and cores per node, runtimes, peak RSS, "
        "failures), a right-sizing table and the planner's summary (works while the run is live)")


def add_arguments(parser) -> None:
    parser.add_argument("checkpoint", metavar="CKPT", help="checkpoint file (HDF5)")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for index.html and the PNGs")
    parser.add_argument("--nodes", type=int, metavar="N",
                        help="number of nodes of the run (default: the nodes that ran a task)")
    parser.add_argument("--node-memory", type=int, metavar="MB",
                        help="memory of each node for tasks (default: estimated from use)")
    parser.add_argument("--node-cores", type=int, metavar="C",
                        help="cores of each node for tasks (default: estimated from use)")
    parser.add_argument("--lines", type=int, default=10, metavar="N",
                        help="log lines shown per failed task (default 10)")


def run(args) -> int:
    from pilot.errors import UserError
    from pilot.report import build_report

    for name in ("nodes", "node_memory", "node_cores"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    result = build_report(args.checkpoint, args.out, nodes=args.nodes, node_memory=args.node_memory,
                          node_cores=args.node_cores, tail_lines=max(args.lines, 0))
    state = "in progress" if result["in_progress"] else "finished"
    print(f"{result['index']}: {len(result['figures'])} figures; run {state}, "
          f"makespan {result['makespan_s']:.1f} s, {result['done']}/{result['tasks']} tasks done, "
          f"makespan / lower bound {result['ratio']:.2f}")
    return 0
