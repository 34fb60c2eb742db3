"""The options of every RPC: each with its one default, its bounds and a one-line doc.

This is the one home of what a field left unset means. The server reads a request through it
(``read``: unset → the default, then ``check``: the bounds), the SDK builds its keyword
arguments, signatures and docstrings from it, the CLI its flags' defaults and help. A field left
unset on the wire, an SDK keyword left out and a CLI flag not given therefore mean the same thing
(tests/service/test_options.py walks every field of every request message to hold that).

    >>> from adjointdpm import options
    >>> options.default("FinetuneWeights", "lr")
    0.001

A default of ``None`` means "decided by the model or by another option", as its doc says (the
model's default steps, guidance and grid; ``guided.scale`` = the learning rate). Bounds that the
server's operator sets (``--max-steps``, ``--max-iterations``, ``--max-batch``) are the server's
and are reported by it; the bounds here hold on every server. Torch-free: protobuf only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, make_dataclass
from typing import Any

__all__ = ["Option", "RPCS", "options", "option", "default", "read", "check", "values", "TYPES",
           "GROUPS", "InvalidOption", "INPUTS", "TARGETS"]


class InvalidOption(ValueError):
    """A value outside its option's bounds or choices; the message names the field."""


@dataclass(frozen=True)
class Option:
    """One field of a request. ``path`` is dotted from the request message (``optimizer.lr``);
    ``keyword`` is the SDK keyword / CLI flag that sets it (its own name by default; ``group``:
    a key of that dict keyword instead, e.g. ``stop_when={"patience": 3}``)."""

    path: str
    default: Any
    doc: str
    keyword: str = ""
    group: str = ""
    kind: str = "scalar"          # scalar, list, tensor, targets, negated (SDK True = field False)
    low: float | None = None      # inclusive
    high: float | None = None     # inclusive
    above: float | None = None    # exclusive lower bound
    below: float | None = None    # exclusive upper bound
    choices: tuple = ()

    @property
    def name(self) -> str:
        """The SDK keyword (or the key within ``group``)."""
        return self.keyword or self.path.rpartition(".")[2]

    def describe(self) -> str:
        """The doc with the default and the bounds: one line for help texts and docstrings."""
        extra = []
        if self.default is not None and self.default not in ("", [], ()) and self.kind != "tensor":
            extra.append(f"default {_show(self.default)}")
        if self.choices:
            extra.append("one of " + ", ".join(repr(c) for c in self.choices))
        bound = _bounds_text(self)
        if bound:
            extra.append(bound)
        return self.doc + (f" ({'; '.join(extra)})" if extra else "")


