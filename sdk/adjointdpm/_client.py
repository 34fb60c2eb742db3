"""``Client``: one channel to an AdjointDPM server; a method per RPC, numpy in and out.

Every streaming method returns its result object; with ``stream=True`` it returns a ``Call``
to iterate over the events as they arrive (``call.result`` is set at the end); a tqdm bar shows
progress when stderr is a terminal (``progress=True``/``False`` forces it); ``on_event`` sees
every event.

Replicas: a list of targets (``["10.0.0.7:50051", "10.0.0.8:50051"]`` or ``"a:50051,b:50051"``) or
a ``dns:///name:port`` target spreads calls over every replica (round_robin, health-checked);
idempotent calls and ``Sample`` are retried on UNAVAILABLE by gRPC's own retry policy, never the
bidirectional streams that carry client-loss replies (see ``Client`` and ``service_config``). A
fine-tune whose stream is lost after its ``job`` event raises ``JobInterrupted``, which says how
to resume it (``resume_job=``) on any replica.
"""

from __future__ import annotations

import inspect
import ipaddress
import json
import queue
import socket
import sys
import threading
from typing import Any, Callable, Iterable, Sequence

import grpc

from . import _compat, _requests
from ._losses import ClientLoss
from ._results import (ArtifactInfo, GradientResult, IterationRecord, JobInfo, MemoryPlan, OptimizeResult,
                       SampleResult, ServerMetadata, ValidationRecord)
from .v1 import adjointdpm_pb2 as pb
from .v1 import adjointdpm_pb2_grpc as pb_grpc

__all__ = ["Client", "Call", "AdjointDPMError", "JobInterrupted", "IncompatibleServer", "service_config"]

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
        details = err.details() or ""
        if err.code() == grpc.StatusCode.UNAVAILABLE and _HEALTH_FAILED in details:
            details += _HEALTH_HINT
        return cls(err.code(), details, retry_after)


class IncompatibleServer(AdjointDPMError):
    """The server is of another major version than this SDK (or predates ``GetServerMetadata``):
    refused before any request is sent; the message says which SDK to install. ``server``: its
    ``ServerMetadata`` (None for a server too old to send one)."""

    def __init__(self, details: str, server: "ServerMetadata | None" = None):
        super().__init__(grpc.StatusCode.FAILED_PRECONDITION, details)
        self.server = server


def metadata_or_refusal(reply, error, target: str):
    """(the ServerMetadata, None) or (None, the IncompatibleServer to raise) from GetServerMetadata's
    ``reply`` or its ``error`` (an AdjointDPMError: other errors are the caller's to raise)."""
    if error is not None:
        if error.code == grpc.StatusCode.UNIMPLEMENTED:
            return None, IncompatibleServer(_compat.TOO_OLD.format(target=target, service=SERVICE))
        raise error
    meta = ServerMetadata.from_message(reply)
    problem = _compat.incompatibility(meta, target)
    return meta, (IncompatibleServer(problem, meta) if problem else None)


# gRPC's words when every replica failed the channel's own health check (a refused Health/Watch)
_HEALTH_FAILED = "health check call failed"
_HEALTH_HINT = ("; the replicas refused this client's health checks (grpc.health.v1 Health/Watch): "
                "a missing or wrong token, or a replica's --max-health-watches all taken "
                "(Client(..., health_check=False) turns client health checking off)")


class JobInterrupted(AdjointDPMError):
    """A fine-tune's stream was lost (its replica died or drained: UNAVAILABLE, or CANCELLED /
    UNKNOWN the client did not ask for) after the server had sent its ``job`` event: the job
    can go on from its last checkpoint, on any replica, with the same request and
    ``resume_job=err.job_id``. ``job_id``, ``replica`` (the one that ran it), ``iteration``
    (where it had started), ``code`` and ``details`` (the status the stream ended with)."""

    def __init__(self, code, details: str, job_id: str, replica: str = "", iteration: int = 0,
                 retry_after: float | None = None):
        super().__init__(code, details, retry_after)
        self.job_id, self.replica, self.iteration = job_id, replica, iteration
        where = f" on replica {replica}" if replica else ""
        self.args = (f"{code.name}: {details} — fine-tune job {job_id}{where} was interrupted; "
                     f"resume it from its last checkpoint, on any replica, with the same request: "
                     f"client.finetune_weights(..., resume_job={job_id!r})",)


# How a stream is lost rather than refused: the replica went away (UNAVAILABLE), or the call was
# cut (CANCELLED, UNKNOWN) by something other than the client.
_TRANSPORT_LOSS = ("UNAVAILABLE", "CANCELLED", "UNKNOWN")


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
        optional = {("optimize_embedding", "losses"), ("finetune_weights", "examples")}  # a target image; conditions
        extra = {"default": ()} if (name, i) in optional else {}
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


