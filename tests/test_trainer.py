"""The training loop: exact resume after a signal, non-finite losses, outputs of a run.

The model is torchvision's MaskRCNN on a tiny backbone (same calling convention as ours), the
data a small in-test set of rectangles, so that the tests exercise the loop, not the parts.
"""

import json
import os
import signal

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torch import nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import MultiScaleRoIAlign

from maskrcnn.config import (
    BackboneConfig,
    BoxHeadConfig,
    Config,
    DataConfig,
    KeypointHeadConfig,
    MaskHeadConfig,
    ModelConfig,
    RPNConfig,
    TrainConfig,
    TransformConfig,
    load_config,
)
from maskrcnn.engine import trainer
from maskrcnn.engine.training_state import load_training_state

SIZE = 64
NUM_CLASSES = 2


def tiny_model() -> nn.Module:
    """torchvision MaskRCNN with a 2-conv backbone and 16-channel heads (fast on a CPU)."""
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(),
                             nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())
    backbone.out_channels = 16
    return MaskRCNN(
        backbone, num_classes=None, min_size=SIZE, max_size=SIZE,
        rpn_anchor_generator=AnchorGenerator(sizes=((16, 32),), aspect_ratios=((0.5, 1.0, 2.0),)),
        rpn_batch_size_per_image=32, box_batch_size_per_image=16,
        box_roi_pool=MultiScaleRoIAlign(["0"], 7, 2), box_head=TwoMLPHead(16 * 49, 32),
        box_predictor=FastRCNNPredictor(32, NUM_CLASSES + 1),
        mask_roi_pool=MultiScaleRoIAlign(["0"], 14, 2), mask_head=MaskRCNNHeads(16, [16], 1),
        mask_predictor=MaskRCNNPredictor(16, 16, NUM_CLASSES + 1),
    )


