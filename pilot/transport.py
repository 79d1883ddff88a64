"""How ranks talk: a small interface, an MPI implementation and an in-process fake.

Sends are batched: ``send`` queues a message for its destination and ``flush`` sends each
destination's queue as one transport message (``poll`` and ``close`` flush first, so a rank
that waits through ``poll`` never holds back what it has sent). A loop iteration that produces
several messages for one rank (the master's launches, an agent's results) thus costs one MPI
message and one wake-up instead of one each; the receiver's ``poll`` hands the messages of a
batch out one by one, in order.

``poll`` never spins a core: :class:`MPITransport` probes with ``Iprobe`` and sleeps between
probes with an adaptive back-off (:class:`Backoff`): after a message it keeps probing
(yielding the CPU) for a 0.5 ms spin window, then sleeps 50 us, 100 us, ... up to 10 ms. An
idle rank therefore wakes about 100 times a second and costs about 1% of a core.

MPI offers no way to sleep until a message comes, so every rank also has a :class:`Doorbell`
(a UDP socket): a flush rings the receiver's doorbell right after the MPI send (unless the
sender says the receiver need not wake for it: ``flush(ring=False)``), and the
receiver's sleeps are ``select`` calls on it (the agent's also on its tasks' pidfds), so a
message wakes its receiver at once instead of at the end of a back-off sleep. A ring whose
message is not visible yet starts short sleeps (50 us, doubling) rather than a spin: on a
node whose cores all run tasks, a spinning rank takes CPU from them. A lost or blocked
datagram only costs latency: the back-off still finds the message.
:class:`LocalTransport` (threads and queues) lets the whole master/agent loop run in one
process under plain pytest. Messages cross either transport in their wire form
(:func:`pilot.protocol.to_wire`).
"""

from __future__ import annotations

import collections
import logging
import os
import queue
import select
import socket
import sys
import tempfile
import threading
import time
import traceback
from abc import ABC, abstractmethod

from pilot.protocol import from_wire, to_wire

log = logging.getLogger("pilot.transport")
TAG = 17
RING_SLEEP_S = 50e-6   # first sleep after a ring whose message is not visible yet (then doubling)


class Backoff:
    """Delays between probes: none within a spin window after activity, then doubling sleeps."""

    def __init__(self, spin: float = 0.0005, min_sleep: float = 50e-6, max_sleep: float = 0.01):
        self.spin, self.min_sleep, self.max_sleep = spin, min_sleep, max_sleep
        self._spin_until = time.monotonic() + spin
        self._sleep = min_sleep

    def activity(self, spin: float | None = None) -> None:
        """Something happened: probe eagerly again, spinning ``spin`` s (default: the window)."""
        self._spin_until = time.monotonic() + (self.spin if spin is None else spin)
        self._sleep = self.min_sleep

    def rung(self, first_sleep: float = RING_SLEEP_S) -> None:
        """A message is on its way: probe again after a short sleep (doubling from ``first_sleep``)."""
        self._spin_until = 0.0
        self._sleep = first_sleep

    def next_delay(self) -> float:
        """Seconds to wait before the next probe (0 means just yield the CPU)."""
        if time.monotonic() < self._spin_until:
            return 0.0
        delay = self._sleep
        self._sleep = min(self.max_sleep, self._sleep * 2)
        return delay


