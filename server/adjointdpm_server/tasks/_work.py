"""A request's total work, bounded before it starts (docs/design.md §6).

Every task estimates the network calls it will make from the request alone — steps, solver,
grad mode, iterations, guidance nodes × inner steps × gradient steps, validation runs — and
refuses one over ``Limits.max_network_calls`` (``--max-network-calls``) with INVALID_ARGUMENT
naming the product, before its first network call and before any copy of the model. The
per-factor limits (``max_steps``, ``max_iterations``, …) bound each factor; this bounds their
product, which guided sampling otherwise takes to ~10⁷ calls.

Calls are counted as ``nfe`` counts them (progress events, ``GradientResult.nfe``): one per
evaluation of the guided field, whose CFG halves share one call. The estimate is an upper bound
of that count for every solver but the adaptive ``dopri5`` (a nominal figure there): a
gradient's backward costs one call a step in every grad mode — ``auto`` and ``backprop`` spend
it as the backward of a kept graph, which ``nfe`` does not count, ``checkpoint`` as a VJP call
(exact) — and the ``adjoint`` re-solve adds ε̃(y_N) (multistep) or a reversed step a step
(one-step solvers). tests/service/test_work_bound.py holds it to real runs' ``nfe``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import InvalidArgument

__all__ = ["Work", "solve_calls", "check_work", "sample_work", "gradient_work",
           "optimize_latent_work", "guided_work", "finetune_work", "embedding_work"]

CALLS_PER_STEP = {"heun": 2}         # one-step solvers' calls a step (multistep: 1)
ONE_STEP = ("heun", "dopri5")
DOPRI5_PER_STEP, DOPRI5_MIN = 32, 640  # adaptive: ~19-30 a step measured at rtol 1e-5, ≥ ~350-580 a solve


def solve_calls(steps: int, solver: str, grad_mode: str = "none") -> int:
    """Network calls of one ``sample`` over ``steps`` steps, its gradient's backward included
    unless ``grad_mode`` is ``none``."""
    if solver == "dopri5":
        forward = max(DOPRI5_MIN, DOPRI5_PER_STEP * steps)
    else:
        forward = CALLS_PER_STEP.get(solver, 1) * steps
    if grad_mode == "none":
        return forward
    if grad_mode == "adjoint":
        # one-step: the backward re-solves each step (reversed) and recomputes it with grad;
        # multistep: one VJP call a step, its ε reused by the re-solve, and ε̃(y_N)
        return 3 * forward if solver in ONE_STEP else 2 * forward + 1
    return 2 * forward  # checkpoint, auto, backprop


@dataclass
class Work:
    """A request's network calls and how they were counted (the refusal's explanation)."""

    calls: int = 0
    parts: list[str] = field(default_factory=list)

    def add(self, calls: int, how: str) -> "Work":
        self.calls += calls
        self.parts.append(f"{how} = {calls:,}")
        return self


def _solve(steps: int, solver: str, grad_mode: str, name: str = "steps") -> str:
    """One solve, as the refusal spells it: ``steps 50 → 100 calls (forward + backward, auto, dpm3)``."""
    what = "sampling" if grad_mode == "none" else f"forward + backward, {grad_mode}"
    return f"{name} {steps} → {solve_calls(steps, solver, grad_mode):,} calls ({what}, {solver})"


def check_work(limits, work: Work) -> None:
    """INVALID_ARGUMENT when ``work`` exceeds the server's ``max_network_calls`` (0: no bound)."""
    bound = limits.max_network_calls
    if bound and work.calls > bound:
        raise InvalidArgument(
            f"this request needs about {work.calls:,} network calls ({'; '.join(work.parts)}); "
            f"the server's limit is {bound:,} (--max-network-calls): ask for fewer iterations, "
            "steps, inner steps or gradient steps")


def sample_work(steps: int, solver: str) -> Work:
    return Work().add(solve_calls(steps, solver), _solve(steps, solver, "none"))


def gradient_work(steps: int, solver: str, grad_mode: str) -> Work:
    return Work().add(solve_calls(steps, solver, grad_mode), _solve(steps, solver, grad_mode))


def _iterations(work: Work, iterations: int, steps: int, solver: str, grad_mode: str) -> Work:
    return work.add(iterations * solve_calls(steps, solver, grad_mode),
                    f"iterations {iterations} × {_solve(steps, solver, grad_mode)}")


def optimize_latent_work(steps: int, solver: str, grad_mode: str, iterations: int) -> Work:
    """The starting sample, the iterations, the last iterate's sample."""
    work = _iterations(Work(), iterations, steps, solver, grad_mode)
    return work.add(2 * solve_calls(steps, solver), f"2 × {_solve(steps, solver, 'none')}")


def embedding_work(steps: int, solver: str, grad_mode: str, iterations: int) -> Work:
    """The starting sample, the iterations, the result's sample."""
    return optimize_latent_work(steps, solver, grad_mode, iterations)


def guided_work(steps: int, solver: str, grad_mode: str, every: int, inner: int,
                grad_steps: int) -> Work:
    """At each of ⌈steps / every⌉ nodes, ``inner`` gradients through ``grad_steps`` steps (0:
    the rest of the grid from that node); the unguided start and the guided sampling itself."""
    nodes = range(0, steps, every)
    if grad_steps:
        work = Work().add(len(nodes) * inner * solve_calls(grad_steps, solver, grad_mode),
                          f"nodes {len(nodes)} (steps {steps} / every {every}) × inner steps "
                          f"{inner} × {_solve(grad_steps, solver, grad_mode, 'grad steps')}")
    else:  # each node's gradient runs through the rest of the grid
        total = sum(solve_calls(steps - i, solver, grad_mode) for i in nodes)
        work = Work().add(inner * total, f"inner steps {inner} × gradients through the remaining "
                                         f"steps from each of {len(nodes)} nodes (steps {steps} / "
                                         f"every {every}: {total:,} calls, forward + backward, "
                                         f"{grad_mode}, {solver})")
    segments = sum(solve_calls(min(i + every, steps) - i, solver) for i in nodes)
    return work.add(solve_calls(steps, solver) + segments, f"2 × {_solve(steps, solver, 'none')}")


def finetune_work(steps: int, solver: str, grad_mode: str, iterations: int, validate_every: int,
                  validation: bool, *, passes: int = 1, references: bool = False) -> Work:
    """The base model's reference sample, the iterations, the result's sample; with held-out
    examples their base sample and one sampling every ``validate_every`` iterations and at the end.
    ``passes``: sampler passes an iteration (its micro-batches); ``references``: each pass also
    samples the base model first (a prompt set's drawn batch, for losses that read a reference)."""
    if passes == 1:
        work = _iterations(Work(), iterations, steps, solver, grad_mode)
    else:
        work = Work().add(iterations * passes * solve_calls(steps, solver, grad_mode),
                          f"iterations {iterations} × passes {passes} × "
                          f"{_solve(steps, solver, grad_mode)}")
    once = solve_calls(steps, solver)
    if references:
        work.add(iterations * passes * once, f"references {iterations * passes} × "
                                             f"{_solve(steps, solver, 'none')}")
    work.add(2 * once, f"2 × {_solve(steps, solver, 'none')}")
    if validation:
        runs = -(-iterations // validate_every) + 1
        work.add(runs * once, f"validation {runs} × {_solve(steps, solver, 'none')}")
    return work
