"""``FairShare``: whom the device serves next — start-time fair queuing on what calls cost.

Each caller has a virtual time: the device seconds its rows took, divided by its weight. After
every call each caller in it pays its rows' share of the call's measured seconds (so the cost
per row is what batching made it); the next batch starts with the caller of least virtual time.
A caller back with work after having none starts from the current virtual time: no credit for
the time it was idle. Not thread-safe: the engine calls it under its lock.
"""

from __future__ import annotations

from collections import Counter
from typing import Mapping

__all__ = ["FairShare", "MAX_CALLERS_COUNTED"]

MAX_CALLERS_COUNTED = 256  # distinct callers in ``work`` (a metric label each)


class FairShare:
    def __init__(self, weights: Mapping[str, float] | None = None, work: Counter | None = None):
        self.weights = dict(weights or {})
        self.work = Counter() if work is None else work  # device seconds by caller
        self._vtime: dict[str, float] = {}  # caller → device seconds received / weight
        self.now = 0.0  # the virtual time of the last batch's head

    def weight(self, caller: str) -> float:
        return self.weights.get(caller, 1.0)

    def vtime(self, caller: str) -> float:
        return max(self._vtime.get(caller, 0.0), self.now)

    def back(self, caller: str) -> None:
        """``caller`` has work again after none: it starts from now."""
        self._vtime[caller] = self.vtime(caller)

    def order(self, queues: Mapping[str, list]) -> list[str]:
        """Callers with pending items (``queues``: caller → items, oldest first), the one owed
        the device most first; ties: the oldest item."""
        return sorted(queues, key=lambda c: (self._vtime[c], queues[c][0].submitted))

    def serve(self, caller: str) -> None:
        """A batch starts with ``caller``'s item: the virtual time moves to its."""
        self.now = self._vtime[caller]

    def charge(self, batch, seconds: float, waiting) -> None:
        """Each caller in ``batch`` pays its rows' share of ``seconds``; callers neither in
        ``waiting`` nor in debt are forgotten now and then (memory stays bounded)."""
        rows = sum(item.rows for item in batch)
        for item in batch:
            spent = seconds * item.rows / rows
            known = item.caller in self.work or len(self.work) < MAX_CALLERS_COUNTED
            self.work[item.caller if known else "other"] += spent
            self._vtime[item.caller] = self.vtime(item.caller) + spent / self.weight(item.caller)
        if len(self._vtime) > 2 * len(waiting) + 64:
            for caller in [c for c, v in self._vtime.items() if c not in waiting and v <= self.now]:
                del self._vtime[caller]
