"""``Client``: one channel to an AdjointDPM server; a method per RPC, numpy in and out.

Every streaming method returns its result object; with ``stream=True`` it returns a ``Call``
to iterate over the events as they arrive (``call.result`` is set at the end); a tqdm bar shows
progress when stderr is a terminal (``progress=True``/``False`` forces it); ``on_event`` sees
every event.
"""

from __future__ import annotations

import queue
import sys
from typing import Any, Callable, Iterable, Sequence

import grpc
import numpy as np
from google.protobuf import struct_pb2

from ._losses import ClientLoss, as_term, evaluate_client_loss
from ._results import (ArtifactInfo, GradientResult, IterationRecord, OptimizeResult, SampleResult,
                       ValidationRecord)
from ._tensors import encode_tensor
from .v1 import adjointdpm_pb2 as pb
from .v1 import adjointdpm_pb2_grpc as pb_grpc

__all__ = ["Client", "Call", "AdjointDPMError"]

_TARGETS = {"x_T": pb.X_T, "x_t": pb.X_T, "cond": pb.COND, "token": pb.TOKEN, "weights": pb.WEIGHTS}
_DOMAINS = {"image": pb.IMAGE, "latent": pb.LATENT}


class AdjointDPMError(RuntimeError):
    """A call that ended with a non-OK status: ``code`` (grpc.StatusCode) and ``details``."""

    def __init__(self, code, details: str):
        super().__init__(f"{code.name}: {details}")
        self.code, self.details = code, details


def _generation(model="", adapter="", prompt=None, negative_prompt=None, labels=None, cond=None,
                embedding="", batch=None, seed=None, x_T=None, steps=None, solver="",
                guidance_scale=None, grid="", t_start=None) -> pb.Generation:
    def many(v):
        return [] if v is None else ([v] if isinstance(v, (str, int, np.integer)) else list(v))

    g = pb.Generation(model=model, adapter=adapter, prompt=many(prompt),
                      negative_prompt=many(negative_prompt), labels=[int(v) for v in many(labels)],
                      embedding=embedding, batch=batch or 0, steps=steps or 0, solver=solver, grid=grid)
    if cond is not None:
        g.cond.CopyFrom(encode_tensor(cond))
    if x_T is not None:
        g.x_T.CopyFrom(encode_tensor(np.asarray(x_T, dtype=np.float32)))
    if seed is not None:
        g.seed = seed
    if guidance_scale is not None:
        g.guidance_scale = guidance_scale
    if t_start is not None:
        g.t_start = t_start
    return g


def _loss_terms(losses) -> tuple[list[pb.LossTerm], dict[int, ClientLoss]]:
    items = losses if isinstance(losses, (list, tuple)) else [losses]
    terms, client = [], {}
    for k, item in enumerate(items):
        term = as_term(item)
        msg = pb.LossTerm(weight=term.weight, domain=_DOMAINS[term.domain])
        if isinstance(term, ClientLoss):
            msg.client = term.name
            client[k] = term
        else:
            params = struct_pb2.Struct()
            params.update(dict(term.params))
            msg.server.CopyFrom(pb.ServerLoss(name=term.name, params=params, tensors={
                key: encode_tensor(np.asarray(value)) for key, value in term.tensors.items()}))
        terms.append(msg)
    return terms, client


def _optimizer(name="adam", lr=0.05, iterations=10, momentum=0.0, schedule="", warmup=0) -> pb.Optimizer:
    return pb.Optimizer(name=name, lr=lr, iterations=iterations, momentum=momentum,
                        schedule=schedule, warmup=warmup)


def _stop(stop_when: dict | None):
    """``{"loss_below": float, "verdict_changed": bool, "patience": int}`` → StopWhen."""
    if stop_when is None:
        return None
    unknown = set(stop_when) - {"loss_below", "verdict_changed", "patience"}
    if unknown:
        raise TypeError(f"stop_when takes loss_below, verdict_changed, patience; not {sorted(unknown)}")
    return pb.StopWhen(**stop_when)