class Rectangles(torch.utils.data.Dataset):
    """Deterministic images with 0-3 filled rectangles; every `empty_every`-th image has none."""

    def __init__(self, count: int, *, seed: int = 0, empty_every: int = 5) -> None:
        self.items = [self._make(np.random.default_rng([seed, i]), i, empty=(i % empty_every == empty_every - 1))
                      for i in range(count)]
        images = [{"id": i + 1, "width": SIZE, "height": SIZE, "file_name": f"{i}.png"} for i in range(count)]
        annotations = []
        for _, target in self.items:
            for box, label, mask in zip(target["boxes"].tolist(), target["labels"].tolist(), target["masks"]):
                rle = mask_utils.encode(np.asfortranarray(mask.numpy()))
                x1, y1, x2, y2 = box
                annotations.append({"id": len(annotations) + 1, "image_id": target["image_id"], "category_id": label,
                                    "bbox": [x1, y1, x2 - x1, y2 - y1], "area": float(mask.sum()), "iscrowd": 0,
                                    "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()}})
        self.coco = COCO()
        self.coco.dataset = {"images": images, "annotations": annotations,
                             "categories": [{"id": c, "name": f"class{c}"} for c in range(1, NUM_CLASSES + 1)]}
        self.coco.createIndex()
        self.label_to_category_id = {c: c for c in range(1, NUM_CLASSES + 1)}

    @staticmethod
    def _make(rng: np.random.Generator, index: int, empty: bool) -> tuple[torch.Tensor, dict]:
        image = rng.uniform(0.0, 0.3, size=(3, SIZE, SIZE)).astype(np.float32)
        count = 0 if empty else int(rng.integers(1, 4))
        boxes, labels, masks, keypoints = [], [], [], []
        for _ in range(count):
            x1, y1 = rng.integers(0, SIZE - 20, size=2)
            w, h = rng.integers(12, 20, size=2)
            label = int(rng.integers(1, NUM_CLASSES + 1))
            image[label - 1, y1:y1 + h, x1:x1 + w] = 1.0
            mask = np.zeros((SIZE, SIZE), np.uint8)
            mask[y1:y1 + h, x1:x1 + w] = 1
            boxes.append([x1, y1, x1 + w, y1 + h])
            keypoints.append([[x1 + w / 2, y1, 2], [x1 + w / 2, y1 + h, 2], [x1, y1 + h / 2, 2], [x1 + w, y1 + h / 2, 2]])
            labels.append(label)
            masks.append(mask)
        target = {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                  "labels": torch.tensor(labels, dtype=torch.int64),
                  "masks": torch.from_numpy(np.array(masks, np.uint8).reshape(-1, SIZE, SIZE)),
                  "keypoints": torch.tensor(keypoints, dtype=torch.float32).reshape(-1, 4, 3),
                  "image_id": index + 1}
        return torch.from_numpy(image), target

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key):
        index = key[0] if isinstance(key, tuple) else key  # the training loader passes (index, augmentation seed)
        image, target = self.items[index]
        return image.clone(), {k: v.clone() if torch.is_tensor(v) else v for k, v in target.items()}


def simple_batches(dataset, config, context, start_iteration):
    """Stand-in for the data loader: batch i of rank r holds items (i * world + r) * bs ... (cyclic)."""
    batch_size = config.train.batch_size

    def generate():
        iteration = start_iteration
        while True:
            first = (iteration * context.world_size + context.rank) * batch_size
            items = [dataset[(first + j) % len(dataset)] for j in range(batch_size)]
            yield [image for image, _ in items], [target for _, target in items]
            iteration += 1

    return generate()


class Sabotage(nn.Module):
    """Wraps a model; at the n-th forward sends a signal to this process or poisons a loss term."""

    def __init__(self, model: nn.Module, *, signal_at: int | None = None, nan_at: int | None = None) -> None:
        super().__init__()
        self.inner = model
        self.signal_at, self.nan_at, self.calls = signal_at, nan_at, 0

    def forward(self, images, targets=None):
        self.calls += 1
        losses = self.inner(images, targets)
        if self.calls == self.signal_at:
            os.kill(os.getpid(), signal.SIGTERM)  # handled between bytecodes: this iteration completes
        if self.calls == self.nan_at:
            losses["loss_box_reg"] = losses["loss_box_reg"] * float("nan")
        return losses


def tiny_model_config() -> ModelConfig:
    """Our model, small: ResNet-18 with GroupNorm, 16-channel FPN and heads, 64 px, 4 keypoints."""
    return ModelConfig(
        num_classes=NUM_CLASSES,
        backbone=BackboneConfig(depth=18, norm="gn", trainable_stages=5, fpn_channels=16),
        transform=TransformConfig(min_size=[SIZE], min_size_test=SIZE, max_size=SIZE),
        rpn=RPNConfig(anchor_sizes=[8, 16, 32, 64, 128], pre_nms_top_n_train=100, post_nms_top_n_train=50,
                      pre_nms_top_n_test=100, post_nms_top_n_test=50, batch_size_per_image=32),
        box_head=BoxHeadConfig(batch_size_per_image=16, fc_dim=32, detections_per_img=10),
        mask_head=MaskHeadConfig(num_convs=1, conv_dim=16),
        keypoint_head=KeypointHeadConfig(enabled=True, num_keypoints=4, num_convs=1, conv_dim=16),
    )


def tiny_config(output_dir, **train) -> Config:
    settings = dict(output_dir=str(output_dir), device="cpu", seed=3, iterations=6, batch_size=2, lr=0.02,
                    schedule="cosine", warmup_iterations=2, warmup_factor=0.1, checkpoint_every=100,
                    log_every=1, tensorboard=False)
    settings.update(train)
    return Config(train=TrainConfig(**settings), data=DataConfig(num_workers=0))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The test machine's cores are shared: one intra-op thread is several times faster there."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _losses(output_dir):
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["iteration"], {k: v for k, v in r.items() if k.startswith("loss") or k == "lr"}) for r in records]


