"""The demo: start the server on the embedded digits model and drive it with the SDK.

1. starts ``adjointdpm-server --model digits`` on a free loopback port (a real gRPC server);
2. samples a grid of digits through ``Client.sample`` → out/digits_grid.png;
3. steers the noise of eight unconditional samples toward a chosen digit with a *client-side*
   loss (a small CNN classifier that runs here, in this process, with torch autograd): the
   server samples, sends x_0's image over the stream, this process answers with the loss and
   ∂L/∂image, the server propagates it back to x_T (AdjointDPM) and takes an Adam step; x_T stays
   on its sphere → out/digits_steer_to_<digit>.png (before above, after below);
4. asks for one gradient with a server-side loss, and prints its norm and the network calls.

    ./scripts/demo.sh                 # or: .venv/bin/python examples/demo.py --digit 3
"""

from __future__ import annotations

import argparse
import io
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

import adjointdpm

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "out"
CLASSIFIER = ROOT / "server" / "adjointdpm_server" / "models" / "weights" / "digits" / "classifier.safetensors"


def start_server(log_path: Path) -> tuple[subprocess.Popen, str]:
    """The server in its own process; returns it and its address once it listens."""
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "adjointdpm_server", "--model", "digits",
                             "--model", "digits-flow", "--port", "0",
                             "--max-batch", "80", "--artifact-dir", str(OUT / "artifacts")],
                            stdout=subprocess.PIPE, stderr=log, text=True)
    line = proc.stdout.readline()
    match = re.search(r"listening on (\S+)", line)
    if not match:
        proc.kill()
        raise SystemExit(f"the server did not start; see {log_path}")
    return proc, match.group(1)


