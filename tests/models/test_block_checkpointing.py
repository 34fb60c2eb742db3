"""Checkpointing inside the network, as ``auto`` plans it (core/_blocks.py, design §2.4.1).

On every diffusers family (SD, SDXL, SD3-type, FLUX-type; tiny pipelines built from config) in
float64: with a budget that holds the states but not one step's graph, ``auto`` reports a plan
that keeps no graph and checkpoints inside the network, really recomputes the blocks in the
backward pass, and gives the gradients of x_T, cond, a learned token and LoRA weights that a
budget holding every graph gives. The switch lives in a context, so one job's plan never
reaches another's calls on the same resident network.
"""

from __future__ import annotations

import gc
import threading
import weakref

import pytest
import torch

from adjointdpm_server.core import (BlockCheckpointing, blocks_checkpointed, checkpointed_blocks,
                                    sample)
from adjointdpm_server.core._memory import ALLOCATOR_SLACK, GraphGuard, plan_blocks
from adjointdpm_server.models import load_model
from adjointdpm_server.models._adapters import with_lora

from .contract import cfg_scale, declared
from .test_stable_diffusion import _offline
from .tiny_families import build_tiny_flux, build_tiny_sd3, build_tiny_sdxl
from .tiny_sd import build_tiny_sd

BUILDERS = {"sd": build_tiny_sd, "sdxl": build_tiny_sdxl, "sd3": build_tiny_sd3, "flux": build_tiny_flux}
OPTIONS = {"sd": "", "sdxl": "", "sd3": "?max_sequence_length=24",
           "flux": "?height=16&width=16&max_sequence_length=24"}
STEPS = 3


@pytest.fixture(scope="module")
def backends(tmp_path_factory):
    root = tmp_path_factory.mktemp("blocks")
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        _offline(mp)
        for family, build in BUILDERS.items():
            path = build(root / family)
            out[family] = load_model(f"diffusers:{path}{OPTIONS[family]}", dtype=torch.float64)
    return out


def _lora(b):
    lora = with_lora(b.eps_fn, rank=2, targets=b.lora_targets)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:  # nonzero, so lora_A gets a gradient too
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    return lora


CHECKPOINTED = {"ResnetBlock2D", "BasicTransformerBlock", "JointTransformerBlock",
                "FluxTransformerBlock", "FluxSingleTransformerBlock"}  # the blocks diffusers checkpoints


def _count_calls(module) -> dict:
    """Calls of the blocks diffusers checkpoints begun inside the backward pass (a pre-hook: a
    checkpoint's recomputation may stop before the end)."""
    calls = {"n": 0}

    def hook(*_):
        if torch._C._current_graph_task_id() != -1:
            calls["n"] += 1

    handles = [m.register_forward_pre_hook(hook) for m in module.modules()
               if type(m).__name__ in CHECKPOINTED]
    return calls, handles


def _gradients(b, eps_fn, mode: str, budget: float | None):
    """x_T, cond (with a learned token) → sample → ∂(pixel loss)/∂(x_T, cond, token, weights)."""
    x_T = b.noise(2, seed=0).requires_grad_()
    token = b.random_token(seed=1).clone().requires_grad_()
    c = b.guide(b.encode_with_token(2, "a photo of <*>", token), 3.0)
    cond = c.cond
    cond.retain_grad()
    plans = []
    calls, handles = _count_calls(eps_fn)
    try:
        x0 = sample(eps_fn, x_T, cond, uncond=c.uncond, guidance_scale=cfg_scale(b, 3.0),
                    schedule=b.schedule, steps=STEPS, grad_mode=mode, memory_budget=budget,
                    on_plan=plans.append, **declared(b))
        image = b.decode(x0)
        target = torch.linspace(0, 1, image[0].numel(), dtype=image.dtype).reshape(image.shape[1:])
        weights = [p for p in eps_fn.parameters() if p.requires_grad]
        grads = torch.autograd.grad((image - target).square().mean(), [x_T, cond, token, *weights])
    finally:
        for h in handles:
            h.remove()
    return grads, plans, calls["n"], len(weights)


def _state(b) -> int:
    return 2 * torch.Size(b.latent_shape).numel() * 8  # batch 2, float64


def _tight_budget(b) -> int:
    """Room for the states and a little more, never for one step's graph."""
    return STEPS * _state(b) + 1024


