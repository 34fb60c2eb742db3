"""The gRPC servicer: each RPC translates its messages into a task and streams the task's events.

Errors become statuses here and only here: a ServiceError carries its code; any other exception
is a bug, logged with its traceback and answered INTERNAL — the server and other jobs go on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import threading
import time

import grpc

from adjointdpm.v1 import adjointdpm_pb2 as pb
from adjointdpm.v1 import adjointdpm_pb2_grpc as pb_grpc

from ..admission import AdmissionQueue
from ..core import GRAD_MODES, SOLVERS
from ..errors import DataLoss, ResourceExhausted, ServiceError
from ..losses import available_losses
from ..runtime import Runtime
from ..storage.export import export
from ..tasks import (run_finetune_weights, run_compute_gradient, run_optimize_embedding, run_optimize_latent,
                     run_sample)
from ..telemetry.logs import TENANT
from . import convert
from .auth import DEFAULT_TENANT, caller_of
from .call_limit import RETRY_PUSHBACK
from .streams import StreamJob

log = logging.getLogger("adjointdpm.service")

__all__ = ["AdjointDPMService"]

CHUNK = 1 << 20


MAX_DETAILS = 1024  # bytes of an error message: never a megabyte of echoed input


def _details(text: str) -> str:
    data = text.encode()
    if len(data) <= MAX_DETAILS:
        return text
    return data[:MAX_DETAILS - 3].decode(errors="ignore") + "…"


def _abort(context, err: Exception):
    if isinstance(err, ServiceError):
        if err.code == "INTERNAL":
            log.error("internal error: %s", err)
        if err.retry_after_s is not None:  # gRPC's server pushback (gRFC A6)
            context.set_trailing_metadata(((RETRY_PUSHBACK, str(round(err.retry_after_s * 1000))),))
        context.abort(grpc.StatusCode[err.code], _details(str(err)))
    log.exception("internal error", exc_info=err)
    context.abort(grpc.StatusCode.INTERNAL, _details(f"internal error: {type(err).__name__}: {err}"))


class AdjointDPMService(pb_grpc.AdjointDPMServiceServicer):
    def __init__(self, runtime: Runtime, metrics=None):
        self.rt = runtime
        config = runtime.config
        self.admission = AdmissionQueue(
            config.max_active_jobs, config.max_queue, tenant_max_queue=config.tenant_max_queue,
            max_parked=config.max_parked_jobs, tenant_max_parked=config.tenant_max_parked,
            weights=dict(config.tenant_weights))
        self.metrics = metrics
        self.jobs: set[StreamJob] = set()
        self._active = 0
        self._active_lock = threading.Lock()

    @property
    def active_jobs(self) -> int:
        """Jobs whose task thread is still running (cancelled ones count until they stop)."""
        return self._active

    def _track(self, task):
        def tracked(job):
            with self._active_lock:
                self._active += 1
            try:
                return task(job)
            finally:
                with self._active_lock:
                    self._active -= 1
        return tracked

    def _tenant(self) -> str:
        return TENANT.get() or DEFAULT_TENANT

    def _stream(self, context, rpc: str, build, to_result, *, request=None, request_iterator=None):
        """Run ``build(request, ctx)``'s task as a job on this stream (``ctx``: the tenant's view
        of the runtime), yielding the RPC's response messages, aborting on errors. A bidi stream's
        spec is read by the job, which owns the stream's reading."""
        response = _response(getattr(pb, f"{rpc}Response"))
        job, slot = None, ""
        tenant = self._tenant()
        config = self.rt.config
        try:
            job = StreamJob(context, self.rt.limits, self.admission, self.rt.engine,
                            metrics=self.metrics, rpc=rpc, max_request_s=config.max_request_s,
                            caller=caller_of(context, tenant if config.tokens else None))
            job.tenant = tenant
            # the tenant's jobs on every replica (the cluster's coordination store)
            slot, held = self.rt.cluster.enter(tenant, config.tenant_max_jobs)
            if slot is None:
                hint = self.admission.typical_job_s
                raise ResourceExhausted(f"your tenant's job quota is full: {held} of "
                                        f"{config.tenant_max_jobs} jobs active or queued (the "
                                        f"per-tenant limit, on every replica); retry in {hint:.1f} s",
                                        retry_after_s=hint)
            with self._active_lock:
                self.jobs.add(job)
            if request_iterator is not None:
                request = job.receive(request_iterator, rpc)
            task = build(request, self.rt.for_tenant(tenant))
            yield from job.run(self._track(task), lambda e: response(*convert.event(e)),
                               lambda r: response(*to_result(r)))
        except Exception as err:  # noqa: BLE001 — every failure becomes a status
            if context.is_active():
                _abort(context, err)
        finally:
            if job is not None:
                job.cancelled.set()  # the stream is over: whatever still runs for it stops
                with self._active_lock:
                    self.jobs.discard(job)
            self.rt.cluster.leave(slot)

    def drain(self, grace: float) -> bool:
        """Graceful shutdown: refuse new jobs, ask running fine-tunes for a checkpoint, wait up
        to ``grace`` seconds, then cancel what is left. True when everything finished in time."""
        self.admission.close()
        with self._active_lock:
            jobs = list(self.jobs)
        for job in jobs:
            job.checkpoint_now.set()
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if self.idle:
                return True
            time.sleep(0.05)
        with self._active_lock:
            jobs = list(self.jobs)
        for job in jobs:
            job.cancelled.set()
        stop = time.monotonic() + 30
        while not self.idle and time.monotonic() < stop:
            time.sleep(0.05)
        return False

    @property
    def idle(self) -> bool:
        """No task thread running and nothing queued."""
        return not self._active and not self.admission.running and not self.admission.queued

    # -- streaming RPCs -------------------------------------------------------------------------
    def Sample(self, request, context):
        def build(r, ctx):
            spec, opts = convert.generation(r.generation, ctx.limits), convert.options_of("Sample", r)
            return lambda job: run_sample(ctx, spec, job, opts)
        return self._stream(context, "Sample", build, convert.sample_result, request=request)

    def ComputeGradient(self, request_iterator, context):
        def build(r, ctx):
            spec, losses, opts = _inputs("ComputeGradient", r, ctx.limits)
            token = convert.token(r.token, ctx.limits, opts)
            return lambda job: run_compute_gradient(ctx, spec, losses, job, opts, token)
        return self._stream(context, "ComputeGradient", build, convert.gradient_result,
                            request_iterator=request_iterator)

    def OptimizeLatent(self, request_iterator, context):
        def build(r, ctx):
            spec, losses, opts = _inputs("OptimizeLatent", r, ctx.limits)
            return lambda job: run_optimize_latent(ctx, spec, losses, job, opts)
        return self._stream(context, "OptimizeLatent", build, convert.optimize_result,
                            request_iterator=request_iterator)

    def FinetuneWeights(self, request_iterator, context):
        def build(r, ctx):
            spec, losses, opts = _inputs("FinetuneWeights", r, ctx.limits)
            examples = convert.examples(r.examples, ctx.limits)
            validation = convert.examples(r.validation, ctx.limits, "validation")
            conditions = convert.conditions(r.conditions, ctx.limits)
            return lambda job: run_finetune_weights(ctx, spec, examples, losses, job, opts, validation,
                                                    conditions=conditions)
        return self._stream(context, "FinetuneWeights", build, convert.optimize_result,
                            request_iterator=request_iterator)

    def OptimizeEmbedding(self, request_iterator, context):
        def build(r, ctx):
            spec, losses, opts = _inputs("OptimizeEmbedding", r, ctx.limits)
            target = convert.maybe_tensor(r, "target_image", ctx.limits)
            token = convert.token(r.token, ctx.limits, opts) if r.HasField("token") else None
            return lambda job: run_optimize_embedding(ctx, spec, losses, job, opts, token, target)
        return self._stream(context, "OptimizeEmbedding", build, convert.optimize_result,
                            request_iterator=request_iterator)

    # -- unary ----------------------------------------------------------------------------------
    def ListModels(self, request, context):
        artifacts = self.rt.for_tenant(self._tenant()).artifacts  # a tenant lists its own adapters
        models = []
        for name, backend in self.rt.models.items():
            # checkpoints too: each is an adapter and a resume point, and the one a cancelled
            # fine-tune writes never reached its client otherwise
            adapters = [convert.artifact_info(i) for i in artifacts.list(model=name)
                        if i.kind in ("lora", "full", "embedding", "checkpoint")]
            models.append(pb.ModelInfo(
                name=name, spec=backend.name, is_default=name == self.rt.default_model,
                latent_shape=list(backend.latent_shape), image_shape=list(backend.image_shape),
                conditioning=backend.conditioning, default_steps=backend.default_steps,
                default_guidance=backend.default_guidance or 0.0, solvers=list(SOLVERS),
                grad_modes=list(GRAD_MODES), adapters=adapters,
                path=backend.schedule.path,
                schedule=repr(backend.schedule), prediction=backend.prediction,
                default_grid=backend.default_grid, t_min=backend.schedule.t_min,
                t_max=backend.schedule.t_max, family=backend.family, guidance=backend.guidance,
                cond_shape=list(backend.cond_shape),
                token_dim=backend.token_dim if backend.has_text_encoder else 0))
        return pb.ListModelsResponse(models=models)

    def ListLosses(self, request, context):
        losses = [pb.LossInfo(name=name, description=cls.description, params=list(cls.params),
                              tensors=list(cls.tensors),
                              domain=convert.DOMAIN_OF[cls.domain])
                  for name, cls in available_losses(self.rt.settings).items()]
        return pb.ListLossesResponse(losses=losses)

    def GetServerMetadata(self, request, context):
        """What this server is and can do: a client checks the major version once per channel."""
        try:
            return convert.server_metadata(self.rt, available_losses(self.rt.settings))
        except Exception as err:  # noqa: BLE001
            _abort(context, err)

    def GetArtifact(self, request, context):
        """The artifact in chunks, read from the store as they are sent (never whole); its
        sha256 is checked on the way, and a mismatch ends the stream with DATA_LOSS."""
        try:
            artifacts = self.rt.for_tenant(self._tenant()).artifacts
            chunk = min(CHUNK, self.rt.limits.max_message_bytes - 64 * 1024)  # room for the framing
            if request.format not in ("", "native"):
                with artifacts.fetch(request.id) as (info, path):
                    data = export(info, path, self.rt.models.get(info.model), request.format)
                info = dataclasses.replace(info, size=len(data))
                for start in range(0, max(len(data), 1), chunk):
                    yield pb.GetArtifactResponse(info=convert.artifact_info(info) if start == 0 else None,
                                                 data=data[start:start + chunk])
                return
            with artifacts.open(request.id) as (info, stream):
                digest, first = hashlib.sha256(), True
                while True:
                    data = stream.read(chunk)
                    digest.update(data)
                    if data or first:
                        yield pb.GetArtifactResponse(info=convert.artifact_info(info) if first else None,
                                                     data=data)
                    first = False
                    if not data:
                        break
            if info.sha256 and digest.hexdigest() != info.sha256:
                raise DataLoss(f"artifact {info.id} is damaged: its bytes do not match the sha256 "
                               "recorded when it was written; discard what was received")
        except Exception as err:  # noqa: BLE001
            _abort(context, err)

    def DeleteArtifact(self, request, context):
        """The caller's artifact gone from the store (its quota freed) and from the adapter
        banks; a request using it now finishes on what it loaded."""
        try:
            artifacts = self.rt.for_tenant(self._tenant()).artifacts
            info = artifacts.info(request.id)  # NOT_FOUND for another tenant's, as for a missing one
            artifacts.delete(request.id)
            self.rt.forget(request.id)
            return pb.DeleteArtifactResponse(artifact=convert.artifact_info(info))
        except Exception as err:  # noqa: BLE001
            _abort(context, err)


def _response(message):
    """(field, event) → ``message`` (the RPC's response) with that oneof field set; an event the
    RPC's response does not declare is a bug (INTERNAL), never a silently different contract."""
    fields = message.DESCRIPTOR.oneofs_by_name["kind"].fields
    names = {f.name for f in fields}

    def wrap(field: str, event):
        if field not in names:
            raise TypeError(f"{message.DESCRIPTOR.name} has no {field!r} event")
        return message(**{field: event})
    return wrap


def _inputs(rpc: str, request, limits):
    """What every loss-taking RPC reads first: its generation, its loss terms, its options."""
    return (convert.generation(request.generation, limits), convert.losses(request.losses, limits),
            convert.options_of(rpc, request))
