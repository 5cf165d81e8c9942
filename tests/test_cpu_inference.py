"""CPU inference modes (engine/cpu_inference.py) against torchvision's Mask R-CNN on the same seeded weights.

strict: equal to torchvision end to end (boxes, labels, scores, pasted masks, bit for bit).
fast: equal stage by stage within float tolerance, each stage on torchvision's own inputs (a model
with random weights is chaotic end to end: near-tied objectness scores reorder proposals).
bf16: its detections overlap fp32's on the same images; without bf16 units it falls back to fast.
The bf16 numbers need oneDNN's bf16 kernels, which an AVX2-only CPU does not have (oneDNN refuses
bf16 weights there): those two checks run where the kernels exist and are skipped, saying so,
elsewhere; the fallback itself is tested on every CPU.
Small images (min_size 96) and few detections keep ResNet-50 cheap, as in test_parity.py.
"""

import copy

import pytest
import torch
import torchvision
from torchvision.ops import box_iou

from maskrcnn.checkpoint.torchvision import from_torchvision
from maskrcnn.engine.cpu_inference import optimize_for_cpu
from maskrcnn.engine.precision import bf16_kernels_available, has_fast_bf16, read_cpu_flags
from maskrcnn.model.mask_head import MaskFCNHead
from maskrcnn.model.onednn import (
    FusedConv2d,
    FusedConvTranspose2d,
    FusedResidualBlock,
    PrepackedConv2d,
    fuse_relu_after,
    to_nchw,
)

SETTINGS = dict(min_size=96, max_size=160, box_score_thresh=0.0, box_detections_per_img=20,
                rpn_pre_nms_top_n_test=300, rpn_post_nms_top_n_test=200)
THREADS = 2  # RoIAlign and pasting in 2 threads even where torch runs 1
needs_bf16_kernels = pytest.mark.skipif(
    not bf16_kernels_available(), reason="oneDNN has no bf16 kernels on this CPU (AVX2 only): the bf16 path cannot run")


@pytest.fixture(scope="module")
def torchvision_model():
    torch.manual_seed(0)
    model = torchvision.models.detection.maskrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=5, **SETTINGS
    )
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        model.roi_heads.box_predictor.cls_score.weight.mul_(30)  # distinct, non-trivial scores
        for module in model.backbone.body.modules():  # non-trivial BatchNorm statistics
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=g) * 0.1)
                module.running_var.copy_(torch.rand(module.running_var.shape, generator=g) + 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def ours(torchvision_model):
    return from_torchvision(torchvision_model)


def make_images(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, 100, 150, generator=g), torch.rand(3, 130, 90, generator=g)]


def assert_close_to_scale(got, expected, tolerance=1e-4):
    """Within `tolerance` times the largest magnitude: float sums rounded in another order."""
    scale = expected.abs().max()
    torch.testing.assert_close(got / scale, expected / scale, rtol=0, atol=tolerance)


def test_strict_equals_torchvision_end_to_end(torchvision_model, ours):
    strict = optimize_for_cpu(ours, mode="strict", num_threads=THREADS)
    assert strict.inference_mode == "strict" and strict.paste_per_box_threads == THREADS
    assert any(isinstance(m, PrepackedConv2d) for m in strict.backbone.body.modules())
    assert any(isinstance(m, PrepackedConv2d) for m in strict.backbone.fpn.modules())
    assert isinstance(strict.rpn.head.conv, PrepackedConv2d)
    assert not any(isinstance(m, PrepackedConv2d) for m in ours.modules())  # the original is untouched
    for images in (make_images(0), make_images(1)[:1]):
        with torch.no_grad():
            got, expected = strict(images), torchvision_model(images)
        for g, e in zip(got, expected):
            assert len(e["boxes"]) > 0 and set(g) == set(e)
            for key in e:
                assert torch.equal(g[key], e[key]), key


