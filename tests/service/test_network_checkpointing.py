"""The memory plan over the wire, and checkpointing inside the network through the engine.

Two servers on one tiny Stable Diffusion: one whose gradient budget holds every graph, one whose
budget holds the states but not one step's graph. The second reports a plan that checkpoints
inside the network, and gives the same gradients — x_T and cond through the engine's batched
VJP calls, and a LoRA fine-tune through the adapter bank, whose blocks are recomputed in the
state of the call that first ran them (each row's adapter, the trained weights swapped in).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import adjointdpm
from adjointdpm_server.config import Limits, ServerConfig
from adjointdpm_server.core import MemoryPlan
from adjointdpm_server.core._memory import GraphGuard
from adjointdpm_server.tasks import Job, LocalJob
from adjointdpm_server.wire import build_server
from tests.models.tiny_sd import build_tiny_sd

STEPS = 3
TIGHT = 16 << 10  # the states of a few steps at 8×8 latents; far below one UNet call's graph


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    root = tmp_path_factory.mktemp("plans")
    sd_path = build_tiny_sd(root / "sd")
    built = {}
    for name, budget in (("roomy", 1 << 34), ("tight", TIGHT)):
        config = ServerConfig(models=(f"tiny=diffusers:{sd_path}",), port=0,
                              artifact_dir=root / f"artifacts-{name}",
                              limits=Limits(max_batch=4, max_steps=50, grad_memory_bytes=budget))
        built[name] = build_server(config)
    clients = {name: adjointdpm.Client(f"127.0.0.1:{srv.port}", timeout=300) for name, srv in built.items()}
    yield {name: (clients[name], built[name].runtime) for name in built}
    for name, srv in built.items():
        clients[name].close()
        srv.stop(0)


# on the latents: the tight budget is the UNet's; an image loss would also plan the VAE decoder
# within it, and no exact decoder plan fits 16 KiB (tests/models/test_decoder_plan.py)
LOSS = adjointdpm.ServerLoss("mse", tensors={"target": np.full((4, 8, 8), 0.5, np.float32)}, domain="latent")


def _gradient(client):
    return client.compute_gradient(LOSS, targets=["x_T", "cond"], prompt=["a cat", "a dog"], seed=0,
                                   steps=STEPS, guidance_scale=2.0, grad_mode="auto")


def test_a_tight_budget_plans_checkpointing_inside_and_the_gradients_stay(servers):
    roomy, tight = _gradient(servers["roomy"][0]), _gradient(servers["tight"][0])
    (plan_roomy,), (plan_tight,) = roomy.plans, tight.plans
    assert plan_roomy.grad_mode == "auto" and plan_roomy.steps == plan_roomy.gradient_steps == STEPS
    assert plan_roomy.kept_graphs == STEPS and not plan_roomy.network_checkpointing
    assert plan_tight.kept_graphs == 0 and plan_tight.network_checkpointing
    assert plan_tight.budget_bytes == TIGHT < plan_roomy.graph_bytes
    assert TIGHT < plan_tight.graph_bytes <= plan_roomy.graph_bytes  # counted past the budget
    assert plan_tight.stored_states == STEPS
    assert roomy.loss == tight.loss
    for name in ("x_T", "cond"):
        assert np.abs(roomy.gradients[name]).max() > 0
        np.testing.assert_allclose(tight.gradients[name], roomy.gradients[name], rtol=1e-5, atol=1e-7)


class _Calls:
    """Counts UNet resnets run inside a backward pass on any thread — the resident network's and
    any copy of it (a trainable view) — with a global pre-hook. The engine runs a step's own
    recomputation as a forward outside any backward, so what counts is a block recomputed by
    checkpointing inside the network (a pre-hook: its recomputation may stop early)."""

    def __init__(self):
        self.n = 0

    def __enter__(self):
        self.handle = torch.nn.modules.module.register_module_forward_pre_hook(self._count)
        return self

    def _count(self, module, _):
        if type(module).__name__ == "ResnetBlock2D" and torch._C._current_graph_task_id() != -1:
            self.n += 1

    def __exit__(self, *_):
        self.handle.remove()


@pytest.mark.parametrize("targets", [["x_T", "cond"], ["weights"]])
def test_the_engine_checkpoints_blocks_in_batched_and_solo_calls(servers, targets):
    """x_T and cond: the backward's VJP calls go through the engine's batches; weights of a
    trainable view of the resident network: solo calls that keep their graph. Either way, a
    plan with blocks checkpointed recomputes blocks that ``checkpoint`` (no graph kept either)
    does not, and gives the same gradients."""
    client, _ = servers["tight"]
    runs = {}
    for mode in ("checkpoint", "auto"):
        with _Calls() as calls:
            r = client.compute_gradient(LOSS, targets=targets, prompt="a cat", seed=0, steps=STEPS,
                                        grad_mode=mode, weights={"parameters": ["*conv_in*"], "inline": True})
        runs[mode] = (r, calls.n)
    (ck, n_ck), (auto, n_auto) = runs["checkpoint"], runs["auto"]
    assert auto.plans[0].network_checkpointing and n_auto > 0
    if targets == ["x_T", "cond"]:
        assert n_ck == 0  # each step recomputed by a forward of the engine's, outside a backward
    got, want = ({**r.gradients, **r.weight_gradients} for r in (auto, ck))
    assert set(got) == set(want) and want
    for name, value in want.items():
        assert np.abs(value).max() > 0, name
        np.testing.assert_allclose(got[name], value, rtol=1e-5, atol=1e-7, err_msg=name)


def test_a_guard_watches_a_solo_call_on_the_engine_thread(servers):
    """``auto``'s first step is measured by saved-tensor hooks, which are per thread: a call the
    engine runs on its own thread must count as one made in the job's."""
    _, rt = servers["tight"]
    eps_fn = rt.models["tiny"].eps_fn
    x = torch.randn(1, 4, 8, 8).requires_grad_()
    t, cond = torch.full((1,), 500.0), torch.randn(1, *rt.models["tiny"].cond_shape)
    counts = []
    for network in (eps_fn, rt.engine.network(eps_fn, Job(caller="guard-test"), "tiny")):
        guard = GraphGuard(1e12, list(eps_fn.parameters()))
        with guard.watching():
            network(x, t, cond)
        counts.append(guard.bytes)
    direct, through_engine = counts
    assert direct > 0 and through_engine == direct