# name → (stub method, its request message or None for a server stream (a bidi stream's first
# request holds the spec), the result message → the result object)
_RPCS = {
    "sample": ("Sample", None, lambda m, _: SampleResult.from_message(m)),
    "compute_gradient": ("ComputeGradient", pb.ComputeGradientRequest, GradientResult.from_message),
    "optimize_latent": ("OptimizeLatent", pb.OptimizeLatentRequest, OptimizeResult.from_message),
    "finetune_weights": ("FinetuneWeights", pb.FinetuneWeightsRequest, OptimizeResult.from_message),
    "optimize_embedding": ("OptimizeEmbedding", pb.OptimizeEmbeddingRequest, OptimizeResult.from_message),
}


class Call:
    """The events of one streaming call; after iteration, ``result`` holds the result object.
    A fine-tune's ``job`` (``JobInfo``; ``job_id``) is set by its first event."""

    def __init__(self, events: Iterable, to_result: Callable, on_event=None, progress=None,
                 grpc_call=None, closed: Callable[[], bool] | None = None):
        self._events, self._to_result, self._grpc_call = events, to_result, grpc_call
        self._closed = closed or (lambda: False)  # the client's channel was closed (by the client)
        self._cancelled = False                   # cancel() was called
        self.job: JobInfo | None = None
        # progress=None: a bar when someone watches (stderr is a terminal), none in logs and CI
        self._on_event = on_event
        self._progress = sys.stderr.isatty() if progress is None else progress
        self.result = None
        self._bar = None
        self.checkpoints: list[ArtifactInfo] = []
        self.iterations: list[IterationRecord] = []
        self.validations: list[ValidationRecord] = []
        self.plans: list[MemoryPlan] = []

    def _observe(self, event) -> None:
        """Record one event: progress bar, checkpoints, iterations, validations, memory plans,
        the result."""
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
        elif kind == "job":
            self.job = JobInfo.from_message(event.job)
        elif kind == "plan":
            self.plans.append(MemoryPlan.from_message(event.plan))
        elif kind == "result":
            self.result = self._to_result(event.result, self)

    @property
    def job_id(self) -> str | None:
        """The fine-tune's job id (its ``job`` event), to resume it with ``resume_job=``."""
        return self.job.id if self.job is not None else None

    def _error(self, err) -> AdjointDPMError:
        """The call's RPC error as the SDK raises it: ``JobInterrupted`` when the stream of a
        job that had announced itself was lost other than by the client's own doing."""
        error = AdjointDPMError.of(err)
        lost = error.code.name in _TRANSPORT_LOSS and not (self._cancelled or self._closed())
        if self.job is not None and self.job.id and lost:
            return JobInterrupted(error.code, error.details, self.job.id, self.job.replica,
                                  self.job.iteration, error.retry_after)
        return error

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
            raise self._error(err) from None
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
        self._cancelled = True
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

    ``target``: one server ``"host:port"`` (any gRPC target), or several replicas: a list of
    ``"host:port"`` (or one comma-separated string), or ``"dns:///name:port"`` (every address
    the name resolves to, e.g. a Kubernetes headless Service; re-resolved when a connection
    closes, so the client follows the replica set). A list of IP addresses becomes gRPC's static
    ``ipv4:a:p,b:p`` (``ipv6:``) target; a list with host names is resolved once, here, to such a
    list (the first entry names the TLS server: every replica's certificate must be valid for
    it); use ``dns:///`` for names whose addresses change.

    Several replicas: calls are spread with ``round_robin`` over health-checked connections (gRPC
    client-side health checking, ``grpc.health.v1`` service ``""``: a draining replica turns
    NOT_SERVING and gets no new call). One plain target keeps ``pick_first``. Either way,
    ``GetServerMetadata``, ``ListModels``, ``ListLosses``, ``GetArtifact`` and ``Sample`` are
    retried by gRPC (its service-config retry policy, ``service_config()``) when they end
    UNAVAILABLE before any response: on the next replica. Bidirectional streams (client losses, optimizations,
    fine-tunes) and ``DeleteArtifact`` are never retried: a fine-tune lost mid-way raises
    ``JobInterrupted`` with the id to resume it by.

    ``load_balancing``: a gRPC policy name instead (``"pick_first"``, ``"round_robin"``).
    ``health_check``: None = on for several replicas, except with a ``token`` on a plaintext
    channel (gRPC cannot attach the token to its own health calls there, and the server's
    ``Health/Watch`` needs it); True/False forces it. Each replica serves at most
    ``--max-health-watches`` health-checked clients. ``options``: gRPC channel options; one given
    here wins over the SDK's (``grpc.service_config``, ``grpc.enable_retries`` …).
    ``tls``: False (plaintext), True (system roots), or a dict with PEM bytes/paths
    ``root_certificates``, ``private_key``, ``certificate_chain`` (mTLS). ``token`` is sent as
    ``authorization: Bearer <token>``.
    """

    def __init__(self, target: str | Sequence[str], token: str | None = None, tls: bool | dict = False,
                 timeout: float | None = None, max_message_bytes: int = 64 * 2**20,
                 load_balancing: str | None = None, options=(), health_check: bool | None = None):
        self.channel, self.metadata = open_channel(grpc, target, token, tls, max_message_bytes,
                                                   load_balancing, options, health_check)
        self.timeout = timeout
        self.stub = pb_grpc.AdjointDPMServiceStub(self.channel)
        self._closed = False
        self._target = target if isinstance(target, str) else ",".join(target)
        self._server: ServerMetadata | None = None  # read once per channel, before its first call
        self._server_lock = threading.Lock()

    def close(self) -> None:
        self._closed = True
        self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def server_metadata(self) -> ServerMetadata:
        """The server's release, API package, models, losses, modes, dtypes and limits (read once
        per channel; IncompatibleServer for a server of another major version)."""
        with self._server_lock:
            if self._server is None:
                try:
                    reply, error = self.stub.GetServerMetadata(
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
    def _unary(self, method, request):
        self.server_metadata()
        try:
            return method(request, metadata=self.metadata + trace_metadata(), timeout=self.timeout)
        except grpc.RpcError as err:
            raise AdjointDPMError.of(err) from None

    def _bidi(self, method, wrapper, request, client_losses: dict[int, ClientLoss]):
        """Open the stream, send the spec, answer the server's loss queries as they come."""
        outbox: queue.Queue = queue.Queue()
        outbox.put(wrapper(spec=request))

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
        c = Call(events, to_result, on_event, progress, grpc_call, closed=lambda: self._closed)
        return c if stream else c.wait()

    # -- RPCs: the requests come from _requests (shared with adjointdpm.aio) ------------------
    def _stream_call(self, name: str, args, kwargs, stream, on_event, progress):
        request, client_losses = _requests.build(name, *args, **kwargs)
        method, wrapper, to_result = _RPCS[name]
        self.server_metadata()
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
    def finetune_weights(self, losses, examples=(), *, stream=False, on_event=None, progress=None,
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
        self.server_metadata()
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


# -- channels: replicas, load balancing, health checking, retries ---------------------------------

SERVICE = pb.DESCRIPTOR.services_by_name["AdjointDPMService"].full_name
# Retried on UNAVAILABLE (a replica gone, draining or unreachable) while nothing was received:
# the reads, and Sample (a server stream with no client messages; a seed makes it reproducible).
# Not DeleteArtifact: a delete whose reply was lost would be answered NOT_FOUND the second time.
# Never the bidirectional streams: they carry client-loss replies (the client's code runs per
# query) and the job's state lives on one replica — a lost one ends, a fine-tune with
# JobInterrupted.
RETRIED = ("GetServerMetadata", "ListModels", "ListLosses", "GetArtifact", "Sample")
RETRY_POLICY = {"maxAttempts": 5, "initialBackoff": "0.1s", "maxBackoff": "2s",
                "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]}
HEALTH_SERVICE = ""  # the server reports "" (the whole server) and SERVICE alike
_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:", "vsock:", "xds:", "google-c2p:")


def service_config(load_balancing: str | None = None, health_check: bool = False) -> str:
    """The gRPC service config (JSON) the SDK's channels use: ``RETRY_POLICY`` on ``RETRIED``
    (no method config at all for the others), ``load_balancing`` as the policy when given,
    ``healthCheckConfig`` when ``health_check``."""
    config: dict[str, Any] = {"methodConfig": [{
        "name": [{"service": SERVICE, "method": m} for m in RETRIED],
        "retryPolicy": RETRY_POLICY}]}
    if load_balancing:
        config["loadBalancingConfig"] = [{load_balancing: {}}]
    if health_check:
        config["healthCheckConfig"] = {"serviceName": HEALTH_SERVICE}
    return json.dumps(config)


def _split_host_port(entry: str) -> tuple[str, str]:
    host, colon, port = entry.rpartition(":")
    if not colon or not port.isdigit() or not host:
        raise ValueError(f"target {entry!r}: a list of targets takes HOST:PORT entries")
    return host.removeprefix("[").removesuffix("]"), port


def _addresses(host: str, port: str) -> tuple[list[str], list[str]]:
    """(IPv4, IPv6 addresses) of one entry: itself if an IP address, else resolved now."""
    try:
        ip = ipaddress.ip_address(host)
        return ([str(ip)], []) if ip.version == 4 else ([], [str(ip)])
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise ValueError(f"target {host}:{port}: cannot resolve {host!r} ({err})") from None
    v4 = [i[4][0] for i in infos if i[0] == socket.AF_INET]
    v6 = [i[4][0] for i in infos if i[0] == socket.AF_INET6]
    return list(dict.fromkeys(v4)), list(dict.fromkeys(v6))


def channel_target(target: str | Sequence[str]) -> tuple[str, bool, str | None]:
    """(the gRPC target, whether it names replicas, the authority of a list): a ``dns:`` target
    or a list of several ``host:port`` (a comma-separated string alike) names replicas; a list
    becomes gRPC's static ``ipv4:``/``ipv6:`` address list (names resolved once, here), with the
    first entry as its authority (TLS checks it). Anything else is passed through as is."""
    if isinstance(target, str):
        lowered = target.strip().lower()
        if lowered.startswith(_SCHEMES):
            several = lowered.startswith("dns:") or (lowered.startswith(("ipv4:", "ipv6:")) and "," in target)
            return target.strip(), several, None
        entries = [e.strip() for e in target.split(",")]
    else:
        entries = [str(e).strip() for e in target]
    entries = [e for e in entries if e]
    if not entries:
        raise ValueError("no target")
    if len(entries) == 1:
        return channel_target(entries[0]) if not isinstance(target, str) else (entries[0], False, None)
    v4, v6, every_v4, every_v6 = [], [], True, True
    for entry in entries:
        if entry.lower().startswith(_SCHEMES):
            raise ValueError(f"target {entry!r}: a list takes HOST:PORT entries; for a name whose "
                             "addresses are the replicas, give one 'dns:///name:port' target")
        host, port = _split_host_port(entry)
        a4, a6 = _addresses(host, port)
        v4 += [f"{a}:{port}" for a in a4]
        v6 += [f"[{a}]:{port}" for a in a6]
        every_v4, every_v6 = every_v4 and bool(a4), every_v6 and bool(a6)
    if not (every_v4 or every_v6):
        raise ValueError(f"targets {entries}: gRPC lists either IPv4 or IPv6 addresses, not both")
    scheme, addresses = ("ipv4:", v4) if every_v4 else ("ipv6:", v6)
    return scheme + ",".join(dict.fromkeys(addresses)), True, entries[0]


def channel_settings(tls, max_message_bytes: int, load_balancing: str | None, options=(), *,
                     replicas: bool = False, health_check: bool = False, authority: str | None = None):
    """(channel options, credentials or None): shared by ``Client`` and ``adjointdpm.aio.Client``.
    ``replicas``: round_robin unless ``load_balancing`` says otherwise. An option the caller
    gives replaces the SDK's own (gRPC would read only the first of a repeated one)."""
    ours = [("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.enable_retries", 1),  # gRPC's default; transparent retries need it too
            # the server's logs and traces can tell this SDK's release (user-agent)
            ("grpc.primary_user_agent", f"adjointdpm-python/{_compat.__version__}"),
            # the policy in the service config: round_robin for replicas; a load_balancing given
            # goes as lb_policy_name (which the service config's policy would override)
            ("grpc.service_config", service_config("round_robin" if replicas and not load_balancing
                                                   else None, health_check))]
    if load_balancing:  # e.g. "round_robin" over dns:///adjointdpm-headless.ns.svc:50051
        ours.append(("grpc.lb_policy_name", load_balancing))
    if authority:
        ours.append(("grpc.default_authority", authority))
    options = list(options)
    given = {key for key, _ in options}
    options += [(key, value) for key, value in ours if key not in given]
    if not tls:
        return options, None
    files = tls if isinstance(tls, dict) else {}
    return options, grpc.ssl_channel_credentials(**{k: _pem(v) for k, v in files.items()})


def open_channel(module, target, token, tls, max_message_bytes, load_balancing, options,
                 health_check):
    """(channel, per-call metadata) on ``module`` (``grpc`` or ``grpc.aio``): see ``Client``."""
    target, replicas, authority = channel_target(target)
    if health_check is None:
        health_check = replicas and (not token or bool(tls))
    elif health_check and token and not tls:
        raise ValueError("health_check with a token needs TLS: gRPC sends a channel's own health "
                         "calls without per-call metadata, and the server's Health/Watch needs "
                         "the token")
    options, creds = channel_settings(tls, max_message_bytes, load_balancing, options,
                                      replicas=replicas, health_check=health_check,
                                      authority=authority)
    metadata = auth_metadata(token)
    if creds is None:
        return module.insecure_channel(target, options=options), metadata
    if token and health_check:  # the token as channel credentials: the health calls carry it too
        creds = grpc.composite_channel_credentials(creds, grpc.access_token_call_credentials(token))
        metadata = ()
    return module.secure_channel(target, creds, options=options), metadata


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