def test_fast_equals_torchvision_stage_by_stage(torchvision_model, ours):
    fast = optimize_for_cpu(ours, mode="fast", num_threads=THREADS)
    assert fast.inference_mode == "fast"
    assert any(isinstance(m, FusedConv2d) for m in fast.backbone.modules())
    # every one of ResNet-50's 16 bottlenecks fused whole: no norm left to run on its own
    assert sum(isinstance(m, FusedResidualBlock) for m in fast.backbone.body.modules()) == 16
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.backbone.body.modules())
    # the ReLUs after the RPN head's conv and the mask head's deconvolution run inside them
    assert isinstance(fast.rpn.head.conv, FusedConv2d) and fast.rpn.head.conv.relu
    assert isinstance(fast.roi_heads.mask_head.deconv, FusedConvTranspose2d) and fast.roi_heads.mask_head.deconv.relu
    theirs = torchvision_model
    images = make_images()
    with torch.no_grad():
        batch, _ = theirs.transform(images)
        sizes = [tuple(s) for s in batch.image_sizes]
        features = theirs.backbone(batch.tensors)
        got = fast.backbone(batch.tensors)
        for name in features:
            assert_close_to_scale(got[name], features[name])

        # RPN head on torchvision's features
        got_logits, got_deltas = fast.rpn.head(list(features.values()))
        logits, deltas = theirs.rpn.head(list(features.values()))
        for g, e in zip(got_logits + got_deltas, logits + deltas):
            assert_close_to_scale(g, e)

        # box head on torchvision's proposals, mask head on torchvision's detections
        proposals, _ = theirs.rpn(batch, features)
        expected, _ = theirs.roi_heads(features, proposals, batch.image_sizes)
        detections = fast.roi_heads._forward_box(features, proposals, sizes)
        for g, e in zip(detections, expected):
            assert len(e["boxes"]) > 0 and torch.equal(g["labels"], e["labels"])
            torch.testing.assert_close(g["boxes"], e["boxes"], rtol=0, atol=1e-2)
            torch.testing.assert_close(g["scores"], e["scores"], rtol=0, atol=1e-5)
        given = [{"boxes": e["boxes"], "labels": e["labels"]} for e in expected]
        fast.roi_heads.run_on_boxes(features, sizes, given)
        for g, e in zip(given, expected):
            # mask probabilities through four fused 3x3 convs and the deconvolution: oneDNN's summation
            # order differs per CPU (within 1e-3 on Intel's AVX-512 / AMX; 1.02e-3 at most on an AMD EPYC)
            torch.testing.assert_close(g["masks"], e["masks"], rtol=0, atol=2e-3)


@needs_bf16_kernels
def test_bf16_detections_overlap_fp32(ours):
    """bf16 backbone and heads against fp32 on the same images and the same proposals (fp32's:
    bf16 rounding reorders near-tied objectness scores of a random model)."""
    ours = copy.deepcopy(ours)
    with torch.no_grad():  # random box deltas make 0.5 px slivers, whose IoU means nothing: tame them
        ours.rpn.head.box_deltas.weight.mul_(0.05)
        ours.roi_heads.box_predictor.bbox_pred.weight.mul_(0.05)
    bf16 = optimize_for_cpu(ours, mode="bf16", num_threads=THREADS, cpu_flags={"amx_bf16"})
    assert bf16.inference_mode == "bf16"
    assert any(m.packed_weight.dtype == torch.bfloat16 for m in bf16.modules() if isinstance(m, FusedConv2d))
    images = make_images()
    with torch.no_grad():
        batch, _ = ours.transform(images)
        features = ours.backbone(batch.tensors)
        proposals, _ = ours.rpn(batch, features)
        expected, _ = ours.roi_heads(features, proposals, batch.image_sizes)
        bf16_features = bf16.backbone(batch.tensors)
        got, _ = bf16.roi_heads(bf16_features, proposals, batch.image_sizes)
        end_to_end = bf16(images)
    for g, e in zip(got, expected):
        assert g["boxes"].dtype == torch.float32 and g["masks"].dtype == torch.float32
        # each of fp32's ten best detections finds a bf16 detection of its class over the same box
        for box, label in zip(e["boxes"][:10], e["labels"][:10]):
            same_class = g["boxes"][g["labels"] == label]
            assert len(same_class) > 0 and box_iou(box[None], same_class).max() > 0.9
    assert all(len(d["boxes"]) > 0 and d["masks"].shape[-2:] == i.shape[-2:] for d, i in zip(end_to_end, images))


def test_bf16_falls_back_to_fast_without_amx(ours):
    with pytest.warns(UserWarning, match="no bf16 units"):
        model = optimize_for_cpu(ours, mode="bf16", cpu_flags={"avx512f", "avx2"})
    assert model.inference_mode == "fast"
    fused = [m for m in model.modules() if isinstance(m, FusedConv2d)]
    assert fused and all(m.packed_weight.dtype == torch.float32 for m in fused)
    assert has_fast_bf16({"amx_bf16", "amx_tile"}) and has_fast_bf16({"avx512_bf16"}) and not has_fast_bf16(set())


