"""Accuracy of the samplers and of their gradients (no timing).

What is measured, in float64 unless a table says otherwise (``VPSchedule.linear()``, t from 1 to
1e-3, d = 64, batch 8, x_T ~ N(0, I), loss L = sum(v · x_0) with a fixed random v):

- *sample*: relative L2 error ||a − b|| / ||b|| of x_0 against a reference;
- *gradient*: the same for ∂L/∂x_T (and, on the Gaussian, ∂L/∂means and ∂L/∂scales, the
  ``nn.Parameter``s of :class:`GaussianMixture`);
- *distance to checkpoint*: relative L2 between a mode's gradient and the ``checkpoint`` gradient
  (the exact gradient of the discrete sampler);
- NFE: model calls, counted by a wrapper around the model, forward and backward separately.

Problems and references:

- ``gaussian``: data N(μ, 0.5² I), μ ~ N(0, I); reference = ``gaussian_solution`` (closed form),
  differentiated by autograd;
- ``mixture``: 4 isotropic components, means random directions of norm 4, scales
  0.3/0.4/0.5/0.35, uniform weights; reference = torchdiffeq ``dopri8`` on eq. 10 at
  rtol = atol = 1e-11 with ``odeint_adjoint``, checked against ``sample(solver="dpm3")`` at
  1000 and 4000 steps.

Tables: every solver × grad mode × steps on the log-SNR grid; grids (logsnr, time, karras);
dpm3 in float32; the paper's Table 1 comparison (eq. 4 vs eq. 10 through torchdiffeq with
``odeint_adjoint`` vs our samplers at equal NFE) and adaptive dopri5 on both ODE forms.

Run from the repository root (single-threaded on purpose: the tensors are tiny)::

    python benchmarks/accuracy.py            # full run (< 1 min), writes benchmarks/results/accuracy.md
    python benchmarks/accuracy.py --quick    # fast subset (~15 s), printed only (unless --out is given)
"""

from __future__ import annotations

import argparse
import datetime
import math
import platform
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from adjointdpm_server.core import (
    SOLVERS,
    GaussianMixture,
    VPSchedule,
    gaussian_solution,
    sample,
    sample_torchdiffeq,
)

SEED = 0
DIM = 64
BATCH = 8
MODES = ("checkpoint", "adjoint", "backprop")
GRIDS = ("logsnr", "time", "karras")
GRID_SOLVERS = ("euler", "dpm3", "ab4")
KEY_SOLVERS = ("euler", "dpm3")
DOPRI5_TOL = 1e-5
REF_TOL = 1e-11
REF_CHECK_STEPS = (1000, 4000)
RESULTS = Path(__file__).resolve().parent / "results" / "accuracy.md"


@dataclass(frozen=True)
class Settings:
    steps: tuple[int, ...] = (5, 10, 20, 50, 100)
    grid_steps: tuple[int, ...] = (10, 20, 50)
    budgets: tuple[int, ...] = (10, 20, 50)
    key_steps: tuple[int, ...] = (20, 50)


QUICK = Settings(steps=(5, 20), grid_steps=(20,), budgets=(20,), key_steps=(20,))


# ---------------------------------------------------------------------------------------------
# Problems
# ---------------------------------------------------------------------------------------------

