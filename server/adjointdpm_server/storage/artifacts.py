"""Artifacts: adapters, embeddings, weight gradients and checkpoints as safetensors files.

Each artifact is ``<root>/<id>.safetensors`` with its description in the file's metadata and in a
``<id>.json`` beside it (for listing without opening the tensors). IDs are ``<kind>-<32 hex>``:
anything else is refused before it can name a path.

Every artifact belongs to the tenant that made it; a view scoped to a tenant (``scoped``) finds
only that tenant's artifacts, and another tenant's is NOT_FOUND exactly like a missing one.
Writes are checked against the storage quotas before a byte is written, are fsync'd and atomic
(temporary file, then rename), and a full or read-only disk is a plain RESOURCE_EXHAUSTED or
UNAVAILABLE that leaves every earlier artifact intact. Orphans of a crash are removed at start.
"""

from __future__ import annotations

import errno
import json
import os
import re
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from ..errors import InvalidArgument, NotFound, ResourceExhausted, Unavailable

__all__ = ["ArtifactInfo", "ArtifactStore", "ScopedArtifacts", "Reservation", "KINDS",
           "DEFAULT_TENANT", "HEADER_BYTES"]

KINDS = ("lora", "full", "embedding", "weight_gradients", "checkpoint")
_ID = re.compile(r"(%s)-[0-9a-f]{32}" % "|".join(KINDS))
DEFAULT_TENANT = "default"
_HEADER_BYTES = 64 * 1024  # safetensors header and metadata, generously
HEADER_BYTES = _HEADER_BYTES
MAX_NAME = 256
MAX_METADATA_BYTES = 256 * 1024  # a fine-tune's loss history fits many times over


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

    @classmethod
    def from_dict(cls, data: dict) -> "ArtifactInfo":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def _missing(artifact_id: str) -> NotFound:
    return NotFound(f"no artifact {artifact_id} on this server")


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_failed(err: OSError) -> Exception:
    name = errno.errorcode.get(err.errno or 0, "an I/O error")
    if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return ResourceExhausted(f"the server's artifact storage is full ({name}); nothing was "
                                 "written and earlier artifacts are intact")
    return Unavailable(f"the server cannot write artifacts now ({name}); earlier artifacts are intact")


