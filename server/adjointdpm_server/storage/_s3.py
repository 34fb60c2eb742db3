"""Artifact bytes in an S3-compatible bucket (AWS S3, MinIO, Ceph RGW, GCS's S3 interface).

boto3 (with s3transfer) is the client: the reference implementation of the protocol, with the
standard credential chain and environment (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_REGION``, ``AWS_ENDPOINT_URL_S3`` for a non-AWS endpoint), retries, and multipart transfers
streamed from and to files. obstore would be faster but is younger and less common in the
clusters this runs in; s3fs adds an fsspec layer we do not need.

Atomic publish comes from S3 itself: a PUT, or a multipart upload's completion, makes the whole
object visible at once (and S3 reads are strongly consistent since 2020). What a dead writer
leaves is an unfinished multipart upload, aborted by age (``sweep_temporaries``); S3 cannot
tell whose it was.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator
from urllib.parse import urlparse

from ._blobs import Blobs, BlobEntry

__all__ = ["S3Blobs"]

PART_BYTES = 64 * 2**20  # multipart chunks: an SD checkpoint streams through a few at a time
_FULL = {"QuotaExceeded", "XMinioStorageFull", "EntityTooLarge", "InsufficientStorage"}
_MISSING = {"NoSuchKey", "404", "NotFound"}


def _error(err: Exception, key: str) -> OSError:
    """A boto error as the OSError the artifact store names for users."""
    from botocore.exceptions import ClientError

    if isinstance(err, ClientError):
        code = str(err.response.get("Error", {}).get("Code", ""))
        if code in _MISSING:
            return FileNotFoundError(errno.ENOENT, "no such object", key)
        if code in _FULL:
            return OSError(errno.ENOSPC, f"the object store is full ({code})")
        return OSError(errno.EIO, f"the object store refused ({code})")
    return OSError(errno.EIO, f"the object store is unreachable ({type(err).__name__})")


class S3Blobs(Blobs):
    """``s3://bucket/prefix``: each blob is the object ``prefix/key``."""

    def __init__(self, url: str, spool_dir: str | Path | None = None):
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        parsed = urlparse(url)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise ValueError(f"not an s3://bucket/prefix address: {url!r}")
        self.url, self.bucket = url, parsed.netloc
        prefix = parsed.path.strip("/")
        self.prefix = f"{prefix}/" if prefix else ""
        # path-style addressing when an endpoint is given (MinIO, Ceph, a loopback server):
        # virtual-hosted names need DNS the operator may not have
        custom = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        config = Config(retries={"mode": "standard", "max_attempts": 5},
                        s3={"addressing_style": "path" if custom else "auto"})
        self.client = boto3.session.Session().client("s3", config=config)
        self.transfer = TransferConfig(multipart_threshold=PART_BYTES, multipart_chunksize=PART_BYTES,
                                       max_concurrency=4, use_threads=True)
        self._spool = Path(tempfile.mkdtemp(prefix="adjointdpm-spool-", dir=spool_dir))
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except Exception as err:  # noqa: BLE001 — said at start, not at the first save
            shutil.rmtree(self._spool, ignore_errors=True)
            raise ValueError(f"cannot use the artifact store {url}: bucket {self.bucket!r} "
                             f"({_error(err, self.bucket).strerror}); check it exists and the "
                             "AWS_* credentials and endpoint") from err

    def _key(self, key: str) -> str:
        return self.prefix + key

    def spool(self, key: str) -> Path:
        return self._spool / f"{uuid.uuid4().hex}-{key}"

    def publish(self, spooled: Path, key: str) -> None:
        try:
            self.client.upload_file(str(spooled), self.bucket, self._key(key), Config=self.transfer)
        except Exception as err:  # noqa: BLE001
            raise _error(err, key) from err
        finally:
            spooled.unlink(missing_ok=True)

    def discard(self, spooled: Path) -> None:
        spooled.unlink(missing_ok=True)

    def put_bytes(self, key: str, data: bytes) -> str:
        try:
            return str(self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)["ETag"])
        except Exception as err:  # noqa: BLE001
            raise _error(err, key) from err

    def read_bytes(self, key: str) -> bytes:
        stream = self.open(key)
        try:
            return stream.read()
        finally:
            stream.close()

    def open(self, key: str) -> BinaryIO:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
        except Exception as err:  # noqa: BLE001
            raise _error(err, key) from err

    @contextmanager
    def fetch(self, key: str) -> Iterator[Path]:
        local = self.spool(key)
        try:
            try:
                self.client.download_file(self.bucket, self._key(key), str(local), Config=self.transfer)
            except Exception as err:  # noqa: BLE001
                raise _error(err, key) from err
            yield local
        finally:
            local.unlink(missing_ok=True)

    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except Exception as err:  # noqa: BLE001
            failure = _error(err, key)
            if isinstance(failure, FileNotFoundError):
                return False
            raise failure from err

    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))
        except Exception as err:  # noqa: BLE001
            raise _error(err, key) from err

    def entries(self) -> list[BlobEntry]:
        found = []
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket,
                                                                          Prefix=self.prefix)
            for page in pages:
                for obj in page.get("Contents", ()):
                    key = obj["Key"][len(self.prefix):]
                    if key and "/" not in key:
                        found.append(BlobEntry(key, int(obj["Size"]), str(obj.get("ETag", "")),
                                               obj["LastModified"].timestamp()))
        except Exception as err:  # noqa: BLE001
            raise _error(err, self.prefix) from err
        return found

    def sweep_temporaries(self, replica: str, older_than_s: float) -> list[str]:
        """Unfinished multipart uploads untouched for ``older_than_s`` — begun that long ago and
        no part since — are aborted (S3 keeps their parts, and bills them, until then; a bucket
        lifecycle rule AbortIncompleteMultipartUpload is the operator's backstop). S3 cannot say
        whose an upload is. This replica's spool files of an earlier life were in that life's
        temporary directory."""
        cutoff, gone = time.time() - older_than_s, []
        try:
            pages = self.client.get_paginator("list_multipart_uploads").paginate(
                Bucket=self.bucket, Prefix=self.prefix)
            for page in pages:
                for upload in page.get("Uploads", ()):
                    key, upload_id = upload["Key"], upload["UploadId"]
                    if upload["Initiated"].timestamp() >= cutoff:
                        continue
                    parts = self.client.list_parts(Bucket=self.bucket, Key=key,
                                                   UploadId=upload_id).get("Parts", ())
                    if any(p["LastModified"].timestamp() >= cutoff for p in parts):
                        continue  # a writer is still sending parts
                    self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
                    gone.append(key[len(self.prefix):])
        except Exception as err:  # noqa: BLE001
            raise _error(err, self.prefix) from err
        return gone

    def close(self) -> None:
        shutil.rmtree(self._spool, ignore_errors=True)
