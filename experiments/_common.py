"""Shared by the experiment scripts: the recipe, runs per seed, their records, evaluation, tables.

Every run trains a fresh model with `maskrcnn.engine.trainer.train` from the demo's recipe
(`shapes_demo`: src/maskrcnn/configs/shapes_demo.yaml as it is in this checkout) plus the run's
own overrides, with its schedule stretched to `--iterations`, once per seed in `--seeds`. It then evaluates the model on
the `shapes` validation set with the same class groups (so that the fully supervised ceiling
also reports AP on the "novel" classes), and writes its record beside its checkpoint:

    OUT/<run>/seed<S>/result.json   {"run", "seed", "config" (the resolved config), "metrics"}
    OUT/results.json                every run and seed, their mean and spread, the reference
    OUT/table.md                    the table the script prints (also written into a README
                                    block with --readme)
    experiments/records/<experiment>.json
                                    with --readme: every record the table holds, tracked in git,
                                    so that a fresh clone (OUT is not tracked) re-reads them too

A run whose record exists (under OUT, else in experiments/records/) is read back instead of trained
again, provided it was trained with the config this command would use (otherwise the script stops
and names the differences): a rerun, or a second process on other rows (`--only`), continues
where the first stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

import maskrcnn.config as maskrcnn_config
from maskrcnn.config import Config, ConfigError, config_to_dict, load_config
from maskrcnn.data.shapes import SHAPE_NAMES

# On top of the recipe: no evaluation inside `train` (each run is evaluated once at the end, with
# the class groups), a checkpoint every 500 iterations (a killed run loses at most that much),
# data loading in the training process (two runs share the machine's two cores, one each). The
# keypoint head stays on, as in the demo: without its supervision the shared backbone learns far
# less (experiments/README.md, appendix).
BASE_OVERRIDES = [
    "data.num_workers=0",
    "train.eval_every=0",
    "train.checkpoint_every=500",
    "train.log_every=50",
]
# The demo's own 1500 iterations: since its recipe samples 128 RoIs per image the detector reaches box
# AP ~0.53 there (at the old 600 it was ~0.2 and limited everything), and a run trains in 14-19 min with
# one thread while the other core runs another, inside the 20-30 min per run; 2000 would
# take a third longer for no detector that limits the masks less. experiments/README.md.
DEFAULT_ITERATIONS = 1500
DEFAULT_SEEDS = [0, 1, 2]
RECORDS = Path(__file__).resolve().parent / "records"  # the tracked copies of the records, per experiment


@dataclass(frozen=True)
class Run:
    """One row of a table: its name, its folder under OUT, and its config overrides."""

    name: str
    folder: str
    overrides: list[str]


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="shapes_demo", help="base recipe (a YAML path or a shipped recipe's name)")
    parser.add_argument("--iterations", type=int, default=DEFAULT_ITERATIONS,
                        help=f"training iterations per run; the recipe's schedule is scaled to them "
                             f"(default {DEFAULT_ITERATIONS}, about 15-20 min per run on one core)")
    parser.add_argument("--seeds", type=int, nargs="+", default=DEFAULT_SEEDS,
                        help="training seeds (train.seed); every row runs once per seed (default: 0 1 2; "
                             "put key.sub=value overrides before it)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the runs and the results JSON")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 lets two runs share a 2-core machine)")
    parser.add_argument("--only", nargs="*", default=None, help="train only these rows (names as in the table)")
    parser.add_argument("--reevaluate", action="store_true", help="evaluate finished runs again from their last.pth")
    parser.add_argument("--table-only", action="store_true", help="train nothing: print the table of the runs done")
    parser.add_argument("--readme", type=Path, default=None,
                        help="also write the table into this file's marked block (experiments/README.md)")
    parser.add_argument("--table", default=None, metavar="NAME",
                        help="name of a second table of the same experiment (e.g. runs on another CPU or in another "
                             "precision): its tracked records are experiments/records/NAME.json and its README block "
                             "is NAME's, so its runs neither read back nor overwrite the main table's "
                             "(default: the script's name, the main table)")
    parser.add_argument("overrides", nargs="*", default=[], help="extra key.sub=value config overrides for every run")


def parse_arguments(parser: argparse.ArgumentParser, argv: list[str] | None, *, script: str) -> argparse.Namespace:
    """Parse, remember the command (for results.json) and set the torch threads."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.command = [f"experiments/{script}.py", *argv]
    args.script = script
    # the table's name: its tracked records (experiments/records/<table>.json) and its README block
    args.table = args.table or script
    torch.set_num_threads(args.threads)
    return args


