"""``adjointdpm.aio.Client``: the SDK's calls as coroutines on ``grpc.aio``, for async services
(FastAPI, Ray Serve, aiohttp) without a thread per call.

    async with adjointdpm.aio.Client("localhost:50051") as client:
        grid = await client.sample(labels=range(10), seed=0)

        async def darker(image):                 # a client loss may be sync or async
            await asyncio.sleep(0)
            return image.mean()
        g = await client.compute_gradient(darker, labels=3, seed=0)

        async for event in client.sample(labels=1, stream=True):   # events as they arrive
            ...

The requests, results and errors are the synchronous client's (one implementation of the message
conversion: ``_requests``, ``_results``); cancelling the awaiting task cancels the RPC, and the
server stops the job within one solver step.
"""

from __future__ import annotations

import asyncio
from typing import Any, Sequence

import grpc

from . import _requests
from ._client import (_RPCS, AdjointDPMError, Call, _rpc, metadata_or_refusal, open_channel,
                      trace_metadata)
from ._losses import evaluate_client_loss_async
from ._results import ArtifactInfo, ServerMetadata
from .v1 import adjointdpm_pb2 as pb
from .v1 import adjointdpm_pb2_grpc as pb_grpc

__all__ = ["Client", "AsyncCall"]


class AsyncCall(Call):
    """The events of one streaming call as an async iterator; ``result`` is set at the end.
    ``await call.wait()`` (or awaiting the client method without ``stream=True``) gives it."""

    def __init__(self, events, to_result, on_event=None, progress=None, grpc_call=None, closed=None):
        super().__init__(events, to_result, on_event, progress, grpc_call, closed)

    async def __aiter__(self):
        try:
            async for event in self._events:
                self._observe(event)
                yield event
        except grpc.RpcError as err:  # grpc.aio.AioRpcError
            raise self._error(err) from None
        finally:
            if self.result is None:  # abandoned or cancelled: free the server's slot
                self.cancel()
            self._close_bar()

    def __iter__(self):
        raise TypeError("an AsyncCall is iterated with `async for`")

    async def wait(self):
        async for _ in self:
            pass
        if self.result is None:
            raise AdjointDPMError(grpc.StatusCode.UNKNOWN, "the stream ended without a result")
        return self.result


class _Started:
    """The RPC of an ``AsyncCall`` once it has started (it starts after the version check); one
    cancelled before then never starts."""

    call = None
    cancelled = False

    def cancel(self) -> None:
        self.cancelled = True
        if self.call is not None:
            self.call.cancel()


