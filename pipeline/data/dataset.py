"""Segmentation dataset over manifest frames, and the resumable sampler and loaders for training.

Reproducibility is built on one definition, the *global sample stream*. For a dataset of ``n``
frames and a ``seed``:

- epoch ``e`` is the permutation ``epoch_permutation(n, seed=seed, epoch=e)`` (from a numpy
  generator seeded with ``(seed, 0, e)``; the identity when ``shuffle`` is off);
- the stream concatenates epochs 0, 1, 2, ...: position ``p`` holds frame
  ``perm_{p // n}[p % n]``;
- iteration ``i`` consumes the global batch of positions ``[i * G, (i + 1) * G)`` with
  ``G = batch_size * world_size``; rank ``r`` takes the slice
  ``[i * G + r * batch_size, i * G + (r + 1) * batch_size)``. Here ``batch_size`` is one
  rank's share: the training engine passes ``models.<name>.batch_size / world_size``, so ``G``
  is the configured batch whatever the number of DDP processes;
- the sample at position ``p`` is augmented with generators seeded from ``(seed, 1, p)``.

So a run started at ``start_iter = k`` (``k * G`` samples already consumed) sees exactly the
batches an uninterrupted run sees from iteration ``k`` on, pixel for pixel, whatever the number
of workers; and the union of the ranks' batches equals the single-process batch of size ``G``.

Class-aware sampling (``models.<name>.sampling``, a :class:`ClassDraw`) keeps that definition
and adds one generator per position, seeded with ``(seed, 2, p)``. With rare frames it replaces
the epoch permutation: it draws a class ``c`` with probability ``exp((1 - share_c) / T) / Z``
(DAFormer's rare class sampling; :func:`class_probabilities`), then uniformly a frame that
contains ``c``. With rare crops it decides whether the crop at ``p`` must hold a pixel of a class
(that class, or with uniform frames one drawn among the frame's classes by the same weights);
the key then carries the class as a fourth element and the train transform's
:class:`pipeline.data.transforms.ClassCrop` places the window. The stream is still a function of
(seed, position), so the iteration a checkpoint stores is the whole state a resumed sampler
needs, and the default (uniform) stream is the one above, draw for draw.
"""

from __future__ import annotations

import functools
import random
from typing import Callable, Iterator, Sequence

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from pipeline.core.errors import PipelineError
from pipeline.data.manifest import IGNORE_INDEX, INVALID, ClassInfo, Frame, read_image, read_raw_mask
from pipeline.data.transforms import CROP_CLASS

_SHUFFLE_STREAM = 0  # first words of the seed sequences, so no two draws ever share one
_AUGMENT_STREAM = 1
_CLASS_STREAM = 2

# (frame index, seed, global position) as yielded by InfiniteSampler; with a ClassDraw a fourth
# element, the class the crop must hold (-1: a uniform crop)
SampleKey = tuple[int, ...]


def epoch_permutation(size: int, *, seed: int, epoch: int) -> np.ndarray:
    """The order of frame indices in ``epoch`` of the stream: int64 [size]."""
    return np.random.default_rng([seed, _SHUFFLE_STREAM, epoch]).permutation(size)


def sample_generators(seed: int, position: int) -> tuple[np.random.Generator, random.Random]:
    """The numpy and python generators that augment the sample at global ``position``."""
    rng = np.random.default_rng([seed, _AUGMENT_STREAM, position])
    return rng, random.Random(int(rng.integers(2**63)))


def class_probabilities(counts: np.ndarray, *, temperature: float) -> np.ndarray:
    """DAFormer's rare class sampling: float64 [C], ``p_c = exp((1 - share_c) / T) / Z``.

    ``counts``: int [frames, C] pixels of each class in each (training) frame; ``share_c`` is
    class c's fraction of all their labelled pixels. A class no frame contains gets 0.
    """
    counts = np.asarray(counts, dtype=np.float64)
    if counts.ndim != 2:
        raise ValueError(f"counts must be [frames, classes], got shape {counts.shape}")
    present = (counts > 0).any(axis=0)
    if not present.any():
        raise PipelineError("class-aware sampling: the training frames have no labelled pixel")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    totals = counts.sum(axis=0)
    logits = np.where(present, (1.0 - totals / totals.sum()) / temperature, -np.inf)
    weights = np.exp(logits - logits.max())  # softmax, shifted so that no exp overflows
    return weights / weights.sum()


