"""COCO AP of a trained checkpoint with each optimize_for_cpu mode (fp32 eager, fast, bf16) on its
validation set: does bf16 cost accuracy? The issue's bar: bf16 within 0.5 AP points of fp32.

    .venv/bin/python benchmarks/bf16_accuracy.py --weights runs/demo/best.pth
    .venv/bin/python benchmarks/bf16_accuracy.py --weights W.pth --annotations val.json --images val/

Without --annotations the validation data named in the checkpoint's config is used (the shapes
data is generated where its config says, relative to the working directory, when missing).
Prints box / mask / keypoint AP and the time of each mode, and the bf16 - fp32 differences.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from maskrcnn.checkpoint.format import load_checkpoint, read_checkpoint
from maskrcnn.data.coco import CocoDataset
from maskrcnn.engine.cpu_inference import has_fast_bf16, optimize_for_cpu
from maskrcnn.engine.evaluation import evaluate


def validation_files(checkpoint: dict, annotations: str | None, images: str | None) -> tuple[Path, Path]:
    if annotations:
        if not images:
            raise SystemExit("bf16_accuracy: --annotations needs --images")
        return Path(annotations), Path(images)
    data = (checkpoint.get("config") or {}).get("data") or {}
    if data.get("name") == "shapes":
        from maskrcnn.data.shapes import ensure_shapes

        paths = ensure_shapes(data["root"], num_train=data["shapes_train_images"], num_val=data["shapes_val_images"],
                              image_size=data["shapes_image_size"], seed=data["shapes_seed"])
        return paths["val_annotations"], paths["val_images"]
    if not data.get("val", {}).get("annotations"):
        raise SystemExit("bf16_accuracy: the checkpoint names no validation data: pass --annotations and --images")
    return Path(data["val"]["annotations"]), Path(data["val"]["images"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", required=True, help="a checkpoint written by maskrcnn train / demo")
    parser.add_argument("--annotations", help="COCO json of the validation images")
    parser.add_argument("--images", help="their folder")
    parser.add_argument("--modes", default="eager,fast,bf16")
    parser.add_argument("--limit", type=int, help="only the first LIMIT images (a quicker, noisier AP)")
    args = parser.parse_args()

    checkpoint = read_checkpoint(args.weights)
    model = load_checkpoint(checkpoint).eval()
    annotations, images = validation_files(checkpoint, args.annotations, args.images)
    dataset = CocoDataset(annotations, images)
    print(f"{args.weights}: {args.limit or len(dataset)} images of {annotations}; {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.1f}, bf16 units: {has_fast_bf16()}")
    indices = list(range(min(args.limit, len(dataset)))) if args.limit else None
    results = {}
    for mode in args.modes.split(","):
        optimized = optimize_for_cpu(model, mode=mode)
        start = time.perf_counter()
        with torch.no_grad():
            metrics = evaluate(optimized, dataset, device="cpu", batch_size=1, indices=indices)
        elapsed = time.perf_counter() - start
        results[mode] = {iou_type: values["AP"] for iou_type, values in metrics.items() if "AP" in values}
        aps = ", ".join(f"{k} AP {100 * v:.2f}" for k, v in results[mode].items())
        print(f"{mode:6s} ({optimized.inference_mode}): {aps}; {elapsed:.1f} s", flush=True)
    if "bf16" in results and "eager" in results:
        diffs = ", ".join(f"{k} {100 * (results['bf16'][k] - results['eager'][k]):+.2f}" for k in results["eager"])
        print(f"bf16 - fp32 eager, AP points: {diffs}")


if __name__ == "__main__":
    main()
