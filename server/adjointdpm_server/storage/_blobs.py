"""Where artifact bytes live: a flat namespace of named blobs, written whole or not at all.

``Blobs`` is what the artifact store needs of a backend, and no more: publish a file under a key
atomically (readers see the whole blob or none), read one in chunks, list keys with their size
and a version that changes when the blob does, delete. ``LocalBlobs`` is a directory (the
embedded default); ``S3Blobs`` (``_s3``) an S3-compatible bucket.

Large blobs never sit in memory: a writer fills a local spool file (``spool``), which
``publish`` moves (a rename here, a multipart upload there); a reader gets a stream
(``open``) or a local file (``fetch``, a download there).
"""

from __future__ import annotations

import errno
import os
import re
import time
import uuid
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

__all__ = ["Blobs", "BlobEntry", "LocalBlobs", "replica_tag"]

TMP = ".tmp"


@dataclass(frozen=True)
class BlobEntry:
    key: str
    size: int
    version: str      # changes whenever the blob is rewritten (mtime and size; an ETag)
    modified: float   # seconds since the epoch


def replica_tag(replica: str) -> str:
    """A replica's name as it may appear in a file name."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", replica)[:64] or "replica"


class Blobs(ABC):
    """A flat key → bytes store. Keys are plain names (no ``/``) chosen by the artifact store."""

    url: str  # where it is, for messages and metrics

    @abstractmethod
    def spool(self, key: str) -> Path:
        """A fresh local path to write ``key``'s bytes into before ``publish``."""

    @abstractmethod
    def publish(self, spooled: Path, key: str) -> None:
        """Make the spooled file the blob ``key``, atomically and durably; the spool is gone after."""

    @abstractmethod
    def discard(self, spooled: Path) -> None:
        """Drop a spool file that will not be published."""

    @abstractmethod
    def put_bytes(self, key: str, data: bytes) -> str:
        """A small blob, atomically and durably (the artifact descriptions); its version."""

    @abstractmethod
    def read_bytes(self, key: str) -> bytes:
        """A small blob whole; FileNotFoundError when missing."""

    @abstractmethod
    def open(self, key: str) -> BinaryIO:
        """A stream of the blob (``read(n)``, ``close()``); FileNotFoundError when missing."""

    @abstractmethod
    @contextmanager
    def fetch(self, key: str) -> Iterator[Path]:
        """The blob as a local file for the block's duration (memory-mappable)."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def delete(self, key: str) -> None:
        """Gone (no error when it already was)."""

    @abstractmethod
    def entries(self) -> list[BlobEntry]:
        """Every blob, without reading any."""

    @abstractmethod
    def sweep_temporaries(self, replica: str, older_than_s: float) -> list[str]:
        """Remove unfinished writes: this replica's (a crash of its earlier life), and anyone's
        older than ``older_than_s`` (their writer died: no write takes that long)."""

    def close(self) -> None:
        pass


def _version(st: os.stat_result) -> str:
    return f"{st.st_mtime_ns}:{st.st_size}:{st.st_ino}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalBlobs(Blobs):
    """A directory on a POSIX file system: temporary files named after their replica, fsync'd,
    then renamed into place (atomic on one file system), and the directory fsync'd."""

    def __init__(self, root: str | Path, replica: str = "local"):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.url = str(self.root)
        self._tag = replica_tag(replica)

    def spool(self, key: str) -> Path:
        return self.root / f"{key}.{self._tag}.{uuid.uuid4().hex[:8]}{TMP}"

    def publish(self, spooled: Path, key: str) -> None:
        try:
            with open(spooled, "rb") as f:
                os.fsync(f.fileno())
            os.replace(spooled, self.root / key)
            _fsync_dir(self.root)
        except OSError:
            spooled.unlink(missing_ok=True)
            raise

    def discard(self, spooled: Path) -> None:
        spooled.unlink(missing_ok=True)

    def put_bytes(self, key: str, data: bytes) -> str:
        tmp = self.spool(key)
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except OSError:
            tmp.unlink(missing_ok=True)
            raise
        self.publish(tmp, key)
        return _version(os.stat(self.root / key))

    def read_bytes(self, key: str) -> bytes:
        return (self.root / key).read_bytes()

    def open(self, key: str) -> BinaryIO:
        return open(self.root / key, "rb")

    @contextmanager
    def fetch(self, key: str) -> Iterator[Path]:
        path = self.root / key
        if not path.exists():
            raise FileNotFoundError(errno.ENOENT, "no such blob", key)
        yield path

    def exists(self, key: str) -> bool:
        return (self.root / key).exists()

    def delete(self, key: str) -> None:
        (self.root / key).unlink(missing_ok=True)

    def entries(self) -> list[BlobEntry]:
        found = []
        with os.scandir(self.root) as it:
            for entry in it:
                if entry.name.endswith(TMP) or not entry.is_file():
                    continue
                try:
                    st = entry.stat()
                except FileNotFoundError:  # deleted meanwhile
                    continue
                found.append(BlobEntry(entry.name, st.st_size, _version(st), st.st_mtime))
        return found

    def sweep_temporaries(self, replica: str, older_than_s: float) -> list[str]:
        mine, cutoff, gone = replica_tag(replica), time.time() - older_than_s, []
        for path in self.root.glob(f"*{TMP}"):
            try:
                stale = path.stat().st_mtime < cutoff
            except FileNotFoundError:
                continue
            parts = path.name[:-len(TMP)].rsplit(".", 2)  # <key>.<replica>.<nonce>
            if stale or (len(parts) == 3 and parts[1] == mine):
                path.unlink(missing_ok=True)
                gone.append(path.name)
        return gone
