"""Folds grouped by video: coverage, balance, stratification, determinism, errors, file IO, CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.core.errors import PipelineError
from pipeline.core.names import ALL_FOLDS
from pipeline.data.manifest import Frame, write_class_counts, write_manifest
from pipeline.data.splits import (FOLDS_COLUMNS, assign_folds, fold_ids, make_folds, read_folds,
                                  summarize_folds, train_val_ids, write_folds)

from conftest import REPO  # the repository root, defined once


# ----------------------------------------------------------------------------- helpers
def expand(sizes, present, names=None):
    """Per-frame (videos [N], presence [N, C]) from per-video sizes and presence; a class is
    marked in the first frame of a video only (one pixel in one frame is enough)."""
    names = names or [f"vid{i:03d}" for i in range(len(sizes))]
    videos = np.repeat(names, sizes)
    first = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    frames = np.zeros((int(np.sum(sizes)), np.shape(present)[1]), dtype=np.int64)
    frames[first] = np.asarray(present, dtype=np.int64)
    return videos, frames


def video_folds(videos, folds):
    """video -> set of folds its frames landed in."""
    out: dict[str, set[int]] = {}
    for v, f in zip(videos, folds):
        out.setdefault(str(v), set()).add(int(f))
    return out


def check_valid(videos, folds, n_folds):
    folds = np.asarray(folds)
    assert folds.shape == (len(videos),)
    assert set(folds.tolist()) == set(range(n_folds))  # every fold used, no other label
    assert all(len(fs) == 1 for fs in video_folds(videos, folds).values())  # videos whole


def missing_classes(videos, presence, folds, n_folds):
    return sum(r.missing for r in summarize_folds(folds=folds, videos=videos, presence=presence,
                                                  n_folds=n_folds))


def random_set(seed, n_videos=40, n_classes=6, lo=10, hi=120):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(lo, hi, n_videos)
    present = rng.random((n_videos, n_classes)) < rng.uniform(0.15, 0.6, n_classes)
    return sizes, present


def write_dataset(root: Path, videos: dict[str, tuple[int, set[int]]], *, num_classes=4,
                  test_videos=("testvid",)) -> Path:
    """manifest.csv + class_counts.npz under ``root``; returns the manifest path."""
    frames, counts = [], []
    test = [(v, (3, set())) for v in test_videos]
    for split, items in (("train", videos.items()), ("test", test)):
        for video, (n, classes) in items:
            for i in range(n):
                fid = f"{video}_{i:03d}"
                mask = str(root / "ann" / f"{fid}.png") if split == "train" else None
                frames.append(Frame(id=fid, image=str(root / "img" / f"{fid}.png"), mask=mask,
                                    video=video, frame=i, split=split, height=4, width=4))
                row = np.zeros(num_classes, dtype=np.int64)
                row[0] = 16
                for c in classes:
                    row[c] = 1 if i == 0 else 0
                counts.append(row)
    write_manifest(root / "manifest.csv", frames)
    write_class_counts(root / "class_counts.npz", [f.id for f in frames], np.stack(counts))
    return root / "manifest.csv"


def run_cli(*args, cwd=REPO, env=None):
    return subprocess.run([sys.executable, str(REPO / "pipeline" / "folds.py"), *map(str, args)],
                          cwd=cwd, capture_output=True, text=True, env=env)


def params_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


# ----------------------------------------------------------------------------- library
def test_every_frame_once_and_videos_whole():
    sizes, present = random_set(0)
    videos, presence = expand(sizes, present)
    folds = assign_folds(videos, presence, n_folds=5, seed=0)
    check_valid(videos, folds, 5)
    assert np.bincount(folds).sum() == len(videos)


@pytest.mark.parametrize("seed", range(5))
def test_frame_counts_balanced_on_40_random_videos(seed):
    sizes, present = random_set(100 + seed)
    videos, presence = expand(sizes, present)
    folds = assign_folds(videos, presence, n_folds=5, seed=seed)
    frames = np.bincount(folds, minlength=5)
    assert frames.max() / frames.min() <= 1.05, frames
    assert missing_classes(videos, presence, folds, 5) == 0


def naive_largest_first(sizes, n_folds):
    """Largest video first into the lightest fold, ignoring classes (the baseline)."""
    load, fold = np.zeros(n_folds, dtype=int), np.zeros(len(sizes), dtype=int)
    for v in np.argsort(-np.asarray(sizes), kind="stable"):
        fold[v] = int(np.argmin(load))
        load[fold[v]] += sizes[v]
    return fold


def test_stratification_where_largest_first_fails():
    # Class 1 lives in three videos (40, 10, 10 frames); three big class-free videos fill the
    # folds so that largest-first puts both 10-frame videos into the same fold.
    sizes = [100, 60, 50, 40, 10, 10]
    present = [[1, 0], [1, 0], [1, 0], [1, 1], [1, 1], [1, 1]]
    videos, presence = expand(sizes, present)
    naive = naive_largest_first(sizes, 3)[np.repeat(np.arange(6), sizes)]
    assert missing_classes(videos, presence, naive, 3) > 0  # the baseline really fails here
    folds = assign_folds(videos, presence, n_folds=3, seed=0)
    check_valid(videos, folds, 3)
    assert missing_classes(videos, presence, folds, 3) == 0
    assert len(set(folds[presence[:, 1] > 0].tolist())) == 3


def test_rare_classes_spread_over_distinct_folds():
    # Class 1 in two videos and class 2 in three (< 5 folds): each video in a fold of its own.
    sizes = [30, 30, 30, 30, 30, 5, 5, 5, 5, 5]
    present = [[1, 0, 0]] * 5 + [[1, 1, 0], [1, 1, 0], [1, 0, 1], [1, 0, 1], [1, 0, 1]]
    videos, presence = expand(sizes, present)
    folds = assign_folds(videos, presence, n_folds=5, seed=3)
    check_valid(videos, folds, 5)
    for c, n in ((1, 2), (2, 3)):
        assert len(set(folds[presence[:, c] > 0].tolist())) == n


def test_stable_across_runs_and_input_order():
    sizes, present = random_set(7)
    videos, presence = expand(sizes, present)
    first = assign_folds(videos, presence, n_folds=4, seed=11)
    assert np.array_equal(first, assign_folds(videos, presence, n_folds=4, seed=11))
    perm = np.random.default_rng(0).permutation(len(videos))
    shuffled = assign_folds(videos[perm], presence[perm], n_folds=4, seed=11)
    assert np.array_equal(shuffled, first[perm])
    # pixel counts and booleans of the same presence give the same split
    assert np.array_equal(first, assign_folds(videos, presence > 0, n_folds=4, seed=11))


def planted(seed):
    """A random set with a hidden stratified split: each class in >= 1 video of every fold."""
    rng = np.random.default_rng(seed)
    k = int(rng.integers(2, 6))
    n_videos = int(rng.integers(3 * k, 12 * k))
    hidden = np.concatenate([np.arange(k), rng.integers(0, k, n_videos - k)])
    present = rng.random((n_videos, int(rng.integers(1, 10)))) < 0.15
    for c in range(present.shape[1]):
        for f in range(k):
            present[rng.choice(np.flatnonzero(hidden == f)), c] = True
    return k, rng.integers(1, 60, n_videos), present


@pytest.mark.parametrize("seed", range(25))
def test_property_random_sets(seed):
    k, sizes, present = planted(seed)
    videos, presence = expand(sizes, present)
    folds = assign_folds(videos, presence, n_folds=k, seed=seed)
    check_valid(videos, folds, k)
    assert missing_classes(videos, presence, folds, k) == 0
    # Without classes no move is blocked, so the local optimum is within one video of level.
    plain = assign_folds(videos, presence[:, :0], n_folds=k, seed=seed)
    check_valid(videos, plain, k)
    frames = np.bincount(plain, minlength=k)
    assert frames.max() - frames.min() <= max(sizes)


def test_library_errors():
    videos, presence = expand([5, 5, 5], [[1], [1], [1]])
    with pytest.raises(PipelineError, match="n_folds must be at least 2"):
        assign_folds(videos, presence, n_folds=1, seed=0)
    with pytest.raises(PipelineError, match="at least 4 videos .* has 3"):
        assign_folds(videos, presence, n_folds=4, seed=0)
    with pytest.raises(PipelineError, match="empty"):
        assign_folds([], np.zeros((0, 2)), n_folds=2, seed=0)


# ----------------------------------------------------------------------------- folds file
def test_read_folds_and_train_val_ids(tmp_path):
    path = tmp_path / "folds.csv"
    ids, videos, folds = ["b1", "a1", "a2", "c1"], ["b", "a", "a", "c"], [1, 0, 0, 2]
    write_folds(path, ids=ids, videos=videos, folds=folds)
    lines = path.read_text().splitlines()
    assert lines[0] == ",".join(FOLDS_COLUMNS)
    assert [row.split(",")[0] for row in lines[1:]] == sorted(ids)
    assert read_folds(path) == dict(zip(ids, folds))
    assert train_val_ids(path, 0) == (["b1", "c1"], ["a1", "a2"])
    assert train_val_ids(path, "2") == (["a1", "a2", "b1"], ["c1"])
    assert train_val_ids(path, ALL_FOLDS) == (sorted(ids), [])
    assert fold_ids(path, 1) == ["b1"]
    with pytest.raises(PipelineError, match="fold 3 is not one of 0..2"):
        train_val_ids(path, 3)


@pytest.mark.parametrize("text, match", [
    ("id,fold\na,0\n", "expected columns"),
    ("id,video,fold\na,v,x\n", "line 2: corrupt row"),
    ("id,video,fold\na,v,0\na,v,0\n", "appears twice"),
    ("id,video,fold\na,v,0\nb,v,1\n", "video 'v' is in folds 0 and 1"),
    ("id,video,fold\na,v,0\nb,w,2\n", "not numbered"),
    ("id,video,fold\n", "no rows"),
])
def test_read_folds_rejects_corrupt_files(tmp_path, text, match):
    path = tmp_path / "folds.csv"
    path.write_text(text)
    with pytest.raises(PipelineError, match=match):
        read_folds(path)


def test_read_folds_missing_file(tmp_path):
    with pytest.raises(PipelineError, match="folds file not found"):
        read_folds(tmp_path / "nope.csv")


# ----------------------------------------------------------------------------- stage / CLI
SIX_VIDEOS = {"v1": (12, {1}), "v2": (9, {1, 2}), "v3": (7, {2}), "v4": (10, {1, 3}),
              "v5": (4, {2, 3}), "v6": (6, {3})}


def test_make_folds_writes_train_frames_only(tmp_path):
    manifest = write_dataset(tmp_path, SIX_VIDEOS)
    out = tmp_path / "folds" / "folds.csv"
    summary = make_folds(manifest=manifest, counts=tmp_path / "class_counts.npz", out=out,
                         n_folds=3, seed=0)
    folds = read_folds(out)
    assert sorted(folds) == sorted(f"{v}_{i:03d}" for v, (n, _) in SIX_VIDEOS.items()
                                   for i in range(n))
    assert [r.frames for r in summary] == np.bincount(list(folds.values())).tolist()
    assert all(r.missing == 0 and r.classes == 4 for r in summary)  # classes 1-3 in 3 videos


def test_cli_writes_and_is_stable_across_hash_seeds(tmp_path):
    manifest = write_dataset(tmp_path, SIX_VIDEOS)
    params = params_file(tmp_path, "folds:\n  n_folds: 3\n  seed: 5\n")
    outputs = []
    for hash_seed in ("1", "2"):
        out = tmp_path / f"out{hash_seed}" / "folds.csv"
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        result = run_cli("--manifest", manifest, "--out", out, "--params", params, env=env)
        assert result.returncode == 0, result.stderr
        assert "fold" in result.stdout and "frames" in result.stdout
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1]
    assert len(set(read_folds(out).values())) == 3


@pytest.mark.parametrize("case, match", [
    ("few_videos", "needs at least 7 videos but the train split has 6"),
    ("one_fold", "n_folds must be at least 2"),
    ("empty_train", "'train' split is empty"),
    ("missing_counts", "no class counts for 9 train frame"),
    ("typo", "unknown key 'folds.nfolds'"),
])
def test_cli_errors_exit_2_one_line_no_output(tmp_path, case, match):
    videos = {} if case == "empty_train" else SIX_VIDEOS
    manifest = write_dataset(tmp_path, videos)
    n_folds = {"few_videos": 7, "one_fold": 1}.get(case, 3)
    key = "nfolds" if case == "typo" else "n_folds"
    params = params_file(tmp_path, f"folds:\n  {key}: {n_folds}\n")
    if case == "missing_counts":  # counts of every frame but video v2's
        ids = [f"{v}_{i:03d}" for v, (n, _) in SIX_VIDEOS.items() if v != "v2" for i in range(n)]
        write_class_counts(tmp_path / "class_counts.npz", ids, np.ones((len(ids), 4)))
    out = tmp_path / "folds" / "folds.csv"
    result = run_cli("--manifest", manifest, "--out", out, "--params", params)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], result.stderr
    assert not out.exists() and not list(tmp_path.glob("folds/*"))


@pytest.mark.camvid
def test_camvid_three_videos_one_per_fold(tmp_path, camvid_root):
    frames = []
    for sub in ("train", "val"):
        for path in sorted((camvid_root / sub).glob("*.png")):
            frames.append(Frame(id=path.stem, image=str(path),
                                mask=str(camvid_root / f"{sub}annot" / path.name),
                                video=path.stem.split("_")[0], frame=0, split="train"))
    write_manifest(tmp_path / "manifest.csv", frames)
    write_class_counts(tmp_path / "class_counts.npz", [f.id for f in frames],
                       np.ones((len(frames), 11), dtype=np.int64))
    out = tmp_path / "folds.csv"
    make_folds(manifest=tmp_path / "manifest.csv", counts=tmp_path / "class_counts.npz", out=out,
               n_folds=3, seed=0)
    folds = read_folds(out)
    video_of = {f.id: f.video for f in frames}
    per_fold = [{video_of[i] for i in fold_ids(out, k)} for k in range(3)]
    assert sorted(len(v) for v in per_fold) == [1, 1, 1]
    assert set().union(*per_fold) == {f.video for f in frames} and len(folds) == len(frames)
