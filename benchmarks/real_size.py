"""Real-size figures on this machine: an SD1.5-architecture UNet (random weights from its config,
nothing downloaded), 64×64 latents, batch 1, a 77×768 text conditioning, no CFG.

Per cell (a fresh process each, as benchmarks/memory.py): the peak resident-memory increase of one
``sample`` + ``backward`` (∂L/∂x_T and ∂L/∂cond; frozen weights) and its process CPU time, for
``checkpoint``, ``auto`` (the default budget: half the available RAM) and ``backprop`` at 2/4/8
dpm3 steps; the unit is "one UNet forward + backward" measured the same way in its own process.
A backprop cell whose graphs would not fit in 80% of the available RAM is skipped (this machine
has no swap; the OOM killer would take more than the benchmark).

    python benchmarks/real_size.py          # ~15 min on 2 cores; writes results/real_size.md
    python benchmarks/real_size.py --part blocks   # only the section below (~8 min), the rest kept
    python benchmarks/real_size.py --part decoder  # only the VAE decoder's section (~20 min)

Checkpointing inside the network (``--part blocks``): one step's VJP (a UNet forward with its graph
and the backward, ∂/∂x and ∂/∂cond) with and without the UNet's blocks checkpointed (the plan
``auto`` makes when one step's graph does not fit its budget; core/_blocks.py), at 512² and 768²
(latents 64² and 96²), batch 1, float32: peak resident-memory increase, process CPU time, and the
largest gradient difference between the two; then ``auto`` itself over 2 steps with a budget
below one graph, and the plan it reports.

The VAE decoder of an image-domain gradient (``--part decoder``, models/_decoding.py): SD1.5's
``AutoencoderKL`` (random weights) at 512², the decoder's VJP from the latents (a random cotangent
on the image) at batch 1 and 4 — today's (the whole batch's graph), in slices of one sample
recomputed in the backward pass, and those slices checkpointed inside the decoder — then the
whole gradient (2 dpm3 steps, ``checkpoint``, ∂/∂x_T and ∂/∂cond) with an MSE on the latents vs on
the decoded image with the decoder planned within a budget.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import memory as M  # noqa: E402  (RSS probes)

RESULTS = Path(__file__).resolve().parent / "results" / "real_size.md"
BLOCKS_HEADING = "## Checkpointing inside the network"
DECODER_HEADING = "## The VAE decoder of an image-domain gradient"
SIZES = (512, 768)
STEPS = (2, 4, 8)
MODES = ("checkpoint", "auto", "backprop")


def build(image: int = 512):
    import torch
    from diffusers import UNet2DConditionModel

    from adjointdpm_server.models._diffusers import TextConditionalEps

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)  # SD1.5's architecture
    eps_fn = TextConditionalEps(unet).eval().requires_grad_(False)
    side = image // 8
    x_T = torch.randn(1, 4, side, side).requires_grad_()
    cond = (0.1 * torch.randn(1, 77, 768)).requires_grad_()
    return eps_fn, x_T, cond, M.sd_schedule()


def available() -> int:
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def child(mode: str, steps: int, graph_mib: float = 0.0) -> dict:
    import torch

    from adjointdpm_server.core import sample
    from adjointdpm_server.core._memory import graph_bytes

    torch.set_num_threads(M.THREADS)
    eps_fn, x_T, cond, schedule = build()
    with torch.no_grad():
        eps_fn(x_T, torch.full((1,), 500.0), cond)  # warm-up
    gc.collect()
    # (nothing big is allocated before the baseline: freed pages the allocator keeps would be
    # reused unseen by the peak)
    if mode == "backprop" and steps * graph_mib * M.MIB > 0.8 * available():
        return dict(mode=mode, steps=steps, skipped=f"needs ~{steps * graph_mib / 1024:.1f} GiB of graphs")
    M.reset_peak_rss()
    base = M.current_rss()
    t0 = time.process_time()
    if mode == "unit":
        x = x_T.detach().requires_grad_()
        out = eps_fn(x, torch.full((1,), 500.0), cond)
        torch.autograd.grad(out.square().sum(), [x, cond])
        cpu, peak = time.process_time() - t0, (M.peak_rss() - base) / M.MIB
        out = eps_fn(x, torch.full((1,), 500.0), cond)
        graph = graph_bytes(out, list(eps_fn.parameters()) + [x, cond])
        return dict(mode=mode, cpu_s=cpu, peak_increase_mib=peak, graph_mib=graph / M.MIB)
    x0 = sample(eps_fn, x_T, cond, schedule=schedule, steps=steps, solver="dpm3", grad_mode=mode)
    torch.autograd.grad(x0.square().sum(), [x_T, cond])
    return dict(mode=mode, steps=steps, cpu_s=time.process_time() - t0,
                peak_increase_mib=(M.peak_rss() - base) / M.MIB)


def vjp_child(image: int, blocks: bool, grads_out: str) -> dict:
    """One step's VJP at ``image``² with or without the blocks checkpointed; gradients saved."""
    import torch

    from adjointdpm_server.core import checkpointed_blocks

    torch.set_num_threads(M.THREADS)
    eps_fn, x_T, cond, _ = build(image)
    t = torch.full((1,), 500.0)
    with torch.no_grad():
        eps_fn(x_T, t, cond)  # warm-up
    gc.collect()
    x = x_T.detach().requires_grad_()
    cotangent = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    M.reset_peak_rss()
    base = M.current_rss()
    t0 = time.process_time()
    with checkpointed_blocks(blocks):
        out = eps_fn(x, t, cond)
        gx, gcond = torch.autograd.grad(out, [x, cond], cotangent)
    cpu, peak = time.process_time() - t0, (M.peak_rss() - base) / M.MIB
    torch.save({"x": gx, "cond": gcond}, grads_out)
    return dict(image=image, blocks=blocks, cpu_s=cpu, peak_increase_mib=peak)


