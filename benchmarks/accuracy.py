"""Accuracy of the samplers and of their gradients (no timing).

What is measured, in float64 unless a table says otherwise (VP linear schedule, t from 1 to 1e-3,
d = 64, batch 8, x_T ~ N(0, I), loss L = sum(v * x_0) with a fixed random v):

- *sample*: relative L2 error ||a − b|| / ||b|| of x_0 against a reference;
- *grad x_T*: the same for ∂L/∂x_T (and, on the Gaussian, ∂L/∂means and ∂L/∂scales, the
  ``nn.Parameter``s of :class:`GaussianMixture`);
- *distance to checkpoint*: relative L2 between a mode's gradient and the ``checkpoint`` gradient
  (the exact gradient of the discrete sampler);
- NFE: model calls, counted by a wrapper around the model, forward and backward separately.

Problems and references:

- ``gaussian``: data N(μ, 0.25 I), μ ~ N(0, I); reference = ``gaussian_solution`` (closed form),
  differentiated by autograd;
- ``mixture``: 4 isotropic components, means random directions of norm 4, scales
  0.3/0.4/0.5/0.35, uniform weights; reference = torchdiffeq ``dopri8`` on eq. 10 at
  rtol = atol = 1e-11 with ``odeint_adjoint``, checked against ``sample(solver="dpm3", steps=1000)``.

Tables: every solver × grad mode × steps on the log-SNR grid; grids (logsnr, time, karras);
float32 behaviour of dpm3; the paper's Table 1 comparison (eq. 4 vs eq. 10 through torchdiffeq
with ``odeint_adjoint`` vs our dpm3).

Run from the repository root::

    python benchmarks/accuracy.py            # full run, writes benchmarks/results/accuracy.md
    python benchmarks/accuracy.py --quick    # fast subset, printed only (unless --out is given)
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import math
import platform
import subprocess
import sys
from dataclasses import dataclass, field
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
STEPS = (5, 10, 20, 50, 100)
QUICK_STEPS = (5, 20)
MODES = ("checkpoint", "adjoint", "backprop")
GRID_SOLVERS = ("euler", "dpm3", "ab4")
GRID_STEPS = (10, 20, 50)
NFE_BUDGETS = (10, 20, 50)
DOPRI5_TOL = 1e-5
REF_TOL = 1e-11
RESULTS = Path(__file__).resolve().parent / "results" / "accuracy.md"


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
    """x_0, the gradients of L (by name) and the NFE of one forward + backward solve."""

    x0: torch.Tensor
    grads: dict[str, torch.Tensor]
    nfe_fwd: int
    nfe_bwd: int


@dataclass
class Problem:
    name: str
    schedule: VPSchedule
    model: CountingEps
    x_T: torch.Tensor
    v: torch.Tensor
    params: dict[str, nn.Parameter]  # model parameters whose gradient is measured
    reference: Outcome | None = None
    notes: list[str] = field(default_factory=list)


def gaussian_problem(dtype=torch.float64) -> Problem:
    """One Gaussian N(μ, 0.5² I); gradients measured w.r.t. x_T, means and scales."""
    torch.manual_seed(SEED)
    mean = torch.randn(1, DIM, dtype=torch.float64)
    x_T, v = _noise_and_cotangent()
    sch = VPSchedule.linear()
    model = GaussianMixture(sch, mean.to(dtype), 0.5)
    model.log_weights.requires_grad_(False)
    params = {"means": model.means, "scales": model.scales}
    return Problem("gaussian", sch, CountingEps(model), x_T.to(dtype), v.to(dtype), params)


def mixture_problem(dtype=torch.float64) -> Problem:
    """Four well-separated isotropic components; gradient measured w.r.t. x_T only."""
    torch.manual_seed(SEED + 1)
    directions = torch.randn(4, DIM, dtype=torch.float64)
    means = 4.0 * directions / directions.norm(dim=1, keepdim=True)
    x_T, v = _noise_and_cotangent()
    sch = VPSchedule.linear()
    model = GaussianMixture(sch, means.to(dtype), torch.tensor([0.3, 0.4, 0.5, 0.35], dtype=torch.float64).to(dtype))
    model.requires_grad_(False)
    return Problem("mixture", sch, CountingEps(model), x_T.to(dtype), v.to(dtype), {})


def _noise_and_cotangent():
    x_T = torch.randn(BATCH, DIM, dtype=torch.float64)
    v = torch.randn(BATCH, DIM, dtype=torch.float64)
    return x_T, v


# ---------------------------------------------------------------------------------------------
# Running one solve and measuring it
# ---------------------------------------------------------------------------------------------

def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 error ||a − b|| / ||b||, computed in float64."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def measure(problem: Problem, solve) -> Outcome:
    """Run ``solve(model, x_T) -> x_0``, then ∂L/∂(x_T, params) for L = sum(v · x_0)."""
    model = problem.model
    x_T = problem.x_T.clone().requires_grad_(True)
    start = model.calls
    x0 = solve(model, x_T)
    mid = model.calls
    names = ["x_T"] + list(problem.params)
    grads = torch.autograd.grad((problem.v * x0).sum(), [x_T] + list(problem.params.values()))
    return Outcome(x0.detach(), dict(zip(names, grads)), mid - start, model.calls - mid)


def run_sampler(problem: Problem, steps: int, solver: str, mode: str, grid: str = "logsnr"):
    """Our ``sample`` (dopri5: ``steps`` restart segments at rtol = atol = 1e-5)."""
    return measure(problem, lambda model, x_T: sample(
        model, x_T, schedule=problem.schedule, steps=steps, solver=solver, grad_mode=mode,
        grid=grid, rtol=DOPRI5_TOL, atol=DOPRI5_TOL))


def run_torchdiffeq(problem: Problem, ode: str, method: str, steps: int | None = None,
                    tol: float = 1e-5, grid: str = "logsnr"):
    """``sample_torchdiffeq`` with ``odeint_adjoint`` (the paper's baseline)."""
    with _fixed_grid_adjoint_workaround():
        return measure(problem, lambda model, x_T: sample_torchdiffeq(
            model, x_T, schedule=problem.schedule, ode=ode, method=method, steps=steps,
            grid=grid, rtol=tol, atol=tol, grad_mode="adjoint"))


@contextlib.contextmanager
def _fixed_grid_adjoint_workaround():
    """Let ``odeint_adjoint`` run fixed-grid methods backward.

    ``sample_torchdiffeq`` passes the forward grid as ``options=grid_constructor``; torchdiffeq
    reuses it for the adjoint solve, which runs the span in the opposite direction, and fails its
    ``time_grid[0] == t[0]`` assertion. While active, the adjoint gets the same nodes, reversed
    and/or negated to fit the span torchdiffeq asks for (it negates decreasing spans), so the
    adjoint ODE is integrated by the same method on the same nodes, as intended.
    Inactive when the caller passes ``adjoint_options`` itself.
    """
    import torchdiffeq

    original = torchdiffeq.odeint_adjoint

    def patched(func, y0, t, *, options=None, adjoint_options=None, **kwargs):
        if adjoint_options is None and options and "grid_constructor" in options:
            forward_grid = options["grid_constructor"]

            def either_direction(f, y, span):
                pts = forward_grid(f, y, span)
                for cand in (pts, pts.flip(0), -pts, -pts.flip(0)):
                    if bool(cand[0] == span[0]) and bool(cand[-1] == span[-1]):
                        return cand
                raise AssertionError(f"grid {pts[[0, -1]]} does not fit span {span}")

            adjoint_options = dict(options, grid_constructor=either_direction)
        return original(func, y0, t, options=options, adjoint_options=adjoint_options, **kwargs)

    torchdiffeq.odeint_adjoint = patched
    try:
        yield
    finally:
        torchdiffeq.odeint_adjoint = original


# ---------------------------------------------------------------------------------------------
# References
# ---------------------------------------------------------------------------------------------

def gaussian_reference(problem: Problem) -> Outcome:
    """The closed-form x_0 of the probability-flow ODE, differentiated by autograd."""
    gm = problem.model.inner

    def solve(model, x_T):
        return gaussian_solution(problem.schedule, x_T, gm.means[0], gm.scales[0])

    return measure(problem, solve)


def dopri8_reference(problem: Problem) -> Outcome:
    """torchdiffeq dopri8 on eq. 10 at rtol = atol = 1e-11, gradient by ``odeint_adjoint``."""
    return measure(problem, lambda model, x_T: sample_torchdiffeq(
        model, x_T, schedule=problem.schedule, ode="reparameterized", method="dopri8",
        rtol=REF_TOL, atol=REF_TOL, grad_mode="adjoint"))


def reference_checks(problem: Problem, dopri8: Outcome) -> list[list[str]]:
    """Rows comparing the dopri8 solve (and dpm3 at 1000 steps) with the problem's reference."""
    dpm3 = run_sampler(problem, 1000, "dpm3", "checkpoint")
    ref = problem.reference
    rows = []
    for label, out in (("torchdiffeq dopri8, rtol=atol=1e-11, odeint_adjoint", dopri8),
                       ("sample(solver=dpm3, steps=1000, checkpoint)", dpm3)):
        if out is ref:
            continue
        rows.append([problem.name, label, fmt(rel(out.x0, ref.x0)),
                     fmt(rel(out.grads["x_T"], ref.grads["x_T"])), f"{out.nfe_fwd} / {out.nfe_bwd}"])
    return rows


# ---------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------

def fmt(x: float) -> str:
    if x == 0.0:
        return "0"
    if not math.isfinite(x):
        return str(x)
    return f"{x:.1e}"


def table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def heading(text: str, level: int = 2) -> str:
    return "#" * level + " " + text


# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------

def solver_sweep(problem: Problem, steps: tuple[int, ...]) -> dict:
    """Every solver × mode × steps on the log-SNR grid: {(solver, mode, n): Outcome}."""
    return {(s, m, n): run_sampler(problem, n, s, m)
            for s in SOLVERS for m in MODES for n in steps}


def solver_section(problem: Problem, steps: tuple[int, ...]) -> str:
    sweep = solver_sweep(problem, steps)
    ref = problem.reference
    cols = [f"{n} steps" for n in steps]
    parts = [heading(f"{problem.name}: solvers × grad modes (grid logsnr)")]

    sample_rows = [[s] + [fmt(rel(sweep[s, "checkpoint", n].x0, ref.x0)) for n in steps]
                   for s in SOLVERS]
    same_forward = all(bool(torch.equal(sweep[s, m, n].x0, sweep[s, "checkpoint", n].x0))
                       for s in SOLVERS for m in MODES for n in steps)
    parts += [heading("sample error (x_0 vs reference)", 3),
              table(["solver"] + cols, sample_rows),
              f"The forward pass is bitwise identical in every grad mode: {same_forward}."]

    for name in ["x_T"] + list(problem.params):
        rows = [[s, m] + [fmt(rel(sweep[s, m, n].grads[name], ref.grads[name])) for n in steps]
                for s in SOLVERS for m in MODES]
        parts += [heading(f"gradient error: ∂L/∂{name} vs reference", 3),
                  table(["solver", "mode"] + cols, rows)]

    for name in ["x_T"] + list(problem.params):
        rows = [[s, m] + [fmt(rel(sweep[s, m, n].grads[name], sweep[s, "checkpoint", n].grads[name]))
                          for n in steps]
                for s in SOLVERS for m in ("adjoint", "backprop")]
        parts += [heading(f"distance to checkpoint: ∂L/∂{name}", 3),
                  table(["solver", "mode"] + cols, rows)]

    nfe_rows = [[s] + [" / ".join(str(v) for v in (sweep[s, "checkpoint", n].nfe_fwd,
                                                     sweep[s, "checkpoint", n].nfe_bwd,
                                                     sweep[s, "adjoint", n].nfe_bwd,
                                                     sweep[s, "backprop", n].nfe_bwd))
                       for n in steps] for s in SOLVERS]
    parts += [heading("NFE: forward / backward (checkpoint) / backward (adjoint) / "
                      "backward (backprop)", 3),
              table(["solver"] + cols, nfe_rows),
              "backprop differentiates the recorded graph and calls the model 0 times in backward. "
              f"dopri5: `steps` restart segments, adaptive inside, rtol = atol = {DOPRI5_TOL:g}."]
    return "\n\n".join(parts)


def grid_section(problem: Problem, steps: tuple[int, ...]) -> str:
    ref = problem.reference
    rows = []
    for s in GRID_SOLVERS:
        for g in ("logsnr", "time", "karras"):
            outs = [run_sampler(problem, n, s, "checkpoint", grid=g) for n in steps]
            rows.append([s, g] + [f"{fmt(rel(o.x0, ref.x0))} / {fmt(rel(o.grads['x_T'], ref.grads['x_T']))}"
                                  for o in outs])
    return "\n\n".join([heading(f"{problem.name}: grids (checkpoint mode)"),
                        "Cells: sample error / ∂L/∂x_T error.",
                        table(["solver", "grid"] + [f"{n} steps" for n in steps], rows)])


def float32_section(problem64: Problem, steps: tuple[int, ...]) -> str:
    problem = mixture_problem(torch.float32) if problem64.name == "mixture" else gaussian_problem(
        torch.float32)
    ref = problem64.reference
    rows = []
    for m in ("checkpoint", "adjoint"):
        outs = [run_sampler(problem, n, "dpm3", m) for n in steps]
        rows.append([m, "sample"] + [fmt(rel(o.x0, ref.x0)) for o in outs])
        rows.append([m, "∂L/∂x_T"] + [fmt(rel(o.grads["x_T"], ref.grads["x_T"])) for o in outs])
    return "\n\n".join([heading(f"{problem.name}: dpm3 in float32", 3),
                        "Model, x_T and states in float32; errors against the float64 reference.",
                        table(["mode", "quantity"] + [f"{n} steps" for n in steps], rows)])


def table1_configs(budget: int) -> list[tuple[str, str, str, int]]:
    """(label, ode, method, steps) of the torchdiffeq fixed-step baselines for an NFE budget."""
    configs = []
    for ode, eq in (("original", "eq. 4"), ("reparameterized", "eq. 10")):
        configs += [(f"{eq}, torchdiffeq euler", ode, "euler", budget),
                    (f"{eq}, torchdiffeq midpoint", ode, "midpoint", budget // 2),
                    (f"{eq}, torchdiffeq rk4", ode, "rk4", max(1, round(budget / 4)))]
    return configs


def table1_rows(problem: Problem, budget: int) -> list[list[str]]:
    ref = problem.reference

    def row(label, grad, out):
        return [label, grad, str(budget), f"{out.nfe_fwd} / {out.nfe_bwd}",
                fmt(rel(out.x0, ref.x0)), fmt(rel(out.grads["x_T"], ref.grads["x_T"]))]

    rows = [row(label, "odeint_adjoint", run_torchdiffeq(problem, ode, method, steps))
            for label, ode, method, steps in table1_configs(budget)]
    for solver in ("euler", "dpm3"):
        for mode in ("checkpoint", "adjoint"):
            rows.append(row(f"eq. 10, sample(solver={solver})", mode,
                            run_sampler(problem, budget, solver, mode)))
    return rows


def adaptive_rows(problem: Problem) -> list[list[str]]:
    ref = problem.reference
    rows = []
    for tol in (1e-3, 1e-5):
        for ode, eq in (("original", "eq. 4"), ("reparameterized", "eq. 10")):
            out = run_torchdiffeq(problem, ode, "dopri5", tol=tol)
            rows.append([f"{eq}, torchdiffeq dopri5", f"{tol:g}", f"{out.nfe_fwd} / {out.nfe_bwd}",
                         fmt(rel(out.x0, ref.x0)), fmt(rel(out.grads["x_T"], ref.grads["x_T"]))])
    return rows


def table1_section(problem: Problem, budgets: tuple[int, ...]) -> str:
    rows = [r for b in budgets for r in table1_rows(problem, b)]
    headers = ["method", "gradient", "NFE budget", "NFE fwd / bwd", "sample", "∂L/∂x_T"]
    return "\n\n".join([
        heading(f"{problem.name}: paper Table 1 — original ODE vs reparameterized vs dpm3"),
        "Fixed-step torchdiffeq methods on the log-SNR nodes (eq. 4 in t, eq. 10 in ρ); "
        "steps = budget (euler), budget/2 (midpoint), round(budget/4) (rk4). Errors are relative "
        "L2 against the reference.",
        table(headers, rows),
        heading("adaptive dopri5 (torchdiffeq odeint_adjoint)", 3),
        table(["method", "rtol = atol", "NFE fwd / bwd", "sample", "∂L/∂x_T"], adaptive_rows(problem)),
    ])


def summary_section(problems: list[Problem], steps: tuple[int, ...]) -> str:
    """Key figures, pulled from the tables (dpm3 and euler, every mode)."""
    picks = [n for n in (20, 50) if n in steps] or list(steps[-1:])
    rows = []
    for p in problems:
        for s in ("euler", "dpm3"):
            for n in picks:
                ck = run_sampler(p, n, s, "checkpoint")
                row = [p.name, s, str(n), fmt(rel(ck.x0, p.reference.x0))]
                for m in MODES:
                    out = ck if m == "checkpoint" else run_sampler(p, n, s, m)
                    row.append(fmt(rel(out.grads["x_T"], p.reference.grads["x_T"])))
                adj = run_sampler(p, n, s, "adjoint")
                row.append(fmt(rel(adj.grads["x_T"], ck.grads["x_T"])))
                rows.append(row)
    headers = ["problem", "solver", "steps", "sample", "∂L/∂x_T checkpoint", "∂L/∂x_T adjoint",
               "∂L/∂x_T backprop", "adjoint vs checkpoint"]
    return "\n\n".join([heading("Key figures (float64, grid logsnr)"), table(headers, rows)])


def header(args, steps) -> str:
    import torchdiffeq

    command = "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:])
    settings = [
        f"- command: `{command}`",
        f"- date (UTC): {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M}",
        f"- torch {torch.__version__}, torchdiffeq {torchdiffeq.__version__}, "
        f"Python {platform.python_version()}, {torch.get_num_threads()} torch threads, "
        f"git {_git_revision()}",
        f"- float64 throughout except the float32 tables; seed {SEED}; d = {DIM}, batch {BATCH}, "
        "x_T ~ N(0, I); `VPSchedule.linear()` (β 0.1…20, t from 1 to 1e-3)",
        "- loss L = sum(v · x_0), v ~ N(0, I) fixed; errors are relative L2 ||a − b|| / ||b||",
        f"- steps {', '.join(map(str, steps))}; dopri5 (ours): `steps` restart segments, "
        f"rtol = atol = {DOPRI5_TOL:g}",
        "- gaussian: N(μ, 0.5² I), μ ~ N(0, I); reference = `gaussian_solution` (closed form) + "
        "autograd",
        "- mixture: 4 components, means random directions of norm 4, scales 0.3/0.4/0.5/0.35, "
        f"uniform weights; reference = torchdiffeq dopri8 on eq. 10, rtol = atol = {REF_TOL:g}, "
        "odeint_adjoint",
    ]
    return "\n".join([heading("Accuracy of samples and gradients", 1), "\n".join(settings)])


def _git_revision() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, cwd=Path(__file__).parent, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True,
                               cwd=Path(__file__).parent, check=True).stdout.strip()
        return rev + (" (uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def reference_section(problems: list[Problem], rows: list[list[str]]) -> str:
    return "\n\n".join([
        heading("References"),
        "How far the reference of each problem is from independent high-accuracy solves "
        "(for the mixture, dopri8 *is* the reference and dpm3 at 1000 steps checks it; for the "
        "Gaussian, both are checked against the closed form).",
        table(["problem", "solve", "sample", "∂L/∂x_T", "NFE fwd / bwd"], rows),
    ])


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------

def build_problems() -> tuple[list[Problem], list[list[str]]]:
    """Both problems with their references, and the reference-check rows."""
    gauss, mix = gaussian_problem(), mixture_problem()
    gauss.reference = gaussian_reference(gauss)
    mix.reference = dopri8_reference(mix)
    checks = reference_checks(gauss, dopri8_reference(gauss)) + reference_checks(mix, mix.reference)
    return [gauss, mix], checks


def report(args) -> str:
    steps = QUICK_STEPS if args.quick else STEPS
    grid_steps = (20,) if args.quick else GRID_STEPS
    budgets = (20,) if args.quick else NFE_BUDGETS
    problems, checks = build_problems()
    parts = [header(args, steps), summary_section(problems, steps), reference_section(problems, checks)]
    for p in problems:
        parts.append(solver_section(p, steps))
        parts.append(float32_section(p, steps))
    for p in problems:
        parts.append(grid_section(p, grid_steps))
    for p in problems:
        parts.append(table1_section(p, budgets))
    return "\n\n".join(parts) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fast subset (steps 5 and 20)")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"Markdown output (default {RESULTS} for a full run; "
                             "--quick writes nothing unless given)")
    args = parser.parse_args(argv)
    text = report(args)
    print(text)
    out = args.out or (None if args.quick else RESULTS)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
