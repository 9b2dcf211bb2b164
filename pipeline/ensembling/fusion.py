"""Hierarchical fusion of ensemble groups, and the scores of a whole weight grid in one pass.

The ensemble averages three groups of members: strong S, weak W and auxiliary A (VSPW 2021,
5th place). With group maps P_S, P_W, P_A (means of their members' softmax maps, float32
[C, H, W]) the fused map is ``P = P_S + alpha * P_W + beta * P_A`` and the prediction its
argmax over C (the lowest class index wins an exact tie, as ``np.argmax``). :func:`fuse` is
the one definition of that arithmetic; search and apply both go through it or reproduce it
bit for bit.

Scoring every (alpha, beta) of a grid on a frame (:class:`GridScorer`) needs only the
per-class counts of mIoU: true positives and predicted pixels for each grid point (ground-truth
pixels do not depend on the weights). Three facts keep that cheap:

* with weights >= 0, a pixel whose first argmax in P_S is also a (tied or not) argmax of P_W
  and of P_A, and leads every lower class of P_S by more than float32 rounding can erase,
  predicts that class at every grid point: it is counted once for all of them;
* f_k(alpha, beta) - f_r(alpha, beta) is linear in the weights, so a class below another at
  the four corners of the grid's rectangle (by a margin larger than float32 rounding) is below
  it everywhere and can never win: most remaining pixels keep 2-3 candidate classes;
* the candidates of the rest are evaluated at all grid points at once, with the very float32
  operations of :func:`fuse` ((P_S + a P_W) + b P_A), so the argmax and the counts equal a
  per-trial brute force exactly, ties included.

:func:`score_pass` streams the OOF maps (:class:`OofSource`) once, video by video in joblib
chunks, feeding the grid scorer and any number of table rows (a member, a mean of members, a
fused map at fixed weights: confusion matrix and video consistency each).

Rows at weights known only after the grid is scored (the best point) need label maps, for
video consistency. The grid pass can leave per chunk a compact record of what it found
(:class:`FrameLabels`, :func:`save_records`: the ground truth, the label of every pixel
settled on one class, and the candidates' S, W, A values of the others), from which
:func:`labels_at` rebuilds :func:`fuse_labels` at any grid point bit for bit, and
:func:`fused_rows` scores such rows without reading a map again.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Collection, Iterable, Iterator, Mapping, Sequence

import joblib
import numpy as np
from tqdm import tqdm

from pipeline.data.manifest import Frame, read_mask
from pipeline.core.errors import PipelineError
from pipeline.evaluation.metrics import (IGNORE_INDEX, VC_WINDOWS, ConfusionMatrix, VideoConsistency,
                              confusion_matrix)
from pipeline.inference.probstore import Member

GROUPS = ("S", "W", "A")
BLOCK_ELEMENTS = 1 << 21   # grid points x pixels evaluated at once (~8 MB of float32 each)
FLUSH_PIXELS = 1 << 16     # pending multi-candidate pixels that make a batch (see GridScorer)
_MARGIN = 1e-5             # x (1 + max alpha + max beta): far above float32 rounding of P


# ----------------------------------------------------------------------------- fusion
class Mean:
    """Running mean of float32 maps: ``add`` them one at a time, ``value()`` is their sum in
    that order divided by the count (what :func:`group_mean` returns), None when empty."""

    def __init__(self):
        self.total: np.ndarray | None = None
        self.count = 0

    def add(self, probs: np.ndarray) -> None:
        if self.total is None:
            self.total = np.array(probs, dtype=np.float32, copy=True)
        else:
            self.total += probs
        self.count += 1

    def value(self) -> np.ndarray | None:
        return None if self.total is None else self.total / np.float32(self.count)


def group_mean(maps: Sequence[np.ndarray]) -> np.ndarray | None:
    """Mean float32 [C, H, W] of member maps, summed in the given order; None for no member."""
    mean = Mean()
    for probs in maps:
        mean.add(probs)
    return mean.value()


def fuse(ps: np.ndarray, pw: np.ndarray | None, pa: np.ndarray | None, *, alpha: float,
         beta: float) -> np.ndarray:
    """``(ps + alpha * pw) + beta * pa`` in float32 (an absent group adds 0): [C, ...]."""
    fused = np.asarray(ps, dtype=np.float32).copy()
    if pw is not None:
        fused += np.float32(alpha) * pw
    if pa is not None:
        fused += np.float32(beta) * pa
    return fused


def fuse_labels(ps: np.ndarray, pw: np.ndarray | None, pa: np.ndarray | None, *, alpha: float,
                beta: float) -> np.ndarray:
    """Argmax over C of :func:`fuse`: uint8 [H, W] (uint16 beyond 255 classes)."""
    fused = fuse(ps, pw, pa, alpha=alpha, beta=beta)
    return fused.argmax(axis=0).astype(np.uint8 if fused.shape[0] <= 255 else np.uint16)


# ----------------------------------------------------------------------------- grid scores
def miou_from_counts(tp: np.ndarray, pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """mIoU from per-class counts: IoU = tp / (gt + pred - tp) averaged over the classes whose
    union gt + pred - tp is > 0 (:data:`pipeline.evaluation.metrics.MIOU_DEFINITION`: a class predicted
    but absent from the ground truth counts with IoU 0), with the very operations of
    :func:`pipeline.evaluation.metrics.mean_iou` on a confusion matrix (so both give the same float).

    ``tp``, ``pred``: int [..., C]; ``gt``: int [C]. Returns float64 [...] (nan where no class
    has a union).
    """
    tp, pred, gt = np.asarray(tp), np.asarray(pred), np.asarray(gt)
    flat_tp, flat_pred = tp.reshape(-1, tp.shape[-1]), pred.reshape(-1, tp.shape[-1])
    out = np.full(flat_tp.shape[0], np.nan)
    for i, (t, p) in enumerate(zip(flat_tp, flat_pred)):
        union = p + gt - t
        valid = union > 0  # the set of classes differs from one grid point to the next
        if valid.any():
            out[i] = (t[valid].astype(np.float64) / union[valid].astype(np.float64)).mean()
    return out.reshape(tp.shape[:-1])


@dataclass
class GridCounts:
    """Counts behind the mIoU of every grid point: ``tp``/``pred`` int64 [A, B, C] (true
    positives and predicted pixels at alphas[i], betas[j]), ``gt`` int64 [C]."""

    alphas: np.ndarray
    betas: np.ndarray
    tp: np.ndarray
    pred: np.ndarray
    gt: np.ndarray

    @classmethod
    def zeros(cls, alphas: Sequence[float], betas: Sequence[float],
              num_classes: int) -> "GridCounts":
        shape = (len(alphas), len(betas), num_classes)
        return cls(np.asarray(alphas, np.float64), np.asarray(betas, np.float64),
                   np.zeros(shape, np.int64), np.zeros(shape, np.int64),
                   np.zeros(num_classes, np.int64))

    def add(self, other: "GridCounts") -> "GridCounts":
        self.tp += other.tp
        self.pred += other.pred
        self.gt += other.gt
        return self

    def miou(self) -> np.ndarray:
        """float64 [A, B] mIoU of every grid point."""
        return miou_from_counts(self.tp, self.pred, self.gt)


def _candidates(s: np.ndarray, w: np.ndarray, x: np.ndarray, alphas: np.ndarray,
                betas: np.ndarray) -> np.ndarray:
    """bool [C, n]: classes that may be the fused argmax somewhere on the grid's rectangle."""
    lo_a, hi_a, lo_b, hi_b = alphas.min(), alphas.max(), betas.min(), betas.max()
    corners = np.stack([s + a * w + b * x for a in (lo_a, hi_a) for b in (lo_b, hi_b)])
    margin = np.float32(_MARGIN * (1 + abs(hi_a) + abs(hi_b)))
    cols = np.arange(s.shape[1])
    alive = np.ones(s.shape, dtype=bool)
    for ref in corners.argmax(axis=1):           # the winner at each corner as a reference
        bar = corners[:, ref, cols] - margin     # [4, n]
        alive &= ~np.all(corners < bar[:, None, :], axis=0)
    return alive