def auto_child(steps: int, budget_mib: float) -> dict:
    """``auto`` over ``steps`` at 512² with a budget below one graph: its plan, peak and time."""
    import torch

    from adjointdpm_server.core import sample

    torch.set_num_threads(M.THREADS)
    eps_fn, x_T, cond, schedule = build()
    with torch.no_grad():
        eps_fn(x_T, torch.full((1,), 500.0), cond)
    gc.collect()
    plans = []
    M.reset_peak_rss()
    base = M.current_rss()
    t0 = time.process_time()
    x0 = sample(eps_fn, x_T, cond, schedule=schedule, steps=steps, solver="dpm3", grad_mode="auto",
                memory_budget=budget_mib * M.MIB, on_plan=plans.append)
    torch.autograd.grad(x0.square().sum(), [x_T, cond])
    plan = plans[0]
    return dict(steps=steps, budget_mib=budget_mib, cpu_s=time.process_time() - t0,
                peak_increase_mib=(M.peak_rss() - base) / M.MIB, kept=plan.kept_graphs,
                blocks=plan.blocks_checkpointed, graph_mib=plan.graph_bytes / M.MIB)


def build_vae(image: int = 512):
    """SD1.5's VAE architecture (random weights), its decoder's blocks gated for checkpointing, and
    ``decode`` as the latent backends run it (models/_latent.py)."""
    import torch
    from diffusers import AutoencoderKL

    from adjointdpm_server.models._decoding import gate_decoder

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        sample_size=image).eval().requires_grad_(False)
    gate_decoder(vae.decoder)

    def decode(x):
        return (vae.decode(x / 0.18215).sample / 2 + 0.5).clamp(0, 1)
    return vae, decode


