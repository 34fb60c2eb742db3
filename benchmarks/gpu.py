"""GPU figures (never in CI): SD1.5- and SDXL-architecture UNets on CUDA, and every RPC once on CUDA.

Part 1, the core. UNets built from their architectures' configs with random, frozen weights
(nothing downloaded): SD1.5 at 512² images (64×64 latents, 77×768 text) and SDXL base at 1024²
(128×128 latents, 77×2048 text + a 1280 pooled vector and size ids), CFG 7.5 (each network call
a batch of 2), dpm3, in float16 and bfloat16 with the solver state, CFG and gradient sums in
float32 (``sample(…, network_dtype=…)``). Per (architecture, dtype, steps ∈ {20, 50}):

- *sampling*: one ``sample(grad_mode="none")``, CUDA-synchronized wall time;
- *unit*: one UNet forward + backward (to the latent and the text) at the sampler's batch: its
  time and its peak CUDA memory above the resident weights;
- per grad mode — ``auto`` (the default budget: half the free device memory), ``auto`` at a
  one-call budget (room for the states and one call's graph as ``auto`` measures it),
  ``checkpoint``, ``adjoint`` (the paper's) and ``backprop`` — the time of sample + backward of
  L = Σ v·x_0 to x_T and the text, ÷ sampling time, and its peak memory ÷ the unit's. A
  ``backprop`` whose graphs would not fit in 80% of the free memory is skipped.

Issue 13's goals: gradient ≤ 2.2× sampling time with ``auto``; peak ≤ 1.2× one UNet
forward+backward at the one-call budget.

Part 2, the service (``--service``): a tiny Stable Diffusion pipeline and a tiny CLIP built from
config (tests/models/tiny_sd.py), a server on the device in float16 beside the embedded digits
model; every RPC once through the SDK, the CLIP and the classifier losses on the request's
device. A failing RPC is reported, not fatal.

Part 3, the VAE decoder (``--decoder``, models/_decoding.py): SD1.5's VAE at 512² and SDXL's at
1024² (random weights; SDXL's in float32, as ``force_upcast`` loads it), the decoder's VJP from
the latents at batch 1 and 4: today's (the whole graph), slices of one recomputed in the backward
pass, the whole batch and slices of one at each checkpointing level inside the decoder (blocks,
fine), and tiles of 32 latents (approximate, by request) — time and peak CUDA memory.

Cells run in order of importance and the table is rewritten after each, so a run stopped by
``--minutes`` (or killed) still leaves what it measured. On a CUDA machine with the server's
dependencies, from the repository root (an offline image that has torch, transformers and peft
but not diffusers or the gRPC extras takes them as wheels from ``scripts/gpu_wheels.sh``, whose
header shows the install)::

    PYTHONPATH=server:sdk PYTHONUNBUFFERED=1 python3 benchmarks/gpu.py --service --minutes 8

A CPU dry run of the same code paths (tiny configs, minutes)::

    python benchmarks/gpu.py --tiny --device cpu --dtypes bfloat16 --service --out /tmp/gpu.md
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.models.tiny_sd for the service part
sys.path.insert(0, str(ROOT / "benchmarks"))
import memory as M  # noqa: E402  (sd_schedule)
from load import darker  # noqa: E402  (the client-side numpy loss)
RESULTS = ROOT / "benchmarks" / "results" / "gpu.md"
GUIDANCE = 7.5
SOLVER = "dpm3"
MIB = 2**20

# diffusers' UNet2DConditionModel configs of the two architectures (their published configs'
# architecture fields; every other argument is the class default, as in those configs)
SD15 = dict(sample_size=64, cross_attention_dim=768)
SDXL = dict(sample_size=128, block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
            cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
# the same block structure at toy widths, for a CPU dry run
TINY_SD15 = dict(sample_size=16, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                 attention_head_dim=4)
TINY_SDXL = dict(sample_size=16, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2),
                 attention_head_dim=(2, 4), cross_attention_dim=32, use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=16 + 6 * 8)


def architectures(tiny: bool) -> dict[str, dict]:
    """name → UNet config, latent side, text tokens × width, pooled width (SDXL), image side."""
    if tiny:
        return {"sd15": dict(config=TINY_SD15, side=16, tokens=8, width=32, pooled=0, image=128),
                "sdxl": dict(config=TINY_SDXL, side=16, tokens=8, width=32, pooled=16, image=128)}
    return {"sd15": dict(config=SD15, side=64, tokens=77, width=768, pooled=0, image=512),
            "sdxl": dict(config=SDXL, side=128, tokens=77, width=2048, pooled=1280, image=1024)}


def build(arch: dict, dtype: torch.dtype, device: torch.device):
    """(eps_fn in ``dtype``, x_T, cond, uncond, v, schedule); the tensors in float32."""
    from diffusers import UNet2DConditionModel

    from adjointdpm_server.models._diffusers import TextConditionalEps
    from adjointdpm_server.models._packing import TokensAndVector
    from adjointdpm_server.models._sdxl import SDXLEps

    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**arch["config"]).to(dtype).eval().requires_grad_(False)
    if arch["pooled"]:
        layout = TokensAndVector(arch["tokens"], arch["width"], arch["pooled"])
        s = float(arch["image"])
        eps_fn = SDXLEps(unet, layout, torch.tensor([[s, s, 0.0, 0.0, s, s]], device=device))
        rows = layout.shape[0]
    else:
        eps_fn, rows = TextConditionalEps(unet), arch["tokens"]
    g = torch.Generator(device="cpu").manual_seed(1)
    x_T = torch.randn(1, 4, arch["side"], arch["side"], generator=g).to(device)
    cond = (0.1 * torch.randn(1, rows, arch["width"], generator=g)).to(device)
    uncond = torch.zeros_like(cond)
    v = torch.randn(x_T.shape, generator=g).to(device)
    return eps_fn, x_T, cond, uncond, v, M.sd_schedule()


class Meter:
    """Wall time (synchronized) and peak memory above the start of one measured block."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def __enter__(self):
        self.sync()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.sync()
        self.seconds = time.perf_counter() - self.t0
        self.peak_mib = ((torch.cuda.max_memory_allocated(self.device) - self.base) / MIB
                         if self.cuda else float("nan"))
        return False


