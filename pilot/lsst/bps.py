"""ctrl_bps plugin: ``bps submit`` runs the generic workflow as one local pilot run.

Select it with ``wmsServiceClass: pilot.lsst.bps.PilotService`` in the BPS YAML. ``prepare``
turns the GenericWorkflow into a pilot workflow file (``pilot_workflow.json`` in the submit
directory, the format of docs/workflow.md) with every placeholder resolved; ``submit`` starts a
detached driver (``python -m pilot.lsst.bps drive SUBMIT_DIR``) that runs ``mpiexec -n N pilot run
pilot_workflow.json --checkpoint SUBMIT_DIR/pilot.h5 ...`` and then the final job, whatever
happened. The run id is the submit directory; ``bps report``, ``bps cancel`` and ``bps restart``
take it. Configuration keys (all optional): ``pilotRanks`` (3), ``pilotMpiexec`` (the ``mpiexec``
beside this Python, with ``-launcher fork``), ``pilotRunOptions`` (``--node-per-rank``).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

from lsst.ctrl.bps import (BaseWmsService, BaseWmsWorkflow, GenericWorkflowJob,
                           WmsRunReport, WmsStates)

WORKFLOW_FILE = "pilot_workflow.json"
SPEC_FILE = "pilot_submit.json"
STATE_FILE = "pilot_state.json"
CHECKPOINT = "pilot.h5"
FINAL_LABEL = "finalJob"
REPORTED = ("operator", "project", "campaign", "payloadName")
MIDDLEWARE_TOOLS = ("pipetask", "butler")

_PLACEHOLDER = re.compile(r"<(FILE|ENV):([^>]+)>|\{(\w+)\}")

# pilot status counts -> ctrl_bps job states
STATE_OF_COUNT = {"pending": WmsStates.UNREADY, "launched": WmsStates.PENDING,
                  "running": WmsStates.RUNNING, "exec_done": WmsStates.SUCCEEDED,
                  "failed": WmsStates.FAILED, "dep_fail": WmsStates.PRUNED}


# --- pure core: GenericWorkflow -> pilot workflow -------------------------------------------

def resolve(text: str, cmdvals: dict, files: dict, environ: dict) -> str:
    """``text`` with ``{key}``, ``<FILE:name>`` and ``<ENV:VAR>`` replaced until none is left."""
    def one(match: re.Match) -> str:
        kind, name, key = match.groups()
        if kind == "FILE":
            return files.get(name, match.group(0))
        if kind == "ENV":
            return environ.get(name, "")
        return str(cmdvals[key]) if key in cmdvals else match.group(0)

    for _ in range(10):   # values may hold placeholders themselves
        new = _PLACEHOLDER.sub(one, text)
        if new == text:
            break
        text = new
    return text


def job_argv(job: GenericWorkflowJob, files: dict, environ: dict, python: str) -> list[str]:
    """The job's command as an argv list; middleware tools go through :mod:`pilot.lsst.tool`."""
    line = f"{job.executable.src_uri} {job.arguments or ''}"
    argv = shlex.split(resolve(line, job.cmdvals or {}, files, environ))
    if argv and os.path.basename(argv[0]) in MIDDLEWARE_TOOLS:
        return [python, "-m", "pilot.lsst.tool", os.path.basename(argv[0]), *argv[1:]]
    return argv


def job_requests(job: GenericWorkflowJob) -> dict:
    """The job's ctrl_bps requests under the pilot workflow keys (unset ones left out)."""
    keys = {"requestMemory": job.request_memory, "requestCpus": job.request_cpus,
            "numberOfRetries": job.number_of_retries, "memoryMultiplier": job.memory_multiplier,
            "requestMemoryMax": job.request_memory_max, "retryUnlessExit": job.retry_unless_exit}
    found = {k: v for k, v in keys.items() if v is not None}
    if found.get("requestMemoryMax", 0) and found["requestMemoryMax"] < found.get("requestMemory", 0):
        del found["requestMemoryMax"]
    return found


