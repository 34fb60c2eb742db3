"""Truncated gradients over the wire: ``truncate`` (DRaFT-K) and ``truncate_min`` (AlignProp's
randomized K) on ComputeGradient and FinetuneWeights — the same numbers as the core's truncated
gradient in process, the exact gradient at K = steps, reproducible random K, clear refusals."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

import adjointdpm
from adjointdpm_server.core import sample

STEPS = 6


@pytest.fixture
def problem():
    rng = np.random.default_rng(3)
    x_T = rng.normal(size=(2, 1, 8, 8)).astype(np.float32)
    cond = (0.1 * rng.normal(size=(2, 1, 8, 8))).astype(np.float32)
    target = rng.uniform(size=(1, 8, 8)).astype(np.float32)
    return x_T, cond, target


def _in_process(rt, x_T, cond, target, truncate):
    backend = rt.models["gaussian-mixture"]
    c = torch.from_numpy(cond).requires_grad_()
    x0 = sample(backend.eps_fn, torch.from_numpy(x_T), c, schedule=backend.schedule,
                grid=backend.default_grid, steps=STEPS, grad_mode="checkpoint", truncate=truncate)
    loss = (backend.decode(x0) - torch.from_numpy(target)).square().flatten(1).mean(1).sum()
    return torch.autograd.grad(loss, [c])[0].numpy()


def test_a_truncated_cond_gradient_is_the_core_s_and_k_equal_steps_is_exact(client, rt, problem):
    x_T, cond, target = problem
    loss = adjointdpm.ServerLoss("mse", tensors={"target": target})
    common = dict(targets=["cond"], model="gaussian-mixture", x_T=x_T, cond=cond, steps=STEPS,
                  grad_mode="checkpoint")
    exact = client.compute_gradient(loss, **common).gradients["cond"]
    for k in (1, 3):
        got = client.compute_gradient(loss, truncate=k, **common).gradients["cond"]
        want = _in_process(rt, x_T, cond, target, k)
        assert np.linalg.norm(got - want) <= 1e-5 * np.linalg.norm(want)
        assert np.linalg.norm(got - exact) > 1e-3 * np.linalg.norm(exact)  # an approximation
    at_steps = client.compute_gradient(loss, truncate=STEPS, **common).gradients["cond"]
    assert np.array_equal(at_steps, exact)


def test_a_randomized_truncation_draws_its_k_from_the_seeded_stream(client, rt, problem):
    x_T, cond, target = problem
    loss = adjointdpm.ServerLoss("mse", tensors={"target": target})
    got = client.compute_gradient(loss, targets=["cond"], model="gaussian-mixture", x_T=x_T,
                                  cond=cond, steps=STEPS, grad_mode="checkpoint", truncate=5,
                                  truncate_min=2).gradients["cond"]
    k = random.Random(0).randint(2, 5)  # iteration 0's draw
    want = _in_process(rt, x_T, cond, target, k)
    assert np.linalg.norm(got - want) <= 1e-5 * np.linalg.norm(want)


def test_fine_tunes_with_truncation_are_reproducible_and_differ_from_exact(client):
    common = dict(losses=adjointdpm.ServerLoss("classifier", params={"label": 8}),
                  examples=[{"seed": k, "label": k} for k in range(2)], iterations=3, lr=5e-3,
                  steps=STEPS, lora_rank=2)
    exact = client.finetune_weights(**common)
    draftk = client.finetune_weights(truncate=2, **common)
    randomized = [client.finetune_weights(truncate=4, truncate_min=1, **common) for _ in range(2)]
    assert draftk.history[0] == pytest.approx(exact.history[0], rel=1e-6)  # same start
    assert draftk.history[1:] != pytest.approx(exact.history[1:], rel=1e-7)
    assert randomized[0].history == randomized[1].history


@pytest.mark.parametrize("bad, says", [
    (dict(truncate=2, targets=["x_T"]), "none w.r.t. x_T"),
    (dict(truncate=2, truncate_min=3, targets=["cond"]), "at most truncate"),
    (dict(truncate_min=1, targets=["cond"]), "needs truncate"),
    (dict(truncate=2, targets=["cond"], grad_mode="backprop"), "truncate needs"),
])
def test_bad_truncations_are_invalid_arguments(client, bad, says):
    loss = adjointdpm.ServerLoss("mse", tensors={"target": np.zeros((1, 8, 8), np.float32)})
    with pytest.raises(adjointdpm.AdjointDPMError) as err:
        client.compute_gradient(loss, model="gaussian-mixture", seed=0, steps=STEPS, **bad)
    assert err.value.code.name == "INVALID_ARGUMENT" and says in err.value.details
