"""Peak memory of `maskrcnn predict` on a large image (default: 4000 x 3000, 100 detections).

Each measurement runs in its own process (peak RSS is per process): Mask R-CNN R50-FPN at
torchvision's 800 px, seeded random weights with the box score threshold at 0 so that the image
gets `--detections` detections, one `--size` image decoded from a JPEG file. It reports the
process's peak RSS and the RSS before the prediction (weights, libraries, the decoded image):

  compact  `engine.predict.predict` as `maskrcnn predict` runs it: masks kept 28 x 28 over their
           boxes and pasted a few at a time for drawing and RLE encoding
  dense    the former pipeline: `model([image])` pastes every mask at the image size, the
           detections are selected (`output[keep]`, a copy), drawn and RLE-encoded all at once

    python benchmarks/predict_memory.py                       # compact, 100 detections, 4000 x 3000
    python benchmarks/predict_memory.py --mode dense --detections 10
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def _current_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _model(detections: int):
    import torch

    from maskrcnn.config import ModelConfig
    from maskrcnn.model.mask_rcnn import build_model

    config = ModelConfig(num_classes=90)
    config.box_head.score_thresh = 0.0  # random weights: every candidate passes, NMS keeps `detections`
    config.box_head.detections_per_img = detections
    torch.manual_seed(0)
    return build_model(config).eval()


def _image(path: Path, height: int, width: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    gradient = np.linspace(0, 255, width, dtype=np.float32)[None, :, None] * np.ones((height, 1, 3), np.float32)
    pixels = np.clip(gradient + rng.normal(0, 20, (height, width, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, quality=90)


def child(mode: str, detections: int, path: Path, threads: int) -> dict:
    """One measurement on the image at `path`, in this (fresh) process."""
    import torch

    torch.set_num_threads(threads)
    from maskrcnn.data.coco import decode_image
    from maskrcnn.engine.evaluation import predictions_to_coco
    from maskrcnn.engine.predict import predict
    from maskrcnn.visualize import draw_predictions

    with tempfile.TemporaryDirectory() as folder:
        model = _model(detections)
        before = _current_mb()
        started = time.perf_counter()
        with torch.no_grad():
            if mode == "compact":
                report = predict(model, [path], out_dir=Path(folder) / "out", device="cpu", score_threshold=0.0)
                count = report.detections
                size = list(decode_image(path).shape[-2:])
            else:
                image = decode_image(path)
                size = list(image.shape[-2:])
                output = model([image])[0]
                keep = output["scores"] >= 0.0
                output = {k: v[keep] for k, v in output.items()}
                draw_predictions(image, output, score_threshold=0.0)
                count = len(predictions_to_coco(output, image_id=1, category_ids=torch.arange(91)))
        seconds = time.perf_counter() - started
    return {"mode": mode, "detections": count, "size": size, "rss_before_mb": round(before),
            "peak_rss_mb": round(_peak_mb()), "seconds": round(seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=("compact", "dense", "both"), default="compact")
    parser.add_argument("--detections", type=int, nargs="+", default=[100])
    parser.add_argument("--size", type=int, nargs=2, default=(3000, 4000), metavar=("H", "W"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", metavar="IMAGE", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.mode, args.detections[0], Path(args.child), args.threads)))
        return
    modes = ("compact", "dense") if args.mode == "both" else (args.mode,)
    folder = tempfile.TemporaryDirectory()
    image = Path(folder.name) / "large.jpg"
    _image(image, *args.size)
    print("mode      detections  size          RSS before  peak RSS  peak - before  seconds")
    for mode in modes:
        for detections in args.detections:
            command = [sys.executable, __file__, "--child", str(image), "--mode", mode, "--detections", str(detections),
                       "--threads", str(args.threads)]
            row = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
            print(f"{row['mode']:<9} {row['detections']:>10}  {row['size'][0]} x {row['size'][1]:<5}  "
                  f"{row['rss_before_mb']:>7} MB  {row['peak_rss_mb']:>5} MB  {row['peak_rss_mb'] - row['rss_before_mb']:>10} MB"
                  f"  {row['seconds']:>7}")


if __name__ == "__main__":
    main()
