"""``grad_mode="auto"``: gradient time and peak memory against the memory budget, per steps.

The problem is ``benchmarks/memory.py``'s (a seeded SD-like UNet whose calls save ~33 MB each for
autograd; gradient w.r.t. x_T, cond and every weight; dpm3). A budget is given in *graphs*: ``g``
means ``g·G + N·|y|`` bytes, G the bytes one call's graph saves as ``auto`` measures it
(``core._memory.graph_bytes``) and |y| one state; ``auto`` then keeps ``⌊g⌋`` graphs.

- Memory: every cell runs in a fresh process (``--one MODE STEPS GRAPHS``) and reports the peak
  resident-memory increase of one ``sample`` + ``backward`` over the RSS before it (as
  memory.py); the weight gradients (~4 MiB) and one call's transient workspace are in it.
- Time: one process per step count (``--time STEPS``) runs backprop, checkpoint and every budget
  interleaved (the order rotates each round) and reports the median process CPU time.

Goals (issue 13): at a budget ≥ backprop's peak, time ≤ 1.05× backprop; at a one-call budget,
≤ 1.5× backprop; peak never above budget + 10%.

    python benchmarks/budget.py                    # ~10 min on 2 cores; writes results/budget.md
    python benchmarks/budget.py --steps 10 --repeats 1 --out /tmp/b.md   # smoke
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import memory as M  # noqa: E402  (the shared problem and RSS probes)

RESULTS = Path(__file__).resolve().parent / "results" / "budget.md"
SOLVER = "dpm3"


def graphs_levels(steps: int) -> list[float]:
    """Budgets in graphs: none fits, one, a quarter … all of them (each kept graph counted at
    ALLOCATOR_SLACK), and 1.25·N — about backprop's own peak here."""
    from adjointdpm_server.core._memory import ALLOCATOR_SLACK as S

    return ([0.0, round(S + 0.01, 2)] + [round(round(f * steps) * S + 0.01, 2) for f in (0.25, 0.5, 0.75)]
            + [round(steps * S + 0.01, 2), 1.25 * steps])


def _unit(problem) -> tuple[int, int]:
    """(G, |y|): one call's graph bytes as ``auto`` measures them, and one state's bytes."""
    import torch

    from adjointdpm_server.core._memory import graph_bytes

    eps_fn, x = problem["eps_fn"], problem["x_T"].detach().requires_grad_()
    out = eps_fn(x, torch.full((x.shape[0],), 500.0), problem["cond"])
    g = graph_bytes(out, list(eps_fn.parameters()) + [x, problem["cond"]])
    return g, x.numel() * x.element_size()


def _budget(graph: int, state: int, steps: int, graphs: float) -> int:
    return int(graphs * graph + steps * state)


def gradient_pass(problem, mode: str, steps: int, budget: int | None) -> None:
    from adjointdpm_server.core import sample

    M.clear_grads(problem)
    extra = dict(memory_budget=budget) if mode == "auto" else {}
    x0 = sample(problem["eps_fn"], problem["x_T"], problem["cond"], schedule=problem["schedule"],
                steps=steps, solver=SOLVER, grad_mode=mode, **extra)
    (x0 * problem["weight"]).sum().backward()


def child_memory(mode: str, steps: int, graphs: float, graph: int) -> dict:
    """``graph``: G in bytes, measured by the time child. Nothing here builds a graph before the
    baseline: the allocator would keep the freed pages and hide them from the peak."""
    from adjointdpm_server.core._memory import plan_kept_steps

    M.setup_torch()
    problem = M.build_problem()
    M.warm_up(problem)
    state = problem["x_T"].numel() * problem["x_T"].element_size()
    budget = _budget(graph, state, steps, graphs) if mode == "auto" else None
    kept = plan_kept_steps(steps, budget, graph, state) if mode == "auto" else None
    gc.collect()
    M.reset_peak_rss()
    base = M.current_rss()
    gradient_pass(problem, mode, steps, budget)
    return dict(mode=mode, steps=steps, graphs=graphs, budget_mib=(budget or 0) / M.MIB, kept=kept,
                peak_increase_mib=(M.peak_rss() - base) / M.MIB)


