"""The shared backend contract for the analytic and the embedded models, and the registry."""

import pytest
import torch

from adjointdpm_server.models import load_model

from .contract import BackendContract, declared
from .tiny_sd import build_tiny_sd


class TestGaussianMixture(BackendContract):
    @pytest.fixture(scope="class")
    @classmethod
    def backend(cls):
        return load_model("gaussian-mixture")

    def conditioning(self, backend, batch):
        offset = torch.zeros((batch, *backend.latent_shape), requires_grad=True)
        return offset, torch.zeros_like(offset), offset


class TestDigits(BackendContract):
    @pytest.fixture(scope="class")
    @classmethod
    def backend(cls):
        return load_model("digits")

    def conditioning(self, backend, batch):
        c = backend.encode(batch, labels=list(range(batch)))
        # the conditioning's learnable part (this test's own instance: the served model stays frozen)
        table = backend.eps_fn.unet.class_embedding.weight.requires_grad_(True)
        return c.cond, c.uncond, table


class TestDigitsFlow(TestDigits):
    """The rectified-flow digits model (velocity), through the same contract."""

    @pytest.fixture(scope="class")
    @classmethod
    def backend(cls):
        return load_model("digits-flow")


class TestStableDiffusionTiny(BackendContract):
    """The tiny SD pipeline built from config, loaded through ``diffusers:<dir>``."""

    @pytest.fixture(scope="class")
    @classmethod
    def backend(cls, tmp_path_factory):
        return load_model(f"diffusers:{build_tiny_sd(tmp_path_factory.mktemp('sd'))}")

    def conditioning(self, backend, batch):
        c = backend.encode(batch, prompt="a photo of a cat")
        cond = c.cond.detach().requires_grad_()
        return cond, c.uncond, cond


@pytest.mark.parametrize("spec", ["digits", "digits-flow", "gaussian-mixture"])
def test_resident_weights_are_frozen(spec):
    backend = load_model(spec)
    assert not any(p.requires_grad for p in backend.eps_fn.parameters())
    x_T = backend.noise(2, seed=0).requires_grad_()
    c = backend.encode(2)
    from adjointdpm_server.core import sample

    sample(backend.eps_fn, x_T, c.cond, schedule=backend.schedule, steps=3, **declared(backend)).sum().backward()
    assert x_T.grad is not None
    assert all(p.grad is None for p in backend.eps_fn.parameters())


def test_registry_errors():
    with pytest.raises(ValueError, match="unknown model 'sd'; choose one of digits, digits-flow, gaussian-mixture, diffusers"):
        load_model("sd")
    with pytest.raises(ValueError, match="local directory"):
        load_model("diffusers")
    with pytest.raises(ValueError, match="takes no argument"):
        load_model("gaussian-mixture:x")
    with pytest.raises(FileNotFoundError, match="not a digits-flow weights directory"):
        load_model("digits-flow:/nonexistent/weights")


def test_digits_conditioning_parsing():
    backend = load_model("digits")
    assert backend.encode(3, labels=4).cond.tolist() == [4, 4, 4]
    assert backend.encode(2, prompt=["1", "7"]).cond.tolist() == [1, 7]
    assert backend.encode(2).cond.tolist() == [10, 10]  # unconditional
    assert backend.encode(2, labels=[1, 2]).uncond.tolist() == [10, 10]
    for bad in (dict(labels=[1, 2, 3]), dict(labels=12), dict(prompt="a cat")):
        with pytest.raises(ValueError):
            backend.encode(2, **bad)
