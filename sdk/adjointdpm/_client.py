"""``Client``: one channel to an AdjointDPM server; a method per RPC, numpy in and out.

Every streaming method returns its result object; with ``stream=True`` it returns a ``Call``
to iterate over the events as they arrive (``call.result`` is set at the end); a tqdm bar shows
progress when stderr is a terminal (``progress=True``/``False`` forces it); ``on_event`` sees
every event.
"""

from __future__ import annotations

import inspect
import queue
import sys
from typing import Any, Callable, Iterable

import grpc

from . import _requests
from ._losses import ClientLoss
from ._results import ArtifactInfo, GradientResult, IterationRecord, OptimizeResult, SampleResult, ValidationRecord
from .v1 import adjointdpm_pb2 as pb
from .v1 import adjointdpm_pb2_grpc as pb_grpc

__all__ = ["Client", "Call", "AdjointDPMError"]

class AdjointDPMError(RuntimeError):
    """A call that ended with a non-OK status: ``code`` (grpc.StatusCode) and ``details``;
    ``retry_after`` (seconds or None): when the server says a retry may succeed (a refusal
    under load sends it as ``grpc-retry-pushback-ms``)."""

    def __init__(self, code, details: str, retry_after: float | None = None):
        super().__init__(f"{code.name}: {details}")
        self.code, self.details, self.retry_after = code, details, retry_after

    @classmethod
    def of(cls, err) -> "AdjointDPMError":
        """From a ``grpc.RpcError`` (or ``grpc.aio.AioRpcError``)."""
        retry_after = None
        for key, value in (err.trailing_metadata() or ()):
            if key == "grpc-retry-pushback-ms":
                try:
                    retry_after = max(0.0, int(value) / 1000)
                except ValueError:
                    pass
        return cls(err.code(), err.details(), retry_after)


_CLIENT_KEYWORDS = (
    ("stream", False, "return the ``Call`` to iterate over the events as they arrive "
                      "(``call.result`` is set at the end)"),
    ("on_event", None, "called with every event message"),
    ("progress", None, "a tqdm progress bar (None: when stderr is a terminal)"),
)
_RESULTS = {"sample": "SampleResult", "compute_gradient": "GradientResult"}


def _signature(name: str) -> inspect.Signature:
    """The method's real signature, from ``adjointdpm.options``: its positional inputs, then every
    option as a keyword with its default, then ``stream``, ``on_event``, ``progress``."""
    P = inspect.Parameter
    params = [P("self", P.POSITIONAL_OR_KEYWORD)]
    for i in _requests.METHODS[name][2]:
        extra = {"default": ()} if (name, i) == ("optimize_embedding", "losses") else {}
        params.append(P(i, P.POSITIONAL_OR_KEYWORD, **extra))
    for kw, default, _ in (*_requests.keywords(name), *_CLIENT_KEYWORDS):
        params.append(P(kw, P.KEYWORD_ONLY, default=default))
    return inspect.Signature(params, return_annotation=_RESULTS.get(name, "OptimizeResult"))


def _docstring(name: str) -> str:
    lines = [_requests.SUMMARIES[name], "", "Args:"]
    lines += [f"    {i}: {_requests.INPUT_DOCS[i]}" for i in _requests.METHODS[name][2]]
    lines += [f"    {kw}: {doc}" for kw, _, doc in (*_requests.keywords(name), *_CLIENT_KEYWORDS)]
    return "\n".join(lines)


def _rpc(name: str):
    """A client method with its real signature and a docstring that documents every argument,
    both generated from ``adjointdpm.options``; a wrong keyword is a TypeError, as in Python."""
    signature = _signature(name)

    def decorate(method):
        def call(self, *args, **kwargs):
            signature.bind(self, *args, **kwargs)
            return method(self, *args, **kwargs)
        call.__name__, call.__qualname__, call.__module__ = method.__name__, method.__qualname__, method.__module__
        call.__doc__, call.__signature__ = _docstring(name), signature
        return call
    return decorate


# name → (stub method, bidi wrapper message or None for a server stream, event → result)
_RPCS = {
    "sample": ("Sample", None, lambda m, _: SampleResult.from_message(m)),
    "compute_gradient": ("ComputeGradient", pb.GradientMessage, lambda m, _: GradientResult.from_message(m)),
    "optimize_latent": ("OptimizeLatent", pb.OptimizeLatentMessage, OptimizeResult.from_message),
    "finetune_weights": ("FinetuneWeights", pb.FinetuneMessage, OptimizeResult.from_message),
    "optimize_embedding": ("OptimizeEmbedding", pb.OptimizeEmbeddingMessage, OptimizeResult.from_message),
}


