"""run_compute_gradient in process: shapes, events, grad modes, targets (x_T, cond, LoRA weights),
a client loss answered through LocalJob, bad answers, cancellation, and the same call over the wire."""

import math

import numpy as np
import pytest
import torch

from adjointdpm_server.errors import Cancelled, InvalidArgument
from adjointdpm_server.tasks import LocalJob, LossSpec, run_compute_gradient, run_sample

from .conftest import (STEPS, client, client_mse, engine_calls, finite, gen, is_png, mse, noise, opts,
                       progress, solves)


def test_shapes_loss_and_forward_then_backward_events(ctx, target):
    job = LocalJob()
    result = run_compute_gradient(ctx, gen(2, labels=(1, 7)), [mse(target)], job, opts("ComputeGradient"))
    assert set(result.gradients) == {"x_T"}
    g = result.gradients["x_T"]
    assert g.shape == result.x0.shape == (2, 1, 8, 8)
    assert finite(g) and finite(result.x0) and float(g.abs().max()) > 0
    assert math.isfinite(result.loss) and result.loss > 0
    assert result.loss_terms == [pytest.approx(result.loss)]
    assert len(result.sample_losses) == 2 and sum(result.sample_losses) == pytest.approx(result.loss)
    assert result.images == [] and result.weight_gradients == {} and result.weights_artifact is None
    forward, backward = solves(job.events)
    assert [(e.phase, e.step, e.nfe) for e in forward] == [("forward", s, s) for s in (1, 2, 3)]
    assert [(e.phase, e.step) for e in backward] == [("backward", s) for s in (1, 2, 3)]
    # auto with room for every graph: the backward reuses them, no call is counted twice
    assert result.nfe == STEPS == backward[-1].nfe


def test_images_option_returns_pngs(ctx, target):
    result = run_compute_gradient(ctx, gen(2, labels=(1, 7), steps=2), [mse(target)], LocalJob(),
                                  opts("ComputeGradient", images=True))
    assert len(result.images) == 2 and all(is_png(p) for p in result.images)


def _latent_loss(ctx, target_latent, x_T):
    """Σ_samples mean((x0 − target)²) from a plain sample of the same request, and x0."""
    spec = gen(1)
    spec.x_T = x_T
    x0 = run_sample(ctx, spec, LocalJob(), opts("Sample", images=False)).x0
    return float((x0.double() - target_latent.double()).square().flatten(1).mean(1).sum()), x0


def test_gradient_matches_finite_differences_of_sample(ctx):
    target_latent = torch.linspace(-1, 1, 64).reshape(1, 1, 8, 8)
    loss = LossSpec("server", "mse", 1.0, "latent", {}, {"target": target_latent})
    spec = gen(1)
    result = run_compute_gradient(ctx, spec, [loss], LocalJob(), opts("ComputeGradient"))
    value, x0 = _latent_loss(ctx, target_latent, spec.x_T)
    torch.testing.assert_close(result.x0, x0)  # the gradient's forward is the sample
    assert result.loss == pytest.approx(value, rel=1e-5)
    g = result.gradients["x_T"].double()
    direction = g / g.norm()
    h = 1e-2
    plus, _ = _latent_loss(ctx, target_latent, (spec.x_T + h * direction).float())
    minus, _ = _latent_loss(ctx, target_latent, (spec.x_T - h * direction).float())
    assert (plus - minus) / (2 * h) == pytest.approx(float(g.norm()), rel=1e-3)  # measured: 5e-5


