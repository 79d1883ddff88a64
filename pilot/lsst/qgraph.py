"""A saved QuantumGraph (``.qg`` or ``.qgraph``) as a pilot :class:`~pilot.graph.Graph`.

Task 0 is the init job (``pipetask pre-exec-init-qbb``, label ``pipetaskInit``); every quantum
without a parent quantum depends on it, so it runs once before any quantum. Each quantum is a
task whose id is its UUID, whose label is its task label, and whose command is
``pipetask run-qbb REPO GRAPH --qgraph-node-id UUID`` (run through :mod:`pilot.lsst.tool`,
which applies the zipfile fix on affected Pythons). Requests come from a BPS config.

The final job (``butler aggregate-graph`` or ``transfer-from-graph``) is not a task: the master
runs :func:`finish_run` once the engine is done, whatever the outcome, so outputs made so far
reach the repository also after failures and drains. Both tools skip datasets already
registered, so running it again after a restart is safe.

``graph.extra``: ``"lsst"`` holds the :class:`LsstRun`; ``"lsst_uuid"`` and ``"lsst_data_id"``
hold each task's quantum UUID (None for the init job) and data ID (a dict).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from pilot.errors import EXIT_INTERRUPTED, EXIT_OK, UserError
from pilot.graph import Graph, make_graph
from pilot.lsst.bps_config import INIT_LABEL, BpsConfig, FinalJob, config_or_default, default_config

log = logging.getLogger("pilot.lsst")
GRAPH_SUFFIXES = (".qg", ".qgraph")
MODES = ("warm", "subprocess")
MODE_ENV = "PILOT_LSST_MODE"


@dataclass(frozen=True)
class Quanta:
    """What the pilot needs from a QuantumGraph, in topological order."""

    uuids: list[str]
    labels: list[str]
    data_ids: list[dict]
    parents: list[list[int]]       # indices into the lists above
    output_run: str = ""
    output: str = ""


@dataclass(frozen=True)
class LsstRun:
    """Where the graph and repository are, and how tools are started."""

    repo: str
    graph_file: str
    mode: str = "warm"
    python: str = sys.executable
    final: FinalJob = field(default_factory=FinalJob)
    output_run: str = ""
    quanta: int = 0


def is_quantum_graph(path) -> bool:
    """True when ``path`` names a saved QuantumGraph (by suffix)."""
    return str(path).endswith(GRAPH_SUFFIXES)


# ---- commands -----------------------------------------------------------------------


def tool_command(run: LsstRun, tool: str, *args: str) -> list[str]:
    """argv running ``pipetask``/``butler`` with this run's Python (zipfile fix when needed)."""
    return [run.python, "-m", "pilot.lsst.tool", tool, *args]


def init_command(run: LsstRun) -> list[str]:
    return tool_command(run, "pipetask", "pre-exec-init-qbb", run.repo, run.graph_file)


def quantum_command(run: LsstRun, uuid: str) -> list[str]:
    return tool_command(run, "pipetask", "run-qbb", run.repo, run.graph_file, "--qgraph-node-id", uuid)


