"""oneDNN convolutions with weights reordered once, for CPU inference (`engine/cpu_inference.py`).

An eager `F.conv2d` on the CPU reorders its weights into oneDNN's blocked layout on every call,
and a frozen BatchNorm and a ReLU after it are two more passes over the activations. Two
replacements, built from a trained module (inference only: no gradients, no state_dict entries):

- `PrepackedConv2d`: the same convolution on weights reordered once. It gives the numbers of
  `F.conv2d` exactly, because it takes oneDNN only where `F.conv2d` itself would (see
  `_conv2d_takes_onednn`); the norm layer after it stays as it was.
- `FusedConv2d`: convolution, the frozen BatchNorm folded into its weights, and the ReLU (or the
  residual addition and ReLU of a ResNet block) in one oneDNN call, in bf16 or fp32, on
  channels_last activations. Folding rounds differently: the numbers agree within float tolerance.
  `FusedConvTranspose2d` is the same for a transposed convolution and its ReLU (the mask head's).

`to_nchw` hands channels_last activations back in the default layout, as the RoIAlign wants them.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock
from torchvision.models.resnet import Bottleneck as TorchvisionBottleneck
from torchvision.ops import FrozenBatchNorm2d

from maskrcnn.model.backbone import Bottleneck

# The residual blocks fused whole: torchvision's (its ResNets) and ours (model/backbone.py: ResNet-50
# and deeper, ResNeXt, stride in the 1x1 conv), which have the same convs, norms and shortcut.
RESIDUAL_BLOCKS = (BasicBlock, TorchvisionBottleneck, Bottleneck)

# F.conv2d's choice between oneDNN and its own kernels (ATen's ConvParams::use_mkldnn, fp32, CPU,
# batch-1 inputs below this size use the native path); PrepackedConv2d makes the same choice.
_NATIVE_CONV_MAX_NUMEL = 20480


def _reorder(weight: Tensor, conv: nn.Conv2d) -> Tensor:
    """`weight [O, I, kh, kw]` in oneDNN's blocked layout for this conv (an opaque mkldnn tensor)."""
    return torch._C._nn.mkldnn_reorder_conv2d_weight(
        weight.detach().contiguous().to_mkldnn(), list(conv.padding), list(conv.stride), list(conv.dilation),
        conv.groups,
    )


def _conv2d_takes_onednn(x: Tensor, conv: nn.Conv2d) -> bool:
    """Whether `F.conv2d(x, conv.weight, ...)` runs on oneDNN (fp32 CPU rules of ATen)."""
    kernel_h, kernel_w = conv.kernel_size
    one_by_one = kernel_h == 1 and kernel_w == 1
    strided = any(s != 1 for s in conv.stride) or any(d != 1 for d in conv.dilation)
    if not (strided or x.shape[0] >= 16 or not one_by_one or torch.get_num_threads() > 1):
        return False
    return conv.groups > 1 or (kernel_h > 3 and kernel_w > 3) or x.shape[0] > 1 or x.numel() > _NATIVE_CONV_MAX_NUMEL