def job_parents(gw, name: str) -> list[str]:
    """Nearest real-job ancestors of ``name`` (no-op jobs are looked through)."""
    parents, todo, seen = [], list(gw.predecessors(name)), set()
    while todo:
        parent = todo.pop()
        if parent in seen:
            continue
        seen.add(parent)
        if isinstance(gw.get_job(parent), GenericWorkflowJob):
            parents.append(parent)
        else:
            todo.extend(gw.predecessors(parent))
    return sorted(parents)


def file_paths(gw) -> dict:
    """``{file name: path}`` of the workflow's files (a local run reads them in place)."""
    return {f.name: f.src_uri for f in gw.get_files(data=True, transfer_only=False)}


def pilot_task(gw, name: str, files: dict, environ: dict, python: str) -> dict:
    """One pilot workflow task for the GenericWorkflow job ``name``."""
    job = gw.get_job(name)
    task = {"id": name.replace("/", "_"), "label": job.label,
            "command": job_argv(job, files, environ, python), **job_requests(job)}
    parents = job_parents(gw, name)
    if parents:
        task["after"] = [p.replace("/", "_") for p in parents]
    if job.environment:
        task["env"] = {k: resolve(str(v), job.cmdvals or {}, files, environ)
                       for k, v in job.environment.items()}
    return task


def pilot_workflow(gw, environ: dict, python: str) -> tuple[dict, list[str] | None]:
    """``(pilot workflow, final job argv or None)`` for a GenericWorkflow."""
    files = file_paths(gw)
    names = [n for n in gw if isinstance(gw.get_job(n), GenericWorkflowJob)]
    tasks = [pilot_task(gw, n, files, environ, python) for n in names]
    final = gw.get_final()
    if final is not None and not isinstance(final, GenericWorkflowJob):
        raise RuntimeError("pilot runs a final job, not a final workflow")
    final_argv = job_argv(final, files, environ, python) if final is not None else None
    return {"tasks": tasks}, final_argv


def run_argv(config, submit_dir: Path, python: str) -> list[str]:
    """``mpiexec -n N python -m pilot.cli run WORKFLOW --checkpoint CKPT ...`` from the config."""
    _, ranks = config.search("pilotRanks", opt={"default": 3})
    default_mpiexec = f"{Path(python).parent / 'mpiexec'} -launcher fork"
    _, mpiexec = config.search("pilotMpiexec", opt={"default": default_mpiexec})
    _, options = config.search("pilotRunOptions", opt={"default": "--node-per-rank"})
    return [*shlex.split(mpiexec), "-n", str(ranks), python, "-m", "pilot.cli", "run",
            str(submit_dir / WORKFLOW_FILE), "--checkpoint", str(submit_dir / CHECKPOINT),
            *shlex.split(options)]


# --- the WMS workflow and service -------------------------------------------------------------

class PilotWorkflow(BaseWmsWorkflow):
    """A GenericWorkflow as a pilot workflow file plus the commands that run it."""

    def __init__(self, name, config):
        super().__init__(name, config)
        self.tasks: dict = {}
        self.final: list[str] | None = None
        self.run_argv: list[str] = []

    @classmethod
    def from_generic_workflow(cls, config, generic_workflow, out_prefix, service_class):
        """Convert ``generic_workflow``; nothing is written until :meth:`write`."""
        wf = cls(generic_workflow.name, config)
        wf.service_class = service_class
        wf.submit_path = out_prefix
        wf.tasks, wf.final = pilot_workflow(generic_workflow, dict(os.environ), sys.executable)
        wf.run_argv = run_argv(config, Path(out_prefix), sys.executable)
        return wf

    def write(self, out_prefix):
        """Write the pilot workflow file and the driver's spec into ``out_prefix``."""
        out = Path(out_prefix)
        out.mkdir(parents=True, exist_ok=True)
        (out / WORKFLOW_FILE).write_text(json.dumps(self.tasks, indent=1))
        spec = {"name": self.name, "run": self.run_argv, "final": self.final,
                **{key: self.config.search(key, opt={"default": ""})[1] for key in REPORTED},
                "final_log": str(out / f"{CHECKPOINT}.logs" / "final.log")}
        (out / SPEC_FILE).write_text(json.dumps(spec, indent=1))