def decoder_child(batch: int, plan: str, grads_out: str) -> dict:
    """The decoder's VJP at 512² for ``batch`` samples: ``today`` (plain, the whole graph), ``sliced``
    (slices of one, recomputed), ``blocks`` / ``fine`` (the whole batch, checkpointed inside at that
    level), ``blocks slices`` / ``fine slices`` (slices of one, recomputed and checkpointed inside)."""
    import torch

    from adjointdpm_server.models._decoding import PLAIN, Checkpointing, DecodePlan, SlicedDecode, checkpointed_decoder

    torch.set_num_threads(M.THREADS)
    vae, decode = build_vae()
    gens = [torch.Generator().manual_seed(k) for k in range(batch)]  # sample k's at every batch size
    x0 = torch.stack([torch.randn(4, 64, 64, generator=g) for g in gens])
    cotangent = torch.stack([torch.randn(3, 512, 512, generator=g) for g in gens])
    with torch.no_grad():
        decode(x0[:1, :, :8, :8])  # warm-up, small
    gc.collect()
    blocks, fine = Checkpointing.BLOCKS, Checkpointing.FINE
    chosen = {"today": PLAIN, "sliced": DecodePlan(1), "blocks": DecodePlan(0, blocks),
              "blocks slices": DecodePlan(1, blocks), "fine": DecodePlan(0, fine),
              "fine slices": DecodePlan(1, fine)}[plan]
    x = x0.clone().requires_grad_()
    M.reset_peak_rss()
    base = M.current_rss()
    t0 = time.process_time()
    if chosen.slice_size:
        image = SlicedDecode.apply(x, decode, chosen)
    else:
        with checkpointed_decoder(chosen.checkpointing):
            image = decode(x)
    (grad,) = torch.autograd.grad(image, x, cotangent)
    cpu, peak = time.process_time() - t0, (M.peak_rss() - base) / M.MIB
    torch.save({"x": grad[:1]}, grads_out)
    return dict(batch=batch, plan=plan, cpu_s=cpu, peak_increase_mib=peak)


def whole_child(domain: str, budget_mib: float) -> dict:
    """The whole gradient at 512², batch 1: 2 dpm3 steps (``checkpoint``), an MSE on the latents or
    on the image with the decoder planned within ``budget_mib`` (0: the least any exact plan
    needs); the plan and the measurement."""
    import torch

    from adjointdpm_server.core import sample
    from adjointdpm_server.models._decoding import (ALLOCATOR_SLACK, Checkpointing, SlicedDecode,
                                                    checkpointed_decoder, measure, plan_decode)

    torch.set_num_threads(M.THREADS)
    eps_fn, x_T, cond, schedule = build()
    vae, decode = build_vae()
    with torch.no_grad():
        eps_fn(x_T, torch.full((1,), 500.0), cond)
    gc.collect()
    t_measure = time.process_time()
    graph = measure(decode, torch.zeros(1, 4, 64, 64), vae.decoder) if domain == "image" else None
    t_measure = time.process_time() - t_measure
    if graph and not budget_mib:
        budget_mib = graph.at(Checkpointing.FINE) * ALLOCATOR_SLACK / M.MIB + 1
    plan = plan_decode(graph, 1, budget_mib * M.MIB) if graph else None
    if graph and plan is None:
        raise SystemExit(f"no exact decoder plan fits {budget_mib:.0f} MiB: one sample's decoder graph "
                         f"is {graph.at(Checkpointing.FINE) / M.MIB:.0f} MiB checkpointed")
    gc.collect()
    M.reset_peak_rss()
    base = M.current_rss()
    t0 = time.process_time()
    x0 = sample(eps_fn, x_T, cond, schedule=schedule, steps=2, solver="dpm3", grad_mode="checkpoint")
    if plan is None:
        out = x0
    elif plan.slice_size:
        out = SlicedDecode.apply(x0, decode, plan)
    else:
        with checkpointed_decoder(plan.checkpointing):
            out = decode(x0)
    torch.autograd.grad((out - 0.5).square().sum(), [x_T, cond])
    return dict(domain=domain, cpu_s=time.process_time() - t0, peak_increase_mib=(M.peak_rss() - base) / M.MIB,
                measure_s=t_measure, budget_mib=budget_mib,
                plan=None if plan is None else [plan.slice_size, plan.checkpointing.name.lower()],
                graph_mib=None if graph is None else [g / M.MIB for g in graph.held])


