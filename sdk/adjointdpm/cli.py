"""``adjointdpm``: a command line over ``adjointdpm.Client``.

    adjointdpm [--target HOST:PORT] [--token T] [--tls] [--ca F] [--cert F --key F] COMMAND ...

Commands, named after their RPCs: models, losses, sample, compute-gradient, optimize-latent,
finetune-weights, optimize-embedding, artifact, delete-artifact (the short names grad, optimize, finetune and
invert are aliases). Each writes its
PNGs and tensors (safetensors) into ``--out`` (default ./out), prints one line per file and a
final summary line. ``main(argv)`` returns the exit code: 0, 1 for a service error, 2 for usage.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import re
import sys
from pathlib import Path

import numpy as np

import adjointdpm
from adjointdpm import options
from adjointdpm._pictures import auto_scale, labeled_grid, upscale_png

__all__ = ["build_parser", "call_keywords", "main"]


# -- argument types ---------------------------------------------------------------------------------
def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON: {err}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object, e.g. '{\"label\": 8}'")
    return value


def _condition(text: str):
    """``VALUE[@WEIGHT]``: an integer VALUE is a class label, anything else a prompt; a suffix
    ``@WEIGHT`` that reads as a number is its weight."""
    value, sep, weight = text.rpartition("@")
    if sep:
        try:
            w = float(weight)
        except ValueError:
            value, w = text, None
    else:
        value, w = text, None
    item = int(value) if re.fullmatch(r"[+-]?\d+", value.strip()) else value
    return item if w is None else (item, w)


def _named_tensor(text: str) -> tuple[str, np.ndarray]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError("expected NAME=FILE.npy")
    try:
        return name, np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise argparse.ArgumentTypeError(f"cannot load {path}: {err}") from None


# -- the parser -------------------------------------------------------------------------------------
# A flag that sets an option has no default of its own: left out, the keyword is not sent and the
# server applies the option's one default (``adjointdpm.options``), which its help text states.
def _flag(p, rpc: str, flag: str, name: str, **kw) -> None:
    """``flag`` sets the option ``name`` (a keyword, or ``group.key``) of ``rpc``."""
    o = options.option(rpc, name)
    if o.choices and "choices" not in kw and "action" not in kw:
        kw["choices"] = o.choices
    dest = kw.pop("dest", flag.lstrip("-").replace("-", "_"))
    text = kw.pop("help", o.doc) + o.describe()[len(o.doc):]  # its own words, the option's default
    p.add_argument(flag, dest=dest, default=None, help=text.replace("%", "%%"), **kw)
    p.set_defaults(option_flags=(*p.get_default("option_flags"), (dest, name)))


def _generation_flags(rpc: str):
    def add(p: argparse.ArgumentParser) -> None:
        g = p.add_argument_group("generation")
        _flag(g, rpc, "--model", "model")
        _flag(g, rpc, "--prompt", "prompt", action="append", help="prompt (repeatable: one per sample)")
        _flag(g, rpc, "--label", "labels", action="append", type=int, help="class label (repeatable)")
        _flag(g, rpc, "--batch", "batch", type=int)
        _flag(g, rpc, "--seed", "seed", type=int)
        _flag(g, rpc, "--steps", "steps", type=int)
        _flag(g, rpc, "--solver", "solver")
        _flag(g, rpc, "--guidance", "guidance_scale", type=float)
        _flag(g, rpc, "--grid", "grid")
        _flag(g, rpc, "--adapter", "adapter")
        _flag(g, rpc, "--embedding", "embedding")
    return add


def _loss_flags(rpc: str, required: bool = True):
    def add(p: argparse.ArgumentParser) -> None:
        g = p.add_argument_group("loss")
        g.add_argument("--loss", required=required, help="a server-side loss plugin (see `losses`)")
        g.add_argument("--params", type=_json_object, default={}, help="its parameters as JSON")
        g.add_argument("--tensor", type=_named_tensor, action="append", default=[],
                       metavar="NAME=FILE.npy", help="a tensor input of the loss (repeatable)")
        g.add_argument("--domain", choices=("image", "latent"), default="image")
        _flag(g, rpc, "--grad-mode", "grad_mode")
        _flag(g, rpc, "--memory-budget-mib", "memory_budget_mib", type=int)
        _flag(g, rpc, "--decoder-tile", "decoder_tile", type=int)
    return add


def _optimizer_flags(rpc: str):
    def add(p: argparse.ArgumentParser) -> None:
        _flag(p, rpc, "--optimizer", "optimizer")
        _flag(p, rpc, "--iterations", "iterations", type=int)
        _flag(p, rpc, "--lr", "lr", type=float)
        _flag(p, rpc, "--momentum", "momentum", type=float)
        _flag(p, rpc, "--schedule", "schedule")
        _flag(p, rpc, "--warmup", "warmup", type=int)
        _flag(p, rpc, "--stop-below", "stop_when.loss_below", type=float)
        _flag(p, rpc, "--patience", "stop_when.patience", type=int)
    return add


def _token_flags(rpc: str):
    def add(p: argparse.ArgumentParser) -> None:
        _flag(p, rpc, "--placeholder", "token.placeholder")
        _flag(p, rpc, "--initializer", "token.initializer")
    return add


def call_keywords(args) -> dict:
    """The keyword arguments of the SDK call: only the options whose flags were given (a dict
    keyword such as ``stop_when`` from its keys' flags)."""
    kwargs: dict = {}
    for dest, name in args.option_flags:
        value = getattr(args, dest)
        if value is None:
            continue
        group, _, key = name.rpartition(".")
        if group:
            kwargs.setdefault(group, {})[key] = value
        else:
            kwargs[name] = value
    return kwargs


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="adjointdpm", description="Gradients through diffusion sampling, from an AdjointDPM server.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {adjointdpm.__version__}")
    parser.add_argument("--target", dest="server", metavar="HOST:PORT",
                        default=os.environ.get("ADJOINTDPM_TARGET", "localhost:50051"),
                        help="server HOST:PORT; replicas as HOST:PORT,HOST:PORT or dns:///NAME:PORT "
                             "(env ADJOINTDPM_TARGET, default localhost:50051)")
    parser.add_argument("--token", default=os.environ.get("ADJOINTDPM_TOKEN"),
                        help="bearer token (env ADJOINTDPM_TOKEN)")
    parser.add_argument("--tls", action="store_true", help="TLS with the system roots")
    parser.add_argument("--ca", metavar="FILE", help="PEM file of the root certificates (implies TLS)")
    parser.add_argument("--cert", metavar="FILE", help="client certificate chain for mTLS (with --key)")
    parser.add_argument("--key", metavar="FILE", help="client private key for mTLS (with --cert)")
    parser.set_defaults(out=Path("out"), progress=False, option_flags=())
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    output = argparse.ArgumentParser(add_help=False)
    output.add_argument("--out", type=Path, default=Path("out"), help="output directory (./out)")
    output.add_argument("--progress", action="store_true", help="progress bar even without a tty")
    output.add_argument("--scale", type=int, default=0,
                        help="enlarge PNGs by this factor (nearest neighbour); 0 = so that they "
                             "are at least 256 px, 1 = native size")

    def command(name, text, *flags, writes=True, alias=None):
        p = sub.add_parser(name, help=text, description=text, allow_abbrev=False,
                           aliases=[alias] if alias else [], parents=[output] if writes else [])
        p.set_defaults(option_flags=(), handler=name)
        for add in flags:
            add(p)
        return p

    for name in ("models", "losses"):
        p = command(name, f"list the server's {name}", writes=False)
        p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p = command("server", "the server's release, API and limits (GetServerMetadata)", writes=False)
    p.add_argument("--json", action="store_true", help="print JSON instead of lines")

    p = command("sample", "sample images", _generation_flags("Sample"))

    rpc = "ComputeGradient"
    p = command("compute-gradient", "gradient of a loss w.r.t. x_T, cond, a token or weights",
                _generation_flags(rpc), _loss_flags(rpc), _token_flags(rpc), alias="grad")
    _flag(p, rpc, "--target", "targets", dest="targets", action="append", choices=options.TARGETS,
          help="what to differentiate (repeatable)")
    _flag(p, rpc, "--parameters", "weights.parameters", action="append")
    _flag(p, rpc, "--lora-rank", "weights.lora_rank", type=int)

    rpc = "OptimizeLatent"
    p = command("optimize-latent", "optimize x_T (or steer sampling) to lower a loss",
                _generation_flags(rpc), _loss_flags(rpc), _optimizer_flags(rpc), alias="optimize")
    _flag(p, rpc, "--constraint", "constraint", type=lambda v: "" if v == "none" else v,
          metavar="{none,linf,l2,sphere}",
          help="keep x_T in an ε-ball around the start or on its sphere: none ('' on the wire), "
               "linf, l2, sphere")
    _flag(p, rpc, "--epsilon", "epsilon", type=float)
    _flag(p, rpc, "--norm-weight", "norm_weight", type=float)
    _flag(p, rpc, "--image-every", "image_every", type=int)
    _flag(p, rpc, "--guided-every", "guided.every", type=int,
          help="guided sampling: steer x_t every N steps (given: guided sampling)")
    _flag(p, rpc, "--guided-scale", "guided.scale", type=float,
          help="guided sampling: step size per entry, times σ_t (unset: --lr)")
    _flag(p, rpc, "--stop-on-flip", "stop_when.verdict_changed", action="store_const", const=True,
          help="each sample stops once the model's classifier changes its verdict (audits)")

    rpc = "FinetuneWeights"
    p = command("finetune-weights", "fine-tune the model (LoRA or full) on a loss",
                _generation_flags(rpc), _loss_flags(rpc), _optimizer_flags(rpc), alias="finetune")
    p.add_argument("--examples", type=int, default=4, help="N examples, seeds SEED..SEED+N-1 (SEED=0)")
    p.add_argument("--validation", type=int, default=0,
                   help="N held-out examples (the seeds after the examples')")
    p.add_argument("--condition", type=_condition, action="append", default=[],
                   metavar="VALUE[@WEIGHT]",
                   help="a prompt set instead of --examples (repeatable): an integer VALUE is a "
                        "class label, other text a prompt; every iteration draws --batch-size of "
                        "them by weight (default 1), each with a fresh noise from --seed's stream")
    _flag(p, rpc, "--micro-batch", "micro_batch", type=int)
    _flag(p, rpc, "--method", "method")
    _flag(p, rpc, "--rank", "lora_rank", type=int)
    _flag(p, rpc, "--lora-alpha", "lora_alpha", type=float)
    _flag(p, rpc, "--batch-size", "batch_size", type=int)
    _flag(p, rpc, "--checkpoint-every", "checkpoint_every", type=int)
    _flag(p, rpc, "--keep-checkpoints", "keep_checkpoints", type=int)
    _flag(p, rpc, "--resume-from", "resume_from")
    _flag(p, rpc, "--resume-job", "resume_job")
    _flag(p, rpc, "--name", "name")
    _flag(p, rpc, "--validate-every", "validate_every", type=int)
    _flag(p, rpc, "--keep-best", "keep_best", action="store_const", const=True)

    rpc = "OptimizeEmbedding"
    p = command("optimize-embedding", "learn an embedding from a target image and/or a loss",
                _generation_flags(rpc), _loss_flags(rpc, required=False), _optimizer_flags(rpc),
                _token_flags(rpc), alias="invert")
    p.add_argument("--target-image", type=Path, help="PNG or .npy (C, H, W) in [0, 1]")
    _flag(p, rpc, "--name", "name")
    _flag(p, rpc, "--image-every", "image_every", type=int)
    _flag(p, rpc, "--prior", "prior")
    _flag(p, rpc, "--prior-weight", "prior_weight", type=float)

    p = command("artifact", "download an artifact (to OUT/ID.safetensors)")
    p.add_argument("id")
    p.add_argument("--format", choices=("native", "diffusers"), default="native",
                   help="diffusers: for pipe.load_lora_weights() / pipe.load_textual_inversion()")

    p = command("delete-artifact", "delete one of your artifacts (its storage quota is freed)")
    p.add_argument("id")
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
    """``stem.safetensors`` (safetensors' numpy API: an SDK dependency that needs no torch)."""
    from safetensors.numpy import save_file

    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
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
def cmd_server(client, args) -> None:
    meta = dataclasses.asdict(client.server_metadata())
    if args.json:
        print(json.dumps(meta, indent=2))
        return
    print(f"{meta['name']} {meta['version']} (API {meta['api_package']}); this SDK: adjointdpm {adjointdpm.__version__}")
    for key in ("models", "losses", "grad_modes", "solvers", "tensor_dtypes", "extensions"):
        print(f"{key}: {', '.join(meta[key]) or '-'}")
    print(f"compute_dtype: {meta['compute_dtype']}")
    print("limits: " + ", ".join(f"{k}={v:g}" for k, v in meta["limits"].items()))


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
    r = client.sample(progress=args.progress, **call_keywords(args))
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
    r = client.compute_gradient(_loss(args), progress=args.progress, **call_keywords(args))
    grads = {**r.gradients, **{f"weights/{k}": v for k, v in r.weight_gradients.items()}}
    _write_tensors({**grads, "x0": r.x0}, args.out, "gradients")
    norms = "  ".join(f"|d/d{k}| {np.linalg.norm(v):.4g}" for k, v in r.gradients.items())
    extra = f"  weights artifact {r.weights_artifact.id}" if r.weights_artifact else ""
    print(f"loss {r.loss:.6g}  {norms}  nfe {r.nfe}{extra}")