class Reservation:
    """Bytes a running job holds for artifacts it has yet to write (a fine-tune's checkpoints
    and adapter), counted against the quotas from its admission to its end. What the job writes
    through it draws on it: the hold is what is reserved less what the job's artifacts take."""

    def __init__(self, store: "ArtifactStore", tenant: str, nbytes: int):
        self.store, self.tenant, self.bytes = store, tenant, int(nbytes)
        self.written: dict[str, int] = {}  # this job's artifacts still on disk: id → size

    @property
    def held(self) -> int:
        return max(0, self.bytes - sum(self.written.values()))

    def release(self) -> None:
        self.store._release(self)

    def __enter__(self) -> "Reservation":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class ArtifactStore:
    """``tenant_quota_bytes`` bounds each tenant's artifacts, ``quota_bytes`` all of them;
    ``retention_s`` (what the server's janitor applies; 0 = forever) is only told to users."""

    def __init__(self, root: str | Path, *, quota_bytes: int | None = None,
                 tenant_quota_bytes: int | None = None, retention_s: float | None = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.quota_bytes, self.tenant_quota_bytes = quota_bytes, tenant_quota_bytes
        self.retention_s = retention_s
        self._lock = threading.Lock()
        self._reservations: list[Reservation] = []
        self.removed_orphans = self._sweep()

    def _sweep(self) -> list[str]:
        """Remove what a crash can leave: temporary files, data without its description and
        descriptions without their data."""
        gone = []
        for path in self.root.iterdir():
            stem = path.name.split(".", 1)[0]
            if path.name.endswith(".tmp"):
                orphan = True
            elif path.suffix == ".safetensors":
                orphan = not (self.root / f"{stem}.json").exists()
            elif path.suffix == ".json":
                orphan = not (self.root / f"{stem}.safetensors").exists()
            else:
                continue
            if orphan and _ID.fullmatch(stem):
                path.unlink(missing_ok=True)
                gone.append(path.name)
        return gone

    # -- usage and quotas ---------------------------------------------------------------------------
    def usage(self, tenant: str | None = None) -> int:
        """Bytes of artifacts (of ``tenant``, or of everyone)."""
        return sum(i.size for i in self.list(tenant=tenant))

    def reserved(self, tenant: str | None = None) -> int:
        """Bytes held by running jobs' reservations (of ``tenant``, or of everyone)."""
        return sum(r.held for r in tuple(self._reservations) if tenant is None or r.tenant == tenant)

    def _advice(self) -> str:
        """What a user can do about a full quota."""
        if self.retention_s:
            expiry = f"wait for older artifacts to expire (after {self.retention_s / 3600:g} h)"
        else:
            expiry = "artifacts are kept until deleted"
        return (f"delete artifacts you no longer need (DeleteArtifact), {expiry}, keep fewer "
                f"checkpoints (keep_checkpoints), or ask the operator for more")

    def _check_quota(self, tenant: str, needed: int, reservation: Reservation | None = None) -> None:
        """``needed`` more bytes fit beside what is stored and what running jobs have reserved
        (a write under ``reservation`` first draws on its own hold)."""
        extra = needed if reservation is None else max(0, needed - reservation.held)
        if self.tenant_quota_bytes is not None:
            reserved = self.reserved(tenant)
            used = self.usage(tenant) + reserved
            if used + extra > self.tenant_quota_bytes:
                held = (f" ({reserved / 2**20:.1f} MiB of it reserved by running fine-tunes)"
                        if reserved else "")
                raise ResourceExhausted(
                    f"tenant storage quota: {used / 2**20:.1f} MiB used of "
                    f"{self.tenant_quota_bytes / 2**20:.1f} MiB{held}; this artifact needs "
                    f"{needed / 2**20:.1f} MiB: {self._advice()}")
        if self.quota_bytes is not None:
            used = self.usage() + self.reserved()
            if used + extra > self.quota_bytes:
                raise ResourceExhausted(  # other tenants' usage is not ours to tell
                    f"the server's artifact storage quota is reached; this artifact needs "
                    f"{needed / 2**20:.1f} MiB: retry later or ask the operator")

    def check_room(self, needed: int, tenant: str = DEFAULT_TENANT) -> None:
        """RESOURCE_EXHAUSTED now when ``needed`` more bytes would exceed a storage quota."""
        with self._lock:
            self._check_quota(tenant, needed)

    def reserve(self, needed: int, tenant: str = DEFAULT_TENANT) -> Reservation:
        """Hold ``needed`` bytes against the quotas until the reservation is released (use it as
        a context manager); RESOURCE_EXHAUSTED now when they do not fit beside what is stored and
        reserved. Without a quota nothing is refused, and the hold is only bookkeeping."""
        with self._lock:
            self._check_quota(tenant, needed)
            reservation = Reservation(self, tenant, needed)
            self._reservations.append(reservation)
        return reservation

    def _release(self, reservation: Reservation) -> None:
        with self._lock:
            if reservation in self._reservations:
                self._reservations.remove(reservation)

    def _forget(self, artifact_id: str) -> None:
        for r in self._reservations:
            r.written.pop(artifact_id, None)

    # -- writing ------------------------------------------------------------------------------------
    def save(self, kind: str, tensors: dict[str, torch.Tensor], *, model: str, name: str = "",
             iteration: int = 0, metadata: dict | None = None,
             tenant: str = DEFAULT_TENANT, reservation: Reservation | None = None) -> ArtifactInfo:
        """Check the quotas, then write atomically and durably; a failure leaves nothing behind.
        Under ``reservation`` (the job's own), the bytes are drawn from its hold first."""
        from safetensors.torch import save

        if kind not in KINDS:
            raise ValueError(f"unknown artifact kind {kind!r}")
        needed = sum(t.numel() * t.element_size() for t in tensors.values()) + _HEADER_BYTES
        info = ArtifactInfo(id=f"{kind}-{uuid.uuid4().hex}", kind=kind, model=model, name=name,
                            iteration=iteration, created=time.time(), metadata=dict(metadata or {}),
                            tenant=tenant)
        path = self.root / f"{info.id}.safetensors"
        sidecar = self.root / f"{info.id}.json"
        tmp, sidecar_tmp = path.with_suffix(".safetensors.tmp"), sidecar.with_suffix(".json.tmp")
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        if len(name) > MAX_NAME or len(json.dumps(info.metadata)) > MAX_METADATA_BYTES:
            raise InvalidArgument(f"an artifact's name is at most {MAX_NAME} characters and its "
                                  f"description at most {MAX_METADATA_BYTES // 1024} KiB")
        with self._lock:  # quota check and write together: two saves cannot both squeeze in
            self._check_quota(tenant, needed, reservation)
            # serialized in memory, written by us: an I/O error is an OSError we can name
            data = save(tensors, metadata={"adjointdpm": json.dumps(asdict(info))})
            info.size = len(data)
            description = json.dumps(asdict(info)).encode()
            self._check_quota(tenant, len(data) + len(description), reservation)  # what is really written
            try:
                _write(tmp, data)
                _write(sidecar_tmp, description)
                os.replace(tmp, path)
                os.replace(sidecar_tmp, sidecar)  # the description last: listed only when whole
                _fsync(self.root)
            except OSError as err:
                for leftover in (tmp, sidecar_tmp, path, sidecar):
                    leftover.unlink(missing_ok=True)
                raise _write_failed(err) from err
            if reservation is not None and reservation in self._reservations:
                reservation.written[info.id] = info.size
        return info

    def delete(self, artifact_id: str, tenant: str | None = None) -> None:
        self.info(artifact_id, tenant)
        with self._lock:
            for suffix in (".json", ".safetensors"):
                (self.root / f"{artifact_id}{suffix}").unlink(missing_ok=True)
            self._forget(artifact_id)

    # -- reading ------------------------------------------------------------------------------------
    def _check_id(self, artifact_id: str) -> None:
        if not isinstance(artifact_id, str) or not _ID.fullmatch(artifact_id):
            raise InvalidArgument("not an artifact id (expected <kind>-<32 hex>)")

    def info(self, artifact_id: str, tenant: str | None = None) -> ArtifactInfo:
        """The description; NOT_FOUND when missing or (``tenant`` given) another tenant's."""
        self._check_id(artifact_id)
        if not (self.root / f"{artifact_id}.safetensors").exists():
            raise _missing(artifact_id)
        try:
            info = ArtifactInfo.from_dict(json.loads((self.root / f"{artifact_id}.json").read_text()))
        except (OSError, ValueError, TypeError) as err:  # expired meanwhile, or a damaged sidecar
            raise _missing(artifact_id) from err
        if tenant is not None and info.tenant != tenant:
            raise _missing(artifact_id)  # indistinguishable from a missing one
        return info

    def path(self, artifact_id: str, tenant: str | None = None) -> Path:
        self.info(artifact_id, tenant)
        return self.root / f"{artifact_id}.safetensors"

    def load(self, artifact_id: str, device="cpu",
             tenant: str | None = None) -> tuple[dict[str, torch.Tensor], ArtifactInfo]:
        from safetensors.torch import load_file

        info = self.info(artifact_id, tenant)
        return load_file(str(self.root / f"{artifact_id}.safetensors"), device=str(device)), info

    def expire(self, retention_s: float) -> list[str]:
        """Delete artifacts older than ``retention_s`` seconds (0 = keep all); returns their ids."""
        if not retention_s or retention_s <= 0:
            return []
        cutoff, gone = time.time() - retention_s, []
        for info in self.list():
            if info.created < cutoff:
                with self._lock:
                    for suffix in (".json", ".safetensors"):
                        (self.root / f"{info.id}{suffix}").unlink(missing_ok=True)
                    self._forget(info.id)
                gone.append(info.id)
        return gone

    def list(self, kind: str | None = None, model: str | None = None,
             tenant: str | None = None) -> list[ArtifactInfo]:
        found = []
        for sidecar in sorted(self.root.glob("*.json")):
            try:
                info = ArtifactInfo.from_dict(json.loads(sidecar.read_text()))
            except (OSError, ValueError, TypeError):
                continue
            if ((kind is None or info.kind == kind) and (model is None or info.model == model)
                    and (tenant is None or info.tenant == tenant)):
                found.append(info)
        return sorted(found, key=lambda i: i.created)

    def scoped(self, tenant: str | None) -> "ScopedArtifacts":
        return ScopedArtifacts(self, tenant)


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

    def path(self, artifact_id: str) -> Path:
        return self.store.path(artifact_id, self.tenant)

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