def final_command(run: LsstRun, complete: bool) -> list[str]:
    """The final job; ``complete=False`` (work left) makes aggregate-graph ingest only successes."""
    final = run.final
    chain = ["--update-output-chain"] if final.update_output_chain else []
    if final.tool == "transfer":
        return tool_command(run, "butler", "transfer-from-graph", run.graph_file, run.repo,
                            "--register-dataset-types", *chain, *final.extra_options)
    cpus = max(1, min(final.cpus or min(16, run.quanta // 5000), os.cpu_count() or 1))
    done = [] if complete else ["--incomplete"]
    return tool_command(run, "butler", "aggregate-graph", run.graph_file, run.repo, "-j", str(cpus),
                        "--register-dataset-types", *chain, *done, *final.extra_options)


# ---- the graph (pure) ---------------------------------------------------------------


def build_graph(quanta: Quanta, run: LsstRun, config: BpsConfig | None = None) -> Graph:
    """The pilot graph of ``quanta``: the init job (task 0) plus one task per quantum."""
    config = config or default_config()
    labels = [INIT_LABEL, *quanta.labels]
    parents = [[]] + [[p + 1 for p in ps] or [0] for ps in quanta.parents]
    requests = {label: config.requests(label) for label in dict.fromkeys(labels)}
    per_task = [requests[label] for label in labels]
    env = {MODE_ENV: run.mode}
    return make_graph(
        [INIT_LABEL, *quanta.uuids], labels, parents,
        memory_mb=[r.memory_mb for r in per_task], cpus=[r.cpus for r in per_task],
        retries=[r.retries for r in per_task],
        multiplier=[r.memory_multiplier for r in per_task],
        memory_max=[r.memory_max for r in per_task],
        retry_unless_exit=[r.retry_unless_exit for r in per_task],
        command=[init_command(run)] + [quantum_command(run, u) for u in quanta.uuids],
        env=[None] + [env] * len(quanta.uuids),
        extra={"lsst": run, "lsst_uuid": [None, *quanta.uuids], "lsst_data_id": [{}, *quanta.data_ids]},
    )


# ---- reading a graph file (needs the middleware) ------------------------------------


def read_quanta(path) -> Quanta:
    """Read the quanta, their labels, data IDs and dependencies from a ``.qg``/``.qgraph`` file."""
    from pilot.lsst.zipfix import apply_fix

    apply_fix()
    predicted = _read_predicted(str(path))
    xgraph = predicted.quantum_only_xgraph
    order = list(xgraph)    # iteration of a predicted graph is topological
    index = {node: i for i, node in enumerate(order)}
    nodes = xgraph.nodes
    return Quanta(
        uuids=[str(node) for node in order],
        labels=[nodes[node]["task_label"] for node in order],
        data_ids=[dict(nodes[node]["data_id"].required) for node in order],
        parents=[sorted(index[p] for p in xgraph.predecessors(node)) for node in order],
        output_run=str(predicted.header.output_run or ""),
        output=str(predicted.header.output or ""),
    )


def _read_predicted(path: str):
    from lsst.pipe.base.pipeline_graph import TaskImportMode
    from lsst.pipe.base.quantum_graph import PredictedQuantumGraph

    if path.endswith(".qgraph"):
        from lsst.pipe.base import QuantumGraph

        return PredictedQuantumGraph.from_old_quantum_graph(QuantumGraph.loadUri(path))
    with PredictedQuantumGraph.open(path, import_mode=TaskImportMode.DO_NOT_IMPORT) as reader:
        reader.read_thin_graph()
        return reader.finish()


def load_qgraph(path, repo, config: BpsConfig | None = None, mode: str = "warm") -> Graph:
    """Load a saved QuantumGraph for ``pilot run`` (one-line UserError on bad input)."""
    path, repo = Path(path).resolve(), Path(repo).resolve()
    _check_inputs(path, repo, mode)
    try:
        quanta = read_quanta(path)
    except ImportError as err:
        raise UserError(f"{path}: reading a QuantumGraph needs the Rubin middleware "
                        f"(pip install 'pilot[lsst]' on Python >= 3.12): {err}") from None
    except Exception as err:  # the middleware raises many types for a bad file
        raise UserError(f"{path}: not a readable QuantumGraph ({type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''})") from None
    final = final_job_for(path, (config or default_config()).final)
    run = LsstRun(str(repo), str(path), mode, sys.executable, final, quanta.output_run, len(quanta.uuids))
    return build_graph(quanta, run, config)


def load_for_run(path, butler=None, bps_config=None, mode=None) -> Graph:
    """``pilot run GRAPH --butler REPO [--bps-config BPS.yaml] [--lsst-mode MODE]``: the graph."""
    if not butler:
        raise UserError(f"{path}: running a QuantumGraph needs the repository: add --butler REPO")
    return load_qgraph(path, butler, config_or_default(bps_config), mode or "warm")


def final_job_for(path: Path, final: FinalJob) -> FinalJob:
    """``aggregate-graph`` reads only new-format graphs: an old ``.qgraph`` uses transfer-from-graph."""
    if str(path).endswith(".qgraph") and final.tool == "aggregate":
        log.info("%s: old graph format, the final job is butler transfer-from-graph", path)
        return dataclasses.replace(final, tool="transfer", extra_options=())
    return final


def _check_inputs(path: Path, repo: Path, mode: str) -> None:
    if not path.is_file():
        raise UserError(f"{path}: no such QuantumGraph file")
    if not (repo / "butler.yaml").is_file():
        raise UserError(f"{repo}: not a Butler repository (no butler.yaml); give it with --butler REPO")
    if mode not in MODES:
        raise UserError(f"unknown LSST execution mode {mode!r}: use one of {', '.join(MODES)}")


# ---- the final job ------------------------------------------------------------------


def lsst_run_of(graph: Graph) -> LsstRun | None:
    """The :class:`LsstRun` of a graph loaded from a QuantumGraph, else None."""
    return graph.extra.get("lsst")


def run_final_job(run: LsstRun, complete: bool, log_file) -> int:
    """Run the final job once, its output appended to ``log_file``; returns its exit code."""
    argv = final_command(run, complete)
    Path(log_file).parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "ab") as out:
        out.write(f"pilot: final job: {' '.join(argv)}\n".encode())
        out.flush()
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    return proc.returncode


def finish_run(graph: Graph, exit_code: int, logdir) -> int:
    """The master's last step for a QuantumGraph run: the final job, then the run's exit code.

    Runs after the engine is done whatever happened (0, 1 or 3); not for usage errors (2) or
    graphs that are not QuantumGraphs. A failed final job turns exit 0 into 1 (outputs missing
    from the repository) and leaves 1 and 3 as they are.
    """
    run = lsst_run_of(graph)
    if run is None or exit_code not in (EXIT_OK, 1, EXIT_INTERRUPTED):
        return exit_code
    log_file = Path(logdir) / "final.log"
    tool = "transfer-from-graph" if run.final.tool == "transfer" else "aggregate-graph"
    log.info("final job (%s): registering outputs in %s", tool, run.repo)
    code = run_final_job(run, complete=exit_code == EXIT_OK, log_file=log_file)
    if code != 0:
        log.error("final job failed with exit code %d: see %s", code, log_file)
        return 1 if exit_code == EXIT_OK else exit_code
    return exit_code
