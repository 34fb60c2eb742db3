"""The artifact store's contract, held on both backends: a local directory and an S3 bucket on
moto's real S3 protocol server (loopback HTTP, no mocked client).

Round trips exact for every dtype, the file safetensors' own reader takes, atomic publish under
concurrent readers (a multipart upload included), the sha256 checked on load, deletion, what
the start-up sweep removes and what it must leave, and listing that reads a description once.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time

import pytest
import torch

from adjointdpm_server.cluster import LocalCoordination
from adjointdpm_server.errors import DataLoss, InvalidArgument, NotFound
from adjointdpm_server.storage import _s3
from adjointdpm_server.storage._blobs import LocalBlobs
from adjointdpm_server.storage.artifacts import ArtifactStore, open_blobs

BACKENDS = ("local", "s3")


@pytest.fixture(params=BACKENDS)
def location(request, tmp_path):
    """Where a store lives: a directory, or ``s3://bucket/prefix`` of a fresh bucket."""
    if request.param == "local":
        return str(tmp_path / "artifacts")
    return request.getfixturevalue("s3_store")


def _store(location, replica="replica-a", lease_s=60.0, **kw) -> ArtifactStore:
    return ArtifactStore(location, cluster=LocalCoordination(replica, lease_s), **kw)


def _raw(store: ArtifactStore, key: str) -> bytes:
    return store.blobs.read_bytes(key)


def _overwrite(store: ArtifactStore, key: str, data: bytes) -> None:
    """Change a blob behind the store's back (a damaged disk, a meddling operator)."""
    spooled = store.blobs.spool(key)
    spooled.write_bytes(data)
    store.blobs.publish(spooled, key)


TENSORS = {
    "f32": torch.randn(3, 5, generator=torch.Generator().manual_seed(0)),
    "f64": torch.randn(7, dtype=torch.float64, generator=torch.Generator().manual_seed(1)),
    "f16": torch.randn(2, 2, generator=torch.Generator().manual_seed(2)).half(),
    "bf16": torch.randn(4, generator=torch.Generator().manual_seed(3)).bfloat16(),
    "i64": torch.arange(-3, 9),
    "u8": torch.arange(200, 256, dtype=torch.uint8),
    "flag": torch.tensor([True, False, True]),
    "scalar": torch.tensor(2.5),
    "empty": torch.zeros(0, 4),
    "strided": torch.arange(12.0).reshape(3, 4).t(),  # not contiguous
}


def test_a_round_trip_is_exact_for_every_dtype_and_safetensors_reads_the_file(location):
    from safetensors import safe_open
    from safetensors.torch import load

    store = _store(location)
    info = store.save("lora", TENSORS, model="digits", name="all dtypes", metadata={"rank": 4})
    loaded, again = store.load(info.id)
    assert set(loaded) == set(TENSORS)
    for name, tensor in TENSORS.items():
        assert loaded[name].dtype == tensor.dtype and loaded[name].shape == tensor.shape
        assert torch.equal(loaded[name], tensor), name
    data = _raw(store, f"{info.id}.safetensors")
    assert again == info and info.size == len(data)
    assert info.sha256 == hashlib.sha256(data).hexdigest()
    by_library = load(data)  # safetensors' own parser takes our writer's bytes
    assert all(torch.equal(by_library[k], TENSORS[k]) for k in TENSORS)
    with store.fetch(info.id) as (_, path), safe_open(str(path), "pt") as f:
        embedded = json.loads(f.metadata()["adjointdpm"])
    assert embedded["id"] == info.id and embedded["metadata"] == {"rank": 4}
    description = json.loads(_raw(store, f"{info.id}.json"))
    assert description["sha256"] == info.sha256 and description["tenant"] == "default"


def test_damaged_bytes_are_data_loss_not_wrong_weights(location):
    store = _store(location)
    info = store.save("embedding", {"cond": torch.ones(16)}, model="digits")
    data = bytearray(_raw(store, f"{info.id}.safetensors"))
    data[-1] ^= 0x01  # one flipped bit in the last weight
    _overwrite(store, f"{info.id}.safetensors", bytes(data))
    with pytest.raises(DataLoss, match="sha256"):
        store.load(info.id)


def test_delete_removes_the_description_first_and_frees_the_listing(location):
    store = _store(location)
    keep = store.save("lora", {"w": torch.ones(2)}, model="digits")
    gone = store.save("lora", {"w": torch.zeros(2)}, model="digits", tenant="alice")
    with pytest.raises(NotFound):
        store.delete(gone.id, tenant="bob")  # another tenant's: as if missing
    store.delete(gone.id, tenant="alice")
    with pytest.raises(NotFound):
        store.info(gone.id)
    assert [i.id for i in store.list()] == [keep.id]
    assert not store.blobs.exists(f"{gone.id}.safetensors") and not store.blobs.exists(f"{gone.id}.json")
    with pytest.raises(InvalidArgument):
        store.info("../../etc/passwd")


