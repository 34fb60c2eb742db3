"""Fixtures of the SDK tests: one fake server for the session (its records reset per test), and
``sdk``, the synchronous or the asyncio client (parametrized) behind one calling convention."""

from __future__ import annotations

import asyncio

import pytest

import adjointdpm
import adjointdpm.aio

from ._fake import FakeServer


@pytest.fixture(scope="session")
def fake_server():
    server = FakeServer()
    yield server
    server.stop()


@pytest.fixture
def fake(fake_server):
    fake_server.servicer.reset()
    yield fake_server.servicer
    fake_server.servicer.reset()


class SyncSDK:
    """``adjointdpm.Client`` driven the way a user drives it."""

    kind = "sync"

    def __init__(self, target):
        self.target = target

    def call(self, name, /, *args, _client=None, _before_close=None, **kwargs):
        """``client.<name>(*args, **kwargs)``: a streaming method's result, a unary reply.
        ``_before_close()`` runs after the call, while the channel is still open (closing the
        channel cancels its calls, which would hide whether the SDK cancelled one)."""
        with adjointdpm.Client(self.target, **(_client or {})) as c:
            try:
                return getattr(c, name)(*args, **kwargs)
            finally:
                if _before_close is not None:
                    _before_close()

    def calls(self, name, arguments):
        """Many calls on one client: [(args, kwargs), …] → their results."""
        with adjointdpm.Client(self.target) as c:
            return [getattr(c, name)(*args, **kwargs) for args, kwargs in arguments]

    def stream(self, name, /, *args, _client=None, **kwargs):
        """(the events, each with ``call.result`` as it was when the event arrived; the Call)."""
        with adjointdpm.Client(self.target, **(_client or {})) as c:
            call = getattr(c, name)(*args, stream=True, **kwargs)
            assert isinstance(call, adjointdpm.Call) and call.result is None
            seen = [(event, call.result) for event in call]
            return seen, call


class AioSDK:
    """``adjointdpm.aio.Client`` in a fresh event loop per call."""

    kind = "aio"

    def __init__(self, target):
        self.target = target

    def call(self, name, /, *args, _client=None, _before_close=None, **kwargs):
        async def main():
            async with adjointdpm.aio.Client(self.target, **(_client or {})) as c:
                try:
                    return await getattr(c, name)(*args, **kwargs)
                finally:
                    if _before_close is not None:  # in a thread: the event loop keeps running
                        await asyncio.to_thread(_before_close)
        return asyncio.run(main())

    def calls(self, name, arguments):
        async def main():
            async with adjointdpm.aio.Client(self.target) as c:
                return [await getattr(c, name)(*args, **kwargs) for args, kwargs in arguments]
        return asyncio.run(main())

    def stream(self, name, /, *args, _client=None, **kwargs):
        async def main():
            async with adjointdpm.aio.Client(self.target, **(_client or {})) as c:
                call = getattr(c, name)(*args, stream=True, **kwargs)
                assert isinstance(call, adjointdpm.aio.AsyncCall) and call.result is None
                seen = [(event, call.result) async for event in call]
                return seen, call
        return asyncio.run(main())


@pytest.fixture(params=["sync", "aio"])
def sdk(request, fake_server):
    return (SyncSDK if request.param == "sync" else AioSDK)(fake_server.target)
