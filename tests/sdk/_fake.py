"""A scripted peer for the SDK: a real ``grpc.server`` on a loopback port serving a fake
``AdjointDPMServiceServicer`` written here (not the project's server). It records every call it receives
(the request, the metadata, the deadline, each LossReply) and answers with a script of steps:

* an ``Event`` (``event(progress=…)``): sent in the RPC's own response message
  (``SampleResponse``, ``ComputeGradientResponse``, …);
* ``Query(term, x, ...)``: a LossQuery event, then the next client message is read and recorded
  (a client that sends none instead, or cancels, leads to ``Hold``);
* ``Abort(code, details)``: ``context.abort``, the status the client must see;
* ``Hold()``: wait (up to 10 s) until the client cancels.

``fake.cancelled`` is set when a call ends before its script did, other than by ``Abort``: the
client cancelled it (the RPC-termination callback of ``context.add_callback`` sees it, also when
the cancellation comes while the servicer is blocked sending an event).

Torch-free: numpy, grpc and the SDK's own messages only.
"""

from __future__ import annotations

import threading
import time
from concurrent import futures
from dataclasses import dataclass, field

import grpc
import numpy as np

import adjointdpm
from adjointdpm import encode_tensor
from adjointdpm.v1 import adjointdpm_pb2 as pb
from adjointdpm.v1 import adjointdpm_pb2_grpc as pb_grpc

STREAMING = ("Sample", "ComputeGradient", "OptimizeLatent", "FinetuneWeights", "OptimizeEmbedding")
BIDI = STREAMING[1:]
HOLD_S = 10.0


@dataclass
class Event:
    """One event of a script: its field in the RPC's response oneof and its message."""

    kind: str
    message: object

    def response(self, method: str):
        """As the RPC ``method`` sends it: its own response message with this field set."""
        return getattr(pb, f"{method}Response")(**{self.kind: self.message})


def event(**one) -> Event:
    """``event(progress=pb.Progress(...))``: a script step sending that event."""
    (kind, message), = one.items()
    return Event(kind, message)


@dataclass
class Query:
    term: int
    x: np.ndarray
    name: str = ""
    domain: int = pb.DOMAIN_IMAGE
    iteration: int = 0

    def event(self) -> Event:
        return event(loss_query=pb.LossQuery(term=self.term, name=self.name, domain=self.domain,
                                             x=encode_tensor(self.x), iteration=self.iteration))


@dataclass
class Abort:
    code: grpc.StatusCode
    details: str


@dataclass
class Hold:
    pass


@dataclass
class Received:
    """One RPC as the fake saw it."""

    method: str
    request: object                      # the request message (bidi: the first message's ``spec``)
    first_kind: str | None               # bidi: which oneof the first message set
    metadata: dict
    time_remaining: float | None
    replies: list = field(default_factory=list)       # LossReply messages, in order
    reply_kinds: list = field(default_factory=list)   # the oneof of each later message
    finished: bool = False                            # the script ran to its end
    aborted: bool = False                             # the script ended the call with a status
    cancelled: bool = False                           # the call ended before the script did


X0 = np.linspace(-1, 1, 2 * 1 * 4 * 4, dtype=np.float32).reshape(2, 1, 4, 4)
XT = np.arange(2 * 1 * 4 * 4, dtype=np.float32).reshape(2, 1, 4, 4) / 10


def result_event(method: str) -> Event:
    """A minimal, valid result of ``method`` (the SDK decodes x0/start_latents unconditionally)."""
    if method == "Sample":
        return event(result=pb.SampleResult(x0=encode_tensor(X0), start_latents=encode_tensor(XT)))
    if method == "ComputeGradient":
        return event(result=pb.GradientResult(loss=1.5, x0=encode_tensor(X0)))
    return event(result=pb.OptimizeResult(loss=0.5, start_latents=encode_tensor(XT), x0=encode_tensor(X0)))