VAES = {"sd15": (dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                       down_block_types=("DownEncoderBlock2D",) * 4,
                       up_block_types=("UpDecoderBlock2D",) * 4), 512, 0.18215, False),
        "sdxl": (dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                      down_block_types=("DownEncoderBlock2D",) * 4,
                      up_block_types=("UpDecoderBlock2D",) * 4, force_upcast=True), 1024, 0.13025, True)}


def decoder_cells(args, report):
    """The decoder's VJP per (VAE, dtype, batch, plan); an OOM is a result."""
    from diffusers import AutoencoderKL

    from adjointdpm_server.models._decoding import (PLAIN, Checkpointing, DecodePlan, SlicedDecode,
                                                    checkpointed_decoder, gate_decoder, measure)
    from adjointdpm_server.models._tiling import TiledDecode
    from adjointdpm_server.models._latent import vae_dtype

    device = torch.device(args.device)
    for name, (config, image, scale, _) in VAES.items():
        if name not in args.archs:
            continue
        for dtype_name in args.dtypes:
            if args.tiny:
                config = dict(config, block_out_channels=(8, 16, 16, 16), norm_num_groups=8)
                image = 64
            torch.manual_seed(0)
            vae = AutoencoderKL(sample_size=image, **config).eval().requires_grad_(False)
            dtype = vae_dtype(vae.config.force_upcast, getattr(torch, dtype_name))
            vae = vae.to(device, dtype)
            gate_decoder(vae.decoder)

            def decode(x):
                return (vae.decode(x.to(dtype) / scale).sample / 2 + 0.5).clamp(0, 1)
            side = image // 8
            graph = measure(decode, torch.zeros(1, 4, side, side, device=device), vae.decoder)
            for batch in (1, 4):
                blocks, fine = Checkpointing.BLOCKS, Checkpointing.FINE
                for label, plan in (("today", PLAIN), ("slices of 1", DecodePlan(1)),
                                    ("blocks", DecodePlan(0, blocks)), ("blocks, slices of 1", DecodePlan(1, blocks)),
                                    ("fine", DecodePlan(0, fine)), ("fine, slices of 1", DecodePlan(1, fine)),
                                    ("tiles of 32 (approximate)", DecodePlan(1, tile=32))):
                    key = f"{name} VAE {image}² ({dtype}) | {batch} | {label}"
                    if report.out_of_time():
                        report.decoder(key, "not run: --minutes spent")
                        continue
                    x = torch.randn(batch, 4, side, side, device=device).requires_grad_()
                    c = torch.randn(batch, 3, image, image, device=device)
                    try:
                        with Meter(device) as m:
                            if plan.tile:
                                raw = TiledDecode.apply(x.to(dtype) / scale, vae, plan)
                                out = (raw / 2 + 0.5).clamp(0, 1)
                            elif plan.slice_size:
                                out = SlicedDecode.apply(x, decode, plan)
                            else:
                                with checkpointed_decoder(plan.checkpointing):
                                    out = decode(x)
                            torch.autograd.grad(out, x, c.to(out.dtype))
                        report.decoder(key, f"{m.seconds:.2f} | {m.peak_mib:.0f} | "
                                            + ", ".join(f"{g / MIB:.0f}" for g in graph.held))
                    except torch.OutOfMemoryError:
                        report.decoder(key, "out of memory")
                    del x, c
                    if device.type == "cuda":
                        torch.cuda.empty_cache()


