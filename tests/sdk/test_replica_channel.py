"""The SDK's channels: what a target becomes (one server, a list of replicas, ``dns:///``), the
service config (round_robin and health checking for replicas; gRPC's retry policy on the reads
and Sample, none on the bidirectional streams nor DeleteArtifact), the caller's options winning,
and the retry policy at work against the fake server (an UNAVAILABLE is retried, or not)."""

from __future__ import annotations

import asyncio
import json

import grpc
import numpy as np
import pytest

import adjointdpm
import adjointdpm.aio
from adjointdpm._client import RETRIED, channel_settings, channel_target, service_config

from ._fake import Abort, FakeServer

pytestmark = pytest.mark.timeout(30)

SERVICE = "adjointdpm.v1.AdjointDPMService"
BIDI = ("ComputeGradient", "OptimizeLatent", "FinetuneWeights", "OptimizeEmbedding")
LOSS = adjointdpm.ClientLoss(lambda x: (0.0, np.zeros_like(x)), autograd=False)


# ---- targets -------------------------------------------------------------------------------------

@pytest.mark.parametrize("target,expected", [
    ("localhost:50051", ("localhost:50051", False, None)),
    (["10.0.0.7:50051"], ("10.0.0.7:50051", False, None)),
    ("dns:///adjointdpm-headless.ns.svc:50051", ("dns:///adjointdpm-headless.ns.svc:50051", True, None)),
    ("ipv4:10.0.0.7:1,10.0.0.8:1", ("ipv4:10.0.0.7:1,10.0.0.8:1", True, None)),
    ("ipv4:10.0.0.7:1", ("ipv4:10.0.0.7:1", False, None)),
    (["10.0.0.7:50051", "10.0.0.8:50052"], ("ipv4:10.0.0.7:50051,10.0.0.8:50052", True, "10.0.0.7:50051")),
    ("10.0.0.7:50051, 10.0.0.8:50052", ("ipv4:10.0.0.7:50051,10.0.0.8:50052", True, "10.0.0.7:50051")),
    (["[::1]:5001", "[::1]:5002"], ("ipv6:[::1]:5001,[::1]:5002", True, "[::1]:5001")),
    ("localhost:5001,127.0.0.1:5002", ("ipv4:127.0.0.1:5001,127.0.0.1:5002", True, "localhost:5001")),
])
def test_what_a_target_becomes(target, expected):
    assert channel_target(target) == expected


@pytest.mark.parametrize("target", [["10.0.0.7", "10.0.0.8:1"], ["dns:///a:1", "b:1"],
                                    ["10.0.0.7:1", "[::1]:2"], []])
def test_a_list_of_targets_must_be_host_port_entries_of_one_family(target):
    with pytest.raises(ValueError):
        channel_target(target)


# ---- the service config ------------------------------------------------------------------------

def _options(**kwargs):
    kwargs.setdefault("options", ())
    options, _ = channel_settings(False, 2**20, kwargs.pop("load_balancing", None), **kwargs)
    return dict(reversed(options))  # the first of a repeated key is the one gRPC reads


def test_the_retry_policy_covers_the_reads_and_sample_only():
    config = json.loads(service_config())
    (method_config,) = config["methodConfig"]
    names = method_config["name"]
    assert all(set(n) == {"service", "method"} for n in names)  # no service-wide entry
    assert sorted(n["method"] for n in names) == sorted(["GetServerMetadata", "ListModels", "ListLosses", "GetArtifact",
                                                        "Sample"])
    assert not set(BIDI) & set(RETRIED) and "DeleteArtifact" not in RETRIED
    policy = method_config["retryPolicy"]
    assert policy["retryableStatusCodes"] == ["UNAVAILABLE"] and policy["maxAttempts"] == 5
    assert "loadBalancingConfig" not in config and "healthCheckConfig" not in config


def test_replicas_get_round_robin_and_health_checking():
    config = json.loads(_options(replicas=True, health_check=True)["grpc.service_config"])
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    assert config["healthCheckConfig"] == {"serviceName": ""}
    single = _options()
    assert "loadBalancingConfig" not in json.loads(single["grpc.service_config"])
    assert "grpc.lb_policy_name" not in single  # pick_first, gRPC's default
    assert single["grpc.enable_retries"] == 1


def test_load_balancing_given_is_the_policy():
    options = _options(load_balancing="pick_first", replicas=True)
    assert options["grpc.lb_policy_name"] == "pick_first"
    # a policy in the service config would override the channel option
    assert "loadBalancingConfig" not in json.loads(options["grpc.service_config"])


