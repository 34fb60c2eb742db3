"""A request's total work is bounded before it starts (issue 25 item 8; tasks/_work.py).

Each RPC estimates its network calls from the request and refuses one over
``--max-network-calls`` with INVALID_ARGUMENT naming the product; the estimate is held to the
``nfe`` that small real runs report (progress events, ``GradientResult.nfe``), and the task is
held to the estimate: a limit equal to it admits the request, one call less refuses it.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import adjointdpm
from adjointdpm_server.__main__ import parse_args
from adjointdpm_server.config import Limits, ServerConfig
from adjointdpm_server.wire import build_server
from adjointdpm_server.tasks import _work

TO_EIGHT = adjointdpm.ServerLoss("classifier", params={"label": 8})
STYLE = np.linspace(0, 1, 64, dtype=np.float32).reshape(1, 8, 8)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The default limits (max_steps 1000, max_iterations 1000, max_network_calls 4·10⁶)."""
    srv = build_server(ServerConfig(models=("digits",), port=0, max_active_jobs=2,
                                    artifact_dir=tmp_path_factory.mktemp("artifacts")))
    yield srv
    srv.stop(0)


@pytest.fixture(scope="module")
def client(server):
    with adjointdpm.Client(f"127.0.0.1:{server.port}", timeout=300) as c:
        yield c


@pytest.fixture
def limit(server):
    """Set the running server's ``max_network_calls`` (each request reads the runtime's limits)."""
    original = server.runtime.limits

    def set_limit(calls: int) -> None:
        server.runtime.limits = dataclasses.replace(original, max_network_calls=calls)

    yield set_limit
    server.runtime.limits = original


def _refusal(call, *args, **kwargs) -> str:
    with pytest.raises(adjointdpm.AdjointDPMError) as err:
        call(*args, **kwargs)
    assert err.value.code.name == "INVALID_ARGUMENT", err.value
    return err.value.details


def test_the_issues_guided_request_is_refused_before_any_work(server, client):
    """inner_steps 1000 × grad_steps 1000 passed each factor's limit; their product (2·10⁷ calls)
    is refused at once, naming the factors, before a single network call."""
    calls = dict(server.runtime.engine.stats.calls)
    with adjointdpm.Client(f"127.0.0.1:{server.port}", timeout=30) as quick:  # admitted: ~an hour
        details = _refusal(quick.optimize_latent, TO_EIGHT, seed=0, batch=16, steps=10,
                           guided={"every": 1, "scale": 0.3, "inner_steps": 1000, "grad_steps": 1000})
    assert "this request needs about 20,000,020 network calls" in details
    assert "nodes 10 (steps 10 / every 1) × inner steps 1000 × grad steps 1000 → 2,000 calls" in details
    assert "the server's limit is 4,000,000 (--max-network-calls)" in details
    assert dict(server.runtime.engine.stats.calls) == calls


# Small real runs, one per RPC (guided OptimizeLatent both ways), each with the estimate the
# task must make for it. ``checkpoint`` and ``adjoint`` count exactly what nfe counts; ``auto``
# spends a kept graph's backward instead of a call (uncounted by nfe): the estimate bounds it.
FINETUNE = dict(examples=[{"seed": 0, "label": 0}, {"seed": 1, "label": 1}], lora_rank=2, lr=1e-3)
RUNS = {
    "sample": (lambda c, **kw: c.sample(seed=0, batch=2, steps=6, **kw),
               _work.sample_work(6, "dpm3")),
    "sample-heun": (lambda c, **kw: c.sample(seed=0, steps=3, solver="heun", **kw),
                    _work.sample_work(3, "heun")),
    "gradient": (lambda c, **kw: c.compute_gradient(TO_EIGHT, seed=0, steps=5, grad_mode="checkpoint", **kw),
                 _work.gradient_work(5, "dpm3", "checkpoint")),
    "gradient-adjoint": (lambda c, **kw: c.compute_gradient(TO_EIGHT, seed=0, steps=5, grad_mode="adjoint", **kw),
                         _work.gradient_work(5, "dpm3", "adjoint")),
    "gradient-auto": (lambda c, **kw: c.compute_gradient(TO_EIGHT, seed=0, steps=5, **kw),
                      _work.gradient_work(5, "dpm3", "auto")),
    "optimize_latent": (lambda c, **kw: c.optimize_latent(TO_EIGHT, seed=0, steps=4, iterations=3,
                                                          grad_mode="checkpoint", **kw),
                        _work.optimize_latent_work(4, "dpm3", "checkpoint", 3)),
    "guided": (lambda c, **kw: c.optimize_latent(TO_EIGHT, seed=0, steps=5, grad_mode="checkpoint",
                                                 guided={"every": 2, "inner_steps": 2}, **kw),
               _work.guided_work(5, "dpm3", "checkpoint", 2, 2, 0)),
    "guided-grad-steps": (lambda c, **kw: c.optimize_latent(TO_EIGHT, seed=0, steps=5, grad_mode="checkpoint",
                                                            guided={"every": 2, "grad_steps": 3}, **kw),
                          _work.guided_work(5, "dpm3", "checkpoint", 2, 1, 3)),
    "finetune": (lambda c, **kw: c.finetune_weights(TO_EIGHT, steps=4, iterations=3, grad_mode="checkpoint",
                                                    validation=[{"seed": 9, "label": 2}], validate_every=2,
                                                    **FINETUNE, **kw),
                 _work.finetune_work(4, "dpm3", "checkpoint", 3, 2, True)),
    # a prompt set in micro-batches, with a content term: each pass samples the base model first
    "finetune-prompt-set": (lambda c, **kw: c.finetune_weights(
        adjointdpm.ServerLoss("gram_style", {"content_weight": 1.0}, tensors={"style": STYLE}), [],
        conditions=[1, 3], batch_size=3, micro_batch=2, steps=4, iterations=3, grad_mode="checkpoint",
        validation=[{"seed": 9, "label": 2}], validate_every=2, lora_rank=2, lr=1e-3, **kw),
        _work.finetune_work(4, "dpm3", "checkpoint", 3, 2, True, passes=2, references=True)),
    "embedding": (lambda c, **kw: c.optimize_embedding(TO_EIGHT, seed=0, steps=4, iterations=2, lr=0.1,
                                                       grad_mode="checkpoint", **kw),
                  _work.embedding_work(4, "dpm3", "checkpoint", 2)),
}


