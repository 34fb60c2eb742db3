"""Bad arguments raise clear errors before any work is done."""

import pytest
import torch

from adjointdpm_server.core import GaussianMixture, VPSchedule, sample


@pytest.fixture
def model():
    return GaussianMixture(VPSchedule.linear(), torch.zeros(1, 4), [1.0])


def _sample(model, x=None, **kw):
    kw.setdefault("schedule", VPSchedule.linear())
    kw.setdefault("steps", 3)
    return sample(model, torch.zeros(2, 4) if x is None else x, **kw)


@pytest.mark.parametrize("steps", [0, -1, 2.5, None, True])
def test_steps_must_be_a_positive_integer(model, steps):
    with pytest.raises(ValueError, match="steps"):
        _sample(model, steps=steps)


@pytest.mark.parametrize("kw,match", [
    (dict(solver="rk45"), "unknown solver 'rk45'; choose one of euler, dpm2, dpm3"),
    (dict(grad_mode="magic"), "unknown grad_mode 'magic'"),
    (dict(grid="cosine"), "unknown grid 'cosine'"),
    (dict(t_start=0.5, t_end=0.5), r"t_end \(0.5\) must be smaller than t_start \(0.5\)"),
    (dict(t_start=0.2, t_end=0.6), "t_end"),
    (dict(t_start=2.0), r"t_start=2.0 is outside the schedule's range"),
    (dict(t_end=0.0), "t_end=0.0 is outside"),
    (dict(guidance_scale=2.0, cond=torch.zeros(2, 4)), "needs both cond and uncond"),
    (dict(guidance_scale=2.0, cond=torch.zeros(2, 4), uncond=torch.zeros(2, 3)), "differ in shape"),
    (dict(cond=torch.zeros(3, 4)), "cond has batch 3 but x_T has batch 2"),
    (dict(steps=None, timesteps=[0.9, 0.5, 0.7]), "strictly decreasing"),
    (dict(steps=5, timesteps=[0.9, 0.5, 0.1]), "steps=5 but 3 timesteps give 2 steps"),
    (dict(steps=None, timesteps=[0.9, 0.5, 0.1], t_start=0.9), "either timesteps or t_start/t_end"),
])
def test_bad_arguments(model, kw, match):
    with pytest.raises(ValueError, match=match):
        _sample(model, **kw)


def test_shape_mismatch_between_model_and_x_T(model):
    with pytest.raises(ValueError, match=r"eps_fn returned \(2, 4\); expected a tensor of shape \(2, 5\)"):
        sample(lambda x, t, c: torch.zeros(2, 4), torch.zeros(2, 5), schedule=VPSchedule.linear(), steps=2)


def test_x_T_must_be_floating(model):
    with pytest.raises(TypeError, match="floating-point"):
        _sample(model, x=torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(TypeError):
        _sample(model, x=[[0.0] * 4] * 2)


def test_nothing_requires_grad_gives_a_plain_tensor(model):
    assert _sample(model, grad_mode="checkpoint").requires_grad  # the mixture's parameters do
    model.requires_grad_(False)
    x0 = _sample(model, grad_mode="checkpoint")
    assert not x0.requires_grad
    x0 = _sample(model, x=torch.zeros(2, 4, requires_grad=True), grad_mode="none")
    assert not x0.requires_grad