def test_the_caller_s_options_win():
    mine = json.dumps({"methodConfig": []})
    options, _ = channel_settings(False, 2**20, None, [("grpc.service_config", mine),
                                                       ("grpc.enable_retries", 0),
                                                       ("grpc.max_receive_message_length", 7)],
                                  replicas=True)
    assert [v for k, v in options if k == "grpc.service_config"] == [mine]
    assert [v for k, v in options if k == "grpc.enable_retries"] == [0]
    assert [v for k, v in options if k == "grpc.max_receive_message_length"] == [7]


def test_health_checking_is_off_for_a_token_on_plaintext():
    """The server's Health/Watch needs the token, which gRPC cannot attach to its own health
    calls on a plaintext channel: health-checked replicas would all look unhealthy."""
    client = adjointdpm.Client(["127.0.0.1:1", "127.0.0.1:2"], token="t")
    client.close()
    with pytest.raises(ValueError, match="needs TLS"):
        adjointdpm.Client(["127.0.0.1:1", "127.0.0.1:2"], token="t", health_check=True)


# ---- the policy at work (fake servers: no health service, so every replica counts healthy) ------

def _methods(fake):
    return [c.method for c in fake.calls]


def test_sample_and_the_reads_are_retried_on_unavailable(sdk, fake):
    fake.script("Sample", [Abort(grpc.StatusCode.UNAVAILABLE, "draining")])
    with pytest.raises(adjointdpm.AdjointDPMError) as err:
        sdk.call("sample")
    assert err.value.code == grpc.StatusCode.UNAVAILABLE
    assert _methods(fake) == ["Sample"] * 5  # maxAttempts
    fake.reset()
    fake.unary_abort = Abort(grpc.StatusCode.UNAVAILABLE, "draining")
    with pytest.raises(adjointdpm.AdjointDPMError):
        sdk.call("list_models")
    assert _methods(fake) == ["ListModels"] * 5


def test_other_codes_are_not_retried(sdk, fake):
    fake.script("Sample", [Abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "full")])
    with pytest.raises(adjointdpm.AdjointDPMError):
        sdk.call("sample")
    assert _methods(fake) == ["Sample"]


@pytest.mark.parametrize("method,args", [("compute_gradient", (LOSS,)),
                                         ("finetune_weights", (LOSS, [{"seed": 0}]))])
def test_a_bidi_stream_is_not_retried(sdk, fake, method, args):
    rpc = {"compute_gradient": "ComputeGradient", "finetune_weights": "FinetuneWeights"}[method]
    fake.script(rpc, [Abort(grpc.StatusCode.UNAVAILABLE, "draining")])
    with pytest.raises(adjointdpm.AdjointDPMError) as err:
        sdk.call(method, *args)
    assert err.value.code == grpc.StatusCode.UNAVAILABLE
    assert _methods(fake) == [rpc]


def test_delete_artifact_is_not_retried(sdk, fake):
    fake.unary_abort = Abort(grpc.StatusCode.UNAVAILABLE, "draining")
    with pytest.raises(adjointdpm.AdjointDPMError):
        sdk.call("delete_artifact", "art-1")
    assert _methods(fake) == ["DeleteArtifact"]


@pytest.fixture
def two_fakes():
    servers = [FakeServer(), FakeServer()]
    yield servers
    for s in servers:
        s.stop()


@pytest.mark.parametrize("kind", ["list", "comma", "aio"])
def test_a_list_of_targets_spreads_the_calls(two_fakes, kind):
    targets = [s.target for s in two_fakes]
    if kind == "aio":
        async def main():
            async with adjointdpm.aio.Client(targets) as c:
                for _ in range(8):
                    await c.sample()
        asyncio.run(main())
    else:
        with adjointdpm.Client(targets if kind == "list" else ",".join(targets)) as c:
            for _ in range(8):
                c.sample()
    counts = [len(s.servicer.calls) for s in two_fakes]
    assert sum(counts) == 8 and min(counts) >= 2, counts


def test_a_refusing_replica_s_calls_are_retried_on_the_other(two_fakes):
    refusing, healthy = two_fakes
    refusing.servicer.script("Sample", [Abort(grpc.StatusCode.UNAVAILABLE, "draining")])
    with adjointdpm.Client([s.target for s in two_fakes]) as c:
        for _ in range(6):
            assert c.sample().x0.shape == (2, 1, 4, 4)
    assert len(healthy.servicer.calls) == 6 and refusing.servicer.calls  # each refusal retried