class PilotService(BaseWmsService):
    """ctrl_bps WMS service running workflows with ``mpiexec ... pilot run`` on this host."""

    def prepare(self, config, generic_workflow, out_prefix=None):
        """Convert and write the workflow into the submit directory ``out_prefix``."""
        wf = PilotWorkflow.from_generic_workflow(config, generic_workflow, out_prefix,
                                                 f"{self.__class__.__module__}.{self.__class__.__name__}")
        wf.write(out_prefix)
        return wf

    def submit(self, workflow, **kwargs):
        """Start the detached driver; the run id is the submit directory."""
        start_driver(Path(workflow.submit_path))
        workflow.run_id = str(Path(workflow.submit_path).resolve())
        return workflow

    def restart(self, wms_workflow_id):
        """Run the same ``pilot run`` again: finished tasks are kept by the checkpoint."""
        submit_dir = Path(wms_workflow_id).resolve()
        if not (submit_dir / SPEC_FILE).exists():
            return None, None, f"{submit_dir} is not a pilot submit directory"
        if driver_alive(read_state(submit_dir)):
            return None, None, f"run {submit_dir} is still running"
        start_driver(submit_dir, "--retry-failed")
        name = json.loads((submit_dir / SPEC_FILE).read_text())["name"]
        return str(submit_dir), name, ""

    def list_submitted_jobs(self, wms_id=None, user=None, require_bps=True, pass_thru=None,
                            is_global=False):
        """The run id given, if it is a pilot submit directory (runs are not tracked elsewhere)."""
        return [str(Path(wms_id).resolve())] if wms_id and is_submit_dir(wms_id) else []

    def report(self, wms_workflow_id=None, user=None, hist=0, pass_thru=None, is_global=False,
               return_exit_codes=False):
        """One run report from the checkpoint (``pilot status --json``) and the driver's state."""
        if not wms_workflow_id or not is_submit_dir(wms_workflow_id):
            return [], "pilot reports only a given run id (its submit directory)"
        return [run_report(Path(wms_workflow_id).resolve())], ""

    def get_status(self, wms_workflow_id, hist=1, is_global=False):
        """The run's overall state."""
        if not is_submit_dir(wms_workflow_id):
            return WmsStates.UNKNOWN, f"{wms_workflow_id} is not a pilot submit directory"
        return run_report(Path(wms_workflow_id).resolve()).state, ""

    def cancel(self, wms_id, pass_thru=None):
        """SIGTERM to the driver: pilot drains, then the final job registers what was made."""
        submit_dir = Path(wms_id).resolve()
        state = read_state(submit_dir)
        if not driver_alive(state):
            return False, f"run {submit_dir} is not running"
        os.kill(state["pid"], signal.SIGTERM)
        return True, ""

    def run_submission_checks(self):
        """Nothing to check: the run is local."""

    def ping(self, pass_thru):
        """Always reachable: the run is local."""
        return 0, ""


# --- I/O shells: the driver, its state, the report ------------------------------------------

def is_submit_dir(path) -> bool:
    return (Path(path) / SPEC_FILE).is_file()


