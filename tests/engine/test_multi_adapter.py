"""The engine with an adapter bank (digits, float64): jobs on different LoRA adapters and on the
base model share one network call — forward calls, VJPs, and a trained adapter's weight
gradients — each job's result equal to the same job run alone; a whole sampler gradient through
the engine equals direct backprop through a peft copy."""

import pytest
import torch

from adjointdpm_server.core import sample
from adjointdpm_server.engine import NetworkEngine
from adjointdpm_server.models import AdapterBank, AdapterSpec, load_model
from adjointdpm_server.models._adapters import load_adapter
from adjointdpm_server.tasks import LocalJob
from tests.engine.test_engine import _in_threads, _inputs, _sessions
from tests.models.test_adapter_bank import SPECS, random_adapter, trained_copy


@pytest.fixture(scope="module")
def digits64():
    return load_model("digits", dtype=torch.float64)


@pytest.fixture(scope="module")
def bank(digits64):
    bank = AdapterBank(digits64.eps_fn, 1 << 30)
    bank.states = [random_adapter(digits64.eps_fn, s, seed=i) for i, s in enumerate(SPECS)]
    bank.views = [bank.view(f"a{i}", lambda i=i: (bank.states[i], SPECS[i])) for i in range(len(SPECS))]
    return bank


def _alone(backend, bank, i):
    if i == len(SPECS):
        return backend.eps_fn
    s = SPECS[i]
    return load_adapter(backend.eps_fn, "lora", bank.states[i], rank=s.rank, alpha=s.alpha, targets=s.targets)


@pytest.mark.parametrize("mixed", [True, False])
def test_jobs_on_nine_adapters_and_the_base_share_one_forward_call(digits64, bank, mixed):
    bank.mixed = mixed
    try:
        engine = NetworkEngine(max_batch=64, window_ms=2000)
        views = [*bank.views, bank.base_view]
        jobs = [LocalJob(caller=f"tenant{k}") for k in range(len(views))]
        inputs = [_inputs(digits64, k, rows=1 + k % 2) for k in range(len(views))]

        def call(job, view, x, t, c):
            with torch.no_grad():
                return engine.network(view, job)(x, t, c)

        with _sessions(engine, jobs):
            out, errors = _in_threads([lambda j=j, v=v, a=a: call(j, v, *a)
                                       for j, v, a in zip(jobs, views, inputs)])
        assert errors == [None] * len(views)
        assert engine.stats.calls["forward"] == (1 if mixed else len(views))
        for i, (got, (x, t, c)) in enumerate(zip(out, inputs)):
            with torch.no_grad():
                want = _alone(digits64, bank, i)(x, t, c)
            assert (got - want).abs().max().item() <= 1e-10, f"job {i}"
    finally:
        bank.mixed = True


def test_vjps_with_a_trained_adapters_weights_share_one_call(digits64, bank):
    engine = NetworkEngine(max_batch=64, window_ms=2000)
    spec = AdapterSpec(4, 2.0, ("to_q", "to_k", "to_v", "to_out.0"))
    start = random_adapter(digits64.eps_fn, spec, seed=50)
    trained = bank.trainable(start, spec)
    weights = tuple(p for p in trained.parameters() if p.requires_grad)
    views = [*bank.views[:8], trained, bank.base_view]
    jobs = [LocalJob(caller=f"tenant{k}") for k in range(len(views))]
    inputs = [_inputs(digits64, 20 + k) for k in range(len(views))]
    cots = [torch.randn_like(a[0]) for a in inputs]

    def call(job, view, x, t, c, cot):
        return engine.network(view, job).vjp(x, t, c, cot, True, weights if view is trained else ())

    with _sessions(engine, jobs):
        out, errors = _in_threads([lambda j=j, v=v, a=a, g=g: call(j, v, *a, g)
                                   for j, v, a, g in zip(jobs, views, inputs, cots)])
    assert errors == [None] * len(views)
    assert engine.stats.calls["vjp"] == 1 and engine.stats.items["vjp"] == len(views)
    names = [n for n, p in trained.named_parameters() if p.requires_grad]
    copy, leaves = trained_copy(digits64.eps_fn, spec, start, names)
    for k, ((eps, gx, gc, gw), (x, t, c), cot) in enumerate(zip(out, inputs, cots)):
        net = copy if views[k] is trained else _alone(digits64, bank, k if k < 8 else len(SPECS))
        x_, c_ = x.clone().requires_grad_(), c.clone().requires_grad_()
        wants = [x_, c_] + (leaves if views[k] is trained else [])
        ref = net(x_, t, c_)
        grads = torch.autograd.grad(ref, wants, cot)
        assert (eps - ref).abs().max().item() <= 1e-10
        assert (gx - grads[0]).abs().max().item() <= 1e-10
        assert (gc - grads[1]).abs().max().item() <= 1e-10
        if views[k] is trained:
            assert len(gw) == len(weights)
            assert max((a - b).abs().max().item() for a, b in zip(gw, grads[2:])) <= 1e-10
        else:
            assert gw == ()


