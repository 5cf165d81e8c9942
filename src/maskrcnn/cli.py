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
    """(model in eval mode on `device`, the checkpoint dict)."""
    from maskrcnn.checkpoint.format import load_checkpoint, read_checkpoint

    try:
        checkpoint = read_checkpoint(path)
    except (FileNotFoundError, ValueError) as error:
        raise CommandError(str(error)) from None
    try:
        model = load_checkpoint(checkpoint)
    except (KeyError, ValueError, RuntimeError) as error:
        raise CommandError(f"cannot build the model from {path}: {error}") from None
    return model.to(device).eval(), checkpoint


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

    overrides = list(args.overrides) + ([f"train.output_dir={args.out}"] if args.out else [])
    return run_demo(load_config(args.config or "shapes_demo", overrides), pictures=args.pictures)


def run_demo(config, *, pictures: int = 8) -> int:
    """Generate `shapes` if missing, train from scratch; the trainer evaluates, prints the AP
    table, draws the pictures and plots the curves (engine/run_outputs.py)."""
    from maskrcnn.engine.trainer import train

    if config.data.name != "shapes":
        raise CommandError(f"the demo runs on the built-in shapes data, not data.name={config.data.name!r}")
    started = time.perf_counter()
    _shapes_paths(vars(config.data))
    config.train.pictures = pictures
    print(f"shapes data in {config.data.root} ({time.perf_counter() - started:.1f} s); training "
          f"{config.train.iterations} iterations of {config.train.batch_size} images on {config.train.device}")
    summary = train(config)
    out = Path(config.train.output_dir)
    if summary.interrupted:
        return _report_interrupted("demo", summary, out)
    minutes = (time.perf_counter() - started) / 60
    print(f"demo: {summary.iteration} iterations at {summary.seconds_per_iteration:.2f} s/iteration, "
          f"{minutes:.1f} min in all; {config.data.shapes_val_images} held-out images")
    drawn = f"pictures: {out / 'contact_sheet.png'} and {out / 'predictions'}, " if pictures > 0 else ""
    print(f"{drawn}curves: {out / 'training_curves.png'}, checkpoint: {summary.last_checkpoint}, "
          f"metrics: {out / 'metrics.json'}, log: {out / 'log.txt'}")
    return 0


def _external(module_name: str, command: str):
    """(add_arguments, run, None) of another part's subcommand, or, when that part cannot be
    imported, a runner that fails saying why, and the reason (shown in `--help`)."""
    import importlib

    try:
        module = importlib.import_module(module_name)
        return module.add_arguments, module.run, None
    except (ImportError, AttributeError) as error:
        reason = f"{module_name} is not available in this installation ({error})"

        def unavailable(args: argparse.Namespace) -> int:
            raise CommandError(f"cannot run: {reason}")

        def swallow_arguments(parser: argparse.ArgumentParser) -> None:
            parser.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)

        return swallow_arguments, unavailable, reason


# --------------------------------------------------------------------------- the parser
def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser. `command`: the subcommand about to run; the other parts' subcommands
    (check-data, points) import their module and add their arguments only when they are the
    one, so that `maskrcnn --help` does not import torch."""
    from maskrcnn.config import recipe_names  # PyYAML and dataclasses only: no torch

    parser = argparse.ArgumentParser(prog="maskrcnn", description="Mask R-CNN: detection, instance masks, keypoints.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, handler, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(handler=handler)
        sub.add_argument("--debug", action="store_true",
                         help="on an error, show the Python traceback (also: environment MASKRCNN_DEBUG=1)")
        return sub

    demo = add("demo", cmd_demo, "train a small model on the built-in shapes data (CPU, minutes), evaluate, draw, plot")
    demo.add_argument("--config", help="recipe: a YAML path or a shipped recipe's name (default: shapes_demo)")
    demo.add_argument("--out", help="output folder (default: the recipe's train.output_dir)")
    demo.add_argument("--pictures", type=int, default=8, help="held-out images to draw predictions on (default: 8)")
    demo.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, e.g. train.iterations=100")

    train = add("train", cmd_train, "train from a YAML recipe; the resolved config is saved in train.output_dir")
    train.add_argument("config", help="YAML recipe over the defaults in maskrcnn/config.py: a path, or the name "
                       f"of a shipped recipe ({', '.join(recipe_names())})")
    train.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, e.g. train.lr=0.01")
    train.add_argument("--resume", action="store_true", help="continue exactly from train.output_dir/last.pth")

    evaluate = add("evaluate", cmd_evaluate, "COCO box / mask / keypoint AP with a per-class table, and a results JSON")
    evaluate.add_argument("--weights", required=True, help="checkpoint (.pth) written by train or convert")
    evaluate.add_argument("--data", help="COCO annotations JSON (default: the checkpoint's validation data)")
    evaluate.add_argument("--images", help="image folder (default: the JSON's path without .json)")
    evaluate.add_argument("--out", help="output folder (default: <weights folder>/evaluation)")
    evaluate.add_argument("--batch-size", type=int, default=2)
    evaluate.add_argument("--num-workers", type=int, default=2)
    evaluate.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:1 ...")

    predict = add("predict", cmd_predict, "draw predictions on images and videos and write COCO results")
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
                              "convolutions (float tolerance); bf16 = AMX CPUs (fast elsewhere); default eager")
    predict.add_argument("--annotations", help="COCO JSON: its categories name the labels (default: the checkpoint's), "
                                               "and results carry its image ids (matched by file_name), so they can be scored")
    predict.add_argument("--no-draw", action="store_true", help="write no pictures or annotated videos, only results")
    predict.add_argument("--save-masks", choices=("rle", "png", "none"), default="rle",
                         help="rle (default): COCO RLE in each result's segmentation; png: one PNG per detection in "
                              "OUT/masks/, named by the result's mask_file; none: no masks")

    export = add("export", cmd_export, "write the whole model (resize, normalise, detect, paste) as ONNX or TorchScript")
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

    convert = add("convert", cmd_convert, "convert torchvision or detectron2 weights into a maskrcnn checkpoint")
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

    for name, module, help_text in (
        ("check-data", "maskrcnn.data.checker", "check a COCO annotation file against its images; list every problem"),
        ("points", "maskrcnn.data.points", "simulate point annotations from masks (point supervision)"),
    ):
        if command != name:
            add(name, None, help_text)  # listed in the overview; its arguments load when it runs
            continue
        add_arguments, run, missing = _external(module, name)
        add_arguments(add(name, run, help_text + (f" [NOT AVAILABLE: {missing}]" if missing else "")))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs one subcommand; errors are one line `maskrcnn COMMAND: message` with exit code 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    args = _parse(build_parser(command), argv)
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
