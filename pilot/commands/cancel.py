"""``pilot cancel``: stop a run directory's Slurm chain, draining the running job first."""

from __future__ import annotations

import argparse
import sys

from pilot.errors import EXIT_OK

NAME = "cancel"
HELP = "cancel the Slurm jobs of a run directory: drain the running job (USR1), then scancel what is left"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN-DIR", help="run directory given to (or made by) pilot submit")
    parser.add_argument("--timeout", type=float, default=120.0, metavar="S",
                        help="seconds to wait for the drained job to end before scancel kills it (default 120)")


def run(args) -> int:
    from pilot.slurm_jobs import cancel

    jobs = cancel(args.run_dir, timeout=args.timeout)
    if jobs:
        print(f"pilot cancel: stopped job(s) {', '.join(jobs)}", file=sys.stderr)
    else:
        print(f"pilot cancel: no queued or running job in {args.run_dir}", file=sys.stderr)
    return EXIT_OK
