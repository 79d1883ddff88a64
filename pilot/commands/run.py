"""``pilot run``: execute a workflow across the MPI ranks (rank 0 master, other ranks agents)."""

from __future__ import annotations

import logging
import os
import sys

from pilot.errors import UserError

NAME = "run"
HELP = "run a workflow under mpiexec/srun (rank 0 schedules, other ranks run tasks); resumes from CKPT"


def add_arguments(parser) -> None:
    parser.add_argument("file", help="workflow file (YAML) or saved QuantumGraph (.qg, .qgraph)")
    parser.add_argument("--butler", metavar="REPO", help="Butler repository of a QuantumGraph")
    parser.add_argument("--bps-config", metavar="BPS_YAML", help="requests of a QuantumGraph's labels (BPS YAML)")
    parser.add_argument("--lsst-mode", choices=("warm", "subprocess"), default="warm",
                        help="how quanta run: forked from a warm server (default) or one pipetask each")
    parser.add_argument("--checkpoint", required=True, metavar="CKPT", help="checkpoint file (HDF5)")
    parser.add_argument("--node-memory", type=int, metavar="MB", help="memory of each node for tasks")
    parser.add_argument("--node-cores", type=int, metavar="C", help="cores of each node for tasks")
    parser.add_argument("--node-per-rank", action="store_true",
                        help="every agent rank is a node of its own (emulate several nodes on one host)")
    parser.add_argument("--walltime", type=float, metavar="SECONDS",
                        help="drain and exit 3 before this many seconds (default: the Slurm job's end)")
    parser.add_argument("--max-failures", type=int, metavar="N", help="stop launching after N failed tasks")
    parser.add_argument("--log-dir", metavar="DIR", help="task logs (default: CKPT.logs beside the checkpoint)")
    parser.add_argument("--retry-failed", action="store_true", help="run failed tasks of CKPT again")
    parser.add_argument("--progress-interval", type=float, default=30.0, metavar="SECONDS",
                        help="seconds between progress lines in the log (default 30)")
    parser.add_argument("--memory-tolerance", type=float, default=1.10, metavar="X",
                        help="kill a task above X times its memory request (default 1.10)")
    parser.add_argument("--memory-interval", type=float, default=0.5, metavar="SECONDS",
                        help="seconds between memory samples of running tasks (default 0.5)")
    parser.add_argument("--queue-ahead", type=float, default=0.5, metavar="SECONDS",
                        help="send a node its next task while a task expected to end within SECONDS "
                             "runs there, to start the moment that task ends in its cores and memory "
                             "(default 0.5; 0: never)")
    parser.add_argument("--agent-timeout", type=float, default=120.0, metavar="SECONDS",
                        help="take an agent rank for hung when nothing has come from it for SECONDS "
                             "(agents say they are alive every quarter of it): the run drains and "
                             "exits 3 without it (default 120)")


def run(args) -> int:
    from pilot.agent import Signals
    from pilot.agent_loop import run_agent
    from pilot.master import RunConfig, master_main
    from pilot.nodes import local_node, run_deadline
    from pilot.runner import WatchConfig
    from pilot.transport import MPITransport, guarded

    transport = MPITransport()
    try:
        _check(args)
    except UserError:
        if transport.rank == 0:
            raise
        return 0   # every rank sees the same problem: rank 0 alone reports it, and exits 2
    _configure_logging(transport.rank)
    signals = Signals().install()
    info = local_node(args.node_memory, args.node_cores, per_rank=args.node_per_rank, rank=transport.rank)
    watch = WatchConfig(tolerance=args.memory_tolerance, sample_interval=args.memory_interval)
    if transport.rank != 0:
        return guarded(transport, run_agent, transport, info, watch, signals, args.agent_timeout / 4)
    config = RunConfig(
        workflow=args.file, checkpoint=args.checkpoint,
        logdir=args.log_dir or f"{args.checkpoint}.logs", max_failures=args.max_failures,
        retry_failed=args.retry_failed, deadline=run_deadline(args.walltime),
        progress_interval=args.progress_interval, watch=watch,
        butler=args.butler, bps_config=args.bps_config, lsst_mode=args.lsst_mode,
        queue_ahead_s=args.queue_ahead, agent_timeout=args.agent_timeout)
    return guarded(transport, master_main, transport, config, info, signals, expected=(UserError,))


def _check(args) -> None:
    for name in ("node_memory", "node_cores", "walltime", "max_failures", "agent_timeout"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {value}")
    if args.queue_ahead < 0:
        raise UserError(f"--queue-ahead must be 0 or more, got {args.queue_ahead}")
    if args.memory_tolerance < 1.0:
        raise UserError(f"--memory-tolerance must be at least 1.0, got {args.memory_tolerance}")
    if not os.path.exists(args.file):
        raise UserError(f"{args.file}: no such workflow file")
    from pilot.lsst.qgraph import is_quantum_graph

    if args.butler and not is_quantum_graph(args.file):
        raise UserError(f"--butler applies to QuantumGraphs (.qg, .qgraph), not to {args.file}")
    if args.bps_config and not is_quantum_graph(args.file):
        raise UserError(f"--bps-config applies to QuantumGraphs (.qg, .qgraph); put requests in {args.file}")


def _configure_logging(rank: int) -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s rank {rank} %(levelname)s %(message)s")