def read_state(submit_dir: Path) -> dict:
    try:
        return json.loads((submit_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return {}


def write_state(submit_dir: Path, state: dict) -> None:
    tmp = submit_dir / f"{STATE_FILE}.tmp"
    tmp.write_text(json.dumps(state))
    os.replace(tmp, submit_dir / STATE_FILE)


def driver_alive(state: dict) -> bool:
    if state.get("state") != "running":
        return False
    try:
        with open(f"/proc/{state['pid']}/cmdline", "rb") as f:
            return b"pilot.lsst.bps" in f.read()
    except OSError:
        return False


def start_driver(submit_dir: Path, *run_options: str) -> int:
    """Start ``python -m pilot.lsst.bps drive SUBMIT_DIR [RUN_OPTIONS]`` in its own session; its pid."""
    write_state(submit_dir, {"state": "starting"})
    with open(submit_dir / "pilot_driver.log", "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "pilot.lsst.bps", "drive", str(submit_dir), *run_options],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=submit_dir)
    return proc.pid


def drive(submit_dir: Path, run_options: list[str]) -> int:
    """Run the pilot run, then the final job whatever happened; record both exit codes."""
    spec = json.loads((submit_dir / SPEC_FILE).read_text())
    write_state(submit_dir, {"state": "running", "pid": os.getpid()})
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    run = subprocess.Popen([*spec["run"], *run_options], cwd=submit_dir, env=env)
    cancelled = []

    def forward(signum, frame):
        cancelled.append(signum)
        run.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    run_rc = run.wait()
    final_rc = run_final(spec, env) if spec["final"] else 0
    write_state(submit_dir, {"state": "done", "run_rc": run_rc, "final_rc": final_rc,
                             "cancelled": bool(cancelled)})
    return run_rc or final_rc


def run_final(spec: dict, env: dict) -> int:
    """The final job, its output appended to ``final_log``; its exit code."""
    Path(spec["final_log"]).parent.mkdir(parents=True, exist_ok=True)
    with open(spec["final_log"], "ab") as log:
        return subprocess.run(spec["final"], stdout=log, stderr=subprocess.STDOUT, env=env).returncode


def label_counts(submit_dir: Path) -> dict:
    """``pilot status --json`` of the run's checkpoint, ``{}`` before it exists."""
    ckpt = submit_dir / CHECKPOINT
    if not ckpt.exists():
        return {}
    proc = subprocess.run([sys.executable, "-m", "pilot.cli", "status", str(ckpt), "--json"],
                          capture_output=True, text=True)
    return json.loads(proc.stdout) if proc.returncode == 0 else {}


def job_summary(counts: dict, state: dict) -> dict:
    """``{label: {WmsStates: n}}`` from the status counts, the final job from the driver state."""
    summary = {}
    for label, row in counts.items():
        if label.startswith("__"):
            continue
        summary[label] = dict.fromkeys(WmsStates, 0)
        for key, wms_state in STATE_OF_COUNT.items():
            summary[label][wms_state] += row.get(key, 0)
    summary[FINAL_LABEL] = dict.fromkeys(WmsStates, 0)
    summary[FINAL_LABEL][final_state(state)] = 1
    return summary


def final_state(state: dict) -> WmsStates:
    """The final job's state: it runs once the pilot run has ended."""
    if state.get("state") != "done":
        return WmsStates.UNREADY
    return WmsStates.SUCCEEDED if state["final_rc"] == 0 else WmsStates.FAILED


def run_state(state: dict) -> WmsStates:
    """The run's state from the driver's record."""
    if driver_alive(state) or state.get("state") == "starting":
        return WmsStates.RUNNING
    if state.get("state") != "done":
        return WmsStates.UNKNOWN
    if state["cancelled"]:
        return WmsStates.DELETED
    return WmsStates.SUCCEEDED if state["run_rc"] == 0 and state["final_rc"] == 0 else WmsStates.FAILED


def run_report(submit_dir: Path) -> WmsRunReport:
    """The ctrl_bps report of one run."""
    state = read_state(submit_dir)
    summary = job_summary(label_counts(submit_dir), state)
    totals = dict.fromkeys(WmsStates, 0)
    for row in summary.values():
        for s, n in row.items():
            totals[s] += n
    spec = json.loads((submit_dir / SPEC_FILE).read_text())
    return WmsRunReport(wms_id=str(submit_dir), path=str(submit_dir), label=spec["name"],
                        run=spec["name"], state=run_state(state), operator=spec.get("operator"),
                        project=spec.get("project"), campaign=spec.get("campaign"),
                        payload=spec.get("payloadName"),
                        run_summary=";".join(f"{label}:{sum(row.values())}" for label, row in summary.items()),
                        total_number_jobs=sum(totals.values()), job_state_counts=totals,
                        job_summary=summary, jobs=[], exit_code_summary={})


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 2 or argv[0] != "drive":
        print("usage: python -m pilot.lsst.bps drive SUBMIT_DIR [PILOT_RUN_OPTIONS...]", file=sys.stderr)
        return 2
    return drive(Path(argv[1]).resolve(), argv[2:])


if __name__ == "__main__":
    sys.exit(main())
