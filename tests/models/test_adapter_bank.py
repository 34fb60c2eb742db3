"""The adapter bank on the digits model: rows of many LoRA adapters in one call equal each adapter
run alone (a peft copy of its own), gradients split by rows, and the bank's byte budget (LRU
eviction, pins, refusal) — docs/design.md §5, "Many adapters"."""

from __future__ import annotations

import gc

import pytest
import torch
from torch import nn

from adjointdpm_server.errors import ResourceExhausted
from adjointdpm_server.models import AdapterBank, AdapterSpec, load_model
from adjointdpm_server.models._adapters import load_adapter, trainable_state, with_lora
from adjointdpm_server.models._bank import MixedRowsUnsupported

ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")


@pytest.fixture(scope="module")
def digits64():
    return load_model("digits", device="cpu", dtype=torch.float64)


@pytest.fixture(scope="module")
def digits32():
    return load_model("digits", device="cpu", dtype=torch.float32)


def random_adapter(eps_fn, spec: AdapterSpec, seed: int, scale: float = 0.3) -> dict:
    """A LoRA state with random A and B (B = 0 would hide every mistake)."""
    gen = torch.Generator().manual_seed(seed)
    model = with_lora(eps_fn, spec.rank, spec.alpha, spec.targets, init_lora_weights=False)
    return {k: (torch.randn(v.shape, generator=gen, dtype=torch.float64) * scale).to(v.dtype)
            for k, v in trainable_state(model).items()}


def trained_copy(eps_fn, spec: AdapterSpec, state: dict, names):
    """A peft copy holding ``state`` as its trainable adapter, and its leaves in ``names``' order:
    the trained adapter run alone, to differentiate directly."""
    copy = with_lora(eps_fn, spec.rank, spec.alpha, spec.targets, init_lora_weights=False)
    own = dict(copy.named_parameters())
    with torch.no_grad():
        for n in names:
            own[n].copy_(state[n])
    return copy, [own[n] for n in names]


SPECS = [AdapterSpec(1 + 2 * (i % 4), float(i + 1) if i % 2 else None,
                     ATTENTION if i % 3 else ("to_q", "to_v")) for i in range(8)]
SPECS.append(AdapterSpec(3, 2.0, ("conv1", "time_emb_proj")))  # ResNet layers: other targets


def loaded(bank, eps_fn, specs=SPECS):
    states = [random_adapter(eps_fn, s, seed=i) for i, s in enumerate(specs)]
    views = [bank.view(f"a{i}", lambda i=i: (states[i], specs[i])) for i in range(len(specs))]
    return states, views


def inputs(backend, rows: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, *backend.latent_shape, generator=gen, dtype=torch.float64).to(backend.dtype)
    t = torch.full((rows,), 420.0, dtype=backend.dtype)
    c = torch.randint(0, 10, (rows,), generator=gen)
    return x, t, c


