"""Our Mask R-CNN vs torchvision's, trained with the same recipe, on the same data, by the same loop.

Both models are built from one config (by default the demo's, the shapes_demo recipe): ours with
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
import statistics
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
]

# --r50: torchvision's maskrcnn_resnet50_fpn training recipe as our COCO config writes it (800 px,
# frozen BN, 3 trainable stages, 2000 proposals, 512 RoIs), timed in fp32 on one shapes image
# (192 px, upscaled to 800 x 800) with COCO's 80 classes; no weight file is needed for timing.
R50_STEPS = ["model.backbone.weights=null", "train.batch_size=1", "train.amp=false", "data.name=shapes",
             "data.root=data/shapes"]


def torchvision_mask_rcnn(config: ModelConfig) -> MaskRCNN:
    """torchvision's MaskRCNN with the sizes of `config` (+ its keypoint branch when enabled)."""
    norm = {"gn": lambda channels: nn.GroupNorm(32, channels), "bn": nn.BatchNorm2d,
            "frozen_bn": FrozenBatchNorm2d}[config.backbone.norm]
    resnet = getattr(torchvision.models, f"resnet{config.backbone.depth}")(weights=None, norm_layer=norm)
    trainable = ["layer4", "layer3", "layer2", "layer1", "conv1"][: config.backbone.trainable_stages]
    if config.backbone.trainable_stages == 5:
        trainable.append("bn1")
    for name, parameter in resnet.named_parameters():
        parameter.requires_grad_(any(name.startswith(layer) for layer in trainable))
    widths = [64, 128, 256, 512] if config.backbone.depth < 50 else [256, 512, 1024, 2048]
    channels = config.backbone.fpn_channels
    backbone = BackboneWithFPN(resnet, {f"layer{i + 1}": str(i) for i in range(4)}, widths, channels,
                               extra_blocks=LastLevelMaxPool())
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
    )
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
                       if "masks" in t and not isinstance(t["masks"], torch.Tensor) else t for t in targets]
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
            "iterations": summary["iteration"], "parameters": parameters, "metrics": summary["metrics"]}


def _one_batch(config: Config) -> tuple[list, list]:
    """The first `train.batch_size` images of the shapes training set (config.data's shapes settings)."""
    from maskrcnn.data.coco import CocoDataset
    from maskrcnn.data.shapes import ensure_shapes

    data = config.data
    paths = ensure_shapes(data.root, num_train=data.shapes_train_images, num_val=data.shapes_val_images,
                          image_size=data.shapes_image_size, seed=data.shapes_seed)
    dataset = CocoDataset(paths["train_annotations"], paths["train_images"])
    images, targets = zip(*[dataset[i] for i in range(config.train.batch_size)])
    return list(images), list(targets)


def _load_same_weights(model: nn.Module, weights: str, *, torchvision_model: bool) -> None:
    """Our checkpoint's weights into ours, or into torchvision's model through the checkpoint
    converter's key names (checkpoint/torchvision.py: torchvision's keys -> ours, inverted here)."""
    import maskrcnn
    from maskrcnn.checkpoint.torchvision import convert_torchvision_state_dict

    state = maskrcnn.load_checkpoint(weights).state_dict()
    if not torchvision_model:
        model.load_state_dict(state)
        return
    theirs = model.model.state_dict()
    ours_names = convert_torchvision_state_dict(theirs)  # the same entries, renamed, in the same order
    loaded = {}
    for key, name in zip(theirs, ours_names):
        if name in state:
            loaded[key] = state[name]
        elif key.endswith(".bias"):  # torchvision's normed head convs keep a bias that ours leave out: zero
            loaded[key] = torch.zeros_like(theirs[key])
        else:
            raise KeyError(f"{weights}: no weights for torchvision's {key} (ours: {name})")
    model.model.load_state_dict(loaded)


def _step_runners(config: Config, *, levers: bool, weights: str | None = None) -> dict:
    """name -> a function running one training step as the trainer does it (forward under the
    recipe's autocast, backward, the recipe's gradient clipping and optimizer).

    The learning rate stays at the recipe's unless `weights` is given: each model then moves on
    the one batch in its own way, and the cost of a step follows (the positives, hence the mask
    and keypoint heads' work, grow as a model learns the batch). With `weights`, both models start
    from the same trained weights and the learning rate is 0: the same state, the same proposals
    and RoIs, every step the same work."""
    import maskrcnn.model.roi_heads as roi_heads
    from maskrcnn.engine import optim
    from maskrcnn.engine.optim import clip_gradients
    from maskrcnn.engine.precision import autocast_dtype
    from maskrcnn.model.mask_rcnn import build_model

    images, targets = _one_batch(config)
    settings = config.train
    dtype = autocast_dtype(torch.device("cpu"), amp=settings.amp)
    variants = {"ours": {}, "torchvision": {}}
    if levers:  # ours with one training-speed part replaced by the plain one, or one more tried
        variants["ours, tv RoIAlign"] = {"roi_align": torchvision.ops.roi_align}
        variants["ours, for-loop opt"] = {"fused": False}
        variants["ours, channels_last"] = {"channels_last": True}
        variants["ours, bf16 autocast"] = {"bf16": True}

    def runner(name: str, variant: dict):
        torch.manual_seed(0)
        model = DenseMasks(torchvision_mask_rcnn(config.model)) if name == "torchvision" else build_model(config.model)
        if weights:
            _load_same_weights(model, weights, torchvision_model=name == "torchvision")
        model.train()
        if variant.get("channels_last"):
            model.to(memory_format=torch.channels_last)
        fused_supported = optim._fused_supported
        if variant.get("fused") is False:  # the same optimizer and groups, one operator call per parameter
            optim._fused_supported = lambda groups: False
        try:
            optimizer = optim.build_optimizer(model, settings)
        finally:
            optim._fused_supported = fused_supported
        if weights:
            for group in optimizer.param_groups:
                group["lr"] = 0.0

        def step() -> None:
            pooling = roi_heads.roi_align
            roi_heads.roi_align = variant.get("roi_align", pooling)
            try:
                bf16 = dtype is not None or variant.get("bf16", False)
                with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=bf16):
                    loss = sum(model(images, targets).values())
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                clip_gradients(model.parameters(), settings.clip_grad_norm)
                optimizer.step()
            finally:
                roi_heads.roi_align = pooling

        return step

    return {name: runner("torchvision" if name == "torchvision" else "ours", variant)
            for name, variant in variants.items()}


