"""The request messages of every RPC, built from keyword arguments that ``adjointdpm.options``
declares: one implementation shared by the synchronous ``Client`` and ``adjointdpm.aio.Client``
(``build`` returns the request and the client-side loss terms, by index, that the server will
query; ``keywords`` gives the methods their signatures and docstrings)."""

from __future__ import annotations

import functools
from typing import Any, Sequence

import numpy as np
from google.protobuf import struct_pb2

from . import options
from ._losses import ClientLoss, as_term, evaluate_client_loss
from .tensors import decode_tensor, encode_tensor
from .v1 import adjointdpm_pb2 as pb

__all__ = ["METHODS", "build", "keywords", "models_from", "losses_from", "loss_reply", "unknown_term",
           "artifact_from"]

_TARGETS = {"x_T": pb.TARGET_X_T, "x_t": pb.TARGET_X_T, "cond": pb.TARGET_COND, "token": pb.TARGET_TOKEN,
            "weights": pb.TARGET_WEIGHTS}
_DOMAINS = {"image": pb.DOMAIN_IMAGE, "latent": pb.DOMAIN_LATENT}
_DOMAIN_NAMES = {pb.DOMAIN_UNSPECIFIED: "image", pb.DOMAIN_IMAGE: "image", pb.DOMAIN_LATENT: "latent"}

# name of the SDK method → (the RPC, its spec message (a bidi stream's first message holds it),
# its positional inputs)
METHODS = {
    "sample": ("Sample", pb.SampleRequest, ()),
    "compute_gradient": ("ComputeGradient", pb.GradientSpec, ("losses",)),
    "optimize_latent": ("OptimizeLatent", pb.OptimizeLatentSpec, ("losses",)),
    "finetune_weights": ("FinetuneWeights", pb.FinetuneWeightsSpec, ("losses", "examples")),
    "optimize_embedding": ("OptimizeEmbedding", pb.OptimizeEmbeddingSpec, ("losses",)),
}
SUMMARIES = {
    "sample": "Sample images: progress per step, then PNGs and the final latents.",
    "compute_gradient": "∂(Σ losses)/∂targets: x_T (or x_t with ``t_start``), cond, a new token, "
                        "weights.",
    "optimize_latent": "Optimize x_T (each sample keeps its best iterate and stops on its own), or "
                       "with ``guided`` steer x_t during sampling (paper §4.1).",
    "finetune_weights": "Fine-tune the model (LoRA or full) on a loss over ``examples``; the "
                        "result's ``artifact.id`` is an adapter for ``sample(adapter=...)``.",
    "optimize_embedding": "Learn a conditioning (SD: a token whose placeholder is in ``prompt``) "
                          "from losses and/or a target image; the result's ``artifact.id`` goes "
                          "to ``sample(embedding=...)``.",
}
INPUT_DOCS = {
    "losses": "a loss term or a list of them: ``ServerLoss``, ``ClientLoss``, a registered "
              "client loss's name, or a callable",
    "examples": "[{\"seed\" | \"x_T\", \"prompt\" | \"label\"}, …]: the noise and conditioning "
                "trained on",
    "validation": "held-out examples like ``examples``: a Validation event every "
                  "``validate_every`` iterations (``result.validations``)",
    "conditions": "a prompt set instead of ``examples`` (pass ``examples=[]``): prompts (str), "
                  "labels (int), (prompt or label, weight) pairs or {\"prompt\" | \"label\", "
                  "\"weight\"} dicts; every iteration draws ``batch_size`` of them by weight, "
                  "each with a fresh noise, seeded by ``seed``",
}
GROUP_DOCS = {
    "stop_when": "when to stop early, a dict of",
    "guided": "set: steer x_t during sampling instead of optimizing x_T, a dict of",
    "token": "the token to learn or differentiate, a dict of",
    "weights": "which weights to differentiate, a dict of",
}


@functools.lru_cache(maxsize=None)
def keywords(method: str) -> tuple[tuple[str, object, str], ...]:
    """The SDK keywords of a method, in order: (name, default, one-line doc); a dict keyword's doc
    lists its keys with theirs. Built once per method (``build`` checks every call against it)."""
    rpc = METHODS[method][0]
    out, groups = [], {}
    for o in options.options(rpc):
        if o.group:
            groups.setdefault(o.group, []).append(o)
        else:
            out.append((o.name, options.default(rpc, o.path), o.describe()))
    if method == "finetune_weights":
        out.append(("validation", (), INPUT_DOCS["validation"]))
        out.append(("conditions", (), INPUT_DOCS["conditions"]))
    for group, items in groups.items():
        keys = "; ".join(f"{o.name}: {o.describe()}" for o in items)
        out.append((group, None, f"{GROUP_DOCS[group]} {keys}"))
    return tuple(out)


