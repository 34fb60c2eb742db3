"""What replicas of one service agree on, behind one interface (``Coordination``).

Three kinds of state, each held under a *lease* that the replica holding it renews (every third
of ``lease_s``) and that lapses when the replica dies:

- **holds**: bytes a tenant's running writes may still put in the artifact store (a fine-tune's
  checkpoints, a save in flight); quotas count them beside what is stored, so two replicas can
  never both squeeze into the last megabytes (the check and the hold happen under one ``lock``);
- **slots**: a tenant's jobs, active or queued, on any replica (``--tenant-max-jobs``);
- **jobs**: the registry of fine-tunes by id (tenant, model, replica, last checkpoint, state),
  and each running one's lease: at most one replica runs a job at a time, and a job whose
  replica died is resumed by id on any other (``claim``).

The subclasses only say how to store them: ``LocalCoordination`` in this process (one replica,
the default), ``RedisCoordination`` in Redis (N replicas).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, fields
from typing import ContextManager

from ..errors import FailedPrecondition

log = logging.getLogger("adjointdpm.cluster")

__all__ = ["Coordination", "JobRecord", "JOB_STATES"]

JOB_STATES = ("running", "stopped", "done")


@dataclass
class JobRecord:
    """A fine-tune as the cluster knows it; ``checkpoint`` is its newest resumable point."""

    id: str
    tenant: str
    model: str = ""
    replica: str = ""
    state: str = "running"   # running | stopped (resumable) | done
    checkpoint: str = ""
    iteration: int = 0
    adapter: str = ""        # the result, once done
    updated: float = 0.0

    @classmethod
    def from_dict(cls, data: dict) -> "JobRecord":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_dict(self) -> dict:
        return asdict(self)


class Coordination(ABC):
    """``replica``: this process's name in the cluster; ``lease_s``: how long what it holds
    outlives its last renewal."""

    url = "local"

    def __init__(self, replica: str, lease_s: float = 30.0):
        if lease_s <= 0:
            raise ValueError("the lease must be positive")
        self.replica, self.lease_s = replica, float(lease_s)
        self._mine_lock = threading.Lock()
        self._holds: dict[str, tuple[str, int]] = {}   # hold id → (tenant, bytes)
        self._slots: dict[str, str] = {}               # slot id → tenant
        self._leases: dict[str, float] = {}            # job id → monotonic time of last renewal
        self._lost: set[str] = set()
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None
        self.reachable = True  # the last beat reached the store (adjointdpm_coordination_up)

    # -- what subclasses store ----------------------------------------------------------------------
    @abstractmethod
    def lock(self, name: str) -> ContextManager:
        """Mutual exclusion across replicas for a check and the act it allows."""

    @abstractmethod
    def _put_hold(self, hold_id: str, tenant: str, nbytes: int) -> None: ...

    @abstractmethod
    def _drop_hold(self, hold_id: str) -> None: ...

    @abstractmethod
    def held(self, tenant: str | None = None) -> int:
        """Bytes held by live holds (of ``tenant``, or of everyone)."""

    @abstractmethod
    def _put_slot(self, slot_id: str, tenant: str) -> None: ...

    @abstractmethod
    def _drop_slot(self, slot_id: str, tenant: str) -> None: ...

    @abstractmethod
    def slots(self, tenant: str) -> int:
        """A tenant's live job slots, on every replica."""

    @abstractmethod
    def _take_lease(self, job_id: str) -> str | None:
        """Take the job's lease; None when taken, else the replica that holds it."""

    @abstractmethod
    def _renew_lease(self, job_id: str) -> bool:
        """Extend our lease (re-take it if it lapsed unclaimed); False when another holds it."""

    @abstractmethod
    def _drop_lease(self, job_id: str) -> None:
        """Give up our lease (never another replica's)."""

    @abstractmethod
    def job(self, job_id: str) -> JobRecord | None:
        """The registry's record of a job; None when it has none."""

    @abstractmethod
    def _put_job(self, record: JobRecord) -> None: ...

    def ready(self) -> None:
        """UNAVAILABLE, with the reason, when cluster-bound work cannot be admitted now."""

    def ping(self) -> None:
        """Reach the store (raises when it cannot be reached)."""

    def held_here(self) -> dict[str, int]:
        """What this replica holds now: job leases, job slots, storage holds."""
        with self._mine_lock:
            return {"job_leases": len(self._leases), "job_slots": len(self._slots),
                    "storage_holds": len(self._holds)}

    # -- holds ----------------------------------------------------------------------------------------
    def hold(self, tenant: str, nbytes: int) -> str:
        hold_id = uuid.uuid4().hex
        self._put_hold(hold_id, tenant, int(nbytes))
        with self._mine_lock:
            self._holds[hold_id] = (tenant, int(nbytes))
        self._start_beat()
        return hold_id

    def resize(self, hold_id: str, nbytes: int) -> None:
        """A hold shrinks as its job writes (and grows back when it deletes what it wrote)."""
        with self._mine_lock:
            if hold_id not in self._holds:
                return
            tenant = self._holds[hold_id][0]
            self._holds[hold_id] = (tenant, int(nbytes))
        try:
            self._put_hold(hold_id, tenant, int(nbytes))
        except Exception as err:  # noqa: BLE001 — the next renewal writes it
            log.warning("hold %s not resized now (%s); the next renewal will", hold_id, err)

    def drop(self, hold_id: str) -> None:
        with self._mine_lock:
            if self._holds.pop(hold_id, None) is None:
                return
        try:
            self._drop_hold(hold_id)
        except Exception as err:  # noqa: BLE001 — it lapses with its lease
            log.warning("hold %s not dropped now (%s); it lapses with its lease", hold_id, err)

    # -- tenant job slots -------------------------------------------------------------------------------
    def enter(self, tenant: str, limit: int | None) -> tuple[str | None, int]:
        """A job slot for ``tenant`` if it has fewer than ``limit`` (None: no limit, no slot
        taken): (slot id or None when full, the slots it held before)."""
        if limit is None:
            return "", 0
        self.ready()
        with self.lock(f"slots:{tenant}"):
            count = self.slots(tenant)
            if count >= limit:
                return None, count
            slot_id = uuid.uuid4().hex
            self._put_slot(slot_id, tenant)
        with self._mine_lock:
            self._slots[slot_id] = tenant
        self._start_beat()
        return slot_id, count

    def leave(self, slot_id: str) -> None:
        if not slot_id:
            return
        with self._mine_lock:
            tenant = self._slots.pop(slot_id, None)
        if tenant is not None:
            try:
                self._drop_slot(slot_id, tenant)
            except Exception as err:  # noqa: BLE001
                log.warning("job slot %s not released now (%s); it lapses with its lease", slot_id, err)

    # -- the job registry -------------------------------------------------------------------------------
    def claim(self, record: JobRecord) -> JobRecord:
        """Run ``record``'s job here: take its lease (FAILED_PRECONDITION when a live replica
        holds it) and register it as running on this replica."""
        self.ready()
        holder = self._take_lease(record.id)
        if holder is not None:
            raise FailedPrecondition(f"job {record.id} is running on replica {holder}; a job runs "
                                     "on one replica at a time (resume it once it has stopped)")
        with self._mine_lock:
            self._leases[record.id] = time.monotonic()
            self._lost.discard(record.id)
        self._start_beat()
        record.replica, record.state, record.updated = self.replica, "running", time.time()
        self._put_job(record)
        return record

    def update(self, record: JobRecord) -> None:
        """A newer checkpoint of a job this replica runs (best effort: the checkpoint is in the
        artifact store, where a resume finds it when the registry has not heard of it)."""
        record.updated = time.time()
        try:
            self._put_job(record)
        except Exception as err:  # noqa: BLE001
            log.warning("job %s: checkpoint %s not registered (%s)", record.id, record.checkpoint, err)

    def release(self, record: JobRecord, state: str) -> None:
        """The job ended here (``stopped``: resumable; ``done``: finished); its lease goes."""
        if state not in JOB_STATES:
            raise ValueError(state)
        with self._mine_lock:
            self._leases.pop(record.id, None)
        record.state, record.updated = state, time.time()
        try:
            self._put_job(record)
            self._drop_lease(record.id)
        except Exception as err:  # noqa: BLE001 — the lease lapses; the store has the checkpoints
            log.warning("job %s: %s not registered (%s); its lease lapses", record.id, state, err)

    def lease_lost(self, job_id: str) -> bool:
        """True once this replica may no longer run the job: another took its lease, or no
        renewal reached the store for a whole lease (it may have lapsed meanwhile)."""
        with self._mine_lock:
            last = self._leases.get(job_id)
            return job_id in self._lost or (last is not None and time.monotonic() - last > self.lease_s)

    # -- renewal ---------------------------------------------------------------------------------------
    def start(self) -> None:
        """Beat from now on, holding anything or not, so ``reachable`` tells the truth."""
        self._start_beat()

    def _start_beat(self) -> None:
        with self._mine_lock:
            if self._beat is None and not self._stop.is_set():
                self._beat = threading.Thread(target=self._beat_loop, name="adjointdpm-lease",
                                              daemon=True)
                self._beat.start()

    def _beat_loop(self) -> None:
        while not self._stop.wait(self.lease_s / 3):
            self.renew()

    def renew(self) -> None:
        """Renew everything this replica holds (re-create it where the store lost it)."""
        with self._mine_lock:
            holds, slots, jobs = dict(self._holds), dict(self._slots), list(self._leases)
        try:
            self.ping()
            for hold_id, (tenant, nbytes) in holds.items():
                self._put_hold(hold_id, tenant, nbytes)
            for slot_id, tenant in slots.items():
                self._put_slot(slot_id, tenant)
            self.reachable = True
        except Exception as err:  # noqa: BLE001 — retried at the next beat
            self.reachable = False
            log.warning("cannot renew leases in %s: %s", self.url, err)
        for job_id in jobs:
            try:
                kept = self._renew_lease(job_id)
            except Exception as err:  # noqa: BLE001
                log.warning("cannot renew the lease of job %s: %s", job_id, err)
                continue
            with self._mine_lock:
                if job_id not in self._leases:
                    continue
                if kept:
                    self._leases[job_id] = time.monotonic()
                else:
                    self._lost.add(job_id)

    def close(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=5)
