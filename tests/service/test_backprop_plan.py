"""``grad_mode="backprop"`` reports its memory plan too, over gRPC (design §2.4.1, §2.4.4): every
step's graph kept, nothing recomputed — and, for a loss on the decoded image, the VAE decoder's
plan within the server's budget (here sliced), which would otherwise go unreported."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import adjointdpm
from adjointdpm_server.config import Limits, ServerConfig
from adjointdpm_server.models import load_model
from adjointdpm_server.models._decoding import ALLOCATOR_SLACK, Checkpointing
from adjointdpm_server.wire import build_server

from tests.models.test_stable_diffusion import _offline
from tests.models.tiny_sd import build_tiny_sd

BATCH, STEPS = 3, 2
IMAGE = adjointdpm.ServerLoss("mse", tensors={"target": np.full((3, 16, 16), 0.5, np.float32)})
LATENT = adjointdpm.ServerLoss("mse", tensors={"target": np.zeros((4, 8, 8), np.float32)}, domain="latent")


@pytest.fixture(scope="module")
def sliced(tmp_path_factory):
    """A server whose gradient budget holds one sample's decoder graph, not the batch's (as
    test_decoder_budget's ``slices`` server)."""
    root = tmp_path_factory.mktemp("backprop-plan")
    with pytest.MonkeyPatch.context() as mp:
        _offline(mp)
        path = build_tiny_sd(root / "sd")
        graph = load_model(f"diffusers:{path}", dtype=torch.float32).decoder_graph()
    srv = build_server(ServerConfig(
        models=(f"tiny=diffusers:{path}",), port=0, artifact_dir=root / "artifacts",
        limits=Limits(max_batch=4, max_steps=20,
                      grad_memory_bytes=int(1.5 * graph.plain * ALLOCATOR_SLACK))))
    client = adjointdpm.Client(f"127.0.0.1:{srv.port}", timeout=300)
    yield client, graph
    client.close()
    srv.stop(0)


def _backprop(client, loss):
    return client.compute_gradient(loss, targets=["x_T", "cond"], prompt="a cat", batch=BATCH, seed=0,
                                   steps=STEPS, grad_mode="backprop")


def _assert_backprop_plan(plan):
    assert plan.grad_mode == "backprop"
    assert (plan.steps, plan.gradient_steps, plan.kept_graphs) == (STEPS, STEPS, STEPS)
    assert not plan.network_checkpointing and plan.graph_bytes == 0


def test_backprop_reports_the_decoder_plan_of_an_image_loss(sliced):
    client, graph = sliced
    got = _backprop(client, IMAGE)
    (plan,) = got.plans
    _assert_backprop_plan(plan)
    assert (plan.decoder_slice_size, plan.decoder_checkpointing) == (1, "none")
    assert plan.decoder_graph_bytes == graph.at(Checkpointing.NONE) > 0
    assert np.abs(got.gradients["x_T"]).max() > 0


def test_backprop_plan_of_a_latent_loss_has_no_decoder(sliced):
    client, _ = sliced
    got = _backprop(client, LATENT)
    (plan,) = got.plans
    _assert_backprop_plan(plan)
    assert (plan.decoder_slice_size, plan.decoder_checkpointing, plan.decoder_graph_bytes) == (0, "", 0)
    assert np.abs(got.gradients["x_T"]).max() > 0
