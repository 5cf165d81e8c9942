"""ImageTransform against torchvision's GeneralizedRCNNTransform on the same inputs."""

import pytest
import torch
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from maskrcnn.model.transform import ImageTransform

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def make_pair(min_size=(64, 72, 80), min_size_test=80, max_size=120):
    ours = ImageTransform(min_size=min_size, min_size_test=min_size_test, max_size=max_size,
                          image_mean=MEAN, image_std=STD)
    theirs = GeneralizedRCNNTransform(min_size_test if len(min_size) == 1 else min_size, max_size, MEAN, STD)
    return ours, theirs


def make_target(height, width, n=3, generator=None):
    xy = torch.rand(n, 2, generator=generator) * torch.tensor([width / 2, height / 2])
    boxes = torch.cat([xy, xy + 5 + torch.rand(n, 2, generator=generator) * 20], dim=1)
    keypoints = torch.cat([torch.rand(n, 4, 2, generator=generator) * 50, torch.full((n, 4, 1), 2.0)], dim=2)
    masks = (torch.rand(n, height, width, generator=generator) > 0.5).to(torch.uint8)
    return {"boxes": boxes, "labels": torch.ones(n, dtype=torch.int64), "keypoints": keypoints, "masks": masks}


def test_eval_transform_equals_torchvision_batched_and_single():
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 100, 150, generator=g), torch.rand(3, 97, 64, generator=g), torch.rand(3, 160, 130, generator=g)]
    ours, theirs = make_pair(min_size=(80,), min_size_test=80)
    ours.eval(), theirs.eval()
    batch, _ = ours(images)
    expected, _ = theirs(images)
    assert batch.tensors.shape == expected.tensors.shape
    assert batch.tensors.shape[-1] % 32 == 0 and batch.tensors.shape[-2] % 32 == 0
    torch.testing.assert_close(batch.tensors, expected.tensors, rtol=0, atol=0)
    assert batch.image_sizes == [tuple(s) for s in expected.image_sizes]
    assert batch.image_sizes[0] == (80, 120)  # max_size caps the long side
    single, _ = ours(images[1:2])
    torch.testing.assert_close(single.tensors[0, :, :80, :52], batch.tensors[1, :, :80, :52])


def test_train_transform_resizes_targets_like_torchvision_with_same_seed():
    g = torch.Generator().manual_seed(1)
    images = [torch.rand(3, 90, 110, generator=g), torch.rand(3, 64, 128, generator=g)]
    targets = [make_target(90, 110, generator=g), make_target(64, 128, generator=g)]
    ours, theirs = make_pair()
    ours.train(), theirs.train()
    torch.manual_seed(5)
    batch, new_targets = ours(images, targets)
    torch.manual_seed(5)
    expected, expected_targets = theirs(images, targets)
    torch.testing.assert_close(batch.tensors, expected.tensors, rtol=0, atol=0)
    assert batch.image_sizes == [tuple(s) for s in expected.image_sizes]
    for t, e, original in zip(new_targets, expected_targets, targets):
        for key in ("boxes", "keypoints", "masks", "labels"):
            torch.testing.assert_close(t[key], e[key], rtol=0, atol=0)
        assert t["boxes"] is not original["boxes"]  # inputs untouched
    assert targets[0]["boxes"].max() < 90


def test_training_scales_vary_and_other_fields_are_scaled():
    ours, _ = make_pair(min_size=(64, 96), max_size=1000)
    ours.train()
    image = torch.rand(3, 32, 32)
    target = {"boxes": torch.tensor([[1.0, 2.0, 3.0, 4.0]]), "labels": torch.tensor([1]),
              "crowd_boxes": torch.tensor([[0.0, 0.0, 16.0, 8.0]]),
              "point_coords": torch.tensor([[[8.0, 4.0]]]), "point_labels": torch.tensor([[1.0]])}
    torch.manual_seed(0)
    sizes = set()
    for _ in range(20):
        batch, (new_target,) = ours([image], [target])
        sizes.add(batch.image_sizes[0])
        factor = batch.image_sizes[0][0] / 32
        torch.testing.assert_close(new_target["crowd_boxes"], target["crowd_boxes"] * factor)
        torch.testing.assert_close(new_target["point_coords"], target["point_coords"] * factor)
        assert torch.equal(new_target["point_labels"], target["point_labels"])
    assert sizes == {(64, 64), (96, 96)}


