"""Real-size figures on this machine: an SD1.5-architecture UNet (random weights from its config,
nothing downloaded), 64×64 latents, batch 1, a 77×768 text conditioning, no CFG.

Per cell (a fresh process each, as benchmarks/memory.py): the peak resident-memory increase of one
``sample`` + ``backward`` (∂L/∂x_T and ∂L/∂cond; frozen weights) and its process CPU time, for
``checkpoint``, ``auto`` (the default budget: half the available RAM) and ``backprop`` at 2/4/8
dpm3 steps; the unit is "one UNet forward + backward" measured the same way in its own process.
A backprop cell whose graphs would not fit in 80% of the available RAM is skipped (this machine
has no swap; the OOM killer would take more than the benchmark).

    python benchmarks/real_size.py          # ~15 min on 2 cores; writes results/real_size.md
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
STEPS = (2, 4, 8)
MODES = ("checkpoint", "auto", "backprop")


def build():
    import torch
    from diffusers import UNet2DConditionModel

    from adjointdpm_server.models._diffusers import TextConditionalEps

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)  # SD1.5's architecture
    eps_fn = TextConditionalEps(unet).eval().requires_grad_(False)
    x_T = torch.randn(1, 4, 64, 64).requires_grad_()
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


def run(args) -> dict:
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), *args], capture_output=True, text=True)
    if proc.returncode != 0:
        return dict(error=" | ".join((proc.stderr or proc.stdout).strip().splitlines()[-2:]))
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--one", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(child(args.one[0], int(args.one[1]), float(args.one[2]))))
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
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
