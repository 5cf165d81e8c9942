"""Worst-case differences between `from_detectron2` and detectron2's own outputs.

Loads each reference model of ../shared/detectron2/ (see its README), runs its three images the way
detectron2 was run (one image at a time, at its own size) and prints, per model, the largest
differences over all images and detections: proposals and their logits, boxes, scores, 28 x 28
mask probabilities, the smallest IoU of a pasted mask with detectron2's, keypoint positions and
relative keypoint scores. tests/test_detectron2.py asserts the tolerances; this prints the figures.

    .venv/bin/python benchmarks/detectron2_differences.py [--shared ../shared] [--threads N]
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from maskrcnn.checkpoint.detectron2 import from_detectron2
from maskrcnn.model.mask_head import paste_masks

MODELS = {"mask_rcnn_R_50_FPN": "model_final.pkl", "keypoint_rcnn_R_50_FPN": "model_final.pth",
          "faster_rcnn_R_101_FPN": "model_final.pth"}


def differences(model, result: dict, image: torch.Tensor) -> dict[str, float]:
    model.transform.min_size_test = min(image.shape[-2:])
    with torch.no_grad():
        batch, _ = model.transform([image])
        features = model.backbone(batch.tensors)
        proposals, logits, _ = model.rpn.propose(batch, features)
        detections, _ = model.roi_heads(features, proposals, batch.image_sizes)
        final = model.transform.postprocess(detections, batch.image_sizes, [tuple(image.shape[-2:])])[0]
        if "masks" in final:  # pasted as model(images) pastes them
            final["masks"] = paste_masks(final["masks"], final["boxes"], tuple(image.shape[-2:]), padding=1,
                                         aligned=model.paste_aligned)
    count = len(result["proposals"])
    found = {
        "detections (ours - theirs)": len(final["boxes"]) - len(result["boxes"]),
        "classes differing": int((final["labels"] - 1 != torch.tensor(result["classes"])).sum()),
        "proposals |d| px": (proposals[0][:count] - torch.tensor(result["proposals"])).abs().max().item(),
        "proposal logits |d|": (logits[0][:count] - torch.tensor(result["proposal_logits"])).abs().max().item(),
        "boxes |d| px": (final["boxes"] - torch.tensor(result["boxes"])).abs().max().item(),
        "scores |d|": (final["scores"] - torch.tensor(result["scores"])).abs().max().item(),
    }
    if "mask_probs_28" in result:
        probabilities = torch.tensor(result["mask_probs_28"]).reshape(-1, 1, 28, 28)
        found["mask probabilities |d|"] = (detections[0]["masks"] - probabilities).abs().max().item()
        pasted = final["masks"][:, 0] >= 0.5
        theirs = torch.from_numpy(mask_utils.decode(result["masks_rle"])).permute(2, 0, 1).bool()
        union = (pasted | theirs).flatten(1).sum(1).clamp(min=1)
        found["pasted mask IoU (min)"] = ((pasted & theirs).flatten(1).sum(1) / union).min().item()
    if "keypoints" in result:
        keypoints = torch.tensor(result["keypoints"])
        found["keypoints |d| px"] = (final["keypoints"][..., :2] - keypoints[..., :2]).abs().max().item()
        relative = (final["keypoints_scores"] - keypoints[..., 2]).abs() / keypoints[..., 2].abs()
        found["keypoint scores |d| / score"] = relative.max().item()
    return found


def default_root() -> Path:
    project = Path(__file__).resolve().parents[1]
    for folder in [project, *project.parents]:
        if (folder / "shared" / "detectron2" / "README.md").is_file():
            return folder / "shared" / "detectron2"
    raise SystemExit("detectron2 reference outputs not found beside the project: pass --shared")


def worst(values: list[float], key: str) -> float:
    return min(values) if "min" in key else max(values, key=abs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", default=None,
                        help="the folder that holds detectron2/ (default: the first shared/ beside the project "
                             "root or one of its parents)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads; the convolutions' summation order, hence the last bits, "
                             "depends on it (default: PyTorch's)")
    args = parser.parse_args()
    root = Path(args.shared) / "detectron2" if args.shared else default_root()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name, weights in MODELS.items():
        model = from_detectron2(root / name / weights, root / name / "config.yaml")
        results = json.loads(gzip.decompress((root / name / "d2_outputs.json.gz").read_bytes()))["results"]
        per_image = []
        for result in results:
            image = torch.from_numpy(np.array(Image.open(root / name / result["image"]).convert("RGB")))
            per_image.append(differences(model, result, image.permute(2, 0, 1).float() / 255))
        print(f"{name} ({len(results)} images, {sum(len(r['boxes']) for r in results)} detections)")
        for key in per_image[0]:
            print(f"  {key:30s} {worst([d[key] for d in per_image], key):.3g}")


if __name__ == "__main__":
    main()
