"""The `maskrcnn` command: demo, train, evaluate, predict, export, convert, check-data, points.

Every subcommand has `--help`. `train` also runs under `torchrun --nproc_per_node=N -m maskrcnn
train ...` (the trainer reads torchrun's environment). Exit codes: 0 success, 1 the command ran
but found problems (unreadable images, data errors), 2 it could not run or failed (bad arguments,
files, values, data; printed as one line `maskrcnn COMMAND: message`, with the traceback under
`--debug` or MASKRCNN_DEBUG=1), 130 / 143 a training run stopped by SIGINT / SIGTERM (its
last.pth saved; the message says how to resume). `key=value` overrides may come before or
after the options.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path


class CommandError(Exception):
    """A user-facing failure: printed as `maskrcnn <command>: <message>`, exit code 2."""


# --------------------------------------------------------------------------- helpers
def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _load_model(path: str | Path, device) -> tuple:
    """(model in eval mode on `device`, the checkpoint's entries other than tensors: config,
    categories, labels...). The weights and the optimizer state are not kept: they would double
    the model's memory (or triple it, with AdamW's state) while it runs."""
    from maskrcnn.checkpoint.format import load_checkpoint, read_checkpoint

    try:
        checkpoint = read_checkpoint(path, mmap=True)  # the weights are copied into the model, then unmapped
    except (FileNotFoundError, ValueError) as error:
        raise CommandError(str(error)) from None
    try:
        model = load_checkpoint(checkpoint)
    except (KeyError, ValueError, RuntimeError) as error:
        raise CommandError(f"cannot build the model from {path}: {error}") from None
    metadata = {key: value for key, value in checkpoint.items() if not _holds_tensors(value)}
    del checkpoint
    return model.to(device).eval(), metadata


def _holds_tensors(value) -> bool:
    import torch

    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, dict):
        return any(_holds_tensors(item) for item in value.values())
    if isinstance(value, (list, tuple)):
        return any(_holds_tensors(item) for item in value)
    return False


def _shapes_paths(data: dict) -> dict:
    from maskrcnn.data.shapes import ensure_shapes

    return ensure_shapes(data["root"], num_train=data["shapes_train_images"], num_val=data["shapes_val_images"],
                         image_size=data["shapes_image_size"], seed=data["shapes_seed"])


def _read_json(path: str | Path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise CommandError(f"cannot read {path}: {error}") from None


def _val_files(args: argparse.Namespace, checkpoint: dict) -> tuple[Path, Path]:
    """(annotations, images) to evaluate on: `--data`/`--images`, else the checkpoint's val set."""
    if args.data:
        annotations = Path(args.data)
        images = Path(args.images) if args.images else annotations.with_suffix("")  # data/val.json -> data/val/
        return annotations, images
    data = (checkpoint.get("config") or {}).get("data")
    if not data:
        raise CommandError("the checkpoint does not say which data it was trained on: pass --data ANNOTATIONS")
    if data["name"] == "shapes":
        paths = _shapes_paths(data)
        return paths["val_annotations"], paths["val_images"]
    if not data["val"]["annotations"]:
        raise CommandError("the checkpoint's config has no data.val.annotations: pass --data ANNOTATIONS")
    return Path(data["val"]["annotations"]), Path(data["val"]["images"])


def _report_interrupted(command: str, summary, output_dir: Path) -> int:
    """A run stopped by a signal: one line that says so and how to resume; exit 128 + the signal.

    Not 0: a scheduler (SLURM, Kubernetes) must not take an interrupted run for a finished one.
    """
    name = summary.interrupted
    print(f"maskrcnn {command}: interrupted by {name} after iteration {summary.iteration}; "
          f"{summary.last_checkpoint} saved; `maskrcnn train {output_dir / 'config.yaml'} --resume` "
          f"continues from there", file=sys.stderr)
    number = signal.Signals[name] if name in signal.Signals.__members__ else signal.SIGTERM  # another rank's
    return 128 + int(number)


def _one_line(error: BaseException) -> str:
    """An exception as one line: a DataLoader worker's error keeps only its own last line."""
    text = str(error).strip()
    if "Original Traceback" in text:  # torch re-raises a worker's error with the worker's traceback
        text = text.splitlines()[-1]
    text = "; ".join(line.strip() for line in text.splitlines() if line.strip())
    if not text or isinstance(error, (KeyError, IndexError, AttributeError, TypeError)):
        text = f"{type(error).__name__}: {text}" if text else type(error).__name__
    return text