def test_instance_masks_are_resized_lazily():
    class FakeInstanceMasks:
        def __init__(self, size):
            self.image_size = size

        def resize(self, height, width):
            return FakeInstanceMasks((height, width))

    ours, _ = make_pair(min_size=(80,))
    ours.train()
    target = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "masks": FakeInstanceMasks((40, 50))}
    _, (new_target,) = ours([torch.rand(3, 40, 50)], [target])
    assert new_target["masks"].image_size == (80, 100)
    assert new_target["boxes"].shape == (0, 4)


def test_postprocess_maps_boxes_and_keypoints_back():
    ours, theirs = make_pair()
    ours.eval()
    detections = [{"boxes": torch.tensor([[10.0, 20.0, 30.0, 40.0]]), "keypoints": torch.tensor([[[10.0, 20.0, 1.0]]]),
                   "scores": torch.tensor([0.9])}]
    out = ours.postprocess(detections, [(80, 120)], [(100, 150)])
    theirs.eval()
    expected = theirs.postprocess([dict(d) for d in detections], [(80, 120)], [(100, 150)])
    torch.testing.assert_close(out[0]["boxes"], expected[0]["boxes"], rtol=0, atol=0)
    torch.testing.assert_close(out[0]["keypoints"], expected[0]["keypoints"], rtol=0, atol=0)
    torch.testing.assert_close(out[0]["boxes"], torch.tensor([[12.5, 25.0, 37.5, 50.0]]))


def test_bad_images_name_the_image():
    ours, _ = make_pair()
    with pytest.raises(ValueError, match="image 1"):
        ours([torch.rand(3, 10, 10), torch.rand(10, 10)])
    with pytest.raises(TypeError, match="image 0"):
        ours([torch.zeros(3, 10, 10, dtype=torch.int32)])


@pytest.mark.parametrize("detectron2_pixels", [False, True])
def test_uint8_images_give_the_numbers_of_their_floats_to_the_bit(tmp_path, detectron2_pixels):
    """A uint8 image is read as pixel / 255, decode_image's float: the same batch, bit for bit,
    also with BGR channels and 0-255 units (detectron2's weights)."""
    import numpy as np
    from PIL import Image

    from maskrcnn.data.coco import decode_image

    path = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (70, 110, 3), dtype=np.uint8)).save(path)
    pixels, floats = decode_image(path, keep_uint8=True), decode_image(path)
    assert pixels.dtype == torch.uint8 and torch.equal(pixels.float() / 255, floats)
    ours = ImageTransform(min_size=(80,), min_size_test=80, max_size=120, image_mean=MEAN, image_std=STD,
                          **({"channel_order": "BGR", "pixel_scale": 255.0} if detectron2_pixels else {})).eval()
    from_pixels, from_floats = ours([pixels])[0], ours([floats])[0]
    assert torch.equal(from_pixels.tensors, from_floats.tensors) and from_pixels.image_sizes == from_floats.image_sizes
    assert torch.equal(pixels, decode_image(path, keep_uint8=True))  # the input is left as it was


def test_detectron2_input_convention_and_rounded_sizes():
    from maskrcnn.model.transform import ImageTransform, rounded_size

    transform = ImageTransform(min_size=[800], min_size_test=800, max_size=1333, image_mean=[10.0, 20.0, 30.0],
                               image_std=[2.0, 4.0, 5.0], channel_order="BGR", pixel_scale=255.0,
                               size_rounding="round").eval()
    image = torch.rand(3, 6, 8)
    expected = (image.flip(0) * 255 - torch.tensor([10.0, 20, 30])[:, None, None]) / torch.tensor([2.0, 4, 5])[:, None, None]
    torch.testing.assert_close(transform.normalize(image), expected)
    # ResizeShortestEdge: int(side * scale + 0.5), the longer side capped first
    assert rounded_size((480, 640), 800, 1333) == (800, 1067)  # 1066.67; torchvision's floor gives 1066
    assert rounded_size((500, 2000), 800, 1333) == (333, 1333)  # capped: 800 * 1333 / 3200 = 333.25
    assert rounded_size((321, 321), 320, 512) == (320, 320)
    batch, _ = transform([torch.rand(3, 480, 640)])
    assert batch.image_sizes == [(800, 1067)]
