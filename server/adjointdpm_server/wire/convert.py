"""Messages ↔ task specs and results: the only place that knows both the proto and the tasks.

Tensors are decoded with the server's limits (size checked before allocation); anything that
does not fit becomes ``InvalidArgument`` with the field's name.
"""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import torch
from google.protobuf import json_format, struct_pb2

from adjointdpm import options
from adjointdpm.tensors import TensorError, decode_tensor, encode_tensor
from adjointdpm.v1 import adjointdpm_pb2 as pb

from ..core import GRAD_MODES, HALF_DTYPES, SOLVERS
from ..errors import InvalidArgument
from ..integrity import MAX_PARAM, MAX_WEIGHT, check_input, check_number
from ..tasks import (Checkpoint, ClientQuery, ExampleSpec, GenerationSpec, IterationReport, JobStarted,
                     LossSpec, PlanReport, Queued, TokenSpec, ValidationReport)
from ..tasks._generation import IterationProgress
from ..tasks._specs import ConditionSpec
from ..version import server_version

# DOMAIN_UNSPECIFIED (a field left unset) reads as the documented default, the image.
DOMAINS = {pb.DOMAIN_UNSPECIFIED: "image", pb.DOMAIN_IMAGE: "image", pb.DOMAIN_LATENT: "latent"}
DOMAIN_OF = {"image": pb.DOMAIN_IMAGE, "latent": pb.DOMAIN_LATENT}
REQUEST_DTYPES = ("float16", "float32", "float64")  # what a request's tensors may be


def tensor(msg, name: str, limits, *, shape=None) -> torch.Tensor:
    """A client's tensor: size checked before allocation, then finite and within the safe range
    of the server's working dtype."""
    try:
        array = decode_tensor(msg, name=name, max_elements=limits.max_tensor_elements, shape=shape,
                              dtypes=REQUEST_DTYPES)
    except TensorError as err:
        raise InvalidArgument(str(err)) from err
    check_input(name, array, getattr(torch, limits.working_dtype))
    return torch.from_numpy(array)


def _numbers(value, name: str):
    """Every number in a loss's parameters (a ``Struct``, nested structs and lists included) is
    finite and bounded. Walked on the message itself, before it becomes a dict: JSON has no NaN
    or Inf, so the conversion would fail on one with an unnamed error."""
    if isinstance(value, struct_pb2.Struct):
        for key, item in value.fields.items():
            _numbers(item, f"{name}.{key}")
    elif isinstance(value, struct_pb2.ListValue):
        for k, item in enumerate(value.values):
            _numbers(item, f"{name}[{k}]")
    else:  # a Value
        kind = value.WhichOneof("kind")
        if kind == "number_value":
            check_number(name, value.number_value, MAX_PARAM)
        elif kind in ("struct_value", "list_value"):
            _numbers(getattr(value, kind), name)


def maybe_tensor(parent, field: str, limits, name: str | None = None):
    return tensor(getattr(parent, field), name or field, limits) if parent.HasField(field) else None


def to_tensor(t: torch.Tensor):
    """A result on the wire: half precision travels as float32 (numpy has no bfloat16, and a
    client should not have to care what the server computes in); float64 stays float64."""
    t = t.detach().to("cpu")
    return encode_tensor((t.float() if t.dtype in HALF_DTYPES else t).numpy())


def generation(msg: pb.Generation, limits) -> GenerationSpec:
    return GenerationSpec(
        model=msg.model, adapter=msg.adapter, prompt=list(msg.prompt),
        negative_prompt=list(msg.negative_prompt), labels=list(msg.labels),
        cond=maybe_tensor(msg, "cond", limits), embedding=msg.embedding, batch=msg.batch,
        seed=msg.seed if msg.HasField("seed") else None,
        x_T=maybe_tensor(msg, "start_latents", limits, "generation.start_latents (x_T)"),
        steps=msg.steps, solver=msg.solver or options.default("Sample", "generation.solver"),
        guidance_scale=msg.guidance_scale if msg.HasField("guidance_scale") else None,
        grid=msg.grid, t_start=msg.t_start if msg.HasField("t_start") else None)


