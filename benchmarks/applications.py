"""The paper's applications on the embedded `digits` model, run through the SDK and judged by a
classifier that no loss ever uses (docs/design.md §7).

- (a) vocabulary expansion (paper §4.1.1, Table 2): a class vector learned by OptimizeEmbedding
  from the classifier loss alone, starting at the unconditional vector; judge accuracy and Fréchet
  distance (judge features, against the real digits of the class) next to the label's own vector;
- (b) guided sampling (§4.1.1): the unconditional model steered toward a class; success (judge
  says the class and the image is plausible) per strength, at batch 4 and 32;
- (c) security audit (§4.1.2, Table 3): an L∞ ball on x_T against the model's classifier (margin
  loss, per-sample stop at the first flip); flip rate and true blind spots (the attacked classifier
  flipped, the judge still sees the class) per ε;
- (d) stylization (§4.2, Table 4): LoRA with `gram_style` per content weight, with held-out
  validation seeds and keep-best; style-loss reduction and the judge accuracy kept.

The judge is an MLP (the model's classifier is a CNN) trained here with its own seed on the same
training split; *plausible* means its penultimate features lie within the 95th percentile of the
held-out real digits' nearest-neighbour distance to the training digits.

    .venv/bin/python benchmarks/applications.py      # ~35 min on 2 cores; writes results/applications.md
"""

from __future__ import annotations

import argparse
import datetime
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.numpy import load
from scipy import linalg
from torch import nn

import adjointdpm
from adjointdpm_server.config import Limits, ServerConfig
from adjointdpm_server.losses._gram import gram
from adjointdpm_server.models._digits_data import load_digits_split
from adjointdpm_server.wire import build_server

RESULTS = Path(__file__).resolve().parent / "results" / "applications.md"
STEPS = 10


# ---- the judge ----------------------------------------------------------------------------------

class Judge(nn.Module):
    """An MLP on the 64 pixels (the model's own classifier is a CNN); features: the 64-d penultimate."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 256), nn.SiLU(), nn.Linear(256, 64), nn.SiLU())
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        return self.head(self.body(x))


def train_judge(data, seed: int = 7, epochs: int = 150) -> tuple[Judge, float]:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    judge = Judge()
    opt = torch.optim.AdamW(judge.parameters(), lr=2e-3, weight_decay=1e-3)
    x, y = data["train_x"], data["train_y"]
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=gen)
        for k in range(0, len(y), 128):
            idx = order[k:k + 128]
            batch = F.pad(x[idx], (1, 1, 1, 1), value=-1.0)  # ±1-pixel shifts, as samples wander
            dx, dy = torch.randint(0, 3, (2,), generator=gen).tolist()
            loss = F.cross_entropy(judge(batch[..., dy:dy + 8, dx:dx + 8]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    judge.eval().requires_grad_(False)
    with torch.no_grad():
        accuracy = float((judge(data["test_x"]).argmax(1) == data["test_y"]).float().mean())
    return judge, accuracy


class Verdicts:
    """The judge's class, confidence and plausibility for images in [0, 1]."""

    def __init__(self, judge: Judge, data):
        self.judge = judge
        self.train = self.features((data["train_x"] + 1) / 2)
        self.real = {y: self.features((torch.cat([data["train_x"], data["test_x"]])[
            torch.cat([data["train_y"], data["test_y"]]) == y] + 1) / 2) for y in range(10)}
        held_out = self.features((data["test_x"] + 1) / 2)
        self.radius = float(np.quantile(self.nearest(held_out), 0.95))

    def features(self, images) -> np.ndarray:
        with torch.no_grad():
            return self.judge.body(torch.as_tensor(images, dtype=torch.float32) * 2 - 1).double().numpy()

    def nearest(self, feats: np.ndarray) -> np.ndarray:
        d = ((feats[:, None, :] - self.train[None, :, :]) ** 2).sum(-1)
        return np.sqrt(d.min(1))

    def classes(self, images) -> np.ndarray:
        with torch.no_grad():
            return self.judge(torch.as_tensor(images, dtype=torch.float32) * 2 - 1).argmax(1).numpy()

    def plausible(self, images) -> np.ndarray:
        return self.nearest(self.features(images)) <= self.radius


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(cov_a @ cov_b).real
    return float(np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a + cov_b - 2.0 * root))