class Call:
    """The events of one streaming call; after iteration, ``result`` holds the result object."""

    def __init__(self, events: Iterable, to_result: Callable, on_event=None, progress=None,
                 grpc_call=None):
        self._events, self._to_result, self._grpc_call = events, to_result, grpc_call
        # progress=None: a bar when someone watches (stderr is a terminal), none in logs and CI
        self._on_event = on_event
        self._progress = sys.stderr.isatty() if progress is None else progress
        self.result = None
        self._bar = None
        self.checkpoints: list[ArtifactInfo] = []
        self.iterations: list[IterationRecord] = []
        self.validations: list[ValidationRecord] = []

    def _observe(self, event) -> None:
        """Record one event: progress bar, checkpoints, iterations, validations, the result."""
        kind = event.WhichOneof("kind")
        if self._on_event is not None:
            self._on_event(event)
        if kind == "progress" and self._progress:
            self._bar = self._update_bar(self._bar, event.progress)
        elif kind == "checkpoint":
            self.checkpoints.append(ArtifactInfo.from_message(event.checkpoint))
        elif kind == "iteration":
            self.iterations.append(IterationRecord.from_message(event.iteration))
        elif kind == "validation":
            self.validations.append(ValidationRecord.from_message(event.validation))
        elif kind in ("sample", "gradient", "optimized"):
            self.result = self._to_result(getattr(event, kind), self)

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __iter__(self):
        try:
            for event in self._events:
                self._observe(event)
                yield event
        except grpc.RpcError as err:
            raise AdjointDPMError.of(err) from None
        finally:
            if self.result is None:  # abandoned (break, an exception, Ctrl-C): free the server's slot
                self.cancel()
            self._close_bar()

    @staticmethod
    def _update_bar(bar, p):
        try:
            from tqdm import tqdm
        except ImportError:
            return None
        if bar is None or bar.total != p.total or bar.desc != p.phase:
            if bar is not None:
                bar.close()
            bar = tqdm(total=p.total, desc=p.phase, leave=False)
        bar.n = p.step
        bar.set_postfix(nfe=p.nfe, iteration=p.iteration, refresh=False)
        bar.refresh()
        return bar

    def cancel(self) -> None:
        """Cancel the call: the server stops the job within one solver step."""
        if self._grpc_call is not None:
            self._grpc_call.cancel()

    def wait(self):
        for _ in self:
            pass
        if self.result is None:
            raise AdjointDPMError(grpc.StatusCode.UNKNOWN, "the stream ended without a result")
        return self.result