def _debugging(argv: list[str]) -> bool:
    return "--debug" in argv or os.environ.get("MASKRCNN_DEBUG", "") not in ("", "0")


# --------------------------------------------------------------------------- subcommands
def cmd_train(args: argparse.Namespace) -> int:
    from maskrcnn.checkpoint.fine_tune import WeightsMismatchError
    from maskrcnn.config import load_config
    from maskrcnn.engine.trainer import train

    config = load_config(args.config, args.overrides)
    try:
        summary = train(config, resume=args.resume)
    except (FileNotFoundError, WeightsMismatchError) as error:  # a missing file, weights that do not fit
        raise CommandError(str(error)) from None
    if summary.interrupted:
        return _report_interrupted("train", summary, Path(config.train.output_dir))
    metrics = ", ".join(f"{k} {v:.4f}" for k, v in sorted(summary.metrics.items()) if k.endswith("/AP"))
    print(f"trained to iteration {summary.iteration} ({summary.seconds_per_iteration:.2f} s/iteration); "
          f"{metrics or 'no evaluation'}; checkpoint {summary.last_checkpoint}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from maskrcnn.data.coco import CocoDataset
    from maskrcnn.engine.evaluation import evaluate, format_table

    device = _device(args.device)
    model, checkpoint = _load_model(args.weights, device)
    annotations, images = _val_files(args, checkpoint)
    dataset = CocoDataset(annotations, images)
    out = Path(args.out) if args.out else Path(args.weights).parent / "evaluation"
    started = time.perf_counter()
    try:
        metrics = evaluate(model, dataset, device=device, batch_size=args.batch_size, num_workers=args.num_workers,
                           results_path=out / "results.json")
    except ValueError as error:  # e.g. the model's label table and the file's categories disagree
        raise CommandError(f"{annotations}: {error}") from None
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    print(format_table(metrics))
    print(f"{len(dataset)} images of {annotations} in {time.perf_counter() - started:.1f} s; "
          f"COCO results {out / 'results.json'}, metrics {out / 'metrics.json'}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from maskrcnn.checkpoint.label_space import trained_categories
    from maskrcnn.engine.predict import image_ids_from_coco, predict

    device = _device(args.device)
    model, checkpoint = _load_model(args.weights, device)
    if args.inference_mode != "eager":
        if device.type != "cpu":
            raise CommandError(f"--inference-mode {args.inference_mode} is for the CPU, not {device}")
        from maskrcnn.engine.cpu_inference import optimize_for_cpu

        model = optimize_for_cpu(model, mode=args.inference_mode)
    image_ids = image_ids_from_coco(_read_json(args.annotations)) if args.annotations else None
    report = predict(model, args.inputs, out_dir=args.out, device=device, batch_size=args.batch_size,
                     score_threshold=args.score_threshold, categories=trained_categories(checkpoint, annotations=args.annotations),
                     draw=not args.no_draw, save_masks=args.save_masks, image_ids=image_ids)
    for problem in report.problems:
        print(f"maskrcnn predict: {problem}", file=sys.stderr)
    if report.skipped:
        names = ", ".join(str(p) for p in report.skipped[:10]) + (", ..." if len(report.skipped) > 10 else "")
        print(f"maskrcnn predict: skipped {len(report.skipped)} file(s) that are neither images nor videos: {names}",
              file=sys.stderr)
    videos = f", {len(report.video_results)} video(s) (per-frame JSON beside them)" if report.video_results else ""
    print(f"{len(report.pictures) if not args.no_draw else 'no'} pictures, {report.detections} image detections "
          f"(score >= {args.score_threshold}){videos}; outputs in {args.out}, COCO results {report.results_path}"
          + (f"; {len(report.problems)} input(s) skipped" if report.problems else ""))
    return 1 if report.problems else 0


def cmd_export(args: argparse.Namespace) -> int:
    from maskrcnn.export import export_model

    if args.batch_size < 1:
        raise CommandError(f"--batch-size must be >= 1, got {args.batch_size}")
    model, _ = _load_model(args.weights, "cpu")
    out = export_model(model, args.out, format=args.format, masks=args.masks, batch_size=args.batch_size,
                       example_size=tuple(args.example_size))
    print(f"{args.format} graph of {args.weights} (batch {args.batch_size}, masks {args.masks}) written to {out}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from maskrcnn.checkpoint.convert import convert, recipe_path

    if args.config is None and Path(args.source).suffix == ".pkl":
        raise CommandError(f"{args.source}: a detectron2 model-zoo .pkl needs its config: --config CONFIG.yaml")
    categories = _read_json(args.annotations).get("categories") if args.annotations else None
    try:
        model = convert(args.source, args.destination, detectron2_config=args.config, categories=categories)
    except (FileNotFoundError, ValueError) as error:
        raise CommandError(str(error)) from None
    labels = f"{len(model.label_space)} COCO categories" if model.label_space else "no label table: labels are numbers"
    print(f"converted {args.source} -> {args.destination} ({model.config.num_classes} classes, "
          f"masks {model.config.mask_head.enabled}, keypoints {model.config.keypoint_head.enabled}; {labels}); "
          f"its model as a recipe: {recipe_path(args.destination)}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from maskrcnn.config import load_config
    from maskrcnn.engine.demo import run_demo

    overrides = list(args.overrides) + ([f"train.output_dir={args.out}"] if args.out else [])
    config = load_config(args.config or "shapes_demo", overrides)
    started = time.perf_counter()
    summary = run_demo(config, pictures=args.pictures)
    out = Path(config.train.output_dir)
    if summary.interrupted:
        return _report_interrupted("demo", summary, out)
    minutes = (time.perf_counter() - started) / 60
    print(f"demo: {summary.iteration} iterations at {summary.seconds_per_iteration:.2f} s/iteration, "
          f"{minutes:.1f} min in all; {config.data.shapes_val_images} held-out images")
    drawn = f"pictures: {out / 'contact_sheet.png'} and {out / 'predictions'}, " if args.pictures > 0 else ""
    print(f"{drawn}curves: {out / 'training_curves.png'}, checkpoint: {summary.last_checkpoint}, "
          f"metrics: {out / 'metrics.json'}, log: {out / 'log.txt'}")
    return 0


def cmd_check_data(args: argparse.Namespace) -> int:
    """Exit 0 clean (warnings allowed unless --strict), 1 problems that skip data, 2 an unusable file."""
    from maskrcnn.data.checker import check_data, failed, format_report

    dataset = check_data(args.annotations, images=args.images, check_images=args.check_images)
    print(f"check-data: {args.annotations}" + (f" (images in {args.images})" if args.images else
                                               " (image files not checked: no --images)"))
    print(format_report(dataset))
    found = failed(dataset, strict=args.strict)
    print(f"result: {'FAILED' if found else 'OK'}")
    return 1 if found else 0


def cmd_points(args: argparse.Namespace) -> int:
    """Exit 1 when the file's annotations cannot be turned into points, 2 when it cannot be read."""
    from maskrcnn.data.points import PointSimulationError, point_summary, read_coco, simulate_points, write_coco

    coco = read_coco(args.annotations)
    try:
        result = simulate_points(coco, num_points=args.num_points, seed=args.seed, keep_masks=args.keep_masks)
    except PointSimulationError as error:
        print(f"maskrcnn points: {args.annotations}: {error}", file=sys.stderr)
        return 1
    write_coco(result, args.out)
    summary = point_summary(result)
    inside = f"{summary['inside']:.1%} of points inside their object" if summary["inside"] is not None else "no points"
    print(f"wrote {args.out}: {summary['with_points']} of {summary['annotations']} annotations with "
          f"{args.num_points} points each ({inside}); {summary['crowd']} crowd annotation(s) copied unchanged")
    return 0


# --------------------------------------------------------------------------- the parser
def _demo_arguments(demo: argparse.ArgumentParser) -> None:
    demo.add_argument("--config", help="recipe: a YAML path or a shipped recipe's name (default: shapes_demo)")
    demo.add_argument("--out", help="output folder (default: the recipe's train.output_dir)")
    demo.add_argument("--pictures", type=int, default=8, help="held-out images to draw predictions on (default: 8)")
    demo.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, e.g. train.iterations=100")


def _train_arguments(train: argparse.ArgumentParser) -> None:
    from maskrcnn.config import recipe_names  # PyYAML and dataclasses only: no torch

    train.add_argument("config", help="YAML recipe over the defaults in maskrcnn/config.py: a path, or the name "
                       f"of a shipped recipe ({', '.join(recipe_names())})")
    train.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, e.g. train.lr=0.01")
    train.add_argument("--resume", action="store_true", help="continue exactly from train.output_dir/last.pth")


def _evaluate_arguments(evaluate: argparse.ArgumentParser) -> None:
    evaluate.add_argument("--weights", required=True, help="checkpoint (.pth) written by train or convert")
    evaluate.add_argument("--data", help="COCO annotations JSON (default: the checkpoint's validation data)")
    evaluate.add_argument("--images", help="image folder (default: the JSON's path without .json)")
    evaluate.add_argument("--out", help="output folder (default: <weights folder>/evaluation)")
    evaluate.add_argument("--batch-size", type=int, default=2)
    evaluate.add_argument("--num-workers", type=int, default=2)
    evaluate.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:1 ...")


def _predict_arguments(predict: argparse.ArgumentParser) -> None:
    predict.description = (
        "Predict on image files, video files and folders of them (not recursive). In a folder a file is an image "
        "when its suffix says so or PIL recognises its content, a video by its suffix; other files are listed as "
        "skipped. Images: one PNG each and one COCO results JSON. Videos: an annotated .mp4 (H.264) and a JSON "
        "with one entry per frame. Exit 1 when an input could not be processed (each is named)."
    )
    predict.add_argument("inputs", nargs="+", metavar="INPUT", help="image or video files and/or folders")
    predict.add_argument("--weights", required=True, help="checkpoint (.pth)")
    predict.add_argument("--out", required=True, help="output folder")
    predict.add_argument("--score-threshold", type=float, default=0.5, help="keep detections scoring at least this")
    predict.add_argument("--batch-size", type=int, default=4, help="images or frames per model call")
    predict.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:1 ...")
    predict.add_argument("--inference-mode", choices=("eager", "strict", "fast", "bf16"), default="eager",
                         help="CPU only: strict = outputs identical to torchvision's; fast = fused oneDNN "
                              "convolutions (float tolerance); bf16 = CPUs with AMX or AVX-512 bf16 units (fast elsewhere); "
                              "default eager")
    predict.add_argument("--annotations", help="COCO JSON: its categories name the labels (default: the checkpoint's), "
                                               "and results carry its image ids (matched by file_name), so they can be scored")
    predict.add_argument("--no-draw", action="store_true", help="write no pictures or annotated videos, only results")
    predict.add_argument("--save-masks", choices=("rle", "png", "none"), default="rle",
                         help="rle (default): COCO RLE in each result's segmentation; png: one PNG per detection in "
                              "OUT/masks/, named by the result's mask_file; none: no masks")


def _export_arguments(export: argparse.ArgumentParser) -> None:
    export.description = (
        "Write the whole model, pre- and post-processing included, as one traced graph: input images "
        "float32 [B, 3, H, W] in 0-1 (any H, W); outputs boxes [N, 4], labels [N], scores [N], masks, "
        "keypoints [N, K, 3] and keypoints_scores [N, K] as the model has them (image_index [N] when B > 1). "
        "ONNX runs with onnxruntime (pip install 'maskrcnn[export]'), TorchScript with torch.jit.load. "
        "The graph runs on the CPU. Batch size: fixed when exporting in both formats (the trace unrolls "
        "the loop over images); the images of one call share one size."
    )
    export.add_argument("--weights", required=True, help="checkpoint (.pth)")
    export.add_argument("--format", required=True, choices=("onnx", "torchscript"))
    export.add_argument("--out", required=True, help="file to write (.onnx / .pt)")
    export.add_argument("--masks", choices=("image", "box"), default="image",
                        help="image (default): [N, 1, H, W] pasted at the image size, the Python model's output, so "
                             "the file replaces it as is; box: [N, 1, 28, 28] over each box (memory N*28*28 instead "
                             "of N*H*W: 4.8 GB for 100 masks on a 4000 x 3000 image); paste the ones you need")
    export.add_argument("--batch-size", type=int, default=1, help="images per call, fixed in the graph (default: 1)")
    export.add_argument("--example-size", type=int, nargs=2, default=(480, 640), metavar=("H", "W"),
                        help="size of the random images traced (any size works afterwards; default: 480 640)")


def _convert_arguments(convert: argparse.ArgumentParser) -> None:
    convert.add_argument("source", help="torchvision state dict (fasterrcnn/maskrcnn/keypointrcnn R50-FPN, v1 or v2), "
                                        "or with --config detectron2's model_final.pkl / .pth")
    convert.add_argument("destination", help="maskrcnn checkpoint to write; its model is also written as a recipe "
                                             "beside it (same name, .yaml) to fine-tune from")
    convert.add_argument("--config", default=None,
                         help="detectron2 YAML config of the weights: the config.yaml of its output folder, or a "
                              "model-zoo file (its _BASE_ files beside it); detectron2 itself is not needed")
    convert.add_argument("--annotations", help="COCO JSON the weights were trained on: its categories become the label "
                                               "table (default: COCO's for torchvision's and detectron2's COCO "
                                               "models, else none)")


def _check_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("annotations", help="COCO instances or person-keypoints JSON file")
    parser.add_argument("--images", default=None,
                        help="image folder that file_name is relative to (without it, image files are not checked)")
    parser.add_argument("--check-images", choices=("header", "full", "exists", "none"), default="header",
                        help="header: open each image's header (size, EXIF); full: also decode every image "
                             "(finds truncated files); exists: only look for the file")
    parser.add_argument("--full", action="store_const", const="full", dest="check_images",
                        help="same as --check-images full")
    parser.add_argument("--strict", action="store_true", help="exit non-zero on repaired problems (warnings) too")


def _points_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("annotations", type=Path, help="COCO instances JSON with mask segmentations")
    parser.add_argument("--num-points", type=int, default=10, help="points per object (default: 10)")
    parser.add_argument("--out", type=Path, required=True, help="output COCO JSON with point_coords / point_labels")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--keep-masks", action="store_true", help="keep the segmentations (default: remove them)")


# (name, handler, help, the function that adds its arguments): every subcommand is a `cmd_*` here,
# whose work is in the library (engine/, data/, checkpoint/, export.py); it parses and prints.
SUBCOMMANDS = (
    ("demo", cmd_demo, "train a small model on the built-in shapes data (CPU, minutes), evaluate, draw, plot", _demo_arguments),
    ("train", cmd_train, "train from a YAML recipe; the resolved config is saved in train.output_dir", _train_arguments),
    ("evaluate", cmd_evaluate, "COCO box / mask / keypoint AP with a per-class table, and a results JSON", _evaluate_arguments),
    ("predict", cmd_predict, "draw predictions on images and videos and write COCO results", _predict_arguments),
    ("export", cmd_export, "write the whole model (resize, normalise, detect, paste) as ONNX or TorchScript", _export_arguments),
    ("convert", cmd_convert, "convert torchvision or detectron2 weights into a maskrcnn checkpoint", _convert_arguments),
    ("check-data", cmd_check_data, "check a COCO annotation file against its images; list every problem",
     _check_data_arguments),
    ("points", cmd_points, "simulate point annotations from masks (point supervision)", _points_arguments),
)


def build_parser() -> argparse.ArgumentParser:
    """The parser of every subcommand (no torch import: `maskrcnn --help` stays fast)."""
    parser = argparse.ArgumentParser(prog="maskrcnn", description="Mask R-CNN: detection, instance masks, keypoints.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, handler, help_text, add_arguments in SUBCOMMANDS:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(handler=handler)
        sub.add_argument("--debug", action="store_true",
                         help="on an error, show the Python traceback (also: environment MASKRCNN_DEBUG=1)")
        add_arguments(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs one subcommand; errors are one line `maskrcnn COMMAND: message` with exit code 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parse(build_parser(), argv)
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        print(f"maskrcnn {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # every failure reaches the user as one line unless --debug asks for more
        if _debugging(argv):
            raise
        print(f"maskrcnn {args.command}: {_one_line(error)}", file=sys.stderr)
        return 2


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """parse_args, also taking `key=value` overrides typed after the options (`--resume a.b=1`)."""
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args