def pixels(x0: np.ndarray) -> np.ndarray:
    """The digits model's decode: x_0 in [−1, 1] → images in [0, 1]."""
    return np.clip((x0 + 1) / 2, 0, 1)


def classifier(label, mode: str = "targeted", **extra) -> adjointdpm.ServerLoss:
    return adjointdpm.ServerLoss("classifier", params={"label": label, "mode": mode, **extra})


def ok(value: bool) -> str:
    return "met" if value else "**missed**"


# ---- (a) vocabulary expansion ------------------------------------------------------------------

def vocabulary(client, verdicts, args, lines):
    lines += ["", "## (a) Vocabulary expansion: a class vector learned from the classifier loss", "",
              f"OptimizeEmbedding from the unconditional vector, classifier loss only (targeted), "
              f"{args.embed_iterations} iterations of Adam (lr {args.embed_lr}), batch 16, {STEPS} steps; "
              f"then {args.per_class} samples (seeds 1000…) with the learned vector and with the label's "
              "own. FD: judge features against the class's real digits. Goal: judge accuracy ≥ 95% "
              "and FD ≤ 2× the label vector's.", "",
              "| class | vector | prior | judge accuracy | FD | FD / label's | norm | wall s | goal |",
              "|---|---|---|---:|---:|---:|---:|---:|---|"]
    table = RUNTIME.models["digits"].embedding_table().numpy()  # the label vectors
    label_norm = float(np.linalg.norm(table, axis=1).mean())
    for y in args.classes:
        base = client.sample(labels=y, batch=args.per_class, seed=1000, steps=STEPS, pixels=True, images=False)
        base_acc = float((verdicts.classes(base.pixels) == y).mean())
        base_fd = frechet(verdicts.features(base.pixels), verdicts.real[y])
        lines.append(f"| {y} | label | – | {base_acc:.2f} | {base_fd:.1f} | 1.00 | "
                     f"{np.linalg.norm(table[y]):.1f} | – | – |")
        print(lines[-1], flush=True)
        for prior, weight, stop in args.embed_variants:
            start = time.perf_counter()
            learned = client.optimize_embedding(
                classifier(y), iterations=args.embed_iterations, lr=args.embed_lr, batch=16, seed=0,
                steps=STEPS, prior=prior, prior_weight=weight, progress=False,
                stop_when={"loss_below": 16 * stop} if stop else None)
            wall = time.perf_counter() - start
            vector = load(client.download_artifact(learned.artifact.id)[1])["cond"]
            out = client.sample(embedding=learned.artifact.id, batch=args.per_class, seed=1000,
                                steps=STEPS, pixels=True, images=False)
            acc = float((verdicts.classes(out.pixels) == y).mean())
            fd = frechet(verdicts.features(out.pixels), verdicts.real[y])
            lines.append(f"| {y} | learned | {prior or 'none'} ({weight:g}){f', stop at {stop:g}' if stop else ''} "
                         f"| {acc:.2f} | {fd:.1f} | "
                         f"{fd / base_fd:.2f} | {np.linalg.norm(vector):.1f} | {wall:.1f} | "
                         f"{ok(acc >= 0.95 and fd <= 2 * base_fd)} |")
            print(lines[-1], flush=True)
    lines.append(f"\nThe label vectors' mean norm is {label_norm:.1f}.")


# ---- (b) guided sampling -----------------------------------------------------------------------

def success(verdicts, x0: np.ndarray, ys: np.ndarray) -> tuple[float, float, float]:
    """(on-class and plausible, on-class, plausible) rates of the images of ``x0``."""
    images = pixels(x0)
    on_class, plausible = verdicts.classes(images) == ys, verdicts.plausible(images)
    return (on_class & plausible).mean(), on_class.mean(), plausible.mean()


