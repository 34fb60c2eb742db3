"""Exact versus truncated gradients for reward fine-tuning, at equal network calls and equal time.

A LoRA adapter of the digits model (and of digits-flow, the same network as a rectified flow) is
fine-tuned to make its samples an 8 — the reward is the
model's own classifier's log-probability of class 8 (the training loss is its negative) — with
the exact gradient (`auto`), `adjoint`, DRaFT-1, DRaFT-3 and AlignProp's randomized truncation
(K uniform in 1…N). Each method gets the same budget of network calls (a forward step or a VJP
each: an iteration costs N + K) and runs 3 seeds (the training examples' noise). Judged on 32
held-out noises by an independent MLP (benchmarks/applications.py's judge, not the classifier
that trained it): the mean log-probability of 8, the share judged 8, and diversity (mean pairwise
distance of the judge's features, as a fraction of the base model's: collapse does not count).
The first iteration's weight gradient is compared with the exact one (cosine). The network calls
a run really made are counted from its progress events (every solve's, the base model's
reference and the final sample included), beside the budget the iterations were sized from.

    .venv/bin/python benchmarks/reward_finetune.py            # budget 480 calls per run, both models
    .venv/bin/python benchmarks/reward_finetune.py --quick    # 160
    .venv/bin/python benchmarks/reward_finetune.py --models digits-flow

Writes benchmarks/results/reward_finetune.md and an .svg per model (reward against wall-clock time).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "benchmarks")]

import adjointdpm  # noqa: E402
from _common import machine, write_report  # noqa: E402
from adjointdpm_server.config import Limits, ServerConfig  # noqa: E402
from adjointdpm_server.models._digits_data import load_digits_split  # noqa: E402
from adjointdpm_server.wire import build_server  # noqa: E402
from applications import Verdicts, pixels, train_judge  # noqa: E402

STEPS = 10
TARGET = 8
EXAMPLES, HELD_OUT = 8, 32
METHODS = {  # name → (request options, K: VJPs per iteration)
    "exact (auto)": (dict(grad_mode="auto"), STEPS),
    "adjoint": (dict(grad_mode="adjoint"), STEPS),
    "DRaFT-1": (dict(truncate=1), 1),
    "DRaFT-3": (dict(truncate=3), 3),
    "randomized 1…N": (dict(truncate=STEPS, truncate_min=1), (1 + STEPS) / 2),
}
TO_EIGHT = adjointdpm.ServerLoss("classifier", params={"label": TARGET})


MODELS = ("digits", "digits-flow")


def examples(seed: int, n: int, offset: int = 0) -> list[dict]:
    labels = np.random.default_rng(seed + offset).integers(0, 10, n)
    return [{"seed": 1000 * seed + offset + k, "label": int(labels[k])} for k in range(n)]


def judged(client, verdicts, adapter: str, held_out: list[dict], model: str) -> dict:
    result = client.sample(labels=[e["label"] for e in held_out], model=model,
                           x_T=np.concatenate([client.sample(labels=[0], seed=e["seed"], steps=1, model=model,
                                                             images=False).x_T for e in held_out]),
                           steps=STEPS, adapter=adapter, images=False)
    images = pixels(result.x0)
    with torch.no_grad():
        logits = verdicts.judge(torch.as_tensor(images, dtype=torch.float32) * 2 - 1)
        logp = torch.log_softmax(logits, 1)[:, TARGET].numpy()
    feats = verdicts.features(images)
    spread = float(np.sqrt(((feats[:, None] - feats[None]) ** 2).sum(-1)).mean())
    return {"logp": float(logp.mean()), "share": float((logits.argmax(1) == TARGET).float().mean()),
            "spread": spread}


def cosine(client, seed: int, opts: dict, model: str) -> float:
    common = dict(targets=["weights"], weights={"lora_rank": 4, "inline": True}, steps=STEPS,
                  labels=[e["label"] for e in examples(seed, EXAMPLES)], model=model)
    x_T = np.concatenate([client.sample(labels=[0], seed=e["seed"], steps=1, model=model, images=False).x_T
                          for e in examples(seed, EXAMPLES)])
    exact = client.compute_gradient(TO_EIGHT, x_T=x_T, grad_mode="checkpoint", **common).weight_gradients
    other = client.compute_gradient(TO_EIGHT, x_T=x_T, **{"grad_mode": "checkpoint", **opts},
                                    **common).weight_gradients
    a = np.concatenate([exact[k].ravel() for k in sorted(exact)])
    b = np.concatenate([other[k].ravel() for k in sorted(exact)])
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


class Calls:
    """What a run's network did, from its stream's progress events: network evaluations (each
    solve reports its own running ``nfe``, so a drop starts a new solve; a VJP that recomputes
    its step counts as one) and backward steps (one VJP each: through a kept graph, which no
    evaluation counts, or a recomputed one)."""

    def __init__(self):
        self.evaluations, self.backward, self.last = 0, 0, 0

    def see(self, progress) -> None:
        nfe = progress.nfe
        self.evaluations += nfe - self.last if nfe >= self.last else nfe
        self.last = nfe
        self.backward += progress.phase == "backward"


def run(client, verdicts, name: str, seed: int, budget: int, held_out, model: str) -> dict:
    opts, k = METHODS[name]
    iterations = max(1, int(budget // (STEPS + k)))
    call = client.finetune_weights(TO_EIGHT, examples(seed, EXAMPLES), iterations=iterations, model=model,
                                   lr=2e-2, steps=STEPS, lora_rank=4, checkpoint_every=max(1, iterations // 4),
                                   keep_checkpoints=10, stream=True, **opts)
    start, marks, calls = time.perf_counter(), [], Calls()
    for event in call:
        kind = event.WhichOneof("kind")
        if kind == "progress":
            calls.see(event.progress)
        elif kind == "checkpoint":
            marks.append((time.perf_counter() - start, event.checkpoint.id, event.checkpoint.iteration))
    result = call.result
    marks.append((time.perf_counter() - start, result.artifact.id, iterations))
    curve = [(t, it, judged(client, verdicts, artifact, held_out, model)) for t, artifact, it in marks]
    return {"iterations": iterations, "seconds": marks[-1][0], "final": curve[-1][2], "curve": curve,
            "calls": (calls.evaluations, calls.backward)}


def svg(curves: dict, path: Path) -> None:
    """Reward (judge's mean log p(8)) against seconds, one polyline per method (seed 0)."""
    colours = ["#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e"]
    points = [(t, c["logp"]) for curve in curves.values() for t, _, c in curve]
    t_max = max(t for t, _ in points) or 1.0
    lo, hi = min(v for _, v in points), max(v for _, v in points)
    hi = hi if hi > lo else lo + 1
    x = lambda t: 60 + 520 * t / t_max  # noqa: E731
    y = lambda v: 300 - 260 * (v - lo) / (hi - lo)  # noqa: E731
    parts = ['<svg xmlns="http://www.w3.org/2000/svg" width="760" height="340" font-family="sans-serif" font-size="12">',
             '<line x1="60" y1="300" x2="580" y2="300" stroke="black"/><line x1="60" y1="40" x2="60" y2="300" stroke="black"/>',
             f'<text x="250" y="330">seconds (t max {t_max:.0f} s)</text>',
             f'<text x="5" y="35">log p(8): {lo:.2f} … {hi:.2f}</text>']
    for k, (name, curve) in enumerate(curves.items()):
        pts = " ".join(f"{x(t):.1f},{y(c['logp']):.1f}" for t, _, c in curve)
        parts.append(f'<polyline fill="none" stroke="{colours[k % 5]}" stroke-width="2" points="{pts}"/>')
        parts.append(f'<text x="595" y="{60 + 20 * k}" fill="{colours[k % 5]}">{name}</text>')
    parts.append("</svg>")
    path.write_text("\n".join(parts))


def bench(client, verdicts, model: str, budget: int, seeds: int, svg_path: Path) -> list[str]:
    """One model's table (and its plot): every method × seed, interleaved."""
    held_out = examples(99, HELD_OUT, offset=500)
    base = judged(client, verdicts, "", held_out, model)
    rows, curves = {}, {}
    for seed in range(seeds):  # seeds outer, methods inner: interleaved
        for name in METHODS:
            out = run(client, verdicts, name, seed, budget, held_out, model)
            out["cosine"] = 1.0 if name == "exact (auto)" else cosine(client, seed, METHODS[name][0], model)
            print(model, name, seed, {k: v for k, v in out.items() if k != "curve"}, flush=True)
            rows.setdefault(name, []).append(out)
            if seed == 0:
                curves[name] = out["curve"]
    t_equal = min(statistics.median(o["seconds"] for o in outs) for outs in rows.values())

    def at_time(out):
        """The judged reward of the newest adapter the run had written by ``t_equal``."""
        within = [c for t, _, c in out["curve"] if t <= t_equal + 1e-9]
        return within[-1] if within else base

    lines = [f"## {model}", "",
             f"Base model: log p(8) {base['logp']:.2f}, {base['share']:.0%} judged 8.", "",
             "| method | iterations | evaluations + backward steps (measured) | seconds | log p(8) at equal calls (median, "
             f"spread over seeds) | judged 8 | diversity vs base | log p(8) at equal time ({t_equal:.1f} s) "
             "| gradient cosine to exact |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, outs in rows.items():
        logp = [o["final"]["logp"] for o in outs]
        timed = [at_time(o)["logp"] for o in outs]
        ev, bw = (statistics.median(o["calls"][j] for o in outs) for j in (0, 1))
        lines.append(
            f"| {name} | {outs[0]['iterations']} | {ev:.0f} + {bw:.0f} "
            f"| {statistics.median(o['seconds'] for o in outs):.1f} "
            f"| {statistics.median(logp):.2f} ({min(logp):.2f}…{max(logp):.2f}) "
            f"| {statistics.median(o['final']['share'] for o in outs):.0%} "
            f"| {statistics.median(o['final']['spread'] for o in outs) / base['spread']:.2f} "
            f"| {statistics.median(timed):.2f} | {statistics.median(o['cosine'] for o in outs):.3f} |")
    lines += ["", f"![reward against time, {model}]({svg_path.name})", ""]
    svg(curves, svg_path)
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/reward_finetune.md")
    a = ap.parse_args()
    budget = 160 if a.quick else 480
    torch.manual_seed(0)
    judge, accuracy = train_judge(load_digits_split())
    verdicts = Verdicts(judge, load_digits_split())
    server = build_server(ServerConfig(models=tuple(a.models), port=0, artifact_dir=Path(tempfile.mkdtemp()),
                                       limits=Limits(max_batch=64, max_iterations=1000)))
    client = adjointdpm.Client(f"127.0.0.1:{server.port}", timeout=3600)
    lines = [f"# Reward fine-tuning: exact versus truncated gradients ({STEPS} steps, {a.seeds} seeds)", "",
             f"Machine: {machine()}. `benchmarks/reward_finetune.py{' --quick' if a.quick else ''}`: "
             f"a budget of {budget} network calls per run (an iteration costs {STEPS} forward calls "
             "and K VJPs; the measured column counts, from the run's progress events, its network "
             "evaluations — the base model's reference and the final sample included; a VJP that "
             "recomputes its step counts there too — and its backward steps, one VJP each, through "
             "a kept graph or a recomputed one), LoRA rank 4, lr 0.02, 8 training noises; "
             f"judged on 32 held-out noises by an independent MLP (held-out accuracy {accuracy:.3f}).", ""]
    for model in a.models:
        svg_path = a.out.with_suffix(".svg") if model == "digits" else a.out.with_name(
            f"{a.out.stem}_{model.replace('-', '_')}.svg")
        lines += bench(client, verdicts, model, budget, a.seeds, svg_path)
    lines += ["Whatever it shows is the result: read the table, not a claim. `adjoint` re-solves the "
              "trajectory (its gradient is exact up to the re-solve error); DRaFT-K and the randomized "
              "truncation are approximations the caller chooses (`truncate`, `truncate_min`).", ""]
    write_report(a.out, "\n".join(lines))
    client.close()
    server.stop(0)


if __name__ == "__main__":
    main()
