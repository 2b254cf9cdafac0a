"""What one training step of the two-class ResNet-50U-Net costs here, and what issue 20's
training protocol (``training/train_semisup.sh``) would therefore take on this machine.

One step is forward, loss-free backward of the mean logit and an Adam update, float32, at batch
``--batch`` (2 fits any CPU's memory; the GPU script uses 8); inference is one forward pass in
``no_grad``. Each is timed ``--runs`` times after one warm-up; medians are quoted.

The estimate multiplies the median seconds per image by the protocol's image-steps: the teacher
sees the 32 labelled training slices for 300 epochs; the student 200 epochs of as many
labelled as pseudo-labelled slices per step (``--unlabeled-batch`` 0); the teacher labels the
1600 unlabelled slices once. Loading, augmentation, validation and evaluation are left out, so
the figure is a lower bound.

Usage: ``python benchmarks/train_step.py [--size 512] [--batch 2] [--runs 3]``; prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from typing import Any

import torch

from ggo_cli.host import cpu_features
from training.models import build_model

TRAIN_SLICES = 32
"""Labelled training slices of the seed-0 split (the shipped model card's split)."""
TEACHER_EPOCHS = 300
STUDENT_EPOCHS = 200
UNLABELED_SLICES = 1600


def _median_seconds(fn: Any, runs: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def measure(size: int, batch: int, runs: int) -> dict[str, Any]:
    """Median seconds per image of a training step and of inference at ``size``."""
    torch.manual_seed(0)
    model = build_model("resnet50-unet", out_channels=2)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-4)
    image = torch.randn(batch, 1, size, size)

    def step() -> None:
        optimizer.zero_grad()
        model(image).float().mean().backward()
        optimizer.step()

    def infer() -> None:
        with torch.no_grad():
            model(image)

    model.train()
    train_s = _median_seconds(step, runs) / batch
    model.eval()
    infer_s = _median_seconds(infer, runs) / batch
    image_steps = TRAIN_SLICES * TEACHER_EPOCHS + 2 * TRAIN_SLICES * STUDENT_EPOCHS
    estimate_s = image_steps * train_s + UNLABELED_SLICES * infer_s
    return {
        "size": size,
        "batch": batch,
        "runs": runs,
        "train_s_per_image_median": round(train_s, 3),
        "infer_s_per_image_median": round(infer_s, 3),
        "protocol_image_steps": image_steps,
        "protocol_lower_bound_hours": round(estimate_s / 3600, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    result = {
        "machine": {
            "platform": platform.platform(),
            "cores": os.cpu_count(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            **cpu_features(),
        },
        **measure(args.size, args.batch, args.runs),
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
