"""Quality of the embedded `digits` model: class accuracy and FD-digits per solver and NFE.

- *class accuracy*: the digits classifier's verdict on samples of each requested class, at 20
  steps of dpm3, without guidance (conditional ε only) and with CFG scales 1.5, 2, 3;
- *FD-digits*: Fréchet distance between the classifier's 128-d penultimate features of generated
  samples (100 per class, CFG 2) and of the 297 held-out real digits, for euler, dpm3 and ab4
  at NFE 10/20/50, with diffusers' ``DPMSolverMultistepScheduler`` (2nd order, the usual default)
  as a peer; the FD of the 1500 training digits to the same held-out set is the floor.

    .venv/bin/python benchmarks/digits_quality.py     # ~5 min on 2 cores; writes results/digits_quality.md
"""

from __future__ import annotations

import argparse
import datetime
from pathlib import Path

import numpy as np
import torch
from scipy import linalg

from adjointdpm_server.core import sample
from adjointdpm_server.models import load_model
from adjointdpm_server.models._digits_data import load_digits_split

RESULTS = Path(__file__).resolve().parent / "results" / "digits_quality.md"


def generate(backend, labels: torch.Tensor, *, steps: int, solver: str, guidance, seed: int):
    c = backend.encode(len(labels), labels=labels)
    x_T = backend.noise(len(labels), seed=seed)
    with torch.no_grad():
        x0 = sample(backend.eps_fn, x_T, c.cond, schedule=backend.schedule, steps=steps, solver=solver,
                    guidance_scale=guidance, uncond=c.uncond, grad_mode="none")
    return backend.decode(x0)


def generate_diffusers_peer(backend, labels: torch.Tensor, *, steps: int, guidance: float, seed: int):
    """diffusers' DPM-Solver++(2M) loop on the same UNet, schedule and noise."""
    from diffusers import DPMSolverMultistepScheduler

    from adjointdpm_server.models._digits import DIGITS_WEIGHTS

    sched = DPMSolverMultistepScheduler.from_pretrained(DIGITS_WEIGHTS / "scheduler", local_files_only=True)
    sched.set_timesteps(steps)
    c = backend.encode(len(labels), labels=labels)
    x = backend.noise(len(labels), seed=seed)
    with torch.no_grad():
        for t in sched.timesteps:
            both = backend.eps(torch.cat([x, x]), t.expand(2 * len(labels)), torch.cat([c.cond, c.uncond]))
            eps_c, eps_u = both.chunk(2)
            x = sched.step(eps_u + guidance * (eps_c - eps_u), t, x).prev_sample
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.manual_seed(0)
    backend = load_model("digits")
    labels = torch.arange(10).repeat_interleave(args.per_class)
    data = load_digits_split()
    real = features(backend, (data["test_x"] + 1) / 2)
    lines = [
        "# Quality of the embedded `digits` model",
        "",
        f"- command: `python benchmarks/digits_quality.py --per-class {args.per_class}`",
        f"- date (UTC): {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M}; torch {torch.__version__}",
        f"- {len(labels)} samples ({args.per_class} per class), seed 0 for x_T; classifier held-out accuracy "
        f"on real digits: {class_accuracy(backend, (data['test_x'] + 1) / 2, data['test_y']):.4f}",
        "",
        "## Class accuracy (dpm3, 20 steps, log-SNR grid)",
        "",
        "| guidance | accuracy |",
        "|---|---:|",
    ]
    for guidance in (None, 1.5, 2.0, 3.0):
        images = generate(backend, labels, steps=20, solver="dpm3", guidance=guidance, seed=0)
        acc = class_accuracy(backend, images, labels)
        lines.append(f"| {'none (conditional ε)' if guidance is None else guidance} | {acc:.4f} |")
        print(lines[-1], flush=True)
    floor = frechet_distance(features(backend, (data["train_x"] + 1) / 2), real)
    lines += ["", "## FD-digits (CFG 2; lower is better)", "",
              f"Floor — the training digits against the held-out ones: {floor:.3f}", "",
              "| sampler | NFE 10 | NFE 20 | NFE 50 |", "|---|---:|---:|---:|"]
    for solver in ("euler", "dpm3", "ab4", "diffusers DPMSolverMultistep"):
        row = []
        for nfe in (10, 20, 50):
            if solver.startswith("diffusers"):
                images = generate_diffusers_peer(backend, labels, steps=nfe, guidance=2.0, seed=0)
            else:
                images = generate(backend, labels, steps=nfe, solver=solver, guidance=2.0, seed=0)
            row.append(f"{frechet_distance(features(backend, images), real):.3f}")
        lines.append(f"| {solver} | " + " | ".join(row) + " |")
        print(lines[-1], flush=True)
    lines += ["", "NFE counts network evaluations per sample; with CFG each one is a batch of two "
              "(conditional and unconditional)."]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
