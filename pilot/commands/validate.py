"""``pilot validate FILE``: check a workflow file and print a one-line summary."""

from __future__ import annotations

import argparse

from pilot.errors import EXIT_OK, UserError
from pilot.events import Node
from pilot.graph import Graph, check_fits, priorities
from pilot.workflow import load_workflow_file

NAME = "validate"
HELP = "check a workflow file (and, with --nodes, that every task fits on a node)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("workflow", metavar="FILE", help="workflow file (YAML or JSON)")
    parser.add_argument("--nodes", type=int, default=None, metavar="N",
                        help="number of nodes to check the requests against")
    parser.add_argument("--node-memory", type=int, default=None, metavar="MB",
                        help="memory of each node in MB (needs --nodes)")
    parser.add_argument("--node-cores", type=int, default=None, metavar="C",
                        help="cores of each node (needs --nodes)")


def run(args) -> int:
    nodes = nodes_from_args(args)
    graph = load_workflow_file(args.workflow)
    if nodes:
        try:
            check_fits(graph, nodes)
        except UserError as err:
            raise UserError(f"{args.workflow}: {err}") from None
    print(summary(args.workflow, graph))
    return EXIT_OK


def nodes_from_args(args) -> list[Node]:
    """Identical nodes from ``--nodes/--node-memory/--node-cores`` (none when not given)."""
    given = [args.nodes, args.node_memory, args.node_cores]
    if all(v is None for v in given):
        return []
    if any(v is None for v in given):
        raise UserError("--nodes, --node-memory and --node-cores go together: give all three")
    if min(given) < 1:
        raise UserError("--nodes, --node-memory and --node-cores must be at least 1")
    return [Node(f"node{i}", args.node_memory, args.node_cores) for i in range(args.nodes)]


def summary(name: str, graph: Graph) -> str:
    """``FILE: ok: T tasks, E edges, L labels, critical path P tasks``."""
    critical = int(priorities(graph).max()) if graph.size else 0
    return (f"{name}: ok: {graph.size} tasks, {graph.parent_idx.size} edges, "
            f"{len(graph.labels)} labels, critical path {critical} tasks")
