"""Our Mask R-CNN vs torchvision's, trained with the same recipe, on the same data, by the same loop.

Both models are built from one config (by default the demo's, configs/shapes_demo.yaml): ours with
`build_model(config.model)`, torchvision's `MaskRCNN` assembled from torchvision's own parts with
the same sizes (ResNet body and norm, FPN width, anchors, RPN and RoI counts, head widths, mask and
keypoint heads). Both train with our trainer (`train(config, model=...)`: same data order, optimizer,
schedule and number of iterations) and are scored by the same COCO evaluation. Prints AP and time
side by side. Run it when the machine is otherwise idle: the times are wall-clock.

    .venv/bin/python benchmarks/demo_vs_torchvision.py                      # the demo recipe, both models
    .venv/bin/python benchmarks/demo_vs_torchvision.py --reference --only torchvision
        # the first torchvision reference recipe (192 px, 128-channel FPN and heads, 64 RoIs,
        # SGD lr 0.04, 600 iterations of 4 images) on our shapes data
    .venv/bin/python benchmarks/demo_vs_torchvision.py train.iterations=50  # any config override
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
import torchvision
from torch import nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.keypoint_rcnn import KeypointRCNNHeads, KeypointRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import FrozenBatchNorm2d, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from maskrcnn.config import Config, ModelConfig, load_config

ROOT = Path(__file__).resolve().parents[1]

# The first torchvision reference recipe (a ResNet-18 FPN from scratch at 192 px with SGD), written
# as overrides of the demo config; its figures are in docs/results.md.
REFERENCE = [
    "model.backbone.fpn_channels=128", "model.box_head.fc_dim=128", "model.box_head.batch_size_per_image=64",
    "model.mask_head.num_convs=2", "model.mask_head.conv_dim=128", "model.keypoint_head.enabled=false",
    "model.transform.min_size=[192]", "model.transform.min_size_test=192", "model.transform.max_size=192",
    "model.rpn.anchor_sizes=[32,64,128,256,512]", "model.rpn.pre_nms_top_n_train=2000",
    "model.rpn.pre_nms_top_n_test=1000", "model.rpn.post_nms_top_n_train=2000", "model.rpn.post_nms_top_n_test=1000",
    "model.rpn.batch_size_per_image=256", "model.box_head.detections_per_img=100",
    "train.iterations=600", "train.batch_size=4", "train.lr=0.04", "train.schedule=cosine",
]  # fmt: skip


def torchvision_mask_rcnn(config: ModelConfig) -> MaskRCNN:
    """torchvision's MaskRCNN with the sizes of `config` (+ its keypoint branch when enabled)."""
    norm = {"gn": lambda channels: nn.GroupNorm(32, channels), "bn": nn.BatchNorm2d,
            "frozen_bn": FrozenBatchNorm2d}[config.backbone.norm]  # fmt: skip
    resnet = getattr(torchvision.models, f"resnet{config.backbone.depth}")(weights=None, norm_layer=norm)
    trainable = ["layer4", "layer3", "layer2", "layer1", "conv1"][: config.backbone.trainable_stages]
    if config.backbone.trainable_stages == 5:
        trainable.append("bn1")
    for name, parameter in resnet.named_parameters():
        parameter.requires_grad_(any(name.startswith(layer) for layer in trainable))
    widths = [64, 128, 256, 512] if config.backbone.depth < 50 else [256, 512, 1024, 2048]
    channels = config.backbone.fpn_channels
    backbone = BackboneWithFPN(resnet, {f"layer{i + 1}": str(i) for i in range(4)}, widths, channels,
                               extra_blocks=LastLevelMaxPool())  # fmt: skip
    rpn, box, mask, keypoint = config.rpn, config.box_head, config.mask_head, config.keypoint_head
    levels = ["0", "1", "2", "3"]
    anchors = AnchorGenerator(tuple((s,) for s in rpn.anchor_sizes), (tuple(rpn.aspect_ratios),) * len(rpn.anchor_sizes))
    model = MaskRCNN(
        backbone, num_classes=None, min_size=tuple(config.transform.min_size), max_size=config.transform.max_size,
        image_mean=config.transform.image_mean, image_std=config.transform.image_std,
        rpn_anchor_generator=anchors, rpn_head=RPNHead(channels, len(rpn.aspect_ratios)),
        rpn_pre_nms_top_n_train=rpn.pre_nms_top_n_train, rpn_pre_nms_top_n_test=rpn.pre_nms_top_n_test,
        rpn_post_nms_top_n_train=rpn.post_nms_top_n_train, rpn_post_nms_top_n_test=rpn.post_nms_top_n_test,
        rpn_nms_thresh=rpn.nms_thresh, rpn_fg_iou_thresh=rpn.fg_iou_thresh, rpn_bg_iou_thresh=rpn.bg_iou_thresh,
        rpn_batch_size_per_image=rpn.batch_size_per_image, rpn_positive_fraction=rpn.positive_fraction,
        rpn_score_thresh=rpn.score_thresh,
        box_roi_pool=MultiScaleRoIAlign(levels, box.pooler_resolution, box.sampling_ratio),
        box_head=TwoMLPHead(channels * box.pooler_resolution**2, box.fc_dim),
        box_predictor=FastRCNNPredictor(box.fc_dim, config.num_classes + 1),
        box_score_thresh=box.score_thresh, box_nms_thresh=box.nms_thresh, box_detections_per_img=box.detections_per_img,
        box_fg_iou_thresh=box.fg_iou_thresh, box_bg_iou_thresh=box.bg_iou_thresh,
        box_batch_size_per_image=box.batch_size_per_image, box_positive_fraction=box.positive_fraction,
        bbox_reg_weights=tuple(box.bbox_reg_weights),
        mask_roi_pool=MultiScaleRoIAlign(levels, mask.pooler_resolution, mask.sampling_ratio),
        mask_head=MaskRCNNHeads(channels, [mask.conv_dim] * mask.num_convs, 1),
        mask_predictor=MaskRCNNPredictor(mask.conv_dim, mask.conv_dim, config.num_classes + 1),
    )  # fmt: skip
    if keypoint.enabled:
        heads = model.roi_heads  # RoIHeads runs every branch whose three parts are set
        heads.keypoint_roi_pool = MultiScaleRoIAlign(levels, keypoint.pooler_resolution, keypoint.sampling_ratio)
        heads.keypoint_head = KeypointRCNNHeads(channels, [keypoint.conv_dim] * keypoint.num_convs)
        heads.keypoint_predictor = KeypointRCNNPredictor(keypoint.conv_dim, keypoint.num_keypoints)
    return model