class Client:
    """``Client("localhost:50051", token=None, tls=False)``: as ``adjointdpm.Client``, on asyncio
    (the same targets: one server, a list of replicas or ``dns:///name:port``; the same
    retries, health checking and ``JobInterrupted``). Use it inside one event loop
    (``async with``, or ``await client.close()``)."""

    def __init__(self, target: str | Sequence[str], token: str | None = None, tls: bool | dict = False,
                 timeout: float | None = None, max_message_bytes: int = 64 * 2**20,
                 load_balancing: str | None = None, options=(), health_check: bool | None = None):
        self.channel, self.metadata = open_channel(grpc.aio, target, token, tls, max_message_bytes,
                                                   load_balancing, options, health_check)
        self.timeout = timeout
        self.stub = pb_grpc.AdjointDPMServiceStub(self.channel)
        self._closed = False
        self._target = target if isinstance(target, str) else ",".join(target)
        self._server: ServerMetadata | None = None  # read once per channel, before its first call
        self._server_lock: asyncio.Lock | None = None  # made in the loop that first needs it

    async def close(self) -> None:
        self._closed = True
        await self.channel.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()

    async def server_metadata(self) -> ServerMetadata:
        """As ``Client.server_metadata`` (concurrent first calls share one request)."""
        if self._server_lock is None:
            self._server_lock = asyncio.Lock()
        async with self._server_lock:
            if self._server is None:
                try:
                    reply, error = await self.stub.GetServerMetadata(
                        pb.GetServerMetadataRequest(), metadata=self.metadata + trace_metadata(),
                        timeout=self.timeout), None
                except grpc.RpcError as err:
                    reply, error = None, AdjointDPMError.of(err)
                meta, refusal = metadata_or_refusal(reply, error, self._target)
                if refusal is not None:
                    raise refusal
                self._server = meta
        return self._server

    # -- helpers --------------------------------------------------------------------------------
    async def _unary(self, method, request):
        await self.server_metadata()
        try:
            return await method(request, metadata=self.metadata + trace_metadata(), timeout=self.timeout)
        except grpc.RpcError as err:
            raise AdjointDPMError.of(err) from None

    def _bidi(self, method, wrapper, request, client_losses, metadata):
        """The event stream of a bidi call: the request is written first, each loss query is
        answered (an async loss awaited) as it arrives, and the writing side closes at the end."""
        call = method(metadata=metadata, timeout=self.timeout)

        async def write(message):
            try:
                await call.write(message)
            except asyncio.InvalidStateError:  # the RPC already ended: raise its status instead
                raise grpc.aio.AioRpcError(await call.code(), await call.initial_metadata(),
                                           await call.trailing_metadata(), await call.details()) from None

        async def events():
            try:
                await write(wrapper(spec=request))
                async for event in call:
                    if event.WhichOneof("kind") == "loss_query":
                        q = event.loss_query
                        term = client_losses.get(q.term)
                        if term is None:
                            call.cancel()
                            raise AdjointDPMError(grpc.StatusCode.FAILED_PRECONDITION,
                                                  _requests.unknown_term(q.term))
                        from .tensors import decode_tensor

                        try:
                            evaluated = await evaluate_client_loss_async(term, decode_tensor(q.x))
                        except BaseException:
                            call.cancel()
                            raise
                        await write(wrapper(loss_reply=_requests.loss_reply(term, q, evaluated)))
                    yield event
            finally:
                if not call.done():
                    call.cancel()

        return events(), call

    def _stream_call(self, name: str, args, kwargs, stream, on_event, progress):
        request, client_losses = _requests.build(name, *args, **kwargs)
        method, wrapper, to_result = _RPCS[name]
        started = _Started()
        metadata = self.metadata + trace_metadata()  # the caller's trace context, as it is now

        async def events():  # the RPC starts once the server is known to be compatible
            await self.server_metadata()
            if started.cancelled:
                raise AdjointDPMError(grpc.StatusCode.CANCELLED, "the call was cancelled before it started")
            if wrapper is None:
                inner = started.call = getattr(self.stub, method)(request, metadata=metadata,
                                                                  timeout=self.timeout)
            else:
                inner, started.call = self._bidi(getattr(self.stub, method), wrapper, request,
                                                 client_losses, metadata)
            async for event in inner:
                yield event

        call = AsyncCall(events(), to_result, on_event, progress, started, closed=lambda: self._closed)
        return call if stream else call.wait()

    # -- RPCs: awaitables (or, with stream=True, AsyncCall to iterate) ---------------------------
    @_rpc("sample")
    def sample(self, *, stream=False, on_event=None, progress=None, **kwargs):
        return self._stream_call("sample", (), kwargs, stream, on_event, progress)

    @_rpc("compute_gradient")
    def compute_gradient(self, losses, *, stream=False, on_event=None, progress=None, **kwargs):
        return self._stream_call("compute_gradient", (losses,), kwargs, stream, on_event, progress)

    @_rpc("optimize_latent")
    def optimize_latent(self, losses, *, stream=False, on_event=None, progress=None, **kwargs):
        return self._stream_call("optimize_latent", (losses,), kwargs, stream, on_event, progress)

    @_rpc("finetune_weights")
    def finetune_weights(self, losses, examples=(), *, stream=False, on_event=None, progress=None, **kwargs):
        return self._stream_call("finetune_weights", (losses, examples), kwargs, stream, on_event, progress)

    @_rpc("optimize_embedding")
    def optimize_embedding(self, losses=(), *, stream=False, on_event=None, progress=None, **kwargs):
        return self._stream_call("optimize_embedding", (losses,), kwargs, stream, on_event, progress)

    async def list_models(self) -> list[dict[str, Any]]:
        return _requests.models_from(await self._unary(self.stub.ListModels, pb.ListModelsRequest()))

    async def list_losses(self) -> list[dict[str, Any]]:
        return _requests.losses_from(await self._unary(self.stub.ListLosses, pb.ListLossesRequest()))

    async def download_artifact(self, artifact_id: str, path=None, format: str = "native") -> tuple[ArtifactInfo, bytes]:
        """As ``Client.download_artifact``."""
        await self.server_metadata()
        try:
            chunks = [chunk async for chunk in self.stub.GetArtifact(
                pb.GetArtifactRequest(id=artifact_id, format=format), metadata=self.metadata + trace_metadata(),
                timeout=self.timeout)]
        except grpc.RpcError as err:
            raise AdjointDPMError.of(err) from None
        return _requests.artifact_from(chunks, path)

    async def delete_artifact(self, artifact_id: str) -> ArtifactInfo:
        """As ``Client.delete_artifact``."""
        reply = await self._unary(self.stub.DeleteArtifact, pb.DeleteArtifactRequest(id=artifact_id))
        return ArtifactInfo.from_message(reply.artifact)
