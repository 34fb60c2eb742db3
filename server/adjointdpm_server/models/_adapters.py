"""Adapted copies of a resident ``eps_fn``: LoRA (peft) or full fine-tuning, never in place.

The resident model serves every request, so a fine-tune works on a copy: a LoRA copy shares the
frozen base tensors with the resident module (zero weight memory; peft wraps layers, it does not
write to their weights), a full copy owns its weights.
"""

from __future__ import annotations

import copy
import math
import warnings
from typing import Mapping, Sequence

import torch
from torch import nn

__all__ = ["inject_lora", "adapter_dtype", "with_lora", "fresh_lora", "full_copy", "trainable_state", "load_adapter", "with_trainable_view",
           "standalone"]


def _shared_copy(module: nn.Module) -> nn.Module:
    module = standalone(module)
    memo = {id(t): t for t in (*module.parameters(), *module.buffers())}
    return copy.deepcopy(module, memo)


def inject_lora(model: nn.Module, rank: int, alpha: float | None, targets: Sequence[str],
                adapter_name: str = "default") -> list:
    """peft's LoRA layers for ``adapter_name`` in ``model`` (in place), their weights left on
    the meta device for the caller to set. No random generator is touched: the process's is
    shared by every request thread, so drawing from it (or seeding it) here would make adapters
    and unseeded requests depend on each other. The meta device comes from ``torch.device`` as a
    context (a thread-local torch function mode), not peft's ``low_cpu_mem_usage``, whose patch of
    ``register_parameter`` is process-wide and would hit other threads' modules."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora import LoraLayer

    config = LoraConfig(r=rank, lora_alpha=rank if alpha is None else alpha, target_modules=list(targets),
                        init_lora_weights=False)
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.filterwarnings("ignore", "Already found a `peft_config`")  # a bank holds many
        inject_adapter_in_model(config, model, adapter_name=adapter_name)
    return [m for m in model.modules() if isinstance(m, LoraLayer) and adapter_name in m.lora_A]


def adapter_dtype(dtype: torch.dtype) -> torch.dtype:
    """An adapter's weights are float32 under a half-precision base (as peft's
    ``autocast_adapter_dtype``: they are what is trained; peft casts the layer's input to them and
    their output back), else the base's dtype."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def with_lora(eps_fn: nn.Module, rank: int, alpha: float | None = None,
              targets: Sequence[str] = ("to_q", "to_k", "to_v", "to_out.0"), *,
              init_lora_weights: bool = True) -> nn.Module:
    """A copy of ``eps_fn`` with a fresh LoRA adapter (peft's adapter ``default``); only the LoRA
    weights require grad. By default B = 0, so it starts equal to the base (``init_lora_weights``
    ``False`` draws B at random too, e.g. so that both A and B get gradients at once). A (and B)
    are drawn as peft draws them (Kaiming-uniform, a = √5) from a generator of their own seeded
    0, layer by layer in module order: the same request makes the same adapter whatever other
    requests do meanwhile.

    The copy shares the frozen base tensors with ``eps_fn`` (zero weight memory): it must not be
    moved or cast (``.to(...)``/``.half()`` convert parameters in place) nor have its adapter
    merged, which would change the resident weights."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1; got {rank}")
    names = [n for n, _ in eps_fn.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing or not targets:
        raise ValueError(f"LoRA target modules {missing or list(targets)} are not in this model")
    model = _shared_copy(eps_fn)
    gen = torch.Generator().manual_seed(0)
    for layer in inject_lora(model, rank, alpha, targets):
        base = layer.get_base_layer().weight
        for part, zero in ((layer.lora_A["default"], False), (layer.lora_B["default"], bool(init_lora_weights))):
            value = torch.empty(part.weight.shape, dtype=adapter_dtype(base.dtype))
            value = value.zero_() if zero else nn.init.kaiming_uniform_(value, a=math.sqrt(5), generator=gen)
            part.weight = nn.Parameter(value.to(base.device))
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name)
    return model


def fresh_lora(eps_fn: nn.Module, rank: int, alpha: float | None = None,
               targets: Sequence[str] = ("to_q", "to_k", "to_v", "to_out.0")) -> dict[str, torch.Tensor]:
    """The weights of the adapter ``with_lora`` would make (same seed, same names), on the
    model's device: what a bank's trainable adapter starts from."""
    model = with_lora(eps_fn, rank, alpha, targets)
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def standalone(eps_fn: nn.Module) -> nn.Module:
    """A network that owns its module tree: a bank's view becomes a peft copy with its adapter
    (to copy further, e.g. for a trainable view of its base weights); others pass."""
    from ._bank import AdapterView

    return eps_fn.standalone() if isinstance(eps_fn, AdapterView) else eps_fn


def full_copy(eps_fn: nn.Module) -> nn.Module:
    """An independent copy whose floating-point parameters all require grad."""
    model = copy.deepcopy(standalone(eps_fn))
    for param in model.parameters():
        param.requires_grad_(param.is_floating_point())
    return model


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters being trained (LoRA weights, or all), detached, on the CPU, contiguous."""
    return {n: p.detach().to("cpu").contiguous() for n, p in model.named_parameters() if p.requires_grad}


def load_adapter(eps_fn: nn.Module, method: str, state: Mapping[str, torch.Tensor], *,
                 rank: int = 0, alpha: float | None = None, targets: Sequence[str] = ()) -> nn.Module:
    """``eps_fn`` with a saved adapter applied, frozen (for sampling and further gradients)."""
    if method == "lora":
        model = with_lora(eps_fn, rank, alpha, targets)
    elif method == "full":
        model = full_copy(eps_fn)
    else:
        raise ValueError(f"unknown adapter method {method!r}")
    own = dict(model.named_parameters())
    expected = [k for k, p in own.items() if p.requires_grad]
    unknown = [k for k in state if k not in expected]  # never a shared base tensor of a LoRA copy
    missing = [k for k in expected if k not in state]
    if unknown or missing:
        raise ValueError(f"adapter does not fit this model: {len(unknown)} unknown and "
                         f"{len(missing)} missing tensors (e.g. {(unknown or missing)[0]})")
    with torch.no_grad():
        for key, value in state.items():
            if tuple(value.shape) != tuple(own[key].shape):
                raise ValueError(f"adapter tensor {key} has shape {tuple(value.shape)}, "
                                 f"the model's {tuple(own[key].shape)}")
            own[key].copy_(value)
    return model.requires_grad_(False).eval()


def with_trainable_view(eps_fn: nn.Module, patterns: Sequence[str]) -> tuple[nn.Module, dict]:
    """A copy of ``eps_fn`` sharing every tensor, whose parameters matching ``patterns``
    (fnmatch; empty = all floating-point ones) are fresh leaves aliasing the resident storage.

    Gradients w.r.t. the resident weights without copying them and without flipping
    ``requires_grad`` on the shared module (other requests use it at the same time).
    """
    from fnmatch import fnmatch

    model = _shared_copy(eps_fn)
    chosen = {}
    for name, param in list(model.named_parameters()):
        if not param.is_floating_point():
            continue
        if patterns and not any(fnmatch(name, p) for p in patterns):
            continue
        owner_name, _, leaf = name.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        view = nn.Parameter(param.detach(), requires_grad=True)
        setattr(owner, leaf, view)
        chosen[name] = view
    if not chosen:
        raise ValueError(f"no parameter matches {list(patterns)}")
    return model, chosen