def _show(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return repr(value) if isinstance(value, str) else str(value)


def _bounds_text(o: Option) -> str:
    lo = f"> {o.above:g}" if o.above is not None else (f"≥ {o.low:g}" if o.low is not None else "")
    hi = f"< {o.below:g}" if o.below is not None else (f"≤ {o.high:g}" if o.high is not None else "")
    return " and ".join(b for b in (lo, hi) if b)


def _generation(fine_tune: bool = False) -> tuple[Option, ...]:
    """``fine_tune``: FinetuneWeights, whose ``seed`` keyword is the request's own (the stream of
    batches drawn from ``conditions``); the generation's seed, unused there, is ``generation_seed``."""
    g = "generation."
    seed = (Option(g + "seed", None, "unused by fine-tuning (examples carry their own seeds; "
                   "conditions draw from ``seed``)", keyword="generation_seed", low=0)
            if fine_tune else
            Option(g + "seed", None, "x_T ~ N(0, I) from this seed (unset: a fresh random draw)", low=0))
    return (
        Option(g + "model", "", "the model; '' = the server's default model"),
        Option(g + "adapter", "", "artifact id of a fine-tuned adapter; '' = the base model"),
        Option(g + "prompt", [], "one prompt, or one per sample (digits: '0'…'9')", kind="list"),
        Option(g + "negative_prompt", [], "the unconditional prompt(s) for CFG ('' when unset)",
               kind="list"),
        Option(g + "labels", [], "class labels, one or one per sample", kind="list"),
        Option(g + "cond", None, "an explicit conditioning tensor instead of prompt/labels", kind="tensor"),
        Option(g + "embedding", "", "artifact id of a learned embedding (OptimizeEmbedding)"),
        Option(g + "batch", None, "samples; unset = x_T's batch, else the number of labels or "
               "prompts, else 1", low=1),
        seed,
        Option(g + "start_latents", None, "the start state (B, *latent_shape) instead of a seed",
               keyword="x_T", kind="tensor"),
        Option(g + "steps", None, "sampler steps; unset = the model's default_steps", low=1),
        Option(g + "solver", "dpm3", "the sampler: euler, dpm2, dpm3, ab2, ab3, ab4, heun, dopri5"),
        Option(g + "guidance_scale", None, "CFG scale; unset = the model's default_guidance, 1 = none",
               low=-100, high=100),
        Option(g + "grid", None, "time grid: logsnr, time, karras; unset = the model's default_grid"),
        Option(g + "t_start", None, "start from x_t at this time (x_T is then that x_t)"),
    )


def _optimizer(lr: float) -> tuple[Option, ...]:
    o = "optimizer."
    return (
        Option(o + "name", "adam", "the optimizer", keyword="optimizer", choices=("adam", "sgd")),
        Option(o + "lr", lr, "the learning rate", above=0, high=1e6),
        Option(o + "iterations", 10, "optimizer steps (at most the server's --max-iterations)", low=1),
        Option(o + "momentum", 0.0, "SGD's momentum", low=0, below=1),
        Option(o + "schedule", "constant", "the learning rate over the run",
               choices=("constant", "cosine", "linear")),
        Option(o + "warmup", 0, "iterations of linear warm-up from 0 before the schedule", low=0),
    )


def _stop_when(verdict: bool) -> tuple[Option, ...]:
    s = "stop_when."
    return (
        Option(s + "loss_below", None, "stop once the loss is at or below this", group="stop_when",
               low=-1e12, high=1e12),
        Option(s + "verdict_changed", False,
               "stop a sample once the model's classifier changes its verdict" if verdict
               else "OptimizeLatent only", group="stop_when"),
        Option(s + "patience", 0, "stop after this many iterations without a new best (0 = never)",
               group="stop_when", low=0),
    )


_GRAD_MODE = ("auto", "checkpoint", "adjoint", "backprop")


def _gradient_options(grad_mode: str = "grad_mode", budget: str = "memory_budget_mib") -> tuple[Option, ...]:
    return (
        Option(grad_mode, "auto", "how the gradient is computed (auto: exact, as fast as the "
               "memory budget allows)", choices=_GRAD_MODE),
        Option(budget, 0, "MiB: lowers the server's gradient memory budget (0 = the server's)",
               low=0),
        Option("decoder_tile", 0, "approximate: a loss on the image decodes it in overlapping tiles "
               "of this many latent pixels a side (a multiple of 4, at least 8), blended at the seams, "
               "so the VAE decoder's graph is one tile's (0 = exact, the whole image)", low=0),
    )


def _truncation() -> tuple[Option, ...]:
    """DRaFT-K and AlignProp's randomized truncation: approximate gradients, named so."""
    return (
        Option("truncate", 0, "approximate (DRaFT-K): the gradient through the last K steps only, "
               "none into x_T (0 = exact, every step)", low=0),
        Option("truncate_min", 0, "> 0: K drawn uniformly from truncate_min…truncate, seeded "
               "(AlignProp's randomized truncation; 0 = K fixed)", low=0),
    )


def _token() -> tuple[Option, ...]:
    t = "token."
    return (
        Option(t + "placeholder", "<*>", "the new token (SD); must appear in the prompt", group="token"),
        Option(t + "initializer", "", "a word whose embedding starts the token ('' = random)",
               group="token"),
        Option(t + "embedding", None, "or the starting embedding itself (token_dim,)", group="token",
               kind="tensor"),
    )


RPCS: dict[str, tuple[Option, ...]] = {
    "Sample": (
        *_generation(),
        Option("no_images", True, "PNGs of the samples", keyword="images", kind="negated"),
        Option("return_pixels", False, "the decoded images as float32 in [0, 1]", keyword="pixels"),
    ),
    "ComputeGradient": (
        *_generation(),
        Option("targets", ["x_T"], "what to differentiate: x_T (x_t with t_start), cond, token, weights",
               kind="targets"),
        *_gradient_options(),
        *_token(),
        Option("weights.parameters", [], "fnmatch patterns of parameter names ([] = all)",
               group="weights", kind="list"),
        Option("weights.lora_rank", 0, "> 0: gradients w.r.t. a fresh LoRA of this rank",
               group="weights", low=0),
        Option("weights.inline", False, "the weight gradients in the reply (within the server's "
               "limit) instead of an artifact", group="weights"),
        Option("return_images", False, "the PNGs of x_0 in the reply", keyword="images"),
        *_truncation(),
    ),
    "OptimizeLatent": (
        *_generation(),
        *_optimizer(lr=0.05),
        Option("constraint.norm", "", "keep x_T in an ε-ball around the start (linf, l2) or on its "
               "sphere; '' = none", keyword="constraint", choices=("", "linf", "l2", "sphere")),
        Option("constraint.epsilon", 0.0, "the ball's radius", keyword="epsilon", low=0, high=1e6),
        Option("norm_weight", 0.0, "penalty weight on (|x_T|²/d − 1)²", low=0, high=1e6),
        Option("image_every", 0, "PNGs every k iterations (0 = only the last)", low=0),
        *_gradient_options(),
        Option("guided.every", 1, "steer x_t at every k-th step", group="guided", low=1),
        Option("guided.scale", None, "step size (unset = the learning rate)", group="guided",
               above=0, high=1e6),
        Option("guided.inner_steps", 1, "gradient steps per steered node", group="guided", low=1),
        Option("guided.grad_steps", None, "sampler steps of each inner t → 0 solve (unset = the "
               "remaining steps)", group="guided", low=1),
        Option("guided.step", "normalized", "normalized: scale · σ_t · g / rms(g) per sample; raw: "
               "scale · g", group="guided", choices=("normalized", "raw")),
        Option("guided.clip", 0.0, "> 0: clip each entry of a step to ±clip", group="guided",
               low=0, high=1e6),
        *_stop_when(verdict=True),
    ),
    "FinetuneWeights": (
        *_generation(fine_tune=True),
        *_optimizer(lr=1e-3),
        Option("method", "lora", "what is trained", choices=("lora", "full")),
        Option("lora_rank", 4, "the LoRA rank (at most the server's --max-lora-rank)", low=1),
        Option("lora_alpha", None, "the LoRA alpha (unset = the rank)", above=0, high=1e6),
        Option("target_modules", [], "modules that get LoRA layers ([] = the model's default)",
               kind="list"),
        Option("checkpoint_every", 0, "a checkpoint artifact every k iterations (0 = none before "
               "the end)", low=0),
        Option("name", "", "a label for the adapter"),
        Option("batch_size", None, "examples per iteration (unset = all); with conditions, the "
               "samples drawn per iteration (unset = as many as conditions, at most the server's max "
               "batch)", low=1),
        Option("micro_batch", None, "samples per sampler pass: an iteration's gradient accumulates "
               "over ceil(batch_size / micro_batch) passes, then one step (unset or larger = the "
               "whole batch in one pass)", low=1),
        Option("seed", 0, "with conditions: the stream of batches drawn from them, each sample's "
               "noise included (the same on every run and every resume)", low=0),
        *_gradient_options(),
        Option("resume_from", "", "a checkpoint id of the same run to continue"),
        Option("resume_job", "", "a job id (from its Job event or JobInterrupted): continue that "
               "job from its last checkpoint, on any replica"),
        *_truncation(),
        Option("keep_checkpoints", 3, "this run's newest checkpoints kept; older ones deleted",
               low=1, high=100),
        Option("validate_every", 1, "iterations between validations", low=1),
        Option("keep_best", False, "the adapter of the best validation loss, not the last"),
        *_stop_when(verdict=False),
    ),
    "OptimizeEmbedding": (
        *_generation(),
        Option("target_image", None, "adds an MSE term to this image (B or 1, C, H, W) in [0, 1]",
               kind="tensor"),
        *_optimizer(lr=0.05),
        *_token(),
        Option("name", "", "a label for the embedding"),
        *_gradient_options(),
        Option("image_every", 0, "PNGs every k iterations (0 = only the last)", low=0),
        Option("prior", "", "keep the vector among the model's own: norm, gaussian ('' = none)",
               choices=("", "norm", "gaussian")),
        Option("prior_weight", 1.0, "the prior's weight, per sample using the vector", above=0,
               high=1e6),
        *_stop_when(verdict=False),
    ),
}

# Fields that are inputs, not options: they have no default to agree on (losses, examples).
INPUTS: dict[str, tuple[str, ...]] = {
    "Sample": (),
    "ComputeGradient": ("losses",),
    "OptimizeLatent": ("losses",),
    "FinetuneWeights": ("losses", "examples", "validation", "conditions"),
    "OptimizeEmbedding": ("losses",),
}


def options(rpc: str) -> tuple[Option, ...]:
    """The options of ``rpc`` (its proto name: "OptimizeLatent")."""
    return RPCS[rpc]


def option(rpc: str, name: str) -> Option:
    """By SDK keyword (``lr``), by ``group.key`` (``stop_when.patience``) or by path."""
    for o in RPCS[rpc]:
        if name in (o.path, f"{o.group}.{o.name}" if o.group else o.name):
            return o
    raise KeyError(f"{rpc} has no option {name!r}")


def default(rpc: str, name: str):
    value = option(rpc, name).default
    return list(value) if isinstance(value, list) else value


def _field(message, path: str):
    """(the message holding the field, the field's name)."""
    *parents, leaf = path.split(".")
    for p in parents:
        message = getattr(message, p)
    return message, leaf


def _is_unset(holder, leaf: str) -> bool:
    descriptor = holder.DESCRIPTOR.fields_by_name[leaf]
    if descriptor.has_presence:
        return not holder.HasField(leaf)
    value = getattr(holder, leaf)
    if descriptor.is_repeated:
        return len(value) == 0
    return value == descriptor.default_value


TARGETS = ("x_T", "cond", "token", "weights")
# TARGET_X_T → "x_T"; TARGET_UNSPECIFIED (an enum value left 0) reads as the default target
_TARGET_NAMES = {"TARGET_X_T": "x_T", "TARGET_UNSPECIFIED": "x_T"}


def read(rpc: str, request) -> dict[str, Any]:
    """The request's option values by path, an unset field read as its default (tensors: the
    message or None; targets: the enum values). ``check`` them next."""
    values = {}
    for o in RPCS[rpc]:
        holder, leaf = _field(request, o.path)
        if _is_unset(holder, leaf):  # a negated option's field means the opposite of its keyword
            values[o.path] = (not o.default) if o.kind == "negated" else default(rpc, o.path)
            continue
        value = getattr(holder, leaf)
        if o.kind == "targets":
            names = holder.DESCRIPTOR.fields_by_name[leaf].enum_type.values_by_number
            value = [_TARGET_NAMES.get(names[v].name, names[v].name.removeprefix("TARGET_").lower())
                     if v in names else v for v in value]
        elif o.kind == "list":
            value = list(value)
        values[o.path] = value
    return values


def check(rpc: str, values: dict[str, Any]) -> dict[str, Any]:
    """Raise ``InvalidOption`` naming the field when a value is outside its bounds or choices."""
    for o in RPCS[rpc]:
        value = values.get(o.path)
        if o.kind == "targets":
            unknown = [v for v in value if v not in TARGETS]
            if unknown:
                raise InvalidOption(f"{o.path}: unknown gradient target {unknown[0]!r}; choose from "
                                    f"{', '.join(TARGETS)}")
            continue
        if value is None or o.kind in ("tensor", "list"):
            continue
        if o.choices and value not in o.choices:
            raise InvalidOption(f"{o.path} must be one of {', '.join(repr(c) for c in o.choices)}; "
                                f"got {value!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        bounded = any(b is not None for b in (o.low, o.high, o.above, o.below))
        if bounded and not math.isfinite(value):
            raise InvalidOption(f"{o.path} must be finite; got {value}")
        if ((o.low is not None and value < o.low) or (o.high is not None and value > o.high)
                or (o.above is not None and value <= o.above)
                or (o.below is not None and value >= o.below)):
            raise InvalidOption(f"{o.path} must be {_bounds_text(o)}; got {value:g}")
    return values


# ---- typed options objects ---------------------------------------------------------------------

def _dataclass(name: str, opts: tuple[Option, ...], groups: tuple[str, ...] = ()):
    """A frozen dataclass whose fields are ``opts`` by SDK name (a negated option in the SDK's
    sense), each defaulting to its option's default and documented by it; ``groups`` are fields
    holding a group's own object (None: the group is not set)."""
    def spec(o: Option):
        meta = {"doc": o.describe(), "path": o.path}
        if isinstance(o.default, list):
            return field(default_factory=lambda d=o.default: list(d), metadata=meta)
        return field(default=o.default, metadata=meta)

    fields = [(o.name, Any, spec(o)) for o in opts]
    fields += [(g, Any, field(default=None, metadata={"doc": f"the {g} group", "path": g}))
               for g in groups]
    cls = make_dataclass(name, fields, frozen=True)
    cls.__doc__ = f"The options of one {name.removesuffix('Options')} request (adjointdpm.options)."
    return cls


def _group_classes(rpc: str) -> dict[str, type]:
    groups: dict[str, list[Option]] = {}
    for o in RPCS[rpc]:
        if o.group:
            groups.setdefault(o.group, []).append(o)
    return {g: _dataclass("".join(p.title() for p in g.split("_")) + "Options", tuple(items))
            for g, items in groups.items()}


GROUPS = {rpc: _group_classes(rpc) for rpc in RPCS}
# Groups whose absence means their defaults (the others' absence means "off": no guidance, no
# early stop, no token to learn).
UNSET_MEANS_DEFAULTS = ("weights",)
TYPES = {rpc: _dataclass(f"{rpc}Options", tuple(o for o in RPCS[rpc] if not o.group),
                         tuple(GROUPS[rpc])) for rpc in RPCS}


def values(rpc: str, request):
    """The request's options as ``TYPES[rpc]``, read and checked: attributes by SDK keyword
    (``opts.lr``, ``opts.images``), a group set in the request as its own object
    (``opts.stop_when.patience``), one left unset as None."""
    flat = check(rpc, read(rpc, request))
    top, groups = {}, {}
    for o in RPCS[rpc]:
        value = flat[o.path]
        value = (not value) if o.kind == "negated" else value
        if o.group:
            groups.setdefault(o.group, {})[o.name] = value
        else:
            top[o.name] = value
    for group, cls in GROUPS[rpc].items():
        holder, leaf = _field(request, group)
        present = holder.HasField(leaf) or group in UNSET_MEANS_DEFAULTS
        top[group] = cls(**groups[group]) if present else None
    return TYPES[rpc](**top)
