"""Checkpoints and foreign weights.

format.py       our checkpoint format: FORMAT, the atomic writer, the weights_only reader,
                save_checkpoint / load_checkpoint, checked state-dict loading
torchvision.py  torchvision's detection weights -> our model (from_torchvision, convert)

This package imports `model/`; `model/` never imports it.
"""

from .format import FORMAT, atomic_save, load_checkpoint, read_checkpoint, save_checkpoint
from .torchvision import convert_torchvision, from_torchvision

__all__ = ["FORMAT", "atomic_save", "convert_torchvision", "from_torchvision", "load_checkpoint",
           "read_checkpoint", "save_checkpoint"]