def test_readers_never_see_a_partial_artifact(location, monkeypatch):
    """While one thread publishes artifacts (12 MiB each: a multipart upload in 5 MiB parts on
    S3), another lists and loads whatever is listed: every listed artifact loads whole."""
    monkeypatch.setattr(_s3, "PART_BYTES", 5 * 2**20)  # S3's smallest part: 3 parts per save
    writer, reader = _store(location), _store(location, replica="replica-b")
    big = torch.arange(3 * 2**20, dtype=torch.float32)
    done, seen, failures = threading.Event(), set(), []

    def read():
        while not done.is_set() or len(seen) < 3:
            for info in reader.list():
                try:
                    tensors, _ = reader.load(info.id)
                    assert torch.equal(tensors["w"], big + info.iteration)
                    seen.add(info.id)
                except Exception as err:  # noqa: BLE001 — collected, asserted below
                    failures.append(repr(err))
            if done.is_set() and len(seen) >= 3:
                return

    thread = threading.Thread(target=read)
    thread.start()
    for k in range(3):
        writer.save("full", {"w": big + k}, model="digits", iteration=k)
    done.set()
    thread.join(120)
    assert not failures and len(seen) == 3


def test_listing_reads_each_description_once(tmp_path):
    """A save lists the store for its quota check: descriptions already seen (same version)
    are not read again, a changed one is."""
    reads = []

    class Counting(LocalBlobs):
        def read_bytes(self, key):
            reads.append(key)
            return super().read_bytes(key)

    store = ArtifactStore(Counting(tmp_path, "replica-a"), tenant_quota_bytes=2**30)
    saved = [store.save("lora", {"w": torch.ones(4) * k}, model="digits") for k in range(6)]
    reads.clear()
    assert [i.id for i in store.list()] == [i.id for i in saved]
    assert len(reads) == 0  # every description known since the saves' own listings...
    other = ArtifactStore(tmp_path, cluster=LocalCoordination("replica-b"))
    newcomer = other.save("lora", {"w": torch.zeros(4)}, model="digits")
    store.list()
    assert reads == [f"{newcomer.id}.json"]  # ...but another replica's new one is read once
    reads.clear()
    description = json.loads((tmp_path / f"{saved[0].id}.json").read_text())
    description["name"] = "renamed"
    time.sleep(0.01)
    (tmp_path / f"{saved[0].id}.json").write_text(json.dumps(description))
    assert [i.name for i in store.list() if i.id == saved[0].id] == ["renamed"]
    assert reads == [f"{saved[0].id}.json"]


def test_the_sweep_aborts_only_stale_multipart_uploads(s3_store):
    """An upload with a part sent within the lease may be another replica's save in flight."""
    store = _store(s3_store)
    bucket, prefix = store.blobs.bucket, store.blobs.prefix
    client = store.blobs.client
    key = f"{prefix}lora-{'f' * 32}.safetensors"
    upload = client.create_multipart_upload(Bucket=bucket, Key=key)
    client.upload_part(Bucket=bucket, Key=key, UploadId=upload["UploadId"], PartNumber=1, Body=b"x" * 64)
    assert _store(s3_store, replica="replica-b", lease_s=60).removed_orphans == []  # may be live
    assert len(client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])) == 1
    time.sleep(1.1)
    assert _store(s3_store, replica="replica-c", lease_s=1).removed_orphans == [f"lora-{'f' * 32}.safetensors"]
    assert client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


def test_an_unusable_bucket_is_refused_at_start(s3_server, monkeypatch):
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValueError, match="bucket 'no-such-bucket'"):
        open_blobs("s3://no-such-bucket/x")


def test_half_an_artifact_is_swept_only_once_its_writer_must_be_dead(location):
    """Data without its description (a save between its two publishes, or a writer that died
    there) and a description without data are left alone while they are younger than the
    lease, and removed once older."""
    first = _store(location)
    whole = first.save("lora", {"w": torch.ones(2)}, model="digits")
    first.blobs.put_bytes(f"lora-{'1' * 32}.safetensors", b"data, no description")
    first.blobs.put_bytes(f"lora-{'2' * 32}.json", b"{}")
    assert _store(location, replica="replica-b", lease_s=60).removed_orphans == []
    time.sleep(1.1)
    swept = _store(location, replica="replica-c", lease_s=1).removed_orphans
    assert sorted(swept) == [f"lora-{'1' * 32}.safetensors", f"lora-{'2' * 32}.json"]
    assert [i.id for i in first.list()] == [whole.id]