def guided(client, verdicts, args, lines):
    n = 32
    labels = [k % 10 for k in range(n)]
    x_T = client.sample(batch=n, seed=2000, steps=STEPS, images=False).x_T
    plain = client.sample(x_T=x_T, steps=STEPS, guidance_scale=1.0, pixels=True, images=False)
    ys = np.array(labels)
    plain_ok = (verdicts.classes(plain.pixels) == ys) & verdicts.plausible(plain.pixels)
    lines += ["", "## (b) Guided sampling: the unconditional model steered toward a class", "",
              f"{n} samples (seeds 2000…, classes k mod 10), {STEPS} steps, no CFG, classifier loss "
              "(targeted), normalized step at every node. *Success*: the judge says the class and "
              "the image is plausible. Batch 4 runs the same x_T rows in 8 calls. Goal: ≥ 80% at "
              "some strength, equal at batch 4 and 32.", "",
              f"Unguided: {plain_ok.mean():.2f} success; {verdicts.plausible(plain.pixels).mean():.2f} "
              "of the unconditional samples are plausible, a ceiling for any steering that keeps "
              "them so.", "",
              "| strength | success, batch 32 | success, batch 4 | on-class | plausible | wall s (b32) | goal |",
              "|---:|---:|---:|---:|---:|---:|---|"]
    for scale in args.strengths:
        spec = {"every": 1, "scale": scale, "step": "normalized"}
        start = time.perf_counter()
        big = client.optimize_latent(classifier(labels), guided=spec, x_T=x_T, steps=STEPS,
                                     guidance_scale=1.0, progress=False)
        wall = time.perf_counter() - start
        small = np.concatenate([
            client.optimize_latent(classifier(labels[k:k + 4]), guided=spec, x_T=x_T[k:k + 4],
                                   steps=STEPS, guidance_scale=1.0, progress=False).x0
            for k in range(0, n, 4)])
        rates = [success(verdicts, x0, ys) for x0 in (big.x0, small)]
        lines.append(f"| {scale:g} | {rates[0][0]:.2f} | {rates[1][0]:.2f} | {rates[0][1]:.2f} | "
                     f"{rates[0][2]:.2f} | {wall:.1f} | "
                     f"{ok(rates[0][0] >= 0.8 and abs(rates[0][0] - rates[1][0]) < 1e-9)} |")
        print(lines[-1], flush=True)
    lines += ["", "The same goal by optimizing x_T instead (OptimizeLatent, Adam, on the sphere of the "
              f"start, {args.latent_iterations} iterations; each sample stops once −log p(class) ≤ "
              f"{args.latent_stop:g} and keeps that iterate):", "",
              "| lr | success, batch 32 | success, batch 4 | on-class | plausible | mean iterations | wall s (b32) | goal |",
              "|---:|---:|---:|---:|---:|---:|---:|---|"]
    for lr in args.latent_lrs:
        common = dict(iterations=args.latent_iterations, lr=lr, constraint="sphere", steps=STEPS,
                      guidance_scale=1.0, stop_when={"loss_below": args.latent_stop}, progress=False)
        start = time.perf_counter()
        big = client.optimize_latent(classifier(labels), x_T=x_T, **common)
        wall = time.perf_counter() - start
        small = np.concatenate([client.optimize_latent(classifier(labels[k:k + 4]), x_T=x_T[k:k + 4],
                                                       **common).x0 for k in range(0, n, 4)])
        rates = [success(verdicts, x0, ys) for x0 in (big.x0, small)]
        lines.append(f"| {lr:g} | {rates[0][0]:.2f} | {rates[1][0]:.2f} | {rates[0][1]:.2f} | "
                     f"{rates[0][2]:.2f} | {np.mean(big.best_iteration):.1f} | {wall:.1f} | "
                     f"{ok(rates[0][0] >= 0.8 and abs(rates[0][0] - rates[1][0]) < 1e-9)} |")
        print(lines[-1], flush=True)


# ---- (c) security audit ------------------------------------------------------------------------

