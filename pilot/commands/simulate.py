"""``pilot simulate FILE``: predict a run of the workflow on N identical nodes."""

from __future__ import annotations

import argparse
import json

import yaml

from pilot.errors import EXIT_OK, UserError
from pilot.graph import check_fits
from pilot.policy import POLICIES, make_policy
from pilot.simulate import simulate, task_runtimes

NAME = "simulate"
HELP = "simulate a run of a workflow (real engine and policy, simulated time) and print its figures"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("workflow", metavar="FILE", help="workflow file (YAML or JSON)")
    parser.add_argument("--nodes", type=int, required=True, metavar="N", help="number of nodes")
    parser.add_argument("--node-memory", type=int, required=True, metavar="MB", help="memory per node (MB)")
    parser.add_argument("--node-cores", type=int, required=True, metavar="C", help="cores per node")
    parser.add_argument("--runtimes", metavar="RUNTIMES.yaml",
                        help="{task id or label: seconds}; tasks named by neither take 1 s")
    parser.add_argument("--policy", choices=sorted(POLICIES), default="default",
                        help="packing policy (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args) -> int:
    from pilot.events import Node
    from pilot.workflow import load_workflow_file

    if min(args.nodes, args.node_memory, args.node_cores) < 1:
        raise UserError("--nodes, --node-memory and --node-cores must be at least 1")
    graph = load_workflow_file(args.workflow)
    nodes = [Node(f"node{i}", args.node_memory, args.node_cores) for i in range(args.nodes)]
    try:
        check_fits(graph, nodes)
    except UserError as err:
        raise UserError(f"{args.workflow}: {err}") from None
    runtimes = None
    if args.runtimes:
        try:
            runtimes = task_runtimes(graph, read_runtimes(args.runtimes))
        except UserError as err:
            message = str(err)
            raise UserError(message if message.startswith(args.runtimes) else f"{args.runtimes}: {message}") from None
    result = simulate(graph, nodes, make_policy(args.policy), runtimes)
    figures = result.summary()
    print(json.dumps(figures) if args.json else report(figures, result))
    return EXIT_OK


def read_runtimes(path: str) -> dict:
    """The ``{task id or label: seconds}`` mapping of a runtimes file (YAML or JSON)."""
    try:
        with open(path, "rb") as stream:
            data = yaml.load(stream, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except OSError as err:
        raise UserError(f"{path}: cannot read: {err.strerror}") from None
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        line = f" line {where.line + 1}" if where is not None else ""
        raise UserError(f"{path}:{line} not valid YAML") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of task id or label to seconds")
    try:
        return task_keys(data)
    except UserError as err:
        raise UserError(f"{path}: {err}") from None


def task_keys(data: dict) -> dict:
    """Keys as strings (YAML may read an id like 12 as an int)."""
    out = {}
    for key, value in data.items():
        if not isinstance(key, (str, int)) or isinstance(key, bool):
            raise UserError(f"key {key!r} is not a task id or label")
        out[str(key)] = value
    return out


def report(figures: dict, result) -> str:
    """Human-readable lines of the figures."""
    lines = [
        f"makespan        {figures['makespan_s']:.1f} s",
        f"lower bound     {figures['lower_bound_s']:.1f} s  (ratio {figures['ratio']:.3f})",
        f"node-hours      {figures['node_hours']:.2f}",
        f"memory in use   {100 * figures['memory_utilisation']:.1f} % (mean)",
        f"cores in use    {100 * figures['core_utilisation']:.1f} % (mean)",
        f"launches        {result.launches} ({result.decisions_per_s:.0f} decisions/s)",
        f"exit code       {result.exit_code}",
    ]
    return "\n".join(lines)

