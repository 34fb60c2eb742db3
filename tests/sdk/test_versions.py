"""Versions both sides can see: the SDK reads the server's metadata once per channel, before its
first call, and refuses a server of another major version (or one too old to say) with a message
that says what to install — against the scripted peer (tests/sdk/_fake.py), sync and asyncio."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import grpc
import pytest

import adjointdpm
from adjointdpm import _compat

METHODS = {  # every kind of call the SDK makes: each checks first
    "sample": (),
    "compute_gradient": (adjointdpm.ServerLoss("mse"),),
    "list_models": (),
    "download_artifact": ("lora-1",),
    "delete_artifact": ("lora-1",),
}


def _next_major(version: str) -> str:
    return f"{_compat.major(version) + 1}.0.0"


def test_the_version_is_one_semantic_version_the_cli_prints():
    assert _compat.major(adjointdpm.__version__) is not None
    run = subprocess.run([sys.executable, "-m", "adjointdpm.cli", "--version"], capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["adjointdpm", adjointdpm.__version__]


@pytest.mark.parametrize("method", list(METHODS))
def test_a_server_of_another_major_version_is_refused_before_any_request(sdk, fake, method):
    fake.version = _next_major(adjointdpm.__version__)
    with pytest.raises(adjointdpm.IncompatibleServer) as err:
        sdk.call(method, *METHODS[method])
    e = err.value
    assert isinstance(e, adjointdpm.AdjointDPMError) and e.code == grpc.StatusCode.FAILED_PRECONDITION
    assert fake.version in str(e) and adjointdpm.__version__ in str(e)
    major = _compat.major(fake.version)
    assert f"pip install 'adjointdpm>={major},<{major + 1}'" in str(e)
    assert e.server is not None and e.server.version == fake.version
    assert fake.calls == []  # nothing else was sent


def test_another_api_package_is_refused_even_at_the_same_major(sdk, fake):
    fake.api_package = "adjointdpm.v2"
    with pytest.raises(adjointdpm.IncompatibleServer, match="adjointdpm.v2"):
        sdk.call("sample")
    assert fake.calls == []


def test_a_server_of_another_major_that_still_serves_this_package_is_served(sdk, fake):
    """A 2.x server keeping adjointdpm.v1 beside its own package (docs/design.md §4.9)."""
    fake.version = _next_major(adjointdpm.__version__)
    fake.api_packages = ["adjointdpm.v1", "adjointdpm.v2"]
    sdk.call("sample")
    fake.api_packages = ["adjointdpm.v2"]  # a new channel: it no longer serves v1
    with pytest.raises(adjointdpm.IncompatibleServer, match="adjointdpm.v2"):
        sdk.call("sample")


def test_concurrent_first_calls_read_the_metadata_once(fake, fake_server):
    async def main():
        async with adjointdpm.aio.Client(fake_server.target) as c:
            await asyncio.gather(*(c.sample(seed=k) for k in range(4)))
    asyncio.run(main())
    assert fake.metadata_calls == 1 and len(fake.calls) == 4


def test_an_async_call_cancelled_before_it_starts_never_starts(fake, fake_server):
    async def main():
        async with adjointdpm.aio.Client(fake_server.target) as c:
            call = c.sample(stream=True)
            call.cancel()
            with pytest.raises(adjointdpm.AdjointDPMError) as err:
                async for _ in call:
                    pass
            return err.value
    err = asyncio.run(main())
    assert err.code == grpc.StatusCode.CANCELLED
    assert fake.calls == []


def test_a_server_without_metadata_is_refused_as_too_old(sdk, fake):
    fake.metadata_unimplemented = True
    with pytest.raises(adjointdpm.IncompatibleServer, match="predates adjointdpm 1.0"):
        sdk.call("list_models")
    assert fake.calls == []


def test_the_same_major_version_is_served_and_the_metadata_read_once_per_channel(sdk, fake):
    fake.version = f"{_compat.major(adjointdpm.__version__)}.99.7"  # a newer minor: compatible
    results = sdk.calls("sample", [((), {}), ((), {"seed": 1}), ((), {"seed": 2})])
    assert len(results) == 3 and len(fake.calls) == 3
    assert fake.metadata_calls == 1


def test_the_metadata_is_readable_and_a_failure_to_read_it_is_not_cached(fake, fake_server):
    with adjointdpm.Client(fake_server.target) as c:
        meta = c.server_metadata()
        assert isinstance(meta, adjointdpm.ServerMetadata)
        assert (meta.name, meta.version, meta.api_package, meta.models) == (
            "fake-adjointdpm", adjointdpm.__version__, "adjointdpm.v1", ["digits"])
        assert c.server_metadata() is meta and fake.metadata_calls == 1
    fake.metadata_unimplemented = True
    with adjointdpm.Client(fake_server.target) as c:
        with pytest.raises(adjointdpm.IncompatibleServer):
            c.sample()
        fake.metadata_unimplemented = False  # e.g. the server was upgraded meanwhile
        c.sample()
    assert [call.method for call in fake.calls] == ["Sample"]
    fake.metadata_unimplemented = True

    async def aio():
        async with adjointdpm.aio.Client(fake_server.target) as c:
            with pytest.raises(adjointdpm.IncompatibleServer):
                await c.sample()
            fake.metadata_unimplemented = False
            await c.sample()
    asyncio.run(aio())
    assert [call.method for call in fake.calls] == ["Sample", "Sample"]


def test_the_sdk_says_its_release_in_the_user_agent(sdk, fake):
    sdk.call("sample")
    agent = fake.only("Sample").metadata.get("user-agent", "")
    assert f"adjointdpm-python/{adjointdpm.__version__}" in agent