def decoder_section(budget_mib: float) -> list[str]:
    import tempfile

    import torch

    lines = [DECODER_HEADING, "",
             "SD1.5's `AutoencoderKL` architecture (random weights, float32) at 512² (latents 64²), "
             "fresh process per cell, `MALLOC_MMAP_THRESHOLD_=131072` as above. The decoder's VJP "
             "(∂⟨decode(x0), c⟩/∂x0, a random cotangent c): `today` keeps the whole batch's graph; "
             "`sliced` decodes with no graph and recomputes one sample at a time in the backward pass; "
             "`blocks` keeps the whole batch's graph with each ResNet, attention and upsampler "
             "block of the decoder checkpointed; `fine` also each ResNet's norm→activation pairs and the "
             "low-resolution trunk (the mid block and all up blocks but the last, recomputed once more in "
             "the backward pass); `… slices` recompute one sample at a time at that level "
             "(models/_decoding.py). Targets: the image-domain gradient's peak ≤ 1.25× the "
             "latent-domain one, independent of the batch, for ≤ 1.3× today's decode VJP time.", "",
             "| batch | plan | peak +MiB | CPU s | peak ÷ today (batch 1) | time ÷ today (same batch) | max abs grad diff vs today |",
             "|---:|---|---:|---:|---:|---:|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        cells = {}
        # batch 4: today's would hold ~4 × 6 GiB of graph, past this machine's RAM; slices of one
        # plain hold one sample's (as at batch 1)
        for batch, plan in ((1, "today"), (1, "sliced"), (1, "blocks"), (1, "blocks slices"), (1, "fine"),
                            (1, "fine slices"), (4, "fine slices")):
            if True:
                cells[batch, plan] = r = run(["--decoder", str(batch), plan, f"{tmp}/{batch}-{plan}.pt"],
                                             LIVE_MEMORY)
                print("decoder", batch, plan, r, flush=True)
        today = cells[1, "today"]
        ref = torch.load(f"{tmp}/1-today.pt", weights_only=True)["x"] if "error" not in today else None
        for (batch, plan), r in cells.items():
            if "error" in r:
                lines.append(f"| {batch} | {plan} | {r['error']} | | | | |")
                continue
            diff = ""
            if ref is not None:  # sample 0 is the same at every batch size
                got = torch.load(f"{tmp}/{batch}-{plan}.pt", weights_only=True)["x"]
                diff = f"{(got - ref).abs().max().item():.1e} (of {ref.abs().max().item():.1e})"
            same = cells.get((batch, "today"))
            time_ratio = (f"{r['cpu_s'] / same['cpu_s']:.2f}" if same and "error" not in same
                          else f"{r['cpu_s'] / batch / today['cpu_s']:.2f} per sample")
            lines.append(f"| {batch} | {plan} | {r['peak_increase_mib']:.0f} | {r['cpu_s']:.1f} | "
                         f"{r['peak_increase_mib'] / today['peak_increase_mib']:.2f} | {time_ratio} | {diff} |")
    lines += ["", "The whole gradient, batch 1, 2 dpm3 steps (`checkpoint`), ∂/∂x_T and ∂/∂cond, "
              "an MSE; the decoder planned within " + (f"{budget_mib:.0f} MiB" if budget_mib else
                                                        "the least budget an exact plan fits (FINE's estimate × 1.2)") + ":", "",
              "| loss on | decoder budget MiB | decoder plan (slice, checkpointing) | one sample's decoder graph MiB as planned (none, blocks, fine) | peak +MiB | CPU s |",
              "|---|---:|---|---|---:|---:|"]
    whole = {}
    for domain in ("latent", "image"):
        whole[domain] = r = run(["--whole", domain, str(budget_mib)], LIVE_MEMORY)
        print("whole", domain, r, flush=True)
        if "error" in r:
            lines.append(f"| {domain} | {r['error']} | | | | |")
            continue
        graph = ("" if r["graph_mib"] is None else ", ".join(f"{g:.0f}" for g in r["graph_mib"])
                 + f" (measured in {r['measure_s']:.1f} s)")
        budget = f"{r['budget_mib']:.0f}" if r["graph_mib"] else ""
        lines.append(f"| {domain} | {budget} | {r['plan'] or ''} | {graph} | {r['peak_increase_mib']:.0f} | {r['cpu_s']:.1f} |")
    if all("error" not in r for r in whole.values()):
        lines += ["", f"Image-domain peak ÷ latent-domain peak: "
                  f"{whole['image']['peak_increase_mib'] / whole['latent']['peak_increase_mib']:.2f}."]
    return lines


def blocks_section(budget_mib: float) -> list[str]:
    """The section's lines: each size with and without the blocks checkpointed, then auto."""
    import tempfile

    import torch

    lines = [BLOCKS_HEADING, "",
             "One step's VJP (UNet forward with its graph + backward, ∂/∂x_t and ∂/∂cond, a random "
             "cotangent), batch 1, float32, fresh process per cell; `blocks`: the UNet's blocks "
             "checkpointed (diffusers' gradient checkpointing, through core/_blocks.py), the plan "
             "`auto` makes when one step's graph does not fit its budget. Targets: peak ≤ 0.5×, "
             "time ≤ 1.35×, gradients equal to 1e-6. Every cell of this section runs with "
             "`MALLOC_MMAP_THRESHOLD_=131072`: large blocks are mmapped and returned on free, so the "
             "peak RSS follows live memory (as a GPU allocator's peak would); with glibc's adaptive "
             "default, activations freed during the pass stay in the heap and the same cells read "
             "0.44–0.52× over three runs at either size, the allocator's figure rather than the plan's.", "",
             "| image | blocks | peak +MiB | CPU s | peak ratio | time ratio | max abs grad diff (x, cond) |",
             "|---|---|---:|---:|---:|---:|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        for image in SIZES:
            cells = {}
            for blocks in (False, True):
                path = f"{tmp}/{image}-{int(blocks)}.pt"
                cells[blocks] = run(["--vjp", str(image), str(int(blocks)), path], LIVE_MEMORY)
                print("vjp", image, blocks, cells[blocks], flush=True)
            off, on = cells[False], cells[True]
            if "error" in off or "error" in on:
                lines.append(f"| {image}² | | {off.get('error') or on.get('error')} | | | | |")
                continue
            a, b = (torch.load(f"{tmp}/{image}-{k}.pt", weights_only=True) for k in (0, 1))
            diff = ", ".join(f"{(a[k] - b[k]).abs().max().item():.1e}" for k in ("x", "cond"))
            lines.append(f"| {image}² | no | {off['peak_increase_mib']:.0f} | {off['cpu_s']:.1f} | 1 | 1 | |")
            lines.append(f"| {image}² | yes | {on['peak_increase_mib']:.0f} | {on['cpu_s']:.1f} | "
                         f"{on['peak_increase_mib'] / off['peak_increase_mib']:.2f} | "
                         f"{on['cpu_s'] / off['cpu_s']:.2f} | {diff} |")
    r = run(["--auto", "2", str(budget_mib)], LIVE_MEMORY)
    print("auto", r, flush=True)
    lines.append("")
    if "error" in r:
        lines.append(f"auto cell failed: {r['error']}")
    else:
        lines.append(f"**`auto` itself**, 512², 2 dpm3 steps, `memory_budget` {budget_mib:.0f} MiB (below "
                     f"one step's graph; its first step counted {r['graph_mib']:.0f} MiB of it, a floor, "
                     f"keeping none past the budget): the plan keeps {r['kept']} graphs "
                     f"and checkpoints inside the network: {'yes' if r['blocks'] else 'no'}; peak "
                     f"+{r['peak_increase_mib']:.0f} MiB, {r['cpu_s']:.1f} s CPU — one step's VJP with "
                     "blocks checkpointed, as in the table, and never one whole graph.")
    return lines


# The section's cells allocate large blocks through mmap (glibc returns them on free), so peak RSS
# follows live memory as a GPU allocator's statistics would; with glibc's default, adaptive
# threshold, activations freed during the pass stay in the heap and the peak shows the allocator
# rather than the plan (the same 512² cell: 924 MiB against 453 MiB).
LIVE_MEMORY = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def run(args, env: dict | None = None) -> dict:
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), *args], capture_output=True,
                          text=True, env=None if env is None else {**os.environ, **env})
    if proc.returncode != 0:
        return dict(error=" | ".join((proc.stderr or proc.stdout).strip().splitlines()[-2:]))
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--part", choices=("all", "blocks", "decoder"), default="all",
                        help="blocks: only the network-checkpointing section, the rest of --out kept")
    parser.add_argument("--budget-mib", type=float, default=700.0,
                        help="the auto cell's memory budget (below one step's graph)")
    parser.add_argument("--one", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--vjp", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--auto", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--decoder", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--whole", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--decoder-budget-mib", type=float, default=0.0,
                        help="the whole image-domain gradient's decoder budget (default: the least any "
                             "exact plan fits, so the planner picks its finest checkpointing)")
    args = parser.parse_args()
    if args.decoder:
        print(json.dumps(decoder_child(int(args.decoder[0]), args.decoder[1], args.decoder[2])))
        return
    if args.whole:
        print(json.dumps(whole_child(args.whole[0], float(args.whole[1]))))
        return
    if args.one:
        print(json.dumps(child(args.one[0], int(args.one[1]), float(args.one[2]))))
        return
    if args.vjp:
        print(json.dumps(vjp_child(int(args.vjp[0]), bool(int(args.vjp[1])), args.vjp[2])))
        return
    if args.auto:
        print(json.dumps(auto_child(int(args.auto[0]), float(args.auto[1]))))
        return
    if args.part in ("blocks", "decoder"):
        text = args.out.read_text() if args.out.exists() else ""
        head, _, rest = text.partition(BLOCKS_HEADING)
        blocks_text = (BLOCKS_HEADING + rest.split(DECODER_HEADING)[0]).rstrip("\n") if rest else ""
        decoder_text = (DECODER_HEADING + text.split(DECODER_HEADING)[1]).rstrip("\n") if DECODER_HEADING in text else ""
        if args.part == "blocks":
            blocks_text = "\n".join(blocks_section(args.budget_mib))
        else:
            decoder_text = "\n".join(decoder_section(args.decoder_budget_mib))
        parts = [head.rstrip("\n"), blocks_text, decoder_text]
        args.out.write_text("\n\n".join(p for p in parts if p) + "\n")
        print(f"wrote {args.out}")
        return
    unit = run(["--one", "unit", "1", "0"])
    print("unit", unit, flush=True)
    lines = ["# Real-size figures: an SD1.5-architecture UNet on this machine's CPU", "",
             "- command: `python benchmarks/real_size.py`",
             f"- date (UTC): {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M}; "
             f"{M.THREADS} threads; RAM available at the start: {available() / 2**30:.1f} GiB",
             "- UNet2DConditionModel(sample_size=64, cross_attention_dim=768): SD1.5's architecture, "
             "random weights (frozen); latents 1×4×64×64, cond 1×77×768, no CFG, dpm3; "
             "gradient w.r.t. x_T and cond; fresh process per cell", ""]
    if "error" in unit:
        lines.append(f"unit cell failed: {unit['error']}")
    else:
        lines += [f"**One UNet forward + backward** (the unit): {unit['cpu_s']:.1f} s CPU, peak "
                  f"+{unit['peak_increase_mib']:.0f} MiB; one call's graph as `auto` measures it: "
                  f"{unit['graph_mib']:.0f} MiB.", "",
                  "| mode | steps | peak +MiB | peak ÷ unit | CPU s | CPU s per step | per step ÷ unit |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for steps in STEPS:
            for mode in MODES:
                r = run(["--one", mode, str(steps), str(unit["graph_mib"])])
                print(mode, steps, r, flush=True)
                if "error" in r or "skipped" in r:
                    lines.append(f"| {mode} | {steps} | {r.get('skipped') or r.get('error')} | | | | |")
                    continue
                lines.append(f"| {mode} | {steps} | {r['peak_increase_mib']:.0f} | "
                             f"{r['peak_increase_mib'] / unit['peak_increase_mib']:.2f} | {r['cpu_s']:.1f} | "
                             f"{r['cpu_s'] / steps:.1f} | {r['cpu_s'] / steps / unit['cpu_s']:.2f} |")
    lines += [""] + blocks_section(args.budget_mib) + [""] + decoder_section(args.decoder_budget_mib)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
