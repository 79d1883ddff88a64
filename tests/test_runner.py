"""One attempt under the real runner, with the native payload as a precise task."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time

import pytest

from pilot import nodes, runner as runner_module, spawn as spawn_module
from pilot.events import Failure, TaskStarted
from pilot.protocol import RunTask
from pilot.runner import ProcessTable, Runner, WatchConfig, argv_of, log_path, task_env
from pilot.spawn import cloexec_from
from tests.helpers import PAYLOAD, ROOT, wait_for

FAST = WatchConfig(tolerance=1.10, sample_interval=0.05, kill_grace=0.5)


@pytest.fixture(params=["native", "posix_spawn"])
def launch_path(request, monkeypatch):
    """Run the test once with each way a task can start (see pilot/spawn.py)."""
    monkeypatch.setenv("PILOT_NATIVE_LAUNCH", "1" if request.param == "native" else "0")
    spawn_module.native_usable.cache_clear()
    assert spawn_module.native_usable() == (request.param == "native")
    yield request.param
    spawn_module.native_usable.cache_clear()


def test_tasks_start_through_the_native_launch_here():
    """``pip install`` built pilot._launch, and this kernel has close_range: CI runs the fast path."""
    assert spawn_module._launch is not None, "pilot._launch was not built"
    assert spawn_module.native_usable()


def ensure_payload() -> str:
    """Build the native payload with CMake if it is not there yet; its path."""
    if not PAYLOAD.exists():
        subprocess.run(["cmake", "-S", ROOT, "-B", PAYLOAD.parent, "-DCMAKE_BUILD_TYPE=Release"],
                       check=True, capture_output=True)
        subprocess.run(["cmake", "--build", PAYLOAD.parent], check=True, capture_output=True)
    return str(PAYLOAD)


def pid_gone(pid: int) -> bool:
    """True when ``pid`` no longer runs (gone, or a zombie nobody reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def make_run(tmp_path, command, *, memory_mb=500, timeout=0.0, env=None, cpus=2, attempt=1) -> RunTask:
    return RunTask(task=1234, attempt=attempt, node=0, task_id="t/1234", label="lbl", node_name="n0",
                   command=command, env=env, log=log_path(tmp_path / "logs", 1234, "t/1234", attempt),
                   timeout=timeout, memory_mb=memory_mb, cpus=cpus)


def finish(runner: Runner, limit: float = 30.0):
    """Drive a started runner as the agent does, until it reports its result."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        runner.observe(ProcessTable.scan().rss_mb(runner.pid, runner.pid))
        runner.check_time()
        result = runner.poll()
        if result is not None:
            return result
        select.select([runner.pidfd], [], [], runner.watch.sample_interval)
    raise TimeoutError("attempt did not end")


def attempt(tmp_path, command, **kw):
    runner = Runner(make_run(tmp_path, command, **kw), FAST)
    started = runner.start()
    assert isinstance(started, TaskStarted) and started.pid == runner.pid > 0
    return runner, finish(runner)


@pytest.fixture(scope="module")
def payload():
    return ensure_payload()


def test_success_records_usage_and_log(tmp_path, payload, launch_path):
    record = tmp_path / "rec"
    _, result = attempt(tmp_path, [payload, "--mem", "60", "--cpu", "0.2", "--record", str(record)])
    assert result.failure == Failure.NONE and result.exit_code == 0 and result.signal is None
    assert 55 <= result.peak_rss_mb < 200
    assert result.cpu_s >= 0.15 and result.cpu_s == round(result.cpu_s, 6)   # to the microsecond, as wait4 gives it
    assert result.end - result.start >= 0.2
    assert result.log.endswith(os.path.join("01", "t_1234.1.log")) and os.path.exists(result.log)
    task, node, attempt_no = record.read_text().split()[:3]
    assert (task, node, attempt_no) == ("t/1234", "n0", "1")


def test_environment_of_a_shell_command(tmp_path):
    _, result = attempt(tmp_path, "env | sort; echo out; echo err >&2", env={"EXTRA": "x y"}, cpus=3,
                        memory_mb=777, attempt=2)
    text = open(result.log).read()
    for line in ("PILOT_TASK_ID=t/1234", "PILOT_LABEL=lbl", "PILOT_ATTEMPT=2", "PILOT_NODE=n0",
                 "PILOT_MEMORY_MB=777", "PILOT_CPUS=3", "OMP_NUM_THREADS=3", "EXTRA=x y", "out", "err"):
        assert line in text.splitlines()


def test_mpi_launcher_variables_are_not_passed_on(tmp_path):
    env = task_env(make_run(tmp_path, "true", env={"PMI_MINE": "kept"}),
                   base={"PMI_RANK": "3", "PMI_FD": "7", "HOME": "/h", "OMPI_COMM_WORLD_SIZE": "2"})
    assert "PMI_RANK" not in env and "PMI_FD" not in env and "OMPI_COMM_WORLD_SIZE" not in env
    assert env["HOME"] == "/h" and env["PMI_MINE"] == "kept"


def test_non_zero_exit(tmp_path, payload, launch_path):
    _, result = attempt(tmp_path, [payload, "--exit", "3"])
    assert (result.failure, result.exit_code, result.signal) == (Failure.EXIT, 3, None)


def test_segfault_is_a_signal(tmp_path, payload, launch_path):
    _, result = attempt(tmp_path, [payload, "--signal", str(int(signal.SIGSEGV))])
    assert (result.failure, result.exit_code, result.signal) == (Failure.SIGNAL, None, signal.SIGSEGV)


def test_a_kill_between_a_clean_exit_and_the_reaping_leaves_a_success(tmp_path):
    runner = Runner(make_run(tmp_path, ["true"]), FAST)
    runner.start()
    readable, _, _ = select.select([runner.pidfd], [], [], 30.0)   # exited, not yet reaped
    assert readable
    runner.kill(Failure.INTERRUPTED)   # the drain's kill arrives too late to matter
    result = runner.poll()
    assert result.failure == Failure.NONE and result.exit_code == 0


def test_timeout_kills_the_group(tmp_path, payload):
    marker = tmp_path / "marker"
    runner, result = attempt(tmp_path, [payload, "--sleep", "60", "--child-mem", "1", "--marker", str(marker)],
                             timeout=0.5)
    assert result.failure == Failure.TIMEOUT
    assert 0.5 <= result.end - result.start < 10
    pid, pgid, child = map(int, marker.read_text().split())
    assert pgid == pid == runner.pid
    wait_for(lambda: pid_gone(child), 5, what="child killed")


def test_over_memory_is_oom(tmp_path, payload):
    _, result = attempt(tmp_path, [payload, "--mem", "250", "--ramp", "0.5", "--sleep", "30"], memory_mb=100)
    assert result.failure == Failure.OOM and result.signal == signal.SIGKILL
    assert 110 <= result.peak_rss_mb < 300
    assert result.end - result.start < 10


def test_forked_child_memory_counts(tmp_path, payload):
    marker = tmp_path / "marker"
    _, result = attempt(tmp_path, [payload, "--mem", "20", "--child-mem", "250", "--ramp", "0.5",
                                   "--sleep", "30", "--marker", str(marker)], memory_mb=100)
    assert result.failure == Failure.OOM
    child = int(marker.read_text().split()[2])
    wait_for(lambda: pid_gone(child), 5, what="child killed")


def test_under_tolerance_is_not_oom(tmp_path, payload):
    _, result = attempt(tmp_path, [payload, "--mem", "100", "--sleep", "0.3"], memory_mb=100)
    assert result.failure == Failure.NONE


def test_launch_error(tmp_path, launch_path):
    runner = Runner(make_run(tmp_path, [str(tmp_path / "no-such-program")]), FAST)
    result = runner.start()
    assert result.failure == Failure.LAUNCH and result.exit_code is None
    assert "cannot launch" in open(result.log).read()


def open_fds() -> set[int]:
    """This process's open descriptors (without the one that lists them)."""
    return {int(fd) for fd in os.listdir("/proc/self/fd") if os.path.exists(f"/proc/self/fd/{fd}")}


def test_launch_errors_of_each_kind(tmp_path, launch_path):
    script = tmp_path / "not-executable"
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(0o644)
    fds = open_fds()
    for command, env in (([str(script)], None), (["no-such-program-anywhere"], None),
                         (["true"], {"BAD=NAME": "x"}), (["true", "nul\0byte"], None), ([], None)):
        result = Runner(make_run(tmp_path, command, env=env), FAST).start()
        assert result.failure == Failure.LAUNCH, command
    assert open(result.log).read().count("pilot: cannot launch") == 5
    assert open_fds() <= fds | {spawn_module._devnull()}, "a failed launch left a descriptor open"


def test_a_log_folder_that_cannot_be_made_is_a_launch_error(tmp_path, launch_path):
    (tmp_path / "logs").write_text("a file where the log folder should be")
    result = Runner(make_run(tmp_path, ["true"]), FAST).start()
    assert result.failure == Failure.LAUNCH


def test_a_log_folder_removed_under_the_runner_is_made_again(tmp_path):
    _, first = attempt(tmp_path, ["true"])
    folder = os.path.dirname(first.log)
    os.remove(first.log)
    os.rmdir(folder)     # the runner remembers having made it: the task itself cannot open its log
    assert Runner(make_run(tmp_path, ["true"], attempt=2), FAST).start().failure == Failure.LAUNCH
    _, third = attempt(tmp_path, ["sh", "-c", "echo again"], attempt=3)
    assert third.failure == Failure.NONE and open(third.log).read() == "again\n"


def test_program_is_looked_up_in_the_task_path(tmp_path, launch_path):
    folder = tmp_path / "bin"
    folder.mkdir()
    program = folder / "my-tool"
    program.write_text("#!/bin/sh\necho tool ran with $1\n")
    program.chmod(0o755)
    path = f"{folder}:{os.environ['PATH']}"
    _, found = attempt(tmp_path, ["my-tool", "x"], env={"PATH": path})
    assert found.failure == Failure.NONE and "tool ran with x" in open(found.log).read()
    missing = Runner(make_run(tmp_path, ["my-tool"], attempt=2), FAST).start()
    assert missing.failure == Failure.LAUNCH   # not on the agent's own PATH


PROBE = """
import os
def is_open(fd):
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False
print("fds", *[fd for fd in range(1024) if is_open(fd)])
print("stdin", os.readlink("/proc/self/fd/0"))
print("out", os.readlink("/proc/self/fd/1"), os.readlink("/proc/self/fd/2"))
print("leader", os.getsid(0) == os.getpid() == os.getpgid(0))
"""
# Python ignores SIGPIPE and SIGXFSZ itself: the signal state is read by grep instead.
SIGNAL_PROBE = ["grep", "-E", "^Sig(Blk|Ign):", "/proc/self/status"]


def probe(tmp_path) -> dict[str, list[str]]:
    """Run the probes as tasks while this process holds an inheritable fd and blocks SIGUSR2."""
    leak = os.open(os.devnull, os.O_RDONLY)
    os.set_inheritable(leak, True)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR2})
    try:
        assert signal.getsignal(signal.SIGPIPE) == signal.SIG_IGN   # what the task must not inherit
        _, result = attempt(tmp_path, [sys.executable, "-c", PROBE])
        _, signals = attempt(tmp_path, SIGNAL_PROBE, attempt=2)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR2})
        os.close(leak)
    assert result.failure == signals.failure == Failure.NONE, open(result.log).read()
    seen = {line.split()[0]: line.split()[1:] for line in open(result.log).read().splitlines()}
    return seen | {line.split()[0]: int(line.split()[1], 16) for line in open(signals.log)}