class FrameLabels:
    """What :meth:`GridScorer.add` learned of one frame's fused labels, enough to rebuild
    :func:`fuse_labels` at any grid point without the maps (:func:`labels_at`).

    ``gt``: the frame's ground truth [H, W]; ``labels``: int [H*W], the fused label wherever it
    is the same at every grid point; ``multi``: for the other pixels, grouped by their number
    K of candidate classes, (flat pixel indices int [m], candidate classes int [K, m] in
    ascending order, their S, W, A values float32 [3, K, m]).
    """

    __slots__ = ("gt", "labels", "multi")

    def __init__(self, gt: np.ndarray, labels: np.ndarray,
                 multi: list[tuple[np.ndarray, np.ndarray, np.ndarray]]):
        self.gt, self.labels, self.multi = gt, labels, multi


def _fused_slots(values: np.ndarray, alpha: float, beta: float) -> np.ndarray:
    """Slot of the fused argmax among K candidates: ``values`` float32 [3, K, m] (S, W, A)
    -> int [m], by the float32 operations of :func:`fuse` (first maximum, like np.argmax)."""
    fused = values[0] + np.float32(alpha) * values[1]
    fused += np.float32(beta) * values[2]
    return fused.argmax(axis=0)


def labels_at(record: FrameLabels, alpha: float, beta: float) -> np.ndarray:
    """:func:`fuse_labels` of the recorded frame at the grid point (alpha, beta): [H, W]."""
    labels = record.labels.copy()
    for px, cand, values in record.multi:
        labels[px] = cand[_fused_slots(values, alpha, beta), np.arange(px.size)]
    return labels.reshape(record.gt.shape)