def _audit(result, only_flips: bool) -> str:
    """The audit's summary: how many samples' verdicts changed (stop_when.verdict_changed froze
    them there) and how far their images moved from the start (pixels in [0, 1], from the PNGs)."""
    from adjointdpm._pictures import _open

    def pixels(png: bytes) -> np.ndarray:
        return np.asarray(_open(png), dtype=np.float64) / 255.0

    flipped = [k for k, s in enumerate(result.stopped) if s]
    what = "flipped (the classifier's verdict changed)" if only_flips else \
        "stopped (a changed verdict, --stop-below or --patience)"
    line = f"audit: {len(flipped)}/{len(result.stopped)} samples {what}"
    if not flipped:
        return line
    diff = [np.abs(pixels(result.images[k]) - pixels(result.initial_images[k])) for k in flipped]
    rms = np.array([np.sqrt(np.mean(d ** 2)) for d in diff])
    linf = np.array([d.max() for d in diff])
    return (f"{line}; their pixel change from the start (in [0, 1]): RMS mean {rms.mean():.3f} "
            f"max {rms.max():.3f}, L-inf mean {linf.mean():.2f} max {linf.max():.2f}")


def cmd_optimize(client, args) -> None:
    r = client.optimize_latent(_loss(args), progress=args.progress, **call_keywords(args))
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
    if args.stop_on_flip and r.stopped:
        print(_audit(r, only_flips=args.stop_below is None and args.patience is None))


