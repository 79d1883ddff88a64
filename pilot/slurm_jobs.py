"""Talking to Slurm for a run directory: submit a chain, read its record, cancel it.

A run directory holds the batch script (``job.sh``), Slurm's output of each job
(``slurm-<id>.out``), the checkpoint (``checkpoint.h5`` unless told otherwise) and ``chain.jsonl``,
one JSON object a line: ``submit`` (by ``pilot submit``), ``start`` and ``end`` (by the batch
script: exit code, signals it saw, the successor it submitted) and ``cancel`` (by ``pilot cancel``).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from pilot.errors import UserError
from pilot.slurm import JobOptions, Site
from pilot.slurm_script import CANCELLED_NAME, CHAIN_NAME, CHECKPOINT_NAME, SCRIPT_NAME, render_script

ACTIVE_STATES = frozenset({"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED",
                           "RESIZING", "SIGNALING", "STAGE_OUT"})


def read_chain(run_dir) -> list[dict]:
    """The records of ``chain.jsonl`` in order (a torn last line is skipped)."""
    path = Path(run_dir) / CHAIN_NAME
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def append_record(run_dir, event: str, job: str, **fields) -> None:
    """Add one record to ``chain.jsonl``."""
    record = {"event": event, "job": str(job), "time": int(time.time()), **fields}
    with open(Path(run_dir) / CHAIN_NAME, "a", encoding="utf-8") as out:
        out.write(json.dumps(record) + "\n")


def chain_jobs(records: list[dict]) -> list[str]:
    """Every job id named in the chain record (submitted, started or submitted as a successor)."""
    jobs: list[str] = []
    for rec in records:
        for job in (rec.get("job"), rec.get("next")):
            if job and job not in jobs:
                jobs.append(str(job))
    return jobs


def _slurm(args: list[str], what: str) -> str:
    if shutil.which(args[0]) is None:
        raise UserError(f"{args[0]} not found: Slurm's commands must be on PATH to {what}")
    proc = subprocess.run(args, capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        message = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        raise UserError(f"{' '.join(args[:2])} failed: {message}")
    return proc.stdout


def job_states(jobs: list[str]) -> dict[str, str]:
    """Slurm state of each job that squeue still knows (finished jobs drop out after MinJobAge)."""
    if not jobs:
        return {}
    out = _slurm(["squeue", "-h", "--states=all", "-o", "%i %T"], "read job states")
    states = dict(line.split(None, 1) for line in out.splitlines() if line.strip())
    return {job: states[job].strip() for job in jobs if job in states}


def active_jobs(run_dir) -> dict[str, str]:
    """Jobs of the run directory's chain that are queued or running, with their state."""
    states = job_states(chain_jobs(read_chain(run_dir)))
    return {job: state for job, state in states.items() if state in ACTIVE_STATES}


@dataclass(frozen=True)
class Submission:
    job: str
    script: Path


def submit(site: Site, options: JobOptions) -> Submission:
    """Write the batch script into the run directory and submit it as job 1 of a new chain."""
    options.check()
    run_dir = Path(options.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    busy = active_jobs(run_dir)
    if busy:
        job, state = next(iter(busy.items()))
        raise UserError(f"{run_dir}: job {job} of this run is {state.lower()}; wait for it or "
                        f"`pilot cancel {run_dir}` first")
    script = run_dir / SCRIPT_NAME
    script.write_text(render_script(site, options))
    script.chmod(0o755)
    out = _slurm(["sbatch", "--parsable", str(script), "1"], "submit")
    job = out.strip().split(";")[0]
    append_record(run_dir, "submit", job, index=1, workflow=options.workflow, site=site.name,
                  nodes=options.nodes, walltime=options.walltime_s, max_jobs=options.max_jobs)
    return Submission(job, script)


def cancel(run_dir, timeout: float = 120.0, poll: float = 0.5, log=sys.stderr) -> list[str]:
    """Drain the chain's running job (USR1 through its batch shell), wait up to ``timeout``
    seconds for it to end, then let Slurm kill whatever is left. Returns the jobs it acted on."""
    run_dir = Path(run_dir)
    if not (run_dir / CHAIN_NAME).exists():
        raise UserError(f"{run_dir}: not a pilot run directory (no {CHAIN_NAME})")
    touched: list[str] = []
    deadline = time.monotonic() + timeout
    while True:
        busy = active_jobs(run_dir)
        fresh = [job for job in busy if job not in touched]
        for job in fresh:
            _stop(run_dir, job, busy[job], log)
        touched += fresh
        if not busy or time.monotonic() > deadline:
            break
        time.sleep(poll)
    for job in busy:
        print(f"pilot cancel: job {job} did not end within {timeout:g}s: scancel", file=log)
        _slurm(["scancel", job], "cancel")
    return touched


def _stop(run_dir: Path, job: str, state: str, log) -> None:
    with open(run_dir / CANCELLED_NAME, "a", encoding="utf-8") as out:
        out.write(job + "\n")
    append_record(run_dir, "cancel", job, state=state)
    if state == "RUNNING":
        print(f"pilot cancel: draining job {job}", file=log)
        _slurm(["scancel", "--batch", "--signal=USR1", job], "cancel")
    elif state != "COMPLETING":
        print(f"pilot cancel: job {job} is {state.lower()}: scancel", file=log)
        _slurm(["scancel", job], "cancel")


def default_run_dir(workflow: str) -> str:
    """``runs/<workflow name>`` under the current directory."""
    return os.path.join("runs", Path(workflow).stem)


# ---- the chain at a glance (`pilot status RUN_DIR`) ----------------------------------


def chain_rows(run_dir) -> list[dict]:
    """One row per job of the chain, in chain order: its index, how many times it started (a
    job Slurm requeued starts again), its last end (exit code, signals, successor) and its state
    in Slurm's queue when Slurm still knows it (else ``-``; it is not asked when unreachable)."""
    records = read_chain(run_dir)
    jobs = chain_jobs(records)
    try:
        states = job_states(jobs)
    except UserError:   # no Slurm here, or its controller is down: the record alone
        states = {}
    rows = {job: {"job": job, "index": 0, "starts": 0, "exit": "", "signals": "", "next": "",
                  "state": states.get(job, "-")} for job in jobs}
    for rec in records:
        row = rows.get(str(rec.get("job")))
        if row is None:
            continue
        row["index"] = rec.get("index", row["index"])
        if rec["event"] == "start":
            row["starts"] += 1
            row["exit"] = row["signals"] = row["next"] = ""   # this run of the job has not ended
        elif rec["event"] == "end":
            row.update(exit=str(rec.get("exit", "")), signals=rec.get("signals", ""), next=rec.get("next", ""))
    return list(rows.values())


def format_chain(rows: list[dict]) -> str:
    """The chain's rows as a table (``job index starts state exit signals next``)."""
    from pilot.status import aligned

    header = ("job", "index", "starts", "state", "exit", "signals", "next")
    return aligned([header] + [tuple(str(r[k]) or "-" for k in header) for r in rows], left=len(header))


def run_checkpoint(run_dir) -> str:
    """The checkpoint a run directory's batch script uses (its ``CHECKPOINT=`` line), else
    ``RUN_DIR/checkpoint.h5``."""
    script = Path(run_dir) / SCRIPT_NAME
    if script.exists():
        for line in script.read_text().splitlines():
            if line.startswith("CHECKPOINT="):
                return shlex.split(line.split("=", 1)[1], comments=True)[0]
    return str(Path(run_dir) / CHECKPOINT_NAME)