class FakeServicer(pb_grpc.AdjointDPMServiceServicer):
    def __init__(self):
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self.calls: list[Received] = []
            self.scripts: dict[str, list] = {}
            self.cancelled = threading.Event()      # a Hold saw the client cancel
            self.replied = threading.Event()        # a LossReply arrived
            self.started = threading.Event()        # a call arrived
            self.chunks: list[pb.GetArtifactResponse] = []
            self.models = pb.ListModelsResponse()
            self.losses = pb.ListLossesResponse()
            self.unary_abort: Abort | None = None
            # GetServerMetadata: what the fake says it is (this SDK's release unless a test says
            # otherwise), how often it was asked, and whether it answers at all
            self.version, self.api_package = adjointdpm.__version__, pb.DESCRIPTOR.package
            self.api_packages: list[str] = []  # unset: a server that lists none (api_package alone)
            self.metadata_calls = 0
            self.metadata_unimplemented = False

    # -- what tests read --------------------------------------------------------------------------
    def script(self, method: str, steps: list) -> None:
        self.scripts[method] = list(steps)

    def only(self, method: str) -> Received:
        """The one call of ``method`` (and no other call at all)."""
        assert [c.method for c in self.calls] == [method], [c.method for c in self.calls]
        return self.calls[0]

    # -- the handlers -----------------------------------------------------------------------------
    def _record(self, method, request, context, first_kind=None) -> Received:
        received = Received(method, request, first_kind, dict(context.invocation_metadata()),
                            context.time_remaining())
        with self._lock:
            self.calls.append(received)
        cancelled = self.cancelled  # this test's, even when the callback comes late
        context.add_callback(lambda: self._ended(received, cancelled))
        self.started.set()
        return received

    @staticmethod
    def _ended(received: Received, cancelled: threading.Event) -> None:
        """The RPC is over (any way): before the script's end and not by Abort = cancelled."""
        if not received.finished and not received.aborted:
            received.cancelled = True
            cancelled.set()

    @staticmethod
    def _hold(context, received: Received) -> None:
        """Wait for the client to cancel; one that does not in HOLD_S ends the script."""
        deadline = time.monotonic() + HOLD_S
        while context.is_active() and time.monotonic() < deadline:
            time.sleep(0.005)
        if context.is_active():
            received.finished = True

    def _play(self, method, context, received, messages=None):
        for step in self.scripts.get(method, [result_event(method)]):
            if isinstance(step, Event):
                yield step.response(method)
            elif isinstance(step, Query):
                yield step.event().response(method)
                try:
                    msg = next(messages)
                except (StopIteration, grpc.RpcError):  # half-closed or cancelled: no reply
                    self._hold(context, received)
                    return
                received.reply_kinds.append(msg.WhichOneof("kind"))
                received.replies.append(msg.loss_reply)
                self.replied.set()
            elif isinstance(step, Abort):
                received.aborted = True
                context.abort(step.code, step.details)
            elif isinstance(step, Hold):
                self._hold(context, received)
                return
            else:
                raise AssertionError(f"not a step: {step!r}")
        received.finished = True

    def _bidi(self, method, request_iterator, context):
        first = next(request_iterator)
        received = self._record(method, first.spec, context, first.WhichOneof("kind"))
        yield from self._play(method, context, received, request_iterator)

    def Sample(self, request, context):
        received = self._record("Sample", request, context)
        yield from self._play("Sample", context, received)

    def ComputeGradient(self, request_iterator, context):
        yield from self._bidi("ComputeGradient", request_iterator, context)

    def OptimizeLatent(self, request_iterator, context):
        yield from self._bidi("OptimizeLatent", request_iterator, context)

    def FinetuneWeights(self, request_iterator, context):
        yield from self._bidi("FinetuneWeights", request_iterator, context)

    def OptimizeEmbedding(self, request_iterator, context):
        yield from self._bidi("OptimizeEmbedding", request_iterator, context)

    def _unary(self, method, request, context, reply):
        received = self._record(method, request, context)
        if self.unary_abort is not None:
            received.aborted = True
            context.abort(self.unary_abort.code, self.unary_abort.details)
        received.finished = True
        return reply

    def ListModels(self, request, context):
        return self._unary("ListModels", request, context, self.models)

    def ListLosses(self, request, context):
        return self._unary("ListLosses", request, context, self.losses)

    def DeleteArtifact(self, request, context):
        info = pb.ArtifactInfo(id=request.id, kind="lora", model="digits", size=1)
        return self._unary("DeleteArtifact", request, context, pb.DeleteArtifactResponse(artifact=info))

    def GetServerMetadata(self, request, context):
        """Not recorded in ``calls`` (the SDK asks it once per channel, before its first call)."""
        with self._lock:
            self.metadata_calls += 1
        if self.metadata_unimplemented:
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")
        return pb.GetServerMetadataResponse(name="fake-adjointdpm", version=self.version,
                                            api_package=self.api_package, models=["digits"],
                                            api_packages=self.api_packages)

    def GetArtifact(self, request, context):
        received = self._record("GetArtifact", request, context)
        if self.unary_abort is not None:
            received.aborted = True
            context.abort(self.unary_abort.code, self.unary_abort.details)
        yield from self.chunks
        received.finished = True


class FakeServer:
    """The servicer on ``127.0.0.1:<port 0>`` in this process."""

    def __init__(self):
        self.servicer = FakeServicer()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        pb_grpc.add_AdjointDPMServiceServicer_to_server(self.servicer, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.target = f"127.0.0.1:{self.port}"
        self.server.start()

    def stop(self) -> None:
        self.server.stop(0)