def test_resume_after_sigterm_ends_with_the_same_weights(tmp_path, num_workers=1):
    data = Rectangles(12)
    full_config = tiny_config(tmp_path / "full", tensorboard=True)
    full_config.data.num_workers = num_workers
    full = trainer.train(full_config, model=Sabotage(tiny_model()), train_dataset=data)
    assert full["iteration"] == 6 and full["interrupted"] is None

    config = tiny_config(tmp_path / "cut")
    config.data.num_workers = num_workers
    first = trainer.train(config, model=Sabotage(tiny_model(), signal_at=3), train_dataset=data)
    assert first["interrupted"] == "SIGTERM" and first["iteration"] == 3
    assert load_training_state(tmp_path / "cut" / "last.pth")["iteration"] == 3
    # the resumed process builds everything afresh, from a different initialisation even
    torch.manual_seed(123)
    second = trainer.train(config, resume=True, model=Sabotage(tiny_model()), train_dataset=data)
    assert second["iteration"] == 6 and second["interrupted"] is None

    for name, value in full["model"].state_dict().items():
        assert torch.equal(value, second["model"].state_dict()[name]), name
    assert [i for i, _ in _losses(tmp_path / "cut")] == [1, 2, 3, 4, 5, 6]
    assert _losses(tmp_path / "cut") == _losses(tmp_path / "full")
    assert load_training_state(tmp_path / "cut" / "last.pth")["iteration"] == 6

    # the outputs of a run: resolved config, metrics, TensorBoard events, final checkpoint
    assert load_config(tmp_path / "full" / "config.yaml") == full_config
    assert any((tmp_path / "full" / "tensorboard").iterdir())
    saved = load_training_state(tmp_path / "full" / "last.pth")
    assert saved["format"] == "maskrcnn/1" and saved["config"]["train"]["iterations"] == 6
    assert saved["data_position"] == {"iteration": 6, "batch_size": 2, "world_size": 1, "seed": 3}


def test_the_weights_actually_change_and_lr_follows_the_schedule(tmp_path):
    initial = {k: v.clone() for k, v in tiny_model().state_dict().items()}
    result = trainer.train(tiny_config(tmp_path), model=tiny_model(), train_dataset=Rectangles(8))
    changed = [k for k, v in result["model"].state_dict().items() if not torch.equal(v, initial[k])]
    assert len(changed) == len(initial)  # every parameter of the tiny model is trained
    lrs = [losses["lr"] for _, losses in _losses(tmp_path)]
    assert lrs[0] == pytest.approx(0.02 * 0.1 * 0.5 * (1 + np.cos(0)))
    assert lrs[1] == pytest.approx(0.02 * 0.55 * 0.5 * (1 + np.cos(np.pi / 6)))


def test_non_finite_loss_names_iteration_and_term_and_keeps_last_good_checkpoint(tmp_path):
    config = tiny_config(tmp_path, checkpoint_every=2)
    with pytest.raises(trainer.NonFiniteLossError, match=r"iteration 4: non-finite loss loss_box_reg=nan") as error:
        trainer.train(config, model=Sabotage(tiny_model(), nan_at=4), train_dataset=Rectangles(8))
    assert "last good checkpoint" in str(error.value) and "last.pth" in str(error.value)
    kept = load_training_state(tmp_path / "last.pth")
    assert kept["iteration"] == 2
    assert all(torch.isfinite(v).all() for v in kept["model"].values() if v.is_floating_point())
    assert [i for i, _ in _losses(tmp_path)] == [1, 2, 3]  # nothing logged for the bad iteration


def test_resume_refuses_a_different_model(tmp_path):
    data = Rectangles(4)
    trainer.train(tiny_config(tmp_path, iterations=1), model=tiny_model(), train_dataset=data)
    config = tiny_config(tmp_path, iterations=2)
    config.model.num_classes = 5
    with pytest.raises(ValueError, match=r"model config differs in model\.num_classes"):
        trainer.train(config, resume=True, model=tiny_model(), train_dataset=data)


