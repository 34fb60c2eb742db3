"""Train the digits classifier shipped with the embedded `digits` model.

    .venv/bin/python scripts/train_digits_classifier.py     # ~1 min on 2 CPU cores

Writes server/adjointdpm_server/models/weights/digits/classifier.safetensors and prints the
held-out accuracy (also stored in the file's metadata). Deterministic for a given seed.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from adjointdpm_server.models._digits_classifier import DigitsClassifier
from adjointdpm_server.models._digits_data import load_digits_split

OUT = Path(__file__).resolve().parents[1] / "server/adjointdpm_server/models/weights/digits/classifier.safetensors"


def shift(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random ±1-pixel translations (zero = background −1): robustness to generated samples."""
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)
    dx, dy = torch.randint(0, 3, (2,), generator=gen).tolist()
    return padded[..., dy:dy + 8, dx:dx + 8]


def accuracy(model: DigitsClassifier, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    data = load_digits_split()
    model = DigitsClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.epochs)
    start = time.time()
    n = len(data["train_y"])
    for epoch in range(args.epochs):
        model.train()
        for idx in torch.randperm(n, generator=gen).split(64):
            x = shift(data["train_x"][idx], gen)
            loss = F.cross_entropy(model(x), data["train_y"][idx], label_smoothing=0.05)
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    model.eval()
    acc = accuracy(model, data["test_x"], data["test_y"])
    meta = {"test_accuracy": f"{acc:.4f}", "epochs": str(args.epochs), "seed": str(args.seed),
            "train_seconds": f"{time.time() - start:.0f}", "held_out": str(len(data["test_y"]))}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(args.out), metadata=meta)
    print(json.dumps(meta))


if __name__ == "__main__":
    main()
