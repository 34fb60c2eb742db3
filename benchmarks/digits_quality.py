"""Quality of the embedded `digits` and `digits-flow` models: class accuracy and FD-digits.

- *class accuracy*: the digits classifier's verdict on samples of each requested class, at 20
  steps of dpm3 on the model's declared grid, without guidance and with CFG 1.5, 2, 3;
- *FD-digits*: Fréchet distance between the classifier's 128-d penultimate features of generated
  samples (``--per-class`` per class, CFG 2) and of the 297 held-out real digits. The classifier
  is trained on real digits only, independently of both generators. The FD of the 1500 training
  digits to the same held-out set is the floor.
- per solver and steps (5/10/20/50) for each model, with diffusers' own schedulers as peers on
  the same network, noise and labels, loaded as a user would load them (``from_pretrained`` of
  the model's ``scheduler/`` config, which for `digits` means "leading" timestep spacing);
- ``--spans``: where `digits` should start sampling (its schedule's noise end), dpm3 at
  5/10/20 steps from several t (the choice behind ``models/_digits.py``'s default span).

    .venv/bin/python benchmarks/digits_quality.py     # ~25 min on 2 cores; writes results/digits_quality.md
"""

from __future__ import annotations

import argparse
import datetime
from pathlib import Path

import numpy as np
import torch
from scipy import linalg

from adjointdpm_server.core import VPSchedule, sample
from adjointdpm_server.models import load_model
from adjointdpm_server.models._digits import DIGITS_FLOW_WEIGHTS, DIGITS_WEIGHTS, _sampling_span
from adjointdpm_server.models._digits_data import load_digits_split

RESULTS = Path(__file__).resolve().parent / "results" / "digits_quality.md"
VP_PEERS = ("DDIMScheduler", "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler",
            "EulerDiscreteScheduler", "UniPCMultistepScheduler", "DEISMultistepScheduler", "PNDMScheduler")
FLOW_PEERS = ("FlowMatchEulerDiscreteScheduler",)


def generate(backend, labels: torch.Tensor, *, steps: int, solver: str, guidance, seed: int, schedule=None,
             grid: str | None = None):
    c = backend.encode(len(labels), labels=labels)
    x_T = backend.noise(len(labels), seed=seed)
    with torch.no_grad():
        x0 = sample(backend.eps_fn, x_T, c.cond, schedule=schedule or backend.schedule, steps=steps,
                    solver=solver, guidance_scale=guidance, uncond=c.uncond, grad_mode="none",
                    prediction=backend.prediction, grid=grid or backend.default_grid)
    return backend.decode(x0)


def generate_diffusers_peer(backend, path: Path, name: str, labels: torch.Tensor, *, steps: int,
                            guidance: float, seed: int):
    """diffusers' sampling loop with scheduler ``name`` on the same network, noise and labels;
    the network is called on the scheduler's own timestep (``1000·σ`` for a flow model)."""
    import diffusers

    sched = getattr(diffusers, name).from_pretrained(path / "scheduler", local_files_only=True)
    sched.set_timesteps(steps)
    c = backend.encode(len(labels), labels=labels)
    x = backend.noise(len(labels), seed=seed) * getattr(sched, "init_noise_sigma", 1.0)  # flow: none
    unet = backend.eps_fn.unet
    with torch.no_grad():
        for t in sched.timesteps:
            inp = sched.scale_model_input(x, t) if hasattr(sched, "scale_model_input") else x
            both = unet(torch.cat([inp, inp]), t.expand(2 * len(labels)),
                        class_labels=torch.cat([c.cond, c.uncond])).sample
            out_c, out_u = both.chunk(2)
            x = sched.step(out_u + guidance * (out_c - out_u), t, x).prev_sample
    return backend.decode(x)


def features(backend, images: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return backend.classifier.features(images * 2.0 - 1.0).double().numpy()


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(cov_a @ cov_b).real
    return float(np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a + cov_b - 2.0 * root))


