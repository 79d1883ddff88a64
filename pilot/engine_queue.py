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
  :mod:`pilot.master`) plus the time an agent holds its reports (``REPORT_HOLD_S`` in
  :mod:`pilot.agent_loop`): a node whose chain is that deep keeps its cores busy while rank 0 is
  not looking, even on tasks of a millisecond.
- Estimates can be wrong: rank 0 takes back (``Recall``) a task that has waited longer than
  ``recall_after`` while another node has room for it; the agent reports it interrupted, unstarted,
  and it runs elsewhere (``queued_at`` and :meth:`QueueAhead.stale` serve that).
"""

from __future__ import annotations

from pilot.events import State, new_launch

DEPTH = 32   # queued tasks behind one running task, at most (the default)
_LAUNCHED = int(State.LAUNCHED)   # read once: converting the enum costs on every link


class QueueAhead:
    """The queued tasks of one engine: who waits behind whom."""

    def __init__(self, horizon: float, depth: int = DEPTH):
        self.horizon = float(horizon)
        self.max_depth = int(depth)
        self.next_of: dict[int, int] = {}    # task -> the task queued behind it
        self.after_of: dict[int, int] = {}   # queued task -> the task it waits for
        self.tails: dict[int, None] = {}     # launched tasks that may get one queued behind (ordered)
        self.queued_at: dict[int, float] = {}   # queued task -> when it was queued
        # Every task of a chain (its placed head included) -> the chain, ``[head, queued...]`` in
        # the order they will run: one list shared by its tasks, so a chain's depth, end and
        # members come without a walk along the links.
        self.chain_of: dict[int, list[int]] = {}

    @property
    def recall_after(self) -> float:
        """Seconds a queued task may wait before rank 0 takes it back for a node with room."""
        return max(1.0, 4 * self.horizon)

    def stale(self, before: float) -> list[int]:
        """Queued tasks that were queued at or before ``before``."""
        return [t for t, at in self.queued_at.items() if at <= before]

    def offer(self, task: int, estimate: float) -> None:
        """``task``, the end of its chain (launched, queued, or moved up), may get a task queued
        behind it if it is short and its chain has room."""
        chain = self.chain_of.get(task)
        depth = 0 if chain is None else len(chain) - 1
        if estimate <= self.horizon and depth < self.max_depth:
            self.tails[task] = None

    def root(self, task: int) -> int:
        """The task holding the resources that ``task`` will get (``task`` itself if placed)."""
        after = self.after_of
        while task in after:
            task = after[task]
        return task

    def link(self, queued: int, behind: int, now: float) -> None:
        """Queue ``queued`` behind ``behind``, the end of its chain, at time ``now``."""
        self.next_of[behind] = queued
        self.after_of[queued] = behind
        self.tails.pop(behind, None)
        self.queued_at[queued] = now
        chain = self.chain_of.get(behind)
        if chain is None:
            chain = self.chain_of[behind] = [behind]
        chain.append(queued)
        self.chain_of[queued] = chain

    def ended(self, task: int) -> int:
        """``task``'s attempt ended: the task to place in its resources now, or -1."""
        self.tails.pop(task, None)
        chain = self.chain_of.pop(task, None)
        queued = self.next_of.pop(task, -1)
        if queued >= 0:
            del self.after_of[queued]
            del self.queued_at[queued]
            del chain[0]   # the queued task heads the chain now
        return queued

    def unlink(self, task: int) -> None:
        """Take a queued ``task`` out of its chain; the task behind it moves up to its place."""
        before = self.after_of.pop(task)
        del self.queued_at[task]
        self.tails.pop(task, None)
        self.chain_of.pop(task).remove(task)
        behind = self.next_of.pop(task, -1)
        if behind >= 0:
            self.next_of[before] = behind
            self.after_of[behind] = before
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
            self.chain_of.pop(t, None)
        return queued

    def tail(self, task: int) -> int:
        """The last task queued behind ``task`` (``task`` itself if none)."""
        chain = self.chain_of.get(task)
        return task if chain is None else chain[-1]

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
    qa = engine.queue
    if not qa.tails or not engine.policy.queued():
        return launches
    # When each chain is expected to free its slot: summed once here, then extended as the
    # rounds link tasks.
    est = engine.cluster.label_estimate.tolist()
    free_at = {x: _chain_free_at(engine, x, now, est) for x in qa.tails}
    for _ in range(qa.max_depth):
        if not qa.tails or not engine.policy.queued():
            break
        made = _queue_round(engine, now, free_at)
        if not made:
            break
        launches += made
    return launches


def _chain_free_at(engine, x: int, now: float, est: list) -> float:
    """When the chain ending at launched or queued task ``x`` is expected to free its slot:
    its placed task's expected end (``now`` if overdue), then the queued ones' estimates
    (``est``: per label), summed in the order they will run."""
    labels, chain = engine._labels, engine.queue.chain_of.get(x)
    head = x if chain is None else chain[0]
    free_at = max(now, engine.cluster.start_of(head) + est[labels[head]])
    if chain is not None:
        for t in chain[1:]:
            free_at += est[labels[t]]
    return free_at


def _queue_round(engine, now: float, free_at: dict[int, float]) -> list:
    qa, c = engine.queue, engine.cluster
    est, labels = c.label_estimate, engine._labels
    limit = now + qa.horizon
    slots = [(x, engine.node_of.item(x), engine.memory_request.item(x), engine._cpus[x], free_at[x])
             for x in qa.tails if free_at[x] <= limit]   # else the chain holds a horizon's worth
    launches = []
    for q, x in engine.policy.select_successors(c, slots, now):
        engine._move(q, _LAUNCHED, now)
        attempt = engine.attempts.item(q) + 1
        engine.attempts[q] = attempt
        node = engine.node_of.item(x)
        engine.node_of[q] = node
        engine.start_time[q] = now
        c.running[labels[q]] += 1
        qa.link(q, x, now)
        seconds = est.item(labels[q])
        free_at[q] = free_at.pop(x) + seconds
        qa.offer(q, seconds)
        launches.append(new_launch(q, attempt, node, engine.memory_request.item(q), engine._cpus[q], x))
    return launches
