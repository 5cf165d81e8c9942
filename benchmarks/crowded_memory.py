"""Peak memory of one training step on a crowded image: chunked vs one-matrix anchor matching.

The RPN matches every anchor to every ground-truth box, and the RoI heads every proposal: the
IoU matrix [objects, anchors] and box_iou's [objects, anchors, 2] intermediates grow with the
number of objects. `Matcher.match_boxes` takes the ground truth MATCH_CHUNK_ELEMENTS IoUs at a
time instead; "unchunked" sets that budget so high that one matrix holds everything, as before.

Each case runs in a fresh process (peak RSS is a process-wide high-water mark): build the
model, make one image with N objects, then one forward + backward + optimizer step; the figure
is the peak RSS during the step minus the RSS before it. The losses of the two modes are printed
too: chunking must not change them.

    .venv/bin/python benchmarks/crowded_memory.py                 # 320 px, 1 and 1500 objects
    .venv/bin/python benchmarks/crowded_memory.py --size 800 --objects 1 1000 --modes chunked
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys


def child(size: int, objects: int, unchunked: bool) -> dict:
    import numpy as np
    import torch

    from maskrcnn.config import ModelConfig
    from maskrcnn.data.masks import InstanceMasks
    from maskrcnn.model import box_ops
    from maskrcnn.model.mask_rcnn import build_model

    torch.set_num_threads(1)
    if unchunked:
        box_ops.MATCH_CHUNK_ELEMENTS = 1 << 62
    config = ModelConfig(num_classes=1)
    config.backbone.depth, config.backbone.norm, config.backbone.trainable_stages = 18, "gn", 5
    config.transform.min_size, config.transform.min_size_test, config.transform.max_size = [size], size, size
    torch.manual_seed(0)
    model = build_model(config).train()
    rng = np.random.default_rng(0)
    corners = rng.uniform(0, size - 12, size=(objects, 2)).astype(np.float32)
    boxes = np.concatenate([corners, corners + 10], axis=1)
    polygons = [[[x1, y1, x2, y1, x2, y2, x1, y2]] for x1, y1, x2, y2 in boxes.tolist()]
    target = {"boxes": torch.from_numpy(boxes), "labels": torch.ones(objects, dtype=torch.int64),
              "masks": InstanceMasks(polygons, image_size=(size, size)), "image_id": 1}
    image = torch.rand(3, size, size)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: the same step in both modes
    before = _rss_kib()
    torch.manual_seed(1)
    losses = model([image], [target])
    sum(losses.values()).backward()
    optimizer.step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"objects": objects, "mode": "unchunked" if unchunked else "chunked", "step_mib": (peak - before) / 1024,
            "losses": {name: float(value) for name, value in sorted(losses.items())}}


def _rss_kib() -> int:
    with open("/proc/self/statm") as file:
        return int(file.read().split()[1]) * resource.getpagesize() // 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--objects", type=int, nargs="+", default=[1, 1500])
    parser.add_argument("--modes", nargs="+", choices=("unchunked", "chunked"), default=["unchunked", "chunked"],
                        help="unchunked needs gigabytes at 800 px with 1000 objects: leave it out there")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(int(args.child[0]), int(args.child[1]), args.child[2] == "unchunked")))
        return
    rows = []
    for objects in args.objects:
        for mode in args.modes:
            output = subprocess.run([sys.executable, __file__, "--child", str(args.size), str(objects), mode],
                                    check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(output.strip().splitlines()[-1]))
            print(f"{objects:6d} objects  {mode:9s}  step peak +{rows[-1]['step_mib']:7.0f} MiB", flush=True)
    for objects in args.objects:
        pair = [r for r in rows if r["objects"] == objects]
        if len(pair) < 2:
            continue
        same = pair[0]["losses"] == pair[1]["losses"]
        ratio = pair[1]["step_mib"] / max(pair[0]["step_mib"], 1e-9)
        print(f"{objects} objects at {args.size} px: chunked/unchunked peak {ratio:.2f}; "
              f"losses identical: {same}")


if __name__ == "__main__":
    main()
