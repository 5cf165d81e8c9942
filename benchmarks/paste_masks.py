"""Pasting masks into images: our batched `paste_masks` against torchvision's `paste_masks_in_image`
(one Python-level resize and copy per mask), in one process, on the same masks and boxes.

    .venv/bin/python benchmarks/paste_masks.py [--device cuda] [--repeats 5]

Boxes have log-uniform sides between 16 and 512 pixels (small and large objects, as detections
are) and centres anywhere in the image, clipped to it; masks are random 28 x 28 probabilities.
Prints the median wall time of each, the ratio, the ratio of the processes' CPU times (steadier
on a shared machine) and the largest difference between the two results.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
from torchvision.models.detection.roi_heads import paste_masks_in_image

from maskrcnn.model.mask_head import paste_masks

CASES = [  # (masks, height, width)
    (100, 1080, 1920),
    (100, 800, 1333),
    (20, 480, 640),
    (300, 1080, 1920),
]


def make_inputs(num_masks: int, height: int, width: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(num_masks * 7 + height)
    sides = torch.exp(torch.empty(num_masks, 2).uniform_(math.log(16), math.log(512), generator=g))
    centres = torch.rand(num_masks, 2, generator=g) * torch.tensor([float(width), float(height)])
    boxes = torch.cat([centres - sides / 2, centres + sides / 2], dim=1)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)  # detections are clipped to the image
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
    masks = torch.rand(num_masks, 1, 28, 28, generator=g)
    return masks.to(device), boxes.to(device)


def median_seconds(function, repeats: int, device: torch.device) -> tuple[float, float]:
    """Median wall-clock and process CPU seconds of `function()` over `repeats` runs."""
    wall, cpu = [], []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        result = function()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        wall.append(time.perf_counter() - start_wall)
        cpu.append(time.process_time() - start_cpu)
        del result
    return statistics.median(wall), statistics.median(cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"device {device}, torch threads {torch.get_num_threads()}, median of {args.repeats} runs")
    columns = ("masks", 6), ("image", 11), ("ours ms", 9), ("torchvision ms", 15), ("ratio", 7), ("cpu ratio", 9)
    print(" ".join(f"{name:>{width}}" for name, width in columns), f"{'max diff':>9}")
    for num_masks, height, width in CASES:
        masks, boxes = make_inputs(num_masks, height, width, device)
        ours = paste_masks(masks, boxes, (height, width))
        theirs = paste_masks_in_image(masks, boxes, (height, width))
        max_diff = (ours - theirs).abs().max().item()
        del ours, theirs
        ours_s, ours_cpu = median_seconds(lambda: paste_masks(masks, boxes, (height, width)), args.repeats, device)
        theirs_s, theirs_cpu = median_seconds(
            lambda: paste_masks_in_image(masks, boxes, (height, width)), args.repeats, device
        )
        print(
            f"{num_masks:>6} {f'{width}x{height}':>11} {ours_s * 1e3:>9.1f} {theirs_s * 1e3:>15.1f} "
            f"{theirs_s / ours_s:>6.1f}x {theirs_cpu / ours_cpu:>8.1f}x {max_diff:>9.1e}"
        )


if __name__ == "__main__":
    main()
