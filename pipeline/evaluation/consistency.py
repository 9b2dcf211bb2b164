"""VSPW video consistency mVC_n: how often pixels whose ground truth stays constant over n
frames keep one prediction too. Pure numpy; knows nothing of models or files.

mVC_n follows the VSPW script: for a video of C > n frames and each window start i in
range(C - n) (the last possible window is skipped, as there), G = pixels whose ground truth is
constant over frames i..i+n-1, P = pixels whose prediction is, and the window scores
|G & P| / |G| (nan when |G| = 0). Ground truth is compared as given (void is a value like any
other). mVC_n is the nan-mean over the windows of all videos pooled.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

VC_WINDOWS = (8, 16)


def _nanmean(values: Iterable[float]) -> float:
    arr = np.asarray(list(values), dtype=np.float64)
    arr = arr[~np.isnan(arr)]
    return float(arr.mean()) if arr.size else float("nan")


def vc_window_scores(gt_frames: Sequence[np.ndarray], pred_frames: Sequence[np.ndarray],
                     n: int) -> list[float]:
    """Per-window consistency scores of one video (frames HxW, in order), as the VSPW script.

    Returns C - n floats for C > n frames (nan where |G| = 0), [] otherwise. Holds the whole
    video in memory: see :class:`VideoConsistency` for the streaming form.
    """
    if len(gt_frames) != len(pred_frames):
        raise ValueError(f"{len(gt_frames)} ground-truth frames but {len(pred_frames)} predictions")
    if n < 1:
        raise ValueError(f"window length must be >= 1, got {n}")
    if len(gt_frames) <= n:
        return []
    gt, pred = np.stack(gt_frames), np.stack(pred_frames)
    if gt.shape != pred.shape:
        raise ValueError(f"ground truth shape {gt.shape} differs from prediction shape {pred.shape}")
    scores = []
    for i in range(len(gt) - n):
        g = np.all(gt[i + 1:i + n] == gt[i], axis=0)
        p = np.all(pred[i + 1:i + n] == pred[i], axis=0)
        total = np.count_nonzero(g)
        scores.append(np.count_nonzero(g & p) / total if total else float("nan"))
    return scores


def mvc(videos: Iterable[tuple[Sequence[np.ndarray], Sequence[np.ndarray]]], *, n: int) -> float:
    """mVC_n over ``(gt_frames, pred_frames)`` videos: nan-mean of all their windows pooled."""
    return _nanmean(s for gt, pred in videos for s in vc_window_scores(gt, pred, n))


class VideoConsistency:
    """Streaming mVC for several window lengths at once, O(1) frames of memory.

    Feed each video's frames in order with :meth:`add_frame`, then call :meth:`end_video`.
    Per pixel it keeps how many consecutive frames, ending at the current one, the gt (and the
    prediction) has stayed unchanged: a window of n frames ending here is constant iff that
    run is >= n - 1. A window's score is held back until the next frame arrives, since the
    last window of a video does not count.
    """

    def __init__(self, *, windows: Sequence[int] = VC_WINDOWS):
        if not windows or min(windows) < 1:
            raise ValueError(f"window lengths must be >= 1, got {list(windows)}")
        self.windows = tuple(int(n) for n in windows)
        self._cap = max(self.windows) - 1
        self._dtype = np.uint8 if self._cap <= 255 else np.uint16
        self.scores: dict[int, list[float]] = {n: [] for n in self.windows}
        self._reset()

    def _reset(self) -> None:
        self._frames = 0
        self._prev: tuple[np.ndarray, np.ndarray] | None = None
        self._runs: tuple[np.ndarray, np.ndarray] | None = None
        self._pending: dict[int, float] = {}

    @staticmethod
    def _advance(run: np.ndarray, prev: np.ndarray, cur: np.ndarray, cap: int) -> None:
        if cap:  # with only n = 1 every window is constant: runs stay 0
            np.minimum(run, cap - 1, out=run)
            run += 1
            np.multiply(run, cur == prev, out=run)
        np.copyto(prev, cur)

    def add_frame(self, gt: np.ndarray, pred: np.ndarray) -> None:
        """Consume the next frame of the current video: ``gt`` and ``pred`` HxW label maps."""
        gt, pred = np.asarray(gt), np.asarray(pred)
        if gt.shape != pred.shape:
            raise ValueError(f"ground truth shape {gt.shape} differs from prediction shape {pred.shape}")
        if self._prev is None:
            self._prev = (gt.copy(), pred.copy())
            self._runs = (np.zeros(gt.shape, self._dtype), np.zeros(gt.shape, self._dtype))
        else:
            if gt.shape != self._prev[0].shape:
                raise ValueError(f"frame shape {gt.shape} differs from the video's {self._prev[0].shape}")
            for n, score in self._pending.items():
                self.scores[n].append(score)
            self._pending = {}
            for run, prev, cur in zip(self._runs, self._prev, (gt, pred)):
                self._advance(run, prev, cur, self._cap)
        self._frames += 1
        run_gt, run_pred = self._runs
        for n in self.windows:
            if self._frames >= n:
                g = run_gt >= n - 1
                total = np.count_nonzero(g)
                both = np.count_nonzero(g & (run_pred >= n - 1))
                self._pending[n] = both / total if total else float("nan")

    def end_video(self) -> None:
        """Close the current video (its last window is dropped); the next frame starts a new one."""
        self._reset()

    def merge(self, other: "VideoConsistency") -> "VideoConsistency":
        """Pool the finished windows of ``other`` into this accumulator."""
        if other.windows != self.windows:
            raise ValueError(f"cannot merge window lengths {other.windows} into {self.windows}")
        for n in self.windows:
            self.scores[n].extend(other.scores[n])
        return self

    def mvc(self, n: int) -> float:
        """mVC_n over the finished videos (nan when no window had |G| > 0)."""
        return _nanmean(self.scores[n])

    def result(self) -> dict[int, float]:
        return {n: self.mvc(n) for n in self.windows}