def check_inheritance(seen: dict, log: str) -> None:
    assert seen["fds"] == ["0", "1", "2"]
    assert seen["stdin"] == ["/dev/null"]
    assert seen["out"] == [log, log]
    assert seen["leader"] == ["True"]
    assert seen["SigBlk:"] == 0
    assert seen["SigIgn:"] & (1 << (signal.SIGPIPE - 1) | 1 << (signal.SIGXFSZ - 1)) == 0


def test_task_inherits_only_stdio_a_clean_signal_state_and_its_own_session(tmp_path, launch_path):
    seen = probe(tmp_path)
    check_inheritance(seen, make_run(tmp_path, "").log)


def test_the_native_launch_reports_what_kept_the_program_from_running(tmp_path):
    script = tmp_path / "not-executable"
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(0o644)
    log, fds = str(tmp_path / "log"), open_fds()
    with pytest.raises(PermissionError):
        spawn_module.launch_native([str(script)], [], log, None)
    with pytest.raises(FileNotFoundError) as missing:
        spawn_module.launch_native([str(tmp_path / "nowhere")], [], log, None)
    assert missing.value.filename == str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError) as no_log:
        spawn_module.launch_native(["true"], [], str(tmp_path / "no" / "log"), os.environ["PATH"].encode())
    assert no_log.value.filename == str(tmp_path / "no" / "log")
    assert open_fds() <= fds | {spawn_module._devnull()}, "a failed launch left a descriptor open"


