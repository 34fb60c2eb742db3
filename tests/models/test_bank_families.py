"""Mixed-adapter batches (``AdapterBank``) are exact on every model family the server serves.

For ``digits-flow`` and the tiny SD, SDXL, SD3-type and FLUX-type pipelines built from config
(the plain ``digits`` model has tests of its own), in float64:

- one ``run_rows`` call over eight adapters of ranks 1–8, different alphas and three different
  sets of target modules (the backend's ``lora_targets``, a subset, and other Linear layers of
  that network), plus base rows in two places, gives each adapter's rows what a standalone peft
  copy of that adapter (``load_adapter``) gives them alone, and the base rows what the resident
  ``eps_fn`` gives them (≤ 1e-10); every adapter visibly changes its rows (> 1e-4);
- with a trainable adapter (``bank.trainable``) among those eight, the gradients w.r.t. its rows'
  ``x`` and ``cond`` and w.r.t. its weights equal those of a standalone trainable copy run on its
  rows alone (≤ 1e-10), and its weight gradient does not change by a bit when the cotangent of
  the other rows does (nothing leaks in from other rows).

The same checks run once in float32 (tiny SD) at ≤ 1e-5. Errors are ``max|a − b| / max|b|``.
"""

from __future__ import annotations

import pytest
import torch

from adjointdpm_server.models import AdapterBank, AdapterSpec, load_model
from adjointdpm_server.models._adapters import load_adapter, with_lora

from .test_families import BUILDERS, OPTIONS
from .test_stable_diffusion import _offline
from .tiny_sd import build_tiny_sd

FAMILIES = ("digits-flow", "sd", "sdxl", "sd3", "flux")
CASES = [(f, torch.float64) for f in FAMILIES] + [("sd", torch.float32)]
# measured: float64 ≤ 2e-15 (outputs) and ≤ 8e-15 (gradients) on every family; float32 ≤ 3.1e-6
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}
PROMPTS = ("a photo of a cat", "a painting of a dog", "a cat in the style of a dog", "the dog",
           "a photo in the style of a painting")

# Besides the backend's lora_targets and a subset of them, each adapter set has one adapter on
# other Linear layers of that family's network (time embeddings, feed-forwards, joint-attention
# context projections, AdaLN modulations, the patch embedding, ...).
OTHER_TARGETS = {
    "digits-flow": ("to_k", "time_emb_proj", "time_embedding.linear_1"),
    "sd": ("to_k", "ff.net.2", "time_emb_proj"),
    "sdxl": ("proj_in", "to_out.0", "add_embedding.linear_1"),
    "sd3": ("add_k_proj", "norm1.linear", "ff.net.2", "context_embedder"),
    "flux": ("add_q_proj", "to_add_out", "proj_mlp", "norm1.linear", "x_embedder"),
}
RANKS = (3, 1, 8, 2, 5, 7, 4, 6)
ALPHAS = (None, 2.0, 16.0, 0.5, 3.0, None, 1.0, 12.0)


# --------------------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def backend_of(tmp_path_factory):
    """``(family, dtype) → backend``, each tiny pipeline built and loaded once per module."""
    dirs, loaded = {}, {}
    builders = {"sd": build_tiny_sd, **BUILDERS}

    def get(family, dtype):
        if (family, dtype) not in loaded:
            with pytest.MonkeyPatch.context() as mp:
                attempts = _offline(mp)
                if family == "digits-flow":
                    spec = "digits-flow"
                else:
                    if family not in dirs:
                        dirs[family] = builders[family](tmp_path_factory.mktemp(family))
                    spec = f"diffusers:{dirs[family]}{OPTIONS.get(family, '')}"
                loaded[family, dtype] = load_model(spec, device="cpu", dtype=dtype)
            assert attempts == []
        return loaded[family, dtype]

    return get


