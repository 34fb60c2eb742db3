"""Cluster state in Redis (``--coordination redis://host:6379/0``): N replicas, one truth.

Every lease is a key with a time to live set by Redis's own clock (replicas' clocks never
compare): a hold ``hold:<id>`` (its tenant and bytes), a job slot ``slot:<tenant>:<id>``, a job's
lease ``lease:<job>`` (the replica's name). A replica renews what it holds every third of the
lease and writes it back whole, so what a restarted Redis lost is back within one beat. Locks
are redis-py's (``SET NX PX`` with a token; released only by their holder). Job records
``job:<id>`` are hashes kept for the artifacts' retention.

A Redis that restarted empty knows nothing of the holds and slots that live replicas still
have: until every replica has renewed (half a lease after Redis is seen empty, by the marker
key ``epoch``) quota-bound work is refused with UNAVAILABLE rather than over-admitted. So is
everything while Redis cannot be reached.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from urllib.parse import urlparse

from ..errors import Unavailable
from ._base import Coordination, JobRecord

__all__ = ["RedisCoordination"]

_PREFIX = "adjointdpm:"
_RETENTION_S = 7 * 24 * 3600
# extend our lease, re-take it if it lapsed unclaimed; 0 when another replica holds it
_RENEW = """
local v = redis.call('GET', KEYS[1])
if v == false then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) return 1 end
if v == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end
return 0
"""
# the age of this Redis's memory: the marker is written (with Redis's time) once, when empty
_EPOCH = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local e = redis.call('GET', KEYS[1])
if not e then redis.call('SET', KEYS[1], tostring(now)) return '0' end
return tostring(now - tonumber(e))
"""
_DROP = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def _tenant_key(tenant: str) -> str:
    return tenant.encode().hex()  # any tenant name, never a glob or a separator


class RedisCoordination(Coordination):
    def __init__(self, url: str, replica: str, lease_s: float = 30.0):
        import redis

        super().__init__(replica, lease_s)
        parsed = urlparse(url)
        self.url = f"{parsed.scheme}://{parsed.hostname}:{parsed.port or 6379}{parsed.path}"  # no password
        self._errors = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError,
                        redis.exceptions.BusyLoadingError, redis.exceptions.ReadOnlyError)
        self.redis = redis.Redis.from_url(url, socket_timeout=max(1.0, lease_s / 6),
                                          socket_connect_timeout=max(1.0, lease_s / 6),
                                          decode_responses=True)
        self._renew_script = self.redis.register_script(_RENEW)
        self._drop_script = self.redis.register_script(_DROP)
        self._epoch_script = self.redis.register_script(_EPOCH)
        self._ms = int(self.lease_s * 1000)

    def _down(self, err: Exception) -> Unavailable:
        return Unavailable(f"the coordination store ({self.url}) cannot be reached ({type(err).__name__}): "
                           "work that counts against cluster-wide quotas is refused until it is "
                           "back; retry shortly", retry_after_s=max(1.0, self.lease_s / 3))

    @contextmanager
    def _reach(self):
        try:
            yield
        except self._errors as err:
            raise self._down(err) from err

    def ready(self) -> None:
        with self._reach():
            age = float(self._epoch_script(keys=[_PREFIX + "epoch"]))
        settle = self.lease_s / 2
        if age < settle:
            raise Unavailable(f"the coordination store ({self.url}) restarted empty; replicas are "
                              f"restoring their holds and job slots: retry in {settle - age:.1f} s",
                              retry_after_s=settle - age)

    def ping(self) -> None:
        with self._reach():
            self.redis.ping()

    @contextmanager
    def lock(self, name: str):
        import redis

        lock = self.redis.lock(_PREFIX + "lock:" + name, timeout=self.lease_s,
                               blocking_timeout=self.lease_s)
        with self._reach():
            acquired = lock.acquire()
        if not acquired:
            raise Unavailable(f"the cluster lock {name!r} was not free within {self.lease_s:g} s; "
                              "retry", retry_after_s=1.0)
        try:
            yield
        finally:
            try:
                lock.release()
            except (redis.exceptions.LockError, *self._errors):
                pass  # it lapses with its timeout

    # -- holds ----------------------------------------------------------------------------------------
    def _put_hold(self, hold_id, tenant, nbytes):
        with self._reach():
            self.redis.set(f"{_PREFIX}hold:{hold_id}", json.dumps([tenant, nbytes]), px=self._ms)

    def _drop_hold(self, hold_id):
        self.redis.delete(f"{_PREFIX}hold:{hold_id}")

    def held(self, tenant=None):
        with self._reach():
            keys = list(self.redis.scan_iter(f"{_PREFIX}hold:*", count=500))
            total = 0
            for value in (self.redis.mget(keys) if keys else ()):
                if value is None:  # lapsed between the scan and the read
                    continue
                owner, nbytes = json.loads(value)
                if tenant is None or owner == tenant:
                    total += int(nbytes)
            return total

    # -- slots ----------------------------------------------------------------------------------------
    def _put_slot(self, slot_id, tenant):
        with self._reach():
            self.redis.set(f"{_PREFIX}slot:{_tenant_key(tenant)}:{slot_id}", self.replica, px=self._ms)

    def _drop_slot(self, slot_id, tenant):
        self.redis.delete(f"{_PREFIX}slot:{_tenant_key(tenant)}:{slot_id}")

    def slots(self, tenant):
        with self._reach():
            return sum(1 for _ in self.redis.scan_iter(f"{_PREFIX}slot:{_tenant_key(tenant)}:*", count=500))

    # -- jobs -----------------------------------------------------------------------------------------
    def _take_lease(self, job_id):
        key = f"{_PREFIX}lease:{job_id}"
        with self._reach():
            if self.redis.set(key, self.replica, nx=True, px=self._ms):
                return None
            holder = self.redis.get(key)
        if holder == self.replica:  # an earlier life of this replica, or this one: ours again
            return None
        return holder or self._take_lease(job_id)  # lapsed between the two calls

    def _renew_lease(self, job_id):
        with self._reach():
            return bool(self._renew_script(keys=[f"{_PREFIX}lease:{job_id}"], args=[self.replica, self._ms]))

    def _drop_lease(self, job_id):
        self._drop_script(keys=[f"{_PREFIX}lease:{job_id}"], args=[self.replica])

    def job(self, job_id):
        with self._reach():
            data = self.redis.get(f"{_PREFIX}job:{job_id}")
        return None if data is None else JobRecord.from_dict(json.loads(data))

    def _put_job(self, record: JobRecord):
        with self._reach():
            self.redis.set(f"{_PREFIX}job:{record.id}", json.dumps(record.to_dict()), ex=_RETENTION_S)

    def close(self) -> None:
        super().close()
        self.redis.close()
