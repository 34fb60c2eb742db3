"""The contract every model backend passes (docs/design.md §4), as a base class to subclass per backend.

A subclass provides a ``backend`` fixture and ``conditioning(backend, batch)`` returning
``(cond, uncond, leaf)``: the tensors to pass to ``sample`` and the tensor through which the
conditioning is differentiated (an embedding output, a class-embedding table, an offset).
"""

import pytest
import torch

from adjointdpm_server.core import sample


def declared(backend) -> dict:
    """What the backend declares about its network and path: the ``sample`` keywords to use."""
    return dict(prediction=backend.prediction, grid=backend.default_grid)


def cfg_scale(backend, scale):
    """The sampler's CFG scale: none for a model that takes its guidance as an input (FLUX-dev),
    whose ``cond`` carries it (``backend.guide``)."""
    return scale if backend.guidance == "cfg" else None


def _rel(a, b):
    return float((a - b).norm() / b.norm())


class BackendContract:
    guidance = 2.0
    steps = 10  # enough for the adjoint's re-solved trajectory to point the same way (cos > 0.95)

    def conditioning(self, backend, batch):
        raise NotImplementedError

    def _run(self, backend, mode, seed=0, batch=2):
        cond, uncond, leaf = self.conditioning(backend, batch)
        x_T = backend.noise(batch, seed=seed).requires_grad_()
        x0 = sample(backend.eps_fn, x_T, cond, schedule=backend.schedule, steps=self.steps, grad_mode=mode,
                    guidance_scale=cfg_scale(backend, self.guidance), uncond=uncond, params=[leaf],
                    **declared(backend))
        image = backend.decode(x0)
        target = torch.linspace(0, 1, image.numel(), dtype=image.dtype).reshape(image.shape)
        loss = (image - target).square().mean()
        grads = torch.autograd.grad(loss, [x_T, leaf])
        return x0.detach(), image.detach(), loss.detach(), grads

    def test_shapes_and_dtypes(self, backend):
        x_T = backend.noise(3, seed=1)
        assert x_T.shape == (3, *backend.latent_shape) and x_T.dtype == backend.dtype
        cond, uncond, _ = self.conditioning(backend, 3)
        t = torch.full((3,), float(backend.schedule.t_max))
        with torch.no_grad():
            eps = backend.eps(x_T, t, cond)
            image = backend.decode(x_T)
        assert eps.shape == x_T.shape and eps.dtype == backend.dtype
        assert image.shape == (3, *backend.image_shape)
        assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0

    def test_seeded_determinism(self, backend):
        assert torch.equal(backend.noise(2, seed=7), backend.noise(2, seed=7))
        assert not torch.equal(backend.noise(2, seed=7), backend.noise(2, seed=8))
        cond, uncond, _ = self.conditioning(backend, 2)
        runs = [sample(backend.eps_fn, backend.noise(2, seed=seed), cond, schedule=backend.schedule,
                       steps=self.steps, guidance_scale=cfg_scale(backend, self.guidance), uncond=uncond,
                       grad_mode="none",
                       **declared(backend))
                for seed in (5, 5, 6)]
        assert torch.equal(runs[0], runs[1])
        assert not torch.equal(runs[0], runs[2])

    def test_gradients_through_decode_and_conditioning(self, backend):
        _, image, loss, (g_x, g_c) = self._run(backend, "checkpoint")
        assert torch.isfinite(loss)
        for g in (g_x, g_c):
            assert torch.isfinite(g).all() and float(g.abs().max()) > 0

    def test_checkpoint_equals_backprop_through_decode(self, backend):
        x0_bp, _, loss_bp, g_bp = self._run(backend, "backprop")
        x0_ck, _, loss_ck, g_ck = self._run(backend, "checkpoint")
        assert torch.equal(x0_bp, x0_ck) and torch.equal(loss_bp, loss_ck)
        for a, b in zip(g_bp, g_ck):
            assert _rel(b, a) < 1e-5  # float32 rounding: 1e-6 measured

    def test_adjoint_gives_a_close_gradient(self, backend):
        _, _, _, g_bp = self._run(backend, "backprop")
        _, _, _, g_adj = self._run(backend, "adjoint")
        cos = float(torch.nn.functional.cosine_similarity(g_adj[0].flatten(), g_bp[0].flatten(), dim=0))
        assert cos > 0.95  # measured at 10 steps: digits 0.956, mixture 0.9993

    def test_declared_capabilities_are_the_real_ones(self, backend):
        """Callers read ``has_classifier`` / ``has_text_encoder`` instead of probing: a declared
        capability works, an undeclared one refuses plainly."""
        images = backend.decode(backend.noise(2, seed=0))
        if backend.has_classifier:
            logits = backend.classify(images)
            assert logits.shape[0] == 2 and logits.dim() == 2 and bool(torch.isfinite(logits).all())
        else:
            with pytest.raises(NotImplementedError):
                backend.classify(images)
        if backend.has_text_encoder:
            assert isinstance(backend.token_dim, int) and backend.token_dim > 0
            c = backend.encode_with_token(2, "a <*> photo", torch.zeros(backend.token_dim,
                                                                         dtype=backend.dtype))
            assert tuple(c.cond.shape) == (2, *backend.cond_shape)
            start = backend.random_token(seed=3)
            assert start.shape == (backend.token_dim,) and torch.equal(start, backend.random_token(seed=3))
            assert backend.token_init("cat").shape == (backend.token_dim,)
        else:
            with pytest.raises(NotImplementedError):
                backend.encode_with_token(2, "a <*> photo", torch.zeros(4))
            with pytest.raises(NotImplementedError):
                backend.random_token()
        if backend.has_embedding_table:
            table = backend.embedding_table()
            width = backend.token_dim if backend.has_text_encoder else backend.cond_shape[-1]
            assert table.dim() == 2 and table.shape[0] >= 2 and table.shape[1] == width
            assert bool(torch.isfinite(table).all())
        else:
            with pytest.raises(NotImplementedError):
                backend.embedding_table()
