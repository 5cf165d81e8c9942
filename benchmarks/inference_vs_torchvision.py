"""Whole-model inference: our MaskRCNN against torchvision's with the same weights, in one process.

    .venv/bin/python benchmarks/inference_vs_torchvision.py                 # maskrcnn, CPU
    .venv/bin/python benchmarks/inference_vs_torchvision.py --arch keypointrcnn --device cuda

Builds torchvision's `<arch>_resnet50_fpn` with seeded random weights (nothing is downloaded),
converts it with `maskrcnn.from_torchvision`, runs both on the same images, prints the median time
of each, the ratio, and whether the outputs agree (max difference of boxes, scores, masks, keypoints).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torchvision

from maskrcnn.checkpoint.torchvision import from_torchvision

BUILDERS = {
    "fasterrcnn": torchvision.models.detection.fasterrcnn_resnet50_fpn,
    "maskrcnn": torchvision.models.detection.maskrcnn_resnet50_fpn,
    "keypointrcnn": torchvision.models.detection.keypointrcnn_resnet50_fpn,
}


def build_torchvision(arch: str, seed: int, min_size: int, max_size: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = BUILDERS[arch](weights=None, weights_backbone=None, min_size=min_size, max_size=max_size,
                           box_score_thresh=0.0)
    # With random weights the class logits spread over tens of units: every softmax score rounds to
    # exactly 1.0 and the order of tied detections is arbitrary. A softer classifier gives distinct
    # scores, so that the two models' outputs can be compared one by one.
    with torch.no_grad():
        model.roi_heads.box_predictor.cls_score.weight.mul_(0.25)
    return model.eval()


def timed(fn, repeats: int, device: torch.device) -> tuple[float, object]:
    times, output = [], None
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        with torch.no_grad():
            output = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), output


def max_difference(ours: list[dict], theirs: list[dict]) -> dict[str, float]:
    differences: dict[str, float] = {}
    for mine, reference in zip(ours, theirs):
        for key in reference:
            if mine[key].shape != reference[key].shape:
                differences[key] = float("inf")
                continue
            if mine[key].numel():
                diff = (mine[key].float() - reference[key].float()).abs().max().item()
                differences[key] = max(differences.get(key, 0.0), diff)
    return differences


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=sorted(BUILDERS), default="maskrcnn")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--images", type=int, default=2, help="images per batch")
    parser.add_argument("--size", type=int, default=320, help="min_size of both models (shorter side)")
    parser.add_argument("--max-size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    device = torch.device(args.device)
    theirs = build_torchvision(args.arch, args.seed, args.size, args.max_size).to(device)
    ours = from_torchvision(theirs).to(device)  # copies theirs' settings (sizes, thresholds) too
    generator = torch.Generator().manual_seed(args.seed)
    images = [torch.rand(3, args.size + 37 * i, args.size + 61 * i, generator=generator).to(device)
              for i in range(args.images)]

    timed(lambda: theirs(images), 1, device)  # warm-up
    timed(lambda: ours(images), 1, device)
    # interleaved, so that a change in the machine's load affects both sides alike
    times_theirs, times_ours = [], []
    for _ in range(args.repeats):
        elapsed, out_theirs = timed(lambda: theirs(images), 1, device)
        times_theirs.append(elapsed)
        elapsed, out_ours = timed(lambda: ours(images), 1, device)
        times_ours.append(elapsed)
    time_theirs, time_ours = statistics.median(times_theirs), statistics.median(times_ours)

    counts = [len(o["boxes"]) for o in out_theirs]
    same_counts = counts == [len(o["boxes"]) for o in out_ours]
    print(f"{args.arch}_resnet50_fpn, {args.images} images of ~{args.size}px, device {device}, "
          f"torch {torch.__version__}, torchvision {torchvision.__version__}")
    print(f"torchvision: {time_theirs * 1000:8.1f} ms / batch")
    print(f"ours:        {time_ours * 1000:8.1f} ms / batch")
    print(f"ratio ours / torchvision: {time_ours / time_theirs:.3f}")
    print(f"detections per image: {counts}, equal counts: {same_counts}")
    for key, diff in max_difference(out_ours, out_theirs).items():
        print(f"  max |difference| {key:17s} {diff:.2e}")


if __name__ == "__main__":
    main()
