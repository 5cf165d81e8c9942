"""predict.py: pictures and results JSON for a folder, bad paths and unreadable images reported."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_util

from maskrcnn.engine.predict import collect_inputs, predict
from tiny_models import tiny_model

CATEGORIES = [{"id": 5, "name": "circle", "keypoints": ["top", "bottom"], "skeleton": [[1, 2]]},
              {"id": 9, "name": "square", "keypoints": ["top", "bottom"], "skeleton": [[1, 2]]}]


class CentreModel(torch.nn.Module):
    """Two detections per image: a confident centre square (label 2) and a weak one (label 1)."""

    def __init__(self):
        super().__init__()
        self.seen_sizes = []

    def forward(self, images):
        outputs = []
        for image in images:
            h, w = image.shape[-2:]
            self.seen_sizes.append((h, w))
            boxes = torch.tensor([[w / 4, h / 4, 3 * w / 4, 3 * h / 4], [0.0, 0.0, w / 2, h / 2]])
            masks = torch.zeros(2, 1, h, w)
            masks[0, 0, h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = 0.9
            masks[1, 0, : h // 2, : w // 2] = 0.7
            keypoints = torch.tensor([[[w / 2, h / 4, 1.0], [w / 2, 3 * h / 4, 1.0]], [[1.0, 1.0, 1.0], [2.0, 2.0, 1.0]]])
            outputs.append({"boxes": boxes, "labels": torch.tensor([2, 1]), "scores": torch.tensor([0.9, 0.3]),
                            "masks": masks, "keypoints": keypoints})
        return outputs


def _folder(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(folder / "a_rgb.png")
    Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8)).save(folder / "b_gray.jpg")
    Image.fromarray(np.full((24, 20), 65535, dtype=np.uint16)).save(folder / "c_16bit.png")
    (folder / "d_broken.png").write_bytes(b"\x89PNG not really")
    (folder / "notes.txt").write_text("not an image: listed as skipped")
    return folder


def test_folder_gives_one_png_per_image_and_a_valid_results_json(tmp_path):
    folder = _folder(tmp_path)
    out = tmp_path / "out"
    model = CentreModel()
    report = predict(model, [folder, tmp_path / "missing.jpg"], out_dir=out, device="cpu", batch_size=2,
                     score_threshold=0.5, categories=CATEGORIES)
    assert [p.name for p in report.pictures] == ["a_rgb.png", "b_gray.png", "c_16bit.png"]
    for picture, size in zip(report.pictures, [(40, 60), (32, 32), (24, 20)]):
        with Image.open(picture) as written:
            assert written.format == "PNG" and (written.height, written.width) == size
    assert model.seen_sizes == [(40, 60), (32, 32), (24, 20)]
    # The bad file and the missing path are named; the rest was processed.
    assert len(report.problems) == 2
    assert any("d_broken.png" in p and "cannot read image" in p for p in report.problems)
    assert any("missing.jpg" in p and "no such file" in p for p in report.problems)

    results = json.loads(report.results_path.read_text())
    assert len(results) == 3 == report.detections  # the 0.3 detections are below the threshold
    assert [r["image_id"] for r in results] == [1, 2, 3]
    assert {r["category_id"] for r in results} == {9}  # label 2 -> the second category by id
    assert results[0]["bbox"] == [15.0, 10.0, 30.0, 20.0]
    assert results[0]["keypoints"][:3] == [29.5, 9.5, 1.0]  # continuous -> COCO pixel indices
    rle = results[0]["segmentation"]
    assert mask_util.decode({"size": rle["size"], "counts": rle["counts"].encode()}).sum() == 30 * 20
    assert results[2]["file_name"].endswith("c_16bit.png")


def test_score_threshold_keeps_weak_detections_and_labels_without_categories(tmp_path):
    folder = _folder(tmp_path)
    report = predict(CentreModel(), [folder / "a_rgb.png"], out_dir=tmp_path / "o", device="cpu", score_threshold=0.2)
    results = json.loads(report.results_path.read_text())
    assert sorted(r["category_id"] for r in results) == [1, 2] and report.problems == []


def test_same_stem_in_two_folders_gives_two_pictures(tmp_path):
    for name in ("x", "y"):
        (tmp_path / name).mkdir()
        Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / name / "img.png")
    report = predict(CentreModel(), [tmp_path / "x", tmp_path / "y"], out_dir=tmp_path / "o", device="cpu")
    assert sorted(p.name for p in report.pictures) == ["img.png", "img_2.png"]


def test_empty_folder_is_a_problem_and_results_are_still_written(tmp_path):
    (tmp_path / "empty").mkdir()
    report = predict(CentreModel(), [tmp_path / "empty"], out_dir=tmp_path / "o", device="cpu")
    assert report.pictures == [] and "has no images or videos" in report.problems[0]
    assert json.loads(report.results_path.read_text()) == []


def test_collect_inputs_decides_by_content_and_lists_what_it_skipped(tmp_path):
    # Readable images with other suffixes (.ppm, .jfif, none) were skipped silently.
    pixels = np.zeros((8, 8, 3), np.uint8)
    Image.fromarray(pixels).save(tmp_path / "b.png")
    Image.fromarray(pixels).save(tmp_path / "c.ppm")
    Image.fromarray(pixels).save(tmp_path / "d.jfif", format="JPEG")
    Image.fromarray(pixels).save(tmp_path / "e_no_suffix", format="PNG")
    (tmp_path / "a.JPG").write_bytes(b"")  # an image suffix: decoding will report it, not a silent skip
    (tmp_path / "notes.txt").write_text("hello")
    found = collect_inputs([tmp_path, tmp_path / "nope"])
    assert [f.name for f in found.images] == ["a.JPG", "b.png", "c.ppm", "d.jfif", "e_no_suffix"]
    assert [f.name for f in found.skipped] == ["notes.txt"]
    assert found.problems == [f"{tmp_path / 'nope'}: no such file or folder"]


def test_predict_cli_processes_other_suffixes_and_names_the_skipped_files(tmp_path, capsys):
    from maskrcnn.checkpoint import save_checkpoint
    from maskrcnn.cli import main

    model = tiny_model("mask", score_thresh=0.0)
    save_checkpoint(tmp_path / "model.pth", model, model_config=model.config)
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(np.zeros((20, 24, 3), np.uint8)).save(folder / "frame.ppm")
    Image.fromarray(np.zeros((20, 24, 3), np.uint8)).save(folder / "photo.jfif", format="JPEG")
    (folder / "readme.md").write_text("# not an image")
    code = main(["predict", "--weights", str(tmp_path / "model.pth"), str(folder), "--out", str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert code == 0
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == ["frame.png", "photo.png"]
    assert "skipped 1 file(s) that are neither images nor videos" in captured.err and "readme.md" in captured.err


def test_predict_gives_the_models_detections_on_the_decoded_floats(tmp_path):
    """predict keeps images uint8 while our model runs: the results are model([decode_image(path)])'s."""
    from maskrcnn.data.coco import decode_image
    from maskrcnn.engine.evaluation import predictions_to_coco

    model = tiny_model("all", score_thresh=0.0)
    folder = _folder(tmp_path)
    report = predict(model, [folder / "a_rgb.png"], out_dir=tmp_path / "o", device="cpu", score_threshold=0.0,
                     save_masks="none")
    with torch.no_grad():
        output = model.detect([decode_image(folder / "a_rgb.png")], paste_masks=False)[0]
    plain = {key: value for key, value in output.items() if key in ("boxes", "labels", "scores", "keypoints")}
    expected = predictions_to_coco(plain, image_id=1, category_ids=torch.arange(int(output["labels"].max()) + 1))
    got = json.loads(report.results_path.read_text())
    assert len(expected) > 0 and [{k: v for k, v in r.items() if k != "file_name"} for r in got] == expected