def grid_png(images: list[bytes], rows: int, path: Path, scale: int = 8, *,
             row_labels=(), column_labels=()) -> None:
    """PNG tiles (8×8 grey) → one picture, ``rows`` rows, dark ink on white, upscaled, with a
    label left of each row and above each column."""
    from PIL import ImageDraw, ImageFont

    tiles = [np.asarray(Image.open(io.BytesIO(png)), dtype=np.float32) / 255 for png in images]
    h, w = tiles[0].shape
    cols = -(-len(tiles) // rows)
    grid = np.ones((rows * (h + 1) + 1, cols * (w + 1) + 1), np.float32)
    for k, tile in enumerate(tiles):
        r, c = divmod(k, cols)
        grid[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + c * (w + 1):1 + c * (w + 1) + w] = tile
    picture = Image.fromarray((255 * (1 - grid)).astype(np.uint8))
    picture = picture.resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST)
    left, top = (56 if row_labels else 0), (16 if column_labels else 0)
    canvas = Image.new("L", (picture.width + left, picture.height + top), 255)
    canvas.paste(picture, (left, top))
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default()
    for c, text in enumerate(column_labels):
        draw.text((left + (1 + c * (w + 1) + w // 2) * scale - 3, 2), str(text), fill=0, font=font)
    for r, text in enumerate(row_labels):
        draw.text((4, top + (1 + r * (h + 1) + h // 2) * scale - 6), str(text), fill=0, font=font)
    canvas.save(path)


def client_classifier():
    """The client's own model: a small digits CNN, weights read from a local file."""
    import torch
    from safetensors.torch import load_file
    from torch import nn

    net = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.GELU(), nn.Conv2d(32, 32, 3, padding=1),
                        nn.GELU(), nn.AvgPool2d(2), nn.Conv2d(32, 64, 3, padding=1), nn.GELU(),
                        nn.AvgPool2d(2), nn.Flatten(), nn.Linear(256, 128), nn.GELU(), nn.Linear(128, 10))
    state = load_file(str(CLASSIFIER))
    net.load_state_dict({k.replace("body.", "").replace("head.", "11."): v for k, v in state.items()})
    return net.eval().requires_grad_(False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--digit", type=int, default=8, help="the class to steer toward")
    parser.add_argument("--iterations", type=int, default=15)
    parser.add_argument("--target", help="use a running server (host:port) instead of starting one")
    args = parser.parse_args()
    OUT.mkdir(exist_ok=True)

    import torch

    proc = None
    if args.target is None:
        start = time.perf_counter()
        proc, target = start_server(OUT / "server.log")
        print(f"server: digits model resident on {target} (started in {time.perf_counter() - start:.1f} s; "
              f"log in {OUT / 'server.log'})")
    else:
        target = args.target
    try:
        with adjointdpm.Client(target, timeout=600) as client:
            model = client.list_models()[0]
            print(f"model {model['name']}: latents {model['latent_shape']}, default "
                  f"{model['default_steps']} steps, CFG {model['default_guidance']}")

            start = time.perf_counter()
            labels = [d for d in range(10) for _ in range(8)]
            grid = client.sample(labels=labels, seed=0, steps=20)
            column_major = [grid.images[d * 8 + r] for r in range(8) for d in range(10)]
            grid_png(column_major, 8, OUT / "digits_grid.png", column_labels=range(10))
            print(f"sample: 80 digits (dpm3, 20 steps, CFG 2) in {time.perf_counter() - start:.1f} s "
                  f"→ {OUT / 'digits_grid.png'}")

            net = client_classifier()
            digit = args.digit

            @adjointdpm.loss("to_digit")
            def to_digit(image):  # runs here, on the client; the server only sees numbers
                logits = net(image * 2 - 1)  # one loss per sample: the objective is their sum
                return torch.nn.functional.cross_entropy(logits, torch.full((len(image),), digit),
                                                         reduction="none")

            def show(event):
                if event.WhichOneof("kind") == "iteration" and event.iteration.iteration % 5 == 0:
                    it = event.iteration
                    print(f"  iteration {it.iteration:2d}: loss {it.loss:.3f}  |∂L/∂x_T| {it.grad_norm:.3f}")

            start = time.perf_counter()
            steered = client.optimize_latent("to_digit", iterations=args.iterations, lr=0.1,
                                             constraint="sphere", seed=1, batch=8, steps=10,
                                             guidance_scale=1.0, on_event=show,
                                             stop_when={"loss_below": 0.05})  # per sample
            before = _predict(net, steered.initial_images)
            after = _predict(net, steered.images)
            path = OUT / f"digits_steer_to_{digit}.png"
            grid_png(steered.initial_images + steered.images, 2, path, row_labels=["before", "after"])
            print(f"optimize_latent → {digit} with a client-side loss: loss {steered.history[0]:.3f} → "
                  f"{steered.loss:.3f}; classified as {digit}: {np.mean(before == digit):.0%} → "
                  f"{np.mean(after == digit):.0%}; {sum(steered.stopped)}/8 samples stopped early "
                  f"(p ≥ 0.95), the call after {steered.iterations_run} iterations "
                  f"({time.perf_counter() - start:.1f} s) → {path}")

            grad = client.compute_gradient(adjointdpm.ServerLoss("classifier", {"label": digit}),
                                           targets=["x_T", "cond"], labels=3, seed=0, steps=20)
            print(f"compute_gradient (server-side classifier loss, checkpoint mode): loss {grad.loss:.3f}, "
                  f"|∂L/∂x_T| {np.linalg.norm(grad.gradients['x_T']):.3f}, "
                  f"|∂L/∂cond| {np.linalg.norm(grad.gradients['cond']):.3f}, {grad.nfe} network calls")

            # the same through a flow-matching model (rectified flow predicting velocity, as
            # SD3/FLUX do): same RPCs, same solvers, the path and target declared by the model
            start = time.perf_counter()
            flow = client.sample(model="digits-flow", labels=[d for d in range(10) for _ in range(4)],
                                 seed=0, steps=20)
            grid_png([flow.images[d * 4 + r] for r in range(4) for d in range(10)], 4,
                     OUT / "digits_flow_grid.png", column_labels=range(10))
            flow_grad = client.compute_gradient(adjointdpm.ServerLoss("classifier", {"label": digit}),
                                                targets=["x_T"], model="digits-flow", labels=3, seed=0,
                                                steps=20)
            print(f"digits-flow (rectified flow, velocity): 40 digits in {time.perf_counter() - start:.1f} s "
                  f"→ {OUT / 'digits_flow_grid.png'}; compute_gradient loss {flow_grad.loss:.3f}, "
                  f"|∂L/∂x_T| {np.linalg.norm(flow_grad.gradients['x_T']):.3f}")
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)


def _predict(net, pngs: list[bytes]) -> np.ndarray:
    import torch

    x = np.stack([np.asarray(Image.open(io.BytesIO(p)), dtype=np.float32)[None] / 255 for p in pngs])
    with torch.no_grad():
        return net(torch.from_numpy(x) * 2 - 1).argmax(1).numpy()


if __name__ == "__main__":
    main()