def cmd_finetune(client, args) -> None:
    kwargs = call_keywords(args)
    labels = itertools.cycle(kwargs.pop("labels", None) or [None])
    prompts = itertools.cycle(kwargs.pop("prompt", None) or [""])
    start = kwargs.get("seed") or 0
    if args.condition:  # a prompt set; the held-out examples go through its values in turn
        values = itertools.cycle([c[0] if isinstance(c, tuple) else c for c in args.condition])
        held_out = [{"seed": start + k, **_example_condition(next(values))}
                    for k in range(args.validation)]
        r = client.finetune_weights(_loss(args), [], conditions=args.condition,
                                    progress=args.progress, validation=held_out, **kwargs)
    else:
        examples = [{"seed": start + k, "label": next(labels), "prompt": next(prompts)}
                    for k in range(args.examples + args.validation)]
        r = client.finetune_weights(_loss(args), examples[:args.examples], progress=args.progress,
                                    validation=examples[args.examples:], **kwargs)
    for v in r.validations:
        agreement = "" if v.agreement is None else f", verdicts kept {v.agreement:.0%}"
        print(f"validation after {v.iteration} steps: loss {v.loss:.4g}{agreement}{' (best)' if v.best else ''}")
    _download(client, r.artifact.id, args.out / f"adapter-{r.artifact.id}.safetensors")
    checkpoints = f", checkpoints {' '.join(c.id for c in r.checkpoints)}" if r.checkpoints else ""
    print(f"adapter {r.artifact.id} ({r.artifact.kind}): {_history(r)}{checkpoints}")


