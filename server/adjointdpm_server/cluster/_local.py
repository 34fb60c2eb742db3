"""Cluster state in this process: one replica, nothing to start (the default).

Nothing lapses here — what this process holds dies with it, and a restart starts empty; a
fine-tune's id still resumes it after a restart, from the checkpoints in the artifact store.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

from ._base import Coordination, JobRecord

__all__ = ["LocalCoordination"]


class LocalCoordination(Coordination):
    def __init__(self, replica: str = "local", lease_s: float = 30.0):
        super().__init__(replica, lease_s)
        self._guard = threading.RLock()
        self._locks: dict[str, threading.RLock] = {}
        self._hold_bytes: dict[str, tuple[str, int]] = {}
        self._slot_tenants: dict[str, str] = {}
        self._lease_of: dict[str, str] = {}
        self._jobs: dict[str, dict] = {}

    @contextmanager
    def lock(self, name: str):
        with self._guard:
            lock = self._locks.setdefault(name, threading.RLock())
        with lock:
            yield

    def _put_hold(self, hold_id, tenant, nbytes):
        with self._guard:
            self._hold_bytes[hold_id] = (tenant, nbytes)

    def _drop_hold(self, hold_id):
        with self._guard:
            self._hold_bytes.pop(hold_id, None)

    def held(self, tenant=None):
        with self._guard:
            return sum(n for t, n in self._hold_bytes.values() if tenant is None or t == tenant)

    def _put_slot(self, slot_id, tenant):
        with self._guard:
            self._slot_tenants[slot_id] = tenant

    def _drop_slot(self, slot_id, tenant):
        with self._guard:
            self._slot_tenants.pop(slot_id, None)

    def slots(self, tenant):
        with self._guard:
            return sum(1 for t in self._slot_tenants.values() if t == tenant)

    def _take_lease(self, job_id):
        with self._guard:
            holder = self._lease_of.get(job_id)
            if holder is not None:
                return holder
            self._lease_of[job_id] = self.replica
            return None

    def _renew_lease(self, job_id):
        with self._guard:
            return self._lease_of.setdefault(job_id, self.replica) == self.replica

    def _drop_lease(self, job_id):
        with self._guard:
            if self._lease_of.get(job_id) == self.replica:
                del self._lease_of[job_id]

    def job(self, job_id):
        with self._guard:
            data = self._jobs.get(job_id)
        return None if data is None else JobRecord.from_dict(data)

    def _put_job(self, record):
        with self._guard:
            self._jobs[record.id] = record.to_dict()
