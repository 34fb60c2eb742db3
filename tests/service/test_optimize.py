"""OptimizeLatent, FinetuneWeights and OptimizeEmbedding end to end over a loopback server."""

import hashlib

import numpy as np
import pytest
import torch

import adjointdpm
from adjointdpm_server.core import sample

TO_EIGHT = adjointdpm.ServerLoss("classifier", params={"label": 8})


def _digest(module) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().numpy().tobytes())
    return h.hexdigest()


def test_optimize_latent_in_linf_ball_lowers_the_loss(client):
    events = []
    result = client.optimize_latent(TO_EIGHT, iterations=4, lr=0.2, constraint="linf", epsilon=0.3,
                                    seed=2, batch=3, steps=6, image_every=2, on_event=events.append)
    start = client.sample(seed=2, batch=3, steps=6, images=False).x_T
    assert np.abs(result.x_T - start).max() <= 0.3 + 1e-6
    assert np.abs(result.x_T - start).max() > 0.05
    assert len(result.history) == 4 and result.loss < result.history[0]
    iterations = [e.iteration for e in events if e.WhichOneof("kind") == "iteration"]
    assert [i.iteration for i in iterations] == [0, 1, 2, 3]
    assert [len(i.images) for i in iterations] == [3, 0, 3, 0]
    assert len(result.initial_images) == len(result.images) == 3


def test_optimize_latent_with_client_loss_on_sphere(client):
    @adjointdpm.loss("dark")
    def dark(image):
        return image.mean()

    result = client.optimize_latent("dark", iterations=3, lr=0.2, constraint="sphere", labels=1,
                                    seed=0, batch=2, steps=5, grad_mode="adjoint")
    start = client.sample(labels=1, seed=0, batch=2, steps=5, images=False).x_T
    np.testing.assert_allclose(np.linalg.norm(result.x_T.reshape(2, -1), axis=1),
                               np.linalg.norm(start.reshape(2, -1), axis=1), rtol=1e-5)
    assert result.loss < result.history[0]


def test_guided_sampling_steers_toward_the_class(client, rt):
    """Paper §4.1.1: x_t ← x_t − s·∂L/∂x_t at each node; the guided result scores better."""
    plain = client.sample(seed=5, batch=4, steps=6, guidance_scale=1.0, pixels=True)
    guided = client.optimize_latent(TO_EIGHT, guided={"every": 2, "scale": 0.3}, seed=5, batch=4,
                                    steps=6, guidance_scale=1.0)
    backend = rt.models["digits"]
    with torch.no_grad():
        def nll(x0):
            logits = backend.classify(backend.decode(torch.from_numpy(x0)))
            return float(torch.nn.functional.cross_entropy(logits, torch.full((4,), 8)))
        assert nll(guided.x0) < nll(plain.x0) - 0.1
    assert len(guided.history) == 3  # nodes 0, 2, 4


def test_finetune_lora_makes_an_adapter_sample_uses(client, rt):
    backend = rt.models["digits"]
    before = _digest(backend.eps_fn)
    examples = [{"seed": k, "label": k % 10} for k in range(4)]
    call = client.finetune_weights(TO_EIGHT, examples, iterations=4, lr=5e-3, lora_rank=4,
                                   checkpoint_every=2, steps=5, name="eights", stream=True)
    for _ in call:
        pass
    result = call.result
    assert result.artifact.kind == "lora" and result.artifact.metadata["method"] == "lora"
    assert [c.iteration for c in call.checkpoints] == [2]
    assert result.history[-1] < result.history[0]
    assert _digest(backend.eps_fn) == before  # the resident model is untouched
    base = client.sample(labels=[0, 1, 2, 3], seed=0, steps=5, images=False)
    tuned = client.sample(labels=[0, 1, 2, 3], seed=0, steps=5, images=False, adapter=result.artifact.id)
    assert np.abs(tuned.x0 - base.x0).max() > 1e-3
    # the adapter round-trips: the downloaded tensors rebuild the same sampler in-process
    from safetensors.numpy import load

    from adjointdpm_server.models._adapters import load_adapter
    info, data = client.download_artifact(result.artifact.id)
    state = {k: torch.from_numpy(v) for k, v in load(data).items()}
    assert state and all("lora_" in k for k in state)
    eps = load_adapter(backend.eps_fn, "lora", state, rank=4, targets=backend.lora_targets)
    c = backend.encode(4, labels=[0, 1, 2, 3])
    with torch.no_grad():
        x0 = sample(eps, backend.noise(4, seed=0), c.cond, schedule=backend.schedule, grid=backend.default_grid, steps=5,
                    guidance_scale=backend.default_guidance, uncond=c.uncond, grad_mode="none")
    np.testing.assert_allclose(tuned.x0, x0.numpy(), atol=1e-5)
    # a checkpoint is an adapter too
    assert client.sample(labels=0, seed=0, steps=3, adapter=call.checkpoints[0].id).x0.shape == (1, 1, 8, 8)
    listed = {m["name"]: m for m in client.list_models()}["digits"]["adapters"]
    assert result.artifact.id in {a["id"] for a in listed}


