"""Tests for pipeline.models.predict: padded forward and validation at a scale."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.evaluation.metrics import ConfusionMatrix
from pipeline.models.predict import forward_padded, predict_logits, validate


class ColourModel(nn.Module):
    """Logits = a 1x1 conv of the image: per pixel, so zero padding leaves the frame's logits
    alone, while resizing the image (a blur) still changes them."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return self.conv(x)


def test_forward_padded_any_size_keeps_the_input_size():
    model = ColourModel().eval()
    x = torch.randn(2, 3, 37, 50)
    out = forward_padded(model, x)
    assert out.shape == (2, 4, 37, 50)
    assert torch.allclose(out, model(x), atol=1e-6)  # zero padding at bottom/right only


def test_validate_at_a_scale_equals_resize_predict_resize_back():
    model = ColourModel().eval()
    images = torch.randn(3, 3, 36, 48)
    masks = torch.randint(0, 4, (3, 36, 48))
    batches = [{"image": images[i:i + 1], "mask": masks[i:i + 1]} for i in range(3)]
    cm_half = validate(model, batches, num_classes=4, device=torch.device("cpu"), scale=0.5)
    want = ConfusionMatrix(num_classes=4)
    for i in range(3):
        small = F.interpolate(images[i:i + 1], scale_factor=0.5, mode="bilinear", align_corners=False)
        logits = F.interpolate(model(small), size=(36, 48), mode="bilinear", align_corners=False)
        want.update(masks[i].numpy().astype(np.uint8), logits.argmax(1)[0].numpy().astype(np.uint8))
    assert np.array_equal(cm_half, want.matrix)
    cm_full = validate(model, batches, num_classes=4, device=torch.device("cpu"))
    assert cm_full.sum() == cm_half.sum() == masks.numel()
    assert not np.array_equal(cm_full, cm_half)  # the scale is really applied


def test_predict_logits_is_one_view_at_a_scale_at_the_input_size():
    model = ColourModel().eval()
    x = torch.randn(2, 3, 36, 48)
    assert torch.equal(predict_logits(model, x), forward_padded(model, x))  # scale 1: as is
    half = predict_logits(model, x, scale=0.5)
    small = F.interpolate(x, scale_factor=0.5, mode="bilinear", align_corners=False)
    want = F.interpolate(model(small), size=(36, 48), mode="bilinear", align_corners=False)
    assert half.shape == (2, 4, 36, 48) and torch.allclose(half, want, atol=1e-6)