def core_cells(args, report):
    device = torch.device(args.device)
    for steps in args.steps:
        for name, arch in architectures(args.tiny).items():
            for dtype_name in args.dtypes if name in args.archs else ():
                key = (name, dtype_name, steps)
                if report.out_of_time():
                    report.skip(key, "not run: --minutes spent")
                    continue
                try:
                    one_cell(arch, getattr(torch, dtype_name), steps, device, report, key)
                except Exception as e:  # noqa: BLE001  (a model that does not build or run is a result)
                    traceback.print_exc()
                    report.skip(key, f"failed: {type(e).__name__}: {e}"[:200])
                if device.type == "cuda":
                    torch.cuda.empty_cache()


def one_cell(arch, dtype, steps, device, report, key):
    from adjointdpm_server.core import sample
    from adjointdpm_server.core._memory import ALLOCATOR_SLACK, graph_bytes

    eps_fn, x_T, cond, uncond, v, schedule = build(arch, dtype, device)
    common = dict(schedule=schedule, steps=steps, solver=SOLVER, guidance_scale=GUIDANCE,
                  uncond=uncond, network_dtype=dtype)

    def gradient(mode, budget=None):
        x, c = x_T.clone().requires_grad_(), cond.clone().requires_grad_()
        with Meter(device) as m:
            x0 = sample(eps_fn, x, c, grad_mode=mode, memory_budget=budget, **common)
            torch.autograd.grad((x0 * v).sum(), [x, c])
        return m

    with torch.no_grad():  # warm-up (kernels, cuDNN plans)
        sample(eps_fn, x_T, cond, grad_mode="none", **dict(common, steps=2))
    with Meter(device) as sampling, torch.no_grad():
        sample(eps_fn, x_T, cond, grad_mode="none", **common)
    x2 = torch.cat([x_T, x_T]).to(dtype).requires_grad_()
    c2 = torch.cat([cond, uncond]).to(dtype).requires_grad_()
    t2 = torch.full((2,), 500.0, device=device)
    with Meter(device) as unit:
        out = eps_fn(x2, t2, c2)
        torch.autograd.grad(out.float().square().sum(), [x2, c2])
        del out
    out = eps_fn(x2, t2, c2)
    graph = graph_bytes(out, list(eps_fn.parameters()) + [x2, c2])
    del out
    state = x_T.numel() * x_T.element_size()
    # inside ``sample`` the call's graph also holds the network-dtype copies of its inputs (the
    # casts from the float32 state and text), which ``graph`` above, taken on those copies, does not
    copies = (x2.numel() + c2.numel()) * x2.element_size()
    one_call = ALLOCATOR_SLACK * (graph + copies) + steps * state
    rows = {}
    plan = [("auto", "auto", None), ("auto, one-call budget", "auto", one_call),
            ("checkpoint", "checkpoint", None), ("adjoint (paper)", "adjoint", None),
            ("backprop", "backprop", None)]
    for label, mode, budget in plan:
        if report.out_of_time():
            rows[label] = "not run: --minutes spent"
            continue
        if mode == "backprop" and device.type == "cuda" and steps * graph > 0.8 * torch.cuda.mem_get_info(device)[0]:
            rows[label] = f"skipped: ~{steps * graph / 2**30:.0f} GiB of graphs"
            continue
        try:
            rows[label] = gradient(mode, budget)
        except torch.OutOfMemoryError:
            rows[label] = "out of memory"
        except Exception as e:  # noqa: BLE001
            rows[label] = f"failed: {type(e).__name__}: {e}"[:200]
        if isinstance(rows[label], str) and device.type == "cuda":
            torch.cuda.empty_cache()  # here, once the exception (and the tensors it held) is gone
        r = rows[label]
        print(*key, label, r if isinstance(r, str) else f"{r.seconds:.2f} s {r.peak_mib:.0f} MiB", flush=True)
    report.cell(key, sampling, unit, graph / MIB, rows)


