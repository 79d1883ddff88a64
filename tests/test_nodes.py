"""What a rank learns about its node and its allocation."""

from __future__ import annotations

import os
import socket

from pilot import nodes
from pilot.nodes import (cgroup_dirs, detect_cores, detect_memory_mb, local_node, meminfo_total_mb,
                         memory_reserve_mb, node_name, run_deadline)


def test_node_identity():
    assert node_name({"SLURMD_NODENAME": "nid00042"}) == "nid00042"
    assert node_name({}) == socket.gethostname()


def test_reserve_is_five_percent_bounded():
    assert memory_reserve_mb(4000) == 512
    assert memory_reserve_mb(96000) == 4800
    assert memory_reserve_mb(1_000_000) == 8192


def test_memory_from_slurm_wins():
    assert detect_memory_mb({"SLURM_MEM_PER_NODE": "96000"}) == 96000 - 4800


def test_memory_of_this_machine_is_meminfo_or_cgroup_less_reserve():
    total = meminfo_total_mb()
    limit = nodes.cgroup_memory_limit_mb()
    expected = min(total, limit) if limit else total
    assert detect_memory_mb({}) == expected - memory_reserve_mb(expected)


def test_meminfo_parsing():
    assert meminfo_total_mb("MemFree: 1 kB\nMemTotal:       24684544 kB\n") == 24106


def test_cgroup_folders_v1_and_v2():
    text = "4:memory:/slurm/uid_0/job_7\n0::/user.slice/x\n"
    found = [str(p) for p in cgroup_dirs("memory", text)]
    assert found == ["/sys/fs/cgroup/memory/slurm/uid_0/job_7", "/sys/fs/cgroup/memory",
                     "/sys/fs/cgroup/user.slice/x"]


def test_cores():
    assert detect_cores({"SLURM_CPUS_ON_NODE": "68"}) == 68
    assert detect_cores({}) == len(os.sched_getaffinity(0))


def test_overrides_and_node_per_rank():
    info = local_node(1000, 3, per_rank=True, rank=4, env={"SLURMD_NODENAME": "n1"})
    assert (info.name, info.memory_mb, info.cores) == ("n1/rank4", 1000, 3)
    info = local_node(env={"SLURMD_NODENAME": "n1", "SLURM_MEM_PER_NODE": "2000", "SLURM_CPUS_ON_NODE": "5"})
    assert (info.name, info.memory_mb, info.cores) == ("n1", 2000 - 512, 5)


def test_deadline_from_walltime_or_slurm_end():
    assert run_deadline(None, start=100.0, env={}) is None
    assert run_deadline(50, start=100.0, env={}) == 150.0
    assert run_deadline(50, start=100.0, env={"SLURM_JOB_END_TIME": "120"}) == 120.0
    assert run_deadline(None, start=100.0, env={"SLURM_JOB_END_TIME": "500"}) == 500.0


def test_oom_counter_and_limit_from_cgroup_files(tmp_path, monkeypatch):
    monkeypatch.setattr(nodes, "CGROUP_ROOT", tmp_path)
    nodes.oom_events_file.cache_clear()
    monkeypatch.setattr(nodes, "oom_events_file", nodes.oom_events_file.__wrapped__)
    folder = cgroup_dirs("memory")[0]
    folder.mkdir(parents=True)
    (folder / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 7\n")
    (folder / "memory.limit_in_bytes").write_text(str(3 * 2**30))
    assert nodes.oom_kill_count() == 7
    assert nodes.cgroup_memory_limit_mb() == 3072
    (folder / "memory.limit_in_bytes").write_text("9223372036854771712")
    assert nodes.cgroup_memory_limit_mb() is None


def test_recent_oom_count_is_shared_until_it_is_max_age_old(tmp_path, monkeypatch):
    monkeypatch.setattr(nodes, "oom_events_file", lambda: tmp_path / "memory.events")
    monkeypatch.setattr(nodes, "_oom_read", [float("-inf"), None])
    (tmp_path / "memory.events").write_text("low 0\nhigh 0\nmax 2\noom 1\noom_kill 1\n")
    assert nodes.recent_oom_kill_count(3600) == 1
    (tmp_path / "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 2\noom_kill 2\n")
    assert nodes.recent_oom_kill_count(3600) == 1      # the shared read
    assert nodes.recent_oom_kill_count(0.0) == 2       # a fresh one, shared from now on
    (tmp_path / "memory.events").unlink()
    assert nodes.recent_oom_kill_count(3600) == 2
    assert nodes.recent_oom_kill_count(0.0) is None    # unreadable
