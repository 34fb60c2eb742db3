"""The ``sample`` contract: what is differentiable, and which conditioning shapes are accepted."""

import torch

from adjointdpm_server.core import VPSchedule, sample


def test_extra_params_of_a_closure_get_gradients_in_every_mode():
    sch = VPSchedule.linear()
    w = torch.tensor([0.7, -0.3, 1.2], dtype=torch.float64, requires_grad=True)

    def eps(x, t, cond):
        return torch.tanh(x * w) * 0.5 + 0.1 * cond

    x_T = torch.randn(2, 3, dtype=torch.float64)
    cond = torch.randn(1, 3, dtype=torch.float64, requires_grad=True)  # batch 1: broadcast
    grads = {}
    for mode in ("backprop", "checkpoint", "adjoint"):
        x0 = sample(eps, x_T, cond, schedule=sch, steps=8, solver="dpm2", grad_mode=mode, params=[w])
        grads[mode] = torch.autograd.grad(x0.square().sum(), [w, cond])
    for a, b in zip(grads["backprop"], grads["checkpoint"]):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)
    for a, b in zip(grads["backprop"], grads["adjoint"]):
        assert float((a - b).norm() / a.norm()) < 0.1  # measured 0.05: re-solved trajectory


def test_integer_class_labels_as_conditioning_with_guidance():
    """Non-differentiable conditioning (class labels) passes straight through to eps_fn."""
    sch = VPSchedule.linear()
    seen = []

    def eps(x, t, labels):
        seen.append(labels.clone())
        return 0.1 * x + 0.01 * labels.to(x.dtype)[:, None]

    x_T = torch.randn(2, 3, requires_grad=True)
    x0 = sample(eps, x_T, torch.tensor([3, 7]), schedule=sch, steps=2, guidance_scale=2.0,
                uncond=torch.tensor([10, 10]))
    x0.sum().backward()
    assert seen[0].tolist() == [3, 7, 10, 10]
    assert x_T.grad is not None and torch.isfinite(x_T.grad).all()


def test_backward_twice_with_retain_graph_gives_the_same_gradient():
    sch = VPSchedule.linear()
    w = torch.tensor([0.7, -0.3, 1.2], dtype=torch.float64, requires_grad=True)
    x_T = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    for mode in ("checkpoint", "adjoint"):
        x0 = sample(lambda x, t, c: torch.tanh(x * w), x_T, schedule=sch, steps=6, grad_mode=mode, params=[w])
        first = torch.autograd.grad(x0.sum(), [x_T, w], retain_graph=True)
        second = torch.autograd.grad(x0.sum(), [x_T, w])
        for a, b in zip(first, second):
            assert torch.equal(a, b), mode


def test_a_tensor_listed_twice_counts_once():
    sch = VPSchedule.linear()
    w = torch.tensor([0.7, -0.3, 1.2], dtype=torch.float64, requires_grad=True)
    x_T = torch.randn(2, 3, dtype=torch.float64)
    grads = []
    for mode, params in (("backprop", None), ("checkpoint", [w, w])):
        x0 = sample(lambda x, t, c: torch.tanh(x * w), x_T, schedule=sch, steps=4, grad_mode=mode, params=params)
        grads.append(torch.autograd.grad(x0.sum(), w)[0])
    assert torch.allclose(grads[0], grads[1], rtol=1e-10)


def test_a_batch_of_scalars_is_a_valid_x_T():
    """x_T of shape (B,): the leading dimension is the batch, no event dimensions needed."""
    sch = VPSchedule.linear()
    x_T = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64, requires_grad=True)
    x0 = sample(lambda x, t, c: 0.3 * x, x_T, schedule=sch, steps=4)
    assert x0.shape == (3,)
    (g,) = torch.autograd.grad(x0.sum(), x_T)
    assert g.shape == (3,) and torch.allclose(g, g[0].expand(3))  # a linear field: the same factor