class Call:
    """The events of one streaming call; after iteration, ``result`` holds the result object."""

    def __init__(self, events: Iterable, to_result: Callable, on_event=None, progress=None,
                 grpc_call=None):
        self._events, self._to_result, self._grpc_call = events, to_result, grpc_call
        # progress=None: a bar when someone watches (stderr is a terminal), none in logs and CI
        self._on_event = on_event
        self._progress = sys.stderr.isatty() if progress is None else progress
        self.result = None
        self.checkpoints: list[ArtifactInfo] = []
        self.iterations: list[IterationRecord] = []
        self.validations: list[ValidationRecord] = []

    def __iter__(self):
        bar = None
        try:
            for event in self._events:
                kind = event.WhichOneof("kind")
                if self._on_event is not None:
                    self._on_event(event)
                if kind == "progress" and self._progress:
                    bar = self._update_bar(bar, event.progress)
                elif kind == "checkpoint":
                    self.checkpoints.append(ArtifactInfo.from_message(event.checkpoint))
                elif kind == "iteration":
                    self.iterations.append(IterationRecord.from_message(event.iteration))
                elif kind == "validation":
                    self.validations.append(ValidationRecord.from_message(event.validation))
                elif kind in ("sample", "gradient", "optimized"):
                    self.result = self._to_result(getattr(event, kind), self)
                yield event
        except grpc.RpcError as err:
            raise AdjointDPMError(err.code(), err.details()) from None
        finally:
            if self.result is None:  # abandoned (break, an exception, Ctrl-C): free the server's slot
                self.cancel()
            if bar is not None:
                bar.close()

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
        options = [("grpc.max_receive_message_length", max_message_bytes),
                   ("grpc.max_send_message_length", max_message_bytes), *options]
        if load_balancing:  # e.g. "round_robin" over dns:///adjointdpm-headless.ns.svc:50051
            options.append(("grpc.lb_policy_name", load_balancing))
        if tls:
            files = tls if isinstance(tls, dict) else {}
            creds = grpc.ssl_channel_credentials(**{k: _pem(v) for k, v in files.items()})
            self.channel = grpc.secure_channel(target, creds, options=options)
        else:
            self.channel = grpc.insecure_channel(target, options=options)
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
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
            return method(request, metadata=self.metadata, timeout=self.timeout)
        except grpc.RpcError as err:
            raise AdjointDPMError(err.code(), err.details()) from None

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

        call = method(requests(), metadata=self.metadata, timeout=self.timeout)

        def events():
            try:
                for event in call:
                    if event.WhichOneof("kind") == "loss_query":
                        q = event.loss_query
                        term = client_losses.get(q.term)
                        if term is None:
                            call.cancel()
                            raise AdjointDPMError(grpc.StatusCode.FAILED_PRECONDITION,
                                                  f"the server asked for unknown client loss term {q.term}")
                        from ._tensors import decode_tensor

                        try:
                            value, grad, values = evaluate_client_loss(term, decode_tensor(q.x))
                            reply = pb.LossReply(term=q.term, value=value, grad=encode_tensor(grad),
                                                 values=values)
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

    # -- RPCs -----------------------------------------------------------------------------------
    def sample(self, *, images: bool = True, pixels: bool = False, stream: bool = False,
               on_event=None, progress: bool | None = None, **generation) -> SampleResult:
        """Sample images: ``prompt=``/``labels=``/``cond=``, ``seed=``/``x_T=``, ``steps=``, …"""
        request = pb.SampleRequest(generation=_generation(**generation), no_images=not images,
                                   return_pixels=pixels)
        events = self.stub.Sample(request, metadata=self.metadata, timeout=self.timeout)
        return self._run(events, lambda m, _: SampleResult.from_message(m), stream, on_event, progress)

    def compute_gradient(self, losses, *, targets: Sequence[str] = ("x_T",), grad_mode: str = "",
                         memory_budget_mib: int = 0, token: dict | None = None, weights: dict | None = None,
                         images: bool = False, stream: bool = False, on_event=None,
                         progress: bool | None = None, **generation) -> GradientResult:
        """∂(Σ losses)/∂targets: ``x_T`` (or x_t with ``t_start=``), ``cond``, ``token``, ``weights``.

        ``token``: {"placeholder", "initializer", "embedding"}; ``weights``: {"parameters"
        (fnmatch patterns), "lora_rank", "inline"}. ``grad_mode``: "" (= "auto": exact, at up to
        plain backprop's speed within the server's memory budget, which ``memory_budget_mib`` may
        lower), "checkpoint", "adjoint" or "backprop" (every call here takes the two).
        """
        terms, client = _loss_terms(losses)
        request = pb.GradientRequest(generation=_generation(**generation), losses=terms,
                                     targets=[_TARGETS[t] for t in targets], grad_mode=grad_mode,
                                     memory_budget_mib=memory_budget_mib,
                                     token=_token(token), weights=pb.WeightsSpec(**(weights or {})),
                                     return_images=images)
        events = self._bidi(self.stub.ComputeGradient, pb.GradientMessage, request, client)
        return self._run(events, lambda m, _: GradientResult.from_message(m), stream, on_event, progress)

    def optimize_latent(self, losses, *, optimizer: str = "adam", lr: float = 0.05,
                        iterations: int = 10, momentum: float = 0.0, schedule: str = "",
                        warmup: int = 0, constraint: str = "", epsilon: float = 0.0,
                        norm_weight: float = 0.0, image_every: int = 0, grad_mode: str = "",
                        memory_budget_mib: int = 0, guided: dict | None = None, stop_when: dict | None = None,
                        stream: bool = False, on_event=None, progress: bool | None = None,
                        **generation) -> OptimizeResult:
        """Optimize x_T (``constraint`` "linf"/"l2" ε-ball or "sphere"); each sample keeps its best
        iterate (``result.x_T``; ``result.iterations[k].x_T`` holds every one) and stops on its
        own with ``stop_when={loss_below, verdict_changed, patience}``. Or with ``guided={every,
        scale, inner_steps, grad_steps, step ("normalized"|"raw"), clip}`` steer x_t during
        sampling (paper §4.1). ``schedule``: "constant", "cosine" or "linear" learning rate."""
        terms, client = _loss_terms(losses)
        request = pb.OptimizeLatentRequest(
            generation=_generation(**generation), losses=terms,
            optimizer=_optimizer(optimizer, lr, iterations, momentum, schedule, warmup),
            constraint=pb.Constraint(norm=constraint, epsilon=epsilon), norm_weight=norm_weight,
            image_every=image_every, grad_mode=grad_mode, memory_budget_mib=memory_budget_mib,
            stop_when=_stop(stop_when))
        if guided is not None:
            request.guided.CopyFrom(pb.GuidedSampling(**guided))
        events = self._bidi(self.stub.OptimizeLatent, pb.OptimizeLatentMessage, request, client)
        return self._run(events, OptimizeResult.from_message, stream, on_event, progress)

    def finetune_weights(self, losses, examples: Sequence[dict], *, method: str = "lora",
                         lora_rank: int = 4, lora_alpha: float = 0.0, target_modules=(),
                         optimizer: str = "adam", lr: float = 1e-3, iterations: int = 10,
                         checkpoint_every: int = 0, name: str = "", batch_size: int = 0,
                         grad_mode: str = "", memory_budget_mib: int = 0, resume_from: str = "",
                         keep_checkpoints: int = 0,
                         schedule: str = "", warmup: int = 0, validation: Sequence[dict] = (),
                         validate_every: int = 0, keep_best: bool = False,
                         stop_when: dict | None = None, stream: bool = False, on_event=None,
                         progress: bool | None = None, **generation) -> OptimizeResult:
        """Fine-tune (LoRA or full) on ``examples`` = [{"seed"|"x_T", "prompt"|"label"}, …];
        the result's ``artifact.id`` is an adapter for ``sample(adapter=...)``. ``resume_from``:
        a checkpoint id of the same run (sent again with the same arguments) to continue;
        ``keep_checkpoints``: this run's newest checkpoints the server keeps (0 = 3).
        ``validation``: held-out examples, sampled every ``validate_every`` steps
        (``result.validations``: losses and, on digits, the share of verdicts kept);
        ``keep_best``: return the adapter of the best validation loss; ``stop_when={loss_below,
        patience}`` on the validation loss."""
        terms, client = _loss_terms(losses)
        request = pb.FinetuneRequest(
            generation=_generation(**generation), examples=_examples(examples), losses=terms,
            optimizer=_optimizer(optimizer, lr, iterations, 0.0, schedule, warmup), method=method,
            lora_rank=lora_rank, lora_alpha=lora_alpha, target_modules=list(target_modules),
            checkpoint_every=checkpoint_every, name=name, batch_size=batch_size, grad_mode=grad_mode,
            memory_budget_mib=memory_budget_mib, resume_from=resume_from, keep_checkpoints=keep_checkpoints,
            validation=_examples(validation), validate_every=validate_every, keep_best=keep_best,
            stop_when=_stop(stop_when))
        events = self._bidi(self.stub.FinetuneWeights, pb.FinetuneMessage, request, client)
        return self._run(events, OptimizeResult.from_message, stream, on_event, progress)

    def optimize_embedding(self, losses=(), *, target_image=None, token: dict | None = None,
                           optimizer: str = "adam", lr: float = 0.05, iterations: int = 10,
                           name: str = "", grad_mode: str = "", memory_budget_mib: int = 0,
                           image_every: int = 0,
                           schedule: str = "", warmup: int = 0, prior: str = "",
                           prior_weight: float = 0.0, stop_when: dict | None = None,
                           stream: bool = False, on_event=None, progress: bool | None = None,
                           **generation) -> OptimizeResult:
        """Learn a conditioning (SD: a token, ``prompt`` holding its placeholder) from losses
        and/or a target image; the result's ``artifact.id`` goes to ``sample(embedding=...)``.
        ``prior``: "norm" or "gaussian" keeps the vector among the model's own embeddings
        (``prior_weight``, 0 = 1); ``stop_when={loss_below, patience}``; the best iterate's
        vector is kept."""
        terms, client = _loss_terms(losses) if losses else ([], {})
        request = pb.OptimizeEmbeddingRequest(
            generation=_generation(**generation), losses=terms,
            optimizer=_optimizer(optimizer, lr, iterations, 0.0, schedule, warmup), name=name,
            grad_mode=grad_mode, memory_budget_mib=memory_budget_mib, image_every=image_every,
            prior=prior, prior_weight=prior_weight,
            stop_when=_stop(stop_when))
        if target_image is not None:
            request.target_image.CopyFrom(encode_tensor(np.asarray(target_image, dtype=np.float32)))
        if token is not None:
            request.token.CopyFrom(_token(token))
        events = self._bidi(self.stub.OptimizeEmbedding, pb.OptimizeEmbeddingMessage, request, client)
        return self._run(events, OptimizeResult.from_message, stream, on_event, progress)

    def list_models(self) -> list[dict[str, Any]]:
        from google.protobuf.json_format import MessageToDict

        reply = self._unary(self.stub.ListModels, pb.ListModelsRequest())
        models = []
        for m in reply.models:
            d = MessageToDict(m, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
            for key in ("latent_shape", "image_shape", "cond_shape"):
                d[key] = list(getattr(m, key))  # ints, not the strings JSON makes of int64
            models.append(d)
        return models

    def list_losses(self) -> list[dict[str, Any]]:
        from google.protobuf.json_format import MessageToDict

        reply = self._unary(self.stub.ListLosses, pb.ListLossesRequest())
        return [MessageToDict(m, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
                for m in reply.losses]

    def download_artifact(self, artifact_id: str, path=None) -> tuple[ArtifactInfo, bytes]:
        """The artifact's description and bytes (a safetensors file); written to ``path`` if given."""
        info, parts = None, []
        try:
            for chunk in self.stub.GetArtifact(pb.GetArtifactRequest(id=artifact_id),
                                               metadata=self.metadata, timeout=self.timeout):
                if chunk.HasField("info"):
                    info = ArtifactInfo.from_message(chunk.info)
                parts.append(chunk.data)
        except grpc.RpcError as err:
            raise AdjointDPMError(err.code(), err.details()) from None
        data = b"".join(parts)
        if path is not None:
            from pathlib import Path

            Path(path).write_bytes(data)
        return info, data


def _examples(examples: Sequence[dict]) -> list[pb.FinetuneExample]:
    """[{"seed"|"x_T", "prompt"|"label"}, …] → FinetuneExample messages."""
    out = []
    for ex in examples:
        e = pb.FinetuneExample(prompt=ex.get("prompt", ""))
        if ex.get("seed") is not None:
            e.seed = ex["seed"]
        if ex.get("label") is not None:
            e.label = int(ex["label"])
        if ex.get("x_T") is not None:
            e.x_T.CopyFrom(encode_tensor(np.asarray(ex["x_T"], dtype=np.float32)))
        out.append(e)
    return out


def _token(token: dict | None) -> pb.TokenSpec:
    token = dict(token or {})
    msg = pb.TokenSpec(placeholder=token.get("placeholder", ""), initializer=token.get("initializer", ""))
    if token.get("embedding") is not None:
        msg.embedding.CopyFrom(encode_tensor(np.asarray(token["embedding"], dtype=np.float32)))
    return msg


def _pem(value):
    if value is None or isinstance(value, bytes):
        return value
    from pathlib import Path

    return Path(value).read_bytes()
