"""Class-aware sampling: rare-class frame draws (pipeline.data.dataset.ClassDraw), crops that
hold their class (pipeline.data.transforms.ClassCrop), resuming, and the untouched defaults."""

from __future__ import annotations

import itertools

import albumentations as A
import cv2
import numpy as np
import pytest
import torch
from scipy import stats

from pipeline.core.errors import PipelineError
from pipeline.core.runs import parse_model_params
from pipeline.data.dataset import (ClassDraw, InfiniteSampler, SegmentationDataset, build_loader,
                                   class_probabilities, sample_generators)
from pipeline.data.manifest import read_raw_mask
from pipeline.data.transforms import ClassCrop, class_window, train_transform

from test_dataset import H, W, camvid_like_classes, write_frame

# a planted training set: 6 frames x 5 classes; class 0 is common, 2 and 3 rare, 4 absent
COUNTS = np.array([[900, 100, 0, 0, 0],
                   [800, 150, 50, 0, 0],
                   [1000, 0, 0, 0, 0],
                   [700, 200, 0, 100, 0],
                   [950, 0, 50, 0, 0],
                   [1000, 0, 0, 0, 0]])
RARE = 7  # the planted class of the crop tests


def take(sampler, n):
    return list(itertools.islice(iter(sampler), n))


def formula(counts: np.ndarray, temperature: float) -> np.ndarray:
    share = counts.sum(0) / counts.sum()
    weights = np.exp((1 - share) / temperature) * (counts.sum(0) > 0)
    return weights / weights.sum()


# ----------------------------------------------------------------------------- frames
@pytest.mark.parametrize("temperature", [0.05, 0.5, 2.0])
def test_class_probabilities_follow_the_formula(temperature):
    p = class_probabilities(COUNTS, temperature=temperature)
    np.testing.assert_allclose(p, formula(COUNTS, temperature), rtol=1e-12)
    assert p[4] == 0 and p[0] < p[1:4].min() and np.isclose(p.sum(), 1)
    assert p[2] == p[3] > p[1]  # rarer classes are drawn more


def test_tiny_temperature_does_not_overflow():
    p = class_probabilities(COUNTS, temperature=1e-4)
    assert np.isfinite(p).all() and np.isclose(p.sum(), 1) and p[4] == 0
    np.testing.assert_allclose(p[[2, 3]], [0.5, 0.5])  # all mass on the rarest classes


def test_rare_frames_draw_classes_by_the_formula_and_frames_holding_them():
    temperature = 0.5
    draw = ClassDraw(COUNTS, temperature=temperature, rare_frames=True, crop_share=1.0)
    keys = take(InfiniteSampler(len(COUNTS), batch_size=4, seed=3, class_draw=draw), 12000)
    classes = np.array([k[3] for k in keys])  # crop_share 1: the key carries the drawn class
    frames = np.array([k[0] for k in keys])
    assert (COUNTS[frames, classes] > 0).all()  # a frame drawn for class c contains c
    expected = formula(COUNTS, temperature)
    observed = np.bincount(classes, minlength=5)
    assert observed[4] == 0
    assert stats.chisquare(observed[:4], expected[:4] * len(keys)).pvalue > 1e-3
    # within a class, its frames come uniformly
    holding = np.flatnonzero(COUNTS[:, 1])
    per_frame = np.bincount(frames[classes == 1], minlength=6)[holding]
    assert stats.chisquare(per_frame).pvalue > 1e-3


def test_uniform_frames_with_rare_crops_keep_the_epoch_stream():
    draw = ClassDraw(COUNTS, temperature=0.5, rare_frames=False, crop_share=0.3)
    plain = take(InfiniteSampler(len(COUNTS), batch_size=3, seed=2), 6000)
    keys = take(InfiniteSampler(len(COUNTS), batch_size=3, seed=2, class_draw=draw), 6000)
    assert [k[:3] for k in keys] == plain  # frames, seeds and positions as without the draw
    crops = [(k[0], k[3]) for k in keys if k[3] >= 0]
    assert all(COUNTS[f, c] > 0 for f, c in crops)  # the crop class is one the frame holds
    assert abs(len(crops) / len(keys) - 0.3) < 0.03


