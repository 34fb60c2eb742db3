"""Train the embedded `digits` model: a class-conditional DPM on scikit-learn's 8×8 digits.

    .venv/bin/python scripts/train_digits_dpm.py          # `digits`, ~15 min on 2 CPU cores
    .venv/bin/python scripts/train_digits_dpm.py --flow   # `digits-flow`, the same network as a
                                                          # rectified flow predicting velocity

A diffusers ``UNet2DModel`` with a class embedding (label 10 = "no class", used with probability
0.1 during training so that classifier-free guidance works), ε-prediction on a cosine schedule
(``squaredcos_cap_v2``, 1000 steps), AdamW with cosine decay and an EMA of the weights
(diffusers' ``EMAModel``). Writes the EMA weights in fp16 safetensors, the scheduler config and
``training.json`` under server/adjointdpm_server/models/weights/digits/.

``--flow`` trains the same UNet on the rectified-flow path ``x_σ = (1 − σ) x_0 + σ ε`` to predict
the velocity ``u = ε − x_0`` (flow matching, as SD3 and FLUX are trained), with σ uniform in
(0, 1) and the network's timestep ``1000·σ`` (SD3's convention); the scheduler config written is
``FlowMatchEulerDiscreteScheduler(shift=1)``. Output: weights/digits-flow/.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler, UNet2DModel
from diffusers.training_utils import EMAModel

from adjointdpm_server.models._digits_data import load_digits_split

WEIGHTS = Path(__file__).resolve().parents[1] / "server/adjointdpm_server/models/weights"
NULL_CLASS = 10
UNET_CONFIG = dict(
    sample_size=8, in_channels=1, out_channels=1, layers_per_block=2,
    block_out_channels=(48, 96, 96),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    num_class_embeds=11, norm_num_groups=16, attention_head_dim=32,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=150)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--p-uncond", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--flow", action="store_true", help="rectified flow, velocity target (digits-flow)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    args.out = args.out or WEIGHTS / ("digits-flow" if args.flow else "digits")
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    data = load_digits_split()
    x_all, y_all = data["train_x"], data["train_y"]
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    abar = scheduler.alphas_cumprod
    unet = UNet2DModel(**UNET_CONFIG)
    ema = EMAModel(unet.parameters(), decay=0.999, use_ema_warmup=True)
    steps_per_epoch = -(-len(y_all) // args.batch)
    total = args.epochs * steps_per_epoch
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=1e-4)
    lr_sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=total, pct_start=0.05)

    start, step = time.time(), 0
    for epoch in range(args.epochs):
        running = 0.0
        for idx in torch.randperm(len(y_all), generator=gen).split(args.batch):
            x0, labels = x_all[idx], y_all[idx].clone()
            labels[torch.rand(len(idx), generator=gen) < args.p_uncond] = NULL_CLASS
            noise = torch.randn(x0.shape, generator=gen)
            if args.flow:
                sigma = torch.rand(len(idx), generator=gen)
                s4 = sigma.view(-1, 1, 1, 1)
                x_t = (1 - s4) * x0 + s4 * noise
                loss = F.mse_loss(unet(x_t, 1000 * sigma, class_labels=labels).sample, noise - x0)
            else:
                t = torch.randint(0, 1000, (len(idx),), generator=gen)
                a = abar[t].sqrt().view(-1, 1, 1, 1)
                x_t = a * x0 + (1 - a * a).sqrt() * noise
                loss = F.mse_loss(unet(x_t, t, class_labels=labels).sample, noise)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
            opt.step()
            lr_sched.step()
            ema.step(unet.parameters())
            running += float(loss)
            step += 1
        if epoch % 10 == 0 or epoch == args.epochs - 1:
            print(f"epoch {epoch:4d}  loss {running / steps_per_epoch:.4f}  {time.time() - start:6.0f}s", flush=True)

    ema.copy_to(unet.parameters())
    args.out.mkdir(parents=True, exist_ok=True)
    unet.to(torch.float16).save_pretrained(args.out / "unet")
    if args.flow:
        FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0).save_pretrained(args.out / "scheduler")
    else:
        scheduler.save_pretrained(args.out / "scheduler")
    info = {"objective": "rectified flow, velocity" if args.flow else "ε, cosine VP","epochs": args.epochs, "batch": args.batch, "lr": args.lr, "p_uncond": args.p_uncond,
            "seed": args.seed, "optimizer_steps": step, "train_images": len(y_all),
            "train_seconds": round(time.time() - start), "torch_threads": torch.get_num_threads(),
            "parameters": sum(p.numel() for p in unet.parameters()), "null_class": NULL_CLASS}
    (args.out / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info))


if __name__ == "__main__":
    main()
