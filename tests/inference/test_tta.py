"""Tests of pipeline.inference.tta: view round trips, sliding-window placement, TTA averaging and batching."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pipeline.core.errors import PipelineError
from pipeline.inference.tta import (TTAConfig, hflip, predict_probs, predict_probs_and_plain,
                                    predict_probs_batch, rescale, restore, scaled_size, sliding_window,
                                    tta_from_params, window_starts)
from pipeline.models.build import build_model
from pipeline.models.predict import forward_padded

C = 4




@pytest.fixture(scope="module")
def unet() -> nn.Module:
    """A tiny random Unet (timm's test_resnet): not flip-symmetric, not translation-equivariant."""
    torch.manual_seed(0)
    return build_model(arch="Unet", encoder="tu-test_resnet", num_classes=C,
                       decoder_channels=[16, 16, 8, 8, 8]).eval()


@pytest.fixture(scope="module")
def pixelwise() -> nn.Module:
    """A per-pixel (1x1 conv) model: equivariant to flips and translations."""
    torch.manual_seed(1)
    return nn.Conv2d(3, C, kernel_size=1).eval()


def image(h: int, w: int, seed: int = 0, n: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


def smooth(h: int, w: int, period: float = 32.0) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32),
                            torch.arange(w, dtype=torch.float32), indexing="ij")
    k = 2 * math.pi / period
    return torch.stack([torch.sin(k * ys), torch.cos(k * xs), torch.sin(k * (xs + ys))])[None]


def plain_probs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return forward_padded(model, x).float().softmax(1)


def reference_tta(model: nn.Module, x: torch.Tensor, tta: TTAConfig) -> torch.Tensor:
    """The textbook loop: one forward per view, keep every view, then average (1 image)."""
    h, w = x.shape[-2:]
    probs = []
    for s in tta.scales:
        for flip in ([False, True] if tta.flip else [False]):
            v = rescale(x, s)
            v = hflip(v) if flip else v
            if tta.crop_hw and (v.shape[-2] > tta.crop_hw[0] or v.shape[-1] > tta.crop_hw[1]):
                logits = sliding_window(model, v, crop_hw=tta.crop_hw, overlap=tta.overlap,
                                        num_classes=C, batch_size=1)
            else:
                logits = forward_padded(model, v)
            p = logits.softmax(1)
            probs.append(restore(hflip(p) if flip else p, (h, w)))
    return torch.stack(probs).mean(0)[0]


# ----------------------------------------------------------------------------- views
def test_hflip_is_its_own_inverse_exactly():
    x = image(37, 53)
    assert torch.equal(hflip(hflip(x)), x)
    assert not torch.equal(hflip(x), x)
    assert torch.equal(hflip(x)[..., 0], x[..., -1])


def test_rescale_then_restore_at_scale_one_is_the_identity():
    x = image(37, 53)
    assert torch.equal(restore(rescale(x, 1.0), (37, 53)), x)


def test_scaled_sizes_round_half_up():
    assert scaled_size((37, 53), 0.5) == (19, 27)  # 18.5 -> 19, 26.5 -> 27
    assert scaled_size((37, 53), 0.75) == (28, 40)
    assert scaled_size((3, 3), 0.1) == (1, 1)
    assert tuple(rescale(image(37, 53), 1.25).shape) == (1, 3, 46, 66)


def test_rescale_by_two_and_back_returns_a_smooth_input_closely():
    # Up x2 then down x2 (bilinear, align_corners=False) is the filter [1/8, 3/4, 1/8] along
    # each axis: on a sinusoid of period 32 px it changes values by 1/4 * (1 - cos(2 pi / 32))
    # = 0.0048 per axis (< 0.01 for the diagonal channel, blurred along both), and at the
    # border (clamped neighbour) by at most slope / 8 = (2 pi / 32) / 8 = 0.0245 per axis.
    x = smooth(48, 64)
    back = restore(rescale(x, 2.0), (48, 64))
    assert back.shape == x.shape
    err = (back - x).abs()
    assert err[..., 1:-1, 1:-1].max() < 0.01
    assert err.max() < 0.05
    noise = image(48, 64)  # the same round trip blurs noise a lot: the tolerance is meaningful
    assert (restore(rescale(noise, 2.0), (48, 64)) - noise).abs().max() > 0.1