def test_bf16_falls_back_to_fast_without_bf16_kernels(ours, monkeypatch):
    """bf16 units in the flags but no oneDNN bf16 kernels (an AVX2-only CPU told it has AMX):
    a warning that says so and the fp32 'fast' mode, instead of oneDNN's error at the first call."""
    import maskrcnn.engine.cpu_inference as cpu_inference

    monkeypatch.setattr(cpu_inference, "bf16_kernels_available", lambda: False)
    with pytest.warns(UserWarning, match="no bf16 kernels on this CPU"):
        model = optimize_for_cpu(ours, mode="bf16", cpu_flags={"amx_bf16"})
    assert model.inference_mode == "fast"
    assert all(m.packed_weight.dtype == torch.float32 for m in model.modules() if isinstance(m, FusedConv2d))
    with torch.no_grad():
        assert all(len(d["boxes"]) > 0 for d in model(make_images()))


def test_cpu_flags_and_bad_arguments(tmp_path, ours):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx512f amx_bf16 amx_tile\n")
    assert read_cpu_flags(str(cpuinfo)) == {"fpu", "avx512f", "amx_bf16", "amx_tile"}
    assert read_cpu_flags(str(tmp_path / "missing")) == set()
    with pytest.raises(ValueError, match="not one of"):
        optimize_for_cpu(ours, mode="turbo")


def test_fast_and_bf16_run_a_group_norm_model():
    """GroupNorm (the demo's backbone and heads) cannot be folded: those blocks run eagerly, in bf16 too."""
    from maskrcnn.config import ModelConfig
    from maskrcnn.model.mask_rcnn import build_model

    config = ModelConfig(num_classes=3)
    config.backbone.depth, config.backbone.norm, config.backbone.fpn_channels = 18, "gn", 32
    config.mask_head.norm, config.transform.min_size, config.transform.min_size_test = "gn", [64], 64
    config.transform.max_size = 96
    torch.manual_seed(0)
    model = build_model(config).eval()
    images = make_images()
    with torch.no_grad():
        batch, _ = model.transform(images)
        features, expected = model.backbone(batch.tensors), model(images)
        for mode, tolerance in (("fast", 1e-4), ("bf16", 5e-2))[: 2 if bf16_kernels_available() else 1]:
            optimized = optimize_for_cpu(model, mode=mode, cpu_flags={"amx_bf16"})
            assert optimized.inference_mode == mode
            for name, value in optimized.backbone(batch.tensors).items():
                assert value.dtype == torch.float32
                assert_close_to_scale(value, features[name], tolerance)
            for g, e in zip(optimized(images), expected):
                assert set(g) == set(e) and g["masks"].shape == (len(g["boxes"]), 1, *e["masks"].shape[-2:])


def test_to_nchw_is_the_plain_layout_copy():
    """Large maps take the per-image 2-D transpose, small ones the plain copy: the same values."""
    g = torch.Generator().manual_seed(0)
    for shape in ((2, 16, 80, 70), (3, 8, 5, 7), (1, 3, 64, 65)):
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(shape, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
            for out_dtype in (torch.float32, dtype):
                got = to_nchw(x, out_dtype)
                assert got.is_contiguous() and got.dtype == out_dtype
                assert torch.equal(got, x.to(out_dtype, memory_format=torch.contiguous_format))
    plain = torch.randn(2, 3, 4, 5, generator=g)
    assert torch.equal(to_nchw(plain, torch.float32), plain) and torch.equal(to_nchw(plain[0, 0], torch.float32), plain[0, 0])


def test_fused_relu_after_a_conv_and_a_deconvolution():
    torch.manual_seed(0)
    head = MaskFCNHead(in_channels=8, out_channels=3, conv_dim=8, num_convs=1).eval()
    x = torch.randn(5, 8, 7, 7)
    with torch.no_grad():
        expected = head(x)
        fuse_relu_after(head, ["deconv"], dtype=torch.float32)
        assert isinstance(head.deconv, FusedConvTranspose2d) and isinstance(head.relu, torch.nn.Identity)
        got = head(x.contiguous(memory_format=torch.channels_last))
    assert_close_to_scale(got, expected, 1e-5)
    with pytest.raises(TypeError, match="convs is a Sequential"):
        fuse_relu_after(head, ["convs"], dtype=torch.float32)
