"""Artifacts: adapters, embeddings, weight gradients and checkpoints as safetensors files.

Each artifact is the blob ``<id>.safetensors`` with its description in the file's metadata and
in a ``<id>.json`` beside it (for listing without opening the tensors), in a directory or an
S3-compatible bucket (``_blobs``, ``_s3``). IDs are ``<kind>-<32 hex>``: anything else is refused
before it can name a blob.

Every artifact belongs to the tenant that made it; a view scoped to a tenant (``scoped``) finds
only that tenant's artifacts, and another tenant's is NOT_FOUND exactly like a missing one.

Publishing is atomic on both backends: the data first, the description last (an artifact
exists once its description does, and a reader never sees a partial one). The description
carries the data's sha256, checked on every load and download. Writes are checked against the
storage quotas before a byte is written, counting what running writes on every replica may
still add (holds in the cluster's coordination store, ``cluster``); a full or failing store is a
plain RESOURCE_EXHAUSTED or UNAVAILABLE that leaves every earlier artifact intact. What a crash
leaves (temporary files, data without a description) is swept at start: a replica's own, and
anyone's older than the lease timeout (no write takes that long), never another replica's
write in flight.
"""

from __future__ import annotations

import errno
import json
import re
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import BinaryIO, Iterator

import torch

from ..cluster import Coordination, LocalCoordination
from ..errors import DataLoss, InvalidArgument, NotFound, ResourceExhausted, Unavailable
from ._blobs import Blobs, LocalBlobs
from ._format import sha256_of, write_safetensors

__all__ = ["ArtifactInfo", "ArtifactStore", "ScopedArtifacts", "Reservation", "KINDS",
           "DEFAULT_TENANT", "HEADER_BYTES", "open_blobs"]

KINDS = ("lora", "full", "embedding", "weight_gradients", "checkpoint")
_ID = re.compile(r"(%s)-[0-9a-f]{32}" % "|".join(KINDS))
DEFAULT_TENANT = "default"
_HEADER_BYTES = 64 * 1024  # safetensors header and metadata, generously
HEADER_BYTES = _HEADER_BYTES
MAX_NAME = 256
MAX_METADATA_BYTES = 256 * 1024  # a fine-tune's loss history fits many times over
DATA, DESCRIPTION = ".safetensors", ".json"


@dataclass
class ArtifactInfo:
    id: str
    kind: str
    model: str
    size: int = 0
    name: str = ""
    iteration: int = 0
    created: float = 0.0
    metadata: dict = field(default_factory=dict)
    tenant: str = DEFAULT_TENANT
    sha256: str = ""  # of the data blob ("" for artifacts written before it was recorded)

    @classmethod
    def from_dict(cls, data: dict) -> "ArtifactInfo":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def _missing(artifact_id: str) -> NotFound:
    return NotFound(f"no artifact {artifact_id} on this server")


def _os_error(err: Exception) -> OSError | None:
    """The OSError in ``err`` (safetensors and boto wrap theirs), or None."""
    if isinstance(err, OSError):
        return err
    found = re.search(r"os error (\d+)", str(err))
    return OSError(int(found.group(1)), str(err)) if found else None


def _write_failed(err: OSError) -> Exception:
    name = errno.errorcode.get(err.errno or 0, "an I/O error")
    if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return ResourceExhausted(f"the server's artifact storage is full ({name}); nothing was "
                                 "written and earlier artifacts are intact")
    return Unavailable(f"the server cannot write artifacts now ({name}); earlier artifacts are intact")


def _read_failed(artifact_id: str, err: OSError) -> Exception:
    if isinstance(err, FileNotFoundError):
        return _missing(artifact_id)
    return Unavailable(f"the artifact store cannot be read now ({err.strerror or err}); retry")


def open_blobs(location: str | Path, replica: str = "local") -> Blobs:
    """``s3://bucket/prefix`` → an S3-compatible bucket; anything else a local directory."""
    if str(location).startswith("s3://"):
        from ._s3 import S3Blobs

        return S3Blobs(str(location))
    return LocalBlobs(str(location).removeprefix("file://"), replica)