def test_deaugmenting_an_equivariant_models_prediction_gives_the_plain_prediction(pixelwise):
    x = smooth(40, 56)
    plain = plain_probs(pixelwise, x)
    flipped = hflip(plain_probs(pixelwise, hflip(x)))
    assert torch.equal(flipped, plain)
    scaled = restore(plain_probs(pixelwise, rescale(x, 2.0)), (40, 56))
    assert (scaled - plain).abs().max() < 0.01


# ----------------------------------------------------------------------------- sliding window
@pytest.mark.parametrize("length,crop,stride",
                         [(100, 32, 20), (64, 32, 32), (33, 32, 21), (20, 32, 8)])
def test_window_starts_cover_the_image_at_the_stride(length, crop, stride):
    starts = window_starts(length, crop, stride)
    covered = torch.zeros(length, dtype=torch.bool)
    for s in starts:
        covered[s:s + min(crop, length)] = True
    assert covered.all()
    assert starts[0] == 0 and starts[-1] + min(crop, length) == length
    assert all(0 < b - a <= stride for a, b in zip(starts, starts[1:]))


def test_sliding_window_in_one_crop_equals_whole_image_inference(unet):
    for h, w, crop in [(37, 53, (64, 64)), (64, 96, (64, 96)), (37, 53, (37, 100))]:
        x = image(h, w)
        out = sliding_window(unet, x, crop_hw=crop, num_classes=C, batch_size=4)
        assert torch.allclose(out, forward_padded(unet, x), atol=1e-6, rtol=0)


@pytest.mark.parametrize("kwargs", [{"stride_hw": (20, 30)}, {"overlap": 1 / 3}, {"overlap": 0.0},
                                    {"overlap": 0.9}])
def test_sliding_window_of_a_pixelwise_model_equals_whole_image_inference(pixelwise, kwargs):
    x = image(100, 130, n=2)
    out = sliding_window(pixelwise, x, crop_hw=(32, 48), num_classes=C, batch_size=3, **kwargs)
    assert out.shape == (2, C, 100, 130)
    assert torch.allclose(out, pixelwise(x), atol=1e-5, rtol=0)


def test_sliding_window_differs_from_whole_image_for_a_model_with_context(unet):
    # Sanity check that the windowed path really ran crops: a Unet sees different context.
    x = image(100, 130)
    out = sliding_window(unet, x, crop_hw=(32, 48), num_classes=C)
    assert (out - forward_padded(unet, x)).abs().max() > 1e-3


# ----------------------------------------------------------------------------- TTA
def test_one_scale_without_flip_equals_plain_inference(unet):
    x = image(37, 53)
    for tta in (TTAConfig(scales=(1.0,), flip=False), tta_from_params(False)):
        probs = predict_probs(unet, x, tta=tta, num_classes=C)
        assert probs.shape == (C, 37, 53) and probs.dtype == torch.float32
        assert torch.allclose(probs, plain_probs(unet, x)[0], atol=1e-6, rtol=0)


@pytest.mark.parametrize("crop", [None, (32, 32)])
def test_tta_equals_the_per_view_reference(unet, crop):
    x = image(37, 53)
    tta = TTAConfig(scales=(0.75, 1.0, 1.3), flip=True, crop_hw=crop)
    probs = predict_probs(unet, x[0], tta=tta, num_classes=C)
    assert torch.allclose(probs, reference_tta(unet, x, tta), atol=1e-5, rtol=0)
    assert (probs - plain_probs(unet, x)[0]).abs().max() > 1e-3  # the views did change it


@pytest.mark.parametrize("crop", [None, (32, 32)])
def test_output_is_a_probability_map_for_odd_sizes(unet, crop):
    tta = TTAConfig(scales=(0.5, 0.75, 1.3, 1.75), crop_hw=crop)  # 19x27, 28x40, 48x69, 65x93
    probs = predict_probs(unet, image(37, 53), tta=tta, num_classes=C)
    assert probs.shape == (C, 37, 53) and probs.dtype == torch.float32
    assert probs.min() >= 0
    assert torch.allclose(probs.sum(0), torch.ones(37, 53), atol=1e-5)


@pytest.mark.parametrize("crop", [None, (32, 32)])
def test_batch_size_does_not_change_the_result(unet, crop):
    x = image(37, 53)
    one, eight = (predict_probs(unet, x, num_classes=C, tta=TTAConfig(
        scales=(0.75, 1.0, 1.5), crop_hw=crop, batch_size=b)) for b in (1, 8))
    assert torch.allclose(one, eight, atol=1e-5, rtol=0)