def _calls(progress) -> int:
    """The network calls of a run from its progress events: each solve's ``nfe`` counts from
    its first forward step (its backward steps go on counting), so sum each solve's last."""
    total = last = 0
    for p in progress:
        if p.phase == "forward" and p.step == 1:
            total += last
        last = p.nfe
    return total + last


@pytest.mark.parametrize("name", list(RUNS))
def test_the_estimate_bounds_the_nfe_of_a_real_run_and_the_limit_falls_exactly_there(
        client, limit, name):
    run, work = RUNS[name]
    limit(work.calls)  # exactly the estimate: admitted
    seen = []
    result = run(client, on_event=lambda e: seen.append(e.progress)
                 if e.WhichOneof("kind") == "progress" else None)
    nfe = _calls(seen)
    if name.startswith("gradient"):
        assert result.nfe == nfe
    if name == "gradient-auto":  # every graph kept: the backward made no counted call
        assert nfe == 5 and work.calls == 2 * nfe
    else:
        assert nfe == work.calls, f"{name}: the estimate {work.calls} is not the run's {nfe} calls"
    limit(work.calls - 1)  # one call less: refused, naming the product
    details = _refusal(run, client)
    assert f"about {work.calls:,} network calls" in details and "limit is" in details


def test_a_guided_jobs_nfe_counts_every_call(server):
    """``job.nfe`` (what the NFE metric counts) after guided sampling is the estimate: its
    sampling segments count on from the gradients before them (a callback shared by the
    segments counted from the start, and took the count back after each gradient)."""
    from adjointdpm import options
    from adjointdpm_server.tasks import GenerationSpec, LocalJob, LossSpec, run_optimize_latent

    job = LocalJob()
    guided = options.GROUPS["OptimizeLatent"]["guided"](every=2, inner_steps=2)
    run_optimize_latent(server.runtime.for_tenant("default"), GenerationSpec(seed=0, steps=5),
                        [LossSpec("server", "classifier", params={"label": 8})], job,
                        options.TYPES["OptimizeLatent"](grad_mode="checkpoint", guided=guided))
    assert job.nfe == _work.guided_work(5, "dpm3", "checkpoint", 2, 2, 0).calls == 46


def test_other_rpcs_are_refused_naming_their_product(client, limit):
    limit(1000)
    details = _refusal(client.compute_gradient, TO_EIGHT, seed=0, steps=300, solver="heun")
    assert "about 1,200 network calls (steps 300 → 1,200 calls (forward + backward, auto, heun)" in details
    details = _refusal(client.optimize_latent, TO_EIGHT, seed=0, steps=20, iterations=30)
    assert "about 1,240 network calls (iterations 30 × steps 20 → 40 calls" in details
    details = _refusal(client.optimize_embedding, TO_EIGHT, seed=0, steps=20, iterations=30)
    assert "about 1,240 network calls (iterations 30 × steps 20 → 40 calls" in details
    details = _refusal(client.finetune_weights, TO_EIGHT, steps=10, iterations=40,
                       validation=[{"seed": 9, "label": 2}], **FINETUNE)
    assert "about 1,230 network calls (iterations 40 × steps 10 → 20 calls" in details
    assert "validation 41 × steps 10 → 10 calls (sampling, dpm3) = 410" in details
    details = _refusal(client.sample, seed=0, steps=501, solver="heun")  # 2 calls a step
    assert "about 1,002 network calls (steps 501 → 1,002 calls (sampling, heun)" in details
    assert "the server's limit is 1,000 (--max-network-calls)" in details


def test_the_flag_sets_the_limit_and_a_raised_limit_admits(tmp_path):
    """``--max-network-calls``: a request over it is refused; the same request on a server
    started with a higher one runs. The default admits every request within the per-factor
    limits for a multistep solver (the largest: a 1000-iteration fine-tune over 1000 steps that
    validates every iteration, ~3·10⁶ calls)."""
    assert parse_args([])[0].limits.max_network_calls == Limits.max_network_calls == 4_000_000
    assert _work.finetune_work(1000, "dpm3", "adjoint", 1000, 1, True).calls <= Limits.max_network_calls
    request = dict(seed=0, steps=4, iterations=3)  # 3 × 8 + 2 × 4 = 32 calls
    for calls, admitted in ((31, False), (32, True)):
        config, _ = parse_args(["--port", "0", "--artifact-dir", str(tmp_path / str(calls)),
                                "--max-network-calls", str(calls), "--max-active-jobs", "1"])
        assert config.limits.max_network_calls == calls
        srv = build_server(config)
        try:
            with adjointdpm.Client(f"127.0.0.1:{srv.port}", timeout=120) as c:
                if admitted:
                    assert len(c.optimize_latent(TO_EIGHT, grad_mode="checkpoint", **request).history) == 3
                else:
                    assert "about 32 network calls" in _refusal(c.optimize_latent, TO_EIGHT,
                                                                grad_mode="checkpoint", **request)
        finally:
            srv.stop(0)
    assert parse_args(["--max-network-calls", "0"])[0].limits.max_network_calls == 0  # no bound