def test_a_plan_is_reported_again_only_when_its_decisions_change():
    """The measured graph and the budget (by default half the free memory, which moves with
    whatever else the machine runs) are no decision: a fine-tune's iterations do not repeat it."""
    job = LocalJob()
    first = MemoryPlan("auto", 4, 4, kept_graphs=4, stored_states=4, graph_bytes=100, budget_bytes=10_000)
    job.report_plan(first, 0)
    job.report_plan(dataclasses.replace(first, graph_bytes=90, budget_bytes=9_000), 1)
    job.report_plan(dataclasses.replace(first, kept_graphs=2, budget_bytes=300), 2)
    job.report_plan(dataclasses.replace(first, kept_graphs=0, blocks_checkpointed=True), 3)
    assert [(e.iteration, e.plan.kept_graphs) for e in job.events] == [(0, 4), (2, 2), (3, 0)]


def test_other_grad_modes_report_their_plans(servers):
    client = servers["tight"][0]
    for mode, stored in (("checkpoint", STEPS), ("adjoint", 0)):
        r = client.compute_gradient(LOSS, targets=["x_T"], seed=0, steps=STEPS, prompt="a cat",
                                    grad_mode=mode)
        (plan,) = r.plans
        assert (plan.grad_mode, plan.stored_states, plan.kept_graphs) == (mode, stored, 0)
        assert not plan.network_checkpointing


def test_a_lora_fine_tune_trains_the_same_weights_with_blocks_checkpointed(servers):
    """Two iterations (the second gives lora_A a gradient through the trained lora_B): the bank's
    adapter weights are swapped in again for every block recomputed in the backward pass."""
    runs = {}
    for name in ("roomy", "tight"):
        client, rt = servers[name]
        r = client.finetune_weights([LOSS], [{"seed": 0, "prompt": "a cat"}, {"seed": 1, "prompt": "a dog"}],
                                    iterations=2, lr=0.05, steps=STEPS, guidance_scale=2.0, lora_rank=2)
        tensors, _ = rt.artifacts.load(r.artifact.id)
        runs[name] = (r, {k: v.numpy() for k, v in tensors.items()})
    (roomy, w_roomy), (tight, w_tight) = runs["roomy"], runs["tight"]
    assert [p.network_checkpointing for p in roomy.plans] == [False]
    assert [p.network_checkpointing for p in tight.plans] == [True]  # reported once: it never changed
    np.testing.assert_allclose(tight.history, roomy.history, rtol=1e-6)
    assert set(w_tight) == set(w_roomy) and any("lora_A" in k for k in w_roomy)
    for key, value in w_roomy.items():
        np.testing.assert_allclose(w_tight[key], value, rtol=1e-5, atol=1e-7, err_msg=key)
    moved = [k for k in w_roomy if "lora_B" in k and np.abs(w_roomy[k]).max() > 0]
    assert moved  # the fine-tune trained something