def check_only(args: argparse.Namespace, names: list[str]) -> None:
    """`--only` takes run names; anything else (a `key=value` override typed after it, which
    argparse hands to `--only`) is an error instead of being silently ignored."""
    unknown = [name for name in args.only or [] if name not in names]
    if unknown:
        hint = " (put key.sub=value overrides before --only)" if any("=" in name for name in unknown) else ""
        raise SystemExit(f"--only: unknown run name(s) {unknown}{hint}; the runs are {names}")


def scaled_schedule(recipe: Config, iterations: int) -> list[str]:
    """Overrides that stretch the recipe's schedule to `iterations`: the cosine (or constant)
    schedule spans `train.iterations` by itself; the milestones of a step schedule move in
    proportion. The warm-up stays as long as in the recipe: it shields the first updates of a
    from-scratch network, whatever the length of the run (detectron2's 1x and 3x schedules
    share their warm-up the same way)."""
    if iterations < 1:
        raise SystemExit(f"--iterations must be >= 1, got {iterations}")
    if recipe.train.schedule != "step":
        return [f"train.iterations={iterations}"]
    steps = [round(step * iterations / recipe.train.iterations) for step in recipe.train.steps]
    return [f"train.iterations={iterations}", f"train.steps={steps}"]


def make_config(args: argparse.Namespace, run: Run, seed: int) -> Config:
    """The recipe + BASE_OVERRIDES + the command's overrides + the run's, on the scaled schedule."""
    overrides = BASE_OVERRIDES + list(args.overrides) + run.overrides
    try:
        extra = scaled_schedule(load_config(args.config, overrides), args.iterations)
        extra += [f"train.seed={seed}", f"train.output_dir={run_folder(args, run, seed)}"]
        return load_config(args.config, overrides + extra)
    except ConfigError as error:
        raise SystemExit(f"{run.name}: {error}") from None


def run_folder(args: argparse.Namespace, run: Run, seed: int) -> Path:
    return args.out / run.folder / f"seed{seed}"


def shapes_paths(config: Config) -> dict[str, Path]:
    from maskrcnn.data.shapes import ensure_shapes

    data = config.data
    return ensure_shapes(
        data.root, num_train=data.shapes_train_images, num_val=data.shapes_val_images,
        image_size=data.shapes_image_size, seed=data.shapes_seed,
    )


# --------------------------------------------------------------------------- records
def config_differences(stored: dict, wanted: dict) -> list[str]:
    """`key: stored -> wanted` for every config key that differs (the output folder aside); a key
    that the stored config lacks counts as its default (maskrcnn.config.config_differences)."""
    differing = maskrcnn_config.config_differences(stored, wanted, defaults=config_to_dict(Config()))
    return [f"{key}: {old!r} -> {new!r}" for key, old, new in differing if key != "train.output_dir"]


def record_key(run: Run, seed: int) -> str:
    return f"{run.folder}/seed{seed}"


def tracked_records(experiment: str) -> dict[str, dict]:
    """`{record_key: record}` of experiments/records/<experiment>.json ({} before the first --readme)."""
    path = RECORDS / f"{experiment}.json"
    return json.loads(path.read_text())["records"] if path.is_file() else {}


def find_record(args: argparse.Namespace, run: Run, seed: int) -> dict | None:
    """A run's record: OUT/<run>/seed<S>/result.json, else the tracked copy, else None."""
    path = run_folder(args, run, seed) / "result.json"
    if path.is_file():
        return json.loads(path.read_text())
    return tracked_records(args.table).get(record_key(run, seed))


