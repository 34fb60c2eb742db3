"""A server in bfloat16 (``--dtype bfloat16``): the network runs in bfloat16 while the solver state,
CFG and gradient sums run in float32, so its samples and gradients stay within a stated tolerance
of a float64 server's. Measured on digits (20 steps, classifier loss): x_0 4.0e-3 (4.5e-3 with a
bfloat16 state), ∂x_T 8.2e-2 — dominated by the loss's own bfloat16 classifier, not the solver;
the bounds are 1.5× those figures (the core's test isolates the solver: tests/core/test_precision.py)."""

import numpy as np
import pytest

import adjointdpm
from adjointdpm_server.config import ServerConfig
from adjointdpm_server.wire import build_server

LOSS = adjointdpm.ServerLoss("classifier", {"label": 8})


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = {}
    for dtype in ("bfloat16", "float64"):
        srv = build_server(ServerConfig(models=("digits",), port=0, dtype=dtype,
                                        artifact_dir=tmp_path_factory.mktemp(dtype)))
        try:
            with adjointdpm.Client(f"127.0.0.1:{srv.port}", timeout=300) as client:
                for mode in ("auto", "checkpoint"):
                    out[dtype, mode] = client.compute_gradient(LOSS, labels=[1, 2, 3], seed=0, steps=20,
                                                               grad_mode=mode)
        finally:
            srv.stop(0)
    return out


def _rel(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


def test_bfloat16_server_is_within_tolerance_of_float64(results):
    ref = results["float64", "checkpoint"]
    for mode in ("auto", "checkpoint"):
        half = results["bfloat16", mode]
        assert _rel(half.x0, ref.x0) < 6e-3
        assert _rel(half.gradients["x_T"], ref.gradients["x_T"]) < 0.12
    assert _rel(results["float64", "auto"].gradients["x_T"], ref.gradients["x_T"]) < 1e-10


# ---- what a half-precision server keeps in float32 (docs/design.md §2.4.2) ---------------------

import grpc  # noqa: E402
import torch  # noqa: E402

from adjointdpm_server.config import Limits  # noqa: E402
from adjointdpm_server.errors import InvalidArgument  # noqa: E402
from adjointdpm_server.integrity import NonFiniteResult  # noqa: E402
from adjointdpm_server.models import PrecisionUnsupported, check_precision  # noqa: E402
from adjointdpm_server.runtime import Runtime  # noqa: E402
from adjointdpm_server.tasks._optim import ITERATE_RANGE, MasterOptimizer, non_finite_loss  # noqa: E402
from adjointdpm import options  # noqa: E402


def test_a_dtype_the_device_cannot_compute_in_is_refused_at_start_naming_the_alternative(tmp_path):
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        check_precision("cpu", dtype)  # this CPU build runs all three
    with pytest.raises(PrecisionUnsupported, match=r"start the server with --dtype bfloat16 or --dtype float32"):
        Runtime(ServerConfig(models=("digits",), dtype="float8_e4m3fn", artifact_dir=tmp_path))


def test_float16_adam_steps_a_float32_master_copy():
    """Adam on a float16 parameter: ε = 1e-8 and g² underflow in float16; the master does not."""
    p = torch.full((4,), 1.0, dtype=torch.float16, requires_grad=True)
    opt = MasterOptimizer(options.TYPES["OptimizeLatent"](optimizer="adam", lr=1e-3), [p])
    assert opt.masters[0].dtype == torch.float32 and opt.masters[0] is not p
    p.grad = torch.full((4,), 1e-5, dtype=torch.float16)  # g² = 1e-10: 0 in float16
    opt.step()
    assert p.dtype == torch.float16 and torch.isfinite(p).all()
    assert torch.allclose(p.float(), torch.full((4,), 1.0 - 1e-3), atol=1e-3)
    assert opt.state[p]["exp_avg_sq"].dtype == torch.float32
    f32 = torch.ones(3, requires_grad=True)
    assert MasterOptimizer(options.TYPES["OptimizeLatent"](optimizer="sgd", lr=0.1), [f32]).masters[0] is f32


def test_a_non_finite_loss_is_the_requests_fault_only_when_its_numbers_moved_the_iterate_out_of_range():
    inside = [torch.full((2, 3), ITERATE_RANGE * 0.9)]
    assert isinstance(non_finite_loss(float("nan"), 1, inside), NonFiniteResult)  # INTERNAL
    for outside in ([torch.full((2, 3), ITERATE_RANGE * 2)], [torch.tensor([0.0, float("inf")])]):
        err = non_finite_loss(float("inf"), 3, outside)
        assert isinstance(err, InvalidArgument) and "lower the learning rate" in str(err)


@pytest.fixture(scope="module")
def half_client(tmp_path_factory):
    srv = build_server(ServerConfig(models=("digits",), port=0, dtype="float16",
                                    artifact_dir=tmp_path_factory.mktemp("fp16"),
                                    limits=Limits(max_iterations=20)))
    with adjointdpm.Client(f"127.0.0.1:{srv.port}", timeout=300) as client:
        yield client
    srv.stop(0)


def test_full_fine_tune_in_float16_with_adam_trains_and_returns_finite_results(half_client):
    r = half_client.finetune_weights(LOSS, [{"seed": 0, "label": 1}, {"seed": 1, "label": 2}],
                                     method="full", iterations=3, lr=1e-3, steps=4)
    assert len(r.history) == 3 and np.isfinite(r.history).all()
    assert r.history[-1] < r.history[0]  # it learns: the loss of "8" falls
    assert np.isfinite(r.x0).all() and r.x0.dtype == np.float32


def test_a_learning_rate_that_blows_x_T_up_is_invalid_argument_not_internal(half_client):
    mse = adjointdpm.ServerLoss("mse", tensors={"target": np.zeros((1, 1, 8, 8), np.float32)},
                                domain="latent")
    with pytest.raises(adjointdpm.AdjointDPMError) as err:
        half_client.optimize_latent(mse, optimizer="sgd", lr=1e6, iterations=12, labels=1, seed=0, steps=4)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "lower the learning rate" in err.value.details


def test_a_float64_server_asks_client_losses_in_float64_and_half_servers_in_float32(tmp_path):
    """The wire carries a dtype numpy has: float64 from a float64 server, float32 from a half one."""
    seen = {}
    for dtype in ("float64", "bfloat16"):
        def darker(image, dtype=dtype):
            seen[dtype] = image.dtype
            return float(image.mean()), np.full_like(image, 1.0 / image.size)

        srv = build_server(ServerConfig(models=("digits",), port=0, dtype=dtype, artifact_dir=tmp_path / dtype))
        try:
            with adjointdpm.Client(f"127.0.0.1:{srv.port}", timeout=120) as client:
                r = client.compute_gradient(adjointdpm.ClientLoss(darker, autograd=False), labels=1,
                                            seed=0, steps=2)
        finally:
            srv.stop(0)
        assert np.isfinite(r.gradients["x_T"]).all()
    assert seen == {"float64": np.float64, "bfloat16": np.float32}
