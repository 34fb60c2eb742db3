"""``grad_mode`` "" is ``auto`` over gRPC: the server's budget (``--grad-memory-mib``), a request's
``memory_budget_mib`` that lowers it, never raises it, and the same gradient in every case.

On digits a CFG call for 4 samples saves ~8.5 MiB for autograd; NFE tells how many of the 6 calls
were recomputed in the backward pass (6 = every graph kept, 12 = none)."""

import numpy as np
import pytest

import adjointdpm
from adjointdpm_server.config import Limits, ServerConfig
from adjointdpm_server.wire import build_server

LOSS = adjointdpm.ServerLoss("classifier", {"label": 8})
ARGS = dict(targets=["x_T", "cond"], labels=[1, 2, 3, 4], seed=5, steps=6)


def _grad(client, **kw):
    r = client.compute_gradient(LOSS, **ARGS, **kw)
    return r.nfe, np.concatenate([r.gradients["x_T"].ravel(), r.gradients["cond"].ravel()])


def _same(a, b):
    return np.linalg.norm(a - b) <= 1e-6 * np.linalg.norm(b)


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    made = {}
    for name, budget in (("ample", None), ("none", 0)):
        made[name] = build_server(ServerConfig(
            models=("digits",), port=0, artifact_dir=tmp_path_factory.mktemp(name),
            limits=Limits(grad_memory_bytes=budget)))
    yield made
    for srv in made.values():
        srv.stop(0)


def test_auto_is_the_default_and_a_request_budget_lowers_it(servers):
    with adjointdpm.Client(f"127.0.0.1:{servers['ample'].port}", timeout=300) as client:
        assert "auto" in client.list_models()[0]["grad_modes"]
        nfe_auto, g_auto = _grad(client)
        nfe_low, g_low = _grad(client, memory_budget_mib=25)       # two graphs of 8.5 MiB (×1.2)
        nfe_ck, g_ck = _grad(client, grad_mode="checkpoint")
        nfe_bp, g_bp = _grad(client, grad_mode="backprop")
    assert (nfe_auto, nfe_low, nfe_ck) == (6, 6 + 4, 12)
    assert _same(g_auto, g_bp) and _same(g_low, g_bp) and _same(g_ck, g_bp)
    assert np.linalg.norm(g_bp) > 0


def test_a_request_cannot_raise_the_servers_budget(servers):
    with adjointdpm.Client(f"127.0.0.1:{servers['none'].port}", timeout=300) as client:
        nfe, g = _grad(client)
        nfe_asked, g_asked = _grad(client, memory_budget_mib=10_000)
        _, g_bp = _grad(client, grad_mode="backprop")
    assert nfe == nfe_asked == 12
    assert _same(g, g_bp) and _same(g_asked, g_bp)


def test_adjoint_anchors_follow_the_request_budget_within_the_servers(servers):
    """``adjoint`` with ``memory_budget_mib``: 1 MiB holds all 6 states (4 digits × 1×8×8: 1 KiB),
    so the re-solve has nothing to reconstruct and the gradient is checkpoint's; a server whose
    budget is 0 caps the request to no anchors, the paper's adjoint."""
    with adjointdpm.Client(f"127.0.0.1:{servers['ample'].port}", timeout=300) as client:
        _, g_ck = _grad(client, grad_mode="checkpoint")
        _, g_paper = _grad(client, grad_mode="adjoint")
        _, g_room = _grad(client, grad_mode="adjoint", memory_budget_mib=1)
    with adjointdpm.Client(f"127.0.0.1:{servers['none'].port}", timeout=300) as client:
        _, g_capped = _grad(client, grad_mode="adjoint", memory_budget_mib=1)
    assert _same(g_room, g_ck)
    assert not _same(g_paper, g_ck)  # re-solved, not stored: approximate
    assert _same(g_capped, g_paper)
