"""Tiled decoding over gRPC, approximate and only on request (design §2.4.4): a tiny Stable
Diffusion at 40×40 (latents 20×20) beside the embedded digits model. ``decoder_tile`` reaches the
decoder's backward passes in every image-domain RPC and comes back in the plan; the gradient is
not the exact one; a tile that is no multiple of 4 (whatever the loss's domain), or a model with
no VAE decoder, is INVALID_ARGUMENT before any work; a loss on the latents has nothing to tile."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import torch

import adjointdpm
from adjointdpm_server.config import Limits, ServerConfig
from adjointdpm_server.wire import build_server

from tests.models.test_stable_diffusion import _offline
from tests.models.tiny_sd import build_tiny_sd

STEPS, TILE = 2, 8
IMAGE = adjointdpm.ServerLoss("mse", tensors={"target": np.full((3, 40, 40), 0.5, np.float32)})
LATENT = adjointdpm.ServerLoss("mse", tensors={"target": np.zeros((4, 20, 20), np.float32)}, domain="latent")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiling")
    with pytest.MonkeyPatch.context() as mp:
        _offline(mp)
        path = build_tiny_sd(root / "sd")
    srv = build_server(ServerConfig(
        models=(f"tiny=diffusers:{path}?height=40&width=40", "digits"), port=0,
        artifact_dir=root / "artifacts", limits=Limits(max_batch=4, max_steps=20)))
    with adjointdpm.Client(f"127.0.0.1:{srv.port}", timeout=300) as c:
        yield c, srv.runtime
    srv.stop(0)


@pytest.fixture(scope="module")
def client(served):
    return served[0]


def _gradient(client, loss=IMAGE, **kwargs):
    return client.compute_gradient(loss, model="tiny", targets=["x_T"], prompt="a cat", batch=2, seed=0,
                                   steps=STEPS, grad_mode="checkpoint", **kwargs)


def test_a_tiled_gradient_reports_its_tile_and_is_not_the_exact_one(client):
    exact, tiled = _gradient(client), _gradient(client, decoder_tile=TILE)
    assert [p.decoder_tile for p in exact.plans] == [0]
    assert [p.decoder_tile for p in tiled.plans] == [TILE]
    g, e = tiled.gradients["x_T"], exact.gradients["x_T"]
    assert np.isfinite(g).all() and np.abs(g).max() > 0
    assert np.abs(g - e).max() > 1e-3 * np.abs(e).max()  # approximate, as asked


CALLS = {
    "optimize_latent": lambda c, **kw: c.optimize_latent(IMAGE, model="tiny", prompt="a cat", batch=1,
                                                          seed=0, steps=STEPS, iterations=1, **kw),
    "finetune_weights": lambda c, **kw: c.finetune_weights(IMAGE, [{"seed": 0, "prompt": "a cat"}],
                                                            model="tiny", iterations=1, steps=STEPS,
                                                            lora_rank=2, **kw),
    "optimize_embedding": lambda c, **kw: c.optimize_embedding(IMAGE, model="tiny", prompt="a photo of <*>",
                                                                seed=0, steps=STEPS, iterations=1,
                                                                token={"initializer": "cat"}, **kw),
}


@pytest.mark.parametrize("method", list(CALLS))
def test_every_image_domain_rpc_decodes_in_the_tiles_asked(served, method):
    """The plan says the tile, and the decoder's backward passes see tiles, never the image."""
    client, runtime = served
    widths = []

    def seen(module, args):
        if torch._C._current_graph_task_id() != -1:  # recomputed inside the backward pass
            widths.append(args[0].shape[-1])
    hook = runtime.models["tiny"].vae.decoder.conv_in.register_forward_pre_hook(seen)
    try:
        result = CALLS[method](client, decoder_tile=TILE)
    finally:
        hook.remove()
    assert result.plans and {p.decoder_tile for p in result.plans} == {TILE}
    assert widths and max(widths) == TILE


def test_a_bad_tile_or_a_model_without_a_decoder_is_refused_before_any_work(client):
    for call in (lambda **kw: _gradient(client, decoder_tile=6, **kw),
                 lambda **kw: _gradient(client, LATENT, decoder_tile=6, **kw),  # ignored, not malformed
                 lambda **kw: client.compute_gradient(adjointdpm.ServerLoss("classifier", {"label": 3}),
                                                      model="digits", batch=1, seed=0, steps=STEPS,
                                                      decoder_tile=TILE, **kw)):
        events = []
        with pytest.raises(adjointdpm.AdjointDPMError) as err:
            call(on_event=events.append)
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "decoder_tile" in err.value.details
        assert not [e for e in events if e.WhichOneof("kind") == "progress"]


def test_a_loss_on_the_latents_has_no_decoder_to_tile(client):
    result = _gradient(client, LATENT, decoder_tile=TILE)
    assert [(p.decoder_tile, p.decoder_graph_bytes) for p in result.plans] == [(0, 0)]
    assert np.abs(result.gradients["x_T"]).max() > 0


def test_a_reference_image_is_decoded_as_the_loss_decodes(served):
    """A content term's reference (and a verdict's start) is tiled when the loss is: at the
    starting point the two images are the same, not the tiled and the exact one."""
    from adjointdpm_server.tasks._job import LocalJob
    from adjointdpm_server.tasks._objective import Objective
    from adjointdpm_server.tasks._specs import LossSpec

    _, runtime = served
    ctx = runtime.for_tenant("default")
    backend = runtime.models["tiny"]
    target = torch.full((3, 40, 40), 0.5, dtype=backend.dtype)
    objective = Objective(ctx, backend, [LossSpec("server", "mse", 1.0, "image", {}, {"target": target})],
                          LocalJob())
    objective.plan_decoder(1, None, TILE)
    x0 = backend.noise(1, seed=0)
    with torch.no_grad():
        loss_sees, exact = objective.decode(x0), backend.decode(x0)
    reference = objective.reference_image(x0)
    assert torch.equal(reference, loss_sees) and not reference.requires_grad
    assert (reference - exact).abs().max() > 1e-4
