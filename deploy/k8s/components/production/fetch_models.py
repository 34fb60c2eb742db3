"""The weights cache: copy model directories from an S3-compatible bucket to local disk.

    python fetch_models.py s3://BUCKET/models/sd-1.5/v1=/models/sd-1.5 [SOURCE=TARGET ...]

Runs as the server pod's init container (deploy/k8s/components/production), with the server's
image and the server's credential chain (boto3: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_REGION, AWS_ENDPOINT_URL_S3 for MinIO / Ceph / GCS). Every object under SOURCE/ lands at
TARGET/<the rest of its key>. Each file is written under a temporary name, its size checked and
then renamed; a marker (TARGET/.adjointdpm-fetched.json, written last) records the source and each
object's size and ETag, so a second run against an unchanged source copies nothing (the pod's
emptyDir outlives a restarted sandbox) and a changed source is copied afresh.

Exit status: 0 copied or already there, 2 bad arguments or an empty/unsafe source, 1 any other
failure (the kubelet retries the init container). The caller bounds the time (`timeout 900 ...`).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

MARKER = ".adjointdpm-fetched.json"
PART_BYTES = 64 * 2**20   # multipart ranges: a 3.4 GB UNet comes down in ~50 parallel parts
FILES_AT_ONCE = 4
PARTS_AT_ONCE = 8         # per file


class FetchError(Exception):
    """A source that cannot be cached: nothing there, or keys that would escape the target."""


def _client():
    import boto3
    from botocore.config import Config

    custom = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    config = Config(retries={"mode": "standard", "max_attempts": 8},
                    s3={"addressing_style": "path" if custom else "auto"},
                    max_pool_connections=FILES_AT_ONCE * PARTS_AT_ONCE + 4)
    return boto3.session.Session().client("s3", config=config)


def parse_pair(text: str) -> tuple[str, str, Path]:
    """'s3://bucket/prefix=/target' -> (bucket, 'prefix/', Path('/target'))."""
    source, sep, target = text.rpartition("=")
    parsed = urlparse(source)
    if not sep or parsed.scheme != "s3" or not parsed.netloc or not target.startswith("/"):
        raise FetchError(f"expected s3://BUCKET/PREFIX=/ABSOLUTE/TARGET, got {text!r}")
    prefix = parsed.path.strip("/")
    return parsed.netloc, f"{prefix}/" if prefix else "", Path(target)


def listing(client, bucket: str, prefix: str) -> list[dict]:
    """The objects under prefix as [{'key', 'rel', 'size', 'etag'}], sorted by key."""
    objects = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            key = obj["Key"]
            if key.endswith("/"):                      # a "folder" placeholder
                continue
            rel = PurePosixPath(key[len(prefix):])
            if rel.is_absolute() or ".." in rel.parts or not rel.parts or rel.name == MARKER:
                raise FetchError(f"s3://{bucket}/{key}: unsafe key for a local copy")
            objects.append({"key": key, "rel": str(rel), "size": int(obj["Size"]),
                            "etag": str(obj.get("ETag", "")).strip('"')})
    if not objects:
        raise FetchError(f"s3://{bucket}/{prefix}: no objects (wrong bucket or prefix?)")
    return sorted(objects, key=lambda o: o["key"])


def fetch(client, bucket: str, prefix: str, target: Path, log=print) -> int:
    """Copy s3://bucket/prefix to target unless the marker says it is there; bytes copied."""
    from boto3.s3.transfer import TransferConfig

    objects = listing(client, bucket, prefix)
    want = {"source": f"s3://{bucket}/{prefix}", "objects": objects}
    marker = target / MARKER
    try:
        if json.loads(marker.read_text()) == want:
            log(f"{want['source']} -> {target}: cached ({len(objects)} files), nothing to copy")
            return 0
    except (OSError, ValueError):
        pass
    # a different version or an unfinished copy: start clean
    target.mkdir(parents=True, exist_ok=True)
    for child in target.iterdir():              # (target may be a mount point: keep it)
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
    transfer = TransferConfig(multipart_threshold=PART_BYTES, multipart_chunksize=PART_BYTES,
                              max_concurrency=PARTS_AT_ONCE, use_threads=True)

    def one(obj: dict) -> int:
        path = target / obj["rel"]
        path.parent.mkdir(parents=True, exist_ok=True)
        part = path.with_name(path.name + ".part")
        client.download_file(bucket, obj["key"], str(part), Config=transfer)
        got = part.stat().st_size
        if got != obj["size"]:
            raise OSError(f"s3://{bucket}/{obj['key']}: {got} bytes, expected {obj['size']}")
        part.rename(path)
        return got

    start = time.monotonic()
    with ThreadPoolExecutor(FILES_AT_ONCE) as pool:
        copied = sum(pool.map(one, objects))
    seconds = max(time.monotonic() - start, 1e-6)
    marker.write_text(json.dumps(want))
    log(f"{want['source']} -> {target}: {len(objects)} files, {copied / 1e9:.2f} GB in "
        f"{seconds:.0f} s ({copied / 1e6 / seconds:.0f} MB/s)")
    return copied


def main(argv: list[str] | None = None, client=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print("usage: fetch_models.py s3://BUCKET/PREFIX=/TARGET [...]", file=sys.stderr)
        return 2
    try:
        pairs = [parse_pair(a) for a in argv]
        client = client or _client()
        for bucket, prefix, target in pairs:
            fetch(client, bucket, prefix, target)
    except FetchError as err:
        print(f"fetch_models: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001 — one line for `kubectl logs`, then the kubelet retries
        print(f"fetch_models: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
