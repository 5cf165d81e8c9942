"""`maskrcnn demo`: the built-in `shapes` data (generated when missing), then a training run from
scratch; the trainer evaluates, prints the AP table, draws the pictures and plots the curves
(engine/run_outputs.py)."""

from __future__ import annotations

import time
from collections.abc import Callable

from maskrcnn.config import Config
from maskrcnn.data.shapes import ensure_shapes
from maskrcnn.engine.trainer import TrainSummary, train


def run_demo(config: Config, *, pictures: int = 8, log: Callable[[str], None] = print) -> TrainSummary:
    """Generates `shapes` under `data.root` if missing and trains on it; `pictures` held-out images
    are drawn. `log` receives one line once the data is ready, before training starts."""
    if config.data.name != "shapes":
        raise ValueError(f"the demo runs on the built-in shapes data, not data.name={config.data.name!r}")
    started = time.perf_counter()
    data = config.data
    ensure_shapes(data.root, num_train=data.shapes_train_images, num_val=data.shapes_val_images,
                  image_size=data.shapes_image_size, seed=data.shapes_seed)
    config.train.pictures = pictures
    log(f"shapes data in {data.root} ({time.perf_counter() - started:.1f} s); training "
        f"{config.train.iterations} iterations of {config.train.batch_size} images on {config.train.device}")
    return train(config)