@pytest.fixture(params=CASES, ids=[f"{f}-{str(d).removeprefix('torch.')}" for f, d in CASES])
def case(request, backend_of):
    family, dtype = request.param
    return family, backend_of(family, dtype)


def random_adapter(backend, family, k, seed):
    """Adapter ``k`` of a family's set: its rank, alpha and targets, and random non-zero A and B
    (named as ``with_lora``'s trainable parameters), scaled so its delta is O(0.1) whatever α/r."""
    rank, alpha = RANKS[k % len(RANKS)], ALPHAS[k % len(ALPHAS)]
    targets = (tuple(backend.lora_targets), ("to_q", "to_v"), OTHER_TARGETS[family])[k % 3]
    spec = AdapterSpec(rank, alpha, targets)
    shapes = {n: p.shape for n, p in with_lora(backend.eps_fn, rank, alpha, targets).named_parameters()
              if p.requires_grad}
    gen = torch.Generator().manual_seed(seed)
    scaling = (rank if alpha is None else alpha) / rank
    state = {}
    for name, shape in shapes.items():
        w = torch.randn(shape, generator=gen, dtype=torch.float64)
        # A: (r, in) → unit gain; B: (out, r) → 0.3 / (α/r) overall
        w = w / shape[1] ** 0.5 if "lora_A" in name else w * 0.3 / (scaling * rank ** 0.5)
        state[name] = w.to(backend.dtype)
    return state, spec


def _inputs(backend, n, seed=0):
    """x of the latent shape, per-row t across the schedule, per-row continuous conditioning."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((n, *backend.latent_shape), generator=gen, dtype=torch.float64).to(backend.dtype)
    t_dtype = torch.float64 if backend.dtype == torch.float64 else torch.float32
    t = torch.linspace(0.1, 0.9, n, dtype=torch.float64).mul(float(backend.schedule.t_max)).to(t_dtype)
    if backend.conditioning == "labels":  # digits-flow: class-embedding vectors (float)
        c = backend.encode(n, labels=[k % 10 for k in range(n)])
    else:
        c = backend.encode(n, prompt=[PROMPTS[k % len(PROMPTS)] for k in range(n)])
    cond = backend.embed(c).cond
    assert cond.is_floating_point() and cond.dtype == backend.dtype
    return x, t, cond


def _layout(parts):
    """The row indices of each part of a ``run_rows`` call."""
    start, rows = 0, []
    for _, n in parts:
        rows.append(torch.arange(start, start + n))
        start += n
    return rows, start


def _err(a, b):
    """The largest difference relative to the reference's largest entry."""
    return float((a - b).abs().max() / b.abs().max())