class Client:
    """``Client("localhost:50051", token=None, tls=False)``.

    ``tls``: False (plaintext), True (system roots), or a dict with PEM bytes/paths
    ``root_certificates``, ``private_key``, ``certificate_chain`` (mTLS). ``token`` is sent as
    ``authorization: Bearer <token>``.
    """

    def __init__(self, target: str, token: str | None = None, tls: bool | dict = False,
                 timeout: float | None = None, max_message_bytes: int = 64 * 2**20,
                 load_balancing: str | None = None, options=()):
        options, creds = channel_settings(tls, max_message_bytes, load_balancing, options)
        self.channel = (grpc.secure_channel(target, creds, options=options) if creds
                        else grpc.insecure_channel(target, options=options))
        self.metadata = auth_metadata(token)
        self.timeout = timeout
        self.stub = pb_grpc.AdjointDPMStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- helpers --------------------------------------------------------------------------------
    def _unary(self, method, request):
        try:
            return method(request, metadata=self.metadata + trace_metadata(), timeout=self.timeout)
        except grpc.RpcError as err:
            raise AdjointDPMError.of(err) from None

    def _bidi(self, method, wrapper, request, client_losses: dict[int, ClientLoss]):
        """Open the stream, send the request, answer the server's loss queries as they come."""
        outbox: queue.Queue = queue.Queue()
        outbox.put(wrapper(request=request))

        def requests():
            while True:
                msg = outbox.get()
                if msg is None:
                    return
                yield msg

        call = method(requests(), metadata=self.metadata + trace_metadata(), timeout=self.timeout)

        def events():
            try:
                for event in call:
                    if event.WhichOneof("kind") == "loss_query":
                        q = event.loss_query
                        term = client_losses.get(q.term)
                        if term is None:
                            call.cancel()
                            raise AdjointDPMError(grpc.StatusCode.FAILED_PRECONDITION, _requests.unknown_term(q.term))
                        try:
                            reply = _requests.loss_reply(term, q)
                        except Exception:
                            call.cancel()
                            raise
                        outbox.put(wrapper(loss_reply=reply))
                    yield event
            finally:
                outbox.put(None)  # ends the request stream; an unfinished call is cancelled
                if not call.done():
                    call.cancel()

        return events(), call

    def _run(self, events, to_result, stream, on_event, progress):
        events, grpc_call = events if isinstance(events, tuple) else (events, events)
        c = Call(events, to_result, on_event, progress, grpc_call)
        return c if stream else c.wait()

    # -- RPCs: the requests come from _requests (shared with adjointdpm.aio) ------------------
    def _stream_call(self, name: str, args, kwargs, stream, on_event, progress):
        request, client_losses = _requests.build(name, *args, **kwargs)
        method, wrapper, to_result = _RPCS[name]
        if wrapper is None:
            events = getattr(self.stub, method)(request, metadata=self.metadata + trace_metadata(), timeout=self.timeout)
        else:
            events = self._bidi(getattr(self.stub, method), wrapper, request, client_losses)
        return self._run(events, to_result, stream, on_event, progress)

    @_rpc("sample")
    def sample(self, *, stream=False, on_event=None, progress=None, **kwargs) -> SampleResult:
        return self._stream_call("sample", (), kwargs, stream, on_event, progress)

    @_rpc("compute_gradient")
    def compute_gradient(self, losses, *, stream=False, on_event=None, progress=None, **kwargs) -> GradientResult:
        return self._stream_call("compute_gradient", (losses,), kwargs, stream, on_event, progress)

    @_rpc("optimize_latent")
    def optimize_latent(self, losses, *, stream=False, on_event=None, progress=None, **kwargs) -> OptimizeResult:
        return self._stream_call("optimize_latent", (losses,), kwargs, stream, on_event, progress)

    @_rpc("finetune_weights")
    def finetune_weights(self, losses, examples, *, stream=False, on_event=None, progress=None,
                         **kwargs) -> OptimizeResult:
        return self._stream_call("finetune_weights", (losses, examples), kwargs, stream, on_event, progress)

    @_rpc("optimize_embedding")
    def optimize_embedding(self, losses=(), *, stream=False, on_event=None, progress=None,
                           **kwargs) -> OptimizeResult:
        return self._stream_call("optimize_embedding", (losses,), kwargs, stream, on_event, progress)

    def list_models(self) -> list[dict[str, Any]]:
        return _requests.models_from(self._unary(self.stub.ListModels, pb.ListModelsRequest()))

    def list_losses(self) -> list[dict[str, Any]]:
        return _requests.losses_from(self._unary(self.stub.ListLosses, pb.ListLossesRequest()))

    def download_artifact(self, artifact_id: str, path=None, format: str = "native") -> tuple[ArtifactInfo, bytes]:
        """The artifact's description and bytes (a safetensors file); written to ``path`` if given.
        ``format="diffusers"``: a LoRA adapter for ``pipe.load_lora_weights()`` or a learned token
        for ``pipe.load_textual_inversion()`` (Stable Diffusion 1.x/2.x)."""
        try:
            chunks = list(self.stub.GetArtifact(pb.GetArtifactRequest(id=artifact_id, format=format),
                                                metadata=self.metadata + trace_metadata(), timeout=self.timeout))
        except grpc.RpcError as err:
            raise AdjointDPMError.of(err) from None
        return _requests.artifact_from(chunks, path)

    def delete_artifact(self, artifact_id: str) -> ArtifactInfo:
        """Delete one of your artifacts (its storage quota freed); returns what was deleted.
        NOT_FOUND when it is missing or another tenant's."""
        reply = self._unary(self.stub.DeleteArtifact, pb.DeleteArtifactRequest(id=artifact_id))
        return ArtifactInfo.from_message(reply.artifact)


def channel_settings(tls, max_message_bytes: int, load_balancing: str | None, options=()):
    """(channel options, credentials or None): shared by ``Client`` and ``adjointdpm.aio.Client``."""
    options = [("grpc.max_receive_message_length", max_message_bytes),
               ("grpc.max_send_message_length", max_message_bytes), *options]
    if load_balancing:  # e.g. "round_robin" over dns:///adjointdpm-headless.ns.svc:50051
        options.append(("grpc.lb_policy_name", load_balancing))
    if not tls:
        return options, None
    files = tls if isinstance(tls, dict) else {}
    return options, grpc.ssl_channel_credentials(**{k: _pem(v) for k, v in files.items()})


def auth_metadata(token: str | None) -> tuple:
    return (("authorization", f"Bearer {token}"),) if token else ()


def trace_metadata() -> tuple:
    """The current OpenTelemetry trace context as W3C ``traceparent`` metadata (when the caller
    uses OpenTelemetry), so that the server's spans join the caller's trace."""
    try:
        from opentelemetry import propagate
    except ImportError:
        return ()
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return tuple(carrier.items())


def _pem(value):
    if value is None or isinstance(value, bytes):
        return value
    from pathlib import Path

    return Path(value).read_bytes()
