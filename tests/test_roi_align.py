"""Our RoIAlign (one sparse matrix on the CPU in training) against torchvision.ops.roi_align: outputs and gradients."""

import pytest
import torch
from torchvision.ops import roi_align as torchvision_roi_align

from maskrcnn.model.roi_align import roi_align


def _random_case(*, num_rois: int, scale: float, dtype=torch.float32, seed: int = 0):
    """Features `[2, 5, 13, 17]` and RoIs in input pixels, a third of them partly outside the map."""
    generator = torch.Generator().manual_seed(seed)
    height, width = 13, 17
    features = torch.randn(2, 5, height, width, generator=generator, dtype=dtype, requires_grad=True)
    extent = torch.tensor([width, height], dtype=dtype) / scale
    corner = torch.rand(num_rois, 2, generator=generator, dtype=dtype) * extent * 1.3 - 0.15 * extent
    size = torch.rand(num_rois, 2, generator=generator, dtype=dtype) * extent * 0.7
    size[: num_rois // 4] *= 0.02  # RoIs smaller than a feature-map cell
    image = torch.randint(0, 2, (num_rois, 1), generator=generator).to(dtype)
    rois = torch.cat([image, corner, corner + size], dim=1)
    return features, rois


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sampling_ratio", [0, 2])
@pytest.mark.parametrize("scale", [1.0, 0.25])
def test_forward_and_gradient_equal_torchvision(aligned, sampling_ratio, scale):
    features, rois = _random_case(num_rois=40, scale=scale)
    outside = (rois[:, 1:3] < 0).any(dim=1) | (rois[:, 3] * scale > 17) | (rois[:, 4] * scale > 13)
    assert outside.any() and (~outside).any()  # both kinds of boxes are in the test
    settings = dict(spatial_scale=scale, sampling_ratio=sampling_ratio, aligned=aligned)
    grad_output = torch.randn(40, 5, 7, 7, generator=torch.Generator().manual_seed(1))
    expected = torchvision_roi_align(features, rois, 7, **settings)
    (expected_grad,) = torch.autograd.grad(expected, features, grad_output)
    pooled = roi_align(features, rois, 7, **settings)
    (grad,) = torch.autograd.grad(pooled, features, grad_output)
    torch.testing.assert_close(pooled, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad, expected_grad, atol=1e-5, rtol=1e-5)
    assert expected_grad.abs().sum() > 0


def test_float64_matches_to_double_precision():
    features, rois = _random_case(num_rois=20, scale=0.5, dtype=torch.float64)
    settings = dict(spatial_scale=0.5, sampling_ratio=0, aligned=True)
    grad_output = torch.randn(20, 5, 14, 14, dtype=torch.float64)
    (expected,) = torch.autograd.grad(torchvision_roi_align(features, rois, 14, **settings), features, grad_output)
    (grad,) = torch.autograd.grad(roi_align(features, rois, 14, **settings), features, grad_output)
    torch.testing.assert_close(grad, expected, atol=1e-12, rtol=1e-12)


def test_empty_rois_give_empty_output_and_zero_gradient():
    features, _ = _random_case(num_rois=1, scale=1.0)
    pooled = roi_align(features, torch.zeros(0, 5), 7, spatial_scale=1.0, sampling_ratio=2, aligned=True)
    assert pooled.shape == (0, 5, 7, 7)
    (grad,) = torch.autograd.grad(pooled.sum(), features)
    assert grad.shape == features.shape and not grad.any()


def test_bfloat16_features_under_autocast_keep_their_dtype():
    features, rois = _random_case(num_rois=10, scale=1.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pooled = roi_align(features.bfloat16(), rois, 7, spatial_scale=1.0, sampling_ratio=2, aligned=True)
    expected = torchvision_roi_align(features.bfloat16().float(), rois, 7, spatial_scale=1.0, sampling_ratio=2,
                                     aligned=True)
    assert pooled.dtype == torch.bfloat16
    torch.testing.assert_close(pooled.float(), expected, atol=1e-2, rtol=1e-2)
    (grad,) = torch.autograd.grad(pooled.float().sum(), features)
    (expected_grad,) = torch.autograd.grad(expected.sum(), features)
    torch.testing.assert_close(grad, expected_grad, atol=1e-2, rtol=1e-2)


def test_a_training_step_gives_the_losses_and_gradients_of_torchvision_roi_align(monkeypatch):
    """The whole model (box, mask and keypoint poolers): same losses and gradients as with
    torchvision's RoIAlign; then the fused AdamW step the trainer uses moves the weights as the
    for-loop one does."""
    import copy

    import maskrcnn.model.roi_heads as roi_heads
    from maskrcnn.model.mask_rcnn import build_model
    from test_model import small_config, synthetic_example

    torch.manual_seed(0)
    model = build_model(small_config())
    reference = copy.deepcopy(model)
    image, target = synthetic_example()

    def step(network):
        torch.manual_seed(1)  # the same anchor and RoI sampling
        losses = network([image], [target])
        sum(losses.values()).backward()
        return losses, {name: p.grad for name, p in network.named_parameters() if p.grad is not None}

    losses, gradients = step(model)
    monkeypatch.setattr(roi_heads, "roi_align", lambda *args, **kwargs: torchvision_roi_align(*args, **kwargs))
    expected_losses, expected_gradients = step(reference)
    assert set(losses) == {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg",
                           "loss_mask", "loss_keypoint"}
    for name, value in expected_losses.items():
        torch.testing.assert_close(losses[name], value, atol=1e-5, rtol=1e-5)
    assert gradients.keys() == expected_gradients.keys()
    for name, value in expected_gradients.items():  # to float rounding of the tensor's own scale
        scale = max(1.0, float(value.abs().max()))
        torch.testing.assert_close(gradients[name], value, atol=1e-5 * scale, rtol=1e-5, msg=name)

    for parameter, expected in zip(model.parameters(), reference.parameters()):
        parameter.grad = None if expected.grad is None else expected.grad.clone()  # the same gradients now
    fused = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    for_loop = torch.optim.AdamW(reference.parameters(), lr=1e-3, foreach=False)
    for _ in range(2):  # the second step also reads the moments the first one wrote
        fused.step()
        for_loop.step()
    for (name, parameter), expected in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(parameter, expected, atol=1e-6, rtol=1e-6, msg=name)