class ClassDraw:
    """The class-aware draws of one stream position (see the module doc).

    ``counts``: int [frames, C] class pixels per frame, in the dataset's frame order.
    ``rare_frames``: draw frames by class instead of the epoch permutation. ``crop_share``: the
    fraction of crops that must hold a pixel of their class (0: uniform crops).
    """

    def __init__(self, counts: np.ndarray, *, temperature: float, rare_frames: bool,
                 crop_share: float):
        if not 0.0 <= crop_share <= 1.0:
            raise ValueError(f"crop_share must be in [0, 1], got {crop_share}")
        self.probabilities = class_probabilities(counts, temperature=temperature)
        self.holds = np.asarray(counts) > 0                           # bool [frames, C]
        self.frames_of = [np.flatnonzero(col) for col in self.holds.T]  # frames holding class c
        self.size, self.rare_frames, self.crop_share = len(self.holds), rare_frames, crop_share

    def class_in(self, frame: int, rng: np.random.Generator) -> int:
        """A class of ``frame`` drawn by the rare-class weights (-1 when it holds none)."""
        weights = np.where(self.holds[frame], self.probabilities, 0.0)
        total = weights.sum()
        return int(rng.choice(len(weights), p=weights / total)) if total > 0 else -1

    def __call__(self, rng: np.random.Generator, frame: int | None) -> tuple[int, int]:
        """(frame index, crop class or -1) from ``rng``; ``frame`` is the epoch stream's frame,
        None (and unused) with rare frames."""
        cls = None
        if self.rare_frames:
            cls = int(rng.choice(len(self.probabilities), p=self.probabilities))
            members = self.frames_of[cls]
            frame = int(members[rng.integers(len(members))])
        if self.crop_share == 0.0 or rng.random() >= self.crop_share:
            return frame, -1
        return frame, self.class_in(frame, rng) if cls is None else cls


class SegmentationDataset(Dataset):
    """Frames of a manifest as dicts ``image`` float [3,H,W], ``mask`` int64 [H,W] (255 void),
    ``index`` int and ``id`` str (no ``mask`` when ``with_mask`` is False).

    ``transform`` is an albumentations pipeline (see :mod:`pipeline.data.transforms`) called as
    ``transform(image=HxWx3 uint8, mask=HxW uint8)``. Indexing with a :data:`SampleKey` from
    :class:`InfiniteSampler` reseeds the transform from (seed, position) first, so a sample's
    augmentation does not depend on which worker or in which order it was loaded; a plain int
    index uses the transform's own generators. A key's fourth element, a class (-1: none),
    goes to the transform as ``crop_class``: the crop then holds a pixel of that class.
    """

    def __init__(self, frames: Sequence[Frame], *, classes: ClassInfo, transform: Callable[..., dict],
                 with_mask: bool = True):
        self.frames = list(frames)
        self.transform = transform
        self.with_mask = with_mask
        lut = classes.lut_array().astype(np.int16)
        # prepare validated the raw values; an unexpected one becomes void rather than a crash
        lut[lut == INVALID] = IGNORE_INDEX
        self.lut = lut.astype(np.uint8)
        if with_mask:
            unlabelled = [f for f in self.frames if not f.mask]
            if unlabelled:
                raise PipelineError(f"{unlabelled[0].image}: frame '{unlabelled[0].id}' has no mask "
                                    f"({len(unlabelled)} unlabelled frame(s)); use with_mask=False")

    def __len__(self) -> int:
        return len(self.frames)

    def __getitem__(self, key: int | SampleKey) -> dict:
        crop_class = -1
        if isinstance(key, tuple):
            index, seed, position, *rest = key
            crop_class = int(rest[0]) if rest else -1
            if hasattr(self.transform, "set_random_state"):
                self.transform.set_random_state(*sample_generators(seed, position))
        else:
            index = key
        frame = self.frames[index]
        image = read_image(frame.image)
        data = {"image": image}
        if self.with_mask:
            raw = read_raw_mask(frame.mask)
            if raw.shape != image.shape[:2]:
                raise PipelineError(f"{frame.mask}: mask size {raw.shape} differs from image "
                                    f"{frame.image} size {image.shape[:2]}")
            data["mask"] = self.lut[raw]
            if crop_class >= 0:  # the train transform's ClassCrop centres the crop on it
                data[CROP_CLASS] = crop_class
        out = self.transform(**data)
        item = {"image": torch.from_numpy(np.ascontiguousarray(out["image"].transpose(2, 0, 1))).float(),
                "index": int(index), "id": frame.id}
        if self.with_mask:
            item["mask"] = torch.from_numpy(np.ascontiguousarray(out["mask"])).long()
        return item