def test_the_native_launch_works_in_a_process_started_without_stdio(tmp_path):
    """Its /dev/null and the log then get descriptors 0 and 1: the task must still see them as
    its stdin and stdout."""
    script = f"""
import os, select, sys
sys.path.insert(0, {str(ROOT)!r})
for fd in (0, 1, 2):
    os.close(fd)
from pilot import spawn
pid, pidfd = spawn.launch_native(["sh", "-c", "echo out; echo err >&2; readlink /proc/self/fd/0"],
                                 [b"PATH=/usr/bin:/bin"], {str(tmp_path / "log")!r}, b"/usr/bin:/bin")
select.select([pidfd], [], [], 10)
status, _ = spawn.reap(pid, pidfd)
os._exit(os.WEXITSTATUS(status) + 10 * (spawn._devnull() != 0))
"""
    done = subprocess.run([sys.executable, "-c", script], timeout=30)
    assert done.returncode == 0, "the task failed (1), or /dev/null did not get descriptor 0 (10)"
    assert (tmp_path / "log").read_text() == "out\nerr\n/dev/null\n"


def test_the_native_reap_returns_status_and_cpu_and_closes_the_pidfd(tmp_path):
    pid, pidfd = spawn_module.launch_native(["sh", "-c", "exit 7"], [b"PATH=/usr/bin:/bin"], str(tmp_path / "log"),
                                            b"/usr/bin:/bin")
    select.select([pidfd], [], [], 10)
    status, cpu_s = spawn_module.reap(pid, pidfd)
    assert os.WEXITSTATUS(status) == 7 and 0 <= cpu_s < 5
    with pytest.raises(OSError):
        os.fstat(pidfd)