def _trainable_copy(backend, state, spec):
    """The reference trainable adapter: a standalone peft copy with ``state`` as its weights."""
    ref = with_lora(backend.eps_fn, spec.rank, spec.alpha, spec.targets, init_lora_weights=False)
    own = dict(ref.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            own[name].copy_(value)
    return ref, {n: p for n, p in ref.named_parameters() if p.requires_grad}


def _bank(b, family, seed: int):
    """A bank with eight random adapters of ``family``: (bank, [(state, spec)], views)."""
    bank = AdapterBank(b.eps_fn, 1 << 30)
    adapters = [random_adapter(b, family, k, seed=seed + k) for k in range(8)]
    views = [bank.view(f"adapter-{k}", lambda a=a: a) for k, a in enumerate(adapters)]
    return bank, adapters, views


# --------------------------------------------------------------------------- forward


def test_mixed_rows_equal_each_adapter_alone(case):
    family, b = case
    tol = TOLERANCE[b.dtype]
    bank, adapters, views = _bank(b, family, seed=100)
    parts = [(v, 1 + k % 2) for k, v in enumerate(views)]
    parts.insert(3, (bank.base_view, 1))
    parts.append((bank.base_view, 2))
    rows, n = _layout(parts)
    x, t, cond = _inputs(b, n)
    with torch.no_grad():
        out = bank.run_rows(x, t, cond, parts)
        base = b.eps_fn(x, t, cond)
        assert out.shape == x.shape
        for (view, _), r in zip(parts, rows):
            if view is bank.base_view:
                # the base rows: the resident network's own output
                assert _err(out[r], base[r]) <= tol
                continue
            state, spec = adapters[views.index(view)]
            alone = load_adapter(b.eps_fn, "lora", state, rank=spec.rank, alpha=spec.alpha,
                                 targets=spec.targets)(x[r], t[r], cond[r])
            assert _err(out[r], alone) <= tol, (family, spec)
            assert float((alone - base[r]).abs().max()) > 1e-4, (family, spec)  # the delta is seen
            assert _err(view(x[r], t[r], cond[r]), alone) <= tol  # the view called alone


# --------------------------------------------------------------------------- gradients


def test_gradients_of_a_trainable_adapter_among_others(case):
    family, b = case
    tol = TOLERANCE[b.dtype]
    bank, adapters, views = _bank(b, family, seed=200)
    state, spec = random_adapter(b, family, 12, seed=300)  # rank 5, alpha 3, the lora_targets
    tv = bank.trainable(state, spec)
    weights = {n: p for n, p in tv.named_parameters() if p.requires_grad}
    assert sorted(weights) == sorted(state)

    parts = [(v, 1 + k % 2) for k, v in enumerate(views)]
    parts.insert(4, (tv, 2))
    parts.insert(2, (bank.base_view, 1))
    parts.append((bank.base_view, 1))
    rows, n = _layout(parts)
    x0, t, cond0 = _inputs(b, n, seed=1)
    x, cond = x0.clone().requires_grad_(), cond0.clone().requires_grad_()
    out = bank.run_rows(x, t, cond, parts)
    gen = torch.Generator().manual_seed(7)
    g = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.dtype)
    g_x, g_cond, *g_w = torch.autograd.grad(out, [x, cond, *weights.values()], g, retain_graph=True)
    assert all(float(gw.abs().max()) > 0 for gw in g_w)

    # every part's rows against its network alone on them: the standalone trainable copy for the
    # trainable adapter (with its weight gradient), load_adapter's copies, the resident network
    for (view, _), r in zip(parts, rows):
        x_r, cond_r = x0[r].clone().requires_grad_(), cond0[r].clone().requires_grad_()
        leaves = [x_r, cond_r]
        if view is tv:
            net, ref_weights = _trainable_copy(b, state, spec)
            leaves += [ref_weights[name] for name in weights]
        elif view is bank.base_view:
            net = b.eps_fn
        else:
            other, o = adapters[views.index(view)]
            net = load_adapter(b.eps_fn, "lora", other, rank=o.rank, alpha=o.alpha, targets=o.targets)
        out_r = net(x_r, t[r], cond_r)
        r_x, r_cond, *r_w = torch.autograd.grad(out_r, leaves, g[r])
        assert float(r_x.abs().max()) > 0 and float(r_cond.abs().max()) > 0
        found = {"out": _err(out[r].detach(), out_r.detach()), "x": _err(g_x[r], r_x),
                 "cond": _err(g_cond[r], r_cond),
                 "weights": max((_err(a, c) for a, c in zip(g_w, r_w)), default=0.0)}
        assert all(e <= tol for e in found.values()), (family, view.label, found)

    # other rows' cotangents change, the trainable adapter's weight gradient does not (at all)
    mine = set(rows[[v for v, _ in parts].index(tv)].tolist())
    others = torch.tensor([i for i in range(n) if i not in mine])
    g2 = g.clone()
    g2[others] = torch.randn(g2[others].shape, generator=gen, dtype=torch.float64).to(g.dtype) * 3.0
    g_w2 = torch.autograd.grad(out, list(weights.values()), g2)
    for name, a, c in zip(weights, g_w, g_w2):
        assert torch.equal(a, c), name