def test_finetune_full_on_the_mixture_with_style_and_content(client, rt):
    """Eq. 13 in miniature: Gram style of a reference plus content to the base outputs."""
    style = np.tile(np.linspace(0, 1, 8, dtype=np.float32), (1, 8, 1))
    loss = adjointdpm.ServerLoss("gram_style", params={"content_weight": 0.5}, tensors={"style": style})
    before = _digest(rt.models["gaussian-mixture"].eps_fn)
    result = client.finetune_weights(loss, [{"seed": k} for k in range(3)], method="full",
                                     iterations=3, lr=0.05, steps=6, model="gaussian-mixture")
    assert result.artifact.kind == "full" and result.history[-1] < result.history[0]
    assert _digest(rt.models["gaussian-mixture"].eps_fn) == before
    tuned = client.sample(model="gaussian-mixture", seed=0, steps=6, adapter=result.artifact.id)
    base = client.sample(model="gaussian-mixture", seed=0, steps=6)
    assert np.abs(tuned.x0 - base.x0).max() > 1e-3


def test_optimize_embedding_learns_a_class_vector(client, rt):
    result = client.optimize_embedding([TO_EIGHT], iterations=5, lr=0.1, seed=0, batch=3, steps=5,
                                       name="eightish")
    assert result.artifact.kind == "embedding" and result.history[-1] < result.history[0]
    used = client.sample(embedding=result.artifact.id, seed=0, batch=3, steps=5)
    backend = rt.models["digits"]
    tensors, _ = rt.artifacts.load(result.artifact.id)
    c = backend.embed(backend.encode(3))
    with torch.no_grad():
        x0 = sample(backend.eps_fn, backend.noise(3, seed=0), tensors["cond"].expand(3, -1),
                    schedule=backend.schedule, grid=backend.default_grid, steps=5, guidance_scale=backend.default_guidance,
                    uncond=c.uncond, grad_mode="none")
    np.testing.assert_allclose(used.x0, x0.numpy(), atol=1e-5)


def test_optimize_embedding_from_a_target_image(client):
    target = np.zeros((1, 8, 8), np.float32)
    target[0, 1:7, 3:5] = 1.0  # a "1"
    result = client.optimize_embedding(target_image=target, iterations=4, lr=0.1, seed=0, batch=2,
                                       steps=5, labels=7)
    assert result.history[-1] < result.history[0]


@pytest.mark.parametrize("kwargs, code", [
    (dict(iterations=10_000), "INVALID_ARGUMENT"),
    (dict(constraint="linf"), "INVALID_ARGUMENT"),       # no epsilon
    (dict(constraint="l3", epsilon=1.0), "INVALID_ARGUMENT"),
    (dict(optimizer="lbfgs"), "INVALID_ARGUMENT"),
])
def test_bad_optimizer_settings(client, kwargs, code):
    with pytest.raises(adjointdpm.AdjointDPMError) as err:
        client.optimize_latent(TO_EIGHT, seed=0, steps=3, **kwargs)
    assert err.value.code.name == code