@pytest.mark.parametrize("launch_path", ["posix_spawn"], indirect=True)   # the native child needs close_range
def test_without_close_range_descriptors_are_marked_from_the_fd_listing(tmp_path, monkeypatch, launch_path):
    monkeypatch.setattr(spawn_module, "_libc_close_range", lambda: None)
    leak = os.open(os.devnull, os.O_RDONLY)
    try:
        os.set_inheritable(leak, True)
        cloexec_from(3)
        assert not os.get_inheritable(leak)
    finally:
        os.close(leak)
    check_inheritance(probe(tmp_path), make_run(tmp_path, "").log)


def test_agent_environment_drops_mpi_variables_and_both_encodings_agree(tmp_path):
    os.environ["PMI_RANK"] = "3"
    caches = (runner_module._agent_env, runner_module._agent_envb, runner_module._shape_envb,
              runner_module._shape_entries)
    for cache in caches:
        cache.cache_clear()

    def launched_env(run):
        return dict(os.fsdecode(e).split("=", 1) for e in runner_module._task_env_entries(run)[0])

    try:
        run = make_run(tmp_path, "env", env={"WORD": "caf\u00e9", "PATH": "/opt/x:/bin"})
        text = task_env(run)
        assert "PMI_RANK" not in text and text["WORD"] == "caf\u00e9" and text["PATH"] == "/opt/x:/bin"
        assert launched_env(run) == text
        assert {os.fsdecode(k): os.fsdecode(v) for k, v in runner_module._task_envb(run).items()} == text
        plain = make_run(tmp_path, "env")   # without a task env: the shared part comes from a cache
        assert launched_env(plain) == task_env(plain)
        assert ({os.fsdecode(k): os.fsdecode(v) for k, v in runner_module._task_envb(plain).items()}
                == task_env(plain))
        _, result = attempt(tmp_path, "env")
        assert "PMI_RANK=3" not in open(result.log).read().splitlines()
    finally:
        del os.environ["PMI_RANK"]
        for cache in caches:
            cache.cache_clear()


def test_launches_share_one_read_of_the_oom_counter(tmp_path, monkeypatch, payload):
    reads = []

    def counting():
        reads.append(1)
        return 5
    monkeypatch.setattr(nodes, "oom_kill_count", counting)
    monkeypatch.setattr(nodes, "_oom_read", [float("-inf"), None])
    monkeypatch.setattr(runner_module, "OOM_READ_MAX_AGE", 3600.0)
    results = [attempt(tmp_path, ["true"], attempt=k)[1] for k in (1, 2, 3)]
    assert [r.failure for r in results] == [Failure.NONE] * 3 and len(reads) == 1
    _, killed = attempt(tmp_path, [payload, "--signal", "9"], attempt=4)
    assert killed.failure == Failure.SIGNAL and len(reads) == 2   # a SIGKILL death reads afresh


