"""``adjointdpm``: a command line over ``adjointdpm.Client``.

    adjointdpm [--target HOST:PORT] [--token T] [--tls] [--ca F] [--cert F --key F] COMMAND ...

Commands: models, losses, sample, grad, optimize, finetune, invert, artifact. Each writes its
PNGs and tensors (safetensors) into ``--out`` (default ./out), prints one line per file and a
final summary line. ``main(argv)`` returns the exit code: 0, 1 for a service error, 2 for usage.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import sys
from pathlib import Path

import numpy as np

import adjointdpm
from adjointdpm._pictures import auto_scale, labeled_grid, upscale_png

__all__ = ["build_parser", "main"]


# -- argument types ---------------------------------------------------------------------------------
def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON: {err}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object, e.g. '{\"label\": 8}'")
    return value


def _named_tensor(text: str) -> tuple[str, np.ndarray]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError("expected NAME=FILE.npy")
    try:
        return name, np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise argparse.ArgumentTypeError(f"cannot load {path}: {err}") from None


# -- the parser -------------------------------------------------------------------------------------
def _generation_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("generation")
    g.add_argument("--model", default="", help="model name (default: the server's default)")
    g.add_argument("--prompt", action="append", help="prompt (repeatable: one per sample)")
    g.add_argument("--label", action="append", type=int, help="class label (repeatable)")
    g.add_argument("--batch", type=int, help="number of samples")
    g.add_argument("--seed", type=int, help="seed of x_T")
    g.add_argument("--steps", type=int, help="sampler steps (default: the model's)")
    g.add_argument("--solver", default="", help="euler, dpm2, dpm3 (default), ab2-4, heun, dopri5")
    g.add_argument("--guidance", type=float, help="classifier-free guidance scale")
    g.add_argument("--grid", default="", help="logsnr (default), time, karras")
    g.add_argument("--adapter", default="", help="artifact id of a fine-tuned adapter")
    g.add_argument("--embedding", default="", help="artifact id of a learned embedding")


def _loss_flags(p: argparse.ArgumentParser, required: bool = True) -> None:
    g = p.add_argument_group("loss")
    g.add_argument("--loss", required=required, help="a server-side loss plugin (see `losses`)")
    g.add_argument("--params", type=_json_object, default={}, help="its parameters as JSON")
    g.add_argument("--tensor", type=_named_tensor, action="append", default=[],
                   metavar="NAME=FILE.npy", help="a tensor input of the loss (repeatable)")
    g.add_argument("--domain", choices=("image", "latent"), default="image")
    g.add_argument("--grad-mode", default="", help="auto (default), checkpoint, adjoint, backprop")
    g.add_argument("--memory-budget-mib", type=int, default=0,
                   help="lower the server's gradient memory budget (auto, adjoint)")


def _optimizer_flags(lr: float):
    def add(p: argparse.ArgumentParser) -> None:
        p.add_argument("--iterations", type=int, default=10)
        p.add_argument("--lr", type=float, default=lr, help=f"learning rate (default {lr:g})")
        p.add_argument("--schedule", default="", choices=("", "constant", "cosine", "linear"),
                       help="learning-rate schedule (default constant)")
        p.add_argument("--warmup", type=int, default=0, help="iterations of linear warm-up")
        p.add_argument("--stop-below", type=float, help="stop once the loss is at most this "
                       "(per sample for optimize)")
        p.add_argument("--patience", type=int, default=0, help="stop after N iterations without a new best")
    return add


def _stop(args, flip: bool = False) -> dict | None:
    """The stop_when of the optimizer flags (None when none is set)."""
    stop = {}
    if args.stop_below is not None:
        stop["loss_below"] = args.stop_below
    if args.patience:
        stop["patience"] = args.patience
    if flip:
        stop["verdict_changed"] = True
    return stop or None


def _token_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--placeholder", default="", help="token to learn (SD; must be in the prompt)")
    p.add_argument("--initializer", default="", help="word whose embedding starts the token")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="adjointdpm", description="Gradients through diffusion sampling, from an AdjointDPM server.")
    parser.add_argument("--target", dest="server", metavar="HOST:PORT",
                        default=os.environ.get("ADJOINTDPM_TARGET", "localhost:50051"),
                        help="server HOST:PORT (env ADJOINTDPM_TARGET, default localhost:50051)")
    parser.add_argument("--token", default=os.environ.get("ADJOINTDPM_TOKEN"),
                        help="bearer token (env ADJOINTDPM_TOKEN)")
    parser.add_argument("--tls", action="store_true", help="TLS with the system roots")
    parser.add_argument("--ca", metavar="FILE", help="PEM file of the root certificates (implies TLS)")
    parser.add_argument("--cert", metavar="FILE", help="client certificate chain for mTLS (with --key)")
    parser.add_argument("--key", metavar="FILE", help="client private key for mTLS (with --cert)")
    parser.set_defaults(out=Path("out"), progress=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    output = argparse.ArgumentParser(add_help=False)
    output.add_argument("--out", type=Path, default=Path("out"), help="output directory (./out)")
    output.add_argument("--progress", action="store_true", help="progress bar even without a tty")
    output.add_argument("--scale", type=int, default=0,
                        help="enlarge PNGs by this factor (nearest neighbour); 0 = so that they "
                             "are at least 256 px, 1 = native size")

    def command(name, text, *flags, writes=True):
        p = sub.add_parser(name, help=text, description=text, allow_abbrev=False,
                           parents=[output] if writes else [])
        for add in flags:
            add(p)
        return p

    for name in ("models", "losses"):
        p = command(name, f"list the server's {name}", writes=False)
        p.add_argument("--json", action="store_true", help="print JSON instead of a table")

    command("sample", "sample images", _generation_flags)

    p = command("grad", "gradient of a loss w.r.t. x_T, cond, a token or weights",
                _generation_flags, _loss_flags, _token_flags)
    p.add_argument("--target", dest="targets", action="append",
                   choices=("x_T", "cond", "token", "weights"), help="what to differentiate (repeatable)")
    p.add_argument("--parameters", action="append", default=[], help="weights: fnmatch pattern")
    p.add_argument("--lora-rank", type=int, default=0, help="weights: a fresh LoRA of this rank")

    p = command("optimize", "optimize x_T (or steer sampling) to lower a loss",
                _generation_flags, _loss_flags, _optimizer_flags(lr=0.05))
    p.add_argument("--optimizer", default="adam", choices=("adam", "sgd"))
    p.add_argument("--constraint", default="none", choices=("none", "linf", "l2", "sphere"))
    p.add_argument("--epsilon", type=float, default=0.0, help="radius of the linf/l2 ball")
    p.add_argument("--norm-weight", type=float, default=0.0, help="penalty keeping |x_T| Gaussian")
    p.add_argument("--guided-every", type=int, help="guided sampling: steer x_t every N steps")
    p.add_argument("--guided-scale", type=float, default=0.0,
                   help="guided sampling: step size per entry, times σ_t (default: --lr)")
    p.add_argument("--stop-on-flip", action="store_true",
                   help="each sample stops once the model's classifier changes its verdict (audits)")

    p = command("finetune", "fine-tune the model (LoRA or full) on a loss",
                _generation_flags, _loss_flags, _optimizer_flags(lr=1e-3))
    p.add_argument("--examples", type=int, default=4, help="N examples, seeds SEED..SEED+N-1 (SEED=0)")
    p.add_argument("--method", default="lora", choices=("lora", "full"))
    p.add_argument("--rank", type=int, default=4, help="LoRA rank")
    p.add_argument("--checkpoint-every", type=int, default=0)
    p.add_argument("--name", default="", help="a label for the adapter")
    p.add_argument("--validation", type=int, default=0,
                   help="N held-out examples (the seeds after the examples'), validated every 5 steps")
    p.add_argument("--keep-best", action="store_true", help="the adapter of the best validation loss")

    p = command("invert", "learn an embedding from a target image and/or a loss", _generation_flags,
                lambda q: _loss_flags(q, required=False), _optimizer_flags(lr=0.05), _token_flags)
    p.add_argument("--target-image", type=Path, help="PNG or .npy (C, H, W) in [0, 1]")
    p.add_argument("--name", default="", help="a label for the embedding")
    p.add_argument("--prior", default="", choices=("", "norm", "gaussian"),
                   help="keep the embedding among the model's own (gaussian: their per-dimension law)")
    p.add_argument("--prior-weight", type=float, default=0.0, help="the prior's weight (default 1)")

    p = command("artifact", "download an artifact (to OUT/ID.safetensors)")
    p.add_argument("id")
    p.add_argument("--format", choices=("native", "diffusers"), default="native",
                   help="diffusers: for pipe.load_lora_weights() / pipe.load_textual_inversion()")
    return parser


# -- helpers ----------------------------------------------------------------------------------------
def _client(args, parser) -> adjointdpm.Client:
    if bool(args.cert) != bool(args.key):
        parser.error("--cert and --key go together")
    tls: bool | dict = args.tls
    files = {"root_certificates": args.ca, "certificate_chain": args.cert, "private_key": args.key}
    if any(files.values()):
        tls = {k: v for k, v in files.items() if v}
    return adjointdpm.Client(args.server, token=args.token, tls=tls)


def _generation(args, conditioning: bool = True) -> dict:
    g = dict(model=args.model, adapter=args.adapter, embedding=args.embedding, batch=args.batch,
             seed=args.seed, steps=args.steps, solver=args.solver, guidance_scale=args.guidance,
             grid=args.grid)
    if conditioning:
        g.update(prompt=args.prompt, labels=args.label)
    return g


def _loss(args) -> adjointdpm.ServerLoss:
    return adjointdpm.ServerLoss(args.loss, params=args.params, tensors=dict(args.tensor),
                                 domain=args.domain)


def _scale(args, images: list[bytes]) -> int:
    return args.scale if args.scale else (auto_scale(images[0]) if images else 1)


def _write_png(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    width, height = (int.from_bytes(data[i:i + 4], "big") for i in (16, 20))  # PNG IHDR
    print(f"wrote {path} ({width}x{height})")


def _write_pngs(images: list[bytes], out: Path, prefix: str, scale: int = 1) -> None:
    for k, data in enumerate(images):
        _write_png(out / f"{prefix}{k:03d}.png", upscale_png(data, scale))


def _write_tensors(tensors: dict[str, np.ndarray], out: Path, stem: str) -> Path:
    """``stem.safetensors``; ``stem.npz`` with a note when safetensors is not installed."""
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    try:
        from safetensors.numpy import save_file
    except ImportError:
        path = out / f"{stem}.npz"
        np.savez(path, **tensors)
        print("note: safetensors is not installed; wrote numpy .npz instead")
    else:
        path = out / f"{stem}.safetensors"
        save_file(tensors, str(path))
    shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in tensors.items())
    print(f"wrote {path} ({shapes})")
    return path


def _download(client, artifact_id: str, path: Path, format: str = "native") -> None:
    if not re.fullmatch(r"[a-z_]+-[0-9a-f]{32}", artifact_id):  # ids name local files: no paths
        raise ValueError(f"{artifact_id!r} is not an artifact id")
    path.parent.mkdir(parents=True, exist_ok=True)
    info, data = client.download_artifact(artifact_id, path, format=format)
    print(f"wrote {path} ({len(data)} bytes, {info.kind if info else 'artifact'})")


def _history(result) -> str:
    first = result.history[0] if result.history else result.loss
    return f"loss {first:.4f} -> {result.loss:.4f} over {len(result.history)} iterations"


def _load_image(path: Path) -> np.ndarray:
    """A PNG (via Pillow) or .npy as float32 (C, H, W) in [0, 1]."""
    if path.suffix == ".npy":
        return np.load(path, allow_pickle=False).astype(np.float32)
    try:
        from PIL import Image
    except ImportError:
        raise ValueError("reading a PNG needs Pillow; pass a .npy instead") from None
    with Image.open(path) as img:
        gray = img.mode in ("1", "L", "LA", "I", "I;16", "F")
        a = np.asarray(img.convert("L" if gray else "RGB"), dtype=np.float32) / 255.0
    return a[None] if gray else a.transpose(2, 0, 1).copy()


def _table(rows: list[dict], columns: list[str]) -> None:
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    for row in [columns, *cells]:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())


# -- commands ---------------------------------------------------------------------------------------
def cmd_models(client, args) -> None:
    models = client.list_models()
    if args.json:
        print(json.dumps(models, indent=2))
        return
    _table([{**m, "name": m["name"] + (" *" if m.get("is_default") else ""),
             "latent": "x".join(map(str, m["latent_shape"])),
             "image": "x".join(map(str, m["image_shape"])),
             "adapters": len(m.get("adapters", []))} for m in models],
           ["name", "conditioning", "latent", "image", "default_steps", "default_guidance", "adapters"])


def cmd_losses(client, args) -> None:
    losses = client.list_losses()
    if args.json:
        print(json.dumps(losses, indent=2))
        return
    _table([{**info, "params": ",".join(info.get("params", [])),
             "tensors": ",".join(info.get("tensors", []))} for info in losses],
           ["name", "domain", "params", "tensors", "description"])


def cmd_sample(client, args) -> None:
    r = client.sample(progress=args.progress, **_generation(args))
    scale = _scale(args, r.images)
    _write_pngs(r.images, args.out, "sample_", scale)
    labels = [str(v) for v in (args.label or [])]
    names = labels * (len(r.images) // len(labels)) if labels and len(r.images) % len(labels) == 0 \
        else [f"#{k}" for k in range(len(r.images))]
    _write_png(args.out / "sample_grid.png", labeled_grid([r.images], scale=scale, column_labels=names))
    _write_tensors({"x0": r.x0, "x_T": r.x_T}, args.out, "sample")
    print(f"sampled {r.x0.shape[0]} images, x0 {list(r.x0.shape)}, "
          f"range [{r.x0.min():.3f}, {r.x0.max():.3f}]")


def cmd_grad(client, args) -> None:
    token = {"placeholder": args.placeholder, "initializer": args.initializer}
    weights = {"parameters": args.parameters, "lora_rank": args.lora_rank}
    r = client.compute_gradient(_loss(args), targets=args.targets or ["x_T"], grad_mode=args.grad_mode,
                                memory_budget_mib=args.memory_budget_mib,
                                token=token, weights=weights, progress=args.progress,
                                **_generation(args))
    grads = {**r.gradients, **{f"weights/{k}": v for k, v in r.weight_gradients.items()}}
    _write_tensors({**grads, "x0": r.x0}, args.out, "gradients")
    norms = "  ".join(f"|d/d{k}| {np.linalg.norm(v):.4g}" for k, v in r.gradients.items())
    extra = f"  weights artifact {r.weights_artifact.id}" if r.weights_artifact else ""
    print(f"loss {r.loss:.6g}  {norms}  nfe {r.nfe}{extra}")


def cmd_optimize(client, args) -> None:
    guided = (None if args.guided_every is None else
              {"every": args.guided_every, "scale": args.guided_scale})
    constraint = "" if args.constraint == "none" else args.constraint
    r = client.optimize_latent(_loss(args), optimizer=args.optimizer, lr=args.lr,
                               iterations=args.iterations, schedule=args.schedule,
                               warmup=args.warmup, constraint=constraint,
                               epsilon=args.epsilon, norm_weight=args.norm_weight,
                               grad_mode=args.grad_mode,
                               memory_budget_mib=args.memory_budget_mib, guided=guided, progress=args.progress,
                               stop_when=_stop(args, args.stop_on_flip), **_generation(args))
    scale = _scale(args, r.images)
    _write_pngs(r.initial_images, args.out, "before_", scale)
    _write_pngs(r.images, args.out, "after_", scale)
    _write_png(args.out / "before_after.png", labeled_grid(
        [r.initial_images, r.images], scale=scale, row_labels=["before", "after"]))
    _write_tensors({"x_T": r.x_T, "x0": r.x0}, args.out, "latents")
    print(_history(r))
    if r.stopped:
        print(f"stopped early: {sum(r.stopped)}/{len(r.stopped)} samples; best iterations "
              f"{' '.join(map(str, r.best_iteration))}")


def cmd_finetune(client, args) -> None:
    labels = itertools.cycle(args.label or [None])
    prompts = itertools.cycle(args.prompt or [""])
    start = args.seed or 0
    examples = [{"seed": start + k, "label": next(labels), "prompt": next(prompts)}
                for k in range(args.examples + args.validation)]
    r = client.finetune_weights(_loss(args), examples[:args.examples], method=args.method,
                                lora_rank=args.rank, lr=args.lr, iterations=args.iterations,
                                schedule=args.schedule, warmup=args.warmup,
                                checkpoint_every=args.checkpoint_every, name=args.name,
                                grad_mode=args.grad_mode,
                                memory_budget_mib=args.memory_budget_mib, progress=args.progress,
                                validation=examples[args.examples:], validate_every=5,
                                keep_best=args.keep_best, stop_when=_stop(args),
                                **_generation(args, conditioning=False))
    for v in r.validations:
        agreement = "" if v.agreement is None else f", verdicts kept {v.agreement:.0%}"
        print(f"validation after {v.iteration} steps: loss {v.loss:.4g}{agreement}{' (best)' if v.best else ''}")
    _download(client, r.artifact.id, args.out / f"adapter-{r.artifact.id}.safetensors")
    checkpoints = f", checkpoints {' '.join(c.id for c in r.checkpoints)}" if r.checkpoints else ""
    print(f"adapter {r.artifact.id} ({r.artifact.kind}): {_history(r)}{checkpoints}")


def cmd_invert(client, args) -> None:
    target = _load_image(args.target_image) if args.target_image else None
    token = ({"placeholder": args.placeholder, "initializer": args.initializer}
             if args.placeholder or args.initializer else None)
    r = client.optimize_embedding([_loss(args)] if args.loss else [], target_image=target,
                                  token=token, lr=args.lr, iterations=args.iterations,
                                  schedule=args.schedule, warmup=args.warmup, name=args.name,
                                  grad_mode=args.grad_mode,
                                  memory_budget_mib=args.memory_budget_mib, prior=args.prior,
                                  prior_weight=args.prior_weight, stop_when=_stop(args),
                                  progress=args.progress, **_generation(args))
    _write_pngs(r.images, args.out, "inverted_", _scale(args, r.images))
    _download(client, r.artifact.id, args.out / f"{r.artifact.id}.safetensors")  # id: embedding-…
    print(f"embedding {r.artifact.id}: {_history(r)}")


def cmd_artifact(client, args) -> None:
    suffix = "" if args.format == "native" else f".{args.format}"
    _download(client, args.id, args.out / f"{args.id}{suffix}.safetensors", args.format)
    print(f"artifact {args.id}")


COMMANDS = {"models": cmd_models, "losses": cmd_losses, "sample": cmd_sample, "grad": cmd_grad,
            "optimize": cmd_optimize, "finetune": cmd_finetune, "invert": cmd_invert,
            "artifact": cmd_artifact}


def main(argv: list[str] | None = None) -> int:
    """Run one command; the exit code: 0, 1 for a service or file error, 2 for usage errors."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command == "invert" and not (args.loss or args.target_image):
            parser.error("invert needs --target-image and/or --loss")
        args.progress = args.progress or sys.stderr.isatty()
        with _client(args, parser) as client:
            COMMANDS[args.command](client, args)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 2
    except adjointdpm.AdjointDPMError as err:
        print(f"error: {err.code.name}: {err.details}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
