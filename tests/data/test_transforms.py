"""Train/eval augmentation: shapes, padding, nearest-only masks, flips, scale range, params adapter."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.core.errors import PipelineError
from pipeline.data.transforms import (IMAGENET_MEAN, IMAGENET_STD, eval_transform, train_transform,
                                      transform_from_params)

MEAN = np.asarray(IMAGENET_MEAN, dtype=np.float32)
STD = np.asarray(IMAGENET_STD, dtype=np.float32)


def normalised(image: np.ndarray) -> np.ndarray:
    return (image.astype(np.float32) / 255.0 - MEAN) / STD


def random_pair(h: int, w: int, values=(0, 10, 200), seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    mask = rng.choice(np.asarray(values, dtype=np.uint8), size=(h, w))
    return image, mask


def seeded(transform, seed: int):
    transform.set_random_seed(seed)
    return transform


@pytest.mark.parametrize("size", [(20, 30), (64, 80), (150, 90)])
def test_train_output_shape_and_dtype_equal_crop(size):
    image, mask = random_pair(*size)
    t = seeded(train_transform(crop_hw=(48, 56)), 0)
    for _ in range(10):
        out = t(image=image, mask=mask)
        assert out["image"].shape == (48, 56, 3) and out["image"].dtype == np.float32
        assert out["mask"].shape == (48, 56) and out["mask"].dtype == np.uint8


def test_padding_fills_mask_with_ignore_and_image_with_zero():
    image, mask = random_pair(20, 24)
    t = seeded(train_transform(crop_hw=(40, 50), scale_range=(1.0, 1.0), hflip_p=0.0, photometric=False), 0)
    out = t(image=image, mask=mask)
    pad = out["mask"] == 255
    assert pad.sum() == 40 * 50 - 20 * 24
    # padded image pixels are black before normalisation
    np.testing.assert_allclose(out["image"][pad], np.broadcast_to(-MEAN / STD, (pad.sum(), 3)), atol=1e-5)
    # the unpadded part is the whole image, unchanged
    rows, cols = np.nonzero(~pad)
    r0, c0 = rows.min(), cols.min()
    np.testing.assert_array_equal(out["mask"][r0:r0 + 20, c0:c0 + 24], mask)
    np.testing.assert_allclose(out["image"][r0:r0 + 20, c0:c0 + 24], normalised(image), atol=1e-5)


def test_custom_ignore_index_used_for_padding():
    image, mask = random_pair(10, 10)
    t = seeded(train_transform(crop_hw=(16, 16), scale_range=(1.0, 1.0), ignore_index=99), 0)
    out = t(image=image, mask=mask)
    assert (out["mask"] == 99).sum() == 16 * 16 - 10 * 10


def test_masks_never_gain_interpolated_values():
    image, mask = random_pair(37, 53, values=(0, 10, 200))
    t = seeded(train_transform(crop_hw=(32, 32), scale_range=(0.5, 2.0)), 1)
    seen = set()
    for _ in range(40):
        values = set(np.unique(t(image=image, mask=mask)["mask"]).tolist())
        assert values <= {0, 10, 200, 255}
        seen |= values
    assert {0, 10, 200} <= seen


def test_hflip_mirrors_image_and_mask():
    image = np.zeros((8, 12, 3), dtype=np.uint8)
    image[:, :3] = (255, 0, 0)  # red strip on the left
    mask = np.zeros((8, 12), dtype=np.uint8)
    mask[:, :3] = 5
    kwargs = dict(crop_hw=(8, 12), scale_range=(1.0, 1.0), photometric=False)
    flipped = seeded(train_transform(hflip_p=1.0, **kwargs), 0)(image=image, mask=mask)
    kept = seeded(train_transform(hflip_p=0.0, **kwargs), 0)(image=image, mask=mask)
    np.testing.assert_array_equal(flipped["mask"], mask[:, ::-1])
    np.testing.assert_allclose(flipped["image"], normalised(image[:, ::-1]), atol=1e-5)
    np.testing.assert_array_equal(kept["mask"], mask)
    np.testing.assert_allclose(kept["image"], normalised(image), atol=1e-5)


@pytest.mark.parametrize("scale_range", [(0.5, 1.0), (1.5, 2.0)])
def test_scale_factor_stays_in_range(scale_range):
    # a 40x40 labelled square inside a large crop: its side after scaling measures the factor
    image = np.full((40, 40, 3), 128, dtype=np.uint8)
    mask = np.ones((40, 40), dtype=np.uint8)
    t = seeded(train_transform(crop_hw=(100, 100), scale_range=scale_range, photometric=False), 3)
    factors = [np.sqrt((t(image=image, mask=mask)["mask"] == 1).sum()) / 40 for _ in range(60)]
    lo, hi = scale_range
    assert min(factors) >= lo - 0.03 and max(factors) <= hi + 0.03
    # the draws spread over the range rather than sticking to one value
    assert max(factors) - min(factors) > 0.6 * (hi - lo)


def test_photometric_changes_colours_only():
    image, mask = random_pair(24, 24)
    t = seeded(train_transform(crop_hw=(24, 24), scale_range=(1.0, 1.0), hflip_p=0.0), 0)
    changed = 0
    for _ in range(10):
        out = t(image=image, mask=mask)
        np.testing.assert_array_equal(out["mask"], mask)
        changed += not np.allclose(out["image"], normalised(image), atol=1e-4)
    assert changed >= 5  # four jitters at p=0.5: all four skipped only 1 time in 16


def test_same_seed_same_augmentation():
    image, mask = random_pair(30, 40)
    a = seeded(train_transform(crop_hw=(24, 24)), 7)(image=image, mask=mask)
    b = seeded(train_transform(crop_hw=(24, 24)), 7)(image=image, mask=mask)
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["mask"], b["mask"])


def test_eval_transform_only_normalises():
    image, mask = random_pair(31, 17)
    out = eval_transform(mean=IMAGENET_MEAN, std=IMAGENET_STD)(image=image, mask=mask)
    np.testing.assert_allclose(out["image"], normalised(image), atol=1e-5)
    np.testing.assert_array_equal(out["mask"], mask)


def test_transform_from_params_builds_train_and_eval():
    cfg = {"crop": [16, 24], "scale": [0.5, 2.0], "hflip": 0.5, "photometric": True}
    image, mask = random_pair(30, 30)
    out = seeded(transform_from_params(cfg, train=True), 0)(image=image, mask=mask)
    assert out["image"].shape == (16, 24, 3) and out["mask"].shape == (16, 24)
    out = transform_from_params(cfg, train=False)(image=image, mask=mask)
    np.testing.assert_allclose(out["image"], normalised(image), atol=1e-5)


def test_transform_from_params_custom_normalisation():
    image, mask = random_pair(5, 5)
    out = transform_from_params({"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}, train=False)(image=image)
    np.testing.assert_allclose(out["image"], image / 127.5 - 1.0, atol=1e-5)


def test_transform_from_params_typo_lists_valid_keys():
    with pytest.raises(PipelineError, match=r"unknown key 'hflp'.*crop.*hflip.*photometric.*scale"):
        transform_from_params({"crop": [16, 16], "hflp": 0.5}, train=True,
                              source="params.yaml: train.augment")


@pytest.mark.parametrize("cfg, key", [
    ({"crop": [16]}, "crop"),
    ({"crop": [16, -1]}, "crop"),
    ({"crop": [16, 16], "scale": [2.0, 0.5]}, "scale"),
    ({"crop": [16, 16], "hflip": 1.5}, "hflip"),
    ({"crop": [16, 16], "photometric": "yes"}, "photometric"),
    ({"crop": [16, 16], "mean": [0.5, 0.5]}, "mean"),
    ({"scale": [0.5, 2.0]}, "crop"),
])
def test_transform_from_params_bad_values_name_the_key(cfg, key):
    with pytest.raises(PipelineError, match=f"'{key}'"):
        transform_from_params(cfg, train=True)


def test_val_scale_defaults_to_one_and_rejects_bad_values():
    from pipeline.data.transforms import val_scale
    assert val_scale({}) == 1.0 and val_scale({"val_scale": 0.5}) == 0.5
    transform_from_params({"crop": [8, 8], "val_scale": 0.5}, train=True)  # a known key
    for bad in (0, -1, True, "half", 10):
        with pytest.raises(PipelineError, match="'val_scale'"):
            transform_from_params({"crop": [8, 8], "val_scale": bad}, train=False)
