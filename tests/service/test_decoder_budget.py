"""The VAE decoder of an image-domain gradient within the server's budget, over gRPC (design
§2.4.4): five servers on one tiny Stable Diffusion whose budgets hold the whole batch's decoder
graph, one sample's, one sample's with its blocks checkpointed, one sample's checkpointed finer,
and less. The plan event says which; the
gradients are the roomy server's; the last refuses an image loss before any work, naming the
decoder, and still serves a loss on the latents."""

from __future__ import annotations

import grpc
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
def servers(tmp_path_factory):
    root = tmp_path_factory.mktemp("decoder")
    with pytest.MonkeyPatch.context() as mp:
        _offline(mp)
        path = build_tiny_sd(root / "sd")
        graph = load_model(f"diffusers:{path}", dtype=torch.float32).decoder_graph()
    budgets = {"roomy": 1 << 34, "slices": int(1.5 * graph.plain * ALLOCATOR_SLACK),
               "blocks": int(graph.at(Checkpointing.BLOCKS) * ALLOCATOR_SLACK) + 1,
               "fine": int(graph.at(Checkpointing.FINE) * ALLOCATOR_SLACK) + 1,
               "none": int(graph.at(Checkpointing.FINE) * ALLOCATOR_SLACK) - 1}
    built = {name: build_server(ServerConfig(
        models=(f"tiny=diffusers:{path}",), port=0, artifact_dir=root / f"artifacts-{name}",
        limits=Limits(max_batch=4, max_steps=20, grad_memory_bytes=budget)))
        for name, budget in budgets.items()}
    clients = {name: adjointdpm.Client(f"127.0.0.1:{srv.port}", timeout=300) for name, srv in built.items()}
    yield clients, graph, {name: srv.runtime for name, srv in built.items()}
    for name, srv in built.items():
        clients[name].close()
        srv.stop(0)


def _gradient(client, loss=IMAGE, **kwargs):
    return client.compute_gradient(loss, targets=["x_T", "cond"], prompt="a cat", batch=BATCH, seed=0,
                                   steps=STEPS, grad_mode="checkpoint", **kwargs)


@pytest.mark.parametrize("name, slice_size, checkpointing", [
    ("roomy", 0, "none"), ("slices", 1, "none"), ("blocks", 1, "blocks"), ("fine", 1, "fine")])
def test_the_plan_fits_the_budget_and_the_gradient_stays(servers, name, slice_size, checkpointing):
    clients, graph, _ = servers
    roomy, got = _gradient(clients["roomy"]), _gradient(clients[name])
    (plan,) = got.plans
    assert (plan.decoder_slice_size, plan.decoder_checkpointing) == (slice_size, checkpointing)
    assert plan.decoder_graph_bytes == graph.at(Checkpointing[checkpointing.upper()])
    for key in ("x_T", "cond"):
        assert np.abs(roomy.gradients[key]).max() > 0
        np.testing.assert_allclose(got.gradients[key], roomy.gradients[key], rtol=1e-4, atol=1e-6)


def test_no_exact_plan_is_refused_before_any_work_naming_the_decoder(servers):
    clients, _, runtimes = servers
    events = []
    with pytest.raises(adjointdpm.AdjointDPMError) as err:
        _gradient(clients["none"], on_event=events.append)
    assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "VAE decoder" in err.value.details and "MiB" in err.value.details
    assert not [e for e in events if e.WhichOneof("kind") == "progress"]  # not one network call
    latent = _gradient(clients["none"], LATENT)  # the decoder is not in a latent loss's gradient
    (plan,) = latent.plans
    assert plan.decoder_graph_bytes == 0 and plan.decoder_checkpointing == ""
    assert np.abs(latent.gradients["x_T"]).max() > 0


def test_a_fine_tune_decodes_each_pass_as_planned(servers):
    """FinetuneWeights scores its passes inside the objective: the plan holds there too."""
    clients, _, runtimes = servers
    examples = [{"seed": k, "prompt": "a cat"} for k in range(BATCH)]

    def finetune(client):
        return client.finetune_weights(IMAGE, examples, iterations=2, steps=STEPS, lr=1e-3,
                                       lora_rank=2, grad_mode="checkpoint", micro_batch=2)
    roomy = finetune(clients["roomy"])
    decoder = runtimes["blocks"].models["tiny"].vae.decoder
    convs = [c for c in decoder.modules() if isinstance(c, torch.nn.Conv2d)]
    calls = {"n": 0}

    def in_backward(*_):  # the planned decoder is recomputed inside the backward pass
        calls["n"] += torch._C._current_graph_task_id() != -1
    handles = [c.register_forward_pre_hook(in_backward) for c in convs]
    try:
        tight = finetune(clients["blocks"])
    finally:
        for h in handles:
            h.remove()
    assert calls["n"] > 0
    assert {(p.decoder_slice_size, p.decoder_checkpointing) for p in tight.plans} == {(1, "blocks")}
    assert {(p.decoder_slice_size, p.decoder_checkpointing) for p in roomy.plans} == {(0, "none")}
    np.testing.assert_allclose(tight.history, roomy.history, rtol=1e-5)


CALLS = {
    "optimize_latent": lambda c, **kw: c.optimize_latent(IMAGE, prompt="a cat", batch=BATCH, seed=0,
                                                          steps=STEPS, iterations=1, **kw),
    "finetune_weights": lambda c, **kw: c.finetune_weights(IMAGE, [{"seed": 0, "prompt": "a cat"}],
                                                            iterations=1, steps=STEPS, lora_rank=2, **kw),
    "optimize_embedding": lambda c, **kw: c.optimize_embedding(IMAGE, prompt="a photo of <*>", seed=0,
                                                                steps=STEPS, iterations=1,
                                                                token={"initializer": "cat"}, **kw),
}


@pytest.mark.parametrize("method", list(CALLS))
def test_every_image_domain_rpc_is_refused_before_any_work(servers, method):
    clients, _, _ = servers
    events = []
    with pytest.raises(adjointdpm.AdjointDPMError) as err:
        CALLS[method](clients["none"], on_event=events.append)
    assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "VAE decoder" in err.value.details
    assert not [e for e in events if e.WhichOneof("kind") == "progress"]
    assert CALLS[method](clients["fine"]).loss > 0  # the next budget up runs it