def test_flip_tta_is_flip_invariant(unet):
    x = image(37, 53)
    tta = TTAConfig(scales=(0.75, 1.0, 1.25))
    probs, probs_of_flipped = (predict_probs(unet, v, tta=tta, num_classes=C)
                               for v in (x, hflip(x)))
    assert torch.allclose(probs_of_flipped, hflip(probs), atol=1e-6, rtol=0)
    no_flip = TTAConfig(scales=(0.75, 1.0, 1.25), flip=False)  # the model itself is not symmetric
    a, b = (predict_probs(unet, v, tta=no_flip, num_classes=C) for v in (x, hflip(x)))
    assert (b - hflip(a)).abs().max() > 1e-3


def test_batch_of_images_equals_one_at_a_time(unet):
    x = image(37, 53, n=3)
    tta = TTAConfig(scales=(0.75, 1.25), batch_size=4)  # 2 images per forward: groups of 2 and 1
    batch = predict_probs_batch(unet, x, tta=tta, num_classes=C)
    single = torch.stack([predict_probs(unet, v, tta=tta, num_classes=C) for v in x])
    assert batch.shape == (3, C, 37, 53)
    assert torch.allclose(batch, single, atol=1e-5, rtol=0)


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_plain_view_is_a_by_product_equal_to_plain_inference(unet, batch_size):
    x = image(37, 53, n=3)
    tta = TTAConfig(scales=(0.75, 1.0, 1.25), flip=True, batch_size=batch_size)
    probs, plain = predict_probs_and_plain(unet, x, tta=tta, num_classes=C)
    assert torch.allclose(probs, predict_probs_batch(unet, x, tta=tta, num_classes=C))
    assert plain.shape == (3, C, 37, 53)
    assert torch.allclose(plain, plain_probs(unet, x), atol=1e-6, rtol=0)
    _, none = predict_probs_and_plain(unet, x, tta=TTAConfig(scales=(0.75, 1.25)), num_classes=C)
    assert none is None  # no scale-1 view in the TTA: nothing to reuse


def test_runs_in_eval_mode_and_restores_train_mode():
    torch.manual_seed(0)
    prior = [0.7, 0.2, 0.08, 0.02]  # a logit-adjusted head adds its prior in train mode only
    model = build_model(arch="Unet", encoder="tu-test_resnet", num_classes=C,
                        decoder_channels=[16, 16, 8, 8, 8],
                        logit_adjust={"prior": prior, "tau": 1.0})
    x = image(32, 32)
    model.train()
    probs = predict_probs(model, x, tta=tta_from_params(False), num_classes=C)
    assert model.training
    expected = plain_probs(model.eval(), x)[0]
    assert torch.allclose(probs, expected, atol=1e-6, rtol=0)


def test_wrong_class_count_is_a_pipeline_error(pixelwise):
    with pytest.raises(PipelineError, match="outputs 4 classes, expected 5"):
        predict_probs(pixelwise, image(8, 8), tta=tta_from_params(False), num_classes=5)


# ----------------------------------------------------------------------------- params
def test_tta_from_params():
    assert tta_from_params(True) == TTAConfig() and tta_from_params(None) == TTAConfig()
    assert TTAConfig().num_views == 12
    off = tta_from_params(False)
    assert off.scales == (1.0,) and not off.flip and off.num_views == 1
    cfg = tta_from_params({"scales": [1, 1.5], "crop_hw": [64, 96], "overlap": 0.5})
    assert cfg.scales == (1.0, 1.5) and cfg.crop_hw == (64, 96) and cfg.flip
    assert tta_from_params({"crop_hw": 64}).crop_hw == (64, 64)


@pytest.mark.parametrize("bad,match", [
    ({"scale": [1.0]}, r"unknown key 'tta.scale'; valid keys of 'tta': amp, batch_size, crop_hw"),
    ({"scales": []}, "tta.scales"), ({"scales": [1.0, -0.5]}, "tta.scales"),
    ({"scales": ["big"]}, "tta.scales"), ({"crop_hw": [64]}, "tta.crop_hw"),
    ({"overlap": 1.0}, "tta.overlap"), ({"batch_size": 0}, "tta.batch_size"),
    ({"flip": "yes"}, "tta.flip"), ("on", "'tta' must be true, false or a mapping"),
])
def test_bad_tta_params_are_pipeline_errors(bad, match):
    with pytest.raises(PipelineError, match=match):
        tta_from_params(bad)
