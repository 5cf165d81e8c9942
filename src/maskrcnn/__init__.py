"""maskrcnn: Mask R-CNN for detection, instance segmentation and keypoints, in readable PyTorch."""

from __future__ import annotations

__version__ = "0.1.0"

# Imported lazily so that `import maskrcnn` stays cheap and one broken optional part does not
# take the others down.
_LAZY = {
    "MaskRCNN": "maskrcnn.model.mask_rcnn",
    "build_model": "maskrcnn.model.mask_rcnn",
    "from_torchvision": "maskrcnn.checkpoint",
    "from_detectron2": "maskrcnn.checkpoint",
    "load_checkpoint": "maskrcnn.checkpoint",
    "save_checkpoint": "maskrcnn.checkpoint",
    "export_model": "maskrcnn.export",
    "Predictor": "maskrcnn.predictor",
    "Config": "maskrcnn.config",
    "load_config": "maskrcnn.config",
    "optimize_for_cpu": "maskrcnn.engine.cpu_inference",
    "INFERENCE_MODES": "maskrcnn.engine.cpu_inference",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'maskrcnn' has no attribute {name!r}")


__all__ = list(_LAZY) + ["__version__"]
