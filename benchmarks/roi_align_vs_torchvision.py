"""One RoIAlign call, forward and backward, ours (`maskrcnn.model.roi_align`) against torchvision's.

    python benchmarks/roi_align_vs_torchvision.py [--threads N] [--rounds 5]

Cases: the demo's box and mask poolers (every RoI on P2 of a 160 px batch of 4) and R50-FPN's box
pooler on P2 at 800 px, with sampling ratio 2 and 0 (ROIAlignV2's adaptive grid). Random features,
RoIs spread over the map (the first column sorted, as the poolers pass them). Both run in
interleaved rounds; prints the median milliseconds of each and the ratio, and the largest
difference of the outputs and of the features' gradients (float rounding: the same terms summed
in another order).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torchvision.ops import roi_align as torchvision_roi_align

from maskrcnn.model.roi_align import roi_align

# name: (RoIs, channels, map height, map width, output size, sampling ratio, images)
CASES = {
    "demo box pooler": (512, 64, 40, 40, 7, 2, 4),
    "demo mask pooler": (128, 64, 40, 40, 14, 2, 4),
    "R50 box pooler, P2 at 800 px": (512, 256, 200, 272, 7, 2, 1),
    "R50 box pooler, P4, adaptive grid": (512, 256, 50, 68, 7, 0, 1),
}


def _inputs(rois: int, channels: int, height: int, width: int, images: int, generator: torch.Generator):
    scale = 0.25  # the map's stride in input pixels
    extent = torch.tensor([width, height]) / scale
    corner = torch.rand(rois, 2, generator=generator) * extent * 0.9
    size = torch.rand(rois, 2, generator=generator) * extent * 0.15 + 2 / scale
    image = torch.randint(0, images, (rois, 1), generator=generator).sort(dim=0).values.float()
    features = torch.randn(images, channels, height, width, generator=generator)
    return features, torch.cat([image, corner, corner + size], dim=1), scale


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(f"{torch.get_num_threads()} thread(s), {args.rounds} rounds; forward + backward of one call, ms")
    generator = torch.Generator().manual_seed(0)
    for name, (rois, channels, height, width, output, ratio, images) in CASES.items():
        features, boxes, scale = _inputs(rois, channels, height, width, images, generator)
        grad_output = torch.randn(rois, channels, output, output, generator=generator)
        results = {}

        def call(function) -> tuple[torch.Tensor, torch.Tensor]:
            leaf = features.clone().requires_grad_(True)
            pooled = function(leaf, boxes, output, spatial_scale=scale, sampling_ratio=ratio, aligned=True)
            (grad,) = torch.autograd.grad(pooled, leaf, grad_output)
            return pooled.detach(), grad

        functions = {"ours": roi_align, "torchvision": torchvision_roi_align}
        for label, function in functions.items():
            results[label] = call(function)  # warm-up, and the values compared below
        times = {label: [] for label in functions}
        for _ in range(args.rounds):
            for label, function in functions.items():
                started = time.perf_counter()
                call(function)
                times[label].append((time.perf_counter() - started) * 1e3)
        ours, theirs = statistics.median(times["ours"]), statistics.median(times["torchvision"])
        output_error = (results["ours"][0] - results["torchvision"][0]).abs().max().item()
        grad_error = (results["ours"][1] - results["torchvision"][1]).abs().max().item()
        print(f"{name:36s} ours {ours:7.1f}  torchvision {theirs:7.1f}  tv / ours {theirs / ours:5.2f}x   "
              f"max |diff| output {output_error:.1e}, gradient {grad_error:.1e}")


if __name__ == "__main__":
    main()