def service_checks(args, report):
    """Every RPC once on the device, through the SDK against a real server on loopback."""
    import numpy as np

    import adjointdpm
    from adjointdpm_server.config import Limits, ServerConfig
    from adjointdpm_server.wire import build_server
    from tests.models.tiny_sd import build_tiny_clip, build_tiny_sd

    dtype = "float16" if args.device.startswith("cuda") else "float32"
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        sd = build_tiny_sd(root / "sd")
        clip = build_tiny_clip(root / "clip", sd)
        srv = build_server(ServerConfig(models=(f"tiny=diffusers:{sd}", "digits"), port=0, device=args.device,
                                        dtype=dtype, artifact_dir=root / "artifacts", clip_model_dir=clip,
                                        limits=Limits(max_batch=4, max_steps=50)))
        clip_loss = adjointdpm.ServerLoss("clip_similarity", {"text": "a photo of a cat"})
        classifier = adjointdpm.ServerLoss("classifier", {"label": 8})
        darker_loss = adjointdpm.ClientLoss(darker, name="darker", autograd=False)
        gen = dict(model="tiny", prompt="a cat", seed=0, steps=4, guidance_scale=2.0)
        style = np.random.default_rng(1).uniform(size=(3, 16, 16)).astype(np.float32)
        state = {}
        checks = [
            ("ListModels", lambda c: len(c.list_models())),
            ("ListLosses", lambda c: len(c.list_losses())),
            ("Sample (tiny SD)", lambda c: c.sample(**gen).x0.shape),
            ("ComputeGradient (CLIP loss)", lambda c: float(np.abs(c.compute_gradient(clip_loss, **gen)
                                                                    .gradients["x_T"]).sum())),
            ("ComputeGradient (digits classifier)",
             lambda c: float(np.abs(c.compute_gradient(classifier, model="digits", labels=[3], seed=0,
                                                       steps=10).gradients["x_T"]).sum())),
            ("ComputeGradient (client loss)",
             lambda c: float(np.abs(c.compute_gradient(darker_loss, **gen).gradients["x_T"]).sum())),
            ("OptimizeLatent (CLIP loss)",
             lambda c: c.optimize_latent(clip_loss, iterations=2, lr=0.05, **gen).history),
            ("FinetuneWeights (LoRA, gram_style)",
             lambda c: state.setdefault("lora", c.finetune_weights(
                 adjointdpm.ServerLoss("gram_style", {"content_weight": 0.1}, {"style": style}),
                 [{"seed": 0, "prompt": "a cat"}], lora_rank=2, iterations=2, lr=1e-2,
                 **{k: gen[k] for k in ("model", "steps", "guidance_scale")})).history),
            ("OptimizeEmbedding", lambda c: c.optimize_embedding(
                target_image=style, token={"initializer": "cat"}, prompt="a photo of <*>", model="tiny",
                iterations=2, lr=0.05, seed=0, steps=3, guidance_scale=2.0).history),
            ("GetArtifact", lambda c: len(c.download_artifact(state["lora"].artifact.id)[1])),
        ]
        try:
            with adjointdpm.Client(f"127.0.0.1:{srv.port}", timeout=600) as client:
                for name, call in checks:
                    t0 = time.perf_counter()
                    try:
                        result = call(client)
                        report.rpc(name, "ok", time.perf_counter() - t0, repr(result)[:80])
                    except Exception as e:  # noqa: BLE001  (a failing RPC is a finding)
                        report.rpc(name, "FAILED", time.perf_counter() - t0, f"{type(e).__name__}: {e}"[:200])
                        traceback.print_exc()
        finally:
            srv.stop(0)