def time_steps(config: Config, steps: int, *, rounds: int, levers: bool, weights: str | None = None) -> None:
    """Training-step cost of the models on one fixed batch: `rounds` rounds, each timing `steps`
    steps of every model in turn (interleaved, so that a load change on a shared machine hits all
    of them alike); prints each model's median seconds per step and its ratio to torchvision's."""
    runners = _step_runners(config, levers=levers, weights=weights)
    for step in runners.values():  # warm-up: allocators, kernels, the first autograd graph
        step()
    clocks = {"wall": time.perf_counter, "CPU": time.process_time}  # CPU: this process's, less hit by others' load
    seconds = {clock: {name: [] for name in runners} for clock in clocks}
    for _ in range(rounds):
        for name, step in runners.items():
            started = {clock: read() for clock, read in clocks.items()}
            for _ in range(steps):
                step()
            for clock, read in clocks.items():
                seconds[clock][name].append((read() - started[clock]) / steps)
    for clock, per_model in seconds.items():
        reference = statistics.median(per_model["torchvision"])
        print(f"\n{'model':20s} {clock + ' s/step':>13s} {'tv / model':>10s}   per round ({clock} s/step)")
        for name, values in per_model.items():
            median = statistics.median(values)
            print(f"{name:20s} {median:13.3f} {reference / median:10.2f}   " + " ".join(f"{v:.3f}" for v in values))
        ratios = [theirs / ours for ours, theirs in zip(per_model["ours"], per_model["torchvision"])]
        print(f"{clock}: ours faster than torchvision by {statistics.median(ratios):.2f}x (median of the rounds' "
              f"ratios, range {min(ratios):.2f}-{max(ratios):.2f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="shapes_demo", help="a YAML path or a shipped recipe's name")
    parser.add_argument("--reference", action="store_true", help="use the first torchvision reference recipe instead")
    parser.add_argument("--only", choices=["ours", "torchvision"], help="train one of the two")
    parser.add_argument("--out", default="runs/demo_vs_torchvision")
    parser.add_argument("--steps", type=int, help="only time training steps on one batch: this many per model and round")
    parser.add_argument("--rounds", type=int, default=5, help="with --steps: interleaved rounds (default 5)")
    parser.add_argument("--levers", action="store_true",
                        help="with --steps: also time ours with torchvision's RoIAlign, with the for-loop "
                             "optimizer, in channels_last, and in bf16 autocast")
    parser.add_argument("--r50", action="store_true",
                        help="torchvision's default Mask R-CNN R50-FPN recipe (the coco_mask_rcnn_R50_FPN_1x recipe, "
                             "800 px, 1 image, fp32, no pretrained weights) on a shapes image, instead of --config")
    parser.add_argument("--weights", help="with --steps: both models start from this checkpoint of ours (e.g. a "
                        "demo run's last.pth) with the learning rate at 0, so that both time the same trained state")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value")
    args = parser.parse_args()
    overrides = (REFERENCE if args.reference else []) + [f"train.output_dir={args.out}"] + args.overrides
    if args.r50:
        if not args.steps:
            parser.error("--r50 only times steps (--steps N): there is no COCO data here to train on")
        overrides = R50_STEPS + overrides
    config = load_config("coco_mask_rcnn_R50_FPN_1x" if args.r50 else args.config, overrides)
    if config.train.cpu_threads is not None:  # as train() does, so that --steps times the same threads
        torch.set_num_threads(config.train.cpu_threads)
    print(f"{config.train.iterations} iterations of {config.train.batch_size} images, "
          f"{config.model.transform.min_size} px, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    if args.steps:
        time_steps(config, args.steps, rounds=args.rounds, levers=args.levers, weights=args.weights)
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
              f"{row['parameters'] / 1e6:8.2f}M {cells}")
    if len(rows) == 2:
        ours, theirs = rows
        cells = " ".join(f"{ours['metrics'][k] / theirs['metrics'][k]:12.2f}"
                         if theirs["metrics"].get(k) else f"{'-':>12s}" for k in keys)
        print(f"{'ours / tv':12s} {'':6s} {ours['seconds_per_iteration'] / theirs['seconds_per_iteration']:7.2f} "
              f"{ours['minutes'] / theirs['minutes']:8.2f} {'':9s} {cells}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "summary.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