class DenseMasks(nn.Module):
    """Hands torchvision dense `uint8 [N, H, W]` masks: its transform indexes them as a tensor,
    where our model takes the data's compact InstanceMasks as they come."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: list[torch.Tensor], targets: list[dict] | None = None):
        if targets is not None:
            targets = [{**t, "masks": t["masks"].to_tensor().to(images[0].device)}
                       if "masks" in t and not isinstance(t["masks"], torch.Tensor) else t for t in targets]  # fmt: skip
        return self.model(images, targets)


def run(name: str, config: Config, *, torchvision_model: bool) -> dict:
    from maskrcnn.engine.trainer import seed_everything, train

    config = copy.deepcopy(config)
    config.train.output_dir = str(Path(config.train.output_dir) / name)
    seed_everything(config.train.seed)
    model = DenseMasks(torchvision_mask_rcnn(config.model)) if torchvision_model else None
    started = time.perf_counter()
    summary = train(config, model=model)
    minutes = (time.perf_counter() - started) / 60
    parameters = sum(p.numel() for p in summary["model"].parameters())
    return {"name": name, "minutes": minutes, "seconds_per_iteration": summary["seconds_per_iteration"],
            "iterations": summary["iteration"], "parameters": parameters, "metrics": summary["metrics"]}  # fmt: skip


def time_steps(config: Config, steps: int) -> None:
    """Training-step cost of both models on one fixed batch of 4 shapes images: wall seconds and
    process CPU seconds per step (CPU seconds stay comparable on a machine shared with others)."""
    from maskrcnn.data.coco import CocoDataset
    from maskrcnn.data.shapes import ensure_shapes
    from maskrcnn.model.mask_rcnn import build_model

    data = config.data
    paths = ensure_shapes(data.root, num_train=data.shapes_train_images, num_val=data.shapes_val_images,
                          image_size=data.shapes_image_size, seed=data.shapes_seed)  # fmt: skip
    dataset = CocoDataset(paths["train_annotations"], paths["train_images"])
    images, targets = zip(*[dataset[i] for i in range(config.train.batch_size)])
    print(f"{'model':12s} {'wall s/step':>12s} {'CPU s/step':>11s}")
    timings = {}
    for name in ("ours", "torchvision"):
        torch.manual_seed(0)
        model = build_model(config.model) if name == "ours" else DenseMasks(torchvision_mask_rcnn(config.model))
        model.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
        for step in range(steps + 1):  # the first step warms up allocators and kernels
            if step == 1:
                wall, cpu = time.perf_counter(), time.process_time()
            loss = sum(model(list(images), list(targets)).values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        wall, cpu = (time.perf_counter() - wall) / steps, (time.process_time() - cpu) / steps
        print(f"{name:12s} {wall:12.2f} {cpu:11.2f}")
        timings[name] = wall
    print(f"{'ours / tv':12s} {timings['ours'] / timings['torchvision']:12.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "shapes_demo.yaml"))
    parser.add_argument("--reference", action="store_true", help="use the first torchvision reference recipe instead")
    parser.add_argument("--only", choices=["ours", "torchvision"], help="train one of the two")
    parser.add_argument("--out", default="runs/demo_vs_torchvision")
    parser.add_argument("--steps", type=int, help="only time this many training steps of each model on one batch")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value")
    args = parser.parse_args()
    overrides = (REFERENCE if args.reference else []) + [f"train.output_dir={args.out}"] + args.overrides
    config = load_config(args.config, overrides)
    if config.train.cpu_threads is not None:  # as train() does, so that --steps times the same threads
        torch.set_num_threads(config.train.cpu_threads)
    print(f"{config.train.iterations} iterations of {config.train.batch_size} images, "
          f"{config.model.transform.min_size} px, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    if args.steps:
        time_steps(config, args.steps)
        return
    rows = []
    for name, is_torchvision in (("ours", False), ("torchvision", True)):
        if args.only in (None, name):
            rows.append(run(name, config, torchvision_model=is_torchvision))
    keys = ["bbox/AP", "segm/AP", "keypoints/AP", "bbox/AP50", "segm/AP50"]
    print(f"\n{'model':12s} {'iters':>6s} {'s/iter':>7s} {'minutes':>8s} {'params':>9s} " + " ".join(f"{k:>12s}" for k in keys))
    for row in rows:
        cells = " ".join(f"{row['metrics'][k]:12.3f}" if k in row["metrics"] else f"{'-':>12s}" for k in keys)
        print(f"{row['name']:12s} {row['iterations']:6d} {row['seconds_per_iteration']:7.2f} {row['minutes']:8.1f} "
              f"{row['parameters'] / 1e6:8.2f}M {cells}")  # fmt: skip
    if len(rows) == 2:
        ours, theirs = rows
        cells = " ".join(f"{ours['metrics'][k] / theirs['metrics'][k]:12.2f}"
                         if theirs["metrics"].get(k) else f"{'-':>12s}" for k in keys)  # fmt: skip
        print(f"{'ours / tv':12s} {'':6s} {ours['seconds_per_iteration'] / theirs['seconds_per_iteration']:7.2f} "
              f"{ours['minutes'] / theirs['minutes']:8.2f} {'':9s} {cells}")  # fmt: skip
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "summary.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
