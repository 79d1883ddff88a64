"""Queue-ahead: a ready task sent to a node before there is room for it, to start there the
moment a given launched task ends, in that task's reservation.

Without it a slot whose task ends stays empty for a round trip (the agent reports the end, the
engine picks the next task, the agent receives it): about a millisecond, which is most of the
cycle of a task that lasts a few milliseconds. With it the agent starts the next task at once.

The contract that keeps a node from being over-committed:

- A task ``q`` is queued behind one launched task ``x`` (its predecessor) on ``x``'s node, and
  only if ``q`` needs no more memory and no more cores than ``x`` holds. ``q`` is LAUNCHED (its
  attempt counts, its label's running count holds it) but holds no resources.
- When ``x``'s attempt ends, whatever the outcome, ``x``'s resources go to ``q``: the engine
  places ``q`` as it handles ``x``'s ``TaskFinished``, and the agent starts ``q`` as it reports
  that end (or drops it, reporting it interrupted, if the run is stopping). The agent's
  messages arrive in order, so the engine and the agent agree on when ``q`` holds the slot.
- Only tasks expected to end within ``horizon`` seconds (their label's runtime estimate) get a
  task queued behind them, only while the chain is expected to free its slot within
  ``horizon`` seconds from now, and chains are at most ``depth`` (default :data:`DEPTH`) tasks
  long behind a running one: a queued task is expected to wait at most ``horizon``, and a task
  that became ready meanwhile with a higher priority waits about that long behind it.
  The depth covers the time rank 0 lets messages gather between its turns (``PACE_S`` in
  :mod:`pilot.master`): a node whose chain is as deep as a few tasks keeps its cores busy while
  rank 0 is not looking.
- Estimates can be wrong: rank 0 takes back (``Recall``) a task that has waited longer than
  ``recall_after`` while another node has room for it; the agent reports it interrupted, unstarted,
  and it runs elsewhere (``queued_at`` and :meth:`QueueAhead.stale` serve that).
"""

from __future__ import annotations

DEPTH = 8   # queued tasks behind one running task, at most (the default)


class QueueAhead:
    """The queued tasks of one engine: who waits behind whom."""

    def __init__(self, horizon: float, depth: int = DEPTH):
        self.horizon = float(horizon)
        self.max_depth = int(depth)
        self.next_of: dict[int, int] = {}    # task -> the task queued behind it
        self.after_of: dict[int, int] = {}   # queued task -> the task it waits for
        self.tails: dict[int, None] = {}     # launched tasks that may get one queued behind (ordered)
        self.queued_at: dict[int, float] = {}   # queued task -> when it was queued

    @property
    def recall_after(self) -> float:
        """Seconds a queued task may wait before rank 0 takes it back for a node with room."""
        return max(1.0, 4 * self.horizon)

    def stale(self, before: float) -> list[int]:
        """Queued tasks that were queued at or before ``before``."""
        return [t for t, at in self.queued_at.items() if at <= before]

    def offer(self, task: int, estimate: float) -> None:
        """``task`` was launched or queued: it may get a task queued behind it if it is short
        and its chain has room."""
        if estimate <= self.horizon and self.depth(task) < self.max_depth:
            self.tails[task] = None

    def depth(self, task: int) -> int:
        """How many queued tasks ``task`` waits behind (0: it holds its resources)."""
        n, after = 0, self.after_of
        while task in after:
            task, n = after[task], n + 1
        return n

    def root(self, task: int) -> int:
        """The task holding the resources that ``task`` will get (``task`` itself if placed)."""
        after = self.after_of
        while task in after:
            task = after[task]
        return task

    def link(self, queued: int, behind: int, now: float | None = None) -> None:
        """Queue ``queued`` behind ``behind`` (``now``: when it was queued, if it is new here)."""
        self.next_of[behind] = queued
        self.after_of[queued] = behind
        self.tails.pop(behind, None)
        if now is not None:
            self.queued_at[queued] = now

    def ended(self, task: int) -> int:
        """``task``'s attempt ended: the task to place in its resources now, or -1."""
        self.tails.pop(task, None)
        queued = self.next_of.pop(task, -1)
        if queued >= 0:
            del self.after_of[queued]
            del self.queued_at[queued]
        return queued

    def unlink(self, task: int) -> None:
        """Take a queued ``task`` out of its chain; the task behind it moves up to its place."""
        before = self.after_of.pop(task)
        del self.queued_at[task]
        self.tails.pop(task, None)
        behind = self.next_of.pop(task, -1)
        if behind >= 0:
            self.link(behind, before)
        else:
            del self.next_of[before]

    def drop_chain(self, task: int) -> list[int]:
        """Forget ``task`` and everything queued behind it (its node is gone); the queued ones."""
        queued = self.chain(task)
        for t in [task] + queued:
            self.tails.pop(t, None)
            self.next_of.pop(t, None)
            self.after_of.pop(t, None)
            self.queued_at.pop(t, None)
        return queued

    def tail(self, task: int) -> int:
        """The last task queued behind ``task`` (``task`` itself if none)."""
        nxt = self.next_of
        while task in nxt:
            task = nxt[task]
        return task

    def chain(self, task: int) -> list[int]:
        """The tasks queued behind ``task``, nearest first."""
        out, nxt = [], self.next_of
        while task in nxt:
            task = nxt[task]
            out.append(task)
        return out


def queue_ahead(engine, now: float) -> list:
    """Queue ready tasks behind short launched tasks (see the module docstring), a chain
    link per round; the ``Launch`` actions, each with ``after`` set."""
    launches: list = []
    for _ in range(engine.queue.max_depth):
        if not engine.queue.tails or not engine.policy.queued():
            break
        made = _queue_round(engine, now)
        if not made:
            break
        launches += made
    return launches


def _queue_round(engine, now: float) -> list:
    from pilot.events import Launch, State

    qa, c = engine.queue, engine.cluster
    est, labels, after = c.label_estimate, engine._labels, qa.after_of
    slots = []
    for x in qa.tails:
        ahead, t = [], x   # one walk back to the placed task, noting the queued ones' estimates
        while t in after:
            ahead.append(est.item(labels[t]))
            t = after[t]
        free_at = max(now, c.start_of(t) + est.item(labels[t]))
        for seconds in reversed(ahead):   # summed from the placed task on, as they will run
            free_at += seconds
        if free_at > now + qa.horizon:
            continue   # the chain already holds a horizon's worth of work
        slots.append((x, engine.node_of.item(x), engine.memory_request.item(x), engine._cpus[x], free_at))
    launches = []
    for q, x in engine.policy.select_successors(c, slots, now):
        engine._move(q, int(State.LAUNCHED), now)
        attempt = engine.attempts.item(q) + 1
        engine.attempts[q] = attempt
        node = engine.node_of.item(x)
        engine.node_of[q] = node
        engine.start_time[q] = now
        c.running[labels[q]] += 1
        qa.link(q, x, now)
        qa.offer(q, est.item(labels[q]))
        launches.append(Launch(q, attempt, node, engine.memory_request.item(q), engine._cpus[q], x))
    return launches