def test_resume_takes_a_checkpoint_from_before_a_config_key_was_added(tmp_path):
    """A model key the checkpoint's config lacks (added to the code since) counts as its default:
    the run resumes; the same key at another value is named in full."""
    data = Rectangles(4)
    trainer.train(tiny_config(tmp_path, iterations=1), model=tiny_model(), train_dataset=data)
    saved = torch.load(tmp_path / "last.pth", weights_only=False)
    del saved["model_config"]["mask_head"]["gt_box_copies"]
    torch.save(saved, tmp_path / "last.pth")
    assert trainer.train(tiny_config(tmp_path, iterations=2), resume=True, model=tiny_model(),
                         train_dataset=data)["iteration"] == 2

    config = tiny_config(tmp_path, iterations=3)
    config.model.mask_head.gt_box_copies, config.model.mask_head.gt_box_jitter = 2, 0.1
    config.model.mask_head.train_on = "gt_boxes"
    with pytest.raises(ValueError, match=r"model config differs in model\.mask_head\.gt_box_copies, "
                                         r"model\.mask_head\.gt_box_jitter, model\.mask_head\.train_on"):
        trainer.train(config, resume=True, model=tiny_model(), train_dataset=data)


def test_amp_bf16_on_cpu_and_gradient_clipping_train_with_finite_losses(tmp_path, monkeypatch):
    threads = []
    monkeypatch.setattr(torch, "set_num_threads", threads.append)
    result = trainer.train(tiny_config(tmp_path, iterations=2, amp=True, clip_grad_norm=0.5, cpu_threads=3),
                           model=tiny_model(), train_dataset=Rectangles(4))
    assert result["iteration"] == 2 and threads == [3]
    assert all(np.isfinite(v) for _, losses in _losses(tmp_path) for v in losses.values())


def test_periodic_evaluation_keeps_the_best_checkpoint(tmp_path):
    data = Rectangles(4)
    result = trainer.train(tiny_config(tmp_path, iterations=4, eval_every=2), model=tiny_model(),
                           train_dataset=data, val_dataset=data)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evaluations = [r for r in records if "segm/AP" in r]
    assert [r["iteration"] for r in evaluations] == [2, 4]  # every 2 iterations, not again at the end
    best = max(evaluations, key=lambda r: r["segm/AP"])
    assert result["best_metric"] == best["segm/AP"] and result["metrics"] == {k: v for k, v in evaluations[-1].items() if k != "iteration"}
    assert load_training_state(tmp_path / "best.pth")["best_metric"] == best["segm/AP"]
    assert json.loads((tmp_path / "results.json").read_text()) is not None


def test_init_weights_from_one_of_our_checkpoints(tmp_path):
    data = Rectangles(4)
    first = trainer.train(tiny_config(tmp_path / "a", iterations=2), model=tiny_model(), train_dataset=data)
    # lr 0: the second run must end exactly where its initial weights put it
    second = trainer.train(tiny_config(tmp_path / "b", iterations=1, lr=0.0, init_weights=str(tmp_path / "a" / "last.pth")),
                           model=tiny_model(), train_dataset=data)
    for name, value in first["model"].state_dict().items():
        assert torch.equal(value, second["model"].state_dict()[name]), name


def test_build_datasets_generates_shapes_and_passes_the_augmentation(tmp_path):
    config = Config(data=DataConfig(root=str(tmp_path / "shapes"), shapes_train_images=3, shapes_val_images=2,
                                    shapes_image_size=64, horizontal_flip=0.25, color_jitter=0.1))
    context = trainer.distributed.DistributedContext()
    train_set, val_set = trainer.build_datasets(config, context)
    assert (len(train_set), len(val_set)) == (3, 2)
    assert (tmp_path / "shapes" / "train.json").is_file() and (tmp_path / "shapes" / "val.json").is_file()
    assert (train_set.transforms.horizontal_flip, train_set.transforms.color_jitter) == (0.25, 0.1)
    assert val_set.transforms is None  # evaluation sees the images as they are
    image, target = train_set[0]
    assert image.shape[1:] == (64, 64) and target["boxes"].shape[1] == 4
    with pytest.raises(ValueError, match="data.name: unknown data set 'voc'"):
        trainer.build_datasets(Config(data=DataConfig(name="voc")), context)


