"""The synthetic demo: deterministic, video-like, long-tailed, void present, not separable by colour."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from pipeline.core.errors import PipelineError
from pipeline.data.demo import generate_demo
from pipeline.data.manifest import IGNORE_INDEX, read_image, read_mask, read_raw_mask

SMALL = dict(seed=3, videos=4, test_videos=1, min_frames=3, max_frames=5, height=48, width=64)


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _rows(frames, root: Path) -> list[tuple]:
    return [(f.id, Path(f.image).relative_to(root).as_posix(), Path(f.mask).relative_to(root).as_posix(),
             f.video, f.frame, f.split, f.height, f.width) for f in frames]


@pytest.fixture(scope="module")
def default_set(tmp_path_factory):
    """The default configuration, with its masks and images loaded once: (frames, classes, masks, images)."""
    root = tmp_path_factory.mktemp("demo_default")
    frames, classes = generate_demo(root)
    lut = classes.lut_array()
    masks = {f.id: read_mask(f.mask, lut) for f in frames}
    images = {f.id: read_image(f.image) for f in frames}
    return frames, classes, masks, images


def _train_shares(frames, masks, num_classes):
    """Pixel share of each class over labelled train pixels, and the train videos holding each class."""
    counts = np.zeros(num_classes, np.int64)
    videos = defaultdict(set)
    for f in frames:
        if f.split != "train":
            continue
        c = np.bincount(masks[f.id].ravel(), minlength=256)[:num_classes]
        counts += c
        for k in np.nonzero(c)[0]:
            videos[int(k)].add(f.video)
    return counts / counts.sum(), videos


def test_deterministic_and_independent_of_workers(tmp_path):
    runs = {}
    for name, workers in (("a", 1), ("b", 1), ("c", 2)):
        frames, classes = generate_demo(tmp_path / name, workers=workers, **SMALL)
        runs[name] = (_files(tmp_path / name), _rows(frames, tmp_path / name), classes)
    assert runs["a"][0] and runs["a"][0] == runs["b"][0] == runs["c"][0]
    assert runs["a"][1] == runs["b"][1] == runs["c"][1]
    assert runs["a"][2] == runs["c"][2]
    generate_demo(tmp_path / "d", **{**SMALL, "seed": SMALL["seed"] + 1})
    assert _files(tmp_path / "d") != runs["a"][0]


def test_frames_match_files_and_splits(tmp_path):
    frames, classes = generate_demo(tmp_path, **SMALL)
    assert len({f.id for f in frames}) == len(frames) and all("/" not in f.id for f in frames)
    by_video = defaultdict(list)
    for f in frames:
        by_video[f.video].append(f.frame)
        assert Path(f.image).is_file() and Path(f.image).is_relative_to(tmp_path)
        assert read_image(f.image).shape == (SMALL["height"], SMALL["width"], 3)
        raw = read_raw_mask(f.mask)
        assert raw.shape == (f.height, f.width) == (SMALL["height"], SMALL["width"])
        assert set(np.unique(raw).tolist()) <= set(range(classes.num_classes)) | {IGNORE_INDEX}
    videos = sorted(by_video)
    assert len(videos) == SMALL["videos"]
    for video, idx in by_video.items():
        assert idx == list(range(len(idx))) and SMALL["min_frames"] <= len(idx) <= SMALL["max_frames"]
    test = sorted({f.video for f in frames if f.split == "test"})
    assert test == videos[-SMALL["test_videos"]:]
    assert classes.dataset == "demo" and classes.ignore_index == IGNORE_INDEX and not classes.train_pixel_counts
    assert len(classes.names) == len(classes.palette) == classes.num_classes
    lut = classes.lut_array()
    assert lut[IGNORE_INDEX] == IGNORE_INDEX and (lut[:classes.num_classes] == np.arange(classes.num_classes)).all()


@pytest.mark.parametrize("bad", [dict(test_videos=4), dict(test_videos=-1), dict(min_frames=6),
                                 dict(height=8), dict(videos=0)])
def test_bad_arguments_raise(tmp_path, bad):
    with pytest.raises(PipelineError, match="demo dataset"):
        generate_demo(tmp_path, **{**SMALL, **bad})
    assert not any(tmp_path.iterdir())


def test_default_frame_counts_and_splits(default_set):
    frames, _, _, _ = default_set
    lengths = defaultdict(int)
    for f in frames:
        lengths[f.video] += 1
    assert len(lengths) == 30 and all(10 <= n <= 24 for n in lengths.values())
    assert sum(n > 16 for n in lengths.values()) >= 3
    train = {f.video for f in frames if f.split == "train"}
    test = {f.video for f in frames if f.split == "test"}
    assert len(train) == 24 and len(test) == 6 and not train & test


def test_default_classes_are_long_tailed(default_set):
    frames, classes, masks, _ = default_set
    shares, videos = _train_shares(frames, masks, classes.num_classes)
    assert classes.num_classes >= 8 and (shares > 0).all()
    assert shares.max() >= 0.30
    rarest = int(np.argmin(shares))
    assert shares[rarest] <= 0.01
    assert 2 <= len(videos[rarest]) <= 6  # and in a few videos only
    assert rarest in np.unique(np.concatenate([masks[f.id].ravel() for f in frames if f.split == "test"]))


def test_default_masks_have_void_and_valid_values(default_set):
    frames, classes, masks, _ = default_set
    values = np.unique(np.concatenate([m.ravel() for m in masks.values()]))
    assert set(values.tolist()) == set(range(classes.num_classes)) | {IGNORE_INDEX}
    void = np.mean([np.mean(m == IGNORE_INDEX) for m in masks.values()])
    assert 0.005 < void < 0.1
    assert sum((masks[f.id] == IGNORE_INDEX).any() for f in frames) > 0.9 * len(frames)


def test_default_motion_is_smooth(default_set):
    frames, _, masks, images = default_set
    by_video = defaultdict(list)
    for f in sorted(frames, key=lambda f: (f.video, f.frame)):
        by_video[f.video].append(f.id)

    def agreement(a, b):
        keep = (a != IGNORE_INDEX) & (b != IGNORE_INDEX)
        return float(np.mean(a[keep] == b[keep]))

    near = [agreement(masks[a], masks[b]) for ids in by_video.values() for a, b in zip(ids, ids[1:])]
    far = [agreement(masks[ids[0]], masks[ids[-1]]) for ids in by_video.values()]
    assert np.mean(near) > 0.95 and min(near) > 0.85
    assert np.mean(far) < np.mean(near) - 0.05
    # images too: consecutive frames are closer than the first and last of a video
    diff = [np.abs(images[ids[1]].astype(int) - images[ids[0]]).mean() for ids in by_video.values()]
    diff_far = [np.abs(images[ids[-1]].astype(int) - images[ids[0]]).mean() for ids in by_video.values()]
    assert np.mean(diff) < np.mean(diff_far)


def test_default_colour_alone_does_not_classify(default_set):
    frames, classes, masks, images = default_set
    train = [f for f in frames if f.split == "train"]
    labels = np.concatenate([masks[f.id].ravel() for f in train])
    pixels = np.concatenate([images[f.id].reshape(-1, 3) for f in train]).astype(np.float32)
    keep = labels != IGNORE_INDEX
    labels, pixels = labels[keep], pixels[keep]
    means = np.stack([pixels[labels == k].mean(0) for k in range(classes.num_classes)])
    distances = np.stack([((pixels - m) ** 2).sum(1) for m in means], axis=1)
    accuracy = np.mean(distances.argmin(1) == labels)
    assert accuracy < 0.6, f"nearest class-mean colour classifies {accuracy:.0%} of pixels"
