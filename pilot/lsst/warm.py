"""Warm quantum execution: a long-lived server that imported the middleware once forks a child
per quantum, and the child becomes a child of the agent, so the runner watches it as usual.

How a quantum is launched in warm mode (agent side, :func:`spawn`):

1. The agent process marks itself a *child subreaper* (``prctl(PR_SET_CHILD_SUBREAPER)``) and
   starts one server per Python (``python -m pilot.lsst.warm serve``), which imports the
   middleware and the graph's task classes once.
2. For each quantum the agent sends one JSON line ``{"argv", "log", "env", "cwd"}`` (``argv``
   is the ``pipetask`` command line, e.g. ``run-qbb REPO GRAPH --qgraph-node-id UUID``).
3. The server forks an intermediate process that forks the quantum's process and exits at
   once, so the quantum's process is re-parented to the nearest subreaper: the agent. The
   server answers ``{"pid": PID}``.
4. The quantum's process starts a new session (its pid is its process group), sends its output
   to the log, takes the task's environment and runs ``pipetask ARGV`` in-process.

The agent then treats PID like any task it launched: it waits on it (``waitid``/``wait4``),
samples its memory (``/proc``), kills its process group on OOM or timeout. A crash, leak or OOM
in one quantum stays in that process.

Fork safety: Python warns when a multi-threaded process forks. Two libraries start threads at
import: OpenBLAS (numpy; a thread pool sized to the cores) and pyarrow's jemalloc (a
background purge thread). The server is started with ``OPENBLAS_NUM_THREADS=1`` and
``JE_ARROW_MALLOC_CONF=background_thread:false``, and refuses to serve if it still has more than
one thread after its imports (naming them), so a fork never copies a lock held by another
thread.
"""

from __future__ import annotations

import ctypes
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass

FORK_SAFE_ENV = {
    "OPENBLAS_NUM_THREADS": "1",
    "JE_ARROW_MALLOC_CONF": "background_thread:false",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}
PR_SET_CHILD_SUBREAPER = 36
CACHE_ENV = "DAF_BUTLER_CACHE_DIRECTORY_IF_UNSET"
READY_TIMEOUT_S = 120.0
TOOL_PREFIX = ("-m", "pilot.lsst.tool", "pipetask")


# ---- agent side -----------------------------------------------------------------------


@dataclass
class WarmProcess:
    """What the runner keeps of a warm launch: the pid of a process that is now its child."""

    pid: int
    returncode: int | None = None


def pipetask_args(command) -> list[str] | None:
    """The ``pipetask`` arguments of a ``python -m pilot.lsst.tool pipetask ...`` command, else None."""
    if not isinstance(command, (list, tuple)) or len(command) < 5:
        return None
    if tuple(command[1:4]) != TOOL_PREFIX:
        return None
    return [str(part) for part in command[4:]]


def become_subreaper() -> None:
    """Make orphaned descendants of this process its children (Linux >= 3.4)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(err)}")


class WarmServer:
    """The agent's handle on one warm server process."""

    def __init__(self, python: str = sys.executable, preload: str | None = None,
                 repo: str | None = None, ready_timeout: float = READY_TIMEOUT_S):
        from pilot.runner import run_tag_env

        become_subreaper()
        argv = [python, "-m", "pilot.lsst.warm", "serve"]
        argv += (["--preload", preload] if preload else []) + (["--repo", repo] if repo else [])
        # Tagged: the quantum processes it forks (no exec) show its environment in /proc, and a
        # restart finds them by the tag if this agent dies (see pilot.leftovers)
        env = {**os.environ, **FORK_SAFE_ENV, **run_tag_env()}
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
                                     close_fds=True)
        self.python = python
        self.ready = self._reply(ready_timeout)
        if "error" in self.ready:
            self.close()
            raise OSError(f"warm server did not start: {self.ready['error']}")

    def launch(self, argv: list[str], log: str, env: dict, cwd: str | None = None) -> int:
        """Start ``pipetask ARGV`` in a forked child; returns its pid (now a child of this process)."""
        request = {"argv": list(argv), "log": str(log), "env": dict(env), "cwd": cwd or os.getcwd()}
        try:
            self.proc.stdin.write((json.dumps(request) + "\n").encode())
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError) as err:
            raise OSError(f"warm server is gone: {err}") from None
        reply = self._reply(READY_TIMEOUT_S)
        if "pid" not in reply:
            raise OSError(f"warm server could not launch: {reply.get('error', reply)}")
        return int(reply["pid"])

    def _reply(self, timeout: float) -> dict:
        readable, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if readable else b""
        if not line:
            self.proc.kill()    # a late answer would pair with the next request: start afresh
            self.proc.wait()
            return {"error": "no answer (the server exited or timed out)"}
        return json.loads(line)

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        """End the server (children already launched are not affected)."""
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