class Doorbell:
    """What other ranks ring (one byte) after sending to this rank: a FIFO for ranks on this
    host, a UDP socket for the others, both behind one epoll descriptor (``fileno``) that a
    ``select`` can wait on.

    A ring carries no data: a stray or duplicate one only makes the rank probe once more. The
    FIFO exists because a UDP send on the loopback runs the receiver's network stack in the
    sender's system call (about 35 us a ring here); a FIFO write costs a few microseconds. Its
    path is unlinked once every rank has opened it (:meth:`unlink_fifo`).
    """

    def __init__(self, fifo_folder: str | None = None):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("0.0.0.0", 0))
        self.sock.setblocking(False)
        self.port = self.sock.getsockname()[1]
        self.fifo_path: str | None = None
        self._fifo = -1
        self._epoll = select.epoll()
        self._epoll.register(self.sock.fileno(), select.EPOLLIN)
        if fifo_folder is not None:
            self._open_fifo(os.path.join(fifo_folder, "bell"))

    def _open_fifo(self, path: str) -> None:
        try:
            os.mkfifo(path, 0o600)
            # read-write: the FIFO never reports end-of-file while no writer has it open
            self._fifo = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as err:   # a file system without FIFOs: peers here ring by UDP too
            log.info("no doorbell FIFO at %s (%s): same-host peers ring by UDP", path, err)
            self.fifo_path = path
            self.unlink_fifo()
            return
        self.fifo_path = path
        self._epoll.register(self._fifo, select.EPOLLIN)

    def fileno(self) -> int:
        return self._epoll.fileno()

    def ring(self, target) -> None:
        """Ring a peer: ``target`` is a FIFO's write descriptor, a ``(host, port)`` address,
        or None (no doorbell there). Never blocks or raises."""
        try:
            if isinstance(target, int):
                os.write(target, b"!")
            elif target is not None:
                self.sock.sendto(b"!", target)
        except OSError:
            pass   # a full FIFO or a refused datagram: the peer has rings pending anyway

    def drain(self) -> bool:
        """Empty what has been rung; True if anything had been."""
        rung = False
        for fd, _ in self._epoll.poll(0):
            rung = True
            try:
                if fd == self._fifo:
                    os.read(fd, 65536)   # a ring is one byte: one read takes every pending one
                else:
                    while True:
                        self.sock.recv(64)   # a datagram a ring
            except OSError:
                pass
        return rung

    def wait(self, timeout: float) -> bool:
        """Sleep up to ``timeout`` seconds, or until rung; True (and emptied) if rung."""
        readable, _, _ = select.select([self._epoll], [], [], timeout)
        return bool(readable) and self.drain()

    def unlink_fifo(self) -> None:
        """Remove the FIFO's name (and its folder); the open descriptors keep working."""
        if self.fifo_path is not None:
            for remove, path in ((os.unlink, self.fifo_path), (os.rmdir, os.path.dirname(self.fifo_path))):
                try:
                    remove(path)
                except OSError:
                    pass
            self.fifo_path = None

    def close(self) -> None:
        self.unlink_fifo()
        self._epoll.close()
        self.sock.close()
        if self._fifo >= 0:
            os.close(self._fifo)


def fifo_folder(bases=("/dev/shm", None)) -> str | None:
    """A new private folder for a doorbell FIFO (in /dev/shm when there is one), or None.

    Its name carries this process's pid: a rank killed in the moment between creating its FIFO
    and unlinking it leaves the folder behind, and the next rank on the host removes it.
    """
    for base in bases:
        try:
            remove_dead_fifo_folders(base or tempfile.gettempdir())
            return tempfile.mkdtemp(prefix=f"pilot-bell-{os.getpid()}-", dir=base)
        except OSError:
            continue
    return None


def remove_dead_fifo_folders(base: str) -> None:
    """Remove the ``pilot-bell-<pid>-*`` folders in ``base`` whose process is gone."""
    for entry in os.scandir(base):
        parts = entry.name.split("-")
        if len(parts) < 4 or parts[:2] != ["pilot", "bell"] or not parts[2].isdigit():
            continue
        if _alive(int(parts[2])):
            continue
        for remove, path in ((os.unlink, os.path.join(entry.path, "bell")), (os.rmdir, entry.path)):
            try:
                remove(path)
            except OSError:
                pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True   # someone else's process
    return True


def ring_targets(entries: list[tuple[str, int, str | None]]) -> list:
    """Each rank's ring target from this host: the write end of its FIFO when it is on this
    host, else its UDP ``(address, port)``, else None (unresolvable)."""
    here = socket.gethostname()
    targets: list = []
    for (host, port, fifo), address in zip(entries, doorbell_addresses([(h, p) for h, p, _ in entries])):
        target = address
        if host == here and fifo is not None:
            try:
                target = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError:
                pass   # the same name on another machine: UDP it is
        targets.append(target)
    return targets


def doorbell_addresses(entries: list[tuple[str, int]]) -> list[tuple[str, int] | None]:
    """Each rank's ``(host, port)`` as a socket address from this host (None if unresolvable)."""
    here = socket.gethostname()
    out: list[tuple[str, int] | None] = []
    for host, port in entries:
        try:
            ip = "127.0.0.1" if host == here else socket.gethostbyname(host)
        except OSError:
            ip = None
        out.append((ip, port) if ip else None)
    return out


