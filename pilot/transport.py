"""How ranks talk: a small interface, an MPI implementation and an in-process fake.

``poll`` never spins a core: :class:`MPITransport` probes with ``Iprobe`` and sleeps between
probes with an adaptive back-off (:class:`Backoff`): after a message it keeps probing
(yielding the CPU) for a 0.5 ms spin window, then sleeps 50 us, 100 us, ... up to 10 ms. An
idle rank therefore wakes about 100 times a second and costs well under 1% of a core.
:class:`LocalTransport` (threads and queues) lets the whole master/agent loop run in one
process under plain pytest. Messages cross either transport in their wire form
(:func:`pilot.protocol.to_wire`).
"""

from __future__ import annotations

import logging
import os
import queue
import sys
import threading
import time
import traceback
from abc import ABC, abstractmethod

from pilot.protocol import from_wire, to_wire

log = logging.getLogger("pilot.transport")
TAG = 17


class Backoff:
    """Delays between probes: none within ``spin`` seconds of activity, then doubling sleeps."""

    def __init__(self, spin: float = 0.0005, min_sleep: float = 50e-6, max_sleep: float = 0.01):
        self.spin, self.min_sleep, self.max_sleep = spin, min_sleep, max_sleep
        self._last = time.monotonic()
        self._sleep = min_sleep

    def activity(self) -> None:
        """Something happened: probe eagerly again."""
        self._last = time.monotonic()
        self._sleep = self.min_sleep

    def next_delay(self) -> float:
        """Seconds to wait before the next probe (0 means just yield the CPU)."""
        if time.monotonic() - self._last < self.spin:
            return 0.0
        delay = self._sleep
        self._sleep = min(self.max_sleep, self._sleep * 2)
        return delay

    def wait(self, limit: float) -> None:
        """Sleep for the next delay, but no longer than ``limit`` seconds."""
        delay = min(self.next_delay(), max(0.0, limit))
        if delay > 0:
            time.sleep(delay)
        else:
            os.sched_yield()


class TransportAborted(RuntimeError):
    """The run was aborted (the in-process transport's stand-in for MPI_Abort)."""

    def __init__(self, code: int):
        super().__init__(f"run aborted with code {code}")
        self.code = code


class Transport(ABC):
    """Point-to-point messages between ranks."""

    rank: int
    size: int

    @abstractmethod
    def send(self, dest: int, message) -> None:
        """Send ``message`` to rank ``dest`` without waiting for it to be received."""

    @abstractmethod
    def poll(self, timeout: float):
        """The next ``(source, message)``, waiting at most ``timeout`` seconds; None if none came."""

    @abstractmethod
    def abort(self, code: int) -> None:
        """End every rank of the run with ``code``."""

    def close(self) -> None:
        """Finish sends still in flight (before the process exits)."""


class MPITransport(Transport):
    """mpi4py point-to-point on ``COMM_WORLD`` (or ``comm``), Iprobe with a back-off."""

    def __init__(self, comm=None, backoff: Backoff | None = None):
        from mpi4py import MPI

        self._MPI = MPI
        self.comm = comm if comm is not None else MPI.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.backoff = backoff or Backoff()
        self._pending: list = []

    def send(self, dest: int, message) -> None:
        self._pending.append(self.comm.isend(to_wire(message), dest=dest, tag=TAG))
        if len(self._pending) > 64:
            self._pending = [r for r in self._pending if not r.Test()]

    def poll(self, timeout: float):
        deadline = time.monotonic() + timeout
        status = self._MPI.Status()
        while True:
            if self.comm.Iprobe(source=self._MPI.ANY_SOURCE, tag=TAG, status=status):
                wire = self.comm.recv(source=status.Get_source(), tag=TAG)
                self.backoff.activity()
                return status.Get_source(), from_wire(wire)
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.backoff.wait(left)

    def abort(self, code: int) -> None:
        sys.stderr.flush()
        self.comm.Abort(code)

    def close(self) -> None:
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
        self.hub, self.rank, self.size = hub, rank, hub.size

    def send(self, dest: int, message) -> None:
        self._check()
        self.hub.queues[dest].put((self.rank, to_wire(message)))

    def poll(self, timeout: float):
        self._check()
        try:
            item = self.hub.queues[self.rank].get(timeout=max(0.0, timeout))
        except queue.Empty:
            return None
        self._check()
        source, wire = item
        return source, from_wire(wire)

    def abort(self, code: int) -> None:
        self.hub.abort(code)
        raise TransportAborted(code)

    def _check(self) -> None:
        if self.hub.abort_code is not None:
            raise TransportAborted(self.hub.abort_code)


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
        for handler in logging.getLogger().handlers:
            handler.flush()
        transport.abort(1)
        raise