class InfiniteSampler(Sampler):
    """Endless, seedable, resumable stream of :data:`SampleKey` for one rank (see module doc).

    Each ``iter()`` restarts at ``start_iter``; the rank yields ``batch_size`` keys per iteration,
    which a DataLoader with the same ``batch_size`` groups into that iteration's batch.
    ``class_draw`` (None: uniform frames and crops) makes the stream class-aware.
    """

    def __init__(self, size: int, *, batch_size: int, seed: int, start_iter: int = 0, rank: int = 0,
                 world_size: int = 1, shuffle: bool = True, class_draw: ClassDraw | None = None):
        if size <= 0:
            raise PipelineError("cannot sample batches from an empty dataset (no training frames)")
        if batch_size <= 0 or start_iter < 0 or seed < 0 or world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"bad sampler arguments: batch_size={batch_size} start_iter={start_iter} "
                             f"seed={seed} rank={rank} world_size={world_size}")
        if class_draw is not None and class_draw.size != size:
            raise ValueError(f"class_draw counts {class_draw.size} frames, the dataset {size}")
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.start_iter, self.rank, self.world_size, self.shuffle = start_iter, rank, world_size, shuffle
        self.class_draw = class_draw

    def positions(self, iteration: int) -> range:
        """Global stream positions this rank consumes at ``iteration``."""
        start = iteration * self.batch_size * self.world_size + self.rank * self.batch_size
        return range(start, start + self.batch_size)

    def _order(self, epoch: int) -> np.ndarray:
        if self.shuffle:
            return epoch_permutation(self.size, seed=self.seed, epoch=epoch)
        return np.arange(self.size)

    def __iter__(self) -> Iterator[SampleKey]:
        epoch, order = -1, None
        iteration, draw = self.start_iter, self.class_draw
        while True:
            for position in self.positions(iteration):
                frame = None
                if draw is None or not draw.rare_frames:
                    if position // self.size != epoch:
                        epoch = position // self.size
                        order = self._order(epoch)
                    frame = int(order[position % self.size])
                if draw is None:
                    yield frame, self.seed, position
                else:
                    frame, crop_class = draw(np.random.default_rng([self.seed, _CLASS_STREAM, position]),
                                             frame)
                    yield frame, self.seed, position, crop_class
            iteration += 1


def seed_worker(worker_id: int, *, seed: int, rank: int = 0) -> None:
    """DataLoader worker init: seed numpy/random from (seed, rank, worker id, torch base seed),
    and keep each worker single-threaded (OpenCV and torch) so workers do not oversubscribe CPUs."""
    info = get_worker_info()
    base = info.seed if info is not None else torch.initial_seed()
    state = np.random.SeedSequence([seed, rank, worker_id, base % 2**63]).generate_state(2)
    np.random.seed(int(state[0]))
    random.seed(int(state[1]))
    cv2.setNumThreads(0)
    torch.set_num_threads(1)


def build_loader(dataset: Dataset, *, batch_size: int, num_workers: int, seed: int, start_iter: int = 0,
                 rank: int = 0, world_size: int = 1, pin_memory: bool | None = None,
                 drop_last: bool = True, shuffle: bool = True,
                 class_draw: ClassDraw | None = None) -> DataLoader:
    """Endless training loader of batches ``image`` [B,3,h,w] float, ``mask`` [B,h,w] int64, ...

    ``batch_size`` (B) is this rank's share of the global batch ``batch_size * world_size``.

    Batches are a function of (seed, iteration, rank, world_size) only (see the module doc):
    a loader built with ``start_iter=k`` yields what an uninterrupted one yields from batch k on.
    ``pin_memory`` defaults to whether CUDA is available. The loader has no length; draw batches
    with ``next()`` on one iterator (``drop_last`` is kept for API symmetry: batches are always full).
    ``class_draw``: class-aware frames and crops (see the module doc); None keeps them uniform.
    """
    sampler = InfiniteSampler(len(dataset), batch_size=batch_size, seed=seed, start_iter=start_iter,
                              rank=rank, world_size=world_size, shuffle=shuffle, class_draw=class_draw)
    generator = torch.Generator()
    # fixes the workers' torch base seeds (and so their numpy/random seeds) per (seed, rank)
    generator.manual_seed(int(np.random.SeedSequence([seed, rank]).generate_state(1)[0]))
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        drop_last=drop_last, persistent_workers=num_workers > 0, generator=generator,
        worker_init_fn=functools.partial(seed_worker, seed=seed, rank=rank) if num_workers > 0 else None)


def build_eval_loader(dataset: Dataset, *, num_workers: int = 0,
                      pin_memory: bool | None = None) -> DataLoader:
    """Sequential loader, batch size 1, so frames of different sizes need no padding."""
    return DataLoader(
        dataset, batch_size=1, shuffle=False, num_workers=num_workers,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        worker_init_fn=functools.partial(seed_worker, seed=0) if num_workers > 0 else None)
