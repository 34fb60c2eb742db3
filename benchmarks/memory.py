"""Peak memory and wall time of a gradient through sampling, versus the number of steps.

What is measured (docs/design.md §2, "Gradient modes"): the gradient of
``L = Σ x_0 · w`` (``w`` a fixed random tensor) with respect to the initial noise ``x_T``, the
conditioning ``cond`` and every weight of the network, for the grad modes ``backprop`` (plain
autograd through every step), ``checkpoint`` (the default: stored states, one network call
recomputed per step) and ``adjoint`` (only the current state, trajectory re-solved backward), plus
``none`` (sampling under ``no_grad``, the time unit). The network is a small diffusers
``UNet2DConditionModel`` built from a config with seeded random weights (nothing is downloaded),
chosen so that the activations autograd saves for one call (~33 MB) dwarf one latent state
(32 KiB): naive backprop must grow by one call's activations per step, while ``checkpoint`` and
``adjoint`` should stay flat.

Method.

- Memory: every (mode, steps, solver) runs in a fresh subprocess
  (``python benchmarks/memory.py --one MODE STEPS SOLVER``, which prints one JSON line). It builds
  the model, makes one no-grad UNet call as a warm-up (lazy kernel and thread-pool set-up),
  resets the kernel's peak-RSS counter where Linux allows it (``/proc/self/clear_refs``), reads
  the current RSS, runs ``sample`` + ``loss.backward()`` once and reports
  ``ru_maxrss − RSS before sampling``: the peak resident-memory increase caused by the gradient,
  allocator slack included. The model's weights and the inputs are part of the baseline; the
  weight gradients (~4 MB) are part of the increase.
- Time: for every (steps, solver) one more fresh subprocess
  (``--time STEPS SOLVER``) times forward + backward of all four modes interleaved round-robin
  (the order rotates each round) after a short warm-up pass per mode, and reports the median
  of ``--repeats`` rounds (and, separately, the fastest round). The modes thus share the
  machine's conditions, so the ratios gradient time / backprop time and gradient time / no-grad
  time stay meaningful when the absolute times drift (the load average is recorded in the
  results header). On a shared 2-core machine, another busy process stalls two-thread OpenMP
  code in bursts (one thread spins while the other is descheduled), hence the fastest-round
  table beside the medians.
- ``torch.set_num_threads(2)`` everywhere. torch offers no reliable CPU-allocator statistics
  (the profiler's memory events miss most allocations), so instead the bytes autograd saves for
  one UNet call are measured once with ``saved_tensors_hooks`` and shown for reference.

Run it from the repository root (about 8–9 minutes on an idle 2-core machine, a third of it
starting the 36 Python processes; more when other processes compete for the cores):

    python benchmarks/memory.py                  # full run, writes benchmarks/results/memory.md
    python benchmarks/memory.py --steps 5 10 --euler-steps 5 --repeats 1 --out /tmp/m.md   # smoke
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _common import cpu_model

MODES = ("none", "backprop", "checkpoint", "adjoint")
GRAD_MODES = ("backprop", "checkpoint", "adjoint")
DEFAULT_STEPS = (5, 10, 20, 50, 100)
DEFAULT_EULER_STEPS = (5, 100)
THREADS = 2
SEED = 0
LATENT_SHAPE = (2, 4, 32, 32)  # batch 2, an SD-like 4-channel latent, 32×32
COND_SHAPE = (2, 8, 64)  # 8 "text tokens" of width cross_attention_dim
UNET_CONFIG = dict(
    sample_size=32,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=(32, 64),
    # Cross-attention at the 16×16 level (and in the mid block): attention over the 1024
    # positions of the 32×32 level would triple the cost without changing what is measured.
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=64,
    attention_head_dim=8,
    norm_num_groups=8,
)
RESULTS = Path(__file__).resolve().parent / "results" / "memory.md"
MIB = 2**20
FLAT_TARGET = 1.3  # docs/design.md §2: peak(100)/peak(5) for checkpoint and adjoint


# --------------------------------------------------------------------------- memory probes


def current_rss() -> int:
    """Resident set size of this process now, in bytes."""
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    """Peak resident set size of this process so far (``ru_maxrss``, KiB on Linux), in bytes."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> bool:
    """Set the kernel's peak-RSS counter to the current RSS (Linux ≥ 4.0); False if not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# --------------------------------------------------------------------------- the problem


def sd_schedule():
    """Stable Diffusion's discrete schedule (scaled_linear 0.00085…0.012, 1000 steps), so a UNet
    sees timesteps in its usual range [0, 999]."""
    import torch

    from adjointdpm_server.core import VPSchedule

    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return VPSchedule.from_alphas_cumprod(torch.cumprod(1.0 - betas, 0))


def build_problem():
    """The seeded UNet (as ``eps_fn``), ``x_T``, ``cond``, the loss weights and the SD schedule."""
    import torch
    from diffusers import UNet2DConditionModel

    # eps_fn(x, t, cond): an nn.Module, so that ``sample`` differentiates the UNet's weights
    from adjointdpm_server.models._diffusers import TextConditionalEps

    torch.manual_seed(SEED)
    eps_fn = TextConditionalEps(UNet2DConditionModel(**UNET_CONFIG)).train(False)
    x_T = torch.randn(LATENT_SHAPE).requires_grad_(True)
    cond = torch.randn(COND_SHAPE).requires_grad_(True)
    weight = torch.randn(LATENT_SHAPE)
    return dict(eps_fn=eps_fn, x_T=x_T, cond=cond, weight=weight, schedule=sd_schedule())


def clear_grads(problem) -> None:
    for p in [problem["x_T"], problem["cond"], *problem["eps_fn"].parameters()]:
        p.grad = None


def gradient_pass(problem, mode: str, steps: int, solver: str) -> None:
    """``sample`` + ``loss.backward()`` (``mode == "none"``: sampling under no_grad only)."""
    import torch

    from adjointdpm_server.core import sample

    clear_grads(problem)
    kwargs = dict(schedule=problem["schedule"], steps=steps, solver=solver, grad_mode=mode)
    if mode == "none":
        with torch.no_grad():
            sample(problem["eps_fn"], problem["x_T"], problem["cond"], **kwargs)
        return
    x0 = sample(problem["eps_fn"], problem["x_T"], problem["cond"], **kwargs)
    loss = (x0 * problem["weight"]).sum()
    loss.backward()
    missing = [n for n, p in [("x_T", problem["x_T"]), ("cond", problem["cond"])] if p.grad is None]
    if missing or any(p.grad is None for p in problem["eps_fn"].parameters()):
        raise RuntimeError(f"{mode}: no gradient for {missing or 'some UNet weights'}")


def warm_up(problem) -> None:
    """One no-grad UNet call: lazy kernel selection and thread pools, before any baseline."""
    import torch

    with torch.no_grad():
        problem["eps_fn"](problem["x_T"], torch.full((LATENT_SHAPE[0],), 500.0), problem["cond"])


def setup_torch():
    import torch

    torch.set_num_threads(THREADS)
    return torch


# --------------------------------------------------------------------------- child processes


def child_memory(mode: str, steps: int, solver: str) -> dict:
    """``--one``: peak RSS increase of one gradient pass, in a process that did nothing else."""
    import gc

    setup_torch()
    problem = build_problem()
    warm_up(problem)
    gc.collect()
    reset_ok = reset_peak_rss()
    peak_before = peak_rss()
    base = current_rss()
    t0 = time.perf_counter()
    gradient_pass(problem, mode, steps, solver)
    wall = time.perf_counter() - t0
    peak = peak_rss()
    return dict(mode=mode, steps=steps, solver=solver, peak_increase_mib=(peak - base) / MIB,
                base_rss_mib=base / MIB, peak_rss_mib=peak / MIB,
                peak_before_mib=peak_before / MIB, peak_reset=reset_ok, wall_s=wall)


def child_time(steps: int, solver: str, repeats: int) -> dict:
    """``--time``: median and minimum wall time per mode, the modes interleaved round-robin."""
    setup_torch()
    problem = build_problem()
    warm_up(problem)
    for mode in MODES:
        gradient_pass(problem, mode, min(steps, 3), solver)
    walls = {m: [] for m in MODES}
    for r in range(repeats):
        for mode in MODES[r % len(MODES):] + MODES[:r % len(MODES)]:
            t0 = time.perf_counter()
            gradient_pass(problem, mode, steps, solver)
            walls[mode].append(time.perf_counter() - t0)
    return dict(steps=steps, solver=solver, repeats=repeats,
                wall_s={m: statistics.median(v) for m, v in walls.items()},
                wall_min_s={m: min(v) for m, v in walls.items()},
                wall_all_s=walls)


def child_probe() -> dict:
    """``--probe``: versions, threads and the size of what one UNet call makes autograd save."""
    torch = setup_torch()
    import diffusers

    problem = build_problem()
    warm_up(problem)
    eps_fn = problem["eps_fn"]
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        eps_fn(problem["x_T"], torch.full((LATENT_SHAPE[0],), 500.0), problem["cond"])
    n_params = sum(p.numel() for p in eps_fn.parameters())
    return dict(torch=torch.__version__, diffusers=diffusers.__version__,
                threads=torch.get_num_threads(), params=n_params,
                param_mib=n_params * 4 / MIB, saved_per_call_mib=sum(storages.values()) / MIB,
                state_kib=problem["x_T"].numel() * problem["x_T"].element_size() / 1024)


def run_child(args: list[str]) -> dict:
    """Run this script with ``args`` in a fresh interpreter; its last stdout line is JSON."""
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), *args],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return dict(error=f"exit {proc.returncode}: " + " | ".join(tail))
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- the driver


def plan(steps: list[int], euler_steps: list[int]) -> list[tuple[str, int]]:
    return [("dpm3", s) for s in steps] + [("euler", s) for s in euler_steps]


def run_all(configs, repeats: int, log=print):
    """Memory (one fresh process per mode) and time (one per config) for every (solver, steps)."""
    memory, timing = {}, {}
    for solver, steps in configs:
        for mode in MODES:
            r = run_child(["--one", mode, str(steps), solver])
            memory[(solver, steps, mode)] = r
            log(f"  memory {solver:5s} {steps:3d} {mode:10s} "
                + (f"peak +{r['peak_increase_mib']:8.1f} MiB  ({r['wall_s']:.1f} s)"
                   if "error" not in r else r["error"]))
        r = run_child(["--time", str(steps), solver, "--repeats", str(repeats)])
        timing[(solver, steps)] = r
        log(f"  time   {solver:5s} {steps:3d} "
            + (" ".join(f"{m}={r['wall_s'][m]:.2f}s" for m in MODES) if "error" not in r
               else r["error"]))
    return memory, timing


# --------------------------------------------------------------------------- the report


def _fmt(x, spec="{:.1f}") -> str:
    return "—" if x is None else spec.format(x)


def _peak(memory, solver, steps, mode):
    r = memory.get((solver, steps, mode))
    return None if r is None or "error" in r else r["peak_increase_mib"]


def memory_table(memory, configs) -> list[str]:
    lines = ["| solver | steps | " + " | ".join(MODES) + " |",
             "|---|---:|" + "---:|" * len(MODES)]
    for solver, steps in configs:
        cells = [_fmt(_peak(memory, solver, steps, m)) for m in MODES]
        lines.append(f"| {solver} | {steps} | " + " | ".join(cells) + " |")
    return lines


def growth_table(memory, configs, state_kib: float) -> list[str]:
    lines = ["| solver | mode | peak(lo) MiB | peak(hi) MiB | peak(hi)/peak(lo) | "
             "growth per step MiB | flat (≤ 1.3)? |", "|---|---|---:|---:|---:|---:|---|"]
    for solver in dict.fromkeys(s for s, _ in configs):
        steps = sorted(n for s, n in configs if s == solver)
        if len(steps) < 2:
            continue
        lo, hi = steps[0], steps[-1]
        for mode in GRAD_MODES:
            a, b = _peak(memory, solver, lo, mode), _peak(memory, solver, hi, mode)
            ratio = b / a if a and b is not None else None
            slope = (b - a) / (hi - lo) if a is not None and b is not None else None
            flat = "—" if ratio is None else ("yes" if ratio <= FLAT_TARGET else "no")
            lines.append(f"| {solver} ({lo}→{hi}) | {mode} | {_fmt(a)} | {_fmt(b)} | "
                         f"{_fmt(ratio, '{:.2f}')} | {_fmt(slope, '{:.3f}')} | {flat} |")
    lines.append("")
    lines.append(f"For scale: one stored state is {state_kib:.0f} KiB = "
                 f"{state_kib / 1024:.3f} MiB per step.")
    return lines


def time_table(timing, configs, stat: str = "wall_s") -> list[str]:
    """Times per mode and their ratios; ``stat`` is ``wall_s`` (median) or ``wall_min_s``."""
    lines = ["| solver | steps | none s | backprop s | checkpoint s | adjoint s | "
             "backprop/none | checkpoint/none | adjoint/none | checkpoint/backprop | "
             "adjoint/backprop |", "|---|---:|" + "---:|" * 9]
    for solver, steps in configs:
        r = timing.get((solver, steps))
        if r is None or "error" in r:
            lines.append(f"| {solver} | {steps} | " + " | ".join(["—"] * 9) + " |")
            continue
        w = r[stat]
        cells = [f"{w[m]:.2f}" for m in MODES]
        cells += [f"{w[m] / w['none']:.2f}" for m in GRAD_MODES]
        cells += [f"{w[m] / w['backprop']:.2f}" for m in ("checkpoint", "adjoint")]
        lines.append(f"| {solver} | {steps} | " + " | ".join(cells) + " |")
    return lines


def machine() -> dict:
    cpu = cpu_model()
    try:
        with open("/proc/meminfo") as f:
            mem_gib = int(f.readline().split()[1]) / 2**20
    except OSError:
        mem_gib = float("nan")
    return dict(cpu=cpu, cores=os.cpu_count(), affinity=len(os.sched_getaffinity(0)),
                mem_gib=mem_gib, python=platform.python_version())


def report(command, probe, memory, timing, configs, repeats, started, elapsed, loads) -> str:
    m = machine()
    failures = [f"- {k}: {v['error']}" for k, v in {**memory, **timing}.items() if "error" in v]
    unreset = [k for k, v in memory.items() if "error" not in v and not v["peak_reset"]]
    out = [
        "# Memory and time of a gradient through sampling",
        "",
        f"- Command: `{command}`",
        f"- Date: {started} (total runtime {elapsed / 60:.1f} min)",
        f"- torch {probe.get('torch')}, diffusers {probe.get('diffusers')}, Python {m['python']}; "
        f"torch threads: {probe.get('threads')}",
        f"- Machine: {m['cpu']}, {m['cores']} cores ({m['affinity']} usable), "
        f"{m['mem_gib']:.1f} GiB RAM; load average at start / end: {loads[0]:.2f} / {loads[1]:.2f}",
        f"- Model: diffusers `UNet2DConditionModel`, random weights (seed {SEED}), "
        f"{probe.get('params', 0) / 1e6:.2f} M parameters ({_fmt(probe.get('param_mib'))} MiB), "
        f"config `{json.dumps(UNET_CONFIG)}`",
        f"- Latent `x_T` {LATENT_SHAPE} ({_fmt(probe.get('state_kib'), '{:.0f}')} KiB), "
        f"`cond` {COND_SHAPE}; schedule: SD discrete (scaled_linear 0.00085…0.012, 1000 steps), "
        "grid `logsnr`, no guidance",
        f"- Autograd saves {_fmt(probe.get('saved_per_call_mib'))} MiB of activations per UNet "
        "call (measured with `saved_tensors_hooks`)",
        "- Loss `sum(x_0 * w)`, `w` fixed random; gradients w.r.t. `x_T`, `cond` and all UNet "
        f"weights; `torch.set_num_threads({THREADS})`",
        "",
        "## Peak memory",
        "",
        "Peak RSS increase over the RSS right before `sample` (MiB), one fresh process per cell "
        "(`--one MODE STEPS SOLVER`): `ru_maxrss` after the backward minus the RSS before sampling, "
        "the peak counter reset first via `/proc/self/clear_refs`"
        + ("" if not unreset else f" (reset refused in {len(unreset)} runs: their peak may "
           "include pre-sampling peaks)") + ".",
        "",
        *memory_table(memory, configs),
        "",
        "Growth with the number of steps (the design targets peak(100)/peak(5) ≤ 1.3 for "
        "`checkpoint` and `adjoint`):",
        "",
        *growth_table(memory, configs, probe.get("state_kib", float("nan"))),
        "",
        "## Time",
        "",
        f"Wall time of sampling + backward (s), median of {repeats} rounds"
        + (" (i.e. their mean)" if repeats == 2 else "") + " in which the four modes "
        "run interleaved in one process (`--time STEPS SOLVER`), after a short warm-up pass per "
        "mode; `none` is sampling under `no_grad` (no backward).",
        "",
        *time_table(timing, configs),
        "",
        "The same from the fastest round per mode (less sensitive to bursts of load from other "
        "processes on the machine, which stall two-thread OpenMP code badly):",
        "",
        *time_table(timing, configs, "wall_min_s"),
    ]
    if failures:
        out += ["", "## Failed runs", "", *failures]
    return "\n".join(out) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--one", nargs=3, metavar=("MODE", "STEPS", "SOLVER"),
                   help="child: peak memory of one gradient pass, printed as JSON")
    p.add_argument("--time", nargs=2, metavar=("STEPS", "SOLVER"),
                   help="child: time all modes interleaved, printed as JSON")
    p.add_argument("--probe", action="store_true", help="child: versions and model sizes as JSON")
    p.add_argument("--steps", type=int, nargs="+", default=list(DEFAULT_STEPS),
                   help="step counts for dpm3 (default: %(default)s)")
    p.add_argument("--euler-steps", type=int, nargs="*", default=list(DEFAULT_EULER_STEPS),
                   help="step counts for euler (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=2, help="timing rounds (default: %(default)s)")
    p.add_argument("--out", type=Path, default=RESULTS, help="Markdown output (default: %(default)s)")
    args = p.parse_args(argv)

    if args.one:
        mode, steps, solver = args.one
        if mode not in MODES:
            p.error(f"MODE must be one of {MODES}")
        print(json.dumps(child_memory(mode, int(steps), solver)))
        return
    if args.time:
        print(json.dumps(child_time(int(args.time[0]), args.time[1], args.repeats)))
        return
    if args.probe:
        print(json.dumps(child_probe()))
        return

    command = "python benchmarks/memory.py" + "".join(" " + a for a in sys.argv[1:])
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load0, t0 = os.getloadavg()[0], time.perf_counter()
    probe = run_child(["--probe"])
    if "error" in probe:
        sys.exit(f"probe failed: {probe['error']}")
    print(f"model: {probe['params'] / 1e6:.2f} M params, {probe['saved_per_call_mib']:.1f} MiB "
          f"saved per call, state {probe['state_kib']:.0f} KiB; torch {probe['torch']}", flush=True)
    configs = plan(args.steps, args.euler_steps)
    memory, timing = run_all(configs, args.repeats, log=lambda s: print(s, flush=True))
    text = report(command, probe, memory, timing, configs, args.repeats, started,
                  time.perf_counter() - t0, (load0, os.getloadavg()[0]))
    print()
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
