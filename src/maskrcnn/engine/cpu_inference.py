"""Fast CPU inference: `optimize_for_cpu(model, mode=...)` returns a copy of a MaskRCNN for the CPU.

Modes (`INFERENCE_MODES`):

- "eager": the model as built (already with the exact early-stop NMS, `box_ops.batched_nms_top_k`).
- "strict": outputs identical to torchvision's on the same weights (and to the eager model's,
  except that masks are pasted torchvision's way; models with aligned pasting keep their own).
  glibc's allocator kept off mmap (large tensors reuse the heap instead of fresh pages that fault in
  on first write; process-wide, see `keep_allocator_off_mmap`), convolutions of the ResNet body, the FPN,
  the RPN head and the mask / keypoint heads on weights reordered once for oneDNN (`model/onednn.PrepackedConv2d`, exact),
  `roi_align` split over threads, masks pasted torchvision's way (its exact numbers) in threads.
- "fast" (the default): strict's allocator and threads, plus every convolution with its frozen
  BatchNorm folded in and ReLU / residual addition fused into one oneDNN call on channels_last
  activations (`FusedConv2d`; the RPN head's and the mask head's ReLUs fused into their convs and
  deconvolution too); the features leave the backbone in NCHW, the layout RoIAlign's kernel reads
  (`to_nchw`: a faster copy for large maps). Within float tolerance of the eager model; masks pasted batched.
- "bf16": fast, with the convolutions and fully connected layers in bfloat16 on CPUs with bf16
  matrix units (the `amx_bf16` or `avx512_bf16` CPU flag, `precision.has_fast_bf16`). Anchors, box
  decoding, NMS, RoIAlign and pasting stay fp32. Without them it falls back to "fast" and warns:
  bf16 there is slower than fp32; likewise where oneDNN has no bf16 kernels at all
  (`precision.bf16_kernels_available`: AVX2-only CPUs, even when told otherwise by `cpu_flags`).

Nothing is compiled (torch.compile's inductor would take minutes per process on a small CPU): the
modules are rebuilt eagerly, in seconds, so there is no compile cache to manage; the first call
is slower only by oneDNN's creation of its kernels for the new shapes (a warm-up image pays it).
The returned model is for inference only (no gradients; its state_dict lacks the fused weights:
save the original model).
"""

from __future__ import annotations

import copy
import ctypes
import ctypes.util
import warnings
from collections.abc import Iterable

import torch
from torch import nn

from maskrcnn.engine.precision import bf16_kernels_available, has_fast_bf16
from maskrcnn.model.mask_head import MaskFCNHead
from maskrcnn.model.onednn import (
    FusedConv2d,
    fuse_convs,
    fuse_relu_after,
    fuse_resnet_stem,
    prepack_convs,
    to_layout,
    to_nchw,
)

INFERENCE_MODES = ("eager", "strict", "fast", "bf16")

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_KEEP_FREED_BYTES = 2**31 - 1  # the largest int: freed heap memory is never given back