@pytest.mark.parametrize("mode", ["checkpoint", "backprop", "adjoint"])
def test_grad_modes_agree_and_count_their_calls(ctx, target, mode):
    spec = gen(1)
    auto = run_compute_gradient(ctx, spec, [mse(target)], LocalJob(), opts("ComputeGradient"))
    job = LocalJob()
    other = run_compute_gradient(ctx, spec, [mse(target)], job, opts("ComputeGradient", grad_mode=mode))
    assert other.loss == pytest.approx(auto.loss, rel=1e-6)
    g, ref = other.gradients["x_T"].flatten(), auto.gradients["x_T"].flatten()
    backward = [e for e in progress(job.events) if e.phase == "backward"]
    if mode == "adjoint":  # eq. 11 re-solved: an approximation at 3 steps, pointing the same way
        assert float(g @ ref) > 0.5 * float(g.norm() * ref.norm())
        assert other.nfe == 2 * STEPS + 1  # a VJP call a step and ε̃(y_N) on top of the forward
    else:
        torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-6)
        # checkpoint: one VJP call a step besides the forward; backprop keeps the graph
        assert other.nfe == (2 * STEPS if mode == "checkpoint" else STEPS)
    assert [e.phase for e in progress(job.events)][:STEPS] == ["forward"] * STEPS
    if mode == "backprop":  # plain autograd through the kept graph: no solver steps to report
        assert backward == []
    else:
        assert [e.step for e in backward] == list(range(1, STEPS + 1))
        assert [e.nfe for e in backward] == list(range(other.nfe - STEPS + 1, other.nfe + 1))


def test_cond_target_gradient_has_the_conditioning_shape(ctx, runtime, target):
    result = run_compute_gradient(ctx, gen(2, labels=(1, 7), steps=2), [mse(target)], LocalJob(),
                                  opts("ComputeGradient", targets=["x_T", "cond"]))
    dim = runtime.models["digits"].cond_shape[0]
    assert result.gradients["cond"].shape == (2, dim)
    assert result.gradients["x_T"].shape == (2, 1, 8, 8)
    assert finite(result.gradients["cond"]) and float(result.gradients["cond"].abs().max()) > 0


@pytest.mark.parametrize("inline", [True, False])
def test_lora_rank_gives_lora_gradients(ctx, target, inline):
    weights = {"lora_rank": 2, "inline": inline}
    result = run_compute_gradient(ctx, gen(1, steps=2), [mse(target)], LocalJob(),
                                  opts("ComputeGradient", targets=["weights"], weights=weights))
    assert result.gradients == {}  # only what was asked for
    if inline:
        grads = result.weight_gradients
        assert result.weights_artifact is None
    else:
        assert result.weight_gradients == {}
        info = result.weights_artifact
        assert info.kind == "weight_gradients" and info.metadata["lora_rank"] == 2
        grads, _ = ctx.artifacts.load(info.id)
    assert grads and all("lora_" in name for name in grads)
    a = {n: g for n, g in grads.items() if "lora_A" in n}
    b = {n: g for n, g in grads.items() if "lora_B" in n}
    assert len(a) == len(b) > 0
    assert all(g.shape[0] == 2 for g in a.values()) and all(g.shape[1] == 2 for g in b.values())
    assert all(finite(g) for g in grads.values())
    # a fresh LoRA has B = 0: the loss moves with B, not (yet) with A
    assert sum(float(g.abs().sum()) for g in b.values()) > 0


def test_client_loss_matches_the_server_mse(ctx, target):
    spec = gen(2, labels=(1, 7))
    server = run_compute_gradient(ctx, spec, [mse(target)], LocalJob(), opts("ComputeGradient"))
    calls = []
    job = LocalJob({"mine": client_mse(target, calls)})
    remote = run_compute_gradient(ctx, spec, [client()], job, opts("ComputeGradient"))
    assert len(calls) == 1 and calls[0].shape == (2, 1, 8, 8) and calls[0].dtype == np.float32
    assert 0 <= calls[0].min() and calls[0].max() <= 1  # the decoded image, the loss's domain
    assert remote.loss == pytest.approx(server.loss, rel=1e-6)
    np.testing.assert_allclose(remote.sample_losses, server.sample_losses, rtol=1e-6)
    torch.testing.assert_close(remote.gradients["x_T"], server.gradients["x_T"], rtol=1e-5, atol=1e-7)