@pytest.mark.parametrize("family", list(BUILDERS))
def test_a_graph_that_does_not_fit_checkpoints_inside_the_network_with_equal_gradients(backends, family):
    b = backends[family]
    lora = _lora(b)
    assert isinstance(lora, BlockCheckpointing) and lora.checkpoints_blocks  # the copy declares it
    g_all, plans_all, calls_all, n = _gradients(b, lora, "auto", 1e12)
    g_ck, plans_ck, calls_ck, _ = _gradients(b, lora, "checkpoint", None)
    g_in, plans_in, calls_in, _ = _gradients(b, lora, "auto", _tight_budget(b))
    (everything,), (inside,) = plans_all, plans_in
    assert everything.kept_graphs == STEPS and not everything.blocks_checkpointed
    assert inside.kept_graphs == 0 and inside.blocks_checkpointed
    # the first step's graph was counted past the budget (a floor: freed storages reused)
    assert inside.budget_bytes == _tight_budget(b)
    assert (inside.budget_bytes - STEPS * _state(b)) / ALLOCATOR_SLACK < inside.graph_bytes
    assert inside.graph_bytes <= everything.graph_bytes
    assert plans_ck[0].grad_mode == "checkpoint" and not plans_ck[0].blocks_checkpointed
    # in the backward pass: every graph kept, nothing runs; checkpoint recomputes every step
    # once; checkpointing inside recomputes blocks besides, within each step's backward
    assert calls_all == 0 < calls_ck < calls_in
    assert n > 0
    for k, (a, c) in enumerate(zip(g_all, g_in)):
        assert float(c.abs().max()) > 0, f"input {k}"
        torch.testing.assert_close(c, a, rtol=1e-10, atol=1e-13, msg=f"input {k}")


def test_a_network_that_does_not_declare_it_is_planned_without(backends):
    """A plain module (no BlockCheckpointing): the same tight budget keeps no graph, no blocks."""
    b = backends["sd"]
    unet = b.eps_fn.unet

    class Plain(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.unet = unet

        def forward(self, x, t, cond):
            return self.unet(x, t, encoder_hidden_states=cond).sample

    _, (plan,), _, _ = _gradients(b, Plain(), "auto", _tight_budget(b))
    assert plan.kept_graphs == 0 and not plan.blocks_checkpointed


def _watched_call(b, limit):
    """One UNet call under a guard: (the guard, how backpropagating its output went, module
    outputs still alive once the output is dropped, the inputs)."""
    outputs = []

    def keep(module, args, out):
        outputs.append(weakref.ref(out if isinstance(out, torch.Tensor) else out[0]))

    x = b.noise(1, seed=0).requires_grad_()
    cond = b.encode(1, prompt="a cat").cond.detach().requires_grad_()
    t = torch.full((1,), 500.0, dtype=x.dtype)
    guard = GraphGuard(limit, list(b.eps_fn.parameters()))
    handle = torch.nn.modules.module.register_module_forward_hook(keep)
    try:
        with guard.watching():
            out = b.eps_fn(x, t, cond)
    finally:
        handle.remove()
    try:
        grads = torch.autograd.grad(out.square().sum(), [x, cond])
    except RuntimeError as err:
        grads = err
    del out
    gc.collect()
    return guard, grads, sum(r() is not None for r in outputs), (x, t, cond)


def test_the_graph_guard_keeps_nothing_past_its_limit_and_leaks_nothing(backends):
    """Within the limit the watched call keeps its graph (the very gradients of an unwatched
    call); past it, it keeps no more (its graph cannot be backpropagated); either way every
    activation is freed with the output (a saved output packed as itself would keep its own
    node alive; a raising hook would leak the graph built so far)."""
    b = backends["sd"]
    within, grads, left_within, (x, t, cond) = _watched_call(b, 1e12)
    past, refused, left_past, _ = _watched_call(b, 20_000)
    assert not within.over and past.over and past.bytes > 20_000
    assert "past the memory budget" in str(refused)
    assert left_within == left_past == 0
    plain = torch.autograd.grad(b.eps_fn(x, t, cond).square().sum(), [x, cond])
    for a, c in zip(grads, plain):
        assert torch.equal(a, c)


def test_the_planner_checkpoints_inside_exactly_when_one_graph_does_not_fit():
    graph, state, steps = 1000, 10, 4
    fits = graph * ALLOCATOR_SLACK + steps * state
    assert not plan_blocks(steps, fits, graph, state)
    assert plan_blocks(steps, fits - 1, graph, state)
    assert not plan_blocks(steps, 0, 0, state)  # nothing measured: nothing to checkpoint


def test_one_jobs_plan_does_not_reach_another_threads_calls():
    seen = {}
    inside, done = threading.Event(), threading.Event()

    def other():
        inside.wait(5)
        seen["other"] = blocks_checkpointed()
        done.set()

    thread = threading.Thread(target=other)
    thread.start()
    with checkpointed_blocks():
        seen["mine"] = blocks_checkpointed()
        inside.set()
        done.wait(5)
    thread.join(5)
    assert seen == {"mine": True, "other": False} and not blocks_checkpointed()