def audit(client, verdicts, args, lines):
    n = args.audit_batch
    labels = [k % 10 for k in range(n)]
    ys = np.array(labels)
    cfg = {} if args.audit_guidance is None else {"guidance_scale": args.audit_guidance}
    base = client.sample(labels=labels, batch=n, seed=3000, steps=STEPS, pixels=True, images=False, **cfg)
    own = RUNTIME.models["digits"]
    with torch.no_grad():
        attacked_start = own.classify(torch.from_numpy(base.pixels)).argmax(1).numpy()
    valid = (attacked_start == ys) & (verdicts.classes(base.pixels) == ys)
    lines += ["", "## (c) Security audit: an L∞ ball on x_T against the model's classifier", "",
              f"{n} class-conditional samples (seeds 3000…, classes k mod 10, CFG default), of which "
              f"{valid.sum()} both classifiers get right at the start (the rates below are over "
              f"those). Classifier loss in margin mode (κ = {args.kappa:g}) on the true class, "
              f"Adam (lr {args.audit_lr:g}·ε), {args.audit_iterations} iterations, each sample stopping at its first "
              "flip and keeping that iterate. *Blind spot*: the attacked classifier flipped, the "
              "judge still says the class and the image is plausible. Goal: blind spots ≥ 30% at "
              "ε = 0.2.", "",
              "| ε | flipped | judge still says the class | true blind spots | mean iterations to flip | wall s | goal |",
              "|---:|---:|---:|---:|---:|---:|---|"]
    for eps in args.epsilons:
        start = time.perf_counter()
        losses = [classifier(labels, "margin", kappa=args.kappa)]
        if args.audit_content:  # stay near the start image: a flip with the least visible change
            losses.append(adjointdpm.ServerLoss("mse", tensors={"target": base.pixels}, weight=args.audit_content))
        result = client.optimize_latent(losses,
                                        iterations=args.audit_iterations, lr=eps * args.audit_lr,
                                        constraint="linf", epsilon=eps, x_T=base.x_T, labels=labels,
                                        steps=STEPS, stop_when={"verdict_changed": True}, **cfg,
                                        progress=False)
        wall = time.perf_counter() - start
        images = pixels(result.x0)
        with torch.no_grad():
            attacked = own.classify(torch.from_numpy(images).float()).argmax(1).numpy()
        flipped = (attacked != ys) & valid
        kept = flipped & (verdicts.classes(images) == ys)
        blind = kept & verdicts.plausible(images)
        stopped_at = np.array(result.best_iteration)[flipped]
        lines.append(f"| {eps:g} | {flipped.sum() / valid.sum():.2f} | {kept.sum() / valid.sum():.2f} | "
                     f"{blind.sum() / valid.sum():.2f} | "
                     f"{stopped_at.mean() if len(stopped_at) else float('nan'):.1f} | {wall:.1f} | "
                     f"{ok(blind.sum() / valid.sum() >= 0.3) if eps == 0.2 else '–'} |")
        print(lines[-1], flush=True)


# ---- (d) stylization ---------------------------------------------------------------------------

def style_image(data) -> np.ndarray:
    """Bold strokes: a real training digit (the first 0), dilated by a 3×3 maximum; its Gram
    statistics say "thick" without saying which digit."""
    zero = data["train_x"][data["train_y"] == 0][0:1]
    bold = F.max_pool2d((zero + 1) / 2, 3, stride=1, padding=1)
    return bold[0].numpy().astype(np.float32)


def stylization(client, verdicts, args, lines):
    own = RUNTIME.models["digits"]
    style = style_image(DATA)
    with torch.no_grad():
        style_grams = [gram(f) for f in own.style_features(torch.from_numpy(style)[None])]

    def style_loss(images) -> float:
        with torch.no_grad():
            feats = own.style_features(torch.from_numpy(images).float())
            return float(sum((gram(f) - g).square().flatten(1).sum(1).mean() for f, g in zip(feats, style_grams)))

    examples = [{"seed": k, "label": k % 10} for k in range(10)]
    validation = [{"seed": 500 + k, "label": k % 10} for k in range(20)]
    vy = np.array([v["label"] for v in validation])
    held = client.sample(x_T=np.concatenate([client.sample(seed=v["seed"], steps=STEPS, images=False).x_T
                                             for v in validation]),
                         labels=list(vy), steps=STEPS, pixels=True, images=False)
    before = style_loss(held.pixels)
    base_acc = float((verdicts.classes(held.pixels) == vy).mean())
    lines += ["", "## (d) Stylization: LoRA with `gram_style`, per content weight", "",
              f"Style: bold strokes (a training 0, dilated 3×3). LoRA rank 4 on 10 examples (seeds 0–9), Adam lr "
              f"{args.style_lr}, {args.style_iterations} iterations, validated every 5 on 20 held-out "
              f"seeds (500…) and keeping the best validation loss. Measured on the held-out seeds: "
              f"the style loss (content weight 0) against the base model's ({before:.3f}), and the "
              f"judge's accuracy (the base model: {base_acc:.2f}). Goal: style loss −70% with judge "
              "accuracy ≥ 90%.", "",
              "| content weight | style loss change | judge accuracy | verdicts kept (model's classifier) "
              "| best iteration | wall s | goal |", "|---:|---:|---:|---:|---:|---:|---|"]
    for weight in args.content_weights:
        loss = adjointdpm.ServerLoss("gram_style", params={"content_weight": weight}, tensors={"style": style})
        start = time.perf_counter()
        tuned = client.finetune_weights(loss, examples, validation=validation, validate_every=5,
                                        keep_best=True, iterations=args.style_iterations,
                                        lr=args.style_lr, lora_rank=4, steps=STEPS, progress=False)
        wall = time.perf_counter() - start
        out = client.sample(x_T=held.x_T, labels=list(vy), steps=STEPS, pixels=True, images=False,
                            adapter=tuned.artifact.id)
        change = style_loss(out.pixels) / before - 1
        acc = float((verdicts.classes(out.pixels) == vy).mean())
        best = [v for v in tuned.validations if v.best][-1]
        lines.append(f"| {weight:g} | {change:+.0%} | {acc:.2f} | {best.agreement:.2f} | "
                     f"{tuned.best_iteration[0]} | {wall:.1f} | {ok(change <= -0.7 and acc >= 0.9)} |")
        print(lines[-1], flush=True)


