"""The ``triton`` loss against a real Triton Inference Server (PyTriton's bundled one, on CPU).

The server (tests/conftest.py's ``triton_url`` fixture) runs in its own venv and serves
tests/triton_peer/serve_mse_loss.py: ``mse_loss`` (mean((x - 0.5)²) and its gradient),
``mse_per_sample`` (one loss per sample), and two misbehaving models, ``bad_grad`` and
``nan_loss``.
"""

from __future__ import annotations

import pytest
import torch

from adjointdpm_server.errors import InvalidArgument, NotFound, Unavailable
from adjointdpm_server.losses import LossContext
from adjointdpm_server.losses._triton import TritonLoss

TARGET = 0.5  # serve_mse_loss.py's default


def _loss(setting: str | None, **params) -> TritonLoss:
    """The plugin on a server whose triton_url setting is ``setting``."""
    settings = {"triton_url": setting} if setting else {}
    return TritonLoss(LossContext(backend=None, settings=settings), params, {})


@pytest.mark.parametrize("shape", [(1, 1, 5, 7), (3, 3, 8, 8)])
def test_value_and_gradient_match_closed_form_mse(triton_url, shape):
    torch.manual_seed(0)
    x = torch.rand(shape, requires_grad=True)
    losses = _loss(triton_url, model="mse_loss")(x)
    # a batch total ([1]) is credited evenly to the samples; their sum is the objective
    assert losses.shape == (shape[0],) and losses.requires_grad
    torch.testing.assert_close(losses, losses[:1].expand(shape[0]))
    loss = losses.sum()
    (3 * loss).backward()  # the upstream gradient must be carried through

    ref_x = x.detach().double().requires_grad_()
    ref = ((ref_x - TARGET) ** 2).mean()
    ref.backward()
    assert abs(loss.item() - ref.item()) < 1e-6
    torch.testing.assert_close(x.grad.double(), 3 * ref_x.grad, rtol=1e-6, atol=1e-9)


def test_per_sample_losses_come_back_per_sample(triton_url):
    """A loss of shape [B] is each sample's; the objective is their sum (docs/design.md §4.3)."""
    torch.manual_seed(1)
    x = torch.rand(3, 1, 4, 4, requires_grad=True)
    losses = _loss(triton_url, model="mse_per_sample")(x)
    weights = torch.tensor([1.0, -2.0, 0.5])  # a non-uniform cotangent reaches each sample's slice
    (weights * losses).sum().backward()
    ref_x = x.detach().double().requires_grad_()
    ref = ((ref_x - TARGET) ** 2).flatten(1).mean(1)
    (weights.double() * ref).sum().backward()
    torch.testing.assert_close(losses.detach().double(), ref.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(x.grad.double(), ref_x.grad, rtol=1e-5, atol=1e-8)


def test_url_parameter_picks_an_allowed_server(triton_url, free_ports):
    dead = f"127.0.0.1:{free_ports(1)[0]}"
    x = torch.full((1, 1, 2, 2), 1.5)
    settings = {"triton_url": dead, "triton_allowed_urls": (triton_url,)}
    loss = TritonLoss(LossContext(backend=None, settings=settings), {"url": triton_url, "model": "mse_loss"}, {})
    assert loss(x).sum().item() == pytest.approx(1.0)


def test_url_parameter_outside_the_allowlist_is_refused(triton_url):
    """No request may point the server at an arbitrary host (server-side request forgery)."""
    with pytest.raises(InvalidArgument, match="not a Triton address this server allows"):
        _loss(triton_url, url="169.254.169.254:80", model="mse_loss")


def test_unknown_model_is_not_found(triton_url):
    with pytest.raises(NotFound, match=rf"Triton model 'no_such_model' at {triton_url}: .*"
                                       r"unknown model"):
        _loss(triton_url, model="no_such_model")(torch.rand(1, 1, 2, 2))


def test_unknown_input_name_is_invalid(triton_url):
    with pytest.raises(InvalidArgument, match=r"unexpected inference input 'image'"):
        _loss(triton_url, model="mse_loss", input="image")(torch.rand(1, 1, 2, 2))


def test_unreachable_server_is_unavailable(free_ports):
    url = f"127.0.0.1:{free_ports(1)[0]}"  # nothing listens there
    with pytest.raises(Unavailable, match=rf"Triton model 'mse_loss' at {url}: .*UNAVAILABLE"):
        _loss(url, model="mse_loss", timeout=10)(torch.rand(1, 1, 2, 2))


def test_wrong_shaped_gradient_is_refused(triton_url):
    with pytest.raises(InvalidArgument, match=r"'bad_grad'.* gradient of shape \(1, 4, 4\) for x "
                                              r"of shape \(2, 1, 4, 4\)"):
        _loss(triton_url, model="bad_grad")(torch.rand(2, 1, 4, 4, requires_grad=True))


def test_nan_loss_is_refused(triton_url):
    with pytest.raises(InvalidArgument, match=r"'nan_loss'.* non-finite loss value"):
        _loss(triton_url, model="nan_loss")(torch.rand(2, 1, 4, 4, requires_grad=True))


@pytest.mark.parametrize("settings_url,params,match", [
    (None, dict(model="mse_loss"), "needs a Triton gRPC address"),
    ("127.0.0.1:1", dict(), "needs the parameter 'model'"),
    ("127.0.0.1:1", dict(model=3), "parameter 'model' must be a string"),
    ("127.0.0.1:1", dict(model="m", timeout=0), "parameter 'timeout' must lie in"),
    ("127.0.0.1:1", dict(model="m", batch=2), "does not take batch"),
])
def test_bad_parameters_are_refused_before_any_call(settings_url, params, match):
    with pytest.raises(InvalidArgument, match=match):
        _loss(settings_url, **params)


def test_triton_loss_through_the_service(triton_url, tmp_path):
    """End to end: SDK → AdjointDPM server → Triton → gradient back through the sampler; equal
    to the same loss computed in-process in closed form."""
    import numpy as np

    import adjointdpm
    from adjointdpm_server.config import ServerConfig
    from adjointdpm_server.core import sample
    from adjointdpm_server.wire import build_server

    srv = build_server(ServerConfig(models=("gaussian-mixture",), port=0, artifact_dir=tmp_path,
                                    triton_url=triton_url))
    try:
        with adjointdpm.Client(f"127.0.0.1:{srv.port}", timeout=120) as client:
            got = client.compute_gradient(adjointdpm.ServerLoss("triton", {"model": "mse_loss"}),
                                          seed=0, batch=2, steps=6)
        backend = srv.runtime.models["gaussian-mixture"]
        x = backend.noise(2, seed=0).requires_grad_()
        x0 = sample(backend.eps_fn, x, backend.encode(2).cond, schedule=backend.schedule, grid=backend.default_grid, steps=6)
        ref = (backend.decode(x0) - 0.5).square().mean()
        (g,) = torch.autograd.grad(ref, x)
        assert got.loss == pytest.approx(float(ref.detach()), rel=1e-5)
        assert np.linalg.norm(got.gradients["x_T"] - g.numpy()) <= 1e-5 * g.norm().item()
    finally:
        srv.stop(0)