def build(method: str, /, *inputs, **kwargs):
    """(the request message, the client-side loss terms by index) for ``method`` from its
    positional inputs and keyword arguments; left-out keywords stay unset on the wire, which the
    server reads as the same defaults (``adjointdpm.options``)."""
    rpc, message, _ = METHODS[method]
    request = message()
    known = {name for name, _, _ in keywords(method)}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise TypeError(f"{method}() got unexpected keyword arguments {unknown}")
    client: dict[int, ClientLoss] = {}
    if inputs:
        losses = inputs[0]
        if not (method == "optimize_embedding" and not losses):
            terms, client = _loss_terms(losses)
            request.losses.extend(terms)
    if method == "finetune_weights":
        request.examples.extend(_examples(inputs[1] or ()))
        request.validation.extend(_examples(kwargs.get("validation", ())))
        request.conditions.extend(_conditions(kwargs.get("conditions") or ()))
    for o in options.options(rpc):
        if not o.group and o.name in kwargs:
            _set(request, o, kwargs[o.name])
    for group, members in _groups(rpc).items():
        given = kwargs.get(group)
        if given is None:
            continue
        unknown = sorted(set(given) - set(members))
        if unknown:
            raise TypeError(f"{group} takes {', '.join(members)}; not {unknown}")
        getattr(request, group).SetInParent()  # set, even when empty: the group is on
        for key, value in given.items():
            _set(request, members[key], value)
    return request, client


@functools.lru_cache(maxsize=None)
def _groups(rpc: str) -> dict[str, dict[str, options.Option]]:
    """A dict keyword's options by key, per group (``stop_when`` → {"patience": …})."""
    groups: dict[str, dict] = {}
    for o in options.options(rpc):
        if o.group:
            groups.setdefault(o.group, {})[o.name] = o
    return groups


def _many(value) -> list:
    if value is None:
        return []
    return [value] if isinstance(value, (str, int, np.integer)) else list(value)


def _set(request, o, value) -> None:
    """One option's value into its field (None leaves it unset)."""
    if value is None:
        return
    holder, leaf = options._field(request, o.path)
    if o.kind == "tensor":  # float32 on the wire; an explicit cond keeps its own float precision
        keep = o.path == "generation.cond" and np.asarray(value).dtype in (np.float16, np.float64)
        array = np.asarray(value) if keep else np.asarray(value, dtype=np.float32)
        getattr(holder, leaf).CopyFrom(encode_tensor(array))
    elif o.kind == "targets":
        unknown = [t for t in _many(value) if t not in _TARGETS]
        if unknown:
            raise ValueError(f"unknown gradient target {unknown[0]!r}; choose from {', '.join(_TARGETS)}")
        getattr(holder, leaf).extend(_TARGETS[t] for t in _many(value))
    elif o.kind == "list":
        items = _many(value)
        getattr(holder, leaf).extend([int(v) for v in items] if leaf == "labels" else items)
    elif o.kind == "negated":
        setattr(holder, leaf, not value)
    else:
        setattr(holder, leaf, value)


def _loss_terms(losses) -> tuple[list[pb.LossTerm], dict[int, ClientLoss]]:
    items = losses if isinstance(losses, (list, tuple)) else [losses]
    terms, client = [], {}
    for k, item in enumerate(items):
        term = as_term(item)
        if term.domain not in _DOMAINS:
            raise ValueError(f"loss {term.name!r}: domain must be image or latent; got {term.domain!r}")
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
            e.start_latents.CopyFrom(encode_tensor(np.asarray(ex["x_T"], dtype=np.float32)))
        out.append(e)
    return out


def _condition(item) -> pb.WeightedCondition:
    """A prompt (str), a label (int), a (prompt or label, weight) pair or a dict with "prompt" or
    "label" and optionally "weight" → a WeightedCondition."""
    weight = None
    if isinstance(item, dict):
        unknown = sorted(set(item) - {"prompt", "label", "weight"})
        if unknown:
            raise ValueError(f"a condition takes prompt, label and weight; not {unknown}")
        if ("prompt" in item) == ("label" in item):
            raise ValueError(f"a condition is a prompt or a label; got {item!r}")
        value, weight = item.get("prompt", item.get("label")), item.get("weight")
    elif isinstance(item, (tuple, list)):
        if len(item) != 2:
            raise ValueError(f"a weighted condition is a (prompt or label, weight) pair; got {item!r}")
        value, weight = item
    else:
        value = item
    msg = pb.WeightedCondition()
    if isinstance(value, str):
        msg.prompt = value
    elif isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        msg.label = int(value)
    else:
        raise ValueError(f"a condition is a prompt (str) or a class label (int); got {value!r}")
    if weight is not None:
        if isinstance(weight, bool) or not isinstance(weight, (int, float, np.number)):
            raise ValueError(f"a condition's weight is a number; got {weight!r}")
        if weight == 0:  # on the wire 0 means "unset", which is 1
            raise ValueError("a condition's weight 0 would read as 1 (unset); leave the condition "
                             "out to never draw it")
        msg.weight = float(weight)
    return msg


def _conditions(items) -> list[pb.WeightedCondition]:
    if isinstance(items, (str, int, np.integer, dict)):
        items = [items]
    return [_condition(item) for item in items]


def models_from(reply) -> list[dict[str, Any]]:
    """ListModelsResponse → one dict per model (int64 shapes as ints, not JSON strings)."""
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

    losses = []
    for m in reply.losses:
        d = MessageToDict(m, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
        d["domain"] = _DOMAIN_NAMES.get(m.domain, "image")  # as ClientLoss/ServerLoss spell it
        losses.append(d)
    return losses


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