RUNTIME = DATA = None


def _variant(text: str) -> tuple[str, float, float]:
    prior, weight, stop = text.split(":")
    return ("" if prior == "none" else prior), float(weight), float(stop)


def main() -> None:
    global RUNTIME, DATA
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--parts", default="abcd")
    parser.add_argument("--classes", type=int, nargs="+", default=[3, 5, 8])
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--embed-iterations", type=int, default=30)
    parser.add_argument("--embed-lr", type=float, default=0.1)
    parser.add_argument("--embed-variants", type=_variant, nargs="+",
                        default=[_variant(v) for v in ("none:0:0", "norm:5:0", "gaussian:5:0", "gaussian:5:0.1")],
                        help="prior:weight:stop, stop = the mean −log p(class) that ends the run (0 = none)")
    parser.add_argument("--strengths", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.4])
    parser.add_argument("--latent-lrs", type=float, nargs="+", default=[0.1, 0.3])
    parser.add_argument("--latent-iterations", type=int, default=20)
    parser.add_argument("--latent-stop", type=float, default=0.1)
    parser.add_argument("--audit-batch", type=int, default=50)
    parser.add_argument("--audit-iterations", type=int, default=30)
    parser.add_argument("--epsilons", type=float, nargs="+", default=[0.1, 0.2, 0.5])
    parser.add_argument("--kappa", type=float, default=0.0)
    parser.add_argument("--audit-content", type=float, default=0.0)
    parser.add_argument("--audit-guidance", type=float, default=1.0)
    parser.add_argument("--audit-lr", type=float, default=1.0, help="Adam lr as a fraction of ε")
    parser.add_argument("--style-iterations", type=int, default=60)
    parser.add_argument("--style-lr", type=float, default=0.03)
    parser.add_argument("--content-weights", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.3, 0.5])
    args = parser.parse_args()
    torch.manual_seed(0)
    data = DATA = load_digits_split()
    started = time.perf_counter()
    judge, judge_acc = train_judge(data)
    verdicts = Verdicts(judge, data)
    config = ServerConfig(models=("digits",), host="127.0.0.1", port=0,
                          artifact_dir=Path(tempfile.mkdtemp(prefix="applications-")),
                          limits=Limits(max_batch=128, max_iterations=200, max_examples=64))
    server = build_server(config)
    RUNTIME = server.runtime
    lines = ["# The paper's applications on `digits`, judged independently",
             "",
             f"- command: `python benchmarks/applications.py` (parts {args.parts})",
             f"- date (UTC): {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M}; torch "
             f"{torch.__version__}; {torch.get_num_threads()} threads; every call through the SDK to "
             "a loopback server",
             f"- judge: an MLP (the model's classifier is a CNN), seed 7, held-out accuracy "
             f"{judge_acc:.3f}; never used by any loss. Plausibility radius (95th percentile of "
             f"held-out real digits' nearest-training distance in judge features): {verdicts.radius:.2f}"]
    print("\n".join(lines), flush=True)
    try:
        with adjointdpm.Client(f"127.0.0.1:{server.port}", timeout=3600) as client:
            parts = {"a": vocabulary, "b": guided, "c": audit, "d": stylization}
            for key in args.parts:
                parts[key](client, verdicts, args, lines)
    finally:
        server.stop(0)
    lines.append(f"\nTotal wall time {time.perf_counter() - started:.0f} s.")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