def losses(terms, limits) -> list[LossSpec]:
    specs = []
    for k, term in enumerate(terms):
        weight = check_number(f"losses[{k}].weight", term.weight or 1.0, MAX_WEIGHT)
        domain = DOMAINS.get(term.domain)
        if domain is None:
            raise InvalidArgument(f"losses[{k}]: unknown domain {term.domain}")
        kind = term.WhichOneof("kind")
        if kind == "client":
            if not term.client:
                raise InvalidArgument(f"losses[{k}]: a client loss needs a name")
            specs.append(LossSpec("client", term.client, weight, domain))
        elif kind == "server":
            params = {}
            if term.server.HasField("params"):
                _numbers(term.server.params, f"losses[{k}].params")  # before: NaN is no JSON
                params = json_format.MessageToDict(term.server.params)
            tensors = {key: tensor(value, f"losses[{k}].tensors[{key!r}]", limits)
                       for key, value in term.server.tensors.items()}
            specs.append(LossSpec("server", term.server.name, weight, domain, params, tensors))
        else:
            raise InvalidArgument(f"losses[{k}] is neither a client nor a server loss")
    return specs


def options_of(rpc: str, request):
    """The request's options as its typed object (``adjointdpm.options.values``): unset fields
    read as their one default, every value within its bounds, else INVALID_ARGUMENT naming it."""
    try:
        return options.values(rpc, request)
    except options.InvalidOption as err:
        raise InvalidArgument(str(err)) from err


def token(msg: pb.TokenSpec, limits, opts) -> TokenSpec:
    """The token group with its starting embedding decoded (``opts.token`` may be unset: the
    defaults)."""
    group = opts.token or options.GROUPS["ComputeGradient"]["token"]()
    return TokenSpec(placeholder=group.placeholder, initializer=group.initializer,
                     embedding=maybe_tensor(msg, "embedding", limits, "token.embedding"))


def examples(items, limits, field: str = "examples") -> list[ExampleSpec]:
    if len(items) > limits.max_examples:
        raise InvalidArgument(f"at most {limits.max_examples} {field}; got {len(items)}")
    return [ExampleSpec(seed=e.seed if e.HasField("seed") else None,
                        x_T=maybe_tensor(e, "start_latents", limits, f"{field}[{k}].start_latents (x_T)"),
                        prompt=e.prompt,
                        label=e.label if e.HasField("label") else None)
            for k, e in enumerate(items)]


def conditions(items, limits) -> list[ConditionSpec]:
    """A fine-tune's prompt set; a weight left 0 (unset) is 1, as the proto says. The task checks
    the rest (weights finite and ≥ 0, prompts or labels, each valid for the model)."""
    if len(items) > limits.max_examples:
        raise InvalidArgument(f"at most {limits.max_examples} conditions; got {len(items)}")
    return [ConditionSpec(prompt=c.prompt, label=c.label if c.HasField("label") else None,
                          weight=c.weight or 1.0) for c in items]


# ---- server metadata ----------------------------------------------------------------------------

def extensions(config) -> list[str]:
    """The optional capabilities this server's operator turned on (the proto's list)."""
    on = {"auth": bool(config.tokens), "shared_artifacts": config.shared_artifacts,
          "s3_artifacts": bool(config.artifact_store), "redis_coordination": config.coordination != "local",
          "multi_adapter_batching": bool(config.multi_adapter_batching)}
    return [name for name, enabled in on.items() if enabled]


def server_metadata(rt, losses) -> pb.GetServerMetadataResponse:
    limits, config = rt.limits, rt.config
    return pb.GetServerMetadataResponse(
        name="adjointdpm-server", version=server_version(), api_package=pb.DESCRIPTOR.package,
        api_packages=[pb.DESCRIPTOR.package],
        models=list(rt.models), default_model=rt.default_model, losses=sorted(losses),
        grad_modes=list(GRAD_MODES), solvers=list(SOLVERS), tensor_dtypes=list(REQUEST_DTYPES),
        compute_dtype=config.dtype, extensions=extensions(config),
        limits=pb.ServerLimits(
            max_batch=limits.max_batch, max_steps=limits.max_steps, max_iterations=limits.max_iterations,
            max_examples=limits.max_examples, max_tensor_elements=limits.max_tensor_elements,
            max_message_bytes=limits.max_message_bytes,
            max_inline_weight_elements=limits.max_inline_weight_elements,
            max_lora_rank=limits.max_lora_rank, max_network_calls=limits.max_network_calls,
            client_loss_timeout_s=limits.client_loss_timeout_s, max_request_s=config.max_request_s,
            grad_memory_bytes=limits.grad_memory_bytes or 0))