class Reservation:
    """Bytes a running job holds for artifacts it has yet to write (a fine-tune's checkpoints
    and adapter), counted against the quotas from its admission to its end. What the job writes
    through it draws on it: the hold is what is reserved less what the job's artifacts take."""

    def __init__(self, store: "ArtifactStore", tenant: str, nbytes: int, hold: str | None):
        self.store, self.tenant, self.bytes, self.hold = store, tenant, int(nbytes), hold
        self.written: dict[str, int] = {}  # this job's artifacts still stored: id → size
        self.released = False

    @property
    def held(self) -> int:
        return max(0, self.bytes - sum(self.written.values()))

    def _update(self) -> None:
        if self.hold is not None:
            self.store.cluster.resize(self.hold, self.held)

    def wrote(self, artifact_id: str, size: int) -> None:
        self.written[artifact_id] = size
        self._update()

    def deleted(self, artifact_id: str) -> None:
        if self.written.pop(artifact_id, None) is not None:
            self._update()

    def release(self) -> None:
        self.store._release(self)

    def __enter__(self) -> "Reservation":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class ArtifactStore:
    """``location``: a directory, ``s3://bucket/prefix``, or a ``Blobs``. ``tenant_quota_bytes``
    bounds each tenant's artifacts, ``quota_bytes`` all of them (on every replica sharing the
    store, through ``cluster``); ``retention_s`` (what the server's janitor applies; 0 = forever)
    is only told to users. ``lease_s``: no write takes longer (the sweep's age bound)."""

    def __init__(self, location: str | Path | Blobs, *, quota_bytes: int | None = None,
                 tenant_quota_bytes: int | None = None, retention_s: float | None = None,
                 cluster: Coordination | None = None, lease_s: float | None = None):
        self.cluster = cluster or LocalCoordination()
        self.blobs = location if isinstance(location, Blobs) else open_blobs(location, self.cluster.replica)
        self.quota_bytes, self.tenant_quota_bytes = quota_bytes, tenant_quota_bytes
        self.retention_s = retention_s
        self.lease_s = self.cluster.lease_s if lease_s is None else lease_s
        self._index_lock = threading.Lock()
        self._index: dict[str, tuple[str, ArtifactInfo]] = {}  # id → (description's version, info)
        self._reservations: list[Reservation] = []
        self.removed_orphans = self._sweep()

    @property
    def quotas(self) -> bool:
        return self.quota_bytes is not None or self.tenant_quota_bytes is not None

    def _sweep(self) -> list[str]:
        """Remove what a crash can leave: this replica's unfinished writes, and anyone's
        older than the lease (their writer is dead); data without its description and
        descriptions without their data, once as old."""
        gone = self.blobs.sweep_temporaries(self.cluster.replica, self.lease_s)
        entries = {e.key: e for e in self.blobs.entries()}
        cutoff = time.time() - self.lease_s
        for key, entry in entries.items():
            stem, dot, suffix = key.partition(".")
            partner = {DATA[1:]: DESCRIPTION, DESCRIPTION[1:]: DATA}.get(suffix)
            if (partner is not None and _ID.fullmatch(stem) and f"{stem}{partner}" not in entries
                    and entry.modified < cutoff):
                self.blobs.delete(key)
                gone.append(key)
        return gone

    # -- usage and quotas ---------------------------------------------------------------------------
    def usage(self, tenant: str | None = None) -> int:
        """Bytes of artifacts (of ``tenant``, or of everyone)."""
        return sum(i.size for i in self.list(tenant=tenant))

    def reserved(self, tenant: str | None = None) -> int:
        """Bytes held for writes in flight and running jobs, on every replica."""
        return self.cluster.held(tenant) if self.quotas else 0

    def _advice(self) -> str:
        """What a user can do about a full quota."""
        if self.retention_s:
            expiry = f"wait for older artifacts to expire (after {self.retention_s / 3600:g} h)"
        else:
            expiry = "artifacts are kept until deleted"
        return (f"delete artifacts you no longer need (DeleteArtifact), {expiry}, keep fewer "
                f"checkpoints (keep_checkpoints), or ask the operator for more")

    def _check_quota(self, tenant: str, needed: int) -> None:
        """``needed`` more bytes fit beside what is stored and what is held (under the lock)."""
        if self.tenant_quota_bytes is not None:
            reserved = self.reserved(tenant)
            used = self.usage(tenant) + reserved
            if used + needed > self.tenant_quota_bytes:
                held = (f" ({reserved / 2**20:.1f} MiB of it reserved by running jobs)"
                        if reserved else "")
                raise ResourceExhausted(
                    f"tenant storage quota: {used / 2**20:.1f} MiB used of "
                    f"{self.tenant_quota_bytes / 2**20:.1f} MiB{held}; this artifact needs "
                    f"{needed / 2**20:.1f} MiB: {self._advice()}")
        if self.quota_bytes is not None:
            used = self.usage() + self.reserved()
            if used + needed > self.quota_bytes:
                raise ResourceExhausted(  # other tenants' usage is not ours to tell
                    f"the server's artifact storage quota is reached; this artifact needs "
                    f"{needed / 2**20:.1f} MiB: retry later or ask the operator")

    def _hold(self, tenant: str, needed: int) -> str | None:
        """Check the quotas and hold ``needed`` bytes, as one step on every replica; None when
        no quota is set (nothing to count)."""
        if not self.quotas or needed <= 0:
            return None
        self.cluster.ready()
        with self.cluster.lock("storage"):
            self._check_quota(tenant, needed)
            return self.cluster.hold(tenant, needed)

    def check_room(self, needed: int, tenant: str = DEFAULT_TENANT) -> None:
        """RESOURCE_EXHAUSTED now when ``needed`` more bytes would exceed a storage quota."""
        if self.quotas:
            self._check_quota(tenant, needed)

    def reserve(self, needed: int, tenant: str = DEFAULT_TENANT) -> Reservation:
        """Hold ``needed`` bytes against the quotas until the reservation is released (use it as
        a context manager); RESOURCE_EXHAUSTED now when they do not fit beside what is stored and
        held. Without a quota nothing is refused, and the hold is only bookkeeping."""
        reservation = Reservation(self, tenant, needed, self._hold(tenant, needed))
        self._reservations.append(reservation)
        return reservation

    def _release(self, reservation: Reservation) -> None:
        if reservation.released:
            return
        reservation.released = True
        if reservation in self._reservations:
            self._reservations.remove(reservation)
        if reservation.hold is not None:
            self.cluster.drop(reservation.hold)

    def _forget(self, artifact_id: str) -> None:
        for r in tuple(self._reservations):
            r.deleted(artifact_id)
        with self._index_lock:
            self._index.pop(artifact_id, None)

    # -- writing ------------------------------------------------------------------------------------
    def save(self, kind: str, tensors: dict[str, torch.Tensor], *, model: str, name: str = "",
             iteration: int = 0, metadata: dict | None = None,
             tenant: str = DEFAULT_TENANT, reservation: Reservation | None = None) -> ArtifactInfo:
        """Check the quotas, then write atomically and durably; a failure leaves nothing behind.
        Under ``reservation`` (the job's own), the bytes are drawn from its hold first."""
        if kind not in KINDS:
            raise ValueError(f"unknown artifact kind {kind!r}")
        info = ArtifactInfo(id=f"{kind}-{uuid.uuid4().hex}", kind=kind, model=model, name=name,
                            iteration=iteration, created=time.time(), metadata=dict(metadata or {}),
                            tenant=tenant)
        described = len(json.dumps(asdict(info)))
        if len(name) > MAX_NAME or described > MAX_METADATA_BYTES:
            raise InvalidArgument(f"an artifact's name is at most {MAX_NAME} characters and its "
                                  f"description at most {MAX_METADATA_BYTES // 1024} KiB")
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        # the description is in the file and beside it: counted twice
        needed = sum(t.numel() * t.element_size() for t in tensors.values()) + _HEADER_BYTES + 2 * described
        own = reservation if reservation is not None and not reservation.released else None
        hold = self._hold(tenant, needed - (own.held if own is not None else 0))
        data_key, description_key = f"{info.id}{DATA}", f"{info.id}{DESCRIPTION}"
        spooled = self.blobs.spool(data_key)
        try:
            info.size, info.sha256 = write_safetensors(
                spooled, tensors, {"adjointdpm": json.dumps(asdict(info))})
            self.blobs.publish(spooled, data_key)
            # the description last: an artifact exists, and is listed, only when whole
            version = self.blobs.put_bytes(description_key, json.dumps(asdict(info)).encode())
        except Exception as err:  # noqa: BLE001 — nothing of it stays
            self.blobs.discard(spooled)
            for key in (description_key, data_key):
                try:
                    self.blobs.delete(key)
                except OSError:
                    pass  # the sweep takes it
            failure = _os_error(err)
            if failure is None:
                raise
            raise _write_failed(failure) from err
        finally:
            if hold is not None:
                self.cluster.drop(hold)
        with self._index_lock:
            self._index[info.id] = (version, info)
        if own is not None:
            own.wrote(info.id, info.size)
        return info

    def delete(self, artifact_id: str, tenant: str | None = None) -> None:
        self.info(artifact_id, tenant)
        self._remove(artifact_id)

    def _remove(self, artifact_id: str) -> None:
        """The description first (the artifact is gone for every reader at once), then the data."""
        try:
            self.blobs.delete(f"{artifact_id}{DESCRIPTION}")
            self.blobs.delete(f"{artifact_id}{DATA}")
        except OSError as err:
            raise _write_failed(err) from err
        self._forget(artifact_id)

    # -- reading ------------------------------------------------------------------------------------
    def _check_id(self, artifact_id: str) -> None:
        if not isinstance(artifact_id, str) or not _ID.fullmatch(artifact_id):
            raise InvalidArgument("not an artifact id (expected <kind>-<32 hex>)")

    def info(self, artifact_id: str, tenant: str | None = None) -> ArtifactInfo:
        """The description; NOT_FOUND when missing or (``tenant`` given) another tenant's."""
        self._check_id(artifact_id)
        try:
            info = ArtifactInfo.from_dict(json.loads(self.blobs.read_bytes(f"{artifact_id}{DESCRIPTION}")))
        except (ValueError, TypeError) as err:  # a damaged description
            raise _missing(artifact_id) from err
        except OSError as err:  # expired or deleted meanwhile, or the store is down
            raise _read_failed(artifact_id, err) from err
        if tenant is not None and info.tenant != tenant:
            raise _missing(artifact_id)  # indistinguishable from a missing one
        return info

    @contextmanager
    def open(self, artifact_id: str, tenant: str | None = None) -> Iterator[tuple[ArtifactInfo, BinaryIO]]:
        """(description, a stream of the data) — read in chunks, never whole; the reader checks
        the sha256 as it goes (``Verifier``)."""
        info = self.info(artifact_id, tenant)
        try:
            stream = self.blobs.open(f"{artifact_id}{DATA}")
        except OSError as err:
            raise _read_failed(artifact_id, err) from err
        try:
            yield info, stream
        finally:
            stream.close()

    @contextmanager
    def fetch(self, artifact_id: str, tenant: str | None = None) -> Iterator[tuple[ArtifactInfo, Path]]:
        """(description, a local file of the data, checked against its sha256)."""
        info = self.info(artifact_id, tenant)
        try:
            with self.blobs.fetch(f"{artifact_id}{DATA}") as path:
                if info.sha256:
                    with open(path, "rb") as f:
                        if sha256_of(f) != info.sha256:
                            raise DataLoss(f"artifact {artifact_id} is damaged: its bytes do not "
                                           "match the sha256 recorded when it was written")
                yield info, path
        except OSError as err:
            raise _read_failed(artifact_id, err) from err

    def load(self, artifact_id: str, device="cpu",
             tenant: str | None = None) -> tuple[dict[str, torch.Tensor], ArtifactInfo]:
        from safetensors.torch import load_file

        with self.fetch(artifact_id, tenant) as (info, path):
            return load_file(str(path), device=str(device)), info

    def expire(self, retention_s: float) -> list[str]:
        """Delete artifacts older than ``retention_s`` seconds (0 = keep all); returns their ids."""
        if not retention_s or retention_s <= 0:
            return []
        cutoff, gone = time.time() - retention_s, []
        for info in self.list():
            if info.created < cutoff:
                self._remove(info.id)
                gone.append(info.id)
        return gone

    def list(self, kind: str | None = None, model: str | None = None,
             tenant: str | None = None) -> list[ArtifactInfo]:
        """Every whole artifact (its data and description both there), from one listing of the
        store: a description is read only when it is new or changed since the last listing."""
        try:
            entries = self.blobs.entries()
        except OSError as err:
            raise Unavailable(f"the artifact store cannot be listed now ({err.strerror or err}); retry") from err
        keys = {e.key for e in entries}
        current: dict[str, tuple[str, ArtifactInfo]] = {}
        with self._index_lock:
            known = dict(self._index)
        for entry in entries:
            stem, _, suffix = entry.key.partition(".")
            if f".{suffix}" != DESCRIPTION or not _ID.fullmatch(stem) or f"{stem}{DATA}" not in keys:
                continue
            cached = known.get(stem)
            if cached is not None and cached[0] == entry.version:
                current[stem] = cached
                continue
            try:
                info = ArtifactInfo.from_dict(json.loads(self.blobs.read_bytes(entry.key)))
            except (OSError, ValueError, TypeError):
                continue  # deleted meanwhile, or damaged
            current[stem] = (entry.version, info)
        with self._index_lock:
            self._index = current
        found = [info for _, info in current.values()
                 if (kind is None or info.kind == kind) and (model is None or info.model == model)
                 and (tenant is None or info.tenant == tenant)]
        return sorted(found, key=lambda i: (i.created, i.id))

    def scoped(self, tenant: str | None) -> "ScopedArtifacts":
        return ScopedArtifacts(self, tenant)

    def close(self) -> None:
        self.blobs.close()


