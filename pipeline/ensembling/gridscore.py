"""The exact scores of a whole (alpha, beta) weight grid from one look at each frame's group
maps.

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
  operations of :func:`~pipeline.ensembling.fusion.fuse` ((P_S + a P_W) + b P_A), so the
  argmax and the counts equal a per-trial brute force exactly, ties included.

While it counts, the scorer can record what it learned of each frame's fused labels
(:class:`~pipeline.ensembling.records.FrameLabels`), for the rows scored after the grid.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from pipeline.ensembling.records import FrameLabels
from pipeline.evaluation.metrics import IGNORE_INDEX

BLOCK_ELEMENTS = 1 << 21   # grid points x pixels evaluated at once (~8 MB of float32 each)
FLUSH_PIXELS = 1 << 16     # pending multi-candidate pixels that make a batch (see GridScorer)
_MARGIN = 1e-5             # x (1 + max alpha + max beta): far above float32 rounding of P


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
        float32 operations of :func:`~pipeline.ensembling.fusion.fuse`; a strict '>' keeps the
        lower class on a tie, like np.argmax."""
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
    (see :meth:`GridScorer.add`). Weights must be >= 0. Equal to scoring
    :func:`~pipeline.ensembling.fusion.fuse_labels` at each grid point separately (see the
    module docstring)."""
    scorer = GridScorer(alphas, betas, ps.shape[0], ignore_index=ignore_index)
    scorer.add(ps, pw, pa, gt)
    return scorer.counts
