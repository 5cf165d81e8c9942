"""Peak memory of `maskrcnn predict` on a large image (default: 4000 x 3000, 100 detections).

Each measurement runs in its own process (peak RSS is per process): Mask R-CNN R50-FPN at
torchvision's 800 px, seeded random weights with the box score threshold at 0 so that the image
gets `--detections` detections, one `--size` image decoded from a JPEG file. It reports the
process's peak RSS and the RSS before the prediction (weights, libraries, the decoded image):

  compact  `engine.predict.predict` as `maskrcnn predict` runs it: the image kept uint8, masks kept
           28 x 28 over their boxes and pasted a few at a time for drawing and RLE encoding
  cli      `maskrcnn predict --weights CKPT IMAGE` itself, CKPT a training checkpoint (the model
           and an AdamW state, as `last.pth` holds them): "RSS before" is then the process before
           `main()` (torch imported, nothing loaded)
  dense    the former pipeline: `model([image])` on the float image pastes every mask at the image
           size, the detections are selected (`output[keep]`, a copy), drawn and RLE-encoded at once

    python benchmarks/predict_memory.py                       # compact, 100 detections, 4000 x 3000
    python benchmarks/predict_memory.py --mode all --detections 20 100
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


def save_training_checkpoint(path: Path, detections: int) -> None:
    """The benchmark's model as `maskrcnn train` leaves it: weights, config and an AdamW state."""
    import torch

    from maskrcnn.checkpoint import save_checkpoint

    model = _model(detections)
    optimizer = torch.optim.AdamW(model.parameters())
    for parameter in model.parameters():
        parameter.grad = torch.zeros_like(parameter)
    optimizer.step()  # creates the state: two tensors the size of each parameter
    save_checkpoint(path, model, model_config=model.config, optimizer=optimizer.state_dict(), iteration=1)


def child_cli(image: Path, checkpoint: Path, threads: int) -> dict:
    """`maskrcnn predict` in this (fresh) process, as a user runs it."""
    import torch

    from maskrcnn.cli import main as cli_main

    before = _current_mb()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        torch.set_num_threads(threads)
        code = cli_main(["predict", "--weights", str(checkpoint), str(image), "--out", folder, "--score-threshold", "0"])
        results = json.loads((Path(folder) / "results.json").read_text())
    if code != 0:
        raise SystemExit(f"maskrcnn predict exited {code}")
    size = list(_image_size(image))
    return {"mode": "cli", "detections": len(results), "size": size, "rss_before_mb": round(before),
            "peak_rss_mb": round(_peak_mb()), "seconds": round(time.perf_counter() - started, 1)}


def _image_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as image:
        return image.height, image.width


def _measure(command: list[str]) -> dict:
    return json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=("compact", "cli", "dense", "all"), default="compact")
    parser.add_argument("--detections", type=int, nargs="+", default=[100])
    parser.add_argument("--size", type=int, nargs=2, default=(3000, 4000), metavar=("H", "W"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", metavar="IMAGE", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--save-checkpoint", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.save_checkpoint:
        save_training_checkpoint(args.save_checkpoint, args.detections[0])
        return
    if args.child:
        image = Path(args.child)
        row = (child_cli(image, args.checkpoint, args.threads) if args.mode == "cli"
               else child(args.mode, args.detections[0], image, args.threads))
        print(json.dumps(row))
        return
    modes = ("compact", "cli", "dense") if args.mode == "all" else (args.mode,)
    folder = tempfile.TemporaryDirectory()
    image = Path(folder.name) / "large.jpg"
    _image(image, *args.size)
    print("mode      detections  size          RSS before  peak RSS  peak - before  seconds")
    for mode in modes:
        for detections in args.detections:
            command = [sys.executable, __file__, "--child", str(image), "--mode", mode, "--detections", str(detections),
                       "--threads", str(args.threads)]
            if mode == "cli":
                checkpoint = Path(folder.name) / f"last_{detections}.pth"
                if not checkpoint.exists():  # made in its own process, which is not measured
                    subprocess.run([sys.executable, __file__, "--save-checkpoint", str(checkpoint), "--detections",
                                    str(detections)], check=True)
                command += ["--checkpoint", str(checkpoint)]
            row = _measure(command)
            print(f"{row['mode']:<9} {row['detections']:>10}  {row['size'][0]} x {row['size'][1]:<5}  "
                  f"{row['rss_before_mb']:>7} MB  {row['peak_rss_mb']:>5} MB  {row['peak_rss_mb'] - row['rss_before_mb']:>10} MB"
                  f"  {row['seconds']:>7}")


if __name__ == "__main__":
    main()
