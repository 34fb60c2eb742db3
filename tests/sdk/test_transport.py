"""What travels besides the request: the bearer token as metadata on every kind of RPC, the
artifact download (chunks assembled, the file written), and the unary listings."""

from __future__ import annotations

import numpy as np
import pytest
from google.protobuf import struct_pb2

import adjointdpm
from adjointdpm.v1 import adjointdpm_pb2 as pb

LOSS = adjointdpm.ClientLoss(lambda x: (0.0, np.zeros_like(x)), autograd=False)
CALLS = {
    "Sample": ("sample", ()),
    "ComputeGradient": ("compute_gradient", (LOSS,)),
    "OptimizeLatent": ("optimize_latent", (LOSS,)),
    "FinetuneWeights": ("finetune_weights", (LOSS, [{"seed": 0}])),
    "OptimizeEmbedding": ("optimize_embedding", ()),
    "ListModels": ("list_models", ()),
    "ListLosses": ("list_losses", ()),
    "GetArtifact": ("download_artifact", ("art-1",)),
    "DeleteArtifact": ("delete_artifact", ("art-1",)),
}


@pytest.mark.parametrize("rpc", list(CALLS))
def test_a_token_is_sent_as_a_bearer_authorization(sdk, fake, rpc):
    name, args = CALLS[rpc]
    sdk.call(name, *args, _client={"token": "s3cr3t-tok"})
    assert fake.only(rpc).metadata["authorization"] == "Bearer s3cr3t-tok"


@pytest.mark.parametrize("rpc", ["Sample", "ComputeGradient", "ListModels"])
def test_no_token_no_authorization(sdk, fake, rpc):
    name, args = CALLS[rpc]
    sdk.call(name, *args)
    assert "authorization" not in fake.only(rpc).metadata
    assert fake.only(rpc).time_remaining > 1e6  # and no deadline without a timeout


@pytest.mark.parametrize("rpc", ["Sample", "ComputeGradient", "ListModels", "GetArtifact", "DeleteArtifact"])
def test_the_timeout_is_every_call_s_deadline(sdk, fake, rpc):
    name, args = CALLS[rpc]
    sdk.call(name, *args, _client={"timeout": 30})
    assert 25 < fake.only(rpc).time_remaining <= 31  # gRPC rounds deadlines up a little


def _chunks():
    meta = struct_pb2.Struct()
    meta.update({"rank": 4, "base": "digits"})
    info = pb.ArtifactInfo(id="lora-7", kind="lora", model="digits", size=9, name="mine", iteration=3,
                           metadata=meta)
    return [pb.GetArtifactResponse(info=info, data=b"abc"), pb.GetArtifactResponse(data=b""),
            pb.GetArtifactResponse(data=b"def"), pb.GetArtifactResponse(data=b"ghi")]


def test_download_artifact_assembles_the_chunks_and_writes_the_file(sdk, fake, tmp_path):
    fake.chunks = _chunks()
    path = tmp_path / "new" / "dir" / "adapter.safetensors"
    info, data = sdk.call("download_artifact", "lora-7", path=path, format="diffusers")
    assert data == b"abcdefghi"
    assert path.read_bytes() == b"abcdefghi"
    assert info == adjointdpm.ArtifactInfo("lora-7", "lora", "digits", 9, "mine", 3, {"rank": 4.0, "base": "digits"})
    assert fake.only("GetArtifact").request == pb.GetArtifactRequest(id="lora-7", format="diffusers")


def test_download_artifact_without_a_path_writes_nothing(sdk, fake, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fake.chunks = _chunks()
    info, data = sdk.call("download_artifact", "lora-7")
    assert data == b"abcdefghi" and info.id == "lora-7"
    assert list(tmp_path.iterdir()) == []
    assert fake.only("GetArtifact").request == pb.GetArtifactRequest(id="lora-7", format="native")


def test_list_models_and_losses(sdk, fake):
    fake.models = pb.ListModelsResponse(models=[pb.ModelInfo(
        name="digits", spec="digits", is_default=True, latent_shape=[1, 8, 8], image_shape=[1, 8, 8],
        conditioning="labels", default_steps=20, default_guidance=1.0, solvers=["dpm3", "euler"],
        grad_modes=["auto"], cond_shape=[16], token_dim=0)])
    fake.losses = pb.ListLossesResponse(losses=[pb.LossInfo(name="classifier", description="CE",
                                                            params=["label"], domain=pb.DOMAIN_IMAGE)])
    (model,) = sdk.call("list_models")
    assert model["name"] == "digits" and model["is_default"] is True
    assert model["latent_shape"] == [1, 8, 8] and all(type(d) is int for d in model["latent_shape"])
    assert model["cond_shape"] == [16] and model["solvers"] == ["dpm3", "euler"]
    (loss,) = sdk.call("list_losses")
    assert loss["name"] == "classifier" and loss["params"] == ["label"] and loss["domain"] == "image"
