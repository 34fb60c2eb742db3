"""A task running for one gRPC stream: its own thread, events out, the request and loss
replies in.

The handler's generator yields the task's events as they come; one reader thread owns the
client's half of a bidi stream (the opening request, then LossReply messages);
``context.add_callback`` marks the job cancelled when the client cancels or goes away, and the
task stops at its next network call.
"""

from __future__ import annotations

import contextvars
import logging
import queue
import threading
import time
import traceback

import torch

from adjointdpm.tensors import TensorError, decode_tensor

from ..errors import (Cancelled, DeadlineExceeded, FailedPrecondition, InvalidArgument,
                      ResourceExhausted, ServiceError)
from ..tasks import ClientQuery, Job, Queued
from ..losses import LossAnswer, check_reply
from ..telemetry import tracing

log = logging.getLogger("adjointdpm.jobs")

__all__ = ["StreamJob"]

_END = object()
FIRST_MESSAGE_S = 30.0
_EMPTY = "a stream message carries neither a spec nor a loss reply (its oneof is not set)"


class StreamJob(Job):
    """``admission`` bounds the active jobs; ``engine`` runs their network calls (a job waiting
    for its client is parked there); ``metrics`` (optional) counts NFE and queue time; the
    deadline is the client's, capped at ``max_request_s``."""

    def __init__(self, context, limits, admission, engine, *, metrics=None, rpc: str = "",
                 max_request_s: float | None = None, caller: str = "local"):
        now = time.monotonic()
        limits_s = [s for s in (context.time_remaining(), max_request_s) if s is not None]
        super().__init__(deadline=now + min(limits_s) if limits_s else None, caller=caller)
        self.limits, self.admission, self.engine = limits, admission, engine
        self.metrics, self.rpc = metrics, rpc
        self._out: queue.Queue = queue.Queue()
        self._replies: queue.Queue = queue.Queue(maxsize=1)  # at most the one reply asked for
        self._reader_done = threading.Event()
        self._asking = threading.Event()
        if not context.add_callback(self.cancelled.set):  # the call already ended
            self.cancelled.set()
        self._protocol_error: str | None = None
        self._admitted = None  # the admission slot, once the job runs

    def count_nfe(self, phase: str, n: int) -> None:
        if self.metrics is not None and n > 0:
            self.metrics.nfe.labels(phase=phase).inc(n)

    # -- Job interface (called from the task's thread) ------------------------------------------
    def emit(self, event) -> None:
        self._out.put(("event", event))

    def check(self) -> None:
        if self._protocol_error:
            raise InvalidArgument(self._protocol_error)
        super().check()

    def ask(self, query: ClientQuery) -> LossAnswer:
        """The client's reply, decoded and checked once, here at the edge (``check_reply``)."""
        self._asking.set()
        with tracing.span("adjointdpm.client_loss", loss=query.name, term=int(query.term)):
            self._out.put(("event", query))
            # waiting for the client holds no device turn and (within its allowance) no slot
            with self.engine.parked(self), self._admitted.parked():
                reply = self._await_reply(query)
        if reply.term != query.term:
            raise InvalidArgument(f"loss reply for term {reply.term}, but term {query.term} was asked")
        if not reply.HasField("grad"):
            raise InvalidArgument(f"the loss reply for {query.name!r} carries no gradient")
        try:
            grad = decode_tensor(reply.grad, name=f"gradient of {query.name!r}",
                                 max_elements=self.limits.max_tensor_elements, shape=query.x.shape,
                                 dtypes=("float16", "float32", "float64"))
        except TensorError as err:
            raise InvalidArgument(str(err)) from err
        return check_reply(reply.value, grad, query.x.shape, query.who, query.working,
                           list(reply.values))

    def _await_reply(self, query: ClientQuery):
        deadline = time.monotonic() + self.limits.client_loss_timeout_s
        while True:
            self.check()
            try:
                return self._replies.get(timeout=0.2)
            except queue.Empty:
                if self._reader_done.is_set() and self._replies.empty() and not self._protocol_error:
                    raise FailedPrecondition(f"the client closed its stream without answering the "
                                             f"loss query for {query.name!r}")
                if time.monotonic() > deadline:
                    raise DeadlineExceeded(f"no answer to the loss query for {query.name!r} within "
                                           f"{self.limits.client_loss_timeout_s:g} s")

    # -- the stream side -------------------------------------------------------------------------
    def receive(self, request_iterator, rpc: str):
        """Own the client's half of a bidi stream: one reader thread takes the opening spec
        (which must come within FIRST_MESSAGE_S — a client that opens a stream and says nothing
        must not hold a handler thread), then the LossReply messages, until the stream ends."""
        first: queue.Queue = queue.Queue(maxsize=1)

        def reader():
            try:
                try:
                    first.put(next(request_iterator))
                except BaseException as err:  # noqa: BLE001 — StopIteration, or the RPC ended
                    first.put(err)
                    return
                for msg in request_iterator:
                    kind = msg.WhichOneof("kind")
                    if kind is None:
                        self._protocol_error = f"{rpc}: {_EMPTY}"
                    elif kind != "loss_reply":
                        self._protocol_error = "the client sent a second spec on one stream"
                    elif not self._asking.is_set():
                        self._protocol_error = "the client sent a loss reply nobody asked for"
                    else:
                        self._asking.clear()
                        self._replies.put_nowait(msg.loss_reply)
                    if self._protocol_error:
                        return
            except InvalidArgument as err:  # an undecodable message
                self._protocol_error = str(err)
            except Exception:  # the stream broke: the client went away
                self.cancelled.set()
            finally:
                self._reader_done.set()

        threading.Thread(target=reader, name="adjointdpm-reader", daemon=True).start()
        try:
            msg = first.get(timeout=FIRST_MESSAGE_S)
        except queue.Empty:
            raise InvalidArgument(f"{rpc}: no request within {FIRST_MESSAGE_S:.0f} s of opening "
                                  "the stream") from None
        if isinstance(msg, StopIteration):
            raise InvalidArgument(f"{rpc}: the stream closed before the request")
        if isinstance(msg, BaseException):
            raise msg
        if msg.WhichOneof("kind") is None:
            raise InvalidArgument(f"{rpc}: {_EMPTY}")
        if msg.WhichOneof("kind") != "spec":
            raise InvalidArgument(f"{rpc}: the first message must be the spec")
        return msg.spec

    def run(self, task, to_event, to_result):
        """Yield event messages while ``task(job)`` runs in a thread, then its result message.

        Raises ServiceError (or an unexpected exception) from the task in the caller's thread.
        """
        def work():
            queued_at = time.monotonic()
            try:
                with self.admission.slot(self.check, lambda k: self.emit(Queued(k)),
                                         self.caller) as self._admitted, self.engine.session(self):
                    tracing.record("adjointdpm.queue", queued_at)
                    if self.metrics is not None:
                        self.metrics.queue_time.labels(rpc=self.rpc).observe(time.monotonic() - queued_at)
                    self.check()
                    # this job's backward runs on this thread, not on autograd's shared CUDA
                    # worker (where jobs would queue behind each other and the engine's VJPs)
                    with torch.autograd.set_multithreading_enabled(False):
                        self._out.put(("result", task(self)))
            except BaseException as err:  # noqa: BLE001 — delivered to the handler, not lost
                _drop_locals(err)
                self._out.put(("error", err))
            finally:
                if not self.engine.active:  # not under jobs that still run: they would refill it
                    _release_memory()
                self._out.put(("end", _END))

        context = contextvars.copy_context()  # the request ID follows the task into its thread
        thread = threading.Thread(target=context.run, args=(work,), name="adjointdpm-task", daemon=True)
        thread.start()
        outcome = None
        while True:
            kind, item = self._out.get()
            if kind == "event":
                yield to_event(item)
            elif kind == "result":
                outcome = ("result", item)
            elif kind == "error":
                outcome = ("error", item)
            else:
                break
        thread.join()
        if outcome is None:
            raise Cancelled("the task ended without a result")
        if outcome[0] == "error":
            err, outcome = outcome[1], None
            if not isinstance(err, ServiceError):
                log.error("task failed:\n%s", "".join(traceback.format_exception(err)))
            try:
                raise err
            finally:
                del err  # this frame, kept by the traceback, must not hold it: a cycle
        message = to_result(outcome[1])
        size = message.ByteSize()
        if size > self.limits.max_message_bytes:  # gRPC would fail it as "CANCELLED" for the log
            raise ResourceExhausted(
                f"the result is {size / 2**20:.1f} MiB, over the server's message limit of "
                f"{self.limits.max_message_bytes / 2**20:.1f} MiB: ask for fewer samples or "
                "outputs (weight gradients: as an artifact)")
        yield message


def _drop_locals(err: BaseException) -> None:
    """Clear the locals of the finished frames in ``err``'s tracebacks (its context and cause
    too). A task that stops mid-solve raises from deep inside it: those frames hold the partial
    graph (GiB under backprop) and the job, and the job's queue holds the error — a reference
    cycle only a full garbage collection would free, in practice never. The tracebacks still
    print (file, line, code); only their variables go."""
    stack, seen = [err], set()
    while stack:
        err = stack.pop()
        if err is not None and id(err) not in seen:
            seen.add(id(err))
            traceback.clear_frames(err.__traceback__)
            stack += [err.__cause__, err.__context__]


def _release_memory() -> None:
    """When the last job ends, its CUDA blocks go back to the device, not only to torch's cache,
    and the C heap's free pages to the OS (glibc keeps them otherwise: after a big request the
    server's RSS would stay at its peak; docs/design.md §6)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if _malloc_trim is not None:
        _malloc_trim(0)


def _libc_malloc_trim():
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        return None


_malloc_trim = _libc_malloc_trim()
