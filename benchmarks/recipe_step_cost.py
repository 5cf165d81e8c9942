"""Training-step cost of a recipe against the same recipe with overrides, side by side in one process.

    python benchmarks/recipe_step_cost.py --threads 1 --batches 4 --rounds 3 model.box_head.batch_size_per_image=128

Both models train (forward under the recipe's autocast, backward, clipping, AdamW) on the same
`--batches` batches of the `shapes` training set, in interleaved rounds so that a load change on
a shared machine hits both alike; prints the median CPU seconds (this process) and wall seconds
per step and the ratio. `--threads`: torch.set_num_threads (default: PyTorch's, one per core).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from maskrcnn.config import load_config
from maskrcnn.data.coco import CocoDataset
from maskrcnn.data.shapes import ensure_shapes
from maskrcnn.engine.optim import build_optimizer, clip_gradients
from maskrcnn.engine.precision import autocast_dtype
from maskrcnn.model.mask_rcnn import build_model


def _batches(config, count: int) -> list:
    data = config.data
    paths = ensure_shapes(data.root, num_train=data.shapes_train_images, num_val=data.shapes_val_images,
                          image_size=data.shapes_image_size, seed=data.shapes_seed)
    dataset = CocoDataset(paths["train_annotations"], paths["train_images"])
    size = config.train.batch_size
    return [list(zip(*[dataset[b * size + i] for i in range(size)])) for b in range(count)]


def _runner(config, batches: list):
    torch.manual_seed(0)
    model = build_model(config.model).train()
    optimizer = build_optimizer(model, config.train)
    dtype = autocast_dtype(torch.device("cpu"), amp=config.train.amp)

    def run_all() -> None:
        for images, targets in batches:
            with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                loss = sum(model(list(images), list(targets)).values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            clip_gradients(model.parameters(), config.train.clip_grad_norm)
            optimizer.step()

    return run_all


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="shapes_demo")
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int)
    parser.add_argument("overrides", nargs="+", metavar="key.sub=value")
    args = parser.parse_args()
    configs = {"recipe": load_config(args.config, []), "with overrides": load_config(args.config, args.overrides)}
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    batches = _batches(configs["recipe"], args.batches)
    runners = {name: _runner(config, batches) for name, config in configs.items()}
    for run_all in runners.values():
        run_all()  # warm-up
    seconds = {clock: {name: [] for name in runners} for clock in ("CPU", "wall")}
    for _ in range(args.rounds):
        for name, run_all in runners.items():
            cpu, wall = time.process_time(), time.perf_counter()
            run_all()
            seconds["CPU"][name].append((time.process_time() - cpu) / args.batches)
            seconds["wall"][name].append((time.perf_counter() - wall) / args.batches)
    print(f"{torch.get_num_threads()} thread(s), {args.batches} batches, {args.rounds} rounds; overrides: {args.overrides}")
    for clock, values in seconds.items():
        medians = {name: statistics.median(v) for name, v in values.items()}
        print(f"{clock} s/step: " + ", ".join(f"{name} {m:.3f}" for name, m in medians.items()) +
              f"; with overrides / recipe {medians['with overrides'] / medians['recipe']:.2f}")


if __name__ == "__main__":
    main()