class PrepackedConv2d(nn.Module):
    """`conv` with its weights reordered for oneDNN once; the same outputs as `conv` bit for bit.

    Only plain fp32 CPU convolutions with zero padding; `[B, I, H, W]` -> `[B, O, H', W']`.
    """

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(f"PrepackedConv2d: padding {conv.padding!r} / {conv.padding_mode!r} is not supported")
        self.conv = conv  # the native path, for the inputs where F.conv2d would not take oneDNN
        self.register_buffer("packed_weight", _reorder(conv.weight, conv), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        conv = self.conv
        if x.device.type != "cpu" or x.dtype != torch.float32 or not _conv2d_takes_onednn(x, conv):
            return conv(x)
        bias = None if conv.bias is None else conv.bias.detach()
        return torch.mkldnn_convolution(x, self.packed_weight, bias, conv.padding, conv.stride, conv.dilation,
                                        conv.groups)


def prepack_convs(module: nn.Module) -> int:
    """Replace every plain `nn.Conv2d` inside `module` by a `PrepackedConv2d`; returns how many."""
    replaced = 0
    for name, child in module.named_children():
        if type(child) is nn.Conv2d and child.padding_mode == "zeros" and not isinstance(child.padding, str):
            setattr(module, name, PrepackedConv2d(child))
            replaced += 1
        else:
            replaced += prepack_convs(child)
    return replaced


def fold_norm(conv: nn.Conv2d, norm: nn.Module | None) -> tuple[Tensor, Tensor]:
    """Weights and bias of `norm(conv(x))` as one convolution; `norm` is a frozen or eval BatchNorm."""
    weight = conv.weight.detach()
    bias = conv.bias.detach() if conv.bias is not None else torch.zeros(weight.shape[0], dtype=weight.dtype)
    if norm is None:
        return weight, bias
    if isinstance(norm, nn.BatchNorm2d) and norm.training:
        raise ValueError("fold_norm: a BatchNorm in training mode has no fixed statistics (call .eval())")
    scale = norm.weight.detach() * (norm.running_var + norm.eps).rsqrt()  # [O]
    return weight * scale[:, None, None, None], (bias - norm.running_mean) * scale + norm.bias.detach()


def foldable(norm: nn.Module | None) -> bool:
    return norm is None or isinstance(norm, (FrozenBatchNorm2d, nn.BatchNorm2d))


class FusedConv2d(nn.Module):
    """conv (+ folded BatchNorm) (+ ReLU) in one oneDNN call on weights of `dtype`.

    `forward(x, residual=None)`: `x [B, I, H, W]` of `dtype` (channels_last is oneDNN's preferred
    layout) -> `relu(conv(x) [+ residual])`, channels_last, of `dtype`.
    """

    def __init__(self, conv: nn.Conv2d, *, norm: nn.Module | None = None, relu: bool = False,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(f"FusedConv2d: padding {conv.padding!r} / {conv.padding_mode!r} is not supported")
        weight, bias = fold_norm(conv, norm)
        self.padding, self.stride = list(conv.padding), list(conv.stride)
        self.dilation, self.groups, self.relu = list(conv.dilation), conv.groups, relu
        self.register_buffer("packed_weight", _reorder(weight.to(dtype), conv), persistent=False)
        self.register_buffer("bias", bias.to(dtype), persistent=False)

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        if residual is None:
            return torch.ops.mkldnn._convolution_pointwise(
                x, self.packed_weight, self.bias, self.padding, self.stride, self.dilation, self.groups,
                "relu" if self.relu else "none", [], "",
            )
        return torch.ops.mkldnn._convolution_pointwise.binary(
            x, residual, self.packed_weight, self.bias, self.padding, self.stride, self.dilation, self.groups,
            "add", None, "relu" if self.relu else None, [], "",
        )


class FusedResidualBlock(nn.Module):
    """A ResNet block (one of RESIDUAL_BLOCKS) as fused convs: the last conv adds the shortcut and
    applies the ReLU in the same call. `[B, C, H, W]` -> `[B, C', H / s, W / s]`."""

    def __init__(self, block: nn.Module, *, dtype: torch.dtype) -> None:
        super().__init__()
        pairs = [(block.conv1, block.bn1), (block.conv2, block.bn2)]
        if not isinstance(block, BasicBlock):  # a bottleneck
            pairs.append((block.conv3, block.bn3))
        *inner, (last_conv, last_norm) = pairs
        self.inner = nn.ModuleList(FusedConv2d(c, norm=n, relu=True, dtype=dtype) for c, n in inner)
        self.last = FusedConv2d(last_conv, norm=last_norm, relu=True, dtype=dtype)
        self.downsample = None
        if block.downsample is not None:  # Sequential(conv1x1, norm)
            self.downsample = FusedConv2d(block.downsample[0], norm=block.downsample[1], dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        for conv in self.inner:
            x = conv(x)
        return self.last(x, residual=shortcut)


class FusedConvTranspose2d(nn.Module):
    """A transposed conv (+ ReLU) in one oneDNN call on weights of `dtype`; channels_last in and out."""

    def __init__(self, deconv: nn.ConvTranspose2d, *, relu: bool = False, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if deconv.padding_mode != "zeros":
            raise ValueError(f"FusedConvTranspose2d: padding mode {deconv.padding_mode!r} is not supported")
        self.padding, self.output_padding = list(deconv.padding), list(deconv.output_padding)
        self.stride, self.dilation, self.groups = list(deconv.stride), list(deconv.dilation), deconv.groups
        self.relu = relu
        self.register_buffer("weight", deconv.weight.detach().to(dtype), persistent=False)
        bias = deconv.bias.detach() if deconv.bias is not None else None
        self.register_buffer("bias", None if bias is None else bias.to(dtype), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.mkldnn._convolution_transpose_pointwise(
            x, self.weight, self.bias, self.padding, self.output_padding, self.stride, self.dilation, self.groups,
            "relu" if self.relu else "none", [], "",
        )


def fuse_relu_after(module: nn.Module, conv_names: list[str], *, dtype: torch.dtype) -> None:
    """`module.relu(module.<conv>(x))` as one fused call for each of `conv_names` (a conv, a
    transposed conv or a ModuleList of convs); `module.relu`, then a no-op, becomes an Identity."""
    for name in conv_names:
        convs = getattr(module, name)
        for index, conv in enumerate(convs if isinstance(convs, nn.ModuleList) else [convs]):
            if type(conv) is nn.ConvTranspose2d:
                fused = FusedConvTranspose2d(conv, relu=True, dtype=dtype)
            elif type(conv) is nn.Conv2d:
                fused = FusedConv2d(conv, relu=True, dtype=dtype)
            else:
                raise TypeError(f"fuse_relu_after: {name} is a {type(conv).__name__}, not a conv")
            if isinstance(convs, nn.ModuleList):
                convs[index] = fused
            else:
                setattr(module, name, fused)
    module.relu = nn.Identity()


def block_is_fusable(block: nn.Module) -> bool:
    if not isinstance(block, RESIDUAL_BLOCKS):
        return False
    norms = [block.bn1, block.bn2] + ([] if isinstance(block, BasicBlock) else [block.bn3])
    if block.downsample is not None:
        norms.append(block.downsample[1])
    return all(foldable(n) for n in norms)


def fuse_convs(module: nn.Module, *, dtype: torch.dtype) -> int:
    """Replace, inside `module`, ResNet blocks by `FusedResidualBlock`s, `conv3x3_norm_relu`-style
    `Sequential(conv, [norm,] ReLU)` blocks and plain convs by `FusedConv2d`s. GroupNorm blocks
    and anything else stay as they are. Returns the number of replaced modules."""
    replaced = 0
    for name, child in module.named_children():
        fused = _fused(child, dtype)
        if fused is not None:
            setattr(module, name, fused)
            replaced += 1
        else:
            replaced += fuse_convs(child, dtype=dtype)
    return replaced


def _fused(child: nn.Module, dtype: torch.dtype) -> nn.Module | None:
    if block_is_fusable(child):
        return FusedResidualBlock(child, dtype=dtype)
    if type(child) is nn.Conv2d and child.padding_mode == "zeros" and not isinstance(child.padding, str):
        return FusedConv2d(child, dtype=dtype)
    layers = list(child.children()) if isinstance(child, nn.Sequential) else []
    if len(layers) in (2, 3) and type(layers[0]) is nn.Conv2d and isinstance(layers[-1], nn.ReLU):
        norm = layers[1] if len(layers) == 3 else None
        if foldable(norm):
            return FusedConv2d(layers[0], norm=norm, relu=True, dtype=dtype)
    return None


def fuse_resnet_stem(body: nn.Module, *, dtype: torch.dtype) -> bool:
    """conv1 + bn1 + relu of a ResNet body (attributes `conv1`, `bn1`, `relu`) as one fused conv."""
    if not foldable(body.bn1):
        return False
    body.conv1 = FusedConv2d(body.conv1, norm=body.bn1, relu=True, dtype=dtype)
    body.bn1, body.relu = nn.Identity(), nn.Identity()
    return True


def to_layout(x: Tensor, dtype: torch.dtype) -> Tensor:
    """`[B, C, H, W]` as `dtype`, channels_last (what FusedConv2d wants)."""
    return x.to(dtype).contiguous(memory_format=torch.channels_last)


# Above this many pixels per map, to_nchw transposes each image as a 2-D [H * W, C] matrix: PyTorch's
# 2-D transpose copy is about 3x faster than its general channels_last -> NCHW copy on large maps
# (an FPN's P2), and slower on many small ones (RoI crops).
_TRANSPOSE_MIN_PIXELS = 4096


def to_nchw(x: Tensor, dtype: torch.dtype) -> Tensor:
    """`[B, C, H, W]` as `dtype` in the default (contiguous NCHW) layout: the same values as
    `x.to(dtype, memory_format=torch.contiguous_format)`."""
    if x.dim() != 4 or x.is_contiguous() or not x.is_contiguous(memory_format=torch.channels_last):
        return x.to(dtype, memory_format=torch.contiguous_format)
    batch, channels, height, width = x.shape
    if height * width < _TRANSPOSE_MIN_PIXELS:
        return x.to(dtype, memory_format=torch.contiguous_format)
    pixels = x.to(dtype).permute(0, 2, 3, 1).reshape(batch, height * width, channels)  # a view: NHWC storage
    out = torch.empty((batch, channels, height * width), dtype=dtype, device=x.device)
    for image in range(batch):
        out[image] = pixels[image].t()
    return out.view(batch, channels, height, width)