class Report:
    """The markdown table, rewritten after every cell."""

    def __init__(self, args, started: float):
        self.args, self.started = args, started
        self.cells: list[str] = []
        self.rpcs: list[str] = []
        self.decoders: list[str] = []

    def out_of_time(self) -> bool:
        return time.perf_counter() - self.started > 60 * self.args.minutes

    def skip(self, key, why):
        self.cells.append(f"| {' | '.join(map(str, key))} | {why} | | | | | |")
        self.write()

    def cell(self, key, sampling, unit, graph_mib, rows):
        name, dtype, steps = key
        self.cells.append(f"| {name} | {dtype} | {steps} | sampling | {sampling.seconds:.2f} | 1.00 | "
                          f"{sampling.peak_mib:.0f} | |")
        self.cells.append(f"| {name} | {dtype} | {steps} | one UNet fwd+bwd (unit; graph {graph_mib:.0f} MiB) | "
                          f"{unit.seconds:.3f} | | {unit.peak_mib:.0f} | 1.00 |")
        for label, m in rows.items():
            if isinstance(m, str):
                self.cells.append(f"| {name} | {dtype} | {steps} | {label} | {m} | | | |")
            else:
                self.cells.append(f"| {name} | {dtype} | {steps} | {label} | {m.seconds:.2f} | "
                                  f"{m.seconds / sampling.seconds:.2f} | {m.peak_mib:.0f} | "
                                  f"{m.peak_mib / unit.peak_mib:.2f} |")
        self.write()

    def decoder(self, key, result):
        self.decoders.append(f"| {key} | {result} |")
        print(self.decoders[-1], flush=True)
        self.write()

    def rpc(self, name, status, seconds, detail):
        self.rpcs.append(f"| {name} | {status} | {seconds:.1f} | {detail.replace('|', '/')} |")
        print(self.rpcs[-1], flush=True)
        self.write()

    def write(self):
        device = torch.device(self.args.device)
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU"
        lines = ["# GPU figures" + (" (CPU dry run, tiny configs)" if self.args.tiny else ""), "",
                 f"- command: `python {' '.join(['benchmarks/gpu.py'] + sys.argv[1:])}`",
                 f"- date (UTC): {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M}; device: "
                 f"{name}; torch {torch.__version__}",
                 f"- random-weight UNets from config, batch 1, CFG {GUIDANCE} (network batch 2), {SOLVER}; "
                 "solver state, CFG and gradient sums in float32; gradient of Σ v·x_0 w.r.t. x_T and "
                 "the text conditioning; peak = CUDA memory above the resident weights", ""]
        if self.cells:
            lines += ["| UNet | network dtype | steps | what | seconds | ÷ sampling | peak MiB | ÷ unit |",
                      "|---|---|---:|---|---:|---:|---:|---:|", *self.cells, ""]
        if self.decoders:
            lines += ["## The VAE decoder's VJP (models/_decoding.py)", "",
                      "| VAE (dtype) | batch | plan | seconds | peak MiB | one sample's graph MiB as planned (none, blocks, fine) |",
                      "|---|---:|---|---:|---:|---|", *self.decoders, ""]
        if self.rpcs:
            lines += ["## Every RPC once on the device (tiny SD + digits, float16 on CUDA)", "",
                      "| RPC | status | seconds | result |", "|---|---|---:|---|", *self.rpcs, ""]
        self.args.out.parent.mkdir(parents=True, exist_ok=True)
        self.args.out.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtypes", nargs="+", default=["float16", "bfloat16"])
    parser.add_argument("--archs", nargs="+", default=["sd15", "sdxl"], choices=["sd15", "sdxl"])
    parser.add_argument("--steps", nargs="+", type=int, default=[20, 50])
    parser.add_argument("--tiny", action="store_true", help="toy widths of the same architectures")
    parser.add_argument("--service", action="store_true", help="also every RPC once on the device")
    parser.add_argument("--decoder", action="store_true", help="also the VAE decoder's VJP per plan")
    parser.add_argument("--minutes", type=float, default=8.0, help="no new cell starts after this")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("no CUDA device: use --device cpu --tiny for a dry run")
    report = Report(args, time.perf_counter())
    if args.service:  # first: it is short, and it checks the CUDA paths the cells do not
        service_checks(args, report)
    if args.decoder:
        decoder_cells(args, report)
    core_cells(args, report)
    report.write()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