class GridScorer:
    """Adds the :class:`GridCounts` of frame after frame (:meth:`add`) into ``counts``.

    ``record``: :meth:`add` also returns a :class:`FrameLabels` of every frame (void pixels
    included), from which the fused labels at any grid point follow without the maps.
    Pixels with several candidates are kept (their candidates' values only) and counted
    together once ``FLUSH_PIXELS`` of them are pending, or when ``counts`` is read: a few
    large batches cost less than many small ones. Work buffers are kept from one batch to the
    next: fresh multi-megabyte temporaries cost more in page faults than their arithmetic.
    """

    def __init__(self, alphas: Sequence[float], betas: Sequence[float], num_classes: int, *,
                 ignore_index: int = IGNORE_INDEX, record: bool = False):
        self.alphas = np.asarray(alphas, np.float32)
        self.betas = np.asarray(betas, np.float32)
        if self.alphas.min() < 0 or self.betas.min() < 0:
            raise ValueError("grid weights must be >= 0")
        self._counts = GridCounts.zeros(alphas, betas, num_classes)
        self.ignore_index = ignore_index
        self.record = record
        self._margin = np.float32(_MARGIN * (1 + self.alphas.max() + self.betas.max()))
        self._buffers: dict[str, np.ndarray] = {}
        self._pending: dict[int, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {}
        self._pending_pixels = 0

    @property
    def counts(self) -> GridCounts:
        """The counts of every frame added so far."""
        self._flush()
        return self._counts

    def _flush(self) -> None:
        for k, parts in sorted(self._pending.items()):
            self._count_candidates(np.concatenate([p[0] for p in parts], axis=1),
                                   np.concatenate([p[1] for p in parts]),
                                   np.concatenate([p[2] for p in parts], axis=2))
        self._pending, self._pending_pixels = {}, 0

    def _buffer(self, name: str, shape: tuple[int, ...], dtype: type) -> np.ndarray:
        size = int(np.prod(shape))
        buf = self._buffers.get(name)
        if buf is None or buf.size < size or buf.dtype != dtype:
            buf = self._buffers[name] = np.empty(size, dtype)
        return buf[:size].reshape(shape)

    def _settle(self, s: np.ndarray, w: np.ndarray,
                x: np.ndarray) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
        """Labels int [n] of the pixels whose fused argmax is one class at every grid point,
        and (pixels int [m], candidate classes int [K, m] ascending) of the others per K.

        Settled: the first argmax of S is a weak argmax of W and A, so it is a weak argmax of
        the fused map everywhere; it also leads every lower class of S by more than float32
        rounding can take away (an exact tie would go to the lower class)."""
        c, n = s.shape
        cols = np.arange(n)
        top = s.argmax(axis=0)
        near = self._buffer("near", s.shape, np.bool_)
        np.greater_equal(s, s[top, cols] - self._margin, out=near)
        settled = near.argmax(axis=0) == top  # no lower class within the margin of the top
        settled &= w[top, cols] >= w.max(axis=0)
        settled &= x[top, cols] >= x.max(axis=0)
        rest = np.flatnonzero(~settled)
        alive = _candidates(s[:, rest], w[:, rest], x[:, rest], self.alphas, self.betas)
        n_alive = alive.sum(axis=0)
        one = n_alive == 1
        top[rest[one]] = alive[:, one].argmax(axis=0)
        multi = []
        for k in np.unique(n_alive[n_alive > 1]):
            sel = n_alive == k
            # pixel by pixel, the classes alive in ascending order
            cand = (np.flatnonzero(alive[:, sel].T) % c).reshape(-1, k).T
            multi.append((rest[sel], cand))
        return top, multi

    def add(self, ps: np.ndarray, pw: np.ndarray | None, pa: np.ndarray | None,
            gt: np.ndarray) -> FrameLabels | None:
        """Count one frame: ``ps``, ``pw``, ``pa`` float32 [C, H, W] group maps (None: empty
        group), ``gt`` int [H, W] train ids (``ignore_index`` skipped). Returns the frame's
        :class:`FrameLabels` when recording, else None."""
        c, out = self._counts.gt.size, self._counts
        gt = np.asarray(gt)
        flat_gt = gt.reshape(-1)
        void = flat_gt == self.ignore_index
        any_void = bool(void.any())
        # the pixels worked on: all of them when recording (video consistency needs the
        # prediction on void too), else the labelled ones (no copy when all are)
        pixels = np.flatnonzero(~void) if any_void and not self.record else slice(None)
        labelled = ~void if any_void and self.record else None
        g = flat_gt[pixels]
        g_lab = g if labelled is None else g[labelled]
        if g_lab.size and g_lab.max() >= c:
            raise ValueError(f"ground-truth value {int(g_lab.max())} is neither a class "
                             f"(0..{c - 1}) nor ignore ({self.ignore_index})")
        out.gt += np.bincount(g_lab, minlength=c)
        s = np.asarray(ps, np.float32).reshape(c, -1)[:, pixels]
        w, x = (np.zeros_like(s) if p is None else
                np.asarray(p, np.float32).reshape(c, -1)[:, pixels] for p in (pw, pa))
        labels, multi = self._settle(s, w, x)
        common = np.ones(labels.size, dtype=bool) if labelled is None else labelled.copy()
        for px, _ in multi:
            common[px] = False
        counted = labels[common]
        out.pred += np.bincount(counted, minlength=c)
        out.tp += np.bincount(counted[counted == g[common]], minlength=c)
        dtype = np.uint8 if c <= 255 else np.uint16
        multi = [(px, cand.astype(dtype), np.stack([s[cand, px], w[cand, px], x[cand, px]]))
                 for px, cand in multi]
        for px, cand, values in multi:
            if labelled is not None:
                keep = labelled[px]
                px, cand, values = px[keep], cand[:, keep], values[:, :, keep]
            if px.size:
                self._pending.setdefault(cand.shape[0], []).append((cand, g[px], values))
                self._pending_pixels += px.size
        if self._pending_pixels >= FLUSH_PIXELS:
            self._flush()
        if not self.record:
            return None
        return FrameLabels(gt.copy(), labels.astype(dtype),
                           [(px.astype(np.int32), cand, values) for px, cand, values in multi])

    def _slots(self, values: np.ndarray) -> np.ndarray:
        """Which of K candidates (ascending classes; ``values`` float32 [3, K, n]: their S, W,
        A) is the fused argmax at every grid point: int8 [A, B, n] (bool for K = 2), by the
        float32 operations of :func:`fuse`; a strict '>' keeps the lower class on a tie, like
        np.argmax."""
        sv, wv, xv = values                                              # [K, n]
        k_count, n = sv.shape
        a, b = self.alphas, self.betas
        t = sv[:, None] + a[:, None] * wv[:, None]                       # [K, A, n]
        bx = b[:, None] * xv[:, None]                                    # [K, B, n]
        shape = (len(a), len(b), n)
        best = np.add(t[0][:, None], bx[0][None], out=self._buffer("best", shape, np.float32))
        value = np.add(t[1][:, None], bx[1][None], out=self._buffer("value", shape, np.float32))
        if k_count == 2:
            return np.greater(value, best, out=self._buffer("slot", shape, np.bool_))
        better = np.greater(value, best, out=self._buffer("better", shape, np.bool_))
        slot = self._buffer("slot8", shape, np.int8)
        np.copyto(slot, better)
        for k in range(2, k_count):
            np.maximum(best, value, out=best)
            np.add(t[k][:, None], bx[k][None], out=value)
            np.greater(value, best, out=better)
            np.copyto(slot, np.int8(k), where=better)
        return slot

    def _count_candidates(self, cand: np.ndarray, g: np.ndarray, values: np.ndarray) -> None:
        """Add the counts of pixels with K candidate classes each (``cand`` int [K, n]
        ascending, ``g`` their ground truth [n], ``values`` float32 [3, K, n] the candidates'
        S, W, A).

        Pixels are sorted into runs sharing their candidates and the slot of their ground
        truth; per run and grid point only how many pixels each slot wins matters
        (``np.add.reduceat``): no class id per pixel and grid point is ever formed."""
        k_count, n = cand.shape
        grid, c = len(self.alphas) * len(self.betas), self._counts.gt.size
        gslot = np.full(n, k_count, dtype=np.intp)
        for k in range(k_count):
            gslot[cand[k] == g] = k
        order = np.lexsort((gslot, *cand[::-1]))
        cand, gslot = cand[:, order], gslot[order]
        key = np.vstack([cand, gslot])
        starts = np.flatnonzero(np.r_[True, np.any(key[:, 1:] != key[:, :-1], axis=0)])
        sizes = np.diff(np.r_[starts, n])
        wins = np.zeros((k_count, grid, starts.size), np.int64)  # pixels won per slot and run
        run_of = np.repeat(np.arange(starts.size), sizes)
        step = max(1, BLOCK_ELEMENTS // grid)
        for lo in range(0, n, step):
            hi = min(n, lo + step)
            slots = self._slots(values[:, :, order[lo:hi]])
            slots = slots.reshape(grid, hi - lo)
            runs = np.unique(run_of[lo:hi])
            local = np.maximum(starts[runs], lo) - lo
            for k in range(1, k_count):
                won = slots if k_count == 2 else np.equal(
                    slots, k, out=self._buffer("won", slots.shape, np.bool_))
                wins[k][:, runs] += np.add.reduceat(won.view(np.int8), local, axis=1,
                                                    dtype=np.int32)
        wins[0] = sizes - wins[1:].sum(axis=0)
        # runs -> classes: a 0/1 matrix product in int64 (exact; numpy's own loop: BLAS threads
        # cost more than they save on these small products)
        onehot = np.eye(c, dtype=np.int64)
        hits = gslot[starts][None, :] == np.arange(k_count)[:, None]     # [K, runs]
        pred = sum(wins[k] @ onehot[cand[k, starts]] for k in range(k_count))
        tp = sum(wins[k] @ (onehot[cand[k, starts]] * hits[k][:, None]) for k in range(k_count))
        self._counts.pred += pred.reshape(self._counts.pred.shape)
        self._counts.tp += tp.reshape(self._counts.tp.shape)


def grid_counts(ps: np.ndarray, pw: np.ndarray | None, pa: np.ndarray | None, gt: np.ndarray, *,
                alphas: Sequence[float], betas: Sequence[float],
                ignore_index: int = IGNORE_INDEX) -> GridCounts:
    """Counts of the fused argmax at every (alphas[i], betas[j]) against ``gt`` on one frame
    (see :meth:`GridScorer.add`). Weights must be >= 0. Equal to scoring :func:`fuse_labels`
    at each grid point separately (see the module docstring)."""
    scorer = GridScorer(alphas, betas, ps.shape[0], ignore_index=ignore_index)
    scorer.add(ps, pw, pa, gt)
    return scorer.counts


# ----------------------------------------------------------------------------- passes over OOF maps
@dataclass(frozen=True)
class OofSource:
    """How a pass reads a training frame: its ground truth at the maps' resolution, then the
    out-of-fold map of each member in turn (one map in memory at a time).

    ``members`` are sorted by name: every mean sums their maps in that order. ``lut``: raw mask
    value -> train id. ``full_size``: upsample strided maps to the mask's size; otherwise the
    mask is subsampled by the members' common ``stride`` (scores on the stored grid).
    """

    members: tuple[Member, ...]
    lut: np.ndarray
    num_classes: int
    stride: int = 1
    full_size: bool = False
    ignore_index: int = IGNORE_INDEX

    def gt(self, frame: Frame) -> np.ndarray:
        mask = read_mask(frame.mask, self.lut)
        return mask if self.full_size or self.stride == 1 else mask[::self.stride, ::self.stride]

    def maps(self, frame: Frame, shape: tuple[int, int],
             names: Collection[str] | None = None) -> Iterator[tuple[str, np.ndarray]]:
        """(member name, float32 [C, H, W] map) for the members in ``names`` (all: None)."""
        want = (self.num_classes, *shape)
        for member in self.members:
            if names is not None and member.name not in names:
                continue
            probs = member.read_oof(frame.id, full_size=self.full_size)
            if probs.shape != want:
                scale = "" if self.full_size or self.stride == 1 else f" at stride {self.stride}"
                raise PipelineError(
                    f"{member.root}: out-of-fold map of frame '{frame.id}' is {list(probs.shape)} "
                    f"[C, H, W] but {self.num_classes} classes and the mask{scale} need "
                    f"{list(want)}")
            yield member.name, probs


@dataclass(frozen=True)
class MeanRow:
    """A table row predicting the argmax of the mean of ``members`` (one member: itself)."""

    members: tuple[str, ...]


@dataclass(frozen=True)
class FusedRow:
    """A table row predicting :func:`fuse_labels` of the groups at (alpha, beta)."""

    alpha: float
    beta: float


def _labels(probs: np.ndarray) -> np.ndarray:
    return probs.argmax(axis=0).astype(np.uint8 if probs.shape[0] <= 255 else np.uint16)


def frame_chunks(frames: Sequence[Frame], size: int) -> list[list[Frame]]:
    """Consecutive runs of ``size`` frames."""
    return [list(frames[i:i + size]) for i in range(0, len(frames), max(1, size))]


def video_chunks(frames: Sequence[Frame], size: int) -> list[list[Frame]]:
    """Whole videos (``frames`` sorted by video and frame) packed into runs of >= ``size``."""
    chunks: list[list[Frame]] = []
    for _, video in itertools.groupby(frames, key=lambda f: f.video):
        if not chunks or len(chunks[-1]) >= size:
            chunks.append([])
        chunks[-1].extend(video)
    return chunks


def run_chunks(fn: Callable, chunks: list[list[Frame]], *, workers: int, progress: bool,
               desc: str) -> Iterator:
    """``fn(chunk)`` for every chunk on ``workers`` joblib processes, results in order."""
    results = joblib.Parallel(n_jobs=workers, return_as="generator")(
        joblib.delayed(fn)(chunk) for chunk in chunks)
    with tqdm(total=sum(map(len, chunks)), desc=desc, unit="frame", disable=not progress) as bar:
        for chunk, result in zip(chunks, results):
            bar.update(len(chunk))
            yield result


Table = dict[str, tuple[np.ndarray, VideoConsistency]]


# ----------------------------------------------------------------------------- label records
def save_records(path: Path, records: Sequence[FrameLabels], *, new_video: Sequence[bool]) -> None:
    """The :class:`FrameLabels` of one chunk's frames (in order; ``new_video``: frame i starts
    a video) as one uncompressed npz: frames concatenated pixel after pixel, multi-candidate
    pixels grouped by K over the whole chunk."""
    offsets = np.cumsum([0] + [r.labels.size for r in records])
    index = np.int32 if offsets[-1] < 2**31 else np.int64
    by_k: dict[int, list] = {}
    for offset, record in zip(offsets, records):
        for px, cand, values in record.multi:
            by_k.setdefault(cand.shape[0], []).append((px.astype(index) + index(offset), cand,
                                                       values))
    arrays = {"shapes": np.array([r.gt.shape for r in records], np.int64).reshape(-1, 2),
              "new_video": np.asarray(new_video, bool),
              "gt": np.concatenate([r.gt.reshape(-1) for r in records]),
              "labels": np.concatenate([r.labels for r in records])}
    for k, parts in by_k.items():
        arrays[f"index{k}"] = np.concatenate([p[0] for p in parts])
        arrays[f"cand{k}"] = np.concatenate([p[1] for p in parts], axis=1)
        arrays[f"values{k}"] = np.concatenate([p[2] for p in parts], axis=2)
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)


def load_records(path: Path) -> tuple[FrameLabels, np.ndarray, np.ndarray]:
    """(the chunk's frames as one :class:`FrameLabels` of flat [N] pixels, shapes int [F, 2],
    new_video bool [F]) of :func:`save_records`."""
    with np.load(path) as data:
        arrays = {name: data[name] for name in data.files}
    ks = sorted(int(name[5:]) for name in arrays if name.startswith("index"))
    multi = [(arrays[f"index{k}"], arrays[f"cand{k}"], arrays[f"values{k}"]) for k in ks]
    return FrameLabels(arrays["gt"], arrays["labels"], multi), arrays["shapes"], arrays["new_video"]


def _rows_chunk(path: Path, *, rows: Mapping[str, FusedRow], num_classes: int,
                ignore_index: int, windows: Sequence[int]) -> Table:
    """Confusion matrix and video consistency of each fused row on one chunk's records."""
    record, shapes, new_video = load_records(path)
    bounds = np.cumsum([0] + [int(h) * int(w) for h, w in shapes])
    table = {}
    for key, row in rows.items():
        labels = labels_at(record, row.alpha, row.beta)
        cm = confusion_matrix(record.gt, labels, num_classes=num_classes,
                              ignore_index=ignore_index)
        vc = VideoConsistency(windows=windows)
        for i, shape in enumerate(shapes):
            if i and new_video[i]:
                vc.end_video()
            vc.add_frame(record.gt[bounds[i]:bounds[i + 1]].reshape(shape),
                         labels[bounds[i]:bounds[i + 1]].reshape(shape))
        table[key] = (cm, vc)
    return table


def fused_rows_tasks(record_dir: Path, *, rows: Mapping[str, FusedRow], num_classes: int,
                     ignore_index: int = IGNORE_INDEX,
                     windows: Sequence[int] = VC_WINDOWS) -> list:
    """joblib-delayed calls, one per chunk of label records in ``record_dir``, whose results
    :func:`merge_rows` adds up (run them with other tasks on the same workers)."""
    fn = functools.partial(_rows_chunk, rows=dict(rows), num_classes=num_classes,
                           ignore_index=ignore_index, windows=tuple(windows))
    return [joblib.delayed(fn)(path) for path in sorted(Path(record_dir).glob("chunk*.npz"))]


def merge_rows(tables: Iterable[Table], *, rows: Collection[str], num_classes: int,
               windows: Sequence[int] = VC_WINDOWS) -> dict[str, tuple[np.ndarray, dict]]:
    """The chunks' results (in chunk order) of :func:`fused_rows_tasks` summed up: {key:
    (confusion matrix int64 [C, C], {n: mVC_n})}."""
    cms = {key: np.zeros((num_classes, num_classes), np.int64) for key in rows}
    vcs = {key: VideoConsistency(windows=windows) for key in rows}
    for table in tables:
        for key, (cm, vc) in table.items():
            cms[key] += cm
            vcs[key].merge(vc)
    return {key: (cms[key], vcs[key].result()) for key in rows}


def fused_rows(record_dir: Path, *, rows: Mapping[str, FusedRow], num_classes: int,
               ignore_index: int = IGNORE_INDEX, windows: Sequence[int] = VC_WINDOWS,
               workers: int = 1, progress: bool = True,
               desc: str = "fused rows") -> dict[str, tuple[np.ndarray, dict[int, float]]]:
    """Rows predicting :func:`fuse_labels` at grid points, scored from the label records a
    :func:`score_pass` with ``record_dir`` left there (no map is read): {key: (confusion
    matrix int64 [C, C], {n: mVC_n})}, as the same rows of :func:`score_pass` would give."""
    tasks = fused_rows_tasks(record_dir, rows=rows, num_classes=num_classes,
                             ignore_index=ignore_index, windows=windows)
    results = joblib.Parallel(n_jobs=workers, return_as="generator")(tasks)
    return merge_rows(tqdm(results, total=len(tasks), desc=desc, unit="chunk",
                           disable=not progress), rows=rows, num_classes=num_classes,
                      windows=windows)


# ----------------------------------------------------------------------------- the pass
def _pass_chunk(frames: list[Frame], *, source: OofSource, groups: Mapping[str, Sequence[str]],
                rows: Mapping[str, MeanRow | FusedRow], windows: Sequence[int],
                grid: tuple[list[float], list[float]] | None,
                records: Mapping[str, Path] | None = None) -> tuple[GridCounts | None, Table]:
    """One chunk of whole videos, in order: grid counts (when ``grid``) and each row's
    confusion matrix and video consistency. Each member's map is read once per frame.
    ``records``: {first frame id: path} where the chunk's :class:`FrameLabels` are saved."""
    c = source.num_classes
    group_of = {name: group for group, names in groups.items() for name in names}
    needs_groups = grid is not None or any(isinstance(r, FusedRow) for r in rows.values())
    needed = {n for row in rows.values() if isinstance(row, MeanRow) for n in row.members}
    needed |= set(group_of) if needs_groups else set()
    scorer = GridScorer(*grid, c, ignore_index=source.ignore_index,
                        record=records is not None) if grid else None
    cms = {key: ConfusionMatrix(num_classes=c, ignore_index=source.ignore_index) for key in rows}
    vcs = {key: VideoConsistency(windows=windows) for key in rows}
    kept: list[FrameLabels] = []
    for i, frame in enumerate(frames):
        if i and frame.video != frames[i - 1].video:
            for vc in vcs.values():
                vc.end_video()
        gt = source.gt(frame)
        means = {group: Mean() for group in GROUPS}
        row_means = {key: Mean() for key, row in rows.items() if isinstance(row, MeanRow)}
        own = {}  # the mean of one map is that map (x / 1 == x): no copy
        for name, probs in source.maps(frame, gt.shape, needed):
            if name in group_of:
                means[group_of[name]].add(probs)
            for key, mean in row_means.items():
                if rows[key].members == (name,):
                    own[key] = probs
                elif name in rows[key].members:
                    mean.add(probs)
        if scorer is not None:
            record = scorer.add(*(means[g].value() for g in GROUPS), gt)
            if record is not None:
                kept.append(record)
        for key, row in rows.items():
            if isinstance(row, MeanRow):
                pred = _labels(own[key] if key in own else row_means[key].value())
            else:
                pred = fuse_labels(*(means[g].value() for g in GROUPS), alpha=row.alpha,
                                   beta=row.beta)
            cms[key].update(gt, pred)
            vcs[key].add_frame(gt, pred)
    if kept:
        save_records(records[frames[0].id], kept, new_video=[
            i == 0 or f.video != frames[i - 1].video for i, f in enumerate(frames)])
    return (scorer.counts if scorer else None), {key: (cms[key].matrix, vcs[key]) for key in rows}


def score_pass(source: OofSource, frames: Sequence[Frame], *,
               rows: Mapping[str, MeanRow | FusedRow],
               groups: Mapping[str, Sequence[str]] | None = None,
               grid: tuple[Sequence[float], Sequence[float]] | None = None,
               record_dir: Path | None = None, windows: Sequence[int] = VC_WINDOWS,
               workers: int = 1, chunk_frames: int = 32, progress: bool = True,
               desc: str = "OOF pass") -> tuple[GridCounts | None, dict]:
    """One read pass over ``frames`` (sorted by video and frame; whole videos per task).

    ``groups``: {"S"|"W"|"A": member names}; ``grid``: (alphas, betas) to score
    P_S + a P_W + b P_A at every grid point (:class:`GridCounts`, else None); ``rows``: named
    :class:`MeanRow` / :class:`FusedRow` predictions, each returned as (confusion matrix int64
    [C, C], {n: mVC_n} for ``windows``, nan where no video is longer than n frames).
    ``record_dir`` (with ``grid``): an existing folder where each chunk saves the
    :class:`FrameLabels` of its frames (``chunk<i>.npz``) for :func:`fused_rows`.
    Chunks of about ``chunk_frames`` frames run on ``workers`` joblib processes; each holds one
    frame's maps at a time and returns its partial counts, which are summed here.
    """
    groups = {g: list((groups or {}).get(g, [])) for g in GROUPS}
    grid = (list(grid[0]), list(grid[1])) if grid is not None else None
    if (grid or any(isinstance(r, FusedRow) for r in rows.values())) and not groups["S"]:
        raise ValueError("fusion needs a non-empty group S")
    if record_dir is not None and grid is None:
        raise ValueError("label records come from the grid: give a grid with record_dir")
    chunks = video_chunks(frames, chunk_frames)
    records = None if record_dir is None else {
        chunk[0].id: Path(record_dir) / f"chunk{i:06d}.npz" for i, chunk in enumerate(chunks)}
    fn = functools.partial(_pass_chunk, source=source, groups=groups, rows=dict(rows),
                           windows=tuple(windows), grid=grid, records=records)
    c = source.num_classes
    counts = GridCounts.zeros(*grid, c) if grid else None
    cms = {key: np.zeros((c, c), np.int64) for key in rows}
    vcs = {key: VideoConsistency(windows=windows) for key in rows}
    for part, table in run_chunks(fn, chunks, workers=workers, progress=progress, desc=desc):
        if counts is not None:
            counts.add(part)
        for key, (cm, vc) in table.items():
            cms[key] += cm
            vcs[key].merge(vc)
    return counts, {key: (cms[key], vcs[key].result()) for key in rows}