# ---- results and events -------------------------------------------------------------------------

def artifact_info(info) -> pb.ArtifactInfo:
    if info is None:
        return pb.ArtifactInfo()
    d = asdict(info)
    meta = struct_pb2.Struct()
    meta.update({k: v for k, v in d["metadata"].items() if v is not None})
    return pb.ArtifactInfo(id=d["id"], kind=d["kind"], model=d["model"], size=d["size"],
                           name=d["name"], iteration=d["iteration"], metadata=meta)


def event(item) -> tuple[str, object]:
    """A task's event → (its field in the RPC's response oneof, its message); the servicer puts it
    in the RPC's own response message, which refuses an event that RPC does not declare."""
    if isinstance(item, IterationProgress):
        return "progress", pb.Progress(phase=item.phase, step=item.step, total=item.total, t=item.t,
                                       nfe=item.nfe, iteration=item.iteration)
    if isinstance(item, ClientQuery):
        return "loss_query", pb.LossQuery(term=item.term, name=item.name, domain=DOMAIN_OF[item.domain],
                                          x=encode_tensor(np.asarray(item.x)), iteration=item.iteration)
    if isinstance(item, IterationReport):
        return "iteration", pb.Iteration(
            iteration=item.iteration, loss=item.loss, loss_terms=item.loss_terms,
            grad_norm=item.grad_norm, images=item.images, sample_losses=item.sample_losses,
            start_latents=to_tensor(item.x_T) if item.x_T is not None else None, stopped=item.stopped,
            lr=item.lr)
    if isinstance(item, ValidationReport):
        return "validation", pb.Validation(
            iteration=item.iteration, loss=item.loss, loss_terms=item.loss_terms,
            agreement=item.agreement, images=item.images, best=item.best)
    if isinstance(item, Checkpoint):
        return "checkpoint", artifact_info(item.info)
    if isinstance(item, JobStarted):
        return "job", pb.Job(id=item.id, replica=item.replica, iteration=item.iteration)
    if isinstance(item, Queued):
        return "queued", pb.QueuePosition(position=item.position)
    if isinstance(item, PlanReport):
        p, d = item.plan, item.decoder
        return "plan", pb.MemoryPlan(
            grad_mode=p.grad_mode, steps=p.steps, gradient_steps=p.gradient_steps,
            kept_graphs=p.kept_graphs, stored_states=p.stored_states,
            network_checkpointing=p.blocks_checkpointed, graph_bytes=p.graph_bytes,
            budget_bytes=p.budget_bytes, iteration=item.iteration,
            decoder_slice_size=d.slice_size if d else 0, decoder_checkpointing=d.checkpointing.name.lower() if d else "",
            decoder_graph_bytes=d.graph_bytes if d else 0, decoder_tile=d.tile if d else 0)
    raise TypeError(f"no message for event {type(item).__name__}")


def sample_result(r) -> tuple[str, pb.SampleResult]:
    return "result", pb.SampleResult(images=r.images, x0=to_tensor(r.x0), start_latents=to_tensor(r.x_T),
                                     pixels=to_tensor(r.pixels) if r.pixels is not None else None)


def gradient_result(r) -> tuple[str, pb.GradientResult]:
    msg = pb.GradientResult(loss=r.loss, loss_terms=r.loss_terms, x0=to_tensor(r.x0), images=r.images,
                            nfe=r.nfe, sample_losses=r.sample_losses)
    for key, value in r.gradients.items():
        msg.gradients[key].CopyFrom(to_tensor(value))
    for key, value in r.weight_gradients.items():
        msg.weight_gradients[key].CopyFrom(to_tensor(value))
    if r.weights_artifact is not None:
        msg.weights_artifact.CopyFrom(artifact_info(r.weights_artifact))
    return "result", msg


def optimize_result(r) -> tuple[str, pb.OptimizeResult]:
    msg = pb.OptimizeResult(loss=r.loss, history=r.history, start_latents=to_tensor(r.x_T),
                            x0=to_tensor(r.x0), images=r.images, initial_images=r.initial_images,
                            sample_losses=r.sample_losses, best_iteration=r.best_iteration,
                            stopped=r.stopped, iterations_run=r.iterations_run,
                            last_start_latents=(to_tensor(r.last_x_T) if r.last_x_T is not None
                                                else None))
    if r.artifact is not None:
        msg.artifact.CopyFrom(artifact_info(r.artifact))
    return "result", msg
