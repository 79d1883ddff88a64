"""Task ids to task numbers for millions of ids and dependencies, in numpy.

A Python dict lookup per dependency costs several cache misses (~1 us each here, 3 s for
3M dependencies). Instead each id is keyed by its string hash in an open-addressing table
held in numpy arrays, probed for all names at once.

A name is taken to be an id when its hash equals that id's. Python's string hash is a
keyed 64-bit SipHash (random key per process), so a name that is not an id passes only
with probability about (number of ids) / 2**64 (5e-14 for a million ids). Distinct ids
that share a hash are detected when the table is built; lookups then use an exact dict.
"""

from __future__ import annotations

import numpy as np

_EMPTY = -1


class IdIndex:
    """Find the task numbers of ids; ``ids`` must not change afterwards."""

    def __init__(self, ids: list[str]):
        self.ids = ids
        self.hashes = np.fromiter(map(hash, ids), dtype=np.int64, count=len(ids))
        size = 1 << max(4, (4 * len(ids)).bit_length())  # load factor below 1/4
        self.mask = size - 1
        self.table = np.full(size, _EMPTY, dtype=np.int32)
        self._exact: dict | None = None
        # one table entry per distinct hash (the lowest task number), so that even a file
        # repeating one id a million times keeps probe chains short
        order = np.argsort(self.hashes, kind="stable")
        ordered = self.hashes[order]
        starts = np.ones(len(ids), dtype=bool)
        np.not_equal(ordered[1:], ordered[:-1], out=starts[1:])
        self._insert(order[starts])
        owner = order[starts][np.cumsum(starts) - 1]
        # (later task, first task with its hash): the same id twice, or two ids sharing a hash
        self._pairs = list(zip(order[~starts].tolist(), owner[~starts].tolist()))
        if any(ids[a] != ids[b] for a, b in self._pairs):
            self._exact = self._exact_index()

    def _insert(self, pending: np.ndarray) -> None:
        slot = self.hashes[pending] & self.mask
        while pending.size:
            free = self.table[slot] == _EMPTY
            self.table[slot[free]] = pending[free]  # on a clash one task wins the slot
            placed = np.zeros(pending.size, dtype=bool)
            placed[free] = self.table[slot[free]] == pending[free]
            pending, slot = pending[~placed], (slot[~placed] + 1) & self.mask

    def _probe(self, hashes: np.ndarray) -> np.ndarray:
        """Task number per hash, -1 where none."""
        slot = hashes & self.mask
        found = self.table[slot].astype(np.int64)
        # most keys sit in their first slot: one pass over all of them, then a loop over
        # the few whose slot holds another hash
        moved = np.flatnonzero((found != _EMPTY) & (self.hashes[found] != hashes))
        found[moved] = _EMPTY
        pending, slot = moved, (slot[moved] + 1) & self.mask
        while pending.size:
            task = self.table[slot]
            empty = task == _EMPTY
            hit = ~empty
            hit[hit] = self.hashes[task[hit]] == hashes[pending[hit]]
            found[pending[hit]] = task[hit]
            more = ~(hit | empty)
            pending, slot = pending[more], (slot[more] + 1) & self.mask
        return found

    def first_duplicate(self) -> tuple[int, int] | None:
        """(first, second) task numbers of the earliest repeated id, or None."""
        repeated = {self.ids[a] for a, b in self._pairs if self.ids[a] == self.ids[b]}
        if not repeated:
            return None
        pairs = []
        for tid in repeated:
            first = self.ids.index(tid)
            pairs.append((first, self.ids.index(tid, first + 1)))
        return min(pairs, key=lambda pair: pair[1])

    def lookup(self, names: list) -> np.ndarray | None:
        """Task numbers of ``names``, or None if any name is not a task id."""
        if self._exact is not None:
            try:
                return np.fromiter(map(self._exact.__getitem__, names), dtype=np.int64,
                                   count=len(names))
            except (KeyError, TypeError):
                return None
        try:
            hashes = np.fromiter(map(hash, names), dtype=np.int64, count=len(names))
        except TypeError:  # unhashable: not an id
            return None
        found = self._probe(hashes)
        return None if (found == _EMPTY).any() else found

    def get(self, name, default=None):
        """Exact single lookup (the first task with that id)."""
        if self._exact is None:
            self._exact = self._exact_index()
        return self._exact.get(name, default)

    def _exact_index(self) -> dict:
        exact: dict = {}
        for number, tid in enumerate(self.ids):
            exact.setdefault(tid, number)
        return exact
