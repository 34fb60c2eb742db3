"""The ``adjoint`` under classifier-free guidance on the embedded digits model (float64, dpm3, its
default span and grid): ranked anchors (docs/design.md §2.4.1) against ``checkpoint``, the exact
gradient of the sampler, measured as issue 13 states its goals — directional derivatives of
∂L/∂x_T on random directions."""

import pytest
import torch
from adjointdpm_server.core import sample
from adjointdpm_server.core._field import GuidedEps, nodes_from_times
from adjointdpm_server.core._gradients import VJP
from adjointdpm_server.core._grids import time_grid
from adjointdpm_server.core._memory import RankedAnchors
from adjointdpm_server.core._solvers import get_solver
from adjointdpm_server.models import load_model

DPM3_ORDER = 3


@pytest.fixture(scope="module")
def digits():
    backend = load_model("digits", dtype=torch.float64)
    c = backend.encode(4, labels=torch.arange(4))
    x_T = backend.noise(4, seed=0)
    g = torch.Generator().manual_seed(1)
    w = torch.randn(x_T.shape, generator=g, dtype=torch.float64)
    dirs = torch.randn(8, *x_T.shape, generator=g, dtype=torch.float64)
    return backend, c, x_T, w, dirs


def _grad(digits, mode, steps, scale=2.0, states=None, nfe=None):
    backend, c, x_T, w, _ = digits
    x = x_T.clone().requires_grad_()
    budget = None if states is None else states * x_T.numel() * x_T.element_size()
    callback = None if nfe is None else (lambda p: nfe.append((p.phase, p.nfe)))
    x0 = sample(backend.eps_fn, x, c.cond, schedule=backend.schedule, steps=steps, solver="dpm3",
                grad_mode=mode, guidance_scale=scale, uncond=c.uncond, grid=backend.default_grid,
                prediction=backend.prediction, memory_budget=budget, callback=callback)
    return torch.autograd.grad((x0 * w).sum(), [x])[0]


def _directional(digits, a, ref):
    """(‖D(a − ref)‖ / ‖D ref‖, worst |⟨a − ref, d⟩| / |⟨ref, d⟩|) over the 8 directions d."""
    dirs = digits[4]
    d_a, d_ref = (dirs * a).flatten(1).sum(1), (dirs * ref).flatten(1).sum(1)
    return float((d_a - d_ref).norm() / d_ref.norm()), float(((d_a - d_ref).abs() / d_ref.abs()).max())


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def test_half_the_states_meet_the_cfg2_goals(digits):
    """≤ 5e-2 at 10 steps (8 states: 5 anchors + the 3 the ranking holds unrated; 2.0e-2 measured
    over the 8 directions), ≤ 1e-2 at 20 steps in the worst single direction (10 states; 7.5e-3
    measured). The paper's adjoint (y_N only) misses both: 0.13 over the directions, 0.040 worst."""
    ck10, ck20 = _grad(digits, "checkpoint", 10), _grad(digits, "checkpoint", 20)
    over_dirs, _ = _directional(digits, _grad(digits, "adjoint", 10, states=8), ck10)
    _, worst = _directional(digits, _grad(digits, "adjoint", 20, states=10), ck20)
    assert over_dirs <= 5e-2
    assert worst <= 1e-2
    assert _directional(digits, _grad(digits, "adjoint", 10), ck10)[0] > 5e-2
    assert _directional(digits, _grad(digits, "adjoint", 20), ck20)[1] > 1e-2


def test_ranked_anchors_beat_evenly_spaced_ones(digits):
    """Five states chosen by their reversed-step error against every other state (the previous
    scheme, forced through the solver): 0.013 against 0.053 relative L2 measured. A budget of
    5 + 3 states keeps exactly 5 anchors: dpm3's ranking holds 3 states until it can rate them."""
    backend, c, x_T, w, _ = digits
    steps, scale = 10, 2.0
    ck = _grad(digits, "checkpoint", steps, scale)
    ranked = _grad(digits, "adjoint", steps, scale, states=5 + DPM3_ORDER)

    field = GuidedEps(backend.eps_fn, scale, prediction=backend.prediction, schedule=backend.schedule)
    nodes = nodes_from_times(backend.schedule, time_grid(backend.schedule, steps, backend.default_grid,
                                                         backend.schedule.t_max, backend.schedule.t_min))
    solver = get_solver("dpm3", backend.schedule)

    def backward(store=frozenset(), anchors=None):
        with torch.no_grad():
            y_end, states = solver.solve(field, x_T / nodes[0].alpha, nodes, c.cond, c.uncond,
                                         store=store, anchors=anchors)
            assert len(states) == 5
            vjp = VJP(c.cond, c.uncond, [], needs_cond=False, needs_uncond=False)
            y0bar = solver.backward(field, vjp, nodes, y_end, w * nodes[-1].alpha, stored=states)
        return y0bar / nodes[0].alpha

    even = backward(store=frozenset(range(0, steps, 2)))
    assert _rel(ranked, ck) < 0.5 * _rel(even, ck)
    assert _rel(backward(anchors=RankedAnchors(5)), ranked) < 1e-12


def test_ranking_costs_no_network_call(digits):
    """Rating the states reuses the forward pass's ε and hands ε̃(y_N) to the backward pass: the
    same 2N + 1 calls as the paper's adjoint, ε̃(y_N) counted where it runs (the forward pass)."""
    paper, ranked = [], []
    _grad(digits, "adjoint", 10, nfe=paper)
    _grad(digits, "adjoint", 10, states=8, nfe=ranked)
    assert paper[-1][1] == ranked[-1][1] == 2 * 10 + 1

    def forward_calls(events):
        return max(n for phase, n in events if phase == "forward")
    assert (forward_calls(paper), forward_calls(ranked)) == (10, 11)


def test_converges_with_steps_at_cfg_7_5(digits):
    """Half the states as budget: 0.29 → 0.022 → 0.0023 relative L2 at 10/20/40 steps measured."""
    errors = [_rel(_grad(digits, "adjoint", n, 7.5, states=n // 2), _grad(digits, "checkpoint", n, 7.5))
              for n in (10, 20, 40)]
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 1e-2