def test_class_draw_rejects_bad_arguments():
    with pytest.raises(ValueError, match="crop_share"):
        ClassDraw(COUNTS, temperature=0.5, rare_frames=True, crop_share=1.5)
    with pytest.raises(ValueError, match="temperature"):
        class_probabilities(COUNTS, temperature=0.0)
    with pytest.raises(PipelineError, match="no labelled pixel"):
        class_probabilities(np.zeros((3, 4), dtype=np.int64), temperature=1.0)
    draw = ClassDraw(COUNTS, temperature=0.5, rare_frames=True, crop_share=0.0)
    with pytest.raises(ValueError, match="6 frames"):
        InfiniteSampler(5, batch_size=2, seed=0, class_draw=draw)


# ----------------------------------------------------------------------------- resume
@pytest.mark.parametrize("rare_frames", [True, False])
def test_class_aware_stream_resumes_and_splits_across_ranks(rare_frames):
    draw = ClassDraw(COUNTS, temperature=0.5, rare_frames=rare_frames, crop_share=0.5)
    full = take(InfiniteSampler(6, batch_size=3, seed=4, class_draw=draw), 3 * 20)
    assert full == take(InfiniteSampler(6, batch_size=3, seed=4, class_draw=draw), 3 * 20)
    assert full != take(InfiniteSampler(6, batch_size=3, seed=5, class_draw=draw), 3 * 20)
    for k in (1, 7, 13):
        resumed = take(InfiniteSampler(6, batch_size=3, seed=4, start_iter=k, class_draw=draw),
                       3 * (20 - k))
        assert resumed == full[3 * k:]
    ranks = [take(InfiniteSampler(6, batch_size=1, seed=4, rank=r, world_size=3, class_draw=draw),
                  20) for r in range(3)]
    assert [ranks[r][i] for i in range(20) for r in range(3)] == full


# ----------------------------------------------------------------------------- crops
def planted_mask(size=(H, W)) -> np.ndarray:
    """Raw mask of class 1 with a 4x4 block of class RARE in the bottom-right corner."""
    raw = np.ones(size, dtype=np.uint8)
    raw[-5:-1, -5:-1] = RARE
    return raw


@pytest.fixture
def planted(tmp_path):
    return [write_frame(tmp_path, 0, raw=planted_mask())]


def test_class_window_holds_a_pixel_of_the_class():
    mask = np.zeros((40, 60), dtype=np.uint8)
    mask[3, 57], mask[30:33, 2:4] = 5, 5
    for seed in range(300):
        rng = np.random.default_rng(seed)
        x0, y0, x1, y1 = class_window(mask, 5, crop_hw=(16, 24), rng=rng)
        assert 0 <= x0 and x1 <= 60 and 0 <= y0 and y1 <= 40 and (y1 - y0, x1 - x0) == (16, 24)
        assert (mask[y0:y1, x0:x1] == 5).any()
    assert class_window(mask, 9, crop_hw=(16, 24), rng=np.random.default_rng(0)) is None


@pytest.mark.parametrize("crop", [(16, 16), (40, 56), (40, 16)], ids=lambda c: f"{c[0]}x{c[1]}")
def test_rare_crop_contains_its_class(planted, crop):
    """With scale, flip and photometric jitter, also when the crop is larger than the frame
    (padded) in one or both sides."""
    ds = SegmentationDataset(planted, classes=camvid_like_classes(),
                             transform=train_transform(crop_hw=crop, scale_range=(0.5, 2.0)))
    for position in range(120):
        item = ds[(0, 1, position, RARE)]
        assert item["mask"].shape == crop
        assert (item["mask"] == RARE).any(), position


def test_uniform_crops_often_miss_the_planted_class(planted):
    ds = SegmentationDataset(planted, classes=camvid_like_classes(),
                             transform=train_transform(crop_hw=(12, 12), scale_range=(0.5, 2.0)))
    uniform = np.mean([(ds[(0, 1, p)]["mask"] == RARE).any().item() for p in range(200)])
    assert uniform < 0.5  # the planted block is small: the crop test above is not trivial


def reference_transform(crop_hw) -> A.Compose:
    """train_transform as it was before class-aware crops: albumentations' own RandomCrop."""
    real = train_transform(crop_hw=crop_hw, scale_range=(0.5, 2.0))
    steps = [A.RandomCrop(height=t.height, width=t.width) if isinstance(t, ClassCrop) else t
             for t in real.transforms]
    return A.Compose(steps, mask_interpolation=cv2.INTER_NEAREST)