def child_time(steps: int, repeats: int) -> dict:
    M.setup_torch()
    problem = M.build_problem()
    M.warm_up(problem)
    cells = [("backprop", None), ("checkpoint", None)] + [("auto", g) for g in graphs_levels(steps)]
    graph, state = _unit(problem)
    budgets = {c: (_budget(graph, state, steps, c[1]) if c[0] == "auto" else None) for c in cells}
    for mode, g in cells[:3]:
        gradient_pass(problem, mode, min(steps, 3), budgets[(mode, g)])
    cpu = {c: [] for c in cells}
    for r in range(repeats):
        for c in cells[r % len(cells):] + cells[:r % len(cells)]:
            t0 = time.process_time()
            gradient_pass(problem, c[0], steps, budgets[c])
            cpu[c].append(time.process_time() - t0)
    return dict(steps=steps, graph_bytes=graph, graph_mib=graph / M.MIB, state_kib=state / 1024,
                cpu_s={f"{m}:{gr}": statistics.median(v) for (m, gr), v in cpu.items()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 20])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--one", nargs=4, metavar=("MODE", "STEPS", "GRAPHS", "G_BYTES"), help=argparse.SUPPRESS)
    parser.add_argument("--time", type=int, metavar="STEPS", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(child_memory(args.one[0], int(args.one[1]), float(args.one[2]), int(args.one[3]))))
        return
    if args.time:
        print(json.dumps(child_time(args.time, args.repeats)))
        return
    script = [str(Path(__file__).resolve())]
    lines = ["# `grad_mode=\"auto\"`: time and peak memory against the budget", "",
             f"- command: `python benchmarks/budget.py --steps {' '.join(map(str, args.steps))} "
             f"--repeats {args.repeats}`",
             f"- date (UTC): {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M}; "
             f"{M.THREADS} threads; solver {SOLVER}; the UNet of benchmarks/memory.py",
             "- budget in graphs g: g·G + N·|y| bytes (G: one call's saved activations as `auto` "
             "measures them); auto keeps ⌊g / 1.2⌋ graphs (ALLOCATOR_SLACK); 1.25·N graphs is about "
             "backprop's own peak",
             "- peak: RSS increase of one sample + backward in a fresh process (weight gradients and "
             "one call's workspace included); time: median process CPU time, cells interleaved", ""]
    for steps in args.steps:
        timing = _run(script, ["--time", str(steps), "--repeats", str(args.repeats)])
        print(timing, flush=True)
        if "error" in timing:
            lines += [f"## {steps} steps", "", f"timing failed: {timing['error']}", ""]
            continue
        cpu = timing["cpu_s"]
        bp = cpu["backprop:None"]
        lines += [f"## {steps} steps", "",
                  f"One call's graph G = {timing['graph_mib']:.1f} MiB; one state {timing['state_kib']:.0f} KiB.", "",
                  "| mode | budget (graphs) | budget MiB | kept graphs | peak +MiB | peak − budget | CPU s | ÷ backprop |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        cells = [("backprop", None), ("checkpoint", None)] + [("auto", g) for g in graphs_levels(steps)]
        for mode, g in cells:
            mem = _run(script, ["--one", mode, str(steps), str(g or 0), str(timing["graph_bytes"])])
            print(mode, g, mem, flush=True)
            peak = mem.get("peak_increase_mib")
            budget = mem.get("budget_mib") if mode == "auto" else None
            kept = mem.get("kept") if mode == "auto" else (steps if mode == "backprop" else 0)
            t = cpu[f"{mode}:{g}"]
            lines.append(f"| {mode} | {'' if g is None else f'{g:g}'} | "
                         f"{'' if budget is None else f'{budget:.1f}'} | {kept} | "
                         f"{'—' if peak is None else f'{peak:.1f}'} | "
                         f"{'' if budget is None or peak is None else f'{peak - budget:+.1f}'} | "
                         f"{t:.2f} | {t / bp:.2f} |")
        lines.append("")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


def _run(script, args) -> dict:
    import subprocess

    proc = subprocess.run([sys.executable, *script, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        return dict(error=" | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:]))
    return json.loads(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