def test_leftovers_of_the_group_are_killed(tmp_path, launch_path):
    pidfile = tmp_path / "bg"
    _, result = attempt(tmp_path, f"sleep 60 & echo $! > {pidfile}; exit 0")
    assert result.failure == Failure.NONE
    wait_for(lambda: pid_gone(int(pidfile.read_text())), 5, what="background process killed")


def test_sigkill_without_the_kernel_oom_killer_is_a_signal(tmp_path, payload):
    _, plain = attempt(tmp_path, [payload, "--signal", "9"])
    assert (plain.failure, plain.signal) == (Failure.SIGNAL, signal.SIGKILL)


def test_process_table_tree_and_group():
    table = ProcessTable({1: (0, 1, 10), 10: (1, 10, 1024), 11: (10, 10, 2048), 12: (11, 12, 1024),
                          20: (1, 10, 512), 30: (1, 30, 4096)})
    assert table.tree(10, 10) == {10, 11, 12, 20}
    assert table.rss_mb(10, 10) == pytest.approx(4.5)


def test_log_layout_and_argv(tmp_path):
    assert log_path("L", 12345, "a/b", 2) == os.path.join("L", "00012", "a_b.2.log")
    assert argv_of("echo hi") == ["/bin/sh", "-c", "echo hi"]
    assert argv_of(["x", 1]) == ["x", "1"]


def test_tree_walk_finds_what_a_full_scan_finds(tmp_path):
    proc = subprocess.Popen(["/bin/sh", "-c", "sleep 30 & sleep 30 & wait"], start_new_session=True)
    try:
        wait_for(lambda: len(ProcessTable.of_trees([proc.pid]).tree(proc.pid, proc.pid)) == 3, 10,
                 what="two children")
        walked, full = ProcessTable.of_trees([proc.pid]), ProcessTable.scan()
        assert walked.tree(proc.pid, proc.pid) == full.tree(proc.pid, proc.pid)
        assert walked.rss_mb(proc.pid, proc.pid) > 0
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


KERNEL_OOM_HELPER = """
import os, select, sys
from pathlib import Path
Path(sys.argv[1], "cgroup.procs").write_text(str(os.getpid()))
from pilot.protocol import RunTask
from pilot.runner import Runner, WatchConfig
run = RunTask(1, 1, 0, "big", "l", "n", [sys.argv[2], "--mem", "400", "--sleep", "30"], None,
              sys.argv[3] + "/big.1.log", 0.0, 100000, 1)
runner = Runner(run, WatchConfig(tolerance=1.1, sample_interval=60))
runner.start()
while (result := runner.poll()) is None:
    select.select([runner.pidfd], [], [], 1.0)
print(result.failure.name, result.signal)
"""


def own_memory_cgroup():
    """This process's cgroup v1 memory folder, if it can be written (root on a v1 host)."""
    for line in open("/proc/self/cgroup").read().splitlines():
        _, names, path = line.split(":", 2)
        if "memory" in names.split(","):
            folder = nodes.CGROUP_ROOT / "memory" / path.lstrip("/")
            return folder if os.access(folder, os.W_OK) else None
    return None


def test_kernel_oom_killer_is_classified_oom(tmp_path, payload):
    parent = own_memory_cgroup()
    if parent is None:
        pytest.skip("needs a writable cgroup v1 memory hierarchy")
    group = parent / f"pilot_test_oom_{os.getpid()}"
    group.mkdir()
    try:
        (group / "memory.limit_in_bytes").write_text(str(150 << 20))
        out = subprocess.run([sys.executable, "-c", KERNEL_OOM_HELPER, str(group), payload, str(tmp_path)],
                             cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert out.stdout.split() == ["OOM", str(int(signal.SIGKILL))], out.stderr[-2000:]
        assert int(dict(line.split() for line in (group / "memory.oom_control").read_text().splitlines())
                   ["oom_kill"]) >= 1
    finally:
        wait_for(lambda: not (group / "cgroup.procs").read_text().strip(), 10, what="cgroup empty")
        group.rmdir()
