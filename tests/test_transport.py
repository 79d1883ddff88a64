"""One contract for both transports: the same SPMD scenarios run as threads over
LocalTransport and as real ranks under ``mpiexec`` over MPITransport.

Run one scenario by hand: ``mpiexec -n 3 .venv/bin/python -m tests.test_transport ping_pong``.
"""

from __future__ import annotations

import os
import select
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pilot.events import Schedule, TaskStarted
from pilot.protocol import Shutdown
from pilot.transport import (RING_SLEEP_S, Backoff, Doorbell, LocalHub, MPITransport, TransportAborted,
                             doorbell_addresses, fifo_folder, guarded, ring_targets)
from tests.helpers import MPIEXEC, ROOT, mpi_env

# ---- scenarios: each runs on every rank ----------------------------------------------


def _collect_done(t, count: int) -> None:
    """Rank 0 waits for `count` Shutdown notes, then releases everyone."""
    if t.rank == 0:
        seen = 0
        while seen < count:
            item = t.poll(10.0)
            assert item is not None, "a rank never reported"
            seen += isinstance(item[1], Shutdown)
        for r in range(1, t.size):
            t.send(r, Shutdown(0))
    else:
        t.send(0, Shutdown(0))
        item = t.poll(10.0)
        assert item == (0, Shutdown(0))


def ping_pong(t) -> None:
    rounds = 200
    if t.rank == 0:
        for i in range(rounds):
            for r in range(1, t.size):
                t.send(r, Schedule(float(i)))
            replies = {}
            while len(replies) < t.size - 1:
                source, msg = t.poll(10.0)
                replies[source] = msg
            assert replies == {r: TaskStarted(i, 1, r, float(i), 0) for r in range(1, t.size)}
    else:
        for i in range(rounds):
            source, msg = t.poll(10.0)
            assert (source, msg) == (0, Schedule(float(i)))
            t.send(0, TaskStarted(i, 1, t.rank, msg.time, 0))


def fan_in_keeps_order(t) -> None:
    count = 300
    if t.rank == 0:
        last = {r: -1 for r in range(1, t.size)}
        for _ in range(count * (t.size - 1)):
            source, msg = t.poll(10.0)
            assert msg.task == last[source] + 1
            last[source] = msg.task
        assert all(v == count - 1 for v in last.values())
    else:
        for i in range(count):
            t.send(0, TaskStarted(i, 1, t.rank, 0.0))


def idle_poll_times_out_without_spinning(t) -> None:
    # Rank 0 polls an idle transport first, then lets the others do the same: ranks start at
    # different times, and a rank done early must not send into a poll still expected empty.
    if t.rank != 0:
        assert t.poll(30.0) == (0, Schedule(0.0))
    cpu0, wall0 = time.thread_time(), time.monotonic()
    assert t.poll(0.5) is None
    cpu, wall = time.thread_time() - cpu0, time.monotonic() - wall0
    assert 0.5 <= wall < 10.0
    assert cpu < 0.25 * wall, f"poll used {cpu:.3f} s of CPU in {wall:.3f} s"
    if t.rank == 0:
        for r in range(1, t.size):
            t.send(r, Schedule(0.0))
    _collect_done(t, t.size - 1)


def send_wakes_a_sleeping_receiver(t) -> None:
    """MPI only: rank 0 sleeps in select on its doorbell alone; a send must ring it."""
    if t.rank == 0:
        for r in range(1, t.size):
            t.send(r, Schedule(0.0))   # one sender at a time: one ring to wait for
            t.flush()
            readable, _, _ = select.select([t.wake_fd], [], [], 30.0)
            assert readable, f"rank {r}'s send did not ring the receiver's doorbell"
            t.woken()   # as an agent does after its own select: the next probe must come soon
            assert t.backoff.next_delay() <= RING_SLEEP_S, "a ring taken outside poll left the long back-off"
            item = t.poll(10.0)
            assert item == (r, TaskStarted(r, 1, r, 0.0)), item
        for r in range(1, t.size):
            t.send(r, Shutdown(0))
    else:
        assert t.poll(30.0) == (0, Schedule(0.0))
        t.send(0, TaskStarted(t.rank, 1, t.rank, 0.0))
        assert t.poll(30.0) == (0, Shutdown(0))