def test_init_weights_that_do_not_fit_are_a_clear_error(tmp_path, capsys):
    data = Rectangles(4)
    trainer.train(tiny_config(tmp_path / "a", iterations=1), model=tiny_model(), train_dataset=data)
    more_classes = tiny_model()
    more_classes.roi_heads.box_predictor = FastRCNNPredictor(32, NUM_CLASSES + 3)  # fine-tuning: the predictor restarts
    config = tiny_config(tmp_path / "b", iterations=1, init_weights=str(tmp_path / "a" / "last.pth"))
    trainer.train(config, model=more_classes, train_dataset=data)
    printed = capsys.readouterr().out
    assert "re-initialised roi_heads.box_predictor.cls_score.weight [3, 32] -> [5, 32] (class scores" in printed
    other = tiny_model()
    other.roi_heads.box_head = TwoMLPHead(16 * 49, 48)  # another width: not a fine-tuning difference
    other.roi_heads.box_predictor = FastRCNNPredictor(48, NUM_CLASSES + 1)
    config = tiny_config(tmp_path / "c", iterations=1, init_weights=str(tmp_path / "a" / "last.pth"))
    with pytest.raises(ValueError, match=r"train.init_weights: .*last.pth does not fit the configured model.*"
                                         r"roi_heads.box_head.fc6.weight \[32, 784\] vs \[48, 784\]"):
        trainer.train(config, model=other, train_dataset=data)
    config.train.init_weights = str(tmp_path / "missing.pth")
    with pytest.raises(FileNotFoundError, match="train.init_weights: .*missing.pth does not exist"):
        trainer.train(config, model=tiny_model(), train_dataset=data)


def test_end_to_end_with_our_model_on_shapes(tmp_path):
    """The default path: model, shapes data, loader and evaluation all built from the config."""
    from maskrcnn import load_checkpoint

    model_config = tiny_model_config()
    model_config.num_classes = 6
    config = tiny_config(tmp_path / "run", iterations=2, batch_size=2)
    config.model = model_config
    config.data = DataConfig(root=str(tmp_path / "shapes"), shapes_train_images=4, shapes_val_images=2,
                             shapes_image_size=SIZE, num_workers=0)
    result = trainer.train(config)
    assert result["iteration"] == 2
    assert {"bbox/AP", "segm/AP", "keypoints/AP"} <= set(result["metrics"])
    assert result["best_checkpoint"] == str(tmp_path / "run" / "best.pth")
    reloaded = load_checkpoint(tmp_path / "run" / "last.pth")
    for name, value in result["model"].state_dict().items():
        assert torch.equal(value, reloaded.state_dict()[name]), name


_CTRL_C_SCRIPT = """
import sys, time
import torch
torch.set_num_threads(1)
from test_trainer import Rectangles, tiny_config, tiny_model
from maskrcnn.engine import trainer

class SlowRectangles(Rectangles):  # slower than training: the main process waits on the workers
    def __getitem__(self, key):
        time.sleep(0.3)
        return super().__getitem__(key)

config = tiny_config(sys.argv[1], iterations=500)
config.data.num_workers = 2
result = trainer.train(config, model=tiny_model(), train_dataset=SlowRectangles(12))
print("RESULT", result["interrupted"], result["iteration"], flush=True)
"""


def test_ctrl_c_to_the_process_group_with_loader_workers_saves_and_exits_cleanly(tmp_path):
    """A terminal's Ctrl-C reaches every process of the group, the DataLoader workers included."""
    import subprocess
    import sys
    import time
    from pathlib import Path

    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen([sys.executable, "-c", _CTRL_C_SCRIPT, str(tmp_path)], start_new_session=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environment)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.monotonic() + 180
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[0][-3000:]
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGINT)
    output = process.communicate(timeout=180)[0]
    assert process.returncode == 0, output[-3000:]
    stopped_at = int(output.split("RESULT SIGINT ")[1].split()[0])
    assert 2 <= stopped_at < 500
    assert load_training_state(tmp_path / "last.pth")["iteration"] == stopped_at


