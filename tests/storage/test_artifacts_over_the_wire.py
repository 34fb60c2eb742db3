"""Artifacts through a real server on either backend: GetArtifact streams what the store holds
(checked against its sha256 as it goes), and a damaged artifact is DATA_LOSS, never wrong
weights — for a download and for a Sample that would load it."""

from __future__ import annotations

import hashlib

import pytest
import torch

import adjointdpm
from adjointdpm_server.config import ServerConfig
from adjointdpm_server.models._adapters import trainable_state, with_lora
from adjointdpm_server.wire import build_server


@pytest.fixture(params=("local", "s3"))
def server(request, tmp_path):
    store = None if request.param == "local" else request.getfixturevalue("s3_store")
    srv = build_server(ServerConfig(models=("digits",), port=0, artifact_dir=tmp_path / "artifacts",
                                    artifact_store=store))
    yield srv
    srv.stop(0)


def _adapter(rt) -> str:
    backend = rt.models["digits"]
    copy = with_lora(backend.eps_fn, 2, None, backend.lora_targets, init_lora_weights=False)
    gen = torch.Generator().manual_seed(0)
    state = {k: torch.randn(v.shape, generator=gen) * 0.1 for k, v in trainable_state(copy).items()}
    return rt.artifacts.save("lora", state, model="digits", metadata={
        "method": "lora", "rank": 2, "alpha": None, "targets": list(backend.lora_targets)}).id


def test_a_download_is_the_stored_bytes_and_damage_is_data_loss(server):
    rt = server.runtime
    adapter = _adapter(rt)
    client = adjointdpm.Client(f"127.0.0.1:{server.port}", timeout=60)
    info, data = client.download_artifact(adapter)
    stored = rt.artifacts.blobs.read_bytes(f"{adapter}.safetensors")
    assert data == stored and info.size == len(data)
    assert rt.artifacts.info(adapter).sha256 == hashlib.sha256(data).hexdigest()
    assert client.sample(labels=[3], seed=0, steps=3, adapter=adapter).x0.shape == (1, 1, 8, 8)

    damaged = bytearray(stored)
    damaged[-3] ^= 0x10
    spooled = rt.artifacts.blobs.spool(f"{adapter}.safetensors")
    spooled.write_bytes(bytes(damaged))
    rt.artifacts.blobs.publish(spooled, f"{adapter}.safetensors")
    rt.forget(adapter)  # not from the bank's cache: from the store
    for call in (lambda: client.download_artifact(adapter),
                 lambda: client.sample(labels=[3], seed=0, steps=3, adapter=adapter)):
        with pytest.raises(adjointdpm.AdjointDPMError) as err:
            call()
        assert err.value.code.name == "DATA_LOSS" and "sha256" in err.value.details