def an_unrung_send_waits_for_a_probe(t) -> None:
    """MPI only: a batch flushed with ``ring=False`` does not end the receiver's nap (a paced
    rank 0's wait), and its probe finds it; a rung one ends the nap at once."""
    if t.rank == 0:
        t.send(1, Schedule(0.0))
        t.flush()
        assert not t.nap(2.0), "a batch sent without a ring woke the receiver"
        assert t.poll(10.0) == (1, TaskStarted(1, 1, 1, 0.0))
        t.send(1, Schedule(1.0))
        t.flush()
        began = time.monotonic()
        assert t.nap(30.0) and time.monotonic() - began < 10.0, "a rung batch did not end the nap"
        assert t.poll(10.0) == (1, TaskStarted(1, 2, 1, 0.0))
        for r in range(1, t.size):
            t.send(r, Shutdown(0))
    elif t.rank == 1:
        assert t.poll(30.0) == (0, Schedule(0.0))
        t.send(0, TaskStarted(1, 1, 1, 0.0))
        t.flush(ring=False)
        assert t.poll(30.0) == (0, Schedule(1.0))
        t.send(0, TaskStarted(1, 2, 1, 0.0))
        t.flush()
        assert t.poll(30.0) == (0, Shutdown(0))
    else:
        assert t.poll(30.0) == (0, Shutdown(0))


def _boom() -> None:
    raise RuntimeError("boom on purpose")


def abort_ends_every_rank(t) -> None:
    if t.rank == 1:
        guarded(t, _boom)
    while True:
        t.poll(1.0)


SCENARIOS = {f.__name__: f for f in (ping_pong, fan_in_keeps_order, idle_poll_times_out_without_spinning,
                                      abort_ends_every_rank, send_wakes_a_sleeping_receiver,
                                      an_unrung_send_waits_for_a_probe)}

# ---- the two ways of running a scenario -------------------------------------------------


def run_local(name: str, size: int):
    """Run a scenario on ``size`` threads; returns (hub abort code, errors by rank)."""
    hub = LocalHub(size)
    errors: dict[int, BaseException] = {}

    def body(rank):
        try:
            endpoint = hub.endpoint(rank)
            SCENARIOS[name](endpoint)
            endpoint.close()
        except BaseException as err:   # noqa: BLE001 - reported to the test
            errors[rank] = err

    threads = [threading.Thread(target=body, args=(r,), daemon=True) for r in range(size)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)
        assert not th.is_alive(), "a rank hung"
    return hub.abort_code, errors


def shm_segments() -> set[str]:
    """Shared-memory files of MPI jobs: MPICH's (and its UCX netmod's), and Open MPI's
    (tests/test_openmpi.py)."""
    return {p.name for pattern in ("mpich_shm_*", "ucx_shm_*", "sm_segment.*") for p in Path("/dev/shm").glob(pattern)}


def mapped_anywhere(name: str) -> bool:
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            if name in maps.read_text():
                return True
        except OSError:
            continue
    return False


def cleanup_shm(before: set[str], wait_s: float = 10.0) -> list[str]:
    """Remove MPI segments that appeared since ``before`` once no live process maps them (what
    a killed or aborted job of ours left behind), waiting up to ``wait_s`` for that: a rank
    killed as its launcher exits may still map one for a moment. The names removed."""
    removed, left = [], sorted(shm_segments() - before)
    deadline = time.monotonic() + wait_s
    while left:
        for name in [n for n in left if not mapped_anywhere(n)]:
            Path("/dev/shm", name).unlink(missing_ok=True)
            removed.append(name)
            left.remove(name)
        if left and time.monotonic() < deadline:
            time.sleep(0.05)   # a poll, until the deadline, for the dying ranks to unmap them
        else:
            break
    return removed


HOLD_MAPPED = ("import mmap, sys, time; f = open(sys.argv[1], 'r+b'); m = mmap.mmap(f.fileno(), 4096); "
               "print(flush=True); time.sleep(float(sys.argv[2]))")


@pytest.mark.parametrize("holds, removed", [(0.5, True), (30.0, False)])
def test_cleanup_shm_removes_a_new_segment_once_no_process_maps_it(holds, removed):
    """A rank killed as mpiexec exits may map its segment a moment longer: the clean-up waits
    for it (up to its limit), and never removes a segment still mapped or one there before."""
    before = shm_segments()
    path = Path("/dev/shm", f"mpich_shm_pilot_test_{os.getpid()}")
    path.write_bytes(bytes(4096))
    holder = subprocess.Popen([sys.executable, "-c", HOLD_MAPPED, str(path), str(holds)], stdout=subprocess.PIPE)
    try:
        holder.stdout.readline()   # it maps the segment now
        assert mapped_anywhere(path.name)
        assert cleanup_shm(before, wait_s=5.0) == ([path.name] if removed else [])
        assert path.exists() is not removed
        assert before <= shm_segments()
    finally:
        holder.kill()
        holder.wait()
        path.unlink(missing_ok=True)


def run_mpi(name: str, size: int) -> subprocess.CompletedProcess:
    cmd = [str(MPIEXEC), "-launcher", "fork", "-n", str(size), sys.executable, "-m", "tests.test_transport", name]
    before = shm_segments()
    try:
        return subprocess.run(cmd, cwd=ROOT, env=mpi_env(), capture_output=True, text=True, timeout=60)
    finally:
        cleanup_shm(before)