def test_resume_with_more_iterations_follows_the_new_schedule(tmp_path):
    data = Rectangles(4)
    trainer.train(tiny_config(tmp_path, iterations=4), model=tiny_model(), train_dataset=data)
    with (tmp_path / "metrics.jsonl").open("a") as file:
        file.write('{"iteration": 5, "loss": 1.')  # a record cut short by a crash: dropped on resume
    result = trainer.train(tiny_config(tmp_path, iterations=8), resume=True, model=tiny_model(), train_dataset=data)
    assert result["iteration"] == 8
    lrs = dict((i, losses["lr"]) for i, losses in _losses(tmp_path))
    assert [lrs[i] for i in (5, 6, 7, 8)] == pytest.approx([0.02 * 0.5 * (1 + np.cos(np.pi * i / 8)) for i in (4, 5, 6, 7)])
    assert lrs[4] == pytest.approx(0.02 * 0.5 * (1 + np.cos(np.pi * 3 / 4)))  # the first run's own schedule


def test_resume_with_our_model_ends_with_the_same_weights(tmp_path):
    """The acceptance check with our Mask R-CNN (box, mask and keypoint heads), not a stand-in,
    with the weights' moving average on: cut after its second update, both the trained weights
    and the average go on exactly."""
    from maskrcnn.model.mask_rcnn import build_model

    def run(output_dir, *, resume=False, signal_at=None):
        config = tiny_config(output_dir, iterations=4, ema_decay=0.8, ema_start=1)
        config.model = tiny_model_config()
        torch.manual_seed(7 if not resume else 8)  # a resumed run's own initialisation must not matter
        model = Sabotage(build_model(config.model), signal_at=signal_at)
        return trainer.train(config, resume=resume, model=model, train_dataset=Rectangles(8))

    full = run(tmp_path / "full")
    assert run(tmp_path / "cut", signal_at=3)["iteration"] == 3
    assert load_training_state(tmp_path / "cut" / "last.pth")["ema_updates"] == 2
    resumed = run(tmp_path / "cut", resume=True)
    assert resumed["iteration"] == 4
    for name, value in full["model"].state_dict().items():  # the averages
        assert torch.equal(value, resumed["model"].state_dict()[name]), name
    saved = [load_training_state(tmp_path / run_name / "last.pth") for run_name in ("full", "cut")]
    assert saved[0]["ema_updates"] == saved[1]["ema_updates"] == 3
    for name, value in saved[0]["training_model"].items():
        assert torch.equal(value, saved[1]["training_model"][name]), name
    trained = saved[0]["training_model"]
    assert any(not torch.equal(value, trained[name]) for name, value in saved[0]["model"].items())


class _Annotations(list):
    """A stand-in data set: what `check_data_fits_model` reads of a CocoDataset."""

    def __init__(self, *, has_masks: bool, has_points: bool) -> None:
        super().__init__([0])
        self.source, self.categories, self.keypoint_names = "train.json", [1], None
        self.has_masks, self.has_points = has_masks, has_points


def test_point_files_train_point_supervision_only():
    """A file with points and no masks trains the point-supervised mask head (Cheng et al.); without
    point_supervision it has no mask targets, and point_supervision needs points: both named."""
    points_only = _Annotations(has_masks=False, has_points=True)
    config = load_config(None, ["model.num_classes=1", "model.mask_head.point_supervision=true"])
    trainer.check_data_fits_model(config, points_only)
    with pytest.raises(ValueError, match="point_coords / point_labels"):
        trainer.check_data_fits_model(config, _Annotations(has_masks=True, has_points=False))
    with pytest.raises(ValueError, match="no segmentation"):
        trainer.check_data_fits_model(load_config(None, ["model.num_classes=1"]), points_only)