class ScopedArtifacts:
    """The store as one tenant sees it (``tenant=None``: shared, everything visible). New
    artifacts belong to the tenant (``default`` when shared)."""

    def __init__(self, store: ArtifactStore, tenant: str | None):
        self.store, self.tenant = store, tenant
        self.reservation: Reservation | None = None  # this job's, while it holds one

    def save(self, kind: str, tensors: dict[str, torch.Tensor], **kw) -> ArtifactInfo:
        return self.store.save(kind, tensors, tenant=self.tenant or DEFAULT_TENANT,
                               reservation=self.reservation, **kw)

    def info(self, artifact_id: str) -> ArtifactInfo:
        return self.store.info(artifact_id, self.tenant)

    def open(self, artifact_id: str):
        return self.store.open(artifact_id, self.tenant)

    def fetch(self, artifact_id: str):
        return self.store.fetch(artifact_id, self.tenant)

    def load(self, artifact_id: str, device="cpu"):
        return self.store.load(artifact_id, device, self.tenant)

    def delete(self, artifact_id: str) -> None:
        self.store.delete(artifact_id, self.tenant)

    def check_room(self, needed: int) -> None:
        self.store.check_room(needed, self.tenant or DEFAULT_TENANT)

    @contextmanager
    def reserve(self, needed: int):
        """Hold ``needed`` bytes for this view's job until the block ends (however it ends);
        what the job saves through this view meanwhile draws on them."""
        reservation = self.store.reserve(needed, self.tenant or DEFAULT_TENANT)
        self.reservation = reservation
        try:
            yield reservation
        finally:
            self.reservation = None
            reservation.release()

    def list(self, kind: str | None = None, model: str | None = None) -> list[ArtifactInfo]:
        return self.store.list(kind, model, self.tenant)
