"""The batch script of a pilot job: a pure function of a :class:`~pilot.slurm.Site` and
:class:`~pilot.slurm.JobOptions`.

What the script does, in order: asks Slurm for the nodes and for a drain signal ahead of the time
limit (``--signal=B:USR1@M``), traps USR1 and TERM and passes USR1 on to pilot rank 0 (or to the
MPI launcher), runs the site's set-up lines, records its start in ``chain.jsonl``, launches ``pilot run`` with a
``--walltime`` that ends ``drain_margin`` seconds before the job's end, and when the pilot exits 3
(work left), or ends in a crash (any other code: a rank or its node died) after more tasks were
done than at its start, submits its successor with ``--dependency=afterany:<itself>`` until the
chain has run ``max_jobs`` jobs. It records its end (exit code, signals seen, successor) in ``chain.jsonl``.
"""

from __future__ import annotations

import shlex

from pilot.slurm import JobOptions, Site, format_walltime, launch_line

SCRIPT_NAME = "job.sh"
CHAIN_NAME = "chain.jsonl"
CANCELLED_NAME = "cancelled"
CHECKPOINT_NAME = "checkpoint.h5"   # a run directory's checkpoint unless `pilot submit --checkpoint`

# Every rank runs under this bash program (``bash -c RANK_WRAPPER name command...``). For rank 0 it
# writes "node pid" to $PILOT_RANK0_PID and the exit code to $PILOT_RANK0_RC. It ignores USR1 and TERM
# itself: srun (through slurmstepd) and MPICH's mpiexec signal every process of a rank, so the pilot
# gets them directly and the wrapper only has to outlive it.
RANK_WRAPPER = r"""
trap : USR1 TERM
"$@" & pid=$!
rank=${PMI_RANK:-${SLURM_PROCID:-0}}
[ "$rank" != 0 ] || echo "${SLURMD_NODENAME:-$(hostname)} $pid" >"$PILOT_RANK0_PID"
while :; do wait "$pid"; rc=$?; kill -0 "$pid" 2>/dev/null || break; done
[ "$rank" != 0 ] || echo "$rc" >"$PILOT_RANK0_RC"
exit "$rc"
"""

_HEADER = """\
#!/bin/bash
# pilot batch job, written by `pilot submit` for site {site}.
# Runs {workflow} on {nodes} node(s); a job that ends with work left (exit 3) submits the next one,
# up to {max_jobs} job(s) in a chain. Progress: pilot status {checkpoint}
# Submit it by hand (as the first job of a chain) with:  sbatch {script}
"""