def relative(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


# float32: a request's rows in a batch of 19 differ from the same rows alone by up to 4e-5
# relative with no bank at all (the conv kernels change with the batch size); the bank adds
# nothing to that (its rows equal the peft copy's on the same batch to 1e-5, bitwise measured)
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_rows_of_nine_adapters_and_the_base_equal_each_alone(digits64, digits32, dtype, tol):
    backend = digits64 if dtype == torch.float64 else digits32
    eps = backend.eps_fn
    bank = AdapterBank(eps, 1 << 30)
    states, views = loaded(bank, eps)
    parts = [(v, 1 + i % 2) for i, v in enumerate(views)] + [(bank.base_view, 2)]
    rows = sum(r for _, r in parts)
    x, t, c = inputs(backend, rows)
    with torch.no_grad():
        out = bank.run_rows(x, t, c, parts)
    assert bank.stats.distinct[len(views)] == 1
    start = 0
    for i, (view, n) in enumerate(parts):
        sl = slice(start, start + n)
        start += n
        alone = eps if i == len(views) else load_adapter(eps, "lora", states[i], rank=SPECS[i].rank,
                                                          alpha=SPECS[i].alpha, targets=SPECS[i].targets)
        with torch.no_grad():
            ref = alone(x[sl], t[sl], c[sl])
            base = eps(x[sl], t[sl], c[sl])
        assert relative(out[sl], ref) <= tol, f"part {i}"
        if dtype == torch.float32:
            with torch.no_grad():
                same_batch = alone(x, t, c)[sl]
            assert relative(out[sl], same_batch) <= 1e-5, f"part {i}"
        if i < len(views):
            assert (ref - base).abs().max().item() > 1e-3, "the adapter must change the output"


def test_a_trained_adapter_gets_the_gradient_of_its_rows_only(digits64):
    eps = digits64.eps_fn
    bank = AdapterBank(eps, 1 << 30)
    states, views = loaded(bank, eps)
    spec = AdapterSpec(4, 8.0, ATTENTION)
    start = random_adapter(eps, spec, seed=99)
    trained = bank.trainable(start, spec)
    weights = [p for p in trained.parameters() if p.requires_grad]
    assert len(weights) == len(start) and all(isinstance(p, nn.Parameter) for p in weights)
    parts = [(v, 1) for v in views] + [(trained, 2), (bank.base_view, 1)]
    x, t, c = inputs(digits64, len(views) + 3, seed=1)
    cond = digits64.embed(digits64.encode(len(x), labels=c.tolist())).cond.detach()
    x, cond = x.requires_grad_(), cond.requires_grad_()
    out = bank.run_rows(x, t, cond, parts)
    cot = torch.randn_like(out)
    gx, gc, *gw = torch.autograd.grad(out, [x, cond, *weights], cot)

    names = [n for n, p in trained.named_parameters() if p.requires_grad]
    copy, leaves = trained_copy(eps, spec, start, names)
    mine = slice(len(views), len(views) + 2)
    x2, c2 = x[mine].detach().requires_grad_(), cond[mine].detach().requires_grad_()
    ref = copy(x2, t[mine], c2)
    rx, rc, *rw = torch.autograd.grad(ref, [x2, c2, *leaves], cot[mine])
    assert (out[mine] - ref).abs().max().item() <= 1e-10
    assert (gx[mine] - rx).abs().max().item() <= 1e-10
    assert (gc[mine] - rc).abs().max().item() <= 1e-10
    assert max((a - b).abs().max().item() for a, b in zip(gw, rw)) <= 1e-10
    assert max(g.abs().max().item() for g in gw) > 1e-3

    # other rows' cotangents leave its gradient exactly as it was; nothing reaches other weights
    cot2 = cot.clone()
    cot2[: len(views)] *= -3.0
    cot2[-1] += 1.0
    out = bank.run_rows(x, t, cond, parts)
    gw2 = torch.autograd.grad(out, weights, cot2)
    assert all(torch.equal(a, b) for a, b in zip(gw, gw2))
    frozen = [p for v in views for p in v.parameters()]
    assert not any(p.requires_grad for p in frozen) and not any(p.requires_grad for p in bank.net.parameters())


def test_views_train_save_and_restore_under_a_peft_copys_names(digits64):
    eps = digits64.eps_fn
    bank = AdapterBank(eps, 1 << 30)
    spec = AdapterSpec(2, None, ATTENTION)
    copy = with_lora(eps, spec.rank, spec.alpha, spec.targets)
    trained = bank.trainable({n: p.detach() for n, p in copy.named_parameters() if p.requires_grad}, spec)
    assert trainable_state(trained).keys() == trainable_state(copy).keys()
    assert ({n for n, p in trained.named_parameters() if p.requires_grad}
            == {n for n, p in copy.named_parameters() if p.requires_grad})
    standalone = bank.view("saved", lambda: (trainable_state(trained), spec)).standalone()
    x, t, c = inputs(digits64, 2)
    with torch.no_grad():
        assert torch.equal(standalone(x, t, c), copy(x, t, c))


def test_least_recently_used_unpinned_adapters_are_evicted_first(digits64):
    eps = digits64.eps_fn
    state = random_adapter(eps, SPECS[1], seed=0)
    size = sum(v.numel() * v.element_size() for v in state.values())
    bank = AdapterBank(eps, 3 * size)
    load = lambda: (state, SPECS[1])  # noqa: E731
    for key in ("a", "b", "c"):
        bank.view(key, load)  # dropped at once: unpinned
    bank.view("a", load)  # a is now the most recent
    pinned = bank.view("b", load)
    assert (bank.stats.hits, bank.stats.misses) == (2, 3)
    bank.view("d", load)  # evicts c: the least recent unpinned (b is in use, a newer)
    assert set(bank._entries) == {"a", "b", "d"} and bank.stats.evictions == 1
    assert bank.nbytes == 3 * size
    other = [bank.view(k, load) for k in ("a", "d")]
    with pytest.raises(ResourceExhausted, match="adapter bank is full"):
        bank.view("e", load)  # a, b, d all in use
    del other
    gc.collect()
    bank.view("e", load)
    assert "b" in bank._entries and pinned.entry.name in {e.name for e in bank._entries.values()}


def test_one_tenants_churn_never_evicts_another_tenants_adapter_in_use(digits64):
    eps = digits64.eps_fn
    spec = SPECS[2]
    state = random_adapter(eps, spec, seed=5)
    size = sum(v.numel() * v.element_size() for v in state.values())
    bank = AdapterBank(eps, 4 * size)
    mine = bank.view("mine", lambda: (state, spec))
    x, t, c = inputs(digits64, 2)
    with torch.no_grad():
        before = mine(x, t, c)
    churn = [random_adapter(eps, spec, seed=100 + i, scale=0.1) for i in range(100)]
    for i in range(100):
        view = bank.view(f"churn{i}", lambda i=i: (churn[i], spec))
        with torch.no_grad():
            view(x, t, c)
        del view
    assert "mine" in bank._entries and bank.stats.evictions >= 96
    with torch.no_grad():
        assert torch.equal(mine(x, t, c), before)


def test_an_adapter_that_does_not_fit_is_refused_and_leaves_nothing(digits64):
    eps = digits64.eps_fn
    bank = AdapterBank(eps, 1 << 30)
    state = random_adapter(eps, SPECS[1], seed=0)
    wrong = AdapterSpec(SPECS[1].rank + 1, None, SPECS[1].targets)
    with pytest.raises(ValueError, match="shape"):
        bank.view("bad", lambda: (state, wrong))
    assert bank.resident == 0 and not [n for n, _ in bank.net.named_parameters() if "lora_" in n]
    other = {k.replace("to_q", "to_k"): v for k, v in state.items() if "to_q" in k}
    with pytest.raises(ValueError, match="does not fit"):
        bank.view("bad", lambda: (other, AdapterSpec(SPECS[1].rank, None, ("to_q",))))


def test_with_mixing_off_each_adapter_shares_calls_only_with_itself(digits64):
    eps = digits64.eps_fn
    on, off = AdapterBank(eps, 1 << 30), AdapterBank(eps, 1 << 30, mixed=False)
    _, von = loaded(on, eps, SPECS[:2])
    _, voff = loaded(off, eps, SPECS[:2])
    assert von[0].shares == von[1].shares == on.base_view.shares
    assert voff[0].shares != voff[1].shares and voff[0].shares != off.base_view.shares
    assert off.view("a0", lambda: None).shares == voff[0].shares


class _Folding(nn.Module):
    """A network that folds its batch into its features' rows: a LoRA layer sees 2 × B rows."""

    def __init__(self):
        super().__init__()
        self.to_q = nn.Linear(4, 4, dtype=torch.float64)

    def forward(self, x, t, cond):
        return self.to_q(x.reshape(-1, 4)).reshape(x.shape)


def test_a_network_that_folds_its_batch_falls_back_to_calls_per_adapter():
    net = _Folding()
    bank = AdapterBank(net, 1 << 20)
    spec = AdapterSpec(2, None, ("to_q",))
    states, views = loaded(bank, net, [spec, spec])
    x = torch.randn(2, 2, 4, dtype=torch.float64)
    with torch.no_grad():
        alone = views[0](x[:1], None, None)  # one adapter's rows: right whatever the layer sees
        ref = load_adapter(net, "lora", states[0], rank=2, targets=("to_q",))(x[:1], None, None)
        assert torch.equal(alone, ref)
        with pytest.raises(MixedRowsUnsupported):
            bank.run_rows(x, None, None, [(views[0], 1), (views[1], 1)])
    assert bank.stats.fallbacks == 1 and not bank.mixed
    assert views[0].shares != views[1].shares  # separate calls from now on


def test_a_trained_adapters_new_weights_reach_the_next_mixed_call(digits64):
    """Stacked weights are kept between calls of the same adapters, never for a trained one:
    its weights change in place between calls (an optimizer step)."""
    eps = digits64.eps_fn
    bank = AdapterBank(eps, 1 << 30)
    _, views = loaded(bank, eps, SPECS[:2])
    spec = AdapterSpec(2, None, ATTENTION)
    start = random_adapter(eps, spec, seed=3)
    trained = bank.trainable(start, spec)
    parts = [(views[0], 1), (trained, 1), (views[1], 1)]
    x, t, c = inputs(digits64, 3)
    names = [n for n, p in trained.named_parameters() if p.requires_grad]
    with torch.no_grad():
        bank.run_rows(x, t, c, parts)
        bank.run_rows(x, t, c, [(views[0], 1), (views[1], 2)])  # frozen only: stacks kept
        for p in trained.parameters():
            if p.requires_grad:
                p.add_(0.05)  # the optimizer's step, in place
        out = bank.run_rows(x, t, c, parts)
        copy, _ = trained_copy(eps, spec, {n: p for n, p in trained.named_parameters() if p.requires_grad}, names)
        want = copy(x[1:2], t[1:2], c[1:2])
    assert (out[1:2] - want).abs().max().item() <= 1e-10