def keep_allocator_off_mmap() -> bool:
    """Make glibc's malloc serve large blocks from the heap and keep freed memory (process-wide).

    By default every tensor above ~32 MB is a fresh mmap: its pages fault in (and are zeroed by the
    kernel) on first write, and are unmapped again when freed, once per tensor per image. Kept on
    the heap, the pages are reused from one image to the next. Returns False where the C library
    is not glibc (nothing is changed there).
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _KEEP_FREED_BYTES))


def optimize_for_cpu(
    model: nn.Module,
    *,
    mode: str = "fast",
    num_threads: int | None = None,
    cpu_flags: Iterable[str] | None = None,
    tune_allocator: bool = True,
) -> nn.Module:
    """A copy of `model` (a MaskRCNN) set up for CPU inference in `mode` (see the module docstring).

    `num_threads` (default `torch.get_num_threads()`) is how many threads pool RoIs and paste
    masks; `cpu_flags` overrides the CPU's flags for the bf16 check; `tune_allocator=False` leaves
    glibc's allocator alone (it is process-wide: a benchmark that also times another model in the
    same process needs that). The copy is in eval mode and
    carries `inference_mode`, the mode it actually got (bf16 may fall back to "fast").
    """
    if mode not in INFERENCE_MODES:
        raise ValueError(f"inference mode {mode!r} is not one of {INFERENCE_MODES}")
    if any(p.device.type != "cpu" for p in model.parameters()):
        raise ValueError("optimize_for_cpu: the model is not on the CPU (call model.cpu() first)")
    if mode == "bf16" and not has_fast_bf16(cpu_flags):
        warnings.warn("inference mode 'bf16': this CPU has no bf16 units (neither amx_bf16 nor avx512_bf16 flag), "
                      "where bf16 is slower than fp32; using the 'fast' mode (fp32) instead", stacklevel=2)
        mode = "fast"
    elif mode == "bf16" and not bf16_kernels_available():
        warnings.warn("inference mode 'bf16': oneDNN has no bf16 kernels on this CPU (they need AVX-512 BW/VL/DQ, "
                      "AVX-NE-CONVERT or AMX); using the 'fast' mode (fp32) instead", stacklevel=2)
        mode = "fast"
    optimized = copy.deepcopy(model).eval()
    optimized.inference_mode = mode
    if mode == "eager":
        return optimized
    for parameter in optimized.parameters():
        parameter.requires_grad_(False)
    if tune_allocator:
        keep_allocator_off_mmap()
    threads = num_threads if num_threads is not None else torch.get_num_threads()
    for pooler in _poolers(optimized):
        pooler.num_threads = threads
    if mode == "strict":
        prepack_convs(optimized.backbone)  # the ResNet body and the FPN
        prepack_convs(optimized.rpn.head)
        heads = optimized.roi_heads
        for head in (getattr(heads, "mask_head", None), getattr(heads, "keypoint_head", None)):
            if head is not None:
                prepack_convs(head)
        optimized.paste_per_box_threads = threads
        return optimized
    _fuse(optimized, dtype=torch.bfloat16 if mode == "bf16" else torch.float32)
    return optimized


def _poolers(model: nn.Module) -> list[nn.Module]:
    heads = model.roi_heads
    poolers = [heads.box_pooler, getattr(heads, "mask_pooler", None), getattr(heads, "keypoint_pooler", None)]
    return [p for p in poolers if p is not None]


def _fuse(model: nn.Module, *, dtype: torch.dtype) -> None:
    """Fused oneDNN convs in `dtype` for the backbone and the heads; fp32 between the stages.
    What cannot be fused (GroupNorm blocks, the mask head's deconvolution) runs eagerly in `dtype`."""
    backbone, heads = model.backbone, model.roi_heads
    fuse_resnet_stem(backbone.body, dtype=dtype)
    fuse_convs(backbone, dtype=dtype)
    fuse_relu_after(model.rpn.head, ["conv", "extra_convs"], dtype=dtype)
    fuse_convs(model.rpn.head, dtype=dtype)
    # the backbone computes in `dtype` on channels_last; its features go on in fp32 (RoIAlign, anchors)
    _cast_around(_cast_unfused(backbone, dtype), dtype, torch.float32, channels_last=True)
    _cast_around(_cast_unfused(model.rpn.head, dtype), dtype, torch.float32, channels_last=True)
    for name in ("mask_head", "keypoint_head"):
        head = getattr(heads, name, None)
        if head is not None:
            if type(head) is MaskFCNHead:  # its deconvolution and ReLU (the other architectures: eager)
                fuse_relu_after(head, ["deconv"], dtype=dtype)
            fuse_convs(head, dtype=dtype)
            _cast_around(_cast_unfused(head, dtype), dtype, torch.float32, channels_last=True)
    if dtype != torch.float32:  # the box head's fully connected layers: bf16 matmuls (AMX)
        _cast_around(_cast_unfused(heads.box_head, dtype), dtype, dtype, channels_last=False)
        _cast_around(_cast_unfused(heads.box_predictor, dtype), dtype, torch.float32, channels_last=False)


def _cast_unfused(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast the float parameters and buffers of `module` to `dtype`, except inside the fused convs
    (their weights are already packed in `dtype`); returns `module`."""
    for child in module.modules():
        if isinstance(child, FusedConv2d):
            continue
        for tensors in (child._parameters, child._buffers):
            for key, value in tensors.items():
                if value is not None and value.is_floating_point() and value.dtype != dtype:
                    tensors[key] = value.to(dtype) if key in child._buffers else nn.Parameter(
                        value.detach().to(dtype), requires_grad=False)
    return module


def _cast_around(module: nn.Module, inputs: torch.dtype, outputs: torch.dtype, *, channels_last: bool) -> None:
    """Hooks that cast `module`'s float tensor inputs to `inputs` (channels_last when asked) and
    its float tensor outputs (also inside lists, tuples and dicts) to `outputs`, in the default
    layout: torchvision's RoIAlign copies any other layout to it in every call (the poolers call it
    once per level and thread: eight copies of P2 per image), and a cast copies anyway."""

    def cast(value, dtype, layout):
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            if layout and value.dim() == 4:
                return to_layout(value, dtype)
            return value.to(dtype) if layout else to_nchw(value, dtype)
        if isinstance(value, (list, tuple)):
            return type(value)(cast(v, dtype, layout) for v in value)
        if isinstance(value, dict):
            return type(value)((k, cast(v, dtype, layout)) for k, v in value.items())
        return value

    module.register_forward_pre_hook(lambda _, args: cast(args, inputs, channels_last))
    module.register_forward_hook(lambda _, args, output: cast(output, outputs, False))