def test_client_loss_without_per_sample_values_credits_each_sample_equally(ctx, target):
    fn = client_mse(target)
    job = LocalJob({"mine": lambda x: fn(x)[:2]})
    spec = gen(2, labels=(1, 7), steps=2)
    result = run_compute_gradient(ctx, spec, [client()], job, opts("ComputeGradient"))
    assert result.sample_losses == pytest.approx([result.loss / 2] * 2)


def test_weighted_client_and_server_terms_add_up(ctx, target):
    spec = gen(1, steps=2)
    job = LocalJob({"mine": client_mse(target)})
    both = run_compute_gradient(ctx, spec, [mse(target, 0.25), client(weight=2.0)], job,
                                opts("ComputeGradient"))
    single = run_compute_gradient(ctx, spec, [mse(target)], LocalJob(), opts("ComputeGradient"))
    assert both.loss_terms == pytest.approx([single.loss, single.loss], rel=1e-6)
    assert both.loss == pytest.approx(2.25 * single.loss, rel=1e-6)
    torch.testing.assert_close(both.gradients["x_T"], 2.25 * single.gradients["x_T"], rtol=1e-5, atol=1e-7)


def _bad(kind):
    def fn(x):
        value, grad = 1.0, np.zeros_like(x)
        if kind == "nan gradient":
            grad[0, 0, 0, 0] = np.nan
        elif kind == "wrong shape":
            grad = grad[:, :, :4]
        elif kind == "inf value":
            value = float("inf")
        elif kind == "values not summing":
            return value, grad, np.full(len(x), 5.0)
        return value, grad
    return fn


@pytest.mark.parametrize("kind", ["nan gradient", "wrong shape", "inf value", "values not summing"])
def test_bad_client_answer_is_invalid_argument(ctx, kind):
    job = LocalJob({"mine": _bad(kind)})
    with pytest.raises(InvalidArgument, match="client loss 'mine'"):
        run_compute_gradient(ctx, gen(1, steps=2), [client()], job, opts("ComputeGradient"))


def test_client_loss_without_a_client_is_failed_precondition(ctx):
    from adjointdpm_server.errors import FailedPrecondition

    with pytest.raises(FailedPrecondition, match="client-side loss"):
        run_compute_gradient(ctx, gen(1, steps=2), [client("nobody")], LocalJob(), opts("ComputeGradient"))


@pytest.mark.parametrize("mode", ["auto", "checkpoint"])
def test_cancel_from_the_loss_stops_within_one_network_call(ctx, runtime, target, mode):
    job = LocalJob()
    seen = {}

    def cancelling(x):
        seen["calls"] = engine_calls(runtime)
        job.cancelled.set()
        return client_mse(target)(x)

    job.client_losses["mine"] = cancelling
    with pytest.raises(Cancelled):
        run_compute_gradient(ctx, gen(1, steps=4), [client()], job, opts("ComputeGradient", grad_mode=mode))
    assert engine_calls(runtime) - seen["calls"] <= 1  # checkpoint would make 4 VJP calls
    assert all(e.phase == "forward" for e in progress(job.events)[:4])
    assert len([e for e in progress(job.events) if e.phase == "backward"]) <= 1