_servers: dict[str, WarmServer] = {}
_start_errors: dict[str, OSError] = {}   # a server that cannot start is not tried again
_lock = threading.Lock()


def server_for(python: str, preload: str | None = None, repo: str | None = None) -> WarmServer:
    """This process's warm server for ``python`` (started on first use, restarted if it died)."""
    with _lock:
        if python in _start_errors:
            raise _start_errors[python]
        server = _servers.get(python)
        if server is None or not server.alive:
            try:
                server = _servers[python] = WarmServer(python, preload, repo)
            except OSError as err:
                _start_errors[python] = err
                raise
        return server


def spawn(command, log: str, env: dict, cwd: str | None = None) -> WarmProcess:
    """Launch a quantum command (``python -m pilot.lsst.tool pipetask ...``) in warm mode.

    Raises OSError when the command is not such a command or the server cannot launch it
    (the runner reports ``Failure.LAUNCH``).
    """
    args = pipetask_args(command)
    if args is None:
        raise OSError(f"not a pipetask command for warm mode: {command!r}")
    repo, graph = (args[1], args[2]) if len(args) > 2 and args[0] == "run-qbb" else (None, None)
    return WarmProcess(server_for(str(command[0]), graph, repo).launch(args, log, env, cwd))


def close_servers() -> None:
    """End every warm server this process started."""
    with _lock:
        for server in _servers.values():
            server.close()
        _servers.clear()
        _start_errors.clear()


# ---- server side ----------------------------------------------------------------------


def thread_names() -> list[str]:
    """Names of this process's OS threads (from /proc, so native threads count too)."""
    names = []
    for tid in sorted(os.listdir("/proc/self/task")):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                names.append(f.read().strip())
        except OSError:
            pass
    return names


def warm_up(preload: str | None, repo: str | None = None) -> None:
    """Import what a quantum needs: the pipetask CLI and execution modules; with a graph, also
    its task classes, and with a repository the quantum-backed butler's set-up and formatters
    (by preparing, not running, the graph's first quantum)."""
    from pilot.lsst.zipfix import apply_fix

    apply_fix()
    import lsst.ctrl.mpexec.cli.pipetask  # noqa: F401  the CLI every child runs
    import lsst.ctrl.mpexec.cli.script.run_qbb  # noqa: F401
    import lsst.pipe.base.single_quantum_executor  # noqa: F401

    if preload:
        _import_task_classes(preload)
        if repo:
            _prepare_first_quantum(preload, repo)


def _import_task_classes(graph_file: str) -> None:
    from lsst.pipe.base.pipeline_graph import TaskImportMode
    from lsst.pipe.base.quantum_graph import PredictedQuantumGraph

    if graph_file.endswith(".qgraph"):
        from lsst.pipe.base import QuantumGraph

        QuantumGraph.loadUri(graph_file)    # imports the task classes
        return
    with PredictedQuantumGraph.open(graph_file, import_mode=TaskImportMode.REQUIRE_CONSISTENT_EDGES):
        pass


def _prepare_first_quantum(graph_file: str, repo: str) -> None:
    """Build the first quantum's butler and read one of its inputs, then drop them."""
    from lsst.ctrl.mpexec.cli.script.run_qbb import _QBBFactory
    from lsst.pipe.base.quantum_graph import PredictedQuantumGraph

    from pilot.lsst.qgraph import read_quanta

    import uuid

    first = [uuid.UUID(u) for u in read_quanta(graph_file).uuids[:1]]
    if not first:
        return
    graph = PredictedQuantumGraph.read_execution_quanta(graph_file, quantum_ids=first)
    quantum = next(iter(graph.build_execution_quanta().values()))
    types = {node.name: node.dataset_type for node in graph.pipeline_graph.dataset_types.values()}
    butler = _QBBFactory(repo, graph.pipeline_graph.universe, types, None)(quantum)
    for refs in quantum.inputs.values():
        for ref in refs[:1]:
            butler.get(ref)
            return