class TransportContract:
    size = 3

    def run(self, name: str):
        raise NotImplementedError

    def test_ping_pong(self):
        self.expect_ok("ping_pong")

    def test_fan_in_keeps_per_source_order(self):
        self.expect_ok("fan_in_keeps_order")

    def test_idle_poll_times_out_without_spinning(self):
        self.expect_ok("idle_poll_times_out_without_spinning")

    def test_uncaught_exception_aborts_every_rank(self):
        self.expect_abort("abort_ends_every_rank")


class TestLocalTransport(TransportContract):
    def expect_ok(self, name):
        code, errors = run_local(name, self.size)
        assert code is None and not errors, errors

    def expect_abort(self, name):
        code, errors = run_local(name, self.size)
        assert code == 1
        assert set(errors) == set(range(self.size))
        assert all(isinstance(e, TransportAborted) for e in errors.values())


@pytest.mark.mpi
class TestMPITransport(TransportContract):
    def expect_ok(self, name):
        proc = run_mpi(name, self.size)
        assert proc.returncode == 0, proc.stderr[-3000:]

    def expect_abort(self, name):
        proc = run_mpi(name, self.size)
        assert proc.returncode != 0
        assert "RuntimeError: boom on purpose" in proc.stderr

    def test_send_wakes_a_receiver_sleeping_on_its_doorbell(self):
        self.expect_ok("send_wakes_a_sleeping_receiver")

    def test_a_send_without_a_ring_leaves_a_napping_receiver_asleep_until_it_probes(self):
        self.expect_ok("an_unrung_send_waits_for_a_probe")


def test_backoff_spins_then_sleeps_up_to_the_cap():
    b = Backoff(spin=0.0, min_sleep=0.001, max_sleep=0.004)
    assert [b.next_delay() for _ in range(4)] == [0.001, 0.002, 0.004, 0.004]
    b = Backoff(spin=60.0)
    b.activity()
    assert b.next_delay() == 0.0


def test_backoff_activity_restarts_the_doubling_and_may_spin_for_a_given_window():
    b = Backoff(spin=0.0, min_sleep=0.001, max_sleep=0.004)
    assert [b.next_delay() for _ in range(3)] == [0.001, 0.002, 0.004]
    b.activity()
    assert b.next_delay() == 0.001
    b.activity(spin=60.0)
    assert b.next_delay() == 0.0


def test_doorbell_rings_once_per_drain():
    bell = Doorbell()
    try:
        assert not bell.drain()
        for _ in range(3):
            bell.ring(("127.0.0.1", bell.port))
        readable, _, _ = select.select([bell], [], [], 10.0)
        assert readable
        assert bell.drain()
        assert not bell.drain()
        bell.ring(None)   # a rank without a doorbell: nothing happens
        assert not bell.drain()
    finally:
        bell.close()


def test_a_fifo_doorbell_rings_through_its_write_end_and_leaves_no_name_behind():
    folder = fifo_folder()
    bell = Doorbell(folder)
    try:
        here = socket.gethostname()
        targets = ring_targets([(here, bell.port, bell.fifo_path), ("no-such-host.invalid", 4001, "/nowhere")])
        assert isinstance(targets[0], int) and targets[1] is None
        bell.unlink_fifo()
        assert not os.path.exists(folder)   # the name is gone, the descriptors still work
        for _ in range(3):
            bell.ring(targets[0])
        assert bell.wait(10.0)
        assert not bell.drain()
        bell.ring(("127.0.0.1", bell.port))   # a peer on another host rings by UDP
        assert bell.wait(10.0) and not bell.drain()
        os.close(targets[0])
    finally:
        bell.close()


def test_a_fifo_folder_left_by_a_killed_rank_is_removed_by_the_next(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()   # its pid names no live process now
    left = tmp_path / f"pilot-bell-{dead.pid}-abc"
    left.mkdir()
    os.mkfifo(left / "bell")
    mine = Path(fifo_folder(bases=(str(tmp_path),)))
    assert not left.exists()
    assert mine.exists() and mine.name.startswith(f"pilot-bell-{os.getpid()}-")
    live = Path(fifo_folder(bases=(str(tmp_path),)))   # the folder of a live rank stays
    assert mine.exists() and live.exists()


def test_a_doorbell_without_a_fifo_still_rings_by_udp(tmp_path):
    bell = Doorbell(str(tmp_path / "missing-folder"))   # mkfifo fails: no FIFO, no error
    try:
        assert bell.fifo_path is None
        bell.ring(("127.0.0.1", bell.port))
        assert bell.wait(10.0)
    finally:
        bell.close()


def test_doorbell_addresses_use_loopback_here_and_none_when_unresolvable():
    here = socket.gethostname()
    assert doorbell_addresses([(here, 4000), ("no-such-host.invalid", 4001)]) == [("127.0.0.1", 4000), None]


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.INFO)
    transport = MPITransport()
    SCENARIOS[sys.argv[1]](transport)
    transport.close()