_BODY = r"""
RUN_DIR={run_dir}
WORKFLOW={workflow}
CHECKPOINT={checkpoint}
MAX_JOBS={max_jobs}  # jobs in a chain at most
DRAIN_MARGIN={drain_margin}  # seconds before the time limit by which the pilot drains
JOB_INDEX=${{1:-1}}  # this job's place in its chain (the successor gets it as its argument)
CHAIN="$RUN_DIR/{chain}"

# Every rank runs under this wrapper, which keeps rank 0's node and pid (for drain below) and its
# exit code: when the job is signalled, srun reports its own status (143), not the pilot's.
rank_wrapper='{rank_wrapper}'
THIS_NODE=${{SLURMD_NODENAME:-$(hostname)}}
mkdir -p "$RUN_DIR/jobs"
export PILOT_RANK0_PID="$RUN_DIR/jobs/$SLURM_JOB_ID.rank0.pid"
export PILOT_RANK0_RC="$RUN_DIR/jobs/$SLURM_JOB_ID.rank0.rc"
rm -f "$PILOT_RANK0_PID" "$PILOT_RANK0_RC"

# Slurm's warning signal (USR1), `pilot cancel` (USR1) and scancel or the hard time limit (TERM)
# reach this shell; the pilot drains and exits 3.
launcher=
signals=
term_at=
drain() {{
    signals="$signals${{signals:+,}}$1"
    [ "$1" != TERM ] || term_at=$(date +%s)
    echo "pilot job: $1 received, draining" >&2
    local node pid
    # Rank 0 alone, when it runs beside this shell (it does: the batch script runs on the first
    # node): srun would signal every process of the step, tasks included, before the pilot can
    # stop them as interrupted. Else the launcher passes the signal on.
    if [ -s "$PILOT_RANK0_PID" ] && read -r node pid <"$PILOT_RANK0_PID" && [ "$node" = "$THIS_NODE" ]; then
        kill -USR1 "$pid" 2>/dev/null
    elif [ -n "$launcher" ]; then
        kill -USR1 "$launcher" 2>/dev/null
    fi
}}
trap 'drain USR1' USR1
trap 'drain TERM' TERM

record() {{
    printf '{{"event": "%s", "job": "%s", "index": %d, "time": %s%s}}\n' \
        "$1" "$SLURM_JOB_ID" "$JOB_INDEX" "$(date +%s)" "${{2:-}}" >>"$CHAIN"
}}

done_count() {{   # tasks done per the checkpoint; nothing if it cannot be read (yet)
    {pilot} status "$CHECKPOINT" 2>/dev/null | awk '$1 == "total" {{print $5}}'
}}

end_epoch() {{
    local end
    end=$(squeue -h -j "$SLURM_JOB_ID" -o %e 2>/dev/null)
    case "$end" in 20*) date -d "$end" +%s ;; esac
}}

# ---- site set-up ----
{setup}
# ---- run ----
# A job Slurm requeued (its node failed) starts again from the top: its record says so.
record start ", \"nodes\": \"$SLURM_JOB_NODELIST\", \"restart\": ${{SLURM_RESTART_COUNT:-0}}"
DONE_AT_START=$(done_count)
END=$(end_epoch)
walltime=()
if [ -n "$END" ]; then
    left=$((END - $(date +%s) - DRAIN_MARGIN))
    walltime=(--walltime $((left > 1 ? left : 1)))
fi
rc=3
if [ -z "$signals" ]; then
    {launch} bash -c "$rank_wrapper" pilot-rank \
        {pilot} run "$WORKFLOW" --checkpoint "$CHECKPOINT" --node-cores {cores}{run_args} "${{walltime[@]}}" &
    launcher=$!
    while :; do wait "$launcher"; rc=$?; kill -0 "$launcher" 2>/dev/null || break; done
    [ ! -s "$PILOT_RANK0_RC" ] || rc=$(cat "$PILOT_RANK0_RC")
fi

# ---- chain: a successor when work is left, unless cancelled ----
stopped() {{
    grep -qx "$SLURM_JOB_ID" "$RUN_DIR/{cancelled}" 2>/dev/null && return 0
    # TERM before the time limit is scancel: the user stopped the chain.
    [ -n "$term_at" ] && {{ [ -z "$END" ] || [ "$term_at" -lt "$END" ]; }}
}}
# Any other end than the pilot's own (0 all done, 1 tasks failed, 2 bad input, 3 work left) is a
# crash: a rank, or its node, died. The checkpoint keeps what was done; if this job got further
# than the last one, the chain goes on (a run that crashes before doing anything does not loop).
crashed_with_progress() {{
    case "$rc" in 0|1|2|3) return 1 ;; esac
    local done_now
    done_now=$(done_count)
    [ -n "$done_now" ] && [ "$done_now" -gt "${{DONE_AT_START:-0}}" ]
}}
next=
if {{ [ "$rc" = 3 ] || crashed_with_progress; }} && [ "$JOB_INDEX" -lt "$MAX_JOBS" ] && ! stopped; then
    next=$(sbatch --parsable --dependency="afterany:$SLURM_JOB_ID" "$RUN_DIR/{script}" $((JOB_INDEX + 1)))
    next=${{next%%;*}}
    echo "pilot job: work left; submitted job $next" >&2
fi
record end ", \"exit\": $rc, \"signals\": \"$signals\", \"next\": \"$next\""
exit "$rc"
"""


def sbatch_directives(site: Site, options: JobOptions) -> list[str]:
    """The ``#SBATCH`` lines, in the order a reader expects them."""
    lines = [
        f"--job-name={options.job_name}",
        f"--nodes={options.nodes}",
        f"--time={format_walltime(options.walltime_s)}",
        f"--mem={site.memory_per_node_mb}",
        f"--signal=B:USR1@{signal_margin(options.drain_margin)}",
        "--requeue",   # a node failure puts the job back in the queue, to resume from the checkpoint
        f"--chdir={options.run_dir}",
        f"--output={options.run_dir}/slurm-%j.out",
    ]
    if site.exclusive:
        lines.append("--exclusive")
    for key in ("account", "qos", "partition", "constraint"):
        value = getattr(site, key)
        if value:
            lines.append(f"--{key}={value}")
    lines.extend(site.sbatch_options)
    return [f"#SBATCH {shlex.quote(line) if ' ' in line else line}" for line in lines]


def signal_margin(drain_margin: int) -> int:
    """Seconds before the limit for Slurm's USR1. Slurm may send it up to a minute early, so it is
    set at half the drain margin: the pilot normally drains by its own ``--walltime`` first."""
    return max(1, drain_margin // 2)


def render_script(site: Site, options: JobOptions) -> str:
    """The complete batch script text for ``site`` and ``options``."""
    launch = launch_line(site, options.nodes)
    q = shlex.quote
    header = _HEADER.format(site=site.name, workflow=options.workflow, nodes=options.nodes,
                            max_jobs=options.max_jobs, checkpoint=q(options.checkpoint),
                            script=q(f"{options.run_dir}/{SCRIPT_NAME}"))
    body = _BODY.format(
        run_dir=q(options.run_dir), workflow=q(options.workflow), checkpoint=q(options.checkpoint),
        max_jobs=options.max_jobs, drain_margin=options.drain_margin, chain=CHAIN_NAME,
        cancelled=CANCELLED_NAME, script=SCRIPT_NAME, rank_wrapper=RANK_WRAPPER,
        setup="\n".join(site.setup) if site.setup else "# (none)", launch=launch,
        pilot=site.pilot_command, cores=site.cores_per_node,
        run_args="".join(" " + q(a) for a in options.run_args))
    return header + "\n".join(sbatch_directives(site, options)) + "\n" + body
