"""run_optimize_embedding in process (digits: a class-embedding vector): the artifact, Iteration
events, the best iterate, target_image, image_every, the prior, stop_when, cancellation."""

import pytest
import torch

from adjointdpm_server.errors import Cancelled
from adjointdpm_server.tasks import GenerationSpec, LocalJob, run_optimize_embedding, run_sample

from .conftest import (client, client_mse, constant_loss, engine_calls, finite, gen, is_png,
                       mse, opts, reports)


def test_learns_an_embedding_artifact_that_sample_takes(ctx, runtime, target):
    spec = gen(2, labels=(3,))
    job = LocalJob()
    result = run_optimize_embedding(ctx, spec, [mse(target)], job, opts(
        "OptimizeEmbedding", lr=0.5, iterations=2, name="three"))
    info = result.artifact
    assert info.kind == "embedding" and info.model == "digits" and info.name == "three"
    tensors, _ = ctx.artifacts.load(info.id)
    dim = runtime.models["digits"].cond_shape[0]
    assert set(tensors) == {"cond"} and tensors["cond"].shape == (1, dim) and finite(tensors["cond"])
    start = runtime.models["digits"].embedding_table()[3]
    assert not torch.allclose(tensors["cond"][0], start)  # lr 0.5 moved it

    its = reports(job.events)
    assert [r.iteration for r in its] == [0, 1] and [r.loss for r in its] == result.history
    assert all(r.lr == pytest.approx(0.5) and r.grad_norm > 0 and r.images == [] for r in its)
    assert result.loss == min(result.history)
    assert result.best_iteration == [result.history.index(min(result.history))] == [info.iteration]
    assert result.iterations_run == 2
    assert result.x0.shape == (2, 1, 8, 8) and finite(result.x0)
    assert len(result.images) == len(result.initial_images) == 2 and all(map(is_png, result.images))

    # Sample with the artifact reproduces the result's own sample (same x_T, the stored vector)
    again = run_sample(ctx, GenerationSpec(embedding=info.id, x_T=spec.x_T, steps=spec.steps), LocalJob(),
                       opts("Sample", images=False))
    torch.testing.assert_close(again.x0, result.x0, rtol=1e-5, atol=1e-5)


def test_target_image_alone_and_image_every(ctx, target):
    job = LocalJob()
    result = run_optimize_embedding(ctx, gen(1, steps=2), [], job, opts(
        "OptimizeEmbedding", iterations=2, image_every=1), target_image=target)
    its = reports(job.events)
    assert len(its) == 2
    for r in its:
        assert len(r.loss_terms) == 1 and r.loss == pytest.approx(r.loss_terms[0])
        assert len(r.images) == 1 and is_png(r.images[0])  # image_every 1: every iteration
    # the term is mse to the target: the same number ComputeGradient's mse gives at the start
    from adjointdpm_server.tasks import run_compute_gradient

    start = run_compute_gradient(ctx, gen(1, steps=2), [mse(target)], LocalJob(), opts("ComputeGradient"))
    assert its[0].loss == pytest.approx(start.loss, rel=1e-5)


def test_prior_adds_its_penalty_per_sample(ctx, runtime, target):
    job = LocalJob()
    run_optimize_embedding(ctx, gen(2, labels=(3,), steps=2), [mse(target)], job, opts(
        "OptimizeEmbedding", iterations=1, prior="norm", prior_weight=3.0))
    (r,) = reports(job.events)
    table = runtime.models["digits"].embedding_table().float()
    penalty = (table[3].norm() / table.norm(dim=1).mean() - 1).square()
    assert float(penalty) > 1e-6
    assert r.loss - r.loss_terms[0] == pytest.approx(2 * 3.0 * float(penalty), rel=1e-4)
    assert sum(r.sample_losses) == pytest.approx(r.loss, rel=1e-6)


def test_stop_when_patience_stops_the_run_and_saves_the_best_vector(ctx, runtime):
    """A loss that never improves but whose gradient moves the vector: the run stops after
    patience 1, and the artifact is iteration 0's vector (the best), not the moved one."""
    calls = []
    job = LocalJob({"mine": constant_loss(calls=calls, moving=True)})
    result = run_optimize_embedding(ctx, gen(1, steps=2), [client()], job, opts(
        "OptimizeEmbedding", lr=0.5, iterations=10, stop_when={"patience": 1}))
    assert result.iterations_run == 2 and len(reports(job.events)) == 2 and len(calls) == 2
    assert result.best_iteration == [0] and result.loss == 1.0
    assert all(r.grad_norm > 0 for r in reports(job.events))
    saved, _ = ctx.artifacts.load(result.artifact.id)
    start = runtime.models["digits"].embedding_table()[3]  # label 3 starts it
    torch.testing.assert_close(saved["cond"][0], start)


def test_cancel_from_the_loss_stops_within_one_network_call(ctx, runtime, target):
    job = LocalJob()
    seen = {}
    mine = client_mse(target)

    def cancelling(x):
        seen["calls"] = engine_calls(runtime)
        job.cancelled.set()
        return mine(x)

    job.client_losses["mine"] = cancelling
    with pytest.raises(Cancelled):
        run_optimize_embedding(ctx, gen(1, steps=4), [client()], job, opts("OptimizeEmbedding", iterations=3))
    assert reports(job.events) == []
    assert engine_calls(runtime) - seen["calls"] <= 1
