"""GetServerMetadata on a real server: its release, the API package, and what a request must
respect, each read from the server's own configuration (not restated here)."""

from __future__ import annotations

import dataclasses

import grpc
import pytest

import adjointdpm
from adjointdpm.v1 import adjointdpm_pb2 as pb
from adjointdpm.v1 import adjointdpm_pb2_grpc as pb_grpc
from adjointdpm_server.config import ServerConfig
from adjointdpm_server.wire import build_server


def test_the_metadata_describes_this_server(server, client):
    meta = client.server_metadata()
    config, limits = server.runtime.config, server.runtime.limits
    assert (meta.name, meta.version, meta.api_package) == ("adjointdpm-server", adjointdpm.__version__,
                                                           "adjointdpm.v1")
    assert meta.models == [m["name"] for m in client.list_models()] == ["digits", "gaussian-mixture"]
    assert meta.default_model == "digits"
    assert meta.losses == sorted(entry["name"] for entry in client.list_losses())
    assert "checkpoint" in meta.grad_modes and "dpm3" in meta.solvers
    assert meta.tensor_dtypes == ["float16", "float32", "float64"] and meta.compute_dtype == config.dtype
    for name, value in meta.limits.items():  # every limit the message carries, from the config
        source = limits if hasattr(limits, name) else config
        assert value == pytest.approx(getattr(source, name) or 0), name  # grad_memory_bytes None: 0
    assert meta.limits["max_steps"] == 200 and meta.limits["max_batch"] == 16  # the test server's
    assert meta.extensions == ["multi_adapter_batching"]  # no auth, S3, Redis or shared artifacts
    assert meta.api_packages == ["adjointdpm.v1"]


def test_a_limit_the_metadata_states_is_the_one_enforced(client):
    steps = client.server_metadata().limits["max_steps"]
    with pytest.raises(adjointdpm.AdjointDPMError) as err:
        client.sample(seed=0, steps=int(steps) + 1)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and str(int(steps)) in err.value.details


def test_the_metadata_needs_the_token_and_names_the_extensions(tmp_path):
    config = ServerConfig(models=("digits",), host="127.0.0.1", port=0, artifact_dir=tmp_path,
                          tokens=("team-a:secret",), shared_artifacts=True,
                          multi_adapter_batching=False)
    srv = build_server(config)
    try:
        target = f"127.0.0.1:{srv.port}"
        with grpc.insecure_channel(target) as channel:
            with pytest.raises(grpc.RpcError) as err:
                pb_grpc.AdjointDPMServiceStub(channel).GetServerMetadata(pb.GetServerMetadataRequest(),
                                                                         timeout=30)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with adjointdpm.Client(target, token="secret") as c:
            meta = c.server_metadata()
        assert meta.extensions == ["auth", "shared_artifacts"]
        assert meta.models == ["digits"]
    finally:
        srv.stop(0)


def test_the_metadata_limits_follow_the_operators_settings(tmp_path):
    base = ServerConfig(models=("digits",), host="127.0.0.1", port=0, artifact_dir=tmp_path)
    config = dataclasses.replace(base, limits=dataclasses.replace(base.limits, max_steps=7, max_batch=3,
                                                                  grad_memory_bytes=123 << 20),
                                 max_request_s=120.0)
    srv = build_server(config)
    try:
        with adjointdpm.Client(f"127.0.0.1:{srv.port}") as c:
            limits = c.server_metadata().limits
        assert (limits["max_steps"], limits["max_batch"], limits["max_request_s"]) == (7, 3, 120.0)
        assert limits["grad_memory_bytes"] == 123 << 20
    finally:
        srv.stop(0)