@pytest.mark.parametrize("grad_mode", ["checkpoint", "adjoint"])
def test_a_sampler_gradient_through_a_banked_adapter_equals_backprop(digits64, bank, grad_mode):
    """The adapter's weight gradient goes through the engine's batched VJPs (``splits_weights``)
    and equals the same mode's through a peft copy of the same weights (autograd on each call),
    and for ``checkpoint`` (exact) plain backprop's."""
    engine = NetworkEngine(max_batch=64, window_ms=0)
    spec = AdapterSpec(2, None, ("to_q", "to_v"))
    start = random_adapter(digits64.eps_fn, spec, seed=7, scale=0.2)
    trained = bank.trainable(start, spec)
    job = LocalJob(caller="trainer")
    x_T = digits64.noise(2, seed=3)
    labels = torch.tensor([3, 8])
    weights = [p for p in trained.parameters() if p.requires_grad]
    with engine.session(job):
        x0 = sample(engine.network(trained, job), x_T, labels, schedule=digits64.schedule, steps=4,
                    grad_mode=grad_mode, guidance_scale=2.0, uncond=torch.full((2,), 10))
        got = torch.autograd.grad(x0.square().sum(), weights)
    assert engine.stats.calls["vjp"] >= 4 and engine.stats.calls["solo"] == 0
    names = [n for n, p in trained.named_parameters() if p.requires_grad]
    copy, leaves = trained_copy(digits64.eps_fn, spec, start, names)
    for mode in {grad_mode, "backprop" if grad_mode == "checkpoint" else grad_mode}:
        ref = sample(copy, x_T, labels, schedule=digits64.schedule, steps=4, grad_mode=mode,
                     guidance_scale=2.0, uncond=torch.full((2,), 10))
        want = torch.autograd.grad(ref.square().sum(), leaves)
        assert max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(got, want)) <= 1e-10
    assert max(g.abs().max().item() for g in got) > 1e-6


def test_adapter_trainers_count_as_gradient_jobs_for_each_other_only(digits64, bank):
    """Fine-tunes of bank adapters share VJPs, so they count for each other's ``auto``; a lone
    gradient job beside them still counts alone (its rows would ride in their batches)."""
    engine = NetworkEngine(max_batch=64, window_ms=5)
    spec = AdapterSpec(2, None, ("to_q", "to_v"))
    trainers = [LocalJob(caller="a") for _ in range(3)]
    lone = LocalJob(caller="b")
    with _sessions(engine, [*trainers, lone]):
        for job in trainers:
            engine.network(bank.trainable(random_adapter(digits64.eps_fn, spec, seed=1), spec), job)
        engine.network(bank.base_view, lone)
        assert engine.gradient_jobs(lone) == 1
        assert engine.gradient_jobs(trainers[0]) == 4  # the three trainers and the lone job
