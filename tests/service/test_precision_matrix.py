"""Every RPC × every loss kind × every server dtype (``--dtype float32|bfloat16|float16``) on CPU.

A server computing in half precision still speaks float32 on the wire (numpy has no bfloat16),
steps its optimizers on float32 master copies (Adam's ε underflows in float16), and answers
each call OK with finite results, within the per-dtype tolerances of docs/design.md §2.4.2's
table against the same call on a float32 server. Loss kinds: a server plugin (``classifier``),
a client numpy loss, a client torch loss, and a loss on a real Triton server.
"""

from __future__ import annotations

import numpy as np
import pytest

import adjointdpm
from adjointdpm_server.config import Limits, ServerConfig
from adjointdpm_server.wire import build_server

DTYPES = ("float32", "bfloat16", "float16")
KINDS = ("server", "client_numpy", "client_torch", "triton")
RPCS = ("compute_gradient", "optimize_latent", "finetune_weights", "optimize_embedding")
# Relative L2 distance to the float32 server's result: docs/design.md §2.4.2's table, about twice
# the worst figure measured over the four loss kinds (4 steps, 2 iterations). ``sample``: x_0 of
# Sample and ComputeGradient; ``gradient``: ∂x_T and ∂cond; ``iterate``: OptimizeLatent's x_T and
# x_0 after two Adam steps (Adam's first steps are nearly sign(g): a tiny difference in a small
# entry of g moves it by up to 2·lr); ``loss``: the loss or the loss history.
TOLERANCE = {
    "bfloat16": {"sample": 1.6e-2, "gradient": 0.25, "iterate": 6e-2, "loss": 1e-2},
    "float16": {"sample": 2e-3, "gradient": 0.2, "iterate": 4e-2, "loss": 2e-3},
}
COMMON = {"seed": 0, "steps": 4, "labels": [3, 5]}


def _darker(image):
    return float(image.mean()), np.full_like(image, 1.0 / image.size)


def _brighter_torch(image):
    return ((image - 0.5) ** 2).mean()


def _loss(kind: str):
    if kind == "server":
        return adjointdpm.ServerLoss("classifier", {"label": 8})
    if kind == "client_numpy":
        return adjointdpm.ClientLoss(_darker, "darker", autograd=False)
    if kind == "client_torch":
        return adjointdpm.ClientLoss(_brighter_torch, "brighter", autograd=True)
    return adjointdpm.ServerLoss("triton", {"model": "mse_loss"})


def _call(client, rpc: str, loss):
    if rpc == "compute_gradient":
        return client.compute_gradient(loss, targets=["x_T", "cond"], **COMMON)
    if rpc == "optimize_latent":
        return client.optimize_latent(loss, iterations=2, lr=0.05, **COMMON)
    if rpc == "finetune_weights":
        examples = [{"seed": k, "label": k} for k in (3, 5)]
        return client.finetune_weights(loss, examples, iterations=2, lr=1e-2, seed=0, steps=4)
    return client.optimize_embedding(loss, iterations=2, lr=0.05, labels=[3], steps=4, seed=0)


def _figures(rpc: str, r) -> dict[str, list[np.ndarray]]:
    """What is compared across dtypes, by tolerance class."""
    if rpc == "sample":
        return {"sample": [r.x0]}
    if rpc == "compute_gradient":
        return {"sample": [r.x0], "gradient": [r.gradients["x_T"], r.gradients["cond"]],
                "loss": [np.array([r.loss])]}
    if rpc == "optimize_latent":
        return {"iterate": [r.x_T, r.x0], "loss": [np.array(r.history)]}
    return {"loss": [np.array(r.history)]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, triton_url):
    out = {}
    for dtype in DTYPES:
        srv = build_server(ServerConfig(
            models=("digits",), port=0, dtype=dtype, triton_url=triton_url,
            artifact_dir=tmp_path_factory.mktemp(dtype),
            limits=Limits(max_batch=8, max_steps=50, max_iterations=10, client_loss_timeout_s=60)))
        try:
            with adjointdpm.Client(f"127.0.0.1:{srv.port}", timeout=300) as client:
                out[dtype, "sample", ""] = client.sample(**COMMON)
                for rpc in RPCS:
                    for kind in KINDS:
                        out[dtype, rpc, kind] = _call(client, rpc, _loss(kind))
        finally:
            srv.stop(0)
    return out


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_call_answers_float32_and_finite(runs, dtype):
    for (d, rpc, kind), r in runs.items():
        if d != dtype:
            continue
        for arrays in _figures(rpc, r).values():
            for a in arrays:
                assert a.dtype == np.float32 or a.dtype == np.float64, (rpc, kind, a.dtype)
                assert np.isfinite(a).all(), (dtype, rpc, kind)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("rpc", ("sample", *RPCS))
def test_half_precision_server_is_within_the_table_of_float32(runs, dtype, rpc):
    worst = {}
    for (d, name, kind), r in runs.items():
        if d != dtype or name != rpc:
            continue
        ref = _figures(rpc, runs["float32", rpc, kind])
        for cls, arrays in _figures(rpc, r).items():
            for a, b in zip(arrays, ref[cls]):
                worst[cls, kind] = max(worst.get((cls, kind), 0.0), _rel(a, b))
    print(dtype, rpc, {k: f"{v:.2e}" for k, v in worst.items()})
    for (cls, kind), err in worst.items():
        assert err <= TOLERANCE[dtype][cls], (dtype, rpc, kind, cls, err)
