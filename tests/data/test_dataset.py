"""Dataset items, the resumable sampler and the determinism of the training loader."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.core.errors import PipelineError
from pipeline.data.dataset import (InfiniteSampler, SegmentationDataset, build_eval_loader, build_loader,
                                   epoch_permutation)
from pipeline.data.manifest import ClassInfo, Frame, identity_lut
from pipeline.data.transforms import eval_transform, train_transform

H, W = 24, 32


def camvid_like_classes() -> ClassInfo:
    """11 classes; raw 11 (CamVid 'void') and 255 map to void, anything else above 10 is invalid."""
    return ClassInfo(names=[f"c{i}" for i in range(11)], palette=[[i, i, i] for i in range(11)],
                     mask_lut=identity_lut(11, void_values=(11, 255)).tolist())


def write_frame(root, i: int, *, raw: np.ndarray | None = None, size=(H, W)) -> Frame:
    rng = np.random.default_rng(i)
    h, w = size
    image_path = root / f"img{i}.png"
    Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)).save(image_path)
    if raw is None:
        raw = rng.integers(0, 12, size=(h, w), dtype=np.uint8)
    mask_path = root / f"mask{i}.png"
    Image.fromarray(raw, mode="L").save(mask_path)
    return Frame(id=f"f{i}", image=str(image_path), mask=str(mask_path), video="v", frame=i,
                 split="train", height=h, width=w)


@pytest.fixture
def frames(tmp_path):
    return [write_frame(tmp_path, i) for i in range(7)]


def train_dataset(frames) -> SegmentationDataset:
    return SegmentationDataset(frames, classes=camvid_like_classes(),
                               transform=train_transform(crop_hw=(16, 16), scale_range=(0.5, 2.0)))


# ----------------------------------------------------------------------------- dataset
def test_item_types_shapes_and_lut(tmp_path):
    raw = np.zeros((H, W), dtype=np.uint8)
    raw[:, :8], raw[:, 8:16], raw[:, 16:24], raw[:, 24:] = 3, 11, 255, 20  # 20 is INVALID in the LUT
    frame = write_frame(tmp_path, 0, raw=raw)
    ds = SegmentationDataset([frame], classes=camvid_like_classes(), transform=eval_transform())
    item = ds[0]
    assert item["image"].dtype == torch.float32 and item["image"].shape == (3, H, W)
    assert item["mask"].dtype == torch.int64 and item["mask"].shape == (H, W)
    assert item["index"] == 0 and item["id"] == "f0"
    assert (item["mask"][:, :8] == 3).all()
    assert (item["mask"][:, 8:] == 255).all()  # raw 11 and 255 are void; invalid 20 defensively void
    # channel-first normalised image of the file's pixels
    pixels = np.asarray(Image.open(frame.image), dtype=np.float32) / 255.0
    expected = (pixels - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(item["image"].permute(1, 2, 0).numpy(), expected, atol=1e-5)


def test_without_mask_and_unlabelled_frames(tmp_path, frames):
    unlabelled = Frame(id="t0", image=frames[0].image, mask=None, video="v", frame=0, split="test")
    with pytest.raises(PipelineError, match="'t0' has no mask"):
        SegmentationDataset([unlabelled], classes=camvid_like_classes(), transform=eval_transform())
    ds = SegmentationDataset([unlabelled], classes=camvid_like_classes(), transform=eval_transform(),
                             with_mask=False)
    item = ds[0]
    assert "mask" not in item and item["image"].shape == (3, H, W)


def test_read_errors_name_the_file(tmp_path, frames):
    missing = Frame(id="x", image=str(tmp_path / "nope.png"), mask=frames[0].mask, video="v", frame=0,
                    split="train")
    ds = SegmentationDataset([missing], classes=camvid_like_classes(), transform=eval_transform())
    with pytest.raises(PipelineError, match="nope.png"):
        ds[0]
    other = write_frame(tmp_path, 50, size=(10, 10))
    mismatched = Frame(id="y", image=frames[0].image, mask=other.mask, video="v", frame=0, split="train")
    ds = SegmentationDataset([mismatched], classes=camvid_like_classes(), transform=eval_transform())
    with pytest.raises(PipelineError, match="mask50.png.*differs"):
        ds[0]


def test_sample_key_fixes_the_augmentation(frames):
    ds = train_dataset(frames)
    a, b, c = ds[(2, 5, 40)], ds[(2, 5, 40)], ds[(2, 5, 41)]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
    assert not torch.equal(a["image"], c["image"])
    assert a["image"].shape == (3, 16, 16) and a["mask"].shape == (16, 16)


# ----------------------------------------------------------------------------- sampler
def take(sampler, n):
    return list(itertools.islice(iter(sampler), n))


def test_sampler_is_deterministic_and_seeded():
    a = take(InfiniteSampler(7, batch_size=3, seed=1), 60)
    assert a == take(InfiniteSampler(7, batch_size=3, seed=1), 60)
    assert [k[0] for k in a] != [k[0] for k in take(InfiniteSampler(7, batch_size=3, seed=2), 60)]


def test_sampler_is_endless_and_covers_each_epoch():
    keys = take(InfiniteSampler(7, batch_size=3, seed=0), 7 * 6)
    assert [k[2] for k in keys] == list(range(42))  # consecutive global positions
    assert all(k[1] == 0 for k in keys)
    epochs = [[k[0] for k in keys[e * 7:(e + 1) * 7]] for e in range(6)]
    for e, order in enumerate(epochs):
        assert sorted(order) == list(range(7))
        assert order == epoch_permutation(7, seed=0, epoch=e).tolist()
    assert len({tuple(o) for o in epochs}) > 1  # reshuffled between epochs
    unshuffled = take(InfiniteSampler(4, batch_size=3, seed=0, shuffle=False), 10)
    assert [k[0] for k in unshuffled] == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]


def test_sampler_resume_equals_tail_of_uninterrupted_stream():
    full = take(InfiniteSampler(7, batch_size=3, seed=4), 3 * 20)
    for k in (1, 5, 9):
        resumed = take(InfiniteSampler(7, batch_size=3, seed=4, start_iter=k), 3 * (20 - k))
        assert resumed == full[3 * k:]


def test_sampler_ranks_split_the_global_batch():
    batch, world, iters = 2, 3, 8
    single = take(InfiniteSampler(7, batch_size=batch * world, seed=3, start_iter=2), batch * world * iters)
    ranks = [take(InfiniteSampler(7, batch_size=batch, seed=3, start_iter=2, rank=r, world_size=world),
                  batch * iters) for r in range(world)]
    for i in range(iters):
        parts = [ranks[r][i * batch:(i + 1) * batch] for r in range(world)]
        positions = [set(k[2] for k in p) for p in parts]
        assert all(not (positions[a] & positions[b]) for a in range(world) for b in range(a + 1, world))
        assert sum(parts, []) == single[i * batch * world:(i + 1) * batch * world]


def test_sampler_rejects_empty_dataset_and_bad_rank():
    with pytest.raises(PipelineError, match="empty"):
        InfiniteSampler(0, batch_size=2, seed=0)
    with pytest.raises(ValueError):
        InfiniteSampler(5, batch_size=2, seed=0, rank=2, world_size=2)


# ----------------------------------------------------------------------------- loaders
def batches(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def assert_same(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["mask"], y["mask"])
        assert torch.equal(x["index"], y["index"]) and x["id"] == y["id"]


def test_loader_same_seed_same_batches_and_resume(frames):
    ds = train_dataset(frames)
    full = batches(build_loader(ds, batch_size=3, num_workers=0, seed=11, pin_memory=False), 6)
    assert full[0]["image"].shape == (3, 3, 16, 16) and full[0]["mask"].dtype == torch.int64
    assert_same(full, batches(build_loader(ds, batch_size=3, num_workers=0, seed=11, pin_memory=False), 6))
    resumed = batches(build_loader(ds, batch_size=3, num_workers=0, seed=11, start_iter=4,
                                   pin_memory=False), 2)
    assert_same(resumed, full[4:])
    other = batches(build_loader(ds, batch_size=3, num_workers=0, seed=12, pin_memory=False), 1)
    assert not torch.equal(other[0]["image"], full[0]["image"])


def test_loader_ranks_reproduce_the_single_process_batch(frames):
    ds = train_dataset(frames)
    single = batches(build_loader(ds, batch_size=4, num_workers=0, seed=5, pin_memory=False), 3)
    ranks = [batches(build_loader(ds, batch_size=2, num_workers=0, seed=5, rank=r, world_size=2,
                                  pin_memory=False), 3) for r in range(2)]
    for i in range(3):
        assert torch.equal(torch.cat([ranks[0][i]["image"], ranks[1][i]["image"]]), single[i]["image"])
        assert torch.equal(torch.cat([ranks[0][i]["mask"], ranks[1][i]["mask"]]), single[i]["mask"])


def test_loader_with_workers_matches_single_process(frames):
    ds = train_dataset(frames)
    reference = batches(build_loader(ds, batch_size=2, num_workers=0, seed=9, pin_memory=False), 5)
    workers = batches(build_loader(ds, batch_size=2, num_workers=2, seed=9, pin_memory=False), 5)
    assert_same(workers, reference)
    resumed = batches(build_loader(ds, batch_size=2, num_workers=2, seed=9, start_iter=3,
                                   pin_memory=False), 2)
    assert_same(resumed, reference[3:])


def test_eval_loader_is_sequential_with_variable_sizes(tmp_path):
    frames = [write_frame(tmp_path, i, size=(H + 4 * i, W - 2 * i)) for i in range(3)]
    ds = SegmentationDataset(frames, classes=camvid_like_classes(), transform=eval_transform())
    items = list(build_eval_loader(ds, pin_memory=False))
    assert [b["id"] for b in items] == [["f0"], ["f1"], ["f2"]]
    assert [tuple(b["image"].shape) for b in items] == [(1, 3, H + 4 * i, W - 2 * i) for i in range(3)]