def test_torchvision_mask_rcnn_runs_through_predict(tmp_path):
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    torch.manual_seed(0)
    backbone = resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=5)
    model = MaskRCNN(backbone, num_classes=3, min_size=64, max_size=64, box_score_thresh=0.0,
                     rpn_pre_nms_top_n_test=50, rpn_post_nms_top_n_test=20, box_detections_per_img=5)
    folder = _folder(tmp_path)
    report = predict(model, [folder], out_dir=tmp_path / "o", device="cpu", score_threshold=0.0, categories=CATEGORIES)
    results = json.loads(report.results_path.read_text())
    assert len(report.pictures) == 3 and len(results) == report.detections > 0
    assert {r["category_id"] for r in results} <= {5, 9}


def _checkpoint(tmp_path, kind="mask"):
    from maskrcnn.checkpoint import save_checkpoint

    model = tiny_model(kind, score_thresh=0.0)
    return save_checkpoint(tmp_path / "model.pth", model, model_config=model.config), model


def test_predict_cli_names_an_extreme_aspect_ratio_image_and_goes_on(tmp_path, capsys):
    # A 10000 x 10 image aborted the whole run with a torch traceback.
    from maskrcnn.cli import main

    weights, _ = _checkpoint(tmp_path)
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(np.full((10, 10000, 3), 128, np.uint8)).save(folder / "a_strip.png")
    Image.fromarray(np.full((40, 30, 3), 200, np.uint8)).save(folder / "b_normal.png")
    code = main(["predict", "--weights", str(weights), str(folder), "--out", str(tmp_path / "out"), "--score-threshold", "0"])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    assert code == 0, captured.err
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == ["a_strip.png", "b_normal.png"]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert {r["file_name"].split("/")[-1] for r in results} == {"a_strip.png", "b_normal.png"}


