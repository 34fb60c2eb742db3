"""The request messages of every RPC, built from keyword arguments: one implementation shared by
the synchronous ``Client`` and ``adjointdpm.aio.Client`` (each builder returns the request and
the client-side loss terms, by index, that the server will query)."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from google.protobuf import struct_pb2

from ._losses import ClientLoss, as_term, evaluate_client_loss
from ._tensors import decode_tensor, encode_tensor
from .v1 import adjointdpm_pb2 as pb

__all__ = ["sample", "compute_gradient", "optimize_latent", "finetune_weights", "optimize_embedding",
           "models_from", "losses_from", "loss_reply", "unknown_term", "artifact_from"]

_TARGETS = {"x_T": pb.X_T, "x_t": pb.X_T, "cond": pb.COND, "token": pb.TOKEN, "weights": pb.WEIGHTS}
_DOMAINS = {"image": pb.IMAGE, "latent": pb.LATENT}


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


def sample(*, images: bool = True, pixels: bool = False, **generation):
    """Sample images: ``prompt=``/``labels=``/``cond=``, ``seed=``/``x_T=``, ``steps=``, …"""
    request = pb.SampleRequest(generation=_generation(**generation), no_images=not images,
                               return_pixels=pixels)
    return request, {}


def compute_gradient(losses, *, targets: Sequence[str] = ("x_T",), grad_mode: str = "",
                     memory_budget_mib: int = 0, token: dict | None = None, weights: dict | None = None,
                     images: bool = False, **generation):
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
    return request, client


def optimize_latent(losses, *, optimizer: str = "adam", lr: float = 0.05,
                    iterations: int = 10, momentum: float = 0.0, schedule: str = "",
                    warmup: int = 0, constraint: str = "", epsilon: float = 0.0,
                    norm_weight: float = 0.0, image_every: int = 0, grad_mode: str = "",
                    memory_budget_mib: int = 0, guided: dict | None = None, stop_when: dict | None = None,
                    **generation):
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
    return request, client


def finetune_weights(losses, examples: Sequence[dict], *, method: str = "lora",
                     lora_rank: int = 4, lora_alpha: float = 0.0, target_modules=(),
                     optimizer: str = "adam", lr: float = 1e-3, iterations: int = 10,
                     checkpoint_every: int = 0, name: str = "", batch_size: int = 0,
                     grad_mode: str = "", memory_budget_mib: int = 0, resume_from: str = "",
                     keep_checkpoints: int = 0,
                     schedule: str = "", warmup: int = 0, validation: Sequence[dict] = (),
                     validate_every: int = 0, keep_best: bool = False,
                     stop_when: dict | None = None, **generation):
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
    return request, client


def optimize_embedding(losses=(), *, target_image=None, token: dict | None = None,
                       optimizer: str = "adam", lr: float = 0.05, iterations: int = 10,
                       name: str = "", grad_mode: str = "", memory_budget_mib: int = 0,
                       image_every: int = 0,
                       schedule: str = "", warmup: int = 0, prior: str = "",
                       prior_weight: float = 0.0, stop_when: dict | None = None,
                       **generation):
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
    return request, client


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


def models_from(reply) -> list[dict[str, Any]]:
    """ListModelsReply → one dict per model (int64 shapes as ints, not JSON strings)."""
    from google.protobuf.json_format import MessageToDict

    models = []
    for m in reply.models:
        d = MessageToDict(m, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
        for key in ("latent_shape", "image_shape", "cond_shape"):
            d[key] = list(getattr(m, key))
        models.append(d)
    return models


def losses_from(reply) -> list[dict[str, Any]]:
    from google.protobuf.json_format import MessageToDict

    return [MessageToDict(m, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
            for m in reply.losses]


def unknown_term(term: int) -> str:
    return f"the server asked for unknown client loss term {term}"


def loss_reply(term: ClientLoss, query, value_and_grad=None) -> pb.LossReply:
    """The reply to a ``LossQuery`` for a client loss (``value_and_grad``: an already evaluated
    ``(value, grad, values)``, as the asyncio client gets it from an awaited loss)."""
    value, grad, values = value_and_grad or evaluate_client_loss(term, decode_tensor(query.x))
    return pb.LossReply(term=query.term, value=value, grad=encode_tensor(grad), values=values)


def artifact_from(chunks, path=None):
    """``(ArtifactInfo, bytes)`` from GetArtifact's chunks; the bytes written to ``path`` if given."""
    from ._results import ArtifactInfo

    info = next((ArtifactInfo.from_message(c.info) for c in chunks if c.HasField("info")), None)
    data = b"".join(c.data for c in chunks)
    if path is not None:
        from pathlib import Path

        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(data)
    return info, data