def _example_condition(value) -> dict:
    return {"label": value} if isinstance(value, int) else {"prompt": value}


def cmd_invert(client, args) -> None:
    target = _load_image(args.target_image) if args.target_image else None
    r = client.optimize_embedding([_loss(args)] if args.loss else [], target_image=target,
                                  progress=args.progress, **call_keywords(args))
    _write_pngs(r.images, args.out, "inverted_", _scale(args, r.images))
    _download(client, r.artifact.id, args.out / f"{r.artifact.id}.safetensors")  # id: embedding-…
    print(f"embedding {r.artifact.id}: {_history(r)}")


def cmd_artifact(client, args) -> None:
    suffix = "" if args.format == "native" else f".{args.format}"
    _download(client, args.id, args.out / f"{args.id}{suffix}.safetensors", args.format)
    print(f"artifact {args.id}")


def cmd_delete_artifact(client, args) -> None:
    info = client.delete_artifact(args.id)
    print(f"deleted {info.id} ({info.kind}, {info.size} bytes)")


COMMANDS = {"server": cmd_server, "models": cmd_models, "losses": cmd_losses, "sample": cmd_sample,
            "compute-gradient": cmd_grad, "optimize-latent": cmd_optimize,
            "finetune-weights": cmd_finetune, "optimize-embedding": cmd_invert,
            "artifact": cmd_artifact, "delete-artifact": cmd_delete_artifact}


def main(argv: list[str] | None = None) -> int:
    """Run one command; the exit code: 0, 1 for a service or file error, 2 for usage errors."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.handler == "optimize-embedding" and not (args.loss or args.target_image):
            parser.error("optimize-embedding needs --target-image and/or --loss")
        args.progress = args.progress or sys.stderr.isatty()
        with _client(args, parser) as client:
            COMMANDS[args.handler](client, args)
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
