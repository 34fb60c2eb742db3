"""Progress reaches the callback per step and phase; raising from it cancels within one step."""

import pytest
import torch

from adjointdpm_server.core import GaussianMixture, VPSchedule, sample


def _model():
    return GaussianMixture(VPSchedule.linear(), torch.zeros(2, 3), [0.5, 0.7])


@pytest.mark.parametrize("solver,per_step", [("dpm3", 1), ("heun", 2)])
@pytest.mark.parametrize("mode", ["checkpoint", "adjoint"])
def test_progress_events(solver, per_step, mode):
    events = []
    x = torch.randn(2, 3, requires_grad=True)
    x0 = sample(_model(), x, schedule=VPSchedule.linear(), steps=5, solver=solver, grad_mode=mode,
                callback=events.append)
    assert [(e.phase, e.step, e.total) for e in events] == [("forward", k, 5) for k in range(1, 6)]
    assert events[-1].nfe == 5 * per_step
    assert events[0].t > events[-1].t
    events.clear()
    x0.sum().backward()
    assert [(e.phase, e.step) for e in events] == [("backward", k) for k in range(1, 6)]
    assert events[0].t < events[-1].t  # backward walks t upward, from t_end


class Cancelled(Exception):
    pass


def test_raising_from_callback_stops_the_solve():
    calls = []

    def eps(x, t, c):
        calls.append(1)
        return torch.zeros_like(x)

    def stop_after_three(p):
        if p.step == 3:
            raise Cancelled

    with pytest.raises(Cancelled):
        sample(eps, torch.zeros(1, 3), schedule=VPSchedule.linear(), steps=50, callback=stop_after_three)
    assert len(calls) == 3
