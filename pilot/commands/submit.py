"""``pilot submit``: write the batch script for a workflow into a run directory and sbatch it."""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from pilot.errors import EXIT_OK, UserError

NAME = "submit"
HELP = "submit a workflow as a Slurm batch job (with optional chained resubmission until done)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("workflow", metavar="FILE", help="workflow file (YAML or JSON)")
    parser.add_argument("--site", required=True, metavar="SITE",
                        help="site file (YAML), or the name of one in slurm/sites (cori-knl, csd3-cclake, ...)")
    parser.add_argument("--nodes", type=int, required=True, metavar="N", help="nodes per job")
    parser.add_argument("--walltime", required=True, metavar="HH:MM:SS", help="time limit of each job")
    parser.add_argument("--resubmit", type=int, default=1, metavar="K",
                        help="run up to K jobs in a chain: a job that ends with work left submits the next "
                             "(default 1: no resubmission)")
    parser.add_argument("--run-dir", metavar="DIR",
                        help="where the script, chain record, Slurm output and checkpoint go "
                             "(default runs/<workflow name>)")
    parser.add_argument("--checkpoint", metavar="CKPT", help="checkpoint file (default RUN-DIR/checkpoint.h5)")
    parser.add_argument("--drain-margin", type=int, metavar="S",
                        help="the pilot drains S seconds before the time limit (default: the site's, else 300)")
    parser.add_argument("--job-name", metavar="NAME", help="Slurm job name (default pilot-<workflow name>)")
    parser.add_argument("--run-args", default="", metavar="'ARGS'",
                        help="more `pilot run` options, as one string after '=' "
                             "(e.g. --run-args='--max-failures 10')")
    parser.add_argument("--dry-run", action="store_true", help="write the script and print it; do not submit")


def run(args) -> int:
    from pilot.slurm import JobOptions, parse_walltime, resolve_site
    from pilot.slurm_jobs import default_run_dir, submit
    from pilot.slurm_script import CHECKPOINT_NAME, render_script

    site = resolve_site(args.site)
    workflow = os.path.abspath(args.workflow)
    run_dir = os.path.abspath(args.run_dir or default_run_dir(workflow))
    options = JobOptions(
        workflow=workflow, run_dir=run_dir,
        checkpoint=os.path.abspath(args.checkpoint or os.path.join(run_dir, CHECKPOINT_NAME)),
        nodes=args.nodes, walltime_s=parse_walltime(args.walltime), max_jobs=args.resubmit,
        drain_margin=site.drain_margin if args.drain_margin is None else args.drain_margin,
        job_name=args.job_name or f"pilot-{os.path.splitext(os.path.basename(workflow))[0]}",
        run_args=tuple(shlex.split(args.run_args)))
    options.check()
    _check_workflow(workflow, site, args.nodes)
    if args.dry_run:
        sys.stdout.write(render_script(site, options))
        return EXIT_OK
    done = submit(site, options)
    print(f"pilot submit: job {done.job}, script {done.script}, run dir {run_dir}", file=sys.stderr)
    print(done.job)
    return EXIT_OK


def _check_workflow(path: str, site, nodes: int) -> None:
    """Refuse, before queueing, a workflow that does not load or has a task that fits no node."""
    from pilot.events import Node
    from pilot.graph import check_fits
    from pilot.nodes import memory_reserve_mb
    from pilot.workflow import load_workflow_file

    graph = load_workflow_file(path)
    memory = site.memory_per_node_mb - memory_reserve_mb(site.memory_per_node_mb)
    try:
        check_fits(graph, [Node(f"{site.name} node", memory, site.cores_per_node)] * nodes)
    except UserError as err:
        raise UserError(f"{path}: {err}") from None