def read_record(record: dict | None, config: Config, where: Path | str) -> dict | None:
    """A finished run's metrics, or None when it has no record. Stops when the record was
    written by a run with another config: mixing those in one table would be wrong."""
    if record is None:
        return None
    differences = config_differences(record["config"], config_to_dict(config))
    if differences:
        shown = "; ".join(differences[:5]) + (f"; and {len(differences) - 5} more" if len(differences) > 5 else "")
        raise SystemExit(f"{where} was trained with another config ({shown}): use another --out, or delete that "
                         f"run to train it again")
    return record["metrics"]


def check_unfinished(folder: Path, config: Config) -> None:
    """A run stopped half-way continues from its last.pth only under the config it started with."""
    started = folder / "config.yaml"
    if (folder / "last.pth").is_file() and started.is_file():
        differences = config_differences(yaml.safe_load(started.read_text()), config_to_dict(config))
        if differences:
            raise SystemExit(f"{folder} holds an unfinished run with another config ({'; '.join(differences[:5])}): "
                             f"use another --out, or delete that folder to start it again")


def write_json(path: Path, data: dict) -> None:
    """Written to a temporary file and renamed: a crash or a second process never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(data, indent=2))
    os.replace(temporary, path)


# --------------------------------------------------------------------------- running
def run_all(args: argparse.Namespace, runs: list[Run], class_groups: dict[str, list[int]] | None) -> None:
    """Train (or re-read, or re-evaluate) every selected run once per seed, seed by seed, so
    that an interrupted session still leaves whole tables for its first seeds."""
    check_only(args, [run.name for run in runs])
    if args.table_only:
        return
    todo = [(run, seed) for seed in args.seeds for run in runs if not args.only or run.name in args.only]
    for index, (run, seed) in enumerate(todo):
        config = make_config(args, run, seed)
        path = run_folder(args, run, seed) / "result.json"
        metrics = read_record(find_record(args, run, seed), config, path)
        if metrics is not None and not args.reevaluate:
            print(f"{run.name}, seed {seed}: done before, read back", flush=True)
            continue
        if metrics is not None:
            metrics = {**metrics, **reevaluate(run_folder(args, run, seed), class_groups)}
        else:
            check_unfinished(run_folder(args, run, seed), config)
            print(f"=== {run.name}, seed {seed}: {' '.join(run.overrides)}", flush=True)
            metrics = train_and_evaluate(config, class_groups)
            if left := len(todo) - index - 1:
                print(f"{left} run(s) left in this command, about {left * metrics['train_seconds'] / 60:.0f} min "
                      f"at this run's pace", flush=True)
        write_json(path, {"run": run.name, "seed": seed, "config": config_to_dict(config), "metrics": metrics})


def collect_results(args: argparse.Namespace, runs: list[Run]) -> dict[str, dict[int, dict]]:
    """`{run name: {seed: metrics}}` from the records (on disk, else tracked), for every run and seed
    of this command (also those another process trained); the records themselves go to `args.records`."""
    results: dict[str, dict[int, dict]] = {}
    args.records = {}
    for run in runs:
        results[run.name] = {}
        for seed in args.seeds:
            record = find_record(args, run, seed)
            metrics = read_record(record, make_config(args, run, seed), run_folder(args, run, seed))
            if metrics is not None:
                args.records[record_key(run, seed)] = record
                results[run.name][seed] = {**metrics, "train_minutes": metrics["train_seconds"] / 60}
    return results


def summary_json(args: argparse.Namespace, results: dict[str, dict[int, dict]], reference: dict, *,
                 experiment: str) -> dict:
    """What OUT/results.json holds: per run, every seed's metrics and each metric's mean and sd."""
    rows = {}
    for name, by_seed in results.items():
        keys = sorted({key for metrics in by_seed.values() for key in metrics})
        values = {key: [m[key] for m in by_seed.values() if isinstance(m.get(key), (int, float))] for key in keys}
        rows[name] = {
            "seeds": {str(seed): metrics for seed, metrics in by_seed.items()},
            "mean": {key: statistics.fmean(v) for key, v in values.items() if v},
            "sd": {key: statistics.stdev(v) for key, v in values.items() if len(v) > 1},
        }
    return {"experiment": experiment, "command": args.command, "reference": reference, "runs": rows}


def write_outputs(args: argparse.Namespace, summary: dict, text: str, *, experiment: str) -> None:
    """Print the table; write OUT/results.json, OUT/table.md and, with --readme, the README block."""
    from _tables import rewrite_block

    print(text, flush=True)
    write_json(args.out / "results.json", summary)
    (args.out / "table.md").write_text(text + "\n")
    if args.readme is None:
        return
    if not args.records:  # e.g. a fresh clone whose records are not tracked yet: keep the README's table
        print(f"no finished run found: {args.readme}'s table is left as it is", flush=True)
        return
    rewrite_block(args.readme, args.table, text, script=args.script)
    write_json(RECORDS / f"{args.table}.json", {"experiment": experiment, "records": dict(sorted(args.records.items()))})
    print(f"wrote the table into {args.readme} and its {len(args.records)} records into "
          f"{RECORDS / f'{args.table}.json'}", flush=True)


def budget_line(results: dict[str, dict[int, dict]], args: argparse.Namespace) -> str:
    done = sum(len(by_seed) for by_seed in results.values())
    total = len(results) * len(args.seeds)
    return (f"{done} of {total} runs done (seeds {' '.join(map(str, args.seeds))}), {args.iterations} iterations "
            f"each: recipe `{args.config}`, its schedule scaled to the iterations.")


# --------------------------------------------------------------------------- one run
def train_and_evaluate(config: Config, class_groups: dict[str, list[int]] | None) -> dict:
    """Train one run, evaluate it on the shapes validation set; returns flat metrics + timing."""
    from maskrcnn.engine.distributed import DistributedContext
    from maskrcnn.engine.trainer import build_datasets, train

    train_set, val_set = build_datasets(config, DistributedContext())
    started = time.perf_counter()
    # No validation set inside `train`: it is evaluated once below, with the class groups. A run
    # stopped before (Ctrl-C, SIGTERM, or killed after a periodic checkpoint) continues from its
    # last.pth; the trainer's resume ends with the weights of an uninterrupted run.
    summary = train(config, resume=True, train_dataset=train_set, val_dataset=None)
    if summary.interrupted:
        raise SystemExit(f"{config.train.output_dir}: stopped by {summary.interrupted} at iteration "
                         f"{summary.iteration}; not recorded, the same command continues it")
    train_seconds = time.perf_counter() - started
    flat = evaluate_model(summary["model"], val_set, class_groups)
    flat["train_seconds"] = train_seconds
    flat["iterations"] = summary["iteration"]
    return flat


def evaluate_model(model: torch.nn.Module, val_set, class_groups: dict[str, list[int]] | None) -> dict:
    """COCO box / mask AP of the whole model, plus the mask head alone on ground-truth boxes (box AP
    only for a model without a mask head)."""
    from maskrcnn.engine.evaluation import evaluate, flatten_metrics

    device = next(model.parameters()).device
    has_masks = getattr(model.roi_heads, "mask_head", None) is not None  # a row may train without a mask head
    metrics = evaluate(model, val_set, device=device, batch_size=4, iou_types=["bbox", "segm"] if has_masks else ["bbox"],
                       class_groups=class_groups)
    flat = flatten_metrics(metrics)
    if has_masks:
        flat.update(mask_iou_on_gt_boxes(model, val_set, class_groups))
    return flat


@torch.no_grad()
def mask_iou_on_gt_boxes(model: torch.nn.Module, dataset, class_groups: dict[str, list[int]] | None) -> dict:
    """Mean mask IoU of the mask head run on the ground-truth boxes and labels ("no detector at
    all", as Birodkar et al. also report): what the mask head knows, whatever the detector does.
    Returns {"gt_boxes/mIoU": .., "gt_boxes/<group>/mIoU": ..}."""
    from pycocotools import mask as mask_utils

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    ious, labels = [], []
    for start in range(0, len(dataset), 4):
        items = [dataset[i] for i in range(start, min(start + 4, len(dataset)))]
        items = [(image, target) for image, target in items if len(target["boxes"])]
        if not items:
            continue
        images = [image.to(device) for image, _ in items]
        detections = model.segment_boxes(images, [t["boxes"].to(device) for _, t in items],
                                         [t["labels"].to(device) for _, t in items])
        for (_, target), detection in zip(items, detections):
            predicted = (detection["masks"][:, 0] >= 0.5).to(torch.uint8).cpu().numpy()  # [N, H, W]
            masks = target["masks"]
            truth = (masks if isinstance(masks, torch.Tensor) else masks.to_tensor()).to(torch.uint8).numpy()
            encode = lambda m: mask_utils.encode(m.transpose(1, 2, 0).copy(order="F"))  # noqa: E731
            pairwise = mask_utils.iou(encode(predicted), encode(truth), [0] * len(truth))  # [N, N]
            ious += list(pairwise.diagonal())
            labels += target["labels"].tolist()
    model.train(was_training)
    return _group_means(torch.tensor(ious, dtype=torch.float64), torch.tensor(labels), class_groups)


def _group_means(ious: torch.Tensor, labels: torch.Tensor, class_groups: dict[str, list[int]] | None) -> dict:
    result = {"gt_boxes/mIoU": ious.mean().item()}
    for group, members in (class_groups or {}).items():
        result[f"gt_boxes/{group}/mIoU"] = ious[torch.isin(labels, torch.tensor(members))].mean().item()
    return result


def filled_box_miou(coco, class_groups: dict[str, list[int]] | None, label_to_category: dict[int, int]) -> dict:
    """The reference a mask head must beat: the mean IoU of each ground-truth box, filled, with
    its object's mask (pycocotools rasterises both), in the same keys as `mask_iou_on_gt_boxes`."""
    from pycocotools import mask as mask_utils

    ious, categories = [], []
    for annotation in coco.dataset["annotations"]:
        if annotation.get("iscrowd", 0):
            continue
        image = coco.imgs[annotation["image_id"]]
        box = mask_utils.frPyObjects(np.array([annotation["bbox"]], dtype=np.float64), image["height"], image["width"])
        ious.append(float(mask_utils.iou(box, [coco.annToRLE(annotation)], [0])[0, 0]))
        categories.append(annotation["category_id"])
    category_groups = {group: [label_to_category[m] for m in members]
                       for group, members in (class_groups or {}).items()}
    return _group_means(torch.tensor(ious, dtype=torch.float64), torch.tensor(categories), category_groups)


def filled_box_reference(args: argparse.Namespace, class_groups: dict[str, list[int]] | None) -> dict:
    """`filled_box_miou` on the experiments' validation set."""
    from maskrcnn.data.coco import CocoDataset

    paths = shapes_paths(make_config(args, Run("reference", "reference", []), 0))
    val = CocoDataset(paths["val_annotations"], paths["val_images"])
    return filled_box_miou(val.coco, class_groups, dict(val.label_to_category_id))


def reevaluate(run_dir: Path, class_groups: dict[str, list[int]] | None) -> dict:
    """Evaluate a finished run again from its last checkpoint."""
    import maskrcnn
    from maskrcnn.config import config_from_dict
    from maskrcnn.engine.distributed import DistributedContext
    from maskrcnn.engine.trainer import build_datasets

    config = config_from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()))
    _, val_set = build_datasets(config, DistributedContext())
    return evaluate_model(maskrcnn.load_checkpoint(run_dir / "last.pth"), val_set, class_groups)


def class_names(labels: list[int]) -> str:
    return ", ".join(SHAPE_NAMES[label - 1] for label in labels)