def class_accuracy(backend, images: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return float((backend.classify(images).argmax(1) == labels).float().mean())


def model_section(spec: str, labels, real, steps_list, lines, *, spans=(), grids=("logsnr",),
                  span_solvers=("dpm3",), only_spans: bool = False):
    backend = load_model(spec)
    fd = lambda images: f"{frechet_distance(features(backend, images), real):.2f}"
    path = DIGITS_FLOW_WEIGHTS if spec == "digits-flow" else DIGITS_WEIGHTS
    sch = backend.schedule
    lines += ["", f"## `{spec}`", "",
              f"Path: `{sch!r}`; the network predicts `{backend.prediction}`; default grid "
              f"`{backend.default_grid}`, from t = {sch.t_max:g} to t = {sch.t_min:g}.", "",
              "### Class accuracy (dpm3, 20 steps)", "", "| guidance | accuracy |", "|---|---:|"]
    for guidance in (() if only_spans else (None, 1.5, 2.0, 3.0)):
        images = generate(backend, labels, steps=20, solver="dpm3", guidance=guidance, seed=0)
        lines.append(f"| {'none (conditional model)' if guidance is None else guidance} | "
                     f"{class_accuracy(backend, images, labels):.4f} |")
        print(lines[-1], flush=True)
    head = "| sampler | " + " | ".join(f"{s} steps" for s in steps_list) + " |"
    lines += ["", "### FD-digits (CFG 2; lower is better)", "", head,
              "|---|" + "---:|" * len(steps_list)]
    solvers = () if only_spans else ("euler", "dpm2", "dpm3", "dpmpp2", "dpmpp3", "ab4", "heun")
    for solver in solvers:
        row = [fd(generate(backend, labels, steps=s, solver=solver, guidance=2.0, seed=0)) for s in steps_list]
        lines.append(f"| {solver}{' (default)' if solver == 'dpm3' else ''}"
                     f"{' (2 NFE per step)' if solver == 'heun' else ''} | " + " | ".join(row) + " |")
        print(lines[-1], flush=True)
    for peer in (() if only_spans else FLOW_PEERS if spec == "digits-flow" else VP_PEERS):
        row = [fd(generate_diffusers_peer(backend, path, peer, labels, steps=s, guidance=2.0, seed=0))
               for s in steps_list]
        lines.append(f"| diffusers {peer} | " + " | ".join(row) + " |")
        print(lines[-1], flush=True)
    if spans:
        from diffusers import DDPMScheduler

        alphas_cumprod = DDPMScheduler.from_pretrained(path / "scheduler", local_files_only=True).alphas_cumprod
        lines += ["", "### Where sampling starts (from pure noise at t_start, CFG 2)", "",
                  "| solver | t_start | grid | " + " | ".join(f"{s} steps" for s in steps_list) + " |",
                  "|---|---|---|" + "---:|" * len(steps_list)]
        for solver in span_solvers:
            for t_max in spans:
                for grid in grids:
                    row = [fd(generate(backend, labels, steps=s, solver=solver, guidance=2.0, seed=0,
                                       schedule=VPSchedule.from_alphas_cumprod(_sampling_span(alphas_cumprod, t_max)),
                                       grid=grid)) for s in steps_list]
                    mark = (" (default)" if (solver, t_max, grid) == ("dpm3", int(sch.t_max), backend.default_grid)
                            else "")
                    lines.append(f"| {solver} | {t_max}{mark} | {grid} | " + " | ".join(row) + " |")
                    print(lines[-1], flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--models", default="digits,digits-flow")
    parser.add_argument("--steps", default="5,10,20,50")
    parser.add_argument("--spans", default="994,950,900,850,800", help="t_start values for `digits` ('' = none)")
    parser.add_argument("--span-grids", default="logsnr,time", help="grids tried at each t_start")
    parser.add_argument("--span-solvers", default="dpm3", help="solvers tried at each t_start")
    parser.add_argument("--only-spans", action="store_true", help="skip the accuracy and solver tables")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.manual_seed(0)
    steps_list = [int(s) for s in args.steps.split(",")]
    labels = torch.arange(10).repeat_interleave(args.per_class)
    data = load_digits_split()
    ref = load_model("digits")
    real = features(ref, (data["test_x"] + 1) / 2)
    floor = frechet_distance(features(ref, (data["train_x"] + 1) / 2), real)
    lines = [
        "# Quality of the embedded `digits` and `digits-flow` models",
        "",
        f"- command: `python benchmarks/digits_quality.py --per-class {args.per_class} --models {args.models} "
        f"--steps {args.steps} --spans '{args.spans}' --span-grids {args.span_grids} "
        f"--span-solvers {args.span_solvers}{' --only-spans' if args.only_spans else ''}`",
        f"- date (UTC): {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M}; torch {torch.__version__}",
        f"- {len(labels)} samples ({args.per_class} per class), the same seeded x_T for every sampler; "
        f"classifier held-out accuracy on real digits: "
        f"{class_accuracy(ref, (data['test_x'] + 1) / 2, data['test_y']):.4f}",
        f"- FD-digits floor (the training digits against the held-out ones): {floor:.2f}",
        "- steps, not NFE: with CFG each network call is a batch of two; heun makes 2 calls a step,",
        "  every other sampler 1.",
    ]
    for spec in args.models.split(","):
        spans = [int(s) for s in args.spans.split(",") if s] if spec == "digits" else ()
        model_section(spec, labels, real, steps_list, lines, spans=spans, grids=args.span_grids.split(","),
                      span_solvers=args.span_solvers.split(","), only_spans=args.only_spans)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