class CountingEps(nn.Module):
    """Wraps a noise predictor and counts its calls (the NFE), whoever makes them."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.calls = 0

    def forward(self, x, t, cond=None):
        self.calls += 1
        return self.inner(x, t, cond)


@dataclass
class Outcome:
    """x_0, the gradients of L by name, and the NFE of one forward + backward solve."""

    x0: torch.Tensor
    grads: dict[str, torch.Tensor]
    nfe_fwd: int
    nfe_bwd: int


@dataclass
class Failure:
    """A solve that raised; the tables show ``failed`` and list the reason below."""

    reason: str


@dataclass
class Problem:
    name: str
    schedule: VPSchedule
    model: CountingEps
    x_T: torch.Tensor
    v: torch.Tensor
    params: dict[str, nn.Parameter]  # model parameters whose gradient is measured
    reference: Outcome | None = None

    @property
    def grad_names(self) -> list[str]:
        return ["x_T"] + list(self.params)


def _noise_and_cotangent() -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.randn(BATCH, DIM, dtype=torch.float64),
            torch.randn(BATCH, DIM, dtype=torch.float64))


def gaussian_problem(dtype=torch.float64) -> Problem:
    """One Gaussian N(μ, 0.5² I); gradients w.r.t. x_T, means and scales."""
    torch.manual_seed(SEED)
    mean = torch.randn(1, DIM, dtype=torch.float64)
    x_T, v = _noise_and_cotangent()
    sch = VPSchedule.linear()
    model = GaussianMixture(sch, mean.to(dtype), 0.5)
    model.log_weights.requires_grad_(False)
    params = {"means": model.means, "scales": model.scales}
    return Problem("gaussian", sch, CountingEps(model), x_T.to(dtype), v.to(dtype), params)


def mixture_problem(dtype=torch.float64) -> Problem:
    """Four well-separated isotropic components; gradient w.r.t. x_T only."""
    torch.manual_seed(SEED + 1)
    directions = torch.randn(4, DIM, dtype=torch.float64)
    means = 4.0 * directions / directions.norm(dim=1, keepdim=True)
    x_T, v = _noise_and_cotangent()
    sch = VPSchedule.linear()
    scales = torch.tensor([0.3, 0.4, 0.5, 0.35], dtype=torch.float64)
    model = GaussianMixture(sch, means.to(dtype), scales.to(dtype))
    model.requires_grad_(False)
    return Problem("mixture", sch, CountingEps(model), x_T.to(dtype), v.to(dtype), {})


PROBLEMS = {"gaussian": gaussian_problem, "mixture": mixture_problem}


# ---------------------------------------------------------------------------------------------
# Solves
# ---------------------------------------------------------------------------------------------

def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 error ||a − b|| / ||b||, computed in float64."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def measure(problem: Problem, solve) -> Outcome | Failure:
    """Run ``solve(model, x_T) -> x_0``, then ∂L/∂(x_T, params) for L = sum(v · x_0)."""
    model = problem.model
    x_T = problem.x_T.clone().requires_grad_(True)
    start = model.calls
    try:
        x0 = solve(model, x_T)
        mid = model.calls
        grads = torch.autograd.grad((problem.v * x0).sum(), [x_T] + list(problem.params.values()))
    except (AssertionError, RuntimeError) as exc:
        return Failure(f"{type(exc).__name__}: {exc}")
    return Outcome(x0.detach(), dict(zip(problem.grad_names, grads)), mid - start, model.calls - mid)


def run_sampler(problem: Problem, steps: int, solver: str, mode: str, grid: str = "logsnr"):
    """Our ``sample`` (dopri5: ``steps`` restart segments at rtol = atol = 1e-5)."""
    return measure(problem, lambda model, x_T: sample(
        model, x_T, schedule=problem.schedule, steps=steps, solver=solver, grad_mode=mode,
        grid=grid, rtol=DOPRI5_TOL, atol=DOPRI5_TOL))


def run_torchdiffeq(problem: Problem, ode: str, method: str, steps: int | None = None,
                    tol: float = 1e-5, grid: str = "logsnr"):
    """``sample_torchdiffeq`` with ``odeint_adjoint`` (the paper's baseline)."""
    return measure(problem, lambda model, x_T: sample_torchdiffeq(
        model, x_T, schedule=problem.schedule, ode=ode, method=method, steps=steps,
        grid=grid, rtol=tol, atol=tol, grad_mode="adjoint"))


# ---------------------------------------------------------------------------------------------
# References
# ---------------------------------------------------------------------------------------------

def gaussian_reference(problem: Problem) -> Outcome:
    """The closed-form x_0 of the probability-flow ODE, differentiated by autograd."""
    gm = problem.model.inner
    return measure(problem, lambda model, x_T: gaussian_solution(
        problem.schedule, x_T, gm.means[0], gm.scales[0]))


def dopri8_reference(problem: Problem) -> Outcome:
    """torchdiffeq dopri8 on eq. 10 at rtol = atol = 1e-11, gradient by ``odeint_adjoint``."""
    return measure(problem, lambda model, x_T: sample_torchdiffeq(
        model, x_T, schedule=problem.schedule, ode="reparameterized", method="dopri8",
        rtol=REF_TOL, atol=REF_TOL, grad_mode="adjoint"))


def with_reference(problem: Problem) -> Problem:
    problem.reference = (gaussian_reference(problem) if problem.name == "gaussian"
                         else dopri8_reference(problem))
    return problem


def reference_checks(problem: Problem) -> dict[str, Outcome | Failure]:
    """High-accuracy solves to check the reference with (dopri8 where it is not the reference)."""
    checks = {}
    if problem.name != "mixture":
        checks["dopri8"] = dopri8_reference(problem)
    for n in REF_CHECK_STEPS:
        checks[f"dpm3 {n}"] = run_sampler(problem, n, "dpm3", "checkpoint")
    return checks


def reference_label(key: str) -> str:
    if key == "dopri8":
        return f"torchdiffeq dopri8, rtol = atol = {REF_TOL:g}, odeint_adjoint"
    return f"sample(solver=dpm3, steps={key.split()[1]}), checkpoint"


# ---------------------------------------------------------------------------------------------
# Markdown helpers
# ---------------------------------------------------------------------------------------------

def fmt(x: float) -> str:
    if x == 0.0:
        return "0"
    if not math.isfinite(x):
        return str(x)
    return f"{x:.1e}"


def err(out: Outcome | Failure, problem: Problem, what: str) -> str:
    """Relative error of ``what`` (``sample`` or a gradient name) against the reference."""
    if isinstance(out, Failure):
        return "failed"
    ref = problem.reference
    return fmt(rel(out.x0, ref.x0) if what == "sample" else rel(out.grads[what], ref.grads[what]))


def dist(out: Outcome | Failure, base: Outcome | Failure, what: str) -> str:
    """Relative distance of one solve's gradient ``what`` to another's."""
    if isinstance(out, Failure) or isinstance(base, Failure):
        return "failed"
    return fmt(rel(out.grads[what], base.grads[what]))


def nfe(out: Outcome | Failure) -> str:
    return "—" if isinstance(out, Failure) else f"{out.nfe_fwd} / {out.nfe_bwd}"


def failures_note(outs) -> str:
    reasons = sorted({o.reason for o in outs if isinstance(o, Failure)})
    return "\n".join(f"failed: `{r}`" for r in reasons)


def table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def heading(text: str, level: int = 2) -> str:
    return "#" * level + " " + text


def join(*parts: str) -> str:
    return "\n\n".join(p for p in parts if p)


# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------

def solver_sweep(problem: Problem, steps: tuple[int, ...]) -> dict:
    """Every solver × mode × steps on the log-SNR grid: ``{(solver, mode, n): Outcome}``."""
    return {(s, m, n): run_sampler(problem, n, s, m) for s in SOLVERS for m in MODES for n in steps}


def key_figures_section(problems: list[Problem], sweeps: dict, steps: tuple[int, ...]) -> str:
    rows = []
    for p in problems:
        sweep = sweeps[p.name]
        for s in KEY_SOLVERS:
            for n in steps:
                ck = sweep[s, "checkpoint", n]
                rows.append([p.name, s, str(n), err(ck, p, "sample")]
                            + [err(sweep[s, m, n], p, "x_T") for m in MODES]
                            + [dist(sweep[s, "adjoint", n], ck, "x_T")])
    headers = ["problem", "solver", "steps", "sample", "∂L/∂x_T checkpoint", "∂L/∂x_T adjoint",
               "∂L/∂x_T backprop", "adjoint vs checkpoint"]
    return join(heading("Key figures (float64, grid logsnr)"), table(headers, rows))


def reference_section(problems: list[Problem]) -> str:
    checks = {p.name: reference_checks(p) for p in problems}
    rows = [[p.name, reference_label(key), err(out, p, "sample"), err(out, p, "x_T"), nfe(out)]
            for p in problems for key, out in checks[p.name].items()]
    return join(
        heading("References"),
        "Independent high-accuracy solves against each problem's reference (gaussian: the closed "
        f"form; mixture: torchdiffeq dopri8 + odeint_adjoint at rtol = atol = {REF_TOL:g}). "
        "The gaussian dopri8 row is the accuracy of the mixture's reference method on a problem "
        "with a known answer.",
        table(["problem", "solve", "sample", "∂L/∂x_T", "NFE fwd / bwd"], rows),
        reference_note(problems, checks))


def reference_note(problems: list[Problem], checks: dict) -> str:
    """The mixture reference's gradient accuracy, as far as the checks show it."""
    by_name = {p.name: p for p in problems}
    if not {"gaussian", "mixture"} <= set(by_name):
        return ""
    lo, hi = (f"dpm3 {n}" for n in (REF_CHECK_STEPS[0], REF_CHECK_STEPS[-1]))

    def e(name, key, what):
        return err(checks[name][key], by_name[name], what)

    return (f"From {REF_CHECK_STEPS[0]} to {REF_CHECK_STEPS[-1]} dpm3 steps on the mixture, the "
            f"x_0 difference to the reference goes {e('mixture', lo, 'sample')} → "
            f"{e('mixture', hi, 'sample')} and the ∂L/∂x_T difference "
            f"{e('mixture', lo, 'x_T')} → {e('mixture', hi, 'x_T')}; on the gaussian, dopri8 + "
            f"odeint_adjoint has ∂L/∂x_T error {e('gaussian', 'dopri8', 'x_T')}. Mixture gradient "
            f"errors near or below {e('mixture', hi, 'x_T')} are at the level of the reference's own "
            "gradient error.")


def solver_section(problem: Problem, sweep: dict, steps: tuple[int, ...]) -> str:
    cols = [f"{n} steps" for n in steps]
    same_forward = all(bool(torch.equal(sweep[s, m, n].x0, sweep[s, "checkpoint", n].x0))
                       for s in SOLVERS for m in MODES for n in steps)
    parts = [heading(f"{problem.name}: solvers × grad modes (grid logsnr)"),
             heading("sample error (x_0 vs reference)", 3),
             table(["solver"] + cols,
                   [[s] + [err(sweep[s, "checkpoint", n], problem, "sample") for n in steps]
                    for s in SOLVERS]),
             f"x_0 is bitwise identical in the three grad modes for every solver and step count: "
             f"{same_forward}."]
    for name in problem.grad_names:
        parts += [heading(f"gradient error: ∂L/∂{name} vs reference", 3),
                  table(["solver", "mode"] + cols,
                        [[s, m] + [err(sweep[s, m, n], problem, name) for n in steps]
                         for s in SOLVERS for m in MODES])]
    for name in problem.grad_names:
        parts += [heading(f"distance to checkpoint: ∂L/∂{name}", 3),
                  table(["solver", "mode"] + cols,
                        [[s, m] + [dist(sweep[s, m, n], sweep[s, "checkpoint", n], name) for n in steps]
                         for s in SOLVERS for m in ("adjoint", "backprop")])]
    parts += [sweep_facts(problem, sweep, steps), nfe_table(sweep, steps)]
    return join(*parts)


def lowest(outs: dict, problem: Problem, what: str) -> str:
    """The label(s) of ``outs`` with the lowest error of ``what`` against the reference."""
    errors = {k: (rel(o.x0, problem.reference.x0) if what == "sample"
                  else rel(o.grads[what], problem.reference.grads[what]))
              for k, o in outs.items() if isinstance(o, Outcome)}
    best = min(errors.values())
    return " = ".join(k for k, e in errors.items() if e == best) + f" ({fmt(best)})"


def sweep_facts(problem: Problem, sweep: dict, steps: tuple[int, ...]) -> str:
    """A few figures computed from the tables above (nothing here is typed in by hand)."""
    backprop = max(rel(sweep[s, "backprop", n].grads[g], sweep[s, "checkpoint", n].grads[g])
                   for s in SOLVERS for n in steps for g in problem.grad_names)
    lines = [f"- largest backprop distance to checkpoint, over every solver, step count and "
             f"gradient: {fmt(backprop)}"]
    for n in steps:
        fixed = {s: sweep[s, "checkpoint", n] for s in SOLVERS if s not in ("heun", "dopri5")}
        lines.append(f"- {n} steps = {n} NFE (euler, dpm2/3, ab2/3/4): lowest sample error "
                     f"{lowest(fixed, problem, 'sample')}, lowest ∂L/∂x_T error "
                     f"{lowest(fixed, problem, 'x_T')}")
    return join(heading("computed from the tables above", 3), "\n".join(lines))


def nfe_table(sweep: dict, steps: tuple[int, ...]) -> str:
    def cell(s, n):
        counts = [sweep[s, "checkpoint", n].nfe_fwd] + [sweep[s, m, n].nfe_bwd for m in MODES]
        return " / ".join(map(str, counts))

    return join(
        heading("NFE: forward / backward checkpoint / backward adjoint / backward backprop", 3),
        table(["solver"] + [f"{n} steps" for n in steps],
              [[s] + [cell(s, n) for n in steps] for s in SOLVERS]),
        "backprop differentiates the recorded graph and makes no model calls in backward. "
        f"dopri5: `steps` restart segments, adaptive inside each, rtol = atol = {DOPRI5_TOL:g}.")


def float32_section(problem64: Problem, steps: tuple[int, ...]) -> str:
    problem = PROBLEMS[problem64.name](torch.float32)
    problem.reference = problem64.reference
    rows = []
    for m in ("checkpoint", "adjoint"):
        outs = [run_sampler(problem, n, "dpm3", m) for n in steps]
        rows.append([m, "sample"] + [err(o, problem, "sample") for o in outs])
        rows += [[m, f"∂L/∂{g}"] + [err(o, problem, g) for o in outs] for g in problem.grad_names]
    return join(heading(f"{problem.name}: dpm3 in float32", 3),
                "Model, x_T and states in float32; errors against the float64 reference.",
                table(["mode", "quantity"] + [f"{n} steps" for n in steps], rows))


def grid_section(problem: Problem, steps: tuple[int, ...]) -> str:
    rows = []
    for s in GRID_SOLVERS:
        for g in GRIDS:
            outs = [run_sampler(problem, n, s, "checkpoint", grid=g) for n in steps]
            rows.append([s, g] + [f"{err(o, problem, 'sample')} / {err(o, problem, 'x_T')}"
                                  for o in outs])
    return join(heading(f"{problem.name}: grids (checkpoint mode)"),
                "Cells: sample error / ∂L/∂x_T error.",
                table(["solver", "grid"] + [f"{n} steps" for n in steps], rows))


def table1_methods() -> list[tuple[str, str, str, str, str]]:
    """(label, ode, method, grid, gradient) of each Table 1 row; ode ``ours`` is :func:`sample`."""
    rows = []
    for ode, eq, grids in (("original", "eq. 4", ("logsnr", "time")),
                           ("reparameterized", "eq. 10", ("logsnr",))):
        rows += [(f"{eq}, torchdiffeq {m}", ode, m, g, "odeint_adjoint")
                 for g in grids for m in ("euler", "midpoint", "rk4")]
    rows += [(f"eq. 10, sample(solver={s})", "ours", s, "logsnr", m)
             for s in ("euler", "ab4", "dpm3") for m in ("checkpoint", "adjoint")]
    return rows


def table1_steps(method: str, budget: int) -> int:
    """The most steps within ``budget`` model calls (rk4: 4 calls per step, midpoint: 2)."""
    per_step = {"midpoint": 2, "rk4": 4}.get(method, 1)
    return max(1, budget // per_step)


def table1_run(problem: Problem, method_row, budget: int):
    _, ode, method, grid, gradient = method_row
    steps = table1_steps(method, budget)
    if ode == "ours":
        return run_sampler(problem, steps, method, gradient, grid=grid)
    return run_torchdiffeq(problem, ode, method, steps, grid=grid)


def at(outs: dict, budget: int) -> dict:
    """Table 1 outcomes at one budget, keyed by a short row label."""
    return {f"{row[0]} [{row[3]}, {row[4]}]": o for (row, b), o in outs.items() if b == budget}


def table1_section(problem: Problem, budgets: tuple[int, ...]) -> str:
    methods = table1_methods()
    outs = {(row, b): table1_run(problem, row, b) for row in methods for b in budgets}
    err_rows, nfe_rows = [], []
    for row in methods:
        label, _, _, grid, gradient = row
        errors = [[err(outs[row, b], problem, "sample"), err(outs[row, b], problem, "x_T")]
                  for b in budgets]
        err_rows.append([label, grid, gradient] + sum(errors, []))
        nfe_rows.append([label, grid, gradient] + [nfe(outs[row, b]) for b in budgets])
    err_headers = ["method", "grid", "gradient"] + sum(
        ([f"sample @{b}", f"∂L/∂x_T @{b}"] for b in budgets), [])
    return join(
        heading(f"{problem.name}: paper Table 1 — original ODE (eq. 4) vs reparameterized (eq. 10)"),
        "Equal NFE budgets (@N = at most N forward model calls): steps = budget (euler, ab4, "
        "dpm3), budget // 2 (midpoint), budget // 4 (rk4). torchdiffeq rows: forward by the "
        "fixed-step method on the grid's nodes (eq. 4 in t, eq. 10 in ρ), gradient by "
        "odeint_adjoint with the same method on the same nodes backward (`sample_torchdiffeq` "
        "does not run this as is: torchdiffeq reuses the forward grid for the adjoint solve and "
        "fails an assertion, so this script hands the adjoint the same nodes reversed). "
        "`sample(solver=ab4)` is the paper's solver for eq. 10 (variable-step Adams–Bashforth 4 "
        "in ρ).",
        table(err_headers, err_rows),
        "\n".join(f"- budget {b}: lowest sample error {lowest(at(outs, b), problem, 'sample')}; "
                  f"lowest ∂L/∂x_T error {lowest(at(outs, b), problem, 'x_T')}" for b in budgets),
        heading("NFE forward / backward", 3),
        table(["method", "grid", "gradient"] + [f"budget {b}" for b in budgets], nfe_rows),
        failures_note(outs.values()),
        adaptive_section(problem))


def adaptive_section(problem: Problem) -> str:
    rows, outs = [], []
    for tol in (1e-3, 1e-5):
        for ode, eq in (("original", "eq. 4"), ("reparameterized", "eq. 10")):
            out = run_torchdiffeq(problem, ode, "dopri5", tol=tol)
            outs.append(out)
            rows.append([f"{eq}, torchdiffeq dopri5", f"{tol:g}", nfe(out),
                         err(out, problem, "sample"), err(out, problem, "x_T")])
    return join(heading("adaptive dopri5, gradient by odeint_adjoint", 3),
                table(["method", "rtol = atol", "NFE fwd / bwd", "sample", "∂L/∂x_T"], rows),
                failures_note(outs))


def guided_section(problem: Problem, steps: tuple[int, ...], scale: float = 3.0) -> str:
    """CFG on the mixture: cond = a fixed offset of the means, uncond = none; dopri8 reference."""
    torch.manual_seed(SEED + 2)
    cond = 0.5 * torch.randn(BATCH, DIM, dtype=torch.float64)
    uncond = torch.zeros_like(cond)
    guided = dict(guidance_scale=scale, uncond=uncond)
    ref = measure(problem, lambda model, x_T: sample_torchdiffeq(
        model, x_T, cond, schedule=problem.schedule, ode="reparameterized", method="dopri8",
        rtol=1e-11, atol=1e-11, grad_mode="adjoint", **guided))
    rows = []
    for solver in ("euler", "dpm3", "ab4", "heun"):
        for n in steps:
            outs = {mode: measure(problem, lambda model, x_T, mode=mode: sample(
                model, x_T, cond, schedule=problem.schedule, steps=n, solver=solver, grad_mode=mode,
                **guided)) for mode in ("checkpoint", "adjoint")}
            rows.append([solver, n, fmt(rel(outs["checkpoint"].x0, ref.x0)),
                         fmt(rel(outs["checkpoint"].grads["x_T"], ref.grads["x_T"])),
                         fmt(rel(outs["adjoint"].grads["x_T"], ref.grads["x_T"])),
                         fmt(rel(outs["adjoint"].grads["x_T"], outs["checkpoint"].grads["x_T"]))])
    return join(heading(f"{problem.name}: classifier-free guidance, scale {scale:g}"),
                "cond = a fixed random offset of the means (0.5·N(0, I)), uncond = no offset; "
                "reference: torchdiffeq dopri8 + odeint_adjoint at 1e-11 on the guided field. "
                "Guidance makes the flow strongly contracting, so re-solving it backward (the "
                "adjoint mode's reconstruction) amplifies errors: here the adjoint gradient does "
                "not converge, while checkpoint does. Use auto or checkpoint (exact) with guidance.",
                table(["solver", "steps", "sample", "∂L/∂x_T checkpoint", "∂L/∂x_T adjoint",
                       "adjoint vs checkpoint"], rows))


def header(settings: Settings) -> str:
    import torchdiffeq

    command = "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:])
    lines = [
        f"- command: `{command}` (from the repository root)",
        f"- date (UTC): {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M}",
        f"- torch {torch.__version__}, torchdiffeq {torchdiffeq.__version__}, "
        f"Python {platform.python_version()}, torch threads: {torch.get_num_threads()}, "
        f"git {_git_revision()}",
        f"- float64 except the float32 tables; seeds {SEED} (gaussian) and {SEED + 1} (mixture); "
        f"d = {DIM}, batch {BATCH}, x_T ~ N(0, I); `VPSchedule.linear()` (β 0.1…20, t from 1 "
        "to 1e-3)",
        "- loss L = sum(v · x_0), v ~ N(0, I) fixed; every error is relative L2 ||a − b|| / ||b||",
        f"- steps {', '.join(map(str, settings.steps))}; our dopri5: `steps` restart segments, "
        f"rtol = atol = {DOPRI5_TOL:g}; grid logsnr unless stated",
        "- gaussian: N(μ, 0.5² I), μ ~ N(0, I); reference `gaussian_solution` (closed form) "
        "differentiated by autograd; gradients w.r.t. x_T, `means`, `scales`",
        "- mixture: 4 components, means random directions of norm 4, scales 0.3/0.4/0.5/0.35, "
        f"uniform weights; reference torchdiffeq dopri8 on eq. 10, rtol = atol = {REF_TOL:g}, "
        "odeint_adjoint; gradient w.r.t. x_T",
        "- NFE counted by a wrapper around the model",
    ]
    return join(heading("Accuracy of samples and gradients", 1), "\n".join(lines))


def _git_revision() -> str:
    def git(*args):
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip()

    try:
        dirty = " (uncommitted changes)" if git("status", "--porcelain") else ""
        return git("rev-parse", "--short", "HEAD") + dirty
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def digits_adjoint_section(steps: tuple[int, ...] = (10, 20, 50), scales=(2.0, 3.0, 7.5)) -> str:
    """The adjoint under CFG on the embedded digits model (float64, dpm3, its default span and
    grid): distance to ``checkpoint`` of ∂L/∂x_T for the paper's adjoint (re-solved from y_N) and
    for ranked anchors at budgets of N/4, N/2 and N/2 + 3 states (dpm3's ranking holds 3 states
    until it can rate them), as relative L2 and through 8 directional derivatives ⟨∇, d⟩ on random
    d: ‖D(a − c)‖/‖Dc‖ over the 8, and the worst single one."""
    from adjointdpm_server.models import load_model

    backend = load_model("digits", dtype=torch.float64)
    labels = torch.arange(4)
    c = backend.encode(4, labels=labels)
    x_T = backend.noise(4, seed=0)
    g = torch.Generator().manual_seed(1)
    w = torch.randn(x_T.shape, generator=g, dtype=torch.float64)
    dirs = torch.randn(8, *x_T.shape, generator=g, dtype=torch.float64)
    state = x_T.numel() * x_T.element_size()
    order = 3  # dpm3

    def grad(mode, n, scale, states=None):
        x = x_T.clone().requires_grad_()
        x0 = sample(backend.eps_fn, x, c.cond, schedule=backend.schedule, steps=n, solver="dpm3",
                    grad_mode=mode, guidance_scale=scale, uncond=c.uncond, grid=backend.default_grid,
                    prediction=backend.prediction, memory_budget=None if states is None else states * state)
        return torch.autograd.grad((x0 * w).sum(), [x])[0]

    rows = []
    for scale in scales:
        for n in steps:
            ck = grad("checkpoint", n, scale)
            d_ck = (dirs * ck).flatten(1).sum(1)
            for label, states in (("y_N only (paper)", None), ("N/4", n // 4), ("N/2", n // 2),
                                  ("N/2 + 3", n // 2 + order)):
                a = grad("adjoint", n, scale, states)
                d_a = (dirs * a).flatten(1).sum(1)
                kept = 0 if states is None else max(0, states - order)
                rows.append([f"{scale:g}", n, label if states is None else f"{label} = {states}", kept,
                             fmt(rel(a, ck)), fmt(float((d_a - d_ck).norm() / d_ck.norm())),
                             fmt(float(((d_a - d_ck).abs() / d_ck.abs()).max()))])
    return join(heading("digits: the adjoint under classifier-free guidance"),
                "Embedded digits model in float64, dpm3 on its default span and grid, batch 4, "
                "L = Σ w·x_0; distance of the adjoint's ∂L/∂x_T to checkpoint's (the exact "
                "gradient of the sampler). Issue 13's goal at CFG 2: ≤ 5e-2 at 10 steps, ≤ 1e-2 at "
                "20, on directional derivatives. Budgets are in states; the adjoint keeps the "
                "states whose reversed step errs most (ranked anchors, docs/design.md §2.4.1), "
                "after the 3 that dpm3's ranking holds until it can rate them; the backward "
                "re-solve restarts at each kept state. Directions: ‖D(a − c)‖/‖Dc‖ over 8 random "
                "directions, and the worst single direction (a ratio whose denominator is "
                "sometimes small by chance).",
                table(["CFG", "steps", "budget (states)", "anchors kept", "rel L2",
                       "8 directions", "worst direction"], rows))


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------

def report(settings: Settings) -> str:
    problems = [with_reference(make()) for make in PROBLEMS.values()]
    sweeps = {p.name: solver_sweep(p, settings.steps) for p in problems}
    key_steps = tuple(n for n in settings.key_steps if n in settings.steps)
    parts = [header(settings), key_figures_section(problems, sweeps, key_steps),
             reference_section(problems)]
    for p in problems:
        parts += [solver_section(p, sweeps[p.name], settings.steps),
                  float32_section(p, settings.steps)]
    parts += [grid_section(p, settings.grid_steps) for p in problems]
    parts += [table1_section(p, settings.budgets) for p in problems]
    parts += [guided_section(problems[-1], settings.steps)]
    parts += [digits_adjoint_section()]
    return join(*parts) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fast subset (fewer step counts)")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"Markdown output (default: {RESULTS} for a full run; --quick writes "
                             "nothing unless given)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # tensors are tiny: extra threads only add contention
    text = report(QUICK if args.quick else Settings())
    print(text)
    out = args.out or (None if args.quick else RESULTS)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
