"""Checkpoints and foreign weights.

format.py       our checkpoint format: FORMAT, the atomic writer, the weights_only reader,
                save_checkpoint / load_checkpoint, checked state-dict loading
torchvision.py  torchvision's detection weights -> our model (from_torchvision, convert)
label_space.py  label -> (COCO category id, name) tables: torchvision's 91 slots, COCO's 80
convert.py      `maskrcnn convert`: foreign weights -> our checkpoint + label table + recipe
fine_tune.py    `train.init_weights`: load all but the class-dependent predictor tensors
detectron2.py   detectron2's weights + YAML config -> our model (from_detectron2, read_detectron2);
                detectron2_config.py reads and checks its YAML, detectron2_defaults.py its defaults

This package imports `model/`; `model/` never imports it.
"""

from .convert import convert
from .detectron2 import from_detectron2, read_detectron2
from .format import FORMAT, atomic_save, load_checkpoint, read_checkpoint, save_checkpoint
from .torchvision import convert_torchvision, from_torchvision

__all__ = ["FORMAT", "atomic_save", "convert", "convert_torchvision", "from_detectron2",
           "from_torchvision", "load_checkpoint", "read_checkpoint", "read_detectron2", "save_checkpoint"]
