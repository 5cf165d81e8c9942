"""Several moving averages of the weights from one `maskrcnn demo` run, each evaluated at the end.

    python experiments/ema_decays.py --out runs/ema --decays 0.99,0.995,0.999 \
        [--also data/shapes_seed1/val.json] [key.sub=value ...]

The run is the demo's (`shapes_demo` plus the overrides, which must turn `train.ema_decay` on:
that average is the run's model, evaluated by the trainer as usual). Beside it the same updates,
from the same iteration (`train.ema_start`), feed one more average per `--decays` value, so that a
single training run compares decays. At the end the trained weights and every average are
evaluated on the validation set (and on each `--also` annotation file, images in the folder of the
same name); the table is printed and written to OUT/ema_decays.json. The extra averages cost a
few percent of each step: this run's time is not the demo's.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from maskrcnn.config import load_config
from maskrcnn.data.coco import CocoDataset
from maskrcnn.engine import trainer
from maskrcnn.engine.ema import build_ema
from maskrcnn.engine.evaluation import evaluate, flatten_metrics
from maskrcnn.engine.training_state import load_training_state
from maskrcnn.model.mask_rcnn import build_model

KEYS = ("bbox/AP", "bbox/AP50", "segm/AP", "keypoints/AP")


def _with_extra_averages(decays: list[float], extras: dict) -> callable:
    """A `build_ema` that also builds one average per decay, updated whenever the run's is."""

    def build(model: torch.nn.Module, *, decay: float, device: torch.device):
        ema = build_ema(model, decay=decay, device=device)
        if ema is None:
            raise SystemExit("ema_decays.py: set train.ema_decay (the run's own average) in the overrides")
        extras.update({d: build_ema(model, decay=d, device=device) for d in decays})
        update = ema.update_parameters

        def update_all(module: torch.nn.Module) -> None:
            update(module)
            for average in extras.values():
                average.update_parameters(module)

        ema.update_parameters = update_all
        return ema

    return build


def _score(model: torch.nn.Module, datasets: dict[str, CocoDataset]) -> dict[str, dict[str, float]]:
    model.eval()
    scores = {}
    for name, dataset in datasets.items():
        with torch.no_grad():
            metrics = flatten_metrics(evaluate(model, dataset, device="cpu", batch_size=4))
        scores[name] = {key: round(metrics[key], 4) for key in KEYS if key in metrics}
    return scores


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--decays", required=True, help="comma-separated, e.g. 0.99,0.995,0.999")
    parser.add_argument("--also", action="append", default=[], help="another validation annotation file (repeatable)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    config = load_config("shapes_demo", [*args.overrides, f"train.output_dir={args.out}"])
    decays = [float(value) for value in args.decays.split(",")]
    extras: dict[float, torch.nn.Module] = {}
    trainer.build_ema = _with_extra_averages(decays, extras)
    summary = trainer.train(config)
    root = Path(config.data.root)
    datasets = {"val": CocoDataset(root / "val.json", root / "val")}
    datasets.update({path: CocoDataset(path, Path(path).with_suffix("")) for path in args.also})
    trained = build_model(config.model)
    trained.load_state_dict(load_training_state(summary.last_checkpoint)["training_model"])
    rows = {"trained weights": _score(trained, datasets),
            f"ema {config.train.ema_decay} (the run's)": _score(summary.model, datasets)}
    rows.update({f"ema {decay}": _score(average.module, datasets) for decay, average in extras.items()})
    for name, scores in rows.items():
        print(f"{name:28s} " + "  ".join(f"{data}: " + " ".join(f"{k} {v:.3f}" for k, v in s.items())
                                         for data, s in scores.items()), flush=True)
    Path(args.out, "ema_decays.json").write_text(json.dumps(
        {"overrides": args.overrides, "iterations": summary.iteration, "ema_start": config.train.ema_start,
         "seconds_per_iteration": summary.seconds_per_iteration, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