def _service_conftest():
    """tests/service/conftest.py (``tests`` is importable under ``python -m pytest``, the
    project's way; by path under a bare ``pytest``)."""
    try:
        import tests.service.conftest as module
    except ModuleNotFoundError:
        import importlib.util
        from pathlib import Path

        path = Path(__file__).resolve().parents[1] / "service" / "conftest.py"
        spec = importlib.util.spec_from_file_location("_tasks_service_conftest", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return module


def test_same_result_over_the_wire(ctx, target, tmp_path_factory):
    """The loopback server's compute_gradient equals the in-process task (same engine code, the
    request through the SDK, the proto codec and the service)."""
    import adjointdpm

    serve = _service_conftest().serve
    spec = gen(2, labels=(1, 7))
    local = run_compute_gradient(ctx, spec, [mse(target)], LocalJob(), opts("ComputeGradient"))
    server = serve(tmp_path_factory, models=("digits",))
    try:
        with adjointdpm.Client(f"127.0.0.1:{server.port}", timeout=60) as c:
            wire = c.compute_gradient(adjointdpm.ServerLoss("mse", tensors={"target": target.numpy()}),
                                      targets=["x_T"], labels=[1, 7], x_T=spec.x_T.numpy(), steps=STEPS)
    finally:
        server.stop(0)
    assert wire.loss == pytest.approx(local.loss, rel=1e-6)
    np.testing.assert_allclose(wire.sample_losses, local.sample_losses, rtol=1e-6)
    np.testing.assert_allclose(wire.gradients["x_T"], local.gradients["x_T"].numpy(), rtol=1e-5, atol=1e-7)
    assert wire.nfe == local.nfe


def test_graphs_kept_side_by_side_share_the_memory_budget(ctx, runtime):
    """Below ``share_from`` gradient jobs (a CPU: above 2) ``auto`` keeps graphs in each job;
    their budgets split the one the server has, so k jobs together stay within it."""
    import dataclasses

    from adjointdpm_server.tasks._generation import _memory_budget, decoder_budget, prepare

    prep = dataclasses.replace(prepare(ctx, gen()), grad_memory_bytes=64 << 20)
    a, b = LocalJob(caller="a"), LocalJob(caller="b")
    x_T = noise(2)
    assert runtime.engine.share_from > 2
    with runtime.engine.session(a):
        assert _memory_budget(prep, a, "auto", 0, x_T) == 64 << 20
        with runtime.engine.session(b):
            assert _memory_budget(prep, a, "auto", 0, x_T) == 32 << 20
            assert _memory_budget(prep, a, "checkpoint", 0, x_T) is None
            assert decoder_budget(prep, a, 0) == 32 << 20  # the decoder's share too
            assert decoder_budget(prep, a, 16) == 16 << 20


def test_auto_keeps_graphs_within_what_the_decoder_leaves(ctx):
    """The decoder's VJP runs while ``auto``'s kept graphs live: its planned peak (one pass of
    the batch, or of a slice) comes out of ``auto``'s budget, never below 0."""
    import dataclasses

    from adjointdpm_server.models._decoding import ALLOCATOR_SLACK, Checkpointing, DecodePlan
    from adjointdpm_server.tasks._generation import _memory_budget, prepare

    prep = dataclasses.replace(prepare(ctx, gen()), grad_memory_bytes=64 << 20)
    job, x_T = LocalJob(), noise(2)
    job.decoder_plan = DecodePlan(0, Checkpointing.NONE, 4 << 20)  # the whole batch of 2 in one pass
    assert _memory_budget(prep, job, "auto", 0, x_T) == (64 << 20) - int(2 * (4 << 20) * ALLOCATOR_SLACK)
    job.decoder_plan = DecodePlan(1, Checkpointing.BLOCKS, 4 << 20)   # slices of one
    assert _memory_budget(prep, job, "auto", 0, x_T) == (64 << 20) - int((4 << 20) * ALLOCATOR_SLACK)
    job.decoder_plan = DecodePlan(0, Checkpointing.NONE, 64 << 20)
    assert _memory_budget(prep, job, "auto", 0, x_T) == 0
    assert _memory_budget(prep, job, "checkpoint", 0, x_T) is None


def test_a_decode_without_an_image_term_keeps_no_graph(ctx):
    """Images only to show (a latent loss): decoded with no graph, which would live through the
    backward pass unplanned; with an image term, the decode is the gradient's."""
    from adjointdpm_server.tasks._generation import prepare
    from adjointdpm_server.tasks._objective import Objective

    prep = prepare(ctx, gen())
    x0 = noise(1).requires_grad_()
    on_latents = LossSpec("server", "mse", 1.0, "latent", {}, {"target": torch.zeros(1, 8, 8)})
    latent = Objective(ctx, prep.backend, [on_latents], LocalJob())
    assert not latent.decode(x0).requires_grad
    image = Objective(ctx, prep.backend, [mse(torch.zeros(1, 8, 8))], LocalJob())
    assert image.decode(x0).requires_grad