class TransportAborted(RuntimeError):
    """The run was aborted (the in-process transport's stand-in for MPI_Abort)."""

    def __init__(self, code: int):
        super().__init__(f"run aborted with code {code}")
        self.code = code


class Transport(ABC):
    """Point-to-point messages between ranks, batched per destination until ``flush``."""

    rank: int
    size: int
    backoff: Backoff
    wake_fd: int | None = None   # readable when a message may have come (select on it)

    def __init__(self):
        self._outbox: dict[int, list] = {}
        self._inbox: collections.deque = collections.deque()

    def send(self, dest: int, message) -> None:
        """Queue ``message`` for rank ``dest``; it leaves at the next ``flush``, ``poll`` or ``close``."""
        self._outbox.setdefault(dest, []).append(to_wire(message))

    def send_wire(self, dest: int, wire: tuple) -> None:
        """:meth:`send` of a message already in :func:`~pilot.protocol.to_wire`'s form (rank 0
        builds its orders to run a task so, without a message object between)."""
        self._outbox.setdefault(dest, []).append(wire)

    def flush(self, ring: bool = True) -> None:
        """Send every queued message (one batch per destination), without waiting for delivery.
        ``ring=False``: the receivers' doorbells are not rung, for messages they need not see
        before they next look by themselves (a paced rank 0, a back-off's probe)."""
        if self._outbox:
            outbox, self._outbox = self._outbox, {}
            for dest, batch in outbox.items():
                self._send_batch(dest, batch, ring)

    def poll(self, timeout: float, flush: bool = True):
        """The next ``(source, message)``, waiting at most ``timeout`` seconds; None if none came.
        Flushes first (unless ``flush`` is False: the caller holds its messages back a moment)."""
        if flush:
            self.flush()
        if not self._inbox and not self._receive(timeout):
            return None
        return self._inbox.popleft()

    def _deliver(self, source: int, batch) -> None:
        """Unpack a received batch into the inbox."""
        self._inbox.extend((source, from_wire(wire)) for wire in batch)

    @abstractmethod
    def _send_batch(self, dest: int, batch: list, ring: bool = True) -> None:
        """Send a list of wire messages to ``dest`` as one transport message (ringing its
        doorbell, if it has one, when ``ring``)."""

    @abstractmethod
    def _receive(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for one batch and deliver it; False if none came."""

    def next_buffered(self):
        """The next ``(source, message)`` already received, without looking for more; or None."""
        return self._inbox.popleft() if self._inbox else None

    def woken(self) -> None:
        """A wait outside ``poll`` found ``wake_fd`` readable: consume the wake-up."""

    def nap(self, seconds: float) -> bool:
        """Sleep up to ``seconds``, or until a peer rings (then True): a paced loop's wait."""
        time.sleep(seconds)
        return False

    @abstractmethod
    def abort(self, code: int) -> None:
        """End every rank of the run with ``code``."""

    def leave(self, code: int) -> None:
        """End this rank at once with ``code``, waiting for no peer (one may be dead)."""
        raise TransportAborted(code)

    def close(self) -> None:
        """Flush, and finish sends still in flight (before the process exits)."""
        self.flush()


class MPITransport(Transport):
    """mpi4py point-to-point on ``COMM_WORLD`` (or ``comm``), Iprobe with a back-off."""

    def __init__(self, comm=None, backoff: Backoff | None = None):
        from mpi4py import MPI

        super().__init__()
        self._MPI = MPI
        self.comm = comm if comm is not None else MPI.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self._pending: list = []
        self.doorbell = Doorbell(fifo_folder())
        self.wake_fd = self.doorbell.fileno()
        # collective: every rank builds its transport at start-up; the second exchange tells
        # each rank that every peer has opened its FIFO, whose name can then go
        me = (socket.gethostname(), self.doorbell.port, self.doorbell.fifo_path)
        self._bells = ring_targets(self.comm.allgather(me))
        self.comm.allgather(None)
        self.doorbell.unlink_fifo()
        # With every peer's doorbell known a ring ends the wait, so there is no spinning after a
        # message and the sleeps (a fallback for lost rings only) may be longer.
        every_bell = all(self._bells)
        self.backoff = backoff or (Backoff(spin=0.0, min_sleep=0.001, max_sleep=0.02) if every_bell else Backoff())

    def _send_batch(self, dest: int, batch: list, ring: bool = True) -> None:
        self._pending.append(self.comm.isend(batch, dest=dest, tag=TAG))
        if ring:
            self.doorbell.ring(self._bells[dest])
        if len(self._pending) > 64:
            self._pending = [r for r in self._pending if not r.Test()]

    def _receive(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        status = self._MPI.Status()
        emptied = False
        while True:
            if self.comm.Iprobe(source=self._MPI.ANY_SOURCE, tag=TAG, status=status):
                source = status.Get_source()
                self._deliver(source, self.comm.recv(source=source, tag=TAG))
                self.backoff.activity()
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if not emptied:
                # Rings that came while this rank was busy may be for messages it has taken
                # already: empty the doorbell and probe once more, so that the sleep below ends
                # on a new ring (a sender rings after its message is visible), not at once.
                emptied = True
                if self.doorbell.drain():
                    continue
            delay = min(self.backoff.next_delay(), left)
            if delay <= 0:
                os.sched_yield()
            elif self.doorbell.wait(delay):
                self.backoff.rung()   # probe now; the message may be a moment behind its ring

    def woken(self) -> None:
        if self.doorbell.drain():
            self.backoff.rung()   # the message may be a moment behind its ring: probe again soon

    def nap(self, seconds: float) -> bool:
        return self.doorbell.wait(seconds)

    def abort(self, code: int) -> None:
        sys.stderr.flush()
        self.comm.Abort(code)

    def leave(self, code: int) -> None:
        # no MPI_Finalize: it may wait for sends to a dead peer; the launcher ends the others
        os._exit(code)

    def close(self) -> None:
        self.flush()
        if self._pending:
            self._MPI.Request.waitall(self._pending)
        self._pending = []


class LocalHub:
    """The shared state of a set of :class:`LocalTransport` endpoints (one per rank)."""

    def __init__(self, size: int):
        self.size = size
        self.queues = [queue.Queue() for _ in range(size)]
        self.abort_code: int | None = None
        self._lock = threading.Lock()

    def endpoint(self, rank: int) -> "LocalTransport":
        return LocalTransport(self, rank)

    def abort(self, code: int) -> None:
        with self._lock:
            if self.abort_code is None:
                self.abort_code = code
        for q in self.queues:
            q.put(None)   # wake every poller


class LocalTransport(Transport):
    """In-process transport: one queue per rank, for threads standing in for ranks."""

    def __init__(self, hub: LocalHub, rank: int):
        super().__init__()
        self.hub, self.rank, self.size = hub, rank, hub.size
        self.backoff = Backoff()

    def send(self, dest: int, message) -> None:
        self._check()
        super().send(dest, message)

    def send_wire(self, dest: int, wire: tuple) -> None:
        self._check()
        super().send_wire(dest, wire)

    def _send_batch(self, dest: int, batch: list, ring: bool = True) -> None:
        self.hub.queues[dest].put((self.rank, batch))

    def _receive(self, timeout: float) -> bool:
        self._check()
        try:
            item = self.hub.queues[self.rank].get(timeout=max(0.0, timeout))
        except queue.Empty:
            return False
        self._check()
        self._deliver(*item)
        return True

    def abort(self, code: int) -> None:
        self.hub.abort(code)
        raise TransportAborted(code)

    def _check(self) -> None:
        if self.hub.abort_code is not None:
            raise TransportAborted(self.hub.abort_code)


def flush_output() -> None:
    """Flush the log handlers and the standard streams (before a rank ends without Python's exit)."""
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()


def guarded(transport: Transport, main, *args, expected: tuple = (), **kwargs):
    """Run ``main``; an uncaught exception logs its traceback and aborts every rank.

    Exceptions in ``expected`` (e.g. user errors that ``main`` already told the other ranks
    about) pass through untouched.
    """
    try:
        return main(*args, **kwargs)
    except (TransportAborted, *expected):
        raise
    except BaseException as err:   # noqa: BLE001 - any escape must end the whole run, not hang it
        if isinstance(err, SystemExit) and transport.size == 1:
            raise
        log.critical("rank %d failed:\n%s", transport.rank, traceback.format_exc())
        flush_output()
        transport.abort(1)
        raise
