"""``pilot status CKPT``: per-label task counts from a checkpoint, live or after the run.
``pilot status RUN_DIR`` (a ``pilot submit`` run directory) first shows its chain of jobs."""

from __future__ import annotations

import json
import os

NAME = "status"
HELP = "show task counts per label from a checkpoint (works while the run is live)"


def add_arguments(parser) -> None:
    parser.add_argument("checkpoint", metavar="CKPT", help="checkpoint file (HDF5), or a run directory of "
                        "`pilot submit` (its chain of jobs, then its checkpoint)")
    parser.add_argument("--json", action="store_true",
                        help="print JSON: {label: {pending, ..., total}}, the total row under '__total__'")
    parser.add_argument("--failed", action="store_true",
                        help="list failed tasks with failure class, exit code or signal, and their log's last "
                             "lines (with --json: under '__failed__')")
    parser.add_argument("--lines", type=int, default=10, metavar="N",
                        help="log lines shown per failed task (default 10)")


def run(args) -> int:
    from pilot.checkpoint import load_checkpoint
    from pilot.status import failed_tasks, format_failed, format_table, label_counts

    path = args.checkpoint
    if os.path.isdir(path):   # a run directory of `pilot submit`: its chain first
        from pilot.slurm_jobs import chain_rows, format_chain, run_checkpoint
        from pilot.slurm_script import CHAIN_NAME

        if os.path.exists(os.path.join(path, CHAIN_NAME)):
            if not args.json:
                print(format_chain(chain_rows(path)) + "\n")
            path = run_checkpoint(path)
    view = load_checkpoint(path)
    snap = view.snapshot
    counts = label_counts(snap.labels, snap.label, view.table.state)
    failed = failed_tasks(view, args.lines) if args.failed else None
    if args.json:
        out = dict(counts)
        if failed is not None:
            out["__failed__"] = failed
        print(json.dumps(out, indent=1))
        return 0
    print(format_table(counts))
    if failed is not None:
        print()
        print(format_failed(failed))
    return 0