@pytest.mark.parametrize("crop", [(16, 16), (40, 56)], ids=lambda c: f"{c[0]}x{c[1]}")
def test_uniform_crop_is_randomcrop_draw_for_draw(crop):
    """Without a class, or with one the frame lacks, ClassCrop takes RandomCrop's draws and
    window, so default runs augment exactly as before."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(H, W, 3), dtype=np.uint8)
    mask = planted_mask()
    ours, reference = train_transform(crop_hw=crop, scale_range=(0.5, 2.0)), reference_transform(crop)
    for position in range(40):
        ours.set_random_state(*sample_generators(3, position))
        reference.set_random_state(*sample_generators(3, position))
        want = reference(image=image, mask=mask)
        extra = {"crop_class": 9} if position % 2 else {}  # class 9: not in the mask
        got = ours(image=image, mask=mask, **extra)
        np.testing.assert_array_equal(got["image"], want["image"])
        np.testing.assert_array_equal(got["mask"], want["mask"])


def test_key_without_crop_class_is_the_plain_key(planted):
    ds = SegmentationDataset(planted, classes=camvid_like_classes(),
                             transform=train_transform(crop_hw=(16, 16)))
    a, b = ds[(0, 5, 11)], ds[(0, 5, 11, -1)]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])


# ----------------------------------------------------------------------------- defaults
def test_uniform_stream_is_pinned():
    """The default stream, as the code before class-aware sampling drew it (seed 1)."""
    keys = take(InfiniteSampler(7, batch_size=3, seed=1), 14)
    assert [k[0] for k in keys] == PINNED_SEED1
    assert all(len(k) == 3 for k in keys) and [k[2] for k in keys] == list(range(14))


PINNED_SEED1 = [5, 0, 1, 4, 2, 6, 3, 2, 5, 4, 6, 0, 1, 3]  # printed by the code before this change


def test_loader_with_rare_sampling_is_deterministic_and_resumes(tmp_path):
    frames = [write_frame(tmp_path, i, raw=planted_mask() if i == 2 else None) for i in range(5)]
    ds = SegmentationDataset(frames, classes=camvid_like_classes(),
                             transform=train_transform(crop_hw=(16, 16)))
    counts = np.stack([np.bincount(ds.lut[read_raw_mask(f.mask)].ravel(), minlength=256)[:11]
                       for f in frames])
    draw = ClassDraw(counts, temperature=0.1, rare_frames=True, crop_share=0.5)

    def batches(start, n, workers=0):
        it = iter(build_loader(ds, batch_size=3, num_workers=workers, seed=8, start_iter=start,
                               pin_memory=False, class_draw=draw))
        return [next(it) for _ in range(n)]

    full = batches(0, 5)
    for a, b in zip(batches(2, 3, workers=2), full[2:]):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
        assert torch.equal(a["index"], b["index"])


# ----------------------------------------------------------------------------- params
@pytest.mark.parametrize("sampling, message", [
    ({"frames": "rar"}, "models.x.sampling.frames: unknown sampling mode 'rar'; valid: rare, uniform"),
    ({"crops": "centre"}, "models.x.sampling.crops: unknown sampling mode 'centre'; valid: rare, uniform"),
    ({"temperature": 0}, "models.x.sampling.temperature must be > 0"),
    ({"crop_share": 1.5}, r"models.x.sampling.crop_share must be in \[0, 1\]"),
    ({"share": 0.5}, "unknown key 'models.x.sampling.share'; valid keys of 'models.x.sampling': "
                     "crop_share, crops, frames, temperature"),
])
def test_bad_sampling_params_name_the_key(sampling, message):
    with pytest.raises(PipelineError, match=message):
        parse_model_params("x", {"sampling": sampling})


def test_sampling_defaults_are_uniform_and_stored_with_the_run():
    cfg = parse_model_params("x", {})
    assert cfg.sampling.uniform and cfg.to_dict()["sampling"] == {
        "frames": "uniform", "temperature": 0.01, "crops": "uniform", "crop_share": 0.5}
    rare = parse_model_params("x", {"sampling": {"crops": "rare", "crop_share": 0.25}})
    assert not rare.sampling.uniform and rare.sampling.rare_crop_share == 0.25
    assert not rare.sampling.rare_frames