def _write_video(path, frames: int, size=(36, 50)):
    from maskrcnn.engine.video import VideoWriter

    writer = VideoWriter(path, fps=10)
    rng = np.random.default_rng(0)
    for _ in range(frames):
        writer.write(torch.from_numpy(rng.integers(0, 256, (3, *size), dtype=np.uint8)))
    return writer.close()


def test_predict_cli_on_a_video_writes_a_video_and_one_json_entry_per_frame(tmp_path, capsys):
    import av

    from maskrcnn.cli import main

    weights, _ = _checkpoint(tmp_path)
    video = _write_video(tmp_path / "clip.mp4", frames=5, size=(36, 50))
    code = main(["predict", "--weights", str(weights), str(video), "--out", str(tmp_path / "out"), "--score-threshold", "0.2"])
    assert code == 0, capsys.readouterr().err
    with av.open(str(tmp_path / "out" / "clip.mp4")) as container:
        decoded = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    assert len(decoded) == 5 and decoded[0].shape == (36, 50, 3)
    summary = json.loads((tmp_path / "out" / "clip.json").read_text())
    assert summary["video"] == str(video) and summary["fps"] == 10 and (summary["height"], summary["width"]) == (36, 50)
    assert [frame["frame"] for frame in summary["frames"]] == [0, 1, 2, 3, 4]
    assert [frame["time"] for frame in summary["frames"]] == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])
    assert sum(len(frame["detections"]) for frame in summary["frames"]) > 0
    detection = next(d for frame in summary["frames"] for d in frame["detections"])
    assert {"bbox", "score", "category_id", "segmentation"} <= set(detection)


def test_predict_cli_with_annotations_writes_the_files_image_ids(tmp_path, capsys):
    from maskrcnn.cli import main

    weights, _ = _checkpoint(tmp_path)
    folder = tmp_path / "val"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for name in ("0001.png", "0002.png", "extra.png"):
        Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(folder / name)
    coco = {"images": [{"id": 42, "file_name": "val/0001.png", "height": 40, "width": 50},
                       {"id": 17, "file_name": "0002.png", "height": 40, "width": 50}],
            "annotations": [], "categories": [{"id": 5, "name": "a"}, {"id": 6, "name": "b"}, {"id": 9, "name": "c"}]}
    (tmp_path / "val.json").write_text(json.dumps(coco))
    out = tmp_path / "out"
    code = main(["predict", "--weights", str(weights), str(folder), "--out", str(out), "--score-threshold", "0",
                 "--annotations", str(tmp_path / "val.json"), "--no-draw", "--save-masks", "png"])
    err = capsys.readouterr().err
    assert code == 1 and "extra.png: not an image of the annotation file" in err  # named, not given a made-up id
    results = json.loads((out / "results.json").read_text())
    ids = {r["file_name"].split("/")[-1]: r["image_id"] for r in results}
    assert ids == {"0001.png": 42, "0002.png": 17}
    assert {r["category_id"] for r in results} <= {5, 6, 9}
    assert list(out.glob("*.png")) == []  # --no-draw
    first = results[0]
    assert "segmentation" not in first and (out / first["mask_file"]).is_file()  # --save-masks png
    with Image.open(out / first["mask_file"]) as mask:
        assert mask.size == (50, 40)


def test_video_writer_pads_odd_sizes_for_h264(tmp_path):
    import av

    path = _write_video(tmp_path / "odd.mp4", frames=2, size=(35, 51))
    with av.open(str(path)) as container:
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    assert len(frames) == 2 and frames[0].shape == (36, 52, 3)