def serve(preload: str | None, repo: str | None = None, stdin=None) -> int:
    """The server loop: one JSON request per line on stdin, one JSON reply per line."""
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)   # anything an import prints must not reach the reply channel
    stdin = stdin or sys.stdin.buffer
    try:
        warm_up(preload, repo)
    except Exception as err:  # reported to the agent, which falls back to a launch failure
        return _reply(out, {"error": f"warm-up failed: {type(err).__name__}: {err}"}, 1)
    threads = thread_names()
    if len(threads) > 1:
        return _reply(out, {"error": f"multi-threaded after imports ({', '.join(threads)}): "
                                     "forking is unsafe; use --lsst-mode subprocess"}, 1)
    _reply(out, {"ready": os.getpid()}, 0)
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # the agent ends the server by closing stdin
    for line in stdin:
        _reply(out, _launch(json.loads(line), keep=(out.fileno(),)), 0)
    return 0


def _reply(out, message: dict, code: int) -> int:
    out.write(json.dumps(message) + "\n")
    out.flush()
    return code


def _launch(request: dict, keep: tuple[int, ...]) -> dict:
    """Fork twice: the grandchild runs the quantum; its pid travels back through a pipe."""
    read_end, write_end = os.pipe()
    request = {**request, "server": os.getpid()}
    middle = os.fork()
    if middle == 0:
        os.close(read_end)
        _middle(request, write_end, keep)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        data = pipe.read()
    os.waitpid(middle, 0)
    if not data:
        return {"error": "fork failed"}
    return {"pid": int(data)}


def _middle(request: dict, write_end: int, keep: tuple[int, ...]) -> None:
    try:
        pid = os.fork()
        if pid == 0:
            os.close(write_end)
            _child(request, keep)
        os.write(write_end, str(pid).encode())
    finally:
        os._exit(0)


def _child(request: dict, keep: tuple[int, ...]) -> None:
    """The quantum's process: own session, log as stdout/stderr, the task's env, run pipetask."""
    code, cache = 1, None
    try:
        os.setsid()
        _redirect(request["log"])
        print(f"pilot: warm quantum process forked from warm server {request['server']}", flush=True)
        for fd in keep:
            os.close(fd)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.environ.clear()
        os.environ.update(request["env"])
        cache = _own_cache_directory()
        os.chdir(request.get("cwd") or "/")
        code = _run_pipetask(request["argv"])
    except BaseException:  # the child must never return into the server's loop
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        if cache:
            shutil.rmtree(cache, ignore_errors=True)
        os._exit(code)


def _own_cache_directory() -> str | None:
    """A datastore cache directory for this child, removed by it when it ends.

    ``os._exit`` skips the atexit hook with which a ``pipetask`` process removes its temporary
    butler cache directory, so the child names the directory itself (the variable the
    middleware uses for that) unless the environment already chose one.
    """
    if os.environ.get(CACHE_ENV):
        return None
    path = os.path.join(tempfile.gettempdir(), f"butler-cache-dir-{os.getpid()}-warm")
    os.environ[CACHE_ENV] = path
    return path


def _redirect(log: str) -> None:
    os.makedirs(os.path.dirname(log) or ".", exist_ok=True)
    # Append, as the runner does: an attempt run again after a restart keeps the earlier output.
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    os.close(null)


def _run_pipetask(argv: list[str]) -> int:
    from lsst.ctrl.mpexec.cli.pipetask import main

    sys.argv = ["pipetask", *argv]
    try:
        main()
    except SystemExit as stop:
        if stop.code is None or isinstance(stop.code, int):
            return stop.code or 0
        print(stop.code, file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m pilot.lsst.warm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    serve_cmd = sub.add_parser("serve", help="run the warm server (JSON lines on stdin/stdout)")
    serve_cmd.add_argument("--preload", metavar="GRAPH", help="import the task classes of this graph")
    serve_cmd.add_argument("--repo", metavar="REPO", help="with --preload: prepare a quantum of it")
    args = parser.parse_args(argv)
    return serve(args.preload, args.repo)


if __name__ == "__main__":
    sys.exit(main())
